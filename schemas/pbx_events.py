"""PBX call events: the generic JSON event (contract §3.1) and the same fields form-encoded (Asterisk)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

import msgspec
from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, post_load, pre_load, validate

from b24scribe.events import CallEvent
from b24scribe.inbound_auth import STANDARD_WEBHOOKS
from b24scribe.limits import (
    MAX_DURATION,
    MAX_EXTENSION_LENGTH,
    MAX_ID_LENGTH,
    MAX_LINE_LENGTH,
    MAX_NUMBER_LENGTH,
    MAX_URL_LENGTH,
    MAX_USER_ID,
    StoredText,
    has_unstorable,
)
from b24scribe.parsing import form_fields
from b24scribe.sources import PbxSource
from b24scribe.transcript import Direction
from schemas.source import load_json

UNIX_SECONDS = re.compile(r"\d{9,11}(\.\d+)?")  # Asterisk ${CDR(start,u)}: 1700000000.123456
# Asterisk peers as ${DIALEDPEERNUMBER} may give them: "PJSIP/101", "101@from-internal", "Local/101-0001"
PEER_EXTENSION = re.compile(r"^(?:[A-Za-z]+/)?([^@/;-]+)")
EventName = Literal["call.started", "call.answered", "call.finished", "recording.ready"]
StatusName = Literal["answered", "busy", "no-answer", "failed", "cancelled"]
DirectionName = Literal["inbound", "outbound"]  # Direction's values (a test keeps them equal)
EVENTS: tuple[str, ...] = get_args(EventName)
# the event names of the generic format → CallEvent.event
_EVENT_NAMES = {
    "call.started": "started",
    "call.answered": "answered",
    "call.finished": "finished",
    "recording.ready": "recording",
}
STATUSES: tuple[str, ...] = get_args(StatusName)
# Asterisk's ${DIALSTATUS} and ${CDR(disposition)} values, as the dialplan snippet may send them.
ASTERISK_STATUSES = {
    "ANSWER": "answered",
    "ANSWERED": "answered",
    "BUSY": "busy",
    "NOANSWER": "no-answer",
    "NO ANSWER": "no-answer",
    "CANCEL": "cancelled",
    "CONGESTION": "congestion",
    "CHANUNAVAIL": "unavailable",
    "FAILED": "failed",
    "DONTCALL": "declined",
    "TORTURE": "declined",
    "INVALIDARGS": "failed",
}


def normalise_started_at(value: Any) -> str | None:
    """`started_at` as ISO-8601 to the second with its offset; None when it is not a valid time."""
    try:
        if (isinstance(value, int | float) and not isinstance(value, bool)) or (
            isinstance(value, str) and UNIX_SECONDS.fullmatch(value.strip())
        ):
            return datetime.fromtimestamp(float(value), UTC).isoformat(timespec="seconds")
        if not isinstance(value, str):
            return None
        parsed = datetime.fromisoformat(value.strip().replace(" ", "T", 1))
    except (ValueError, OverflowError, OSError):  # not a time, or out of the platform's range (1e20)
        return None
    return parsed.isoformat(timespec="seconds") if parsed.tzinfo is not None else None


class StartedAt(fields.Field[str]):
    """ISO-8601 with a UTC offset (`+01:00` or Asterisk's `+0100`), or unix seconds."""

    default_error_messages = {  # noqa: RUF012
        "invalid": "expected an ISO-8601 time with a UTC offset, like 2026-11-25T10:20:30+01:00, or unix seconds"
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        normalised = normalise_started_at(value)
        if normalised is None:
            raise self.make_error("invalid")
        return normalised


class GenericCallEventSchema(Schema):
    """`POST /hooks/pbx/generic`: our own API, so unknown fields are an error."""

    class Meta:
        unknown = RAISE

    event = fields.String(required=True, validate=validate.OneOf(EVENTS))
    call_id = fields.String(required=True, validate=StoredText(MAX_ID_LENGTH, identifier=True, min_length=1))
    direction = fields.String(validate=validate.OneOf([d.value for d in Direction]))
    from_ = fields.String(data_key="from", validate=StoredText(MAX_NUMBER_LENGTH))
    to = fields.String(validate=StoredText(MAX_NUMBER_LENGTH))
    extension = fields.String(validate=StoredText(MAX_EXTENSION_LENGTH))
    user_id = fields.Integer(validate=validate.Range(min=1, max=MAX_USER_ID), strict=False)
    started_at = StartedAt()
    duration = fields.Integer(validate=validate.Range(min=0, max=MAX_DURATION))
    status = fields.String(validate=validate.OneOf(STATUSES))
    recording_url = fields.Url(schemes={"http", "https"}, require_tld=False, validate=StoredText(MAX_URL_LENGTH))
    line = fields.String(validate=StoredText(MAX_LINE_LENGTH))
    # how the recording is made, on call.finished (`recording_channels`) or recording.ready (`channels`)
    recording_channels = fields.Integer(validate=validate.OneOf([1, 2]), strict=True)
    channels = fields.Integer(validate=validate.OneOf([1, 2]), strict=True)
    # false: b24scribe does not submit this call's recording for transcription (contract §10)
    transcribe = fields.Boolean()

    @post_load
    def make_event(self, data: dict[str, Any], **_: Any) -> CallEvent:
        return CallEvent(
            event=_EVENT_NAMES[data["event"]],
            call_id=data["call_id"],
            direction=Direction(data["direction"]) if "direction" in data else None,
            from_number=data.get("from_"),
            to_number=data.get("to"),
            extension=data.get("extension"),
            user_id=data.get("user_id"),
            started_at=data.get("started_at"),
            duration=data.get("duration"),
            status=data.get("status"),
            recording_url=data.get("recording_url"),
            line=data.get("line"),
            recording_channels=data.get("recording_channels", data.get("channels")),
            transcribe=data.get("transcribe"),
        )


class AsteriskCallEventSchema(GenericCallEventSchema):
    """`POST /hooks/pbx/asterisk`: the same fields form-encoded by dialplan CURL().

    Empty values (unset channel variables) count as absent; extra variables are ignored;
    `status` also takes ${DIALSTATUS}/${CDR(disposition)} values; `duration` may be a float.
    """

    class Meta:
        unknown = EXCLUDE

    status = fields.String(validate=validate.OneOf(sorted(set(STATUSES) | set(ASTERISK_STATUSES.values()))))

    @pre_load
    def normalise_form(self, data: Any, **_: Any) -> Any:
        if not isinstance(data, dict):
            return data
        cleaned: dict[str, Any] = {
            key: value.strip() for key, value in data.items() if isinstance(value, str) and value.strip() != ""
        }
        if "status" in cleaned:
            status = cleaned["status"]
            cleaned["status"] = ASTERISK_STATUSES.get(status.upper(), status.lower())
        if "duration" in cleaned:
            with contextlib.suppress(ValueError, OverflowError):  # the Integer field reports it ("nan", "inf")
                cleaned["duration"] = int(float(cleaned["duration"]))
        if "extension" in cleaned and (match := PEER_EXTENSION.match(cleaned["extension"])):
            cleaned["extension"] = match.group(1)
        if cleaned.get("event") in ("recording", "recording.ready"):
            cleaned["event"] = "recording.ready"
        elif "event" in cleaned and not cleaned["event"].startswith("call."):
            cleaned["event"] = "call." + cleaned["event"]
        return cleaned


GENERIC_CALL_EVENT = GenericCallEventSchema()
ASTERISK_CALL_EVENT = AsteriskCallEventSchema()


class _GenericCallEventFast(msgspec.Struct, forbid_unknown_fields=True, rename={"from_": "from"}):
    """GenericCallEventSchema's rules for msgspec, which decodes and checks a body in one C pass.

    Narrower than the schema or equal, never wider: a body this refuses goes to the schema, which
    accepts it or names the bad fields (tests/test_pbx_fast_path.py checks that both agree). No field
    admits null, integers are strict (the schema also takes "73" and 73.0: via the fallback).
    """

    event: EventName
    call_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    direction: DirectionName | msgspec.UnsetType = msgspec.UNSET
    from_: Annotated[str, msgspec.Meta(max_length=MAX_NUMBER_LENGTH)] | msgspec.UnsetType = msgspec.UNSET
    to: Annotated[str, msgspec.Meta(max_length=MAX_NUMBER_LENGTH)] | msgspec.UnsetType = msgspec.UNSET
    extension: Annotated[str, msgspec.Meta(max_length=MAX_EXTENSION_LENGTH)] | msgspec.UnsetType = msgspec.UNSET
    user_id: Annotated[int, msgspec.Meta(ge=1, le=MAX_USER_ID)] | msgspec.UnsetType = msgspec.UNSET
    started_at: str | int | float | msgspec.UnsetType = msgspec.UNSET
    duration: Annotated[int, msgspec.Meta(ge=0, le=MAX_DURATION)] | msgspec.UnsetType = msgspec.UNSET
    status: StatusName | msgspec.UnsetType = msgspec.UNSET
    recording_url: Annotated[str, msgspec.Meta(max_length=MAX_URL_LENGTH)] | msgspec.UnsetType = msgspec.UNSET
    line: Annotated[str, msgspec.Meta(max_length=MAX_LINE_LENGTH)] | msgspec.UnsetType = msgspec.UNSET
    recording_channels: Literal[1, 2] | msgspec.UnsetType = msgspec.UNSET
    channels: Literal[1, 2] | msgspec.UnsetType = msgspec.UNSET
    transcribe: bool | msgspec.UnsetType = msgspec.UNSET


_FAST_DECODER = msgspec.json.Decoder(_GenericCallEventFast)
_RECORDING_URL = GENERIC_CALL_EVENT.fields["recording_url"]


def _unset_to_none(value: Any) -> Any:
    return None if value is msgspec.UNSET else value


def _has_unstorable_text(fast: _GenericCallEventFast) -> bool:
    """A control character or lone surrogate in a plain string field: the schema names it (msgspec reads
    "\\u0000" as it is). `recording_url` is checked by its field's own validators, `started_at` by its parser."""
    texts = [fast.call_id]
    for value in (fast.from_, fast.to, fast.extension, fast.line):
        if value is not msgspec.UNSET:
            texts.append(value)
    return not fast.call_id.isprintable() or has_unstorable("".join(texts))  # an id: printable text only


def _parse_generic_fast(body: bytes) -> CallEvent | None:
    """The event if msgspec's pass and the two checks it cannot express accept it, else None."""
    try:
        fast = _FAST_DECODER.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):  # also its ValidationError: the schema says what is wrong
        return None
    if _has_unstorable_text(fast):
        return None
    started_at = None
    if fast.started_at is not msgspec.UNSET and (started_at := normalise_started_at(fast.started_at)) is None:
        return None
    if fast.recording_url is not msgspec.UNSET:
        try:
            _RECORDING_URL.deserialize(fast.recording_url)
        except ValidationError:
            return None
    return CallEvent(
        event=_EVENT_NAMES[fast.event],
        call_id=fast.call_id,
        direction=None if fast.direction is msgspec.UNSET else Direction(fast.direction),
        from_number=_unset_to_none(fast.from_),
        to_number=_unset_to_none(fast.to),
        extension=_unset_to_none(fast.extension),
        user_id=_unset_to_none(fast.user_id),
        started_at=started_at,
        duration=_unset_to_none(fast.duration),
        status=_unset_to_none(fast.status),
        recording_url=_unset_to_none(fast.recording_url),
        line=_unset_to_none(fast.line),
        recording_channels=_unset_to_none(fast.recording_channels) or _unset_to_none(fast.channels),
        transcribe=_unset_to_none(fast.transcribe),
    )


def parse_generic_body(body: bytes) -> CallEvent:
    """A generic JSON call event from the raw body: the hot path of `POST /hooks/pbx/generic`.

    msgspec takes the common, valid event (a few µs); anything it declines is loaded by the
    marshmallow schema, the contract, which accepts it or raises ValidationError naming the fields.
    """
    event = _parse_generic_fast(body)
    if event is not None:
        return event
    return parse_generic(load_json(body))


def parse_generic(payload: Any) -> CallEvent:
    """Load a JSON call event (the decoded body) with the schema."""
    if not isinstance(payload, dict):
        raise ValidationError({"_body": ["expected a JSON object"]})
    result: CallEvent = GENERIC_CALL_EVENT.load(payload)
    return result


def parse_asterisk(form: dict[str, str]) -> CallEvent:
    """Load a form-encoded call event."""
    result: CallEvent = ASTERISK_CALL_EVENT.load(form)
    return result


def parse_generic_request(body: bytes, query: Mapping[str, str]) -> CallEvent:
    """`POST /hooks/pbx/generic`: the JSON body (the query carries only options and credentials)."""
    return parse_generic_body(body)


def parse_asterisk_request(body: bytes, query: Mapping[str, str]) -> CallEvent:
    """`POST /hooks/pbx/asterisk`: the dialplan's form fields, in the body or (with no body) the query."""
    return parse_asterisk(form_fields(body, query))


GENERIC = PbxSource(
    "generic",
    parse_generic_request,
    encoding="json",
    signatures=(STANDARD_WEBHOOKS,),
    summary="A call event in our own JSON format (any PBX that can send JSON)",
    openapi_schema=GenericCallEventSchema,
    checks_limits=True,  # its schema and msgspec fast path enforce them (tests/test_hostile_fields.py)
)
ASTERISK = PbxSource(
    "asterisk",
    parse_asterisk_request,
    encoding="form",
    summary="A call event from Asterisk's dialplan (CURL() posting form fields)",
    openapi_schema=AsteriskCallEventSchema,
)

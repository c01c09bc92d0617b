"""PBX call events: the generic JSON event (SPEC 3.1) and the same fields form-encoded (Asterisk)."""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, post_load, pre_load, validate

from b24scribe.ingest import CallEvent
from b24scribe.transcript import Direction

UNIX_SECONDS = re.compile(r"\d{9,11}(\.\d+)?")  # Asterisk ${CDR(start,u)}: 1700000000.123456
# Asterisk peers as ${DIALEDPEERNUMBER} may give them: "PJSIP/101", "101@from-internal", "Local/101-0001"
PEER_EXTENSION = re.compile(r"^(?:[A-Za-z]+/)?([^@/;-]+)")
EVENTS = ("call.started", "call.answered", "call.finished")
STATUSES = ("answered", "busy", "no-answer", "failed", "cancelled")
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


class StartedAt(fields.Field[str]):
    """ISO-8601 with a UTC offset (`+01:00` or Asterisk's `+0100`), or unix seconds."""

    default_error_messages = {  # noqa: RUF012
        "invalid": "expected an ISO-8601 time with a UTC offset, like 2026-11-25T10:20:30+01:00, or unix seconds"
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if (isinstance(value, int | float) and not isinstance(value, bool)) or (
            isinstance(value, str) and UNIX_SECONDS.fullmatch(value.strip())
        ):
            return datetime.fromtimestamp(float(value), UTC).isoformat(timespec="seconds")
        if not isinstance(value, str):
            raise self.make_error("invalid")
        try:
            parsed = datetime.fromisoformat(value.strip().replace(" ", "T", 1))
        except ValueError:
            raise self.make_error("invalid") from None
        if parsed.tzinfo is None:
            raise self.make_error("invalid")
        return parsed.isoformat(timespec="seconds")


class GenericCallEventSchema(Schema):
    """`POST /hooks/pbx/generic`: our own API, so unknown fields are an error."""

    class Meta:
        unknown = RAISE

    event = fields.String(required=True, validate=validate.OneOf(EVENTS))
    call_id = fields.String(required=True, validate=validate.Length(min=1, max=128))
    direction = fields.String(validate=validate.OneOf([d.value for d in Direction]))
    from_ = fields.String(data_key="from", validate=validate.Length(max=64))
    to = fields.String(validate=validate.Length(max=64))
    extension = fields.String(validate=validate.Length(max=64))
    user_id = fields.Integer(validate=validate.Range(min=1), strict=False)
    started_at = StartedAt()
    duration = fields.Integer(validate=validate.Range(min=0))
    status = fields.String(validate=validate.OneOf(STATUSES))
    recording_url = fields.Url(schemes={"http", "https"}, require_tld=False)
    line = fields.String(validate=validate.Length(max=64))

    @post_load
    def make_event(self, data: dict[str, Any], **_: Any) -> CallEvent:
        return CallEvent(
            event=data["event"].removeprefix("call."),
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
            with contextlib.suppress(ValueError):  # the Integer field reports it
                cleaned["duration"] = int(float(cleaned["duration"]))
        if "extension" in cleaned and (match := PEER_EXTENSION.match(cleaned["extension"])):
            cleaned["extension"] = match.group(1)
        if "event" in cleaned and not cleaned["event"].startswith("call."):
            cleaned["event"] = "call." + cleaned["event"]
        return cleaned


GENERIC_CALL_EVENT = GenericCallEventSchema()
ASTERISK_CALL_EVENT = AsteriskCallEventSchema()


def parse_generic(payload: Any) -> CallEvent:
    """Load a JSON call event."""
    if not isinstance(payload, dict):
        raise ValidationError({"_body": ["expected a JSON object"]})
    result: CallEvent = GENERIC_CALL_EVENT.load(payload)
    return result


def parse_asterisk(form: dict[str, str]) -> CallEvent:
    """Load a form-encoded call event."""
    result: CallEvent = ASTERISK_CALL_EVENT.load(form)
    return result

"""Mango Office VPBX "API Realtime" events (`POST /hooks/pbx/mango`, contract §11).

Mango posts form fields `vpbx_api_key`, `sign` and `json` (the event, a JSON string) for each event
it sends to its `/events/call`, `/events/summary`, `/events/recording` and `/events/record/added`;
here all of them arrive at one URL and the event's own fields say which it is:

- a call event (`call_state` Appeared | Connected | OnHold | Disconnected; one per leg, `call_id`):
  `Appeared` starts the call (the direction is read from which side has an `extension`: only the
  caller → outbound, only the callee or none → inbound, both → internal leg, no direction) and
  names the employee whose phone rings (the caller of an outbound call, the agent of an inbound
  leg at `location` `abonent`: the card pops up for them);
  `Connected` at `location` `abonent` is an employee answering: `answered`, with that employee's
  extension (the callee's, or for an outbound call the caller's). Connected in the IVR or a queue is
  the PBX answering, not a person. Every other state only keeps the call's numbers up to date: a
  leg that ends (an IVR or queue leg, a ringing agent who did not pick up, the first agent of a
  transfer) never finishes the call and never names its employee. Events fold in the order they
  arrive (later values win), which is the order Mango sends them in.
- the summary (`entry_result`, `talk_time`, `call_direction`…), sent once when the whole call
  ended: the one `finished` event. `talk_time` is when the talk began (0: never answered): answered
  when `entry_result` is 1 or `talk_time` is set, and the duration is `end_time - talk_time`.
  A missed call's status comes from `disconnect_reason` (1121 busy, 1122/1123 declined, 1131/1132
  and 42xx unavailable, 1111/1163 no answer, …); its employee is the summary's `to` (the first
  agent who missed it). An answered inbound call's employee is the last agent who answered
  (`Connected`), so a transferred call ends with the agent it was transferred to.
- a recording (`recording_id`): `/events/record/added` (the file is in Mango's storage) and
  `/events/recording` with `recording_state` Completed and `completion_code` 1000 become a
  `recording` event. Mango's recordings are fetched through its API, so the URL is Mango's
  download link without its expiring signature:
  `https://app.mango-office.ru/vpbx/queries/recording/link/<recording_id>/download`; the download
  appends `/<vpbx_api_key>/<timestamp>/<sha256(vpbx_api_key + timestamp + recording_id + salt)>`.
  Started/Continued, or a recording too short to keep, only keeps the call as it is.

The call is `entry_id`: it stays the same across IVR, queue, forwarding and transfer legs, so every
leg folds into one Bitrix24 call (`call_id` names one leg only).

Authentication: `sign` = hex sha256(vpbx_api_key + json + vpbx_api_salt) over the `json` field as
received, and `vpbx_api_key` must be B24SCRIBE_MANGO_API_KEY (salt: B24SCRIBE_MANGO_API_SALT), both
compared in constant time. The signature covers neither the URL nor a time: a repeated delivery is
a duplicate (the same call and bytes), and Mango documents no tolerance to refuse older ones by.
With both settings set, every request without a bearer token or `?token=` must carry a valid sign;
the inbound token works too (contract §4).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import requests
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from b24scribe.events import CallEvent
from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest
from b24scribe.limits import (
    MAX_EXTENSION_LENGTH,
    MAX_ID_LENGTH,
    MAX_LINE_LENGTH,
    MAX_NUMBER_LENGTH,
    StoredText,
)
from b24scribe.parsing import form_fields
from b24scribe.settings import Settings
from b24scribe.sources import HookAnswer, PbxSource
from b24scribe.transcript import Direction
from schemas.pbx_events import normalise_started_at

NAME = "mango"
RECORDING_LINK = "https://app.mango-office.ru/vpbx/queries/recording/link/{recording_id}/download"
CALL_STATES = ("Appeared", "Connected", "OnHold", "Disconnected")
RECORDING_STATES = ("Started", "Continued", "Completed")
MAX_TIMESTAMP = 99_999_999_999  # unix seconds (year 5138): what a Mango time can be
# summary `call_direction`: 0 internal, 1 inbound, 2 outbound
CALL_DIRECTIONS = {0: None, 1: Direction.INBOUND, 2: Direction.OUTBOUND}
# `disconnect_reason` of a call nobody answered → our status (Mango's code table, VPBX API manual)
MISSED_REASONS = {
    1110: "no-answer",  # ended by the caller (before an answer)
    1111: "no-answer",  # no answer within the wait time
    1121: "busy",  # "busy" from the far end
    1122: "declined",  # declined by the callee
    1123: "declined",  # do not disturb
    1124: "unavailable",  # the employee is unavailable
    1131: "unavailable",  # the number is unreachable
    1132: "unavailable",  # the number is not served
    1133: "failed",  # the number does not exist
    1160: "no-answer",  # the group call failed
    1162: "congestion",  # the hold queue is full
    1163: "no-answer",  # the hold-queue wait time ran out
}


def sign(api_key: str, payload: str, salt: str) -> str:
    """Mango's `sign`: hex sha256 of key + json + salt (the tests sign with it too)."""
    return hashlib.sha256((api_key + payload + salt).encode("utf-8")).hexdigest()


def _missed_status(reason: int | None, direction: Direction | None) -> str:
    """A call that was never answered: busy, declined, unreachable, failed, or no answer."""
    if reason is None:
        return "no-answer"
    if reason in MISSED_REASONS:
        status = MISSED_REASONS[reason]
        if reason == 1110 and direction == Direction.OUTBOUND:
            return "cancelled"  # our employee hung up before the customer answered
        return status
    if 1130 <= reason < 1160 or 2000 <= reason < 3000 or 3200 <= reason < 3300 or 5000 <= reason < 6000:
        return "failed"  # restrictions, billing, a bad number, Mango's own errors
    if 4200 <= reason < 4300:
        return "unavailable"
    return "no-answer"  # 11xx: the call ended normally without anyone answering


class Text(fields.Field[str]):
    """A string, or an integer Mango may send for a number or an extension (kept as its digits)."""

    default_error_messages = {"invalid": "Not a valid string."}  # noqa: RUF012

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise self.make_error("invalid")
        return value.strip()


def _number(maximum: int) -> fields.Integer:
    """An integer, also as a string of digits ("1000") as some Mango events send it; never a boolean."""
    return fields.Integer(load_default=None, allow_none=True, strict=False, validate=validate.Range(min=0, max=maximum))


class PartySchema(Schema):
    """`from` / `to`: a number (a phone number or a SIP address), an employee's extension, a line."""

    class Meta:
        unknown = EXCLUDE

    number = Text(load_default=None, allow_none=True, validate=StoredText(MAX_NUMBER_LENGTH))
    extension = Text(load_default=None, allow_none=True, validate=StoredText(MAX_EXTENSION_LENGTH))
    line_number = Text(load_default=None, allow_none=True, validate=StoredText(MAX_LINE_LENGTH))


class _EventSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    entry_id = fields.String(required=True, validate=StoredText(MAX_ID_LENGTH, identifier=True, min_length=1))
    call_id = fields.String(load_default=None, allow_none=True, validate=StoredText(MAX_ID_LENGTH))
    from_ = fields.Nested(PartySchema, data_key="from", load_default=None, allow_none=True)
    to = fields.Nested(PartySchema, load_default=None, allow_none=True)
    timestamp = _number(MAX_TIMESTAMP)
    seq = _number(MAX_TIMESTAMP)


class CallStateSchema(_EventSchema):
    """`/events/call`: one leg's state."""

    call_state = fields.String(required=True, validate=validate.OneOf(CALL_STATES))
    location = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=32))
    disconnect_reason = _number(99_999)


class SummarySchema(_EventSchema):
    """`/events/summary`: the whole call, once it ended."""

    call_direction = fields.Integer(
        load_default=None, allow_none=True, strict=False, validate=validate.OneOf([0, 1, 2])
    )
    line_number = Text(load_default=None, allow_none=True, validate=StoredText(MAX_LINE_LENGTH))
    create_time = _number(MAX_TIMESTAMP)
    forward_time = _number(MAX_TIMESTAMP)
    talk_time = _number(MAX_TIMESTAMP)
    end_time = _number(MAX_TIMESTAMP)
    entry_result = fields.Integer(load_default=None, allow_none=True, strict=False, validate=validate.OneOf([0, 1]))
    disconnect_reason = _number(99_999)


class RecordingSchema(_EventSchema):
    """`/events/recording` (with `recording_state`) and `/events/record/added`."""

    recording_id = fields.String(required=True, validate=StoredText(512, identifier=True, min_length=1))
    recording_state = fields.String(load_default=None, allow_none=True, validate=validate.OneOf(RECORDING_STATES))
    completion_code = _number(99_999)


class MangoFormSchema(Schema):
    """What Mango posts (form-encoded): its API key, the signature and the event as a JSON string."""

    vpbx_api_key = fields.String(required=True, metadata={"description": "the VPBX API key"})
    sign = fields.String(required=True, metadata={"description": "hex sha256(vpbx_api_key + json + vpbx_api_salt)"})
    json = fields.String(
        required=True,
        metadata={
            "description": "the event as a JSON string: a call state (`call_state`), the summary "
            "(`entry_result`, `talk_time`) or a recording (`recording_id`); the call is `entry_id`"
        },
    )


_CALL = CallStateSchema()
_SUMMARY = SummarySchema()
_RECORDING = RecordingSchema()


def _phone(number: str | None) -> str | None:
    """A phone number, not a SIP address of an employee's phone (`sip:101@vpbx….mangosip.ru`)."""
    if not number or number.lower().startswith("sip:"):
        return None
    return number


def _party(data: dict[str, Any], key: str) -> dict[str, Any]:
    return data.get(key) or {}


def _load(schema: Schema, payload: dict[str, Any]) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = schema.load(payload)
    except ValidationError as error:
        raise ValidationError({"json": error.messages}) from None
    return loaded


def _call_event(payload: dict[str, Any]) -> CallEvent:
    data = _load(_CALL, payload)
    caller, callee = _party(data, "from_"), _party(data, "to")
    caller_extension, callee_extension = caller.get("extension"), callee.get("extension")
    state = data["call_state"]
    direction = None
    extension = None
    if state == "Appeared":
        if caller_extension and not callee_extension:
            direction, extension = Direction.OUTBOUND, caller_extension  # our employee calls out
        elif not caller_extension:
            direction = Direction.INBOUND
            if data.get("location") == "abonent":
                # an agent's phone rings: the card can pop up for them; whoever answers (Connected)
                # or, for a missed call, the summary's agent replaces them
                extension = callee_extension
    answered = state == "Connected" and data.get("location") == "abonent"
    if answered:
        extension = callee_extension or caller_extension
    return CallEvent(
        event="answered" if answered else "started",
        call_id=data["entry_id"],
        direction=direction,
        from_number=_phone(caller.get("number")),
        to_number=_phone(callee.get("number")),
        extension=extension,
        line=callee.get("line_number") or caller.get("line_number"),
    )


def _summary_event(payload: dict[str, Any]) -> CallEvent:
    data = _load(_SUMMARY, payload)
    caller, callee = _party(data, "from_"), _party(data, "to")
    direction = CALL_DIRECTIONS.get(data.get("call_direction"))  # type: ignore[arg-type]  # None: not said
    talk, end = data.get("talk_time") or 0, data.get("end_time") or 0
    answered = data.get("entry_result") == 1 or talk > 0
    if answered:
        status, duration = "answered", max(0, end - talk) if talk and end else 0
    else:
        status, duration = _missed_status(data.get("disconnect_reason"), direction), 0
    if direction == Direction.OUTBOUND:
        extension = caller.get("extension")
    elif answered:
        extension = None  # the agent who answered last (Connected) stays: a transfer's second agent
    else:
        extension = callee.get("extension")  # the first agent who missed it
    created = data.get("create_time")
    return CallEvent(
        event="finished",
        call_id=data["entry_id"],
        direction=direction,
        from_number=_phone(caller.get("number")),
        to_number=_phone(callee.get("number")),
        extension=extension,
        started_at=normalise_started_at(created) if created else None,
        duration=duration,
        status=status,
        line=data.get("line_number") or callee.get("line_number") or caller.get("line_number"),
    )


def _recording_event(payload: dict[str, Any]) -> CallEvent:
    data = _load(_RECORDING, payload)
    state, code = data.get("recording_state"), data.get("completion_code")
    ready = state is None or (state == "Completed" and code in (None, 1000))
    if not ready:
        return CallEvent(event="started", call_id=data["entry_id"])
    url = RECORDING_LINK.format(recording_id=quote(data["recording_id"], safe=""))
    return CallEvent(event="recording", call_id=data["entry_id"], recording_url=url)


def event_payload(form: Mapping[str, str]) -> dict[str, Any]:
    """The event inside the form's `json` field (a ValidationError naming `json` when it is not one)."""
    raw = form.get("json")
    if raw is None:
        raise ValidationError({"json": ["Missing data for required field."]})
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise ValidationError({"json": [f"Not valid JSON ({type(error).__name__})."]}) from None
    if not isinstance(payload, dict):
        raise ValidationError({"json": ["Expected a JSON object."]})
    return payload


def parse_payload(payload: dict[str, Any]) -> CallEvent:
    """One Mango event (the decoded `json` field) as our CallEvent."""
    if "call_state" in payload:
        return _call_event(payload)
    if "recording_id" in payload:
        return _recording_event(payload)
    if any(key in payload for key in ("entry_result", "talk_time", "call_direction", "end_time")):
        return _summary_event(payload)
    raise ValidationError(
        {
            "json": [
                "Not a Mango call (call_state), summary (entry_result, talk_time) or recording (recording_id) event."
            ]
        }
    )


def parse(body: bytes, query: Mapping[str, str]) -> CallEvent:
    """`POST /hooks/pbx/mango`: Mango's form (`vpbx_api_key`, `sign`, `json`), in the body or the query."""
    return parse_payload(event_payload(form_fields(body, query)))


def _raw_form(body: bytes) -> dict[str, str]:
    """The form as sent (values unstripped: the signature covers the `json` field byte for byte)."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        raise AuthFailure(401, "bad_signature", "Mango sign rejected: the body is not a UTF-8 form") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


class MangoSignature:
    """Mango's `sign` over its API key, the `json` field and the API salt (sha256, hex)."""

    name = "mango-sign"
    signature_header = "sign"  # a form field, not a header: Mango signs inside the body
    description = (
        "form field `sign` = hex sha256(vpbx_api_key + json + salt) with `vpbx_api_key` equal to "
        "B24SCRIBE_MANGO_API_KEY and the salt B24SCRIBE_MANGO_API_SALT (in the body, not a header)"
    )

    def configured(self, settings: Settings, source: str) -> bool:
        return bool(settings.vendor_setting(source, "API_KEY")) and bool(settings.vendor_setting(source, "API_SALT"))

    def present(self, request: HookRequest) -> bool:
        """Mango signs inside the body: every request that brings no token of ours is checked by it."""
        return request.header("authorization") is None and request.query.get("token") is None

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        """The signature is in the body: nothing to refuse before it is read."""

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        key = settings.vendor_setting(source, "API_KEY") or ""
        salt = settings.vendor_setting(source, "API_SALT") or ""
        form = _raw_form(body)
        given_key, given_sign, payload = form.get("vpbx_api_key"), form.get("sign"), form.get("json")
        if given_key is None or given_sign is None or payload is None:
            raise AuthFailure(401, "bad_signature", "Mango sign rejected: vpbx_api_key, sign and json are required")
        same_key = hmac.compare_digest(given_key.encode(), key.encode())
        same_sign = hmac.compare_digest(given_sign.strip().lower().encode(), sign(key, payload, salt).encode())
        if not (same_key and same_sign):
            raise AuthFailure(401, "bad_signature", "Mango sign rejected: it does not match the key, json and salt")
        return Authenticated(self.name)


def answer(request: HookRequest, body: bytes, settings: Settings) -> HookAnswer | None:
    """Not events: Mango's connection check (a request with no event) and the DTMF events b24scribe
    does not use are answered 200 and not stored."""
    if not body.strip() and "json" not in request.query:
        return HookAnswer(200, b"{}", "application/json")
    try:
        payload = json.loads(parse_form_json(body))
    except (ValueError, RecursionError, ValidationError):
        return None  # the parser names what is wrong
    if isinstance(payload, dict) and "dtmf" in payload and "call_state" not in payload:
        return HookAnswer(200, b"{}", "application/json")
    return None


def parse_form_json(body: bytes) -> str:
    """The `json` field of a form body ('' when there is none)."""
    return form_fields(body, {}).get("json", "")


class _MangoDownloadSign(requests.auth.AuthBase):
    """Mango serves a recording link once `/<key>/<timestamp>/<sha256(key + timestamp + id + salt)>`
    is appended to it: made per download, as the timestamp must be fresh."""

    def __init__(self, api_key: str, salt: str) -> None:
        self.api_key, self.salt = api_key, salt

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        url = request.url or ""
        match = _RECORDING_ID_IN_LINK.search(url)
        if match is not None and url.endswith("/download"):
            timestamp = str(int(time.time()))
            recording_id = unquote(match.group(1))
            digest = hashlib.sha256((self.api_key + timestamp + recording_id + self.salt).encode()).hexdigest()
            request.url = f"{url}/{self.api_key}/{timestamp}/{digest}"
        return request


_RECORDING_ID_IN_LINK = re.compile(r"/recording/link/([^/]+)/download")


def recording_auth(url: str, settings: Settings) -> requests.auth.AuthBase | None:
    """The download link's signature, with B24SCRIBE_MANGO_API_KEY and B24SCRIBE_MANGO_API_SALT."""
    key, salt = settings.vendor_setting(NAME, "API_KEY"), settings.vendor_setting(NAME, "API_SALT")
    return _MangoDownloadSign(key, salt) if key and salt else None


SOURCE = PbxSource(
    NAME,
    parse,
    encoding="form",
    subpaths=True,  # Mango posts to <url>/events/call, /events/summary, /events/recording …
    signatures=(MangoSignature(),),
    answer=answer,
    recording_hosts=("app.mango-office.ru",),
    recording_auth=recording_auth,
    summary="Mango Office VPBX API Realtime events (form vpbx_api_key, sign, json; the call is entry_id)",
    openapi_schema=MangoFormSchema,
)

"""Plivo (`POST /hooks/pbx/plivo`): call, Dial and recording callbacks, form-encoded (contract §11).

What Plivo posts and what each becomes (one Bitrix24 call per A-leg `CallUUID`):

- the A-leg's answer / ring URL (`CallStatus` ringing, in-progress) → started / answered, with the
  numbers and the direction;
- the A-leg's hangup URL (`CallStatus` completed, busy, no-answer, …, `BillDuration`) → finished
  (an outbound A-leg's with its status and talk time; an inbound one's leaves them to the legs);
- a child leg (`ParentUUID`, `ParentCallUUID` or `ALegUUID` other than its `CallUUID`) → answered
  with its agent (`To`) and talk time when that leg was answered, else started with its status;
- Dial `callbackUrl` (`DialAction`, `DialALegUUID`, `DialBLegTo`, `DialBLegBillDuration`) → answered
  with the agent (and talk time, on hangup) when the B-leg was answered, else started with its status;
- Dial `action` (`DialStatus`) → answered when completed, else started with its status;
- Record `action` / `callbackUrl` (`RecordUrl`), Record API `callback_url` (`record_url`) →
  recording (contract §9).

Only the A-leg's hangup finishes the call. Each agent leg reports its own outcome as a status on
a non-finishing event (the fold keeps a call answered on any leg answered, whatever other legs
report, in any order: b24scribe/fold.py `CallState.merge`): an answered leg brings its agent and its
talk time (`DialBLegBillDuration`, a child's `BillDuration`), a leg that was not answered only its
status. An inbound A-leg is answered by Plivo's application, not by a person, so its `completed`
carries no status and no duration: the legs decide, and with no leg answered the call is missed.
An outbound A-leg (the Call API's) is the callee itself: its `CallStatus` and `BillDuration` are the
call's. A leg names nothing but its agent, so the customer's number is never replaced by an agent's.
The agent is the user part of a SIP endpoint (`sip:101@phone.plivo.com` → extension `101`); an
A-leg from a SIP endpoint is an outbound call of that extension. The callback URL may name the user
itself: `?extension=101` or `?user_id=7` (signed with the URL).

Signature: `X-Plivo-Signature-V3` with `X-Plivo-Signature-V3-Nonce`: base64 HMAC-SHA256, keyed with
B24SCRIBE_PLIVO_AUTH_TOKEN, over the URL Plivo posted to (B24SCRIBE_PUBLIC_URL + path + query, sorted)
and the sorted POST parameters, then `.` and the nonce; the header may hold several signatures,
comma-separated. The signed string is built by the official SDK (`plivo.utils.signature_v3`); the
comparison is ours, constant-time (the SDK's `validate_v3_signature` compares with `in`). Plivo's
V3 signature carries no timestamp, so a replay of the same bytes is caught as a duplicate (the call
id and the bytes, contract §5), and any change to the URL, the parameters or the nonce is a 401.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from marshmallow import INCLUDE, Schema, ValidationError, fields
from plivo.utils import signature_v3  # type: ignore[import-untyped]

from b24scribe.events import CallEvent
from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest
from b24scribe.limits import MAX_DURATION, MAX_URL_LENGTH, MAX_USER_ID, id_problem
from b24scribe.parsing import MAX_FORM_FIELDS, form_fields
from b24scribe.settings import Settings
from b24scribe.sources import PbxSource
from b24scribe.transcript import Direction
from schemas.pbx_events import normalise_started_at

NAME = "plivo"
SIGNATURE_HEADER = "X-Plivo-Signature-V3"
NONCE_HEADER = "X-Plivo-Signature-V3-Nonce"

# CallStatus values of a leg that is still on
RINGING = {"ringing", "early-media", "queued", "initiated"}
IN_PROGRESS = {"in-progress", "answered"}
# CallStatus (and a Dial action's DialStatus) of a leg that ended → our status
ENDED = {
    "completed": "answered",
    "busy": "busy",
    "no-answer": "no-answer",
    "timeout": "no-answer",
    "cancel": "cancelled",
    "canceled": "cancelled",
    "cancelled": "cancelled",
    "failed": "failed",
    "rejected": "declined",
}
CALL_STATUSES = sorted(RINGING | IN_PROGRESS | set(ENDED))
# why a dialed leg that was not answered ended (DialBLegHangupCause; Plivo's FreeSWITCH cause names)
HANGUP_CAUSES = {
    "USER_BUSY": "busy",
    "CALL_REJECTED": "declined",
    "ORIGINATOR_CANCEL": "no-answer",  # the caller hung up while the agent's phone rang: missed
    "LOSE_RACE": "no-answer",  # another phone of the Dial answered first
    "NO_ANSWER": "no-answer",
    "NO_USER_RESPONSE": "no-answer",
    "ALLOTTED_TIMEOUT": "no-answer",
    "UNALLOCATED_NUMBER": "failed",
    "NORMAL_TEMPORARY_FAILURE": "failed",
    "NETWORK_OUT_OF_ORDER": "failed",
    "DESTINATION_OUT_OF_ORDER": "unavailable",
    "SUBSCRIBER_ABSENT": "unavailable",
    "NORMAL_CIRCUIT_CONGESTION": "congestion",
    "SWITCH_CONGESTION": "congestion",
}
# the call's id, in order: a child leg names its parent (the A-leg), a Dial callback its A-leg
PARENT_FIELDS = ("ParentUUID", "ParentCallUUID", "DialALegUUID", "ALegUUID")
ANSWERED_DIAL_ACTIONS = {"answer", "connected"}

User = tuple[str | None, int | None]  # (extension, Bitrix24 user id)


def _user_part(value: str | None) -> str | None:
    """The user of a SIP URI (`sip:101@phone.plivo.com` → `101`), else None (a phone number)."""
    if not value or not value.lower().startswith(("sip:", "sips:")):
        return None
    user = value.split(":", 1)[1].split("@", 1)[0].split(";", 1)[0]
    return user or None


def _seconds(form: Mapping[str, str], *names: str) -> int | None:
    """The first of these fields that is present, as whole seconds (0–MAX_DURATION)."""
    for name in names:
        raw = form.get(name)
        if raw is None:
            continue
        try:
            seconds = int(float(raw))
        except (ValueError, OverflowError):
            raise ValidationError({name: ["expected a number of seconds"]}) from None
        if not 0 <= seconds <= MAX_DURATION:
            raise ValidationError({name: [f"Must be from 0 to {MAX_DURATION}."]})
        return seconds
    return None


def _started_at(form: Mapping[str, str]) -> str | None:
    """StartTime ("2026-11-25 10:20:30", UTC) as ISO-8601; an unreadable one is left out (it is
    informative, not worth refusing the event for)."""
    raw = form.get("StartTime")
    if not raw:
        return None
    return normalise_started_at(raw) or normalise_started_at(raw + "+00:00")


def _user(query: Mapping[str, str]) -> User:
    """The user the callback URL names (`?extension=` / `?user_id=`), if any."""
    user_id: int | None = None
    if raw := (query.get("user_id") or "").strip():
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not 1 <= int(raw) <= MAX_USER_ID:
            raise ValidationError({"user_id": [f"Must be from 1 to {MAX_USER_ID}."]})
        user_id = int(raw)
    return (query.get("extension") or "").strip() or None, user_id


def _call_ids(form: Mapping[str, str]) -> tuple[str, bool]:
    """The call's id (the parent's, for a child leg or a Dial callback) and whether this is a child leg."""
    own = form.get("CallUUID") or form.get("call_uuid")
    parent = next((form[name] for name in PARENT_FIELDS if form.get(name) and form[name] != own), None)
    call_id = parent or own
    if not call_id:
        raise ValidationError({"CallUUID": ["Missing data for required field."]})
    if (problem := id_problem(call_id)) is not None:
        raise ValidationError({"CallUUID": [problem]})
    return call_id, parent is not None


def _recording(form: Mapping[str, str], call_id: str) -> CallEvent:
    name = "RecordUrl" if form.get("RecordUrl") else "record_url"
    url = form[name]
    if not url.lower().startswith(("http://", "https://")) or len(url) > MAX_URL_LENGTH:
        raise ValidationError({name: ["expected an http(s) URL"]})
    return CallEvent(event="recording", call_id=call_id, recording_url=url)


def _agent(user: User, dialed: str | None) -> dict[str, Any]:
    """Who took a leg: the user the URL names, else the SIP endpoint the leg dialed (a phone number
    is a customer or a mobile phone, not an extension: the call keeps the user it has)."""
    return {"extension": user[0] or _user_part(dialed), "user_id": user[1]}


def _leg(call_id: str, answered: bool, status: str | None, seconds: int | None, agent: dict[str, Any]) -> CallEvent:
    """One agent leg's outcome: answered with its agent and talk time, or its status alone (a leg
    that was not answered names no user and, once the call is answered, changes nothing)."""
    if answered:
        return CallEvent(event="answered", call_id=call_id, status="answered", duration=seconds, **agent)
    return CallEvent(event="started", call_id=call_id, status=status)


def _dial_callback(form: Mapping[str, str], call_id: str, user: User) -> CallEvent:
    """Dial `callbackUrl`: a dialed leg (B-leg) was answered, or hung up."""
    action = form["DialAction"].lower()
    agent = _agent(user, form.get("DialBLegTo"))
    if action in ANSWERED_DIAL_ACTIONS:
        return _leg(call_id, True, None, None, agent)
    if action != "hangup":  # digits: nothing about the call
        return CallEvent(event="started", call_id=call_id)
    seconds = _seconds(form, "DialBLegBillDuration", "DialBLegDuration")
    if seconds:
        return _leg(call_id, True, None, seconds, agent)
    cause = HANGUP_CAUSES.get((form.get("DialBLegHangupCause") or "").upper().replace(" ", "_"), "no-answer")
    return _leg(call_id, False, cause, None, agent)


def _dial_action(form: Mapping[str, str], call_id: str, user: User) -> CallEvent:
    """Dial `action`: the Dial ended (the A-leg's hangup finishes the call)."""
    dial_status = form["DialStatus"].lower()
    if dial_status not in ENDED:
        raise ValidationError({"DialStatus": [f"Must be one of: {', '.join(sorted(ENDED))}."]})
    # a Dial the caller left before anyone answered (cancel) is a call nobody took
    status = "no-answer" if ENDED[dial_status] == "cancelled" else ENDED[dial_status]
    return _leg(call_id, status == "answered", status, None, _agent(user, None))


def _child_leg(form: Mapping[str, str], status: str, call_id: str, user: User) -> CallEvent:
    """A leg dialed from the call (an agent, a queue member, a transfer target)."""
    agent = _agent(user, form.get("To"))
    if status in RINGING:
        return CallEvent(event="started", call_id=call_id)
    if status in IN_PROGRESS:
        return _leg(call_id, True, None, None, agent)
    ours = ENDED[status]
    seconds = _seconds(form, "BillDuration", "Duration") if ours == "answered" else None
    return _leg(call_id, ours == "answered", ours, seconds, agent)


def _a_leg(form: Mapping[str, str], status: str, call_id: str, user: User) -> CallEvent:
    """The call itself: its numbers, direction and start; once it ended, its status and talk time.

    An A-leg that Plivo's application answered (an inbound call, or a call from a SIP endpoint,
    which reaches Plivo as inbound too) was answered by no one yet: who took it, and for how long,
    is what its dialed legs report, so its `completed` says nothing of the call's status (none
    answered: the call was missed). An outbound A-leg (the Call API's) is the callee's own answer.
    """
    from_number, to_number = form.get("From"), form.get("To")
    raw_direction = (form.get("Direction") or "").lower()
    direction: Direction | None = None
    if raw_direction:
        direction = Direction.OUTBOUND if raw_direction.startswith("outbound") else Direction.INBOUND
    extension, user_id = user
    answered_by_application = direction is not Direction.OUTBOUND
    if (agent := _user_part(from_number)) is not None:  # a SIP endpoint calling out through the application
        direction, extension = Direction.OUTBOUND, extension or agent
        to_number = _user_part(to_number) or to_number  # sip:14155550199@phone.plivo.com → the number
    common: dict[str, Any] = {
        "call_id": call_id,
        "direction": direction,
        "from_number": from_number,
        "to_number": to_number,
        "extension": extension,
        "user_id": user_id,
        "started_at": _started_at(form),
    }
    if status in RINGING or (status in IN_PROGRESS and answered_by_application):
        return CallEvent(event="started", **common)
    if status in IN_PROGRESS:
        return CallEvent(event="answered", **common)
    ours = ENDED[status]
    if ours != "answered":
        return CallEvent(event="finished", status=ours, duration=0, **common)
    if answered_by_application:
        return CallEvent(event="finished", **common)  # the dialed legs said whether and how long
    return CallEvent(
        event="finished", status="answered", duration=_seconds(form, "BillDuration", "Duration") or 0, **common
    )


def parse_fields(form: Mapping[str, str], query: Mapping[str, str]) -> CallEvent:
    """A Plivo callback's fields (values stripped, empty ones absent) → the call's event."""
    cleaned = {key: value.strip() for key, value in form.items() if value.strip()}
    call_id, child = _call_ids(cleaned)
    user = _user(query)
    if cleaned.get("RecordUrl") or cleaned.get("record_url"):
        return _recording(cleaned, call_id)
    if "DialAction" in cleaned:
        return _dial_callback(cleaned, call_id, user)
    if "DialStatus" in cleaned:
        return _dial_action(cleaned, call_id, user)
    status = (cleaned.get("CallStatus") or "").lower()
    if not status:
        raise ValidationError({"CallStatus": ["Missing data for required field."]})
    if status not in CALL_STATUSES:
        raise ValidationError({"CallStatus": [f"Must be one of: {', '.join(CALL_STATUSES)}."]})
    if child:
        return _child_leg(cleaned, status, call_id, user)
    return _a_leg(cleaned, status, call_id, user)


def parse(body: bytes, query: Mapping[str, str]) -> CallEvent:
    """`POST /hooks/pbx/plivo`: the callback's form fields, in the body or (GET-style, no body) the query."""
    return parse_fields(form_fields(body, query), query)


# --- the signature ----------------------------------------------------------------------------------


def signed_params(body: bytes) -> dict[str, Any]:
    """The POST parameters as Plivo signs them: every value kept (blank ones too), repeated keys as lists."""
    text = body.decode("utf-8")  # UnicodeDecodeError: the caller refuses it
    params: dict[str, Any] = {}
    for key, values in parse_qs(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS).items():
        params[key] = values[0] if len(values) == 1 else values
    return params


def expected_signature(auth_token: str, url: str, nonce: str, body: bytes) -> str:
    """The V3 signature of a POST (the official SDK builds the signed string; the tests sign with it too)."""
    params = signed_params(body)
    base_url = signature_v3.construct_post_url(url, params).decode("utf-8")
    # as the SDK's validate_v3_signature calls it: the token and the nonce as bytes
    signed: bytes = signature_v3.get_signature_v3(auth_token.encode(), base_url, nonce.encode())
    return signed.decode()


class PlivoSignatureV3:
    """`X-Plivo-Signature-V3` over the URL, the POST parameters and the nonce, with the auth token."""

    name = "plivo-signature-v3"
    signature_header = SIGNATURE_HEADER
    description = (
        "Plivo X-Plivo-Signature-V3 (with X-Plivo-Signature-V3-Nonce): HMAC-SHA256 of the URL, "
        "the sorted POST parameters and the nonce, made with B24SCRIBE_PLIVO_AUTH_TOKEN"
    )

    def configured(self, settings: Settings, source: str) -> bool:
        return bool(settings.vendor_setting(source, "AUTH_TOKEN"))

    def present(self, request: HookRequest) -> bool:
        return request.header(SIGNATURE_HEADER) is not None

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        if not (request.header(NONCE_HEADER) or "").strip():
            raise AuthFailure(401, "bad_signature", f"Plivo signature rejected: {NONCE_HEADER} is missing")

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        token = settings.vendor_setting(source, "AUTH_TOKEN") or ""
        nonce = (request.header(NONCE_HEADER) or "").strip()
        given = [value.strip() for value in (request.header(SIGNATURE_HEADER) or "").split(",")]
        try:
            expected = expected_signature(token, request.url, nonce, body)
        except (UnicodeError, ValueError):  # a body Plivo cannot have signed (not UTF-8, too many fields)
            raise AuthFailure(401, "bad_signature", "Plivo signature rejected: the body is not a form") from None
        if not any(_same_signature(value, expected) for value in given if value):
            raise AuthFailure(
                401, "bad_signature", f"{SIGNATURE_HEADER} does not match the URL, the parameters and the nonce"
            )
        return Authenticated(self.name)


def _same_signature(given: str, expected: str) -> bool:
    """Constant-time, on the decoded bytes (base64 with or without padding, as sent)."""
    try:
        given_bytes = base64.b64decode(given + "=" * (-len(given) % 4), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given_bytes, base64.b64decode(expected))


class PlivoCallbackSchema(Schema):
    """The fields of Plivo's callbacks that b24scribe reads (documentation; any other field is ignored)."""

    class Meta:
        unknown = INCLUDE

    CallUUID = fields.String(metadata={"description": "the call (leg) id; a child leg's parent names the call"})
    ParentUUID = fields.String(metadata={"description": "a child leg's parent CallUUID (also ParentCallUUID)"})
    ALegUUID = fields.String(metadata={"description": "the A-leg's CallUUID"})
    CallStatus = fields.String(metadata={"enum": CALL_STATUSES})
    Direction = fields.String(metadata={"enum": ["inbound", "outbound"]})
    From = fields.String()
    To = fields.String()
    StartTime = fields.String(metadata={"description": "yyyy-MM-dd HH:mm:ss, UTC"})
    Duration = fields.String()
    BillDuration = fields.String(metadata={"description": "talk time in seconds (the call's duration)"})
    HangupCause = fields.String()
    DialAction = fields.String(metadata={"description": "Dial callbackUrl: answer, connected, hangup, digits"})
    DialALegUUID = fields.String()
    DialBLegTo = fields.String(metadata={"description": "the agent dialed (sip:<extension>@… → extension)"})
    DialBLegBillDuration = fields.String()
    DialStatus = fields.String(metadata={"description": "Dial action URL: completed, busy, no-answer, …"})
    RecordUrl = fields.String(metadata={"description": "Record action/callbackUrl: the recording"})
    RecordingID = fields.String()


def recording_auth(url: str, settings: Settings) -> tuple[str, str] | None:
    """Plivo's recording media, when the account secures it: basic auth with
    B24SCRIBE_PLIVO_AUTH_ID and B24SCRIBE_PLIVO_AUTH_TOKEN (none unless both are set)."""
    auth_id, token = settings.vendor_setting(NAME, "AUTH_ID"), settings.vendor_setting(NAME, "AUTH_TOKEN")
    return (auth_id, token) if auth_id and token else None


SOURCE = PbxSource(
    NAME,
    parse,
    encoding="form",
    signatures=(PlivoSignatureV3(),),
    recording_hosts=("media.plivo.com",),
    recording_auth=recording_auth,
    summary="Plivo call, Dial and recording callbacks (form; X-Plivo-Signature-V3)",
    openapi_schema=PlivoCallbackSchema,
)

"""Twilio Programmable Voice (`POST /hooks/pbx/twilio`): status and recording callbacks (contract §11).

One Bitrix24 call per parent `CallSid`. Twilio posts form fields (or, with a callback method of GET,
the same fields in the query):

- **status callbacks** (`CallSid`, `ParentCallSid`, `CallStatus`, `Direction`, `From`, `To`,
  `CallDuration`, `Timestamp`, …): from the phone number's or TwiML app's "call status changes" URL
  and from `statusCallback` on `<Dial>`'s `<Client>`, `<Sip>` and `<Number>` nouns (or on calls
  created through the REST API);
- **recording status callbacks** (`RecordingStatus`, `RecordingSid`, `RecordingUrl`,
  `RecordingChannels`, `CallSid`) → a `recording` event (contract §9).

What each status callback becomes:

- parent, `CallStatus` queued / initiated / ringing → started;
- parent in-progress → answered when the parent itself is the conversation (the REST API called a
  phone number), else started (Twilio answered an inbound call, or an agent's own leg connected);
- parent completed → finished; the status and talk time are the parent's own when it is the
  conversation (answered, `CallDuration`), else left to its child legs;
- parent busy / no-answer / failed / canceled → finished with that status (`canceled` → cancelled);
- child (`ParentCallSid`) queued / initiated / ringing → started (the dialed agent);
- child in-progress → answered (the agent who took it); child completed → answered with the leg's
  talk time (`CallDuration`);
- child busy / no-answer / failed / canceled → started carrying that leg's status (the call goes on).

Only the parent's end finishes the call. A child leg's outcome is folded into the call before it
ends (`CallState.merge`): once any leg was answered the call stays answered with that leg's agent and
talk time, whatever other legs (a ring group's, a sequential dial's) report before or after it; a
transfer (the parent redirected to dial another agent) ends with the last agent who answered and the
talk time of that leg. A call no leg answered ends with the last leg's status (busy, no answer, …).

Who the Bitrix24 user is: the dialed agent, from the leg's `To`: `client:101` → extension `101`,
`sip:101@example.sip.twilio.com` → `101` (USER_PHONE_INNER: name Twilio Client identities and SIP
users after Bitrix24 inner numbers). A SIP user part that is a phone number (7+ digits) is a number,
not an agent; a `<Number>` leg names no agent (the default user is used). The callback URL may say
it itself: `?extension=101` or `?user_id=7` (signed with the URL). An inbound parent `From` that is
an agent (`client:101` calling out through a TwiML app) makes the call outbound for that agent.

Direction: the parent's `Direction` (`inbound` and `trunking-terminating` are inbound; `outbound-api`,
`outbound-dial` and `trunking-originating` outbound). A child leg says nothing about the direction
(its `From` is the caller, or our caller id when an agent dials out) unless its callback URL has
`?direction=outbound` (an agent dialing a customer through `<Dial><Number>`: the leg's `To` is the
customer) or `?direction=inbound`; until the parent's own callback says otherwise a call is inbound.

Authentication: `X-Twilio-Signature` with B24SCRIBE_TWILIO_AUTH_TOKEN, verified by Twilio's SDK
(`twilio.request_validator.RequestValidator`, the scheme shared with `stt/twilio`, `schemas.twilio`):
base64 HMAC-SHA1 of the URL Twilio used (B24SCRIBE_PUBLIC_URL + path + query) and the sorted form
parameters; JSON through `bodySHA256`; HMAC-SHA256 with B24SCRIBE_TWILIO_WEBHOOK_SECRET under a
webhook rule. Twilio's signature has no timestamp and Twilio documents no age limit, so nothing is
refused as stale; a replayed request is a duplicate: Twilio's `I-Twilio-Idempotency-Token` (the same
on its retries), else the call id and the bytes (contract §5). The inbound token works too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from b24scribe.events import CallEvent
from b24scribe.limits import (
    MAX_DURATION,
    MAX_EXTENSION_LENGTH,
    MAX_LINE_LENGTH,
    MAX_NUMBER_LENGTH,
    MAX_URL_LENGTH,
    MAX_USER_ID,
    id_problem,
    text_problem,
)
from b24scribe.parsing import form_fields
from b24scribe.settings import Settings
from b24scribe.sources import PbxSource
from b24scribe.transcript import Direction
from schemas.twilio import SIGNATURE

NAME = "twilio"
DELIVERY_HEADER = "I-Twilio-Idempotency-Token"

RINGING = frozenset({"queued", "initiated", "ringing"})
ANSWERED = frozenset({"in-progress", "answered"})
ENDED = {"busy": "busy", "no-answer": "no-answer", "failed": "failed", "canceled": "cancelled"}
CALL_STATUSES = sorted(RINGING | ANSWERED | {"completed"} | set(ENDED))
RECORDING_STATUSES = ("in-progress", "completed", "absent", "failed")
OUTBOUND_DIRECTIONS = frozenset({"outbound-api", "outbound-dial", "trunking-originating"})
INBOUND_DIRECTIONS = frozenset({"inbound", "trunking-terminating"})
ANONYMOUS = frozenset({"", "anonymous", "restricted", "unknown", "unavailable"})
PHONE_LIKE = re.compile(r"\+?\d{7,}")  # a SIP user part that is a phone number, not an extension
_AUDIO_SUFFIX = re.compile(r"\.[A-Za-z0-9]{2,4}$")


class TwilioCallbackSchema(Schema):
    """The fields of Twilio's status and recording callbacks that become the call event (form
    fields, all strings; Twilio's other parameters are ignored)."""

    class Meta:
        unknown = EXCLUDE

    CallSid = fields.String(required=True)
    ParentCallSid = fields.String()
    CallStatus = fields.String(validate=validate.OneOf(CALL_STATUSES))
    Direction = fields.String()
    From = fields.String()
    To = fields.String()
    CallDuration = fields.Integer(validate=validate.Range(min=0, max=MAX_DURATION))
    Timestamp = fields.String(metadata={"description": "RFC 2822, e.g. Mon, 16 Aug 2010 03:45:01 +0000"})
    RecordingSid = fields.String()
    RecordingStatus = fields.String(validate=validate.OneOf(RECORDING_STATUSES))
    RecordingUrl = fields.Url(
        schemes={"http", "https"}, require_tld=False, validate=validate.Length(max=MAX_URL_LENGTH)
    )
    RecordingChannels = fields.Integer(validate=validate.OneOf([1, 2]))


_SCHEMA = TwilioCallbackSchema()


def _endpoint(value: str | None) -> tuple[str | None, str | None]:
    """(agent, number) named by a Twilio `From`/`To`: `client:101` and `sip:101@…` are agents,
    `sip:+15551234567@…` and plain values are numbers. An agent without a name (`client:Anonymous`,
    Twilio's Client without an identity) is the agent "": an agent's leg, but no Bitrix24 user."""
    if not value:
        return None, None
    lowered = value.lower()
    if lowered.startswith("client:"):
        identity = value[len("client:") :].strip()
        return ("" if identity.lower() in ANONYMOUS else identity), None
    if lowered.startswith(("sip:", "sips:")):
        user = value.split(":", 1)[1].split("@", 1)[0].split(";", 1)[0].strip()
        if PHONE_LIKE.fullmatch(user) or user.lower() in ANONYMOUS:
            return None, user or None  # a caller's number (or a withheld one: Bitrix24 gets "0")
        return user, None
    return None, value


def _started_at(timestamp: str | None, duration: int | None) -> str | None:
    """ISO-8601 of Twilio's RFC 2822 `Timestamp`, less `duration` (a completed leg's start)."""
    if timestamp is None:
        return None
    try:
        moment = parsedate_to_datetime(timestamp)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise ValidationError({"Timestamp": ["Not an RFC 2822 time, like Mon, 16 Aug 2010 03:45:01 +0000."]}) from None
    if moment.tzinfo is None:
        raise ValidationError({"Timestamp": ["The time has no UTC offset."]})
    try:
        return (moment - timedelta(seconds=duration or 0)).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        raise ValidationError({"Timestamp": ["Out of range."]}) from None


def _checked(errors: dict[str, list[str]], name: str, value: str | None, max_length: int) -> str | None:
    if value is None:
        return None
    if (problem := text_problem(value, max_length)) is not None:
        errors[name] = [problem]
        return None
    return value


def _recording_url(url: str | None) -> str | None:
    """Twilio's RecordingUrl has no extension (WAV by default): `.mp3` is asked for, as Bitrix24 plays it."""
    if url is None:
        return None
    path = url.split("?", 1)[0]
    return url if _AUDIO_SUFFIX.search(path.rsplit("/", 1)[-1]) else url + ".mp3"


def _query_user(query: Mapping[str, str]) -> tuple[str | None, int | None]:
    errors: dict[str, list[str]] = {}
    extension = query.get("extension") or None
    if extension is not None and (problem := text_problem(extension, MAX_EXTENSION_LENGTH)) is not None:
        errors["extension"] = [problem]
    user_id: int | None = None
    raw = query.get("user_id")
    if raw:
        if raw.isdecimal() and len(raw) <= 10 and 1 <= int(raw) <= MAX_USER_ID:
            user_id = int(raw)
        else:
            errors["user_id"] = [f"Must be a Bitrix24 user id from 1 to {MAX_USER_ID}."]
    direction = query.get("direction")
    if direction is not None and direction not in ("inbound", "outbound"):
        errors["direction"] = ["Must be one of: inbound, outbound."]
    if errors:
        raise ValidationError(errors)
    return extension, user_id


def parse_callback(form: Mapping[str, str], query: Mapping[str, str]) -> CallEvent:
    """One Twilio callback's fields (and the URL's query options) → the call event."""
    cleaned = {key: value.strip() for key, value in form.items() if isinstance(value, str) and value.strip()}
    data: dict[str, Any] = _SCHEMA.load(cleaned)
    errors: dict[str, list[str]] = {}
    parent_sid = data.get("ParentCallSid")
    call_id = parent_sid or data["CallSid"]
    if (problem := id_problem(call_id)) is not None:
        errors["ParentCallSid" if parent_sid else "CallSid"] = [problem]
    query_extension, query_user_id = _query_user(query)

    if "RecordingStatus" in data or ("RecordingSid" in data and "CallStatus" not in data):
        if errors:
            raise ValidationError(errors)
        completed = data.get("RecordingStatus", "completed") == "completed"
        return CallEvent(
            event="recording",
            call_id=call_id,
            recording_url=_recording_url(data.get("RecordingUrl")) if completed else None,
            recording_channels=data.get("RecordingChannels") if completed else None,
        )
    if "CallStatus" not in data:
        raise ValidationError({"CallStatus": ["Missing data for required field (or RecordingStatus)."]})

    status = data["CallStatus"]
    direction_field = (data.get("Direction") or "").lower()
    from_agent, from_number = _endpoint(data.get("From"))
    to_agent, to_number = _endpoint(data.get("To"))
    duration = data.get("CallDuration")
    recording_url = _recording_url(data.get("RecordingUrl"))

    if parent_sid:  # a <Dial> leg: it names its agent and its outcome, never ends the call
        asked = query.get("direction")
        direction = Direction(asked) if asked else None  # else what the parent says (inbound by default)
        extension, extension_field = to_agent or None, "To"
        if direction == Direction.OUTBOUND:  # an agent dialing a customer: From is our caller id
            event_from, event_to, line = None, to_number, from_number
        else:  # a leg to an agent, or an inbound call forwarded to a number: From is the caller
            event_from, event_to, line = from_number, to_number, None
        started_at = None
        if status in RINGING:
            event, leg_status, leg_duration = "started", None, None
        elif status in ANSWERED:
            event, leg_status, leg_duration = "answered", "answered", None
        elif status == "completed":
            event, leg_status, leg_duration = "answered", "answered", duration
        else:
            event, leg_status, leg_duration = "started", ENDED[status], None
    else:
        # the parent: the customer's call, or an agent's own leg (a TwiML app, a click-to-call)
        if from_agent is not None and direction_field not in OUTBOUND_DIRECTIONS:
            # an agent (Twilio Client, a SIP phone) calling out through the app
            direction, extension, extension_field = Direction.OUTBOUND, from_agent or None, "From"
            event_from, event_to, line = None, to_number, None
            talk_leg = False
        elif direction_field in OUTBOUND_DIRECTIONS:
            direction, extension, extension_field = Direction.OUTBOUND, to_agent or None, "To"
            event_from, event_to, line = from_number, to_number, from_number
            talk_leg = to_agent is None  # the REST API called the customer: this leg is the conversation
        else:
            if direction_field and direction_field not in INBOUND_DIRECTIONS:
                errors["Direction"] = ["Must be inbound, outbound-api, outbound-dial or trunking-*."]
            direction, extension, extension_field = Direction.INBOUND, to_agent or None, "To"
            event_from, event_to, line = from_number, to_number, to_number
            talk_leg = False
        if status in RINGING:
            event, leg_status, leg_duration = "started", None, None
            started_at = _started_at(data.get("Timestamp"), None)
        elif status in ANSWERED:
            event, leg_status, leg_duration = ("answered", "answered", None) if talk_leg else ("started", None, None)
            started_at = None
        elif status == "completed":
            event = "finished"
            leg_status, leg_duration = ("answered", duration) if talk_leg else (None, None)
            started_at = _started_at(data.get("Timestamp"), duration)
        else:
            event, leg_status, leg_duration = "finished", ENDED[status], 0
            started_at = _started_at(data.get("Timestamp"), duration)

    event_from = _checked(errors, "From", event_from, MAX_NUMBER_LENGTH)
    event_to = _checked(errors, "To", event_to, MAX_NUMBER_LENGTH)
    line = _checked(errors, "To" if line == to_number else "From", line, MAX_LINE_LENGTH)
    extension = _checked(errors, extension_field, extension, MAX_EXTENSION_LENGTH)
    if errors:
        raise ValidationError(errors)
    return CallEvent(
        event=event,
        call_id=call_id,
        direction=direction,
        from_number=event_from,
        to_number=event_to,
        extension=query_extension or extension,
        user_id=query_user_id,
        started_at=started_at,
        duration=leg_duration,
        status=leg_status,
        recording_url=recording_url,
        line=line,
    )


def parse(body: bytes, query: Mapping[str, str]) -> CallEvent:
    """`POST /hooks/pbx/twilio`: the callback's form fields (the body, or the query of a GET)."""
    return parse_callback(form_fields(body, query), query)


_ACCOUNT_IN_URL = re.compile(r"/Accounts/(AC[0-9a-fA-F]{32})/")


def recording_auth(url: str, settings: Settings) -> tuple[str, str] | None:
    """Twilio's recording media asks for HTTP basic auth: the account SID (in the URL) and
    B24SCRIBE_TWILIO_AUTH_TOKEN (the token that signs its callbacks)."""
    account = _ACCOUNT_IN_URL.search(url)
    token = settings.vendor_setting(NAME, "AUTH_TOKEN")
    return (account.group(1), token) if account and token else None


SOURCE = PbxSource(
    NAME,
    parse,
    encoding="form",
    signatures=(SIGNATURE,),
    recording_hosts=("api.twilio.com",),
    recording_auth=recording_auth,
    delivery_header=DELIVERY_HEADER,
    methods=("GET", "POST"),
    summary="Twilio Programmable Voice status and recording callbacks (form; X-Twilio-Signature)",
    openapi_schema=TwilioCallbackSchema,
)

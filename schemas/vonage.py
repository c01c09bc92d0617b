"""Vonage Voice API event webhooks (`POST /hooks/pbx/vonage`, JSON; contract §11).

Vonage posts every state change of every leg of a call to the application's event URL (or to the
`eventUrl` of the NCCO action or API call that made the leg): `{uuid, conversation_uuid, status,
direction, from, to, timestamp, duration, start_time, end_time, rate, price, network}`, and a
recording's `{recording_url, recording_uuid, conversation_uuid, start_time, end_time, size}` to the
`record` action's `eventUrl`. The call is `conversation_uuid`: every leg of a conversation (the
caller's, the agents' a `connect` rang) folds into one Bitrix24 call.

Signed webhooks (contract §11): `Authorization: Bearer <JWT>`, HS256 with the
account's signature secret (B24SCRIBE_VONAGE_SIGNATURE_SECRET), claims `iat`, `jti`, `iss`,
`api_key`, `application_id` and `payload_hash`, the hex SHA-256 of the raw body. Verified with PyJWT
(what Vonage's own `vonage_jwt.verify_signature` does), the body against `payload_hash` (required:
without it a captured token would carry any body), and `iat` within 5 minutes (Vonage documents no
tolerance; Standard Webhooks' is taken). The token's signature and age are checked before the body
is read. A retry or a replay carries the same body: the same call and bytes, a duplicate (200).
Without the secret, the bearer / `?token=` of contract §4 is what authenticates.

Legs, and so how a Vonage call becomes one Bitrix24 call:

- The caller's leg of an inbound call (`direction: inbound`) names the call: its numbers, the line
  (the Vonage number dialled), when it started. Vonage answers it itself to run the NCCO (an IVR,
  a queue's music), so its `answered` is no answer by an employee. Its end (`completed`) finishes
  the call with what the agent legs reported; `cancelled`, `unanswered`, `busy`, ... on it (the
  caller hung up before Vonage answered, the NCCO failed) finish the call with that status.
- Every other leg is an agent's: a `connect` to a phone, SIP or app endpoint, or a call to an agent
  that joins the caller's conversation (a queue). Its `answered` and its `completed` (status
  answered, its `duration` the talk time) name the employee; `busy`, `timeout`, `unanswered`,
  `rejected`, `failed`, `cancelled` are its outcome when nobody answered. A call answered on any
  leg stays answered (b24scribe/fold.py `CallState.merge`); after a transfer the last agent who
  answered is the user and their leg's talk time the duration.
- The employee: `?extension=<inner number>` or `?user_id=<Bitrix24 user id>` on the leg's event
  URL (the `connect` action's `eventUrl`), else the user part of a `sip:` URI the leg rang. On the
  caller's leg (the application's event URL) it names the employee of a number that rings one.
- A call the application places to a customer (click-to-call): `?direction=outbound` on that leg's
  event URL makes it the call's leg (numbers, line = `from`, its answer and talk time).
- `?call=<conversation_uuid>` files a leg under that conversation, for an agent leg the application
  dials before it joins the caller's named conversation.

Other Vonage events (`transfer`, `input`, answering-machine detection, ...) are answered 200 and
not stored. Recording URLs are on Vonage's API and need the application's JWT to download.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
import requests
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from b24scribe.events import CallEvent
from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest
from b24scribe.limits import (
    MAX_DURATION,
    MAX_EXTENSION_LENGTH,
    MAX_ID_LENGTH,
    MAX_NUMBER_LENGTH,
    MAX_URL_LENGTH,
    MAX_USER_ID,
    StoredText,
)
from b24scribe.settings import Settings
from b24scribe.sources import HookAnswer, PbxSource
from b24scribe.transcript import Direction
from schemas.pbx_events import normalise_started_at
from schemas.source import load_json

NAME = "vonage"
TOLERANCE_SECONDS = 300
# A leg's status → our status when the leg ended (None: the leg was answered and has hung up).
ENDED = {
    "completed": "answered",
    "busy": "busy",
    "timeout": "no-answer",
    "unanswered": "no-answer",
    "rejected": "declined",
    "failed": "failed",
    "cancelled": "cancelled",
}
RINGING = ("started", "ringing")
STATUSES = (*RINGING, "answered", *ENDED)
# Events with a `status` that are not a leg's life cycle (answering-machine detection).
IGNORED_STATUSES = frozenset({"human", "machine", "disconnected"})
SIP_USER = re.compile(r"^sips?:([^@;]+)@", re.IGNORECASE)
JWT_SHAPE = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


def payload_hash(body: bytes) -> str:
    """The `payload_hash` claim: the hex SHA-256 of the raw body."""
    return hashlib.sha256(body).hexdigest()


def sign(secret: str, body: bytes, issued_at: float | None = None, jti: str = "vonage-test-jti") -> str:
    """A token as Vonage makes it (the tests sign with it)."""
    claims = {
        "iat": int(time.time() if issued_at is None else issued_at),
        "jti": jti,
        "iss": "Vonage",
        "payload_hash": payload_hash(body),
        "api_key": "abcd1234",
        "application_id": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def _bearer(request: HookRequest) -> str:
    scheme, _, value = (request.header("authorization") or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class VonageSignature:
    """Vonage's signed webhooks: a JWT (HS256, the signature secret) whose `payload_hash` is the body's."""

    name = "vonage-jwt"
    signature_header = "Authorization"
    description = (
        "Authorization: Bearer <JWT> signed HS256 with B24SCRIBE_VONAGE_SIGNATURE_SECRET, "
        "its payload_hash the SHA-256 of the body, iat within 5 minutes"
    )

    def configured(self, settings: Settings, source: str) -> bool:
        return bool(settings.vendor_setting(source, "SIGNATURE_SECRET"))

    def present(self, request: HookRequest) -> bool:
        """A bearer that is a JWT (the inbound token of contract §4 is not one)."""
        return JWT_SHAPE.fullmatch(_bearer(request)) is not None

    def _claims(self, request: HookRequest, settings: Settings, source: str) -> dict[str, Any]:
        secret = settings.vendor_setting(source, "SIGNATURE_SECRET") or ""
        try:
            claims: dict[str, Any] = jwt.decode(
                _bearer(request),
                secret,
                algorithms=["HS256"],
                options={"require": ["iat", "payload_hash"]},
                leeway=TOLERANCE_SECONDS,  # an iat in the future is refused beyond it too
            )
        except jwt.PyJWTError as error:
            raise AuthFailure(401, "bad_signature", f"Vonage signature rejected: {error}") from None
        issued_at = claims["iat"]
        if not isinstance(issued_at, int | float) or abs(time.time() - issued_at) > TOLERANCE_SECONDS:
            raise AuthFailure(401, "bad_signature", "Vonage signature rejected: iat is not within 5 minutes")
        return claims

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        """The token's signature and age are in the header: a forged or stale one is refused unread."""
        self._claims(request, settings, source)

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        claims = self._claims(request, settings, source)
        given = claims["payload_hash"]
        if not isinstance(given, str) or not hmac.compare_digest(given.lower().encode(), payload_hash(body).encode()):
            raise AuthFailure(401, "bad_signature", "Vonage signature rejected: payload_hash does not match the body")
        # No delivery id: a retry is a new token over the same bytes, which the call id and the
        # bytes already make a duplicate.
        return Authenticated(self.name)


class _Duration(fields.Integer):
    """Vonage sends `duration` as a string of seconds ("31")."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, str):
            value = value.strip()
        result: int = super()._deserialize(value, attr, data, **kwargs)
        return result


class _Time(fields.Field[str | None]):
    """An ISO-8601 time (`2020-01-01T12:00:00.000Z`), kept as our `started_at`; unreadable → absent."""

    default_error_messages = {"invalid": "Not a valid string."}  # noqa: RUF012

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str | None:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        return normalise_started_at(value) if len(value) <= 64 else None


class VonageEventSchema(Schema):
    """A Voice API call event (one leg's state change)."""

    class Meta:
        unknown = EXCLUDE

    conversation_uuid = fields.String(required=True, validate=StoredText(MAX_ID_LENGTH, identifier=True, min_length=1))
    uuid = fields.String(validate=StoredText(MAX_ID_LENGTH, identifier=True))
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    direction = fields.String(validate=validate.OneOf([d.value for d in Direction]))
    from_ = fields.String(data_key="from", allow_none=True, validate=validate.Length(max=1024))
    to = fields.String(allow_none=True, validate=validate.Length(max=1024))
    timestamp = _Time(allow_none=True)
    start_time = _Time(allow_none=True)
    duration = _Duration(allow_none=True, validate=validate.Range(min=0, max=MAX_DURATION))


class VonageRecordingSchema(Schema):
    """A `record` action's event: the recording is ready on Vonage's API."""

    class Meta:
        unknown = EXCLUDE

    conversation_uuid = fields.String(required=True, validate=StoredText(MAX_ID_LENGTH, identifier=True, min_length=1))
    recording_url = fields.Url(
        required=True, schemes={"http", "https"}, require_tld=False, validate=StoredText(MAX_URL_LENGTH)
    )
    recording_uuid = fields.String(validate=StoredText(MAX_ID_LENGTH, identifier=True))


class _QuerySchema(Schema):
    """What the leg's event URL says about it."""

    class Meta:
        unknown = EXCLUDE

    extension = fields.String(validate=StoredText(MAX_EXTENSION_LENGTH, min_length=1))
    user_id = fields.Integer(strict=False, validate=validate.Range(min=1, max=MAX_USER_ID))
    direction = fields.String(validate=validate.OneOf([Direction.OUTBOUND.value]))
    call = fields.String(validate=StoredText(MAX_ID_LENGTH, identifier=True, min_length=1))


_EVENT = VonageEventSchema()
_RECORDING = VonageRecordingSchema()
_QUERY = _QuerySchema()


def _number(value: str | None) -> str | None:
    """A number as Vonage gives it (`447700900000`, `sip:+4477...@host`, an app user's name), within
    its column: a SIP URI's user part; anything still too long is dropped rather than cut."""
    if not value:
        return None
    if match := SIP_USER.match(value):
        value = match.group(1)
    value = value.strip()
    if not value or len(value) > MAX_NUMBER_LENGTH or not value.isprintable():
        return None
    return value


def _sip_extension(to: str | None) -> str | None:
    match = SIP_USER.match(to or "")
    if match is None:
        return None
    user = match.group(1).strip()
    return user if user and len(user) <= MAX_EXTENSION_LENGTH and user.isprintable() else None


def _event(payload: dict[str, Any], options: dict[str, Any]) -> CallEvent:
    data = _EVENT.load(payload)
    status: str = data["status"]
    call_id: str = options.get("call") or data["conversation_uuid"]
    outbound_call = options.get("direction") == Direction.OUTBOUND.value
    if outbound_call or data.get("direction") == Direction.INBOUND.value:
        return _caller_leg(data, options, call_id, status, outbound_call)
    # an agent's leg: who answered, its outcome and talk time; the caller's leg names the call
    extension = options.get("extension") or _sip_extension(data.get("to"))
    user_id = options.get("user_id")
    if status in RINGING:
        return CallEvent(event="started", call_id=call_id)
    if status == "answered":
        return CallEvent(event="answered", call_id=call_id, extension=extension, user_id=user_id, status="answered")
    duration = data.get("duration") if status == "completed" else None
    return CallEvent(
        event="answered" if status == "completed" else "started",
        call_id=call_id,
        extension=extension,
        user_id=user_id,
        status=ENDED[status],
        duration=duration,
    )


def _caller_leg(
    data: dict[str, Any], options: dict[str, Any], call_id: str, status: str, outbound_call: bool
) -> CallEvent:
    from_number, to_number = _number(data.get("from_")), _number(data.get("to"))
    common: dict[str, Any] = {
        "call_id": call_id,
        "direction": Direction.OUTBOUND if outbound_call else Direction.INBOUND,
        "from_number": from_number,
        "to_number": to_number,
        "line": from_number if outbound_call else to_number,
        "extension": options.get("extension"),
        "user_id": options.get("user_id"),
    }
    if status in RINGING:
        return CallEvent(event="started", started_at=data.get("timestamp"), **common)
    if status == "answered":
        if outbound_call:  # the customer picked up the call placed to them
            return CallEvent(event="answered", status="answered", **common)
        return CallEvent(event="started", **common)  # Vonage answered it to run the NCCO
    if status == "completed" and not outbound_call:
        # the caller hung up (or the NCCO ended): the agent legs said whether anybody answered
        return CallEvent(event="finished", **common)
    duration = data.get("duration") if status == "completed" else None
    return CallEvent(event="finished", status=ENDED[status], duration=duration, **common)


def _options(query: Mapping[str, str]) -> dict[str, Any]:
    wanted = {key: query[key] for key in ("extension", "user_id", "direction", "call") if query.get(key)}
    options: dict[str, Any] = _QUERY.load(wanted)
    return options


def parse(body: bytes, query: Mapping[str, str]) -> CallEvent:
    """One Vonage event → our CallEvent; a ValidationError naming the field otherwise."""
    options = _options(query)
    payload = load_json(body)
    if not isinstance(payload, dict):
        raise ValidationError({"_body": ["expected a JSON object"]})
    if "recording_url" in payload:
        recording = _RECORDING.load(payload)
        return CallEvent(
            event="recording",
            call_id=options.get("call") or recording["conversation_uuid"],
            recording_url=recording["recording_url"],
        )
    return _event(payload, options)


def _ignored(body: bytes) -> bool:
    """A Vonage event that is no leg's state change nor a recording (`transfer`, `input`, machine
    detection): nothing to store."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(payload, dict) or "recording_url" in payload:
        return False
    status = payload.get("status")
    if status is None:
        return "conversation_uuid_from" in payload or "dtmf" in payload or "speech" in payload
    return isinstance(status, str) and status in IGNORED_STATUSES


def answer(request: HookRequest, body: bytes, settings: Settings) -> HookAnswer | None:
    if _ignored(body):
        return HookAnswer(200, b'{"ignored": true}', "application/json")
    return None


class _VonageBearer(requests.auth.AuthBase):
    """Vonage's recording media asks for a JWT of the application, signed with its private key."""

    def __init__(self, application_id: str, private_key: str) -> None:
        self.application_id, self.private_key = application_id, private_key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        now = int(time.time())
        claims = {"application_id": self.application_id, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
        request.headers["Authorization"] = "Bearer " + jwt.encode(claims, self.private_key, algorithm="RS256")
        return request


def recording_auth(url: str, settings: Settings) -> requests.auth.AuthBase | None:
    """B24SCRIBE_VONAGE_APPLICATION_ID and B24SCRIBE_VONAGE_PRIVATE_KEY (the PEM, or the path of
    its file): a JWT per download; none unless both are set."""
    application_id, key = settings.vendor_setting(NAME, "APPLICATION_ID"), settings.vendor_setting(NAME, "PRIVATE_KEY")
    if not application_id or not key:
        return None
    if not key.lstrip().startswith("-----BEGIN"):
        key = Path(key).read_text()
    return _VonageBearer(application_id, key.replace("\\n", "\n"))


SOURCE = PbxSource(
    NAME,
    parse,
    encoding="json",
    signatures=(VonageSignature(),),
    recording_hosts=("api.nexmo.com", "*.nexmo.com", "*.vonage.com"),
    recording_auth=recording_auth,
    answer=answer,
    summary="Vonage Voice API event webhooks (signed JWT; the call is conversation_uuid)",
    openapi_schema=VonageEventSchema,
)

"""Telnyx Call Control v2 webhooks (`POST /hooks/pbx/telnyx`, JSON), docs/contract.md §11.

Every webhook is `{"data": {"event_type", "id", "occurred_at", "payload": {...}}, "meta": {...}}`.
The call is the payload's `call_session_id`: every leg of one session (the caller's leg, the legs
a `transfer`, `dial` or queue `bridge` creates) folds into one Bitrix24 call. A leg is an *agent
leg* when one of its ends is a SIP URI (`sip:101@acme.sip.telnyx.com`): its user part is the
employee's extension (Bitrix24 USER_PHONE_INNER). Every other leg is the *caller's* leg (a PSTN
number on both ends): it carries the call's direction, numbers and start, and its hangup ends the call.

What each webhook becomes (`data.event_type`):

- `call.initiated` → `started`. The caller's leg gives the direction (`incoming` → inbound,
  `outgoing` → outbound), from, to, the line (our number) and `start_time`. An agent leg gives its
  extension (so the last agent tried is the user of a missed call). An agent's SIP phone placing a
  call is the outbound call's own leg.
- `call.answered`, `call.bridged` → `answered`; an agent leg names its extension (who took the
  call, after a transfer too).
- `call.hangup` of the caller's leg (or of the agent's own outbound leg) → `finished`: status from
  `hangup_cause`, duration from the leg's `start_time` to `end_time` (else `occurred_at`) when it
  was talked. An agent leg's hangup changes nothing: a queue member who did not pick up neither ends
  the call nor names its user, and a transferring agent does not end it.
- `call.recording.saved` → `recording`: `recording_urls` (wav, else mp3; `public_recording_urls`
  when those are all there is); `channels` `single`/`dual` → 1/2.
- any other `call.*` event (speak, gather, enqueued, ...) → `started` with nothing new.

`hangup_cause` → status: `normal_clearing` → answered when the call was answered (the fold keeps
an answer: an answered call is never shown as missed, b24scribe/fold.py), else no-answer;
`user_busy` → busy; `no_answer`, `timeout` → no-answer; `originator_cancel` → cancelled;
`call_rejected` → declined; `not_found` → unavailable; `time_limit` → answered (cut off at the
limit); anything else → failed.

Recording URLs are presigned S3 links valid for about 10 minutes after the call (docs/contract.md §9):
the recording is downloaded as soon as the call is finished; a late retry may find it expired.

Authentication: Telnyx signs each webhook with Ed25519 over `"{telnyx-timestamp}|{raw body}"`,
base64 in `telnyx-signature-ed25519`, verified with the account's public key (Mission Control →
Keys & Credentials → Public Key), base64 in B24SCRIBE_TELNYX_PUBLIC_KEY, by `cryptography`. A
`telnyx-timestamp` more than 5 minutes from now is refused before the body is read. The signature
does not cover the URL. Telnyx's webhook `data.id` is the delivery id: a retry (whose `meta.attempt`
changes the bytes) is a duplicate. The bearer/`?token=` of docs/contract.md §4 works too.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from marshmallow import ValidationError

from b24scribe.events import CallEvent
from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest
from b24scribe.limits import MAX_DURATION
from b24scribe.settings import Settings
from b24scribe.sources import PbxSource
from b24scribe.transcript import Direction
from schemas.pbx_events import normalise_started_at
from schemas.source import load_json

NAME = "telnyx"
SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"
TOLERANCE_SECONDS = 300  # Telnyx's SDKs' default tolerance (docs/contract.md §11: 5 minutes)

HANGUP_STATUSES = {
    "normal_clearing": "no-answer",  # the fold makes it answered when the call was answered
    "user_busy": "busy",
    "no_answer": "no-answer",
    "timeout": "no-answer",
    "originator_cancel": "cancelled",
    "call_rejected": "declined",
    "not_found": "unavailable",
    "time_limit": "answered",
}
TALKED_CAUSES = frozenset({"normal_clearing", "time_limit"})
DIRECTIONS = {"incoming": Direction.INBOUND, "outgoing": Direction.OUTBOUND}
CHANNELS = {"single": 1, "dual": 2}


# --- the signature -----------------------------------------------------------------------------


def _public_key(settings: Settings, source: str) -> Ed25519PublicKey | None:
    value = settings.vendor_setting(source, "PUBLIC_KEY")
    if not value:
        return None
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(value.strip(), validate=True))
    except (binascii.Error, ValueError):
        return None


class TelnyxSignature:
    """Ed25519 over `timestamp|body` with the account's public key (B24SCRIBE_TELNYX_PUBLIC_KEY)."""

    name = "telnyx-ed25519"
    signature_header = SIGNATURE_HEADER
    description = (
        "Telnyx Ed25519 signature (base64) of `telnyx-timestamp|body`, verified with the account's "
        "public key B24SCRIBE_TELNYX_PUBLIC_KEY (base64); 5 min tolerance"
    )

    def configured(self, settings: Settings, source: str) -> bool:
        return bool(settings.vendor_setting(source, "PUBLIC_KEY"))

    def present(self, request: HookRequest) -> bool:
        return request.header(SIGNATURE_HEADER) is not None

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        if _public_key(settings, source) is None:
            raise AuthFailure(401, "bad_signature", "B24SCRIBE_TELNYX_PUBLIC_KEY is not a base64 Ed25519 public key")
        value = (request.header(TIMESTAMP_HEADER) or "").strip()
        if not (value.isascii() and value.isdigit()) or len(value) > 12:
            raise AuthFailure(401, "bad_signature", "Telnyx signature rejected: telnyx-timestamp is not a number")
        if abs(time.time() - int(value)) > TOLERANCE_SECONDS:
            raise AuthFailure(
                401, "bad_signature", "Telnyx signature rejected: telnyx-timestamp is not within 5 minutes"
            )

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        key = _public_key(settings, source)
        timestamp = (request.header(TIMESTAMP_HEADER) or "").strip()
        try:
            signature = base64.b64decode((request.header(SIGNATURE_HEADER) or "").strip(), validate=True)
            if key is None:
                raise InvalidSignature
            key.verify(signature, timestamp.encode() + b"|" + body)
        except (binascii.Error, ValueError, InvalidSignature):
            raise AuthFailure(
                401, "bad_signature", "telnyx-signature-ed25519 does not match the timestamp and body"
            ) from None
        return Authenticated(self.name, _delivery_id(body))


def _delivery_id(body: bytes) -> str | None:
    """The webhook's `data.id`: the same on every retry of one delivery (`meta.attempt` is not)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    data = payload.get("data") if type(payload) is dict else None
    value = data.get("id") if type(data) is dict else None
    return value if type(value) is str and value.strip() else None


SIGNATURE = TelnyxSignature()


def sign(private_key: Ed25519PrivateKey, timestamp: str, body: bytes) -> str:
    """The `telnyx-signature-ed25519` Telnyx sends (the tests sign with it)."""
    return base64.b64encode(private_key.sign(timestamp.encode() + b"|" + body)).decode()


def public_key_setting(private_key: Ed25519PrivateKey) -> str:
    """The base64 public key, as Mission Control shows it (B24SCRIBE_TELNYX_PUBLIC_KEY)."""
    return base64.b64encode(private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


# --- the webhook -------------------------------------------------------------------------------


def _error(path: tuple[str, ...], message: str) -> ValidationError:
    error: dict[str, Any] = {path[-1]: [message]}
    for key in reversed(path[:-1]):
        error = {key: error}
    return ValidationError(error)


def _text(payload: Mapping[str, Any], key: str, path: tuple[str, ...]) -> str | None:
    value = payload.get(key)
    if value is None:
        return None
    if type(value) is not str:
        raise _error((*path, key), "Not a valid string.")
    return value.strip() or None


def _is_sip(party: str | None) -> bool:
    return party is not None and (party.lower().startswith("sip:") or "@" in party)


def _sip_user(party: str) -> str | None:
    """`sip:101@acme.sip.telnyx.com` → `101`."""
    user = party[4:] if party.lower().startswith("sip:") else party
    user = user.split("@", 1)[0].split(";", 1)[0].strip()
    return user or None


def _time(payload: Mapping[str, Any], key: str, path: tuple[str, ...]) -> datetime | None:
    value = _text(payload, key, path)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _error((*path, key), "Not an ISO-8601 time.") from None
    if parsed.tzinfo is None:
        raise _error((*path, key), "Not an ISO-8601 time with a UTC offset.")
    return parsed


def _recording(payload: Mapping[str, Any], path: tuple[str, ...]) -> str | None:
    for key in ("recording_urls", "public_recording_urls"):
        urls = payload.get(key)
        if urls is None:
            continue
        if type(urls) is not dict:
            raise _error((*path, key), "Not a valid object.")
        for kind in ("wav", "mp3"):
            url = _text(urls, kind, (*path, key))
            if url is not None:
                if not url.lower().startswith(("https://", "http://")):
                    raise _error((*path, key, kind), "Not an http(s) URL.")
                return url
    return None


def parse(body: bytes, query: Mapping[str, str]) -> CallEvent:
    """One Telnyx webhook → the CallEvent of its call session (see the module's table)."""
    document = load_json(body)
    if type(document) is not dict:
        raise ValidationError({"_schema": ["Expected a JSON object."]})
    data = document.get("data")
    if type(data) is not dict:
        raise _error(("data",), "Missing data." if data is None else "Not a valid object.")
    event_type = _text(data, "event_type", ("data",))
    if event_type is None:
        raise _error(("data", "event_type"), "Missing data.")
    payload = data.get("payload")
    if type(payload) is not dict:
        raise _error(("data", "payload"), "Missing data." if payload is None else "Not a valid object.")
    path = ("data", "payload")
    session = _text(payload, "call_session_id", path)
    if not event_type.startswith("call.") or session is None:
        raise _error((*path, "call_session_id"), f"Missing data: {event_type!r} is not a call event of a session.")
    source, target = _text(payload, "from", path), _text(payload, "to", path)
    occurred = _time(data, "occurred_at", ("data",))
    started = _time(payload, "start_time", path)
    if _is_sip(target):
        agent, customer_leg, own_outbound = _sip_user(target or ""), False, False
    elif _is_sip(source):  # an employee's SIP phone placing a call: the outbound call's own leg
        agent, customer_leg, own_outbound = _sip_user(source or ""), True, True
    else:
        agent, customer_leg, own_outbound = None, True, False

    if event_type == "call.initiated":
        if not customer_leg:
            return CallEvent("started", session, extension=agent)
        leg_direction = _text(payload, "direction", path)
        if leg_direction is not None and leg_direction not in DIRECTIONS:
            raise _error((*path, "direction"), "Must be one of: incoming, outgoing.")
        direction = Direction.OUTBOUND if own_outbound else DIRECTIONS.get(leg_direction or "")
        outbound = direction == Direction.OUTBOUND
        when = started or occurred
        return CallEvent(
            "started",
            session,
            direction=direction,
            from_number=None if own_outbound else source,
            to_number=target,
            extension=agent,
            started_at=normalise_started_at(when.isoformat()) if when else None,
            line=None if own_outbound else (source if outbound else target),
        )
    if event_type in ("call.answered", "call.bridged"):
        return CallEvent("answered", session, extension=agent)
    if event_type == "call.hangup":
        if not customer_leg:
            return CallEvent("started", session)
        cause = _text(payload, "hangup_cause", path) or "unspecified"
        ended = _time(payload, "end_time", path) or occurred
        duration = 0
        if cause in TALKED_CAUSES and started is not None and ended is not None:
            duration = min(MAX_DURATION, max(0, round((ended - started).total_seconds())))
        return CallEvent(
            "finished", session, extension=agent, duration=duration, status=HANGUP_STATUSES.get(cause, "failed")
        )
    if event_type == "call.recording.saved":
        channels = _text(payload, "channels", path)
        if channels is not None and channels not in CHANNELS:
            raise _error((*path, "channels"), "Must be one of: single, dual.")
        url = _recording(payload, path)
        if url is None:
            raise _error((*path, "recording_urls"), "Missing data.")
        return CallEvent("recording", session, recording_url=url, recording_channels=CHANNELS.get(channels or ""))
    return CallEvent("started", session)  # speak, gather, enqueued, ...: nothing the call keeps


SOURCE = PbxSource(
    NAME,
    parse,
    signatures=(SIGNATURE,),
    # its recording URLs are presigned S3 links, valid for about 10 minutes: fetched at once
    recording_hosts=("s3.amazonaws.com", "*.s3.amazonaws.com", "*.telnyx.com"),
    summary="Telnyx Call Control v2 webhooks (JSON; signed: telnyx-signature-ed25519)",
)

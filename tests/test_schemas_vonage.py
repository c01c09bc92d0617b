"""Vonage Voice API events (schemas/vonage.py): each documented event as Vonage sends it becomes the
exact CallEvent; the signed-webhook JWT (HS256, payload_hash) made as Vonage makes it is accepted,
forged, stale, other-body and unsigned ones refused; arbitrary bodies never raise anything but a
ValidationError naming a field."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.events import CallEvent
from b24scribe.inbound_auth import AuthFailure, HookRequest, authenticate_before_body
from b24scribe.settings import Settings
from b24scribe.transcript import Direction
from schemas import vonage
from schemas.registry import PBX_SOURCES

FIXTURES = Path(__file__).parent / "fixtures" / "vonage"
CON = "CON-f972836a-550f-45fa-956c-12a2ab5b7d22"
SECRET = "vonage-signature-secret-5e1f0c2a9d"
CUSTOMER, LVN = "447700900000", "447700900001"


def body(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def parse(name: str, query: dict[str, str] | None = None) -> CallEvent:
    return PBX_SOURCES["vonage"].parse(body(name), query or {})  # through the registry's checks


INBOUND = {"direction": Direction.INBOUND, "from_number": CUSTOMER, "to_number": LVN, "line": LVN}
OUTBOUND = {"direction": Direction.OUTBOUND, "from_number": LVN, "to_number": CUSTOMER, "line": LVN}

EXPECTED: list[tuple[str, dict[str, str], CallEvent]] = [
    # the caller's leg of an inbound call names the call; Vonage's own answer (to run the NCCO) is no answer
    ("caller_started.json", {}, CallEvent("started", CON, started_at="2026-12-07T10:20:30+00:00", **INBOUND)),
    ("caller_ringing.json", {}, CallEvent("started", CON, started_at="2026-12-07T10:20:30+00:00", **INBOUND)),
    ("caller_answered.json", {}, CallEvent("started", CON, **INBOUND)),
    ("caller_completed.json", {}, CallEvent("finished", CON, **INBOUND)),
    ("caller_cancelled.json", {}, CallEvent("finished", CON, status="cancelled", **INBOUND)),
    # a number routed to one employee: the application's event URL names them
    ("caller_completed.json", {"extension": "101"}, CallEvent("finished", CON, extension="101", **INBOUND)),
    # an agent's leg: who answered, its outcome and talk time
    ("agent_started.json", {}, CallEvent("started", CON)),
    ("agent_ringing.json", {}, CallEvent("started", CON)),
    ("agent_answered.json", {}, CallEvent("answered", CON, extension="101", status="answered")),
    ("agent_completed.json", {}, CallEvent("answered", CON, extension="101", status="answered", duration=47)),
    ("agent_busy.json", {}, CallEvent("started", CON, extension="101", status="busy")),
    ("agent_timeout.json", {}, CallEvent("started", CON, extension="101", status="no-answer")),
    ("agent_unanswered.json", {}, CallEvent("started", CON, extension="101", status="no-answer")),
    ("agent_rejected.json", {}, CallEvent("started", CON, extension="101", status="declined")),
    ("agent_failed.json", {}, CallEvent("started", CON, extension="101", status="failed")),
    ("agent_cancelled.json", {}, CallEvent("started", CON, extension="101", status="cancelled")),
    # the URL names the employee of a phone endpoint, or a Bitrix24 user
    ("agent2_answered.json", {"extension": "102"}, CallEvent("answered", CON, extension="102", status="answered")),
    (
        "agent2_completed.json",
        {"user_id": "7"},
        CallEvent("answered", CON, user_id=7, status="answered", duration=30),
    ),
    ("agent2_cancelled.json", {"extension": "102"}, CallEvent("started", CON, extension="102", status="cancelled")),
    # an agent leg dialled before it joins the caller's conversation (a queue): ?call= files it there
    (
        "agent2_answered.json",
        {"extension": "102", "call": "CON-queue-caller"},
        CallEvent("answered", "CON-queue-caller", extension="102", status="answered"),
    ),
    # a call placed to a customer
    (
        "outbound_started.json",
        {"direction": "outbound", "extension": "101"},
        CallEvent("started", CON, extension="101", started_at="2026-12-07T10:20:30+00:00", **OUTBOUND),
    ),
    (
        "outbound_answered.json",
        {"direction": "outbound", "extension": "101"},
        CallEvent("answered", CON, extension="101", status="answered", **OUTBOUND),
    ),
    (
        "outbound_completed.json",
        {"direction": "outbound", "extension": "101"},
        CallEvent("finished", CON, extension="101", status="answered", duration=95, **OUTBOUND),
    ),
    (
        "recording.json",
        {},
        CallEvent(
            "recording", CON, recording_url="https://api.nexmo.com/v1/files/aaaaaaaa-bbbb-cccc-dddd-0123456789ab"
        ),
    ),
]


@pytest.mark.parametrize(("name", "query", "expected"), EXPECTED, ids=[f"{n}{q}" for n, q, _ in EXPECTED])
def test_each_documented_event_becomes_the_exact_call_event(
    name: str, query: dict[str, str], expected: CallEvent
) -> None:
    assert parse(name, query) == expected


def test_every_fixture_is_covered() -> None:
    covered = {name for name, _, _ in EXPECTED} | {"transfer.json", "input.json"}
    assert covered == {path.name for path in FIXTURES.glob("*.json")}


@pytest.mark.parametrize("name", ["transfer.json", "input.json"])
def test_events_that_are_no_leg_state_are_answered_and_not_parsed(name: str) -> None:
    answered = vonage.answer(HookRequest("POST", {}, {}), body(name), Settings())
    assert answered is not None and answered.status == 200
    for event in ("caller_completed.json", "recording.json"):
        assert vonage.answer(HookRequest("POST", {}, {}), body(event), Settings()) is None


@pytest.mark.parametrize(
    ("payload", "query", "field"),
    [
        ({"status": "completed", "direction": "inbound"}, {}, "conversation_uuid"),
        ({"conversation_uuid": CON, "status": "dialling"}, {}, "status"),
        ({"conversation_uuid": CON, "status": "completed", "duration": "a minute"}, {}, "duration"),
        ({"conversation_uuid": CON, "status": "completed", "duration": "-4"}, {}, "duration"),
        ({"conversation_uuid": CON, "status": "answered", "direction": "sideways"}, {}, "direction"),
        ({"conversation_uuid": "CON-\x00", "status": "answered"}, {}, "conversation_uuid"),
        ({"conversation_uuid": CON, "recording_url": "ftp://x/y"}, {}, "recording_url"),
        ({"conversation_uuid": CON, "status": "answered"}, {"user_id": "0"}, "user_id"),
        ({"conversation_uuid": CON, "status": "answered"}, {"direction": "inbound"}, "direction"),
        ({"conversation_uuid": CON, "status": "answered"}, {"call": "x" * 200}, "call"),
    ],
)
def test_a_bad_event_is_a_validation_error_naming_the_field(
    payload: dict[str, Any], query: dict[str, str], field: str
) -> None:
    with pytest.raises(ValidationError) as error:
        PBX_SOURCES["vonage"].parse(json.dumps(payload).encode(), query)
    assert field in error.value.messages


def test_a_sip_uri_gives_the_number_and_an_overlong_one_is_dropped_not_cut() -> None:
    payload = {
        "conversation_uuid": CON,
        "status": "started",
        "direction": "inbound",
        "from": "sip:+447700900000@sip.example.com;transport=tls",
        "to": "x" * 300,
    }
    event = PBX_SOURCES["vonage"].parse(json.dumps(payload).encode(), {})
    assert (event.from_number, event.to_number, event.line) == ("+447700900000", None, None)


# -- signatures ---------------------------------------------------------------------------------


def configured(secret: str | None = SECRET, token: str | None = None) -> Settings:
    vendor = {"VONAGE_SIGNATURE_SECRET": secret} if secret else {}
    return Settings().with_overrides(vendor=vendor, inbound_token=token)


def request(token: str | None) -> HookRequest:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return HookRequest("POST", headers, {}, {"PATH_INFO": "/hooks/pbx/vonage", "wsgi.url_scheme": "https"})


def authenticate(settings: Settings, token: str | None, raw: bytes) -> str:
    found = authenticate_before_body(settings, request(token), "vonage", signatures=vonage.SOURCE.signatures)
    if isinstance(found, vonage.VonageSignature):
        return found.verify(request(token), raw, settings, "vonage").scheme
    return str(getattr(found, "scheme", found))


def vonage_token(raw: bytes, secret: str = SECRET, **changes: Any) -> str:
    """A token made as Vonage makes it: the claims of its signed webhooks, HS256 with the secret."""
    claims = {
        "iat": int(time.time()),
        "jti": "c5f0ff4d-17a1-4b6d-a9a5-2d5e0a0b5e11",
        "iss": "Vonage",
        "payload_hash": hashlib.sha256(raw).hexdigest(),
        "api_key": "abcd1234",
        "application_id": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
        **changes,
    }
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, secret, algorithm="HS256")


def test_a_token_signed_as_vonage_signs_is_accepted_and_sign_makes_the_same() -> None:
    raw = body("caller_completed.json")
    assert authenticate(configured(), vonage_token(raw), raw) == "vonage-jwt"
    assert authenticate(configured(), vonage.sign(SECRET, raw), raw) == "vonage-jwt"
    # the SDK's check (vonage_jwt.verify_signature) is PyJWT's HS256 decode with the secret
    assert jwt.decode(vonage.sign(SECRET, raw), SECRET, algorithms=["HS256"])["payload_hash"] == (
        hashlib.sha256(raw).hexdigest()
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda raw: vonage_token(raw, secret="another-accounts-signature-secret-0"), "Signature verification failed"),
        (lambda raw: vonage_token(raw, iat=int(time.time()) - 3600), "iat is not within 5 minutes"),
        (lambda raw: vonage_token(raw, iat=int(time.time()) + 3600), "iat"),
        (lambda raw: vonage_token(raw, iat=None), "iat"),
        (lambda raw: vonage_token(raw, payload_hash=None), "payload_hash"),
        (lambda raw: vonage_token(raw + b" "), "payload_hash does not match the body"),
        (lambda raw: jwt.encode({"iat": int(time.time()), "payload_hash": "x"}, SECRET, algorithm="HS512"), "alg"),
    ],
    ids=["forged", "stale", "future", "no-iat", "no-payload-hash", "other-body", "other-algorithm"],
)
def test_forged_stale_and_other_body_tokens_are_refused(make: Any, message: str) -> None:
    raw = body("caller_completed.json")
    with pytest.raises(AuthFailure) as failure:
        authenticate(configured(), make(raw), raw)
    assert (failure.value.status, failure.value.code) == (401, "bad_signature")
    assert message in failure.value.message


def test_an_unsigned_token_with_alg_none_is_refused() -> None:
    raw = body("caller_completed.json")
    claims = {"iat": int(time.time()), "payload_hash": hashlib.sha256(raw).hexdigest()}
    unsigned = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(AuthFailure) as failure:
        authenticate(configured(), unsigned, raw)
    assert failure.value.status == 401


def test_a_stale_token_is_refused_before_the_body_is_read() -> None:
    stale = vonage_token(b"{}", iat=int(time.time()) - 600)
    with pytest.raises(AuthFailure):
        authenticate_before_body(configured(), request(stale), "vonage", signatures=vonage.SOURCE.signatures)


def test_the_inbound_token_still_works_beside_the_signature_and_alone() -> None:
    raw = body("caller_completed.json")
    assert authenticate(configured(token="inbound-token-1"), "inbound-token-1", raw) == "bearer"
    assert authenticate(configured(secret=None, token="inbound-token-1"), "inbound-token-1", raw) == "bearer"
    # without the secret a Vonage JWT is only a wrong bearer
    with pytest.raises(AuthFailure) as failure:
        authenticate(configured(secret=None, token="inbound-token-1"), vonage_token(raw), raw)
    assert failure.value.code == "bad_credentials"
    with pytest.raises(AuthFailure):
        authenticate(configured(), None, raw)


# -- arbitrary bodies -----------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
_KEYS = ["conversation_uuid", "uuid", "status", "direction", "from", "to", "timestamp", "start_time", "duration"]
_VALUES = st.one_of(
    st.sampled_from([*vonage.STATUSES, "human", "inbound", "outbound", CON, "sip:1@x", "2026-12-07T10:20:30Z", "31"]),
    _JSON,
)
_EVENTS = st.dictionaries(st.sampled_from([*_KEYS, "recording_url"]), _VALUES, max_size=9)
_QUERIES = st.dictionaries(st.sampled_from(["extension", "user_id", "direction", "call"]), st.text(max_size=8))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.one_of(_EVENTS, _JSON), query=_QUERIES)
def test_arbitrary_bodies_become_an_event_or_a_validation_error_naming_a_field(payload: Any, query: Any) -> None:
    for raw in (json.dumps(payload).encode(), json.dumps(payload).encode()[:-1]):
        try:
            event = PBX_SOURCES["vonage"].parse(raw, query)
        except ValidationError as error:
            assert isinstance(error.messages, dict) and error.messages
            continue
        assert isinstance(event, CallEvent) and event.call_id


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64))
def test_arbitrary_bytes_never_raise_anything_else(raw: bytes) -> None:
    try:
        PBX_SOURCES["vonage"].parse(raw, {})
    except ValidationError as error:
        assert error.messages
    vonage.answer(HookRequest("POST", {}, {}), raw, Settings())

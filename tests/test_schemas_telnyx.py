"""Telnyx Call Control v2 webhooks (schemas/telnyx.py): each documented event → its CallEvent, the
Ed25519 signature (docs/contract.md §11), and arbitrary bodies → a CallEvent or a ValidationError."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.events import CallEvent
from b24scribe.inbound_auth import AuthFailure, HookRequest, authenticate_before_body
from b24scribe.settings import Settings
from b24scribe.transcript import Direction
from schemas import telnyx
from schemas.registry import SOURCES

FIXTURES = Path(__file__).parent / "fixtures" / "telnyx"
CUSTOMER, DID = "+15551230001", "+15557654321"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
REC = "https://s3.amazonaws.com/telephony-recorder-prod/rec.wav?X-Amz-Expires=600"


def _inbound(session: str, start: str) -> CallEvent:
    return CallEvent(
        "started", session, Direction.INBOUND, CUSTOMER, DID, started_at=f"2026-11-25T10:{start}+00:00", line=DID
    )


EXPECTED: dict[str, CallEvent] = {
    "answered_01_initiated": _inbound("answered-5f3c", "00:00"),
    "answered_02_agent_initiated": CallEvent("started", "answered-5f3c", extension="101"),
    "answered_03_agent_answered": CallEvent("answered", "answered-5f3c", extension="101"),
    "answered_04_answered": CallEvent("answered", "answered-5f3c"),
    "answered_05_bridged": CallEvent("answered", "answered-5f3c"),
    "answered_06_agent_hangup": CallEvent("started", "answered-5f3c"),
    "answered_07_hangup": CallEvent("finished", "answered-5f3c", duration=72, status="no-answer"),
    "busy_01_initiated": _inbound("busy-81aa", "05:00"),
    "busy_02_agent_initiated": CallEvent("started", "busy-81aa", extension="105"),
    "busy_03_agent_hangup": CallEvent("started", "busy-81aa"),
    "busy_04_hangup": CallEvent("finished", "busy-81aa", duration=0, status="busy"),
    "no_answer_01_initiated": _inbound("noanswer-0c2e", "06:00"),
    "no_answer_02_agent_initiated": CallEvent("started", "noanswer-0c2e", extension="106"),
    "no_answer_03_agent_hangup": CallEvent("started", "noanswer-0c2e"),
    "no_answer_04_hangup": CallEvent("finished", "noanswer-0c2e", duration=0, status="no-answer"),
    "outbound_01_initiated": CallEvent(
        "started", "outbound-e402", Direction.OUTBOUND, None, CUSTOMER, "101", started_at="2026-11-25T10:30:00+00:00"
    ),
    "outbound_02_answered": CallEvent("answered", "outbound-e402", extension="101"),
    "outbound_03_hangup": CallEvent("finished", "outbound-e402", extension="101", duration=60, status="no-answer"),
    "queue_01_initiated": _inbound("queue-3b9f", "20:00"),
    "queue_02_answered": CallEvent("answered", "queue-3b9f"),
    "queue_03_enqueued": CallEvent("started", "queue-3b9f"),
    "queue_04_member_initiated": CallEvent("started", "queue-3b9f", extension="104"),
    "queue_05_other_member_initiated": CallEvent("started", "queue-3b9f", extension="105"),
    "queue_06_member_answered": CallEvent("answered", "queue-3b9f", extension="104"),
    "queue_07_other_member_hangup": CallEvent("started", "queue-3b9f"),
    "queue_08_dequeued": CallEvent("started", "queue-3b9f"),
    "queue_09_hangup": CallEvent("finished", "queue-3b9f", duration=100, status="no-answer"),
    "queue_10_member_hangup": CallEvent("started", "queue-3b9f"),
    "recording_01_saved": CallEvent("recording", "answered-5f3c", recording_url=REC, recording_channels=2),
    "transfer_01_initiated": _inbound("transfer-77d1", "10:00"),
    "transfer_02_agent_initiated": CallEvent("started", "transfer-77d1", extension="101"),
    "transfer_03_agent_answered": CallEvent("answered", "transfer-77d1", extension="101"),
    "transfer_04_answered": CallEvent("answered", "transfer-77d1"),
    "transfer_05_second_agent_initiated": CallEvent("started", "transfer-77d1", extension="104"),
    "transfer_06_agent_hangup": CallEvent("started", "transfer-77d1"),
    "transfer_07_second_agent_answered": CallEvent("answered", "transfer-77d1", extension="104"),
    "transfer_08_second_agent_hangup": CallEvent("started", "transfer-77d1"),
    "transfer_09_hangup": CallEvent("finished", "transfer-77d1", duration=120, status="no-answer"),
}


def test_every_fixture_has_its_expected_event() -> None:
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_becomes_its_call_event(name: str) -> None:
    body = (FIXTURES / f"{name}.json").read_bytes()
    assert telnyx.parse(body, {}) == EXPECTED[name]
    assert SOURCES.pbx["telnyx"].parse(body, {}) == EXPECTED[name]  # the registry's checks let it through


@pytest.mark.parametrize(
    ("cause", "status"),
    [
        ("normal_clearing", "no-answer"),  # answered when the call was answered: the fold decides
        ("user_busy", "busy"),
        ("no_answer", "no-answer"),
        ("timeout", "no-answer"),
        ("originator_cancel", "cancelled"),
        ("call_rejected", "declined"),
        ("not_found", "unavailable"),
        ("time_limit", "answered"),
        ("unspecified", "failed"),
    ],
)
def test_hangup_causes(cause: str, status: str) -> None:
    body = json.loads((FIXTURES / "busy_04_hangup.json").read_bytes())
    body["data"]["payload"]["hangup_cause"] = cause
    assert telnyx.parse(json.dumps(body).encode(), {}).status == status


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda b: b.pop("data"), ["data"]),
        (lambda b: b["data"].pop("event_type"), ["data", "event_type"]),
        (lambda b: b["data"].update(payload=[]), ["data", "payload"]),
        (lambda b: b["data"]["payload"].pop("call_session_id"), ["data", "payload", "call_session_id"]),
        (lambda b: b["data"]["payload"].update(direction="sideways"), ["data", "payload", "direction"]),
        (lambda b: b["data"]["payload"].update(start_time="yesterday"), ["data", "payload", "start_time"]),
        (lambda b: b["data"]["payload"].update(to=7), ["data", "payload", "to"]),
    ],
)
def test_bad_fields_are_named(change: Any, field: list[str]) -> None:
    body = json.loads((FIXTURES / "answered_01_initiated.json").read_bytes())
    change(body)
    with pytest.raises(ValidationError) as raised:
        telnyx.parse(json.dumps(body).encode(), {})
    errors: Any = raised.value.messages
    for key in field:
        errors = errors[key]


def test_a_recording_without_urls_is_refused() -> None:
    body = json.loads((FIXTURES / "recording_01_saved.json").read_bytes())
    body["data"]["payload"]["recording_urls"] = {}
    with pytest.raises(ValidationError, match="recording_urls"):
        telnyx.parse(json.dumps(body).encode(), {})


# --- the signature -----------------------------------------------------------------------------


def _settings(settings: Settings) -> Settings:
    return settings.with_overrides(vendor={"TELNYX_PUBLIC_KEY": telnyx.public_key_setting(KEY)})


def _request(body: bytes, key: Ed25519PrivateKey = KEY, timestamp: int | None = None) -> HookRequest:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    headers = {"telnyx-timestamp": stamp, "telnyx-signature-ed25519": telnyx.sign(key, stamp, body)}
    return HookRequest("POST", headers, {}, {"PATH_INFO": "/hooks/pbx/telnyx"})


def _authenticate(settings: Settings, request: HookRequest, body: bytes) -> Any:
    scheme = authenticate_before_body(settings, request, "telnyx", signatures=(telnyx.SIGNATURE,))
    assert scheme is telnyx.SIGNATURE
    return telnyx.SIGNATURE.verify(request, body, settings, "telnyx")


def test_a_telnyx_signature_is_accepted_with_its_delivery_id(settings: Settings) -> None:
    body = (FIXTURES / "answered_07_hangup.json").read_bytes()
    auth = _authenticate(_settings(settings), _request(body), body)
    assert (auth.scheme, auth.delivery_id) == ("telnyx-ed25519", json.loads(body)["data"]["id"])


def test_the_signature_is_what_the_documented_algorithm_gives(settings: Settings) -> None:
    # Ed25519 over "timestamp|body" with the raw 32-byte public key, base64 (Telnyx's SDKs' check)
    body, stamp = b'{"data": {}}', "1700000000"
    signature = base64.b64decode(telnyx.sign(KEY, stamp, body))
    KEY.public_key().verify(signature, b"1700000000|" + body)
    assert len(signature) == 64 and len(base64.b64decode(telnyx.public_key_setting(KEY))) == 32


def test_forged_stale_and_changed_bodies_are_refused(settings: Settings) -> None:
    configured, body = _settings(settings), (FIXTURES / "answered_07_hangup.json").read_bytes()
    with pytest.raises(AuthFailure, match="does not match"):
        _authenticate(configured, _request(body, key=OTHER_KEY), body)
    with pytest.raises(AuthFailure, match="does not match"):
        _authenticate(configured, _request(body), body.replace(b"normal_clearing", b"user_busy"))
    with pytest.raises(AuthFailure, match="within 5 minutes"):  # refused from the headers alone
        authenticate_before_body(
            configured, _request(body, timestamp=int(time.time()) - 301), "telnyx", signatures=(telnyx.SIGNATURE,)
        )
    replayed = _request(body, timestamp=int(time.time()) - 10)
    replayed.headers["telnyx-timestamp"] = str(int(time.time()))  # a fresh timestamp on an old signature
    with pytest.raises(AuthFailure, match="does not match"):
        _authenticate(configured, replayed, body)
    garbage = _request(body)
    garbage.headers["telnyx-signature-ed25519"] = "not base64!"
    with pytest.raises(AuthFailure):
        _authenticate(configured, garbage, body)


def test_without_the_public_key_the_signature_is_not_the_credential(settings: Settings) -> None:
    body = (FIXTURES / "answered_07_hangup.json").read_bytes()
    assert not telnyx.SIGNATURE.configured(settings, "telnyx")
    with pytest.raises(AuthFailure):  # the bearer/?token= of contract §4 is then what authenticates
        authenticate_before_body(settings, _request(body), "telnyx", signatures=(telnyx.SIGNATURE,))


# --- hostile bodies ----------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "call_session_id",
        "from",
        "to",
        "direction",
        "start_time",
        "end_time",
        "hangup_cause",
        "channels",
        "recording_urls",
        "public_recording_urls",
        "state",
    ]
)
_events = st.sampled_from(
    [
        "call.initiated",
        "call.answered",
        "call.bridged",
        "call.hangup",
        "call.recording.saved",
        "call.speak.ended",
        "message.sent",
        "",
    ]
)


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    event_type=_events | _json,
    payload=st.dictionaries(_keys, _json | st.text(max_size=30), max_size=8),
    occurred=_json | st.just("2026-11-25T10:00:00Z"),
)
def test_arbitrary_webhooks_are_an_event_or_a_named_error(event_type: Any, payload: Any, occurred: Any) -> None:
    body = json.dumps({"data": {"event_type": event_type, "occurred_at": occurred, "payload": payload}}).encode()
    try:
        event = SOURCES.pbx["telnyx"].parse(body, {})
    except ValidationError as error:
        assert error.messages
    else:
        assert isinstance(event, CallEvent) and event.call_id


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_an_event_or_a_named_error(body: bytes) -> None:
    try:
        SOURCES.pbx["telnyx"].parse(body, {})
    except ValidationError as error:
        assert error.messages

"""Twilio Programmable Voice callbacks (`/hooks/pbx/twilio`): each fixture, as Twilio posts it, becomes
the exact call event; signatures made by Twilio's own SDK are accepted and every change refused;
arbitrary bodies become an event or a ValidationError naming the field."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError
from twilio.request_validator import RequestValidator

from b24scribe.events import CallEvent
from b24scribe.fold import CallState
from b24scribe.inbound_auth import AuthFailure, HookRequest
from b24scribe.settings import Settings, load_settings
from b24scribe.transcript import Direction
from schemas import twilio_pbx
from schemas.registry import SOURCES

FIXTURES = Path(__file__).parent / "fixtures" / "twilio_pbx"
AUTH_TOKEN = "twilio-pbx-auth-token-4c1d"
PUBLIC_URL = "https://b24scribe.example.com"
URL = PUBLIC_URL + "/hooks/pbx/twilio"

CUSTOMER, DID, CUSTOMER2 = "+15551234567", "+18005550100", "+15557654321"
ACCOUNT = "ACa1b2c3d4e5f60718293a4b5c6d7e8f90"
RECORDINGS = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT}/Recordings/"


def call(n: int) -> str:
    return f"CA{0xA000 + n:032x}"


def fixture(name: str) -> bytes:
    return (FIXTURES / f"{name}.txt").read_bytes().strip()


def form(name: str) -> dict[str, str]:
    return dict(parse_qsl(fixture(name).decode(), keep_blank_values=True))


def parse(name: str, query: dict[str, str] | None = None) -> CallEvent:
    """Through the registry, as the hook parses it (with contract §12's checks)."""
    return SOURCES.pbx["twilio"].parse(fixture(name), query or {})


def leg(n: int, event: str, extension: str, status: str | None = None, duration: int | None = None) -> CallEvent:
    """A <Dial> leg to an agent of inbound call n: the caller's number and the agent."""
    return CallEvent(event, call(n), from_number=CUSTOMER, extension=extension, status=status, duration=duration)


def parent_end(n: int) -> CallEvent:
    """An inbound parent's end: the numbers, its start, and no status or talk time of its own."""
    return CallEvent(
        "finished",
        call(n),
        direction=Direction.INBOUND,
        from_number=CUSTOMER,
        to_number=DID,
        started_at="2026-12-07T10:00:00+00:00",
        line=DID,
    )


OUT = {"direction": "outbound"}
API = {"direction": Direction.OUTBOUND, "from_number": DID, "to_number": CUSTOMER2, "line": DID}
EXPECTED: dict[str, tuple[dict[str, str], CallEvent]] = {
    "answered_01_agent_initiated": ({}, leg(1, "started", "101")),
    "answered_02_agent_ringing": ({}, leg(1, "started", "101")),
    "answered_03_agent_in_progress": ({}, leg(1, "answered", "101", "answered")),
    "answered_04_agent_completed": ({}, leg(1, "answered", "101", "answered", 42)),
    "answered_05_completed": ({}, parent_end(1)),
    "answered_06_recording_completed": (
        {},
        CallEvent("recording", call(1), recording_url=RECORDINGS + f"RE{1:032x}.mp3", recording_channels=2),
    ),
    "busy_01_agent_initiated": ({}, leg(2, "started", "101")),  # sip:101@acme.sip.twilio.com
    "busy_02_agent_busy": ({}, leg(2, "started", "101", "busy")),
    "busy_03_completed": ({}, parent_end(2)),
    "no_answer_01_agent_initiated": ({}, leg(3, "started", "101")),
    "no_answer_02_agent_ringing": ({}, leg(3, "started", "101")),
    "no_answer_03_agent_no_answer": ({}, leg(3, "started", "101", "no-answer")),
    "no_answer_04_completed": ({}, parent_end(3)),
    "transfer_01_agent_initiated": ({}, leg(4, "started", "101")),
    "transfer_02_agent_in_progress": ({}, leg(4, "answered", "101", "answered")),
    "transfer_03_agent_completed": ({}, leg(4, "answered", "101", "answered", 30)),
    "transfer_04_second_agent_initiated": ({}, leg(4, "started", "103")),
    "transfer_05_second_agent_in_progress": ({}, leg(4, "answered", "103", "answered")),
    "transfer_06_second_agent_completed": ({}, leg(4, "answered", "103", "answered", 60)),
    "transfer_07_completed": ({}, parent_end(4)),
    "queue_01_member_initiated": ({}, leg(5, "started", "101")),
    "queue_02_other_member_initiated": ({}, leg(5, "started", "103")),
    "queue_03_member_ringing": ({}, leg(5, "started", "101")),
    "queue_04_other_member_ringing": ({}, leg(5, "started", "103")),
    "queue_05_other_member_in_progress": ({}, leg(5, "answered", "103", "answered")),
    "queue_06_member_canceled": ({}, leg(5, "started", "101", "cancelled")),
    "queue_07_other_member_completed": ({}, leg(5, "answered", "103", "answered", 75)),
    "queue_08_completed": ({}, parent_end(5)),
    # an agent's Twilio Client calls a customer: the <Number> leg's callback URL says ?direction=outbound
    "outbound_01_customer_initiated": (
        OUT,
        CallEvent("started", call(6), direction=Direction.OUTBOUND, to_number=CUSTOMER2, line=DID),
    ),
    "outbound_02_customer_ringing": (
        OUT,
        CallEvent("started", call(6), direction=Direction.OUTBOUND, to_number=CUSTOMER2, line=DID),
    ),
    "outbound_03_customer_in_progress": (
        OUT,
        CallEvent("answered", call(6), direction=Direction.OUTBOUND, to_number=CUSTOMER2, line=DID, status="answered"),
    ),
    "outbound_04_customer_completed": (
        OUT,
        CallEvent(
            "answered",
            call(6),
            direction=Direction.OUTBOUND,
            to_number=CUSTOMER2,
            line=DID,
            status="answered",
            duration=33,
        ),
    ),
    "outbound_05_completed": (
        {},
        CallEvent(
            "finished",
            call(6),
            direction=Direction.OUTBOUND,
            to_number=CUSTOMER2,
            extension="101",
            started_at="2026-12-07T10:00:00+00:00",
        ),
    ),
    # the REST API calls a customer: the parent is the conversation
    "api_01_initiated": ({}, CallEvent("started", call(7), started_at="2026-12-07T10:00:00+00:00", **API)),
    "api_02_ringing": ({}, CallEvent("started", call(7), started_at="2026-12-07T10:00:01+00:00", **API)),
    "api_03_in_progress": ({}, CallEvent("answered", call(7), status="answered", **API)),
    "api_04_completed": (
        {"extension": "101"},
        CallEvent(
            "finished",
            call(7),
            extension="101",
            started_at="2026-12-07T10:00:06+00:00",
            duration=47,
            status="answered",
            recording_url=RECORDINGS + f"RE{7:032x}.mp3",
            **API,
        ),
    ),
    "api_busy_01_busy": (
        {"user_id": "7"},
        CallEvent(
            "finished", call(8), user_id=7, started_at="2026-12-07T10:00:04+00:00", duration=0, status="busy", **API
        ),
    ),
    "recording_absent": ({}, CallEvent("recording", call(9))),
}


def test_every_fixture_is_expected() -> None:
    assert sorted(path.stem for path in FIXTURES.glob("*.txt")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_fixture_becomes_its_event(name: str) -> None:
    query, expected = EXPECTED[name]
    assert parse(name, query) == expected


def fold(names: list[str], query: dict[str, str] | None = None) -> CallState:
    state = CallState(1, "main", "new")
    for name in names:
        state.merge(parse(name, query), 0.0)
    return state


SCENARIOS = {
    # scenario: (status, duration, extension) the Bitrix24 finish is made of
    "answered": ("answered", 42, "101"),
    "busy": ("busy", None, "101"),
    "no_answer": ("no-answer", None, "101"),
    "transfer": ("answered", 60, "103"),
    "queue": ("answered", 75, "103"),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_each_scenario_folds_into_one_call_in_any_order_of_its_legs(scenario: str) -> None:
    names = sorted(path.stem for path in FIXTURES.glob(f"{scenario}_*.txt"))
    state = fold(names)
    assert (state.status, state.duration, state.extension, state.finish_reported) == (*SCENARIOS[scenario], True)
    assert (state.direction, state.from_number) == ("inbound", CUSTOMER)
    if state.status == "answered":
        # the legs' callbacks race: delivered in reverse, an answered call is still answered, by its agent
        reverse = fold(names[::-1])
        assert (reverse.status, reverse.answered, reverse.finish_reported) == ("answered", True, True)
        assert reverse.extension == SCENARIOS[scenario][2] or scenario == "transfer"


def test_a_transfer_to_an_agent_who_does_not_answer_stays_with_the_one_who_did() -> None:
    state = fold(["transfer_01_agent_initiated", "transfer_02_agent_in_progress", "transfer_03_agent_completed"])
    ringing = form("transfer_04_second_agent_initiated")
    no_answer = {**ringing, "CallStatus": "no-answer", "CallDuration": "0"}
    for fields in (ringing, no_answer):
        state.merge(twilio_pbx.parse(urlencode(fields).encode(), {}), 0.0)
    state.merge(parse("transfer_07_completed"), 0.0)
    assert (state.status, state.duration, state.extension) == ("answered", 30, "101")


def test_the_user_comes_from_the_dialed_identity_or_the_url() -> None:
    base = form("answered_01_agent_initiated")
    for to, extension in [
        ("client:101", "101"),
        ("sip:101@acme.sip.twilio.com", "101"),
        ("sips:alice@acme.sip.twilio.com;transport=tls", "alice"),
        ("sip:+15550001111@acme.sip.twilio.com", None),  # a phone number, not an agent
        ("+15550001111", None),
        ("client:Anonymous", None),  # a Twilio Client without an identity: no Bitrix24 user
    ]:
        event = twilio_pbx.parse_callback({**base, "To": to}, {})
        assert event.extension == extension, to
    completed = form("outbound_05_completed")
    anonymous_agent = twilio_pbx.parse_callback({**completed, "From": "client:Anonymous"}, {})
    assert (anonymous_agent.direction, anonymous_agent.extension) == (Direction.OUTBOUND, None)
    withheld = twilio_pbx.parse_callback({**form("answered_05_completed"), "From": "sip:anonymous@carrier"}, {})
    assert (withheld.direction, withheld.from_number, withheld.extension) == (Direction.INBOUND, "anonymous", None)
    assert twilio_pbx.parse_callback(base, {"extension": "205"}).extension == "205"
    assert twilio_pbx.parse_callback(base, {"user_id": "12"}).user_id == 12


def test_a_get_callback_is_read_from_the_query() -> None:
    fields = form("answered_03_agent_in_progress")
    assert twilio_pbx.parse(b"", fields) == EXPECTED["answered_03_agent_in_progress"][1]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"CallStatus": "exploded"}, "CallStatus"),
        ({"CallStatus": ""}, "CallStatus"),
        ({"CallSid": ""}, "CallSid"),
        ({"CallDuration": "forever"}, "CallDuration"),
        ({"CallDuration": "-1"}, "CallDuration"),
        ({"Timestamp": "yesterday"}, "Timestamp"),
        ({"ParentCallSid": "CA\x00"}, "ParentCallSid"),
        ({"To": "client:" + "x" * 200}, "To"),
        ({"Direction": "sideways"}, "Direction"),
    ],
)
def test_a_bad_field_is_named(change: dict[str, str], field: str) -> None:
    fields = {**form("answered_05_completed"), **change}
    if field == "To":
        fields = {**form("answered_01_agent_initiated"), **change}
    with pytest.raises(ValidationError) as raised:
        SOURCES.pbx["twilio"].parse(urlencode(fields).encode(), {})
    assert field in raised.value.messages


def test_bad_url_options_are_named() -> None:
    body = fixture("answered_01_agent_initiated")
    for query, field in [
        ({"user_id": "0"}, "user_id"),
        ({"user_id": "x"}, "user_id"),
        ({"direction": "up"}, "direction"),
    ]:
        with pytest.raises(ValidationError) as raised:
            twilio_pbx.parse(body, query)
        assert field in raised.value.messages


# --- the signature -----------------------------------------------------------------------------


def configured(token: str | None = AUTH_TOKEN) -> Settings:
    return load_settings({}).with_overrides(vendor={"TWILIO_AUTH_TOKEN": token} if token else {})


def hook_request(url: str, signature: str | None) -> HookRequest:
    path, _, query = url.removeprefix(PUBLIC_URL).partition("?")
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    environ = {"PATH_INFO": path, "QUERY_STRING": query}
    return HookRequest("POST", headers, dict(parse_qsl(query)), environ, public_url=PUBLIC_URL)


def verify(url: str, body: bytes, signature: str | None) -> str:
    [scheme] = twilio_pbx.SOURCE.signatures
    settings_ = configured()
    hook = hook_request(url, signature)
    assert scheme.configured(settings_, "twilio") and scheme.present(hook)
    scheme.before_body(hook, settings_, "twilio")
    return scheme.verify(hook, body, settings_, "twilio").scheme


def twilio_signature(token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's algorithm, written out: base64 HMAC-SHA1 of the URL and each sorted name + value."""
    signed = url + "".join(name + params[name] for name in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), signed.encode(), hashlib.sha1).digest()).decode()


def test_our_reading_of_the_algorithm_is_the_sdks() -> None:
    params = form("answered_05_completed")
    sdk = RequestValidator(AUTH_TOKEN).compute_signature(URL, params)
    assert twilio_signature(AUTH_TOKEN, URL, params) == sdk


def test_a_callback_signed_by_twilios_sdk_is_accepted_and_any_change_refused() -> None:
    body = fixture("answered_05_completed")
    params = form("answered_05_completed")
    url = URL + "?portal=main"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, params)
    assert verify(url, body, signature) == "twilio-signature"
    assert verify(
        URL, fixture("queue_06_member_canceled"), twilio_signature(AUTH_TOKEN, URL, form("queue_06_member_canceled"))
    )

    forged_status = body.replace(b"CallStatus=completed", b"CallStatus=busy")
    for forged_url, forged_body, forged_signature in [
        (url, forged_status, signature),  # a field changed
        (URL, body, signature),  # signed for another URL (the query dropped)
        (URL + "?portal=other", body, signature),
        (url, body, RequestValidator("guess").compute_signature(url, params)),  # another key
        (url, body, ""),
    ]:
        with pytest.raises(AuthFailure) as refused:
            verify(forged_url, forged_body, forged_signature)
        assert (refused.value.status, refused.value.code) == (401, "bad_signature")


def test_the_signature_is_required_only_when_the_auth_token_is_set() -> None:
    [scheme] = twilio_pbx.SOURCE.signatures
    assert scheme.configured(configured(), "twilio")
    assert not scheme.configured(configured(None), "twilio")
    assert twilio_pbx.SOURCE.delivery_header == "I-Twilio-Idempotency-Token"


# --- arbitrary bodies --------------------------------------------------------------------------

NAMES = st.sampled_from(
    [
        "CallSid",
        "ParentCallSid",
        "CallStatus",
        "Direction",
        "From",
        "To",
        "CallDuration",
        "Timestamp",
        "RecordingSid",
        "RecordingStatus",
        "RecordingUrl",
        "RecordingChannels",
        "AccountSid",
    ]
)
VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "completed",
            "in-progress",
            "busy",
            "canceled",
            "client:101",
            "sip:101@x",
            "inbound",
            "outbound-api",
            "-5",
            "1e9",
            "Mon, 07 Dec 2026 10:00:00 +0000",
            "Mon, 07 Dec 9999 10:00:00 +0000",
            "https://api.twilio.com/r",
            "2",
            "\x00",
            "x" * 300,
        ]
    ),
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _named(error: ValidationError) -> bool:
    return isinstance(error.messages, dict) and bool(error.messages)


@PROPERTY
@given(fields=st.dictionaries(NAMES, VALUES, max_size=10), base=st.sampled_from(sorted(EXPECTED)))
def test_arbitrary_fields_become_an_event_or_a_named_error(fields: dict[str, str], base: str) -> None:
    body = urlencode({**form(base), **fields}).encode()
    try:
        event = SOURCES.pbx["twilio"].parse(body, {})
    except ValidationError as error:
        assert _named(error), error.messages
        return
    assert event.event in ("started", "answered", "finished", "recording")


@PROPERTY
@given(body=st.binary(max_size=300), query=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4))
def test_arbitrary_bytes_become_an_event_or_a_named_error(body: bytes, query: dict[str, Any]) -> None:
    try:
        SOURCES.pbx["twilio"].parse(body, query)
    except ValidationError as error:
        assert _named(error), error.messages

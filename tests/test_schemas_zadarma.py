"""Zadarma's notifications (schemas/zadarma.py): each documented event → the exact CallEvent, its
`Signature` made as Zadarma's PHP SDK makes it (base64 of the hex HMAC-SHA1 of the event's signed
fields) accepted, forged / stale / other-field signatures refused, and any body a CallEvent or a
ValidationError naming a field."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.events import CallEvent
from b24scribe.inbound_auth import AuthFailure, HookRequest, authenticate_before_body
from b24scribe.transcript import Direction
from schemas import zadarma
from schemas.registry import PBX_SOURCES
from tests.conftest import INBOUND_TOKEN, make_settings

FIXTURES = Path(__file__).parent / "fixtures" / "zadarma"
SECRET = "zadarma-api-secret-1c9e"
SETTINGS = make_settings("sqlite://", "http://fake.invalid/rest/1/x/").with_overrides(
    vendor={"ZADARMA_API_SECRET": SECRET}
)
TZ = {"tz": "Europe/Moscow"}
START = "2026-11-25T10:20:30+03:00"
CALLER, DID = "+79161234567", "74951234567"
PARSE = PBX_SOURCES["zadarma"].parse  # as registered: with the contract §12 backstop


def body(path: str) -> bytes:
    return (FIXTURES / path).read_bytes()


def form(path: str) -> dict[str, str]:
    return dict(parse_qsl(body(path).decode(), keep_blank_values=True))


def php_signature(secret: str, signed: str) -> str:
    """`base64_encode(hash_hmac('sha1', $signed, $secret))` as the SDK's examples compute it: PHP's
    hash_hmac returns lowercase hex unless its 4th argument is true."""
    return base64.b64encode(hmac.new(secret.encode(), signed.encode(), hashlib.sha1).hexdigest().encode()).decode()


def inbound(call: str, event: str, **changes: Any) -> CallEvent:
    values: dict[str, Any] = {
        "event": event,
        "call_id": call,
        "direction": Direction.INBOUND,
        "from_number": CALLER,
        "to_number": DID,
        "started_at": START,
        "line": DID,
    }
    return CallEvent(**(values | changes))


ANSWERED = "in_6b1e0d2f3a4c5b6d7e8f9a0b1c2d3e4f"
BUSY = "in_0a1b2c3d4e5f60718293a4b5c6d7e8f9"
NO_ANSWER = "in_1f2e3d4c5b6a79880796a5b4c3d2e1f0"
TRANSFER = "in_7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29"
QUEUE = "in_5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b"
OUTBOUND = "out_3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d"


def answer_of(call: str, extension: str) -> CallEvent:
    return CallEvent("answered", call, from_number=CALLER, extension=extension, started_at=START)


EXPECTED: dict[str, CallEvent] = {
    "answered/01_notify_start.form": inbound(ANSWERED, "started"),
    "answered/02_notify_internal.form": inbound(ANSWERED, "started", extension="100"),
    "answered/03_notify_answer.form": answer_of(ANSWERED, "100"),
    "answered/04_notify_end.form": inbound(ANSWERED, "finished", extension="100", duration=73, status="answered"),
    "busy/01_notify_start.form": inbound(BUSY, "started"),
    "busy/02_notify_internal.form": inbound(BUSY, "started", extension="101"),
    "busy/03_notify_end.form": inbound(BUSY, "finished", extension="101", duration=0, status="busy"),
    "no_answer/01_notify_start.form": inbound(NO_ANSWER, "started"),
    "no_answer/02_notify_internal.form": inbound(NO_ANSWER, "started", extension="100"),
    "no_answer/03_notify_internal.form": inbound(NO_ANSWER, "started", extension="101"),
    # the 31 s it rang are no talk time
    "no_answer/04_notify_end.form": inbound(NO_ANSWER, "finished", extension="101", duration=0, status="no-answer"),
    "transfer/01_notify_start.form": inbound(TRANSFER, "started"),
    "transfer/02_notify_internal.form": inbound(TRANSFER, "started", extension="100"),
    "transfer/03_notify_answer.form": answer_of(TRANSFER, "100"),
    "transfer/04_notify_internal.form": inbound(TRANSFER, "started", extension="102"),
    "transfer/05_notify_answer.form": answer_of(TRANSFER, "102"),
    "transfer/06_notify_end.form": inbound(TRANSFER, "finished", extension="102", duration=95, status="answered"),
    "queue/01_notify_start.form": inbound(QUEUE, "started"),
    "queue/02_notify_internal.form": inbound(QUEUE, "started", extension="100"),
    "queue/03_notify_internal.form": inbound(QUEUE, "started", extension="101"),
    "queue/04_notify_internal.form": inbound(QUEUE, "started", extension="102"),
    "queue/05_notify_answer.form": answer_of(QUEUE, "101"),
    "queue/06_notify_end.form": inbound(QUEUE, "finished", duration=48, status="answered"),
    "outbound/01_notify_out_start.form": CallEvent(
        "started",
        OUTBOUND,
        direction=Direction.OUTBOUND,
        from_number="74951234567",
        to_number="+79169876543",
        extension="100",
        started_at=START,
    ),
    "outbound/02_notify_out_end.form": CallEvent(
        "finished",
        OUTBOUND,
        direction=Direction.OUTBOUND,
        from_number="74951234567",
        to_number="+79169876543",
        extension="100",
        started_at=START,
        duration=120,
        status="answered",
    ),
}


def test_every_fixture_has_its_expected_event() -> None:
    fixtures = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*.form")}
    assert fixtures - set(EXPECTED) == {"answered/05_notify_record.form", "ivr.form"}


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_each_notification_becomes_its_call_event(path: str) -> None:
    assert PARSE(body(path), TZ) == EXPECTED[path]


def test_without_a_time_zone_call_start_gives_no_start_time() -> None:
    assert PARSE(body("answered/01_notify_start.form"), {}).started_at is None
    utc = PARSE(body("answered/01_notify_start.form"), {"tz": "UTC"})
    assert utc.started_at == "2026-11-25T10:20:30+00:00"
    with pytest.raises(ValidationError) as caught:
        PARSE(body("answered/01_notify_start.form"), {"tz": "Mars/Olympus"})
    assert "tz" in caught.value.messages_dict


@pytest.mark.parametrize(
    ("disposition", "status", "duration"),
    [
        ("answered", "answered", 73),
        ("busy", "busy", 0),
        ("cancel", "cancelled", 0),
        ("no answer", "no-answer", 0),
        ("failed", "failed", 0),
        ("no money", "failed", 0),
        ("unallocated number", "failed", 0),
        ("no money, no limit", "failed", 0),
        ("line limit", "failed", 0),
    ],
)
def test_dispositions_map_to_statuses_and_only_answered_calls_have_talk_time(
    disposition: str, status: str, duration: int
) -> None:
    fields = form("answered/04_notify_end.form") | {"disposition": disposition}
    event = PARSE(urlencode(fields).encode(), TZ)
    assert (event.status, event.duration) == (status, duration)


def test_a_recording_names_the_api_request_for_its_link_or_a_relays_url() -> None:
    fields = form("answered/05_notify_record.form")
    assert PARSE(urlencode(fields).encode(), {}) == CallEvent(
        "recording", ANSWERED, recording_url="https://api.zadarma.com/v1/pbx/record/request/?call_id=1764066030.123456"
    )
    with_url = fields | {"recording_url": "https://records.example/1764066030.123456.mp3"}
    assert PARSE(urlencode(with_url).encode(), {}) == CallEvent(
        "recording", ANSWERED, recording_url="https://records.example/1764066030.123456.mp3"
    )
    with pytest.raises(ValidationError) as caught:
        PARSE(urlencode({k: v for k, v in fields.items() if k != "call_id_with_rec"}).encode(), {})
    assert "call_id_with_rec" in caught.value.messages_dict


def _request(method: str = "POST", headers: dict[str, str] | None = None, query: dict[str, str] | None = None) -> Any:
    return HookRequest(method, headers or {}, query or {})


def test_answers_the_url_check_and_ignores_what_is_no_call_event() -> None:
    echo = zadarma.answer(_request("GET", query={"zd_echo": "a1b2c3"}), b"", SETTINGS)
    assert echo is not None and (echo.status, echo.body) == (200, b"a1b2c3")
    hostile = zadarma.answer(_request("GET", query={"zd_echo": "<script>"}), b"", SETTINGS)
    assert hostile is not None and hostile.status == 400
    for ignored in ("answered/05_notify_record.form", "ivr.form"):  # a recording: no API key to ask for it
        found = zadarma.answer(_request(), body(ignored), SETTINGS)
        assert found is not None and found.status == 200
    recorded = form("answered/05_notify_record.form") | {"recording_url": "https://r.example/a.mp3"}
    assert zadarma.answer(_request(), urlencode(recorded).encode(), SETTINGS) is None
    with_key = SETTINGS.with_overrides(vendor={"ZADARMA_API_SECRET": SECRET, "ZADARMA_API_KEY": "k"})
    assert zadarma.answer(_request(), body("answered/05_notify_record.form"), with_key) is None
    unnamed = {k: v for k, v in form("answered/05_notify_record.form").items() if k != "call_id_with_rec"}
    found = zadarma.answer(_request(), urlencode(unnamed).encode(), with_key)
    assert found is not None and found.status == 200
    assert zadarma.answer(_request(), body("answered/04_notify_end.form"), SETTINGS) is None
    assert zadarma.answer(_request(), b"\xff\xfe", SETTINGS) is None  # the parser names it


# --- signatures ---------------------------------------------------------------------------------


def fresh(fields: dict[str, str], now: datetime | None = None) -> dict[str, str]:
    """The notification as sent now (a signature on an old call_start is stale)."""
    if "call_start" not in fields:
        return fields
    moment = now or datetime.now(UTC)
    return fields | {"call_start": moment.strftime("%Y-%m-%d %H:%M:%S")}


SIGNED_STRINGS = {
    "answered/01_notify_start.form": lambda f: f["caller_id"] + f["called_did"] + f["call_start"],
    "answered/02_notify_internal.form": lambda f: f["caller_id"] + f["called_did"] + f["call_start"],
    "answered/03_notify_answer.form": lambda f: f["caller_id"] + f["destination"] + f["call_start"],
    "answered/04_notify_end.form": lambda f: f["caller_id"] + f["called_did"] + f["call_start"],
    "answered/05_notify_record.form": lambda f: f["pbx_call_id"] + f["call_id_with_rec"],
    "outbound/01_notify_out_start.form": lambda f: f["internal"] + f["destination"] + f["call_start"],
    "outbound/02_notify_out_end.form": lambda f: f["internal"] + f["destination"] + f["call_start"],
}


def verify(fields: dict[str, str], signature: str | None, secret_settings: Any = SETTINGS) -> Any:
    headers = {"Signature": signature} if signature is not None else {}
    request = _request(headers=headers)
    found = authenticate_before_body(secret_settings, request, "zadarma", signatures=zadarma.SOURCE.signatures)
    if not isinstance(found, zadarma.ZadarmaSignature):
        return found
    return found.verify(request, urlencode(fields).encode(), secret_settings, "zadarma")


@pytest.mark.parametrize("path", sorted(SIGNED_STRINGS))
def test_a_signature_made_as_zadarmas_sdk_makes_it_is_accepted(path: str) -> None:
    fields = fresh(form(path))
    signature = php_signature(SECRET, SIGNED_STRINGS[path](fields))
    assert signature == zadarma.sign(SECRET, fields)
    authenticated = verify(fields, signature)
    assert authenticated.scheme == "zadarma-signature"
    assert authenticated.delivery_id.startswith("zadarma:" + fields["event"])


def test_the_sdk_example_value_is_reproduced() -> None:
    # base64 of the hex digest, not of the raw bytes (what a naive port gets wrong)
    fields = {"event": "NOTIFY_START", "caller_id": "1", "called_did": "2", "call_start": "3"}
    hex_digest = hmac.new(b"k", b"123", hashlib.sha1).hexdigest()
    assert zadarma.sign("k", fields) == base64.b64encode(hex_digest.encode()).decode()
    assert len(base64.b64decode(zadarma.sign("k", fields))) == 40


@pytest.mark.parametrize(
    "change",
    [
        {"caller_id": "+79990000000"},  # a signed field changed
        {"called_did": "74950000000"},
    ],
)
def test_a_forged_signature_is_refused(change: dict[str, str]) -> None:
    fields = fresh(form("answered/04_notify_end.form"))
    signature = zadarma.sign(SECRET, fields)
    with pytest.raises(AuthFailure) as caught:
        verify(fields | change, signature)
    assert (caught.value.status, caught.value.code) == (401, "bad_signature")
    with pytest.raises(AuthFailure):
        verify(fields, zadarma.sign("another-secret", fields))
    with pytest.raises(AuthFailure):
        verify(fields, "")
    with pytest.raises(AuthFailure):  # the raw-bytes base64 some ports compute
        raw = hmac.new(SECRET.encode(), zadarma.signature_string(fields).encode(), hashlib.sha1).digest()
        verify(fields, base64.b64encode(raw).decode())


@pytest.mark.parametrize(
    ("path", "age", "stale"),
    [
        ("answered/01_notify_start.form", timedelta(hours=14), False),  # any time zone
        ("answered/01_notify_start.form", timedelta(hours=-14), False),
        ("answered/01_notify_start.form", timedelta(days=2), True),
        ("answered/01_notify_start.form", timedelta(days=-2), True),
        ("answered/04_notify_end.form", timedelta(days=3), False),  # a long call ends days later
        ("answered/04_notify_end.form", timedelta(days=9), True),
    ],
)
def test_a_stale_signature_is_refused(path: str, age: timedelta, stale: bool) -> None:
    fields = fresh(form(path), datetime.now(UTC) - age)
    signature = zadarma.sign(SECRET, fields)
    if stale:
        with pytest.raises(AuthFailure, match="call_start"):
            verify(fields, signature)
    else:
        assert verify(fields, signature).scheme == "zadarma-signature"
    garbled = fields | {"call_start": "yesterday"}
    with pytest.raises(AuthFailure):
        verify(garbled, zadarma.sign(SECRET, garbled))


def test_a_replay_with_other_unsigned_values_is_the_same_delivery() -> None:
    fields = fresh(form("answered/04_notify_end.form"))
    signature = zadarma.sign(SECRET, fields)
    first = verify(fields, signature)
    replayed = verify(fields | {"disposition": "busy", "duration": "1"}, signature)  # not covered by it
    assert replayed.delivery_id == first.delivery_id
    # the rings and answers of one call differ by their extension: each is its own delivery
    ring = fresh(form("queue/02_notify_internal.form"))
    other = ring | {"internal": "101"}
    assert (
        verify(ring, zadarma.sign(SECRET, ring)).delivery_id != verify(other, zadarma.sign(SECRET, other)).delivery_id
    )
    # and START / END of one call are signed alike but are two deliveries
    start = fresh(form("answered/01_notify_start.form"))
    assert verify(start, zadarma.sign(SECRET, start)).delivery_id != first.delivery_id


def test_without_the_secret_the_token_still_works_and_a_signature_alone_does_not() -> None:
    unsigned = SETTINGS.with_overrides(vendor={})
    fields = fresh(form("answered/01_notify_start.form"))
    with pytest.raises(AuthFailure):
        verify(fields, zadarma.sign(SECRET, fields), unsigned)
    request = _request(query={"token": INBOUND_TOKEN})
    found = authenticate_before_body(unsigned, request, "zadarma", signatures=zadarma.SOURCE.signatures)
    assert getattr(found, "scheme", None) == "query-token"
    # with the secret set, an unsigned request still takes the token (the URL check carries it)
    found = authenticate_before_body(SETTINGS, request, "zadarma", signatures=zadarma.SOURCE.signatures)
    assert getattr(found, "scheme", None) == "query-token"
    assert not zadarma.is_stale({"event": "NOTIFY_RECORD"}, time.time())


# --- arbitrary bodies ---------------------------------------------------------------------------

_KEYS = st.sampled_from(
    [
        "event",
        "pbx_call_id",
        "call_start",
        "caller_id",
        "called_did",
        "destination",
        "internal",
        "duration",
        "disposition",
        "recording_url",
        "tz",
        "token",
        "x",
    ]
)
_VALUES = st.one_of(
    st.sampled_from([*zadarma.EVENTS, "NOTIFY_IVR", "2026-11-25 10:20:30", "answered", "no answer", "-1", "1e99"]),
    st.text(max_size=40),
    st.from_regex(r"\d{1,8}", fullmatch=True),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=10), st.dictionaries(st.sampled_from(["tz", "token"]), _VALUES))
def test_any_form_is_an_event_or_a_validation_error_naming_a_field(
    fields: dict[str, str], query: dict[str, str]
) -> None:
    raw = urlencode(fields).encode()
    for parse in (PARSE, zadarma.parse):
        try:
            event = parse(raw, query)
        except ValidationError as error:
            assert error.messages_dict  # names at least one field
        else:
            assert isinstance(event, CallEvent) and event.call_id


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_an_event_or_a_validation_error(raw: bytes) -> None:
    try:
        PARSE(raw, {})
    except ValidationError as error:
        assert error.messages_dict
    zadarma.answer(_request(), raw, SETTINGS)  # never raises
    with pytest.raises(AuthFailure):
        zadarma.SIGNATURE.verify(_request(headers={"Signature": "x"}), raw, SETTINGS, "zadarma")

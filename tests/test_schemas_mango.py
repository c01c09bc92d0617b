"""Mango Office VPBX realtime events: each documented event → the exact CallEvent; the `sign` made
with Mango's own formula is accepted, anything else is refused; no body makes the parser raise
anything but a ValidationError naming a field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.events import CallEvent
from b24scribe.inbound_auth import AuthFailure, HookRequest, authenticate_before_body
from b24scribe.settings import Settings
from b24scribe.transcript import Direction
from schemas import mango
from schemas.registry import SOURCES

FIXTURES = Path(__file__).parent / "fixtures" / "mango"
API_KEY = "k8zq3v6h1mango0api0key0example00"
API_SALT = "s4lt-7r2p9x-mango-example"
LINK = "https://app.mango-office.ru/vpbx/queries/recording/link/{}/download"
STARTED = "2025-12-07T07:00:00+00:00"  # create_time 1765090800


def scenario(name: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = json.loads((FIXTURES / f"{name}.json").read_text())
    return events


def form(event: dict[str, Any] | str, key: str = API_KEY, salt: str = API_SALT, sign: str | None = None) -> bytes:
    """A request body as Mango posts it: its key, the sign over key + json + salt, and the json."""
    payload = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    signature = sign if sign is not None else mango.sign(key, payload, salt)
    return urlencode({"vpbx_api_key": key, "sign": signature, "json": payload}).encode()


def parse(event: dict[str, Any]) -> CallEvent:
    return SOURCES.pbx["mango"].parse(form(event), {})


def parsed(name: str) -> list[CallEvent]:
    return [parse(event) for event in scenario(name)]


def entry(name: str) -> str:
    return str(scenario(name)[0]["entry_id"])


# --- each scenario's events, exactly ---------------------------------------------------------------


def test_an_answered_inbound_call() -> None:
    call = entry("answered")
    assert parsed("answered") == [
        CallEvent("started", call, Direction.INBOUND, "79161234567", None, "101", line="74951112233"),
        CallEvent("answered", call, None, "79161234567", None, "101", line="74951112233"),
        CallEvent("started", call, None, "79161234567", None, None, line="74951112233"),
        CallEvent(
            "finished",
            call,
            Direction.INBOUND,
            "79161234567",
            None,
            None,  # the agent is the one who answered (Connected), not restated here
            started_at=STARTED,
            duration=73,  # end_time - talk_time
            status="answered",
            line="74951112233",
        ),
    ]


def test_a_busy_call_is_busy_with_the_agent_who_was_busy() -> None:
    call = entry("busy")
    *_, summary = parsed("busy")
    assert summary == CallEvent(
        "finished", call, Direction.INBOUND, "79161234567", None, "102", None, STARTED, 0, "busy", line="74951112233"
    )


def test_an_unanswered_call_is_no_answer_with_the_first_agent_who_missed_it() -> None:
    call = entry("no_answer")
    started, ended, summary = parsed("no_answer")
    assert started == CallEvent("started", call, Direction.INBOUND, "79161234567", None, "103", line="74951112233")
    assert ended.event == "started" and ended.extension is None  # a leg's end never finishes the call
    assert summary == CallEvent(
        "finished",
        call,
        Direction.INBOUND,
        "79161234567",
        None,
        "103",
        None,
        STARTED,
        0,
        "no-answer",
        line="74951112233",
    )


def test_a_transfer_folds_into_one_call_that_ends_with_the_second_agent() -> None:
    events = parsed("transfer")
    call = entry("transfer")
    assert {event.call_id for event in events} == {call}  # both legs: the entry_id
    assert [(event.event, event.extension) for event in events] == [
        ("started", "101"),
        ("answered", "101"),
        ("started", None),  # OnHold
        ("started", None),  # the internal leg 101 → 102 rings: no direction, no employee
        ("answered", "102"),
        ("started", None),
        ("started", None),
        ("finished", None),
    ]
    assert events[3].direction is None
    finished = events[-1]
    assert (finished.status, finished.duration, finished.direction) == ("answered", 120, Direction.INBOUND)


def test_a_queue_call_is_answered_by_the_agent_who_picked_up_not_by_the_ivr() -> None:
    events = parsed("queue")
    call = entry("queue")
    assert {event.call_id for event in events} == {call}
    answered = [event for event in events if event.event == "answered"]
    assert answered == [CallEvent("answered", call, None, "79161234567", None, "102", line="74951112233")]
    assert events[1].event == "started"  # the IVR answering is not a person answering
    # the IVR and queue legs name nobody; each ringing agent is named as their phone rings, and the
    # one who answered is named after them (the events fold in this order)
    assert [event.extension for event in events] == [None, None, None, "101", "102", "102", None, None, None, None]
    finished = events[-1]
    assert (finished.event, finished.status, finished.duration, finished.extension) == (
        "finished",
        "answered",
        180,
        None,
    )


def test_an_outbound_call_names_its_caller_from_the_start() -> None:
    call = entry("outbound")
    appeared, connected, _, summary = parsed("outbound")
    assert appeared == CallEvent("started", call, Direction.OUTBOUND, None, "74959876543", "104", line="74951112233")
    assert connected == CallEvent("answered", call, None, None, "74959876543", "104", line="74951112233")
    assert summary == CallEvent(
        "finished",
        call,
        Direction.OUTBOUND,
        None,
        "74959876543",
        "104",
        None,
        STARTED,
        43,
        "answered",
        line="74951112233",
    )


def test_recordings_become_recording_events_with_mangos_download_link() -> None:
    call = entry("recording")
    started, completed, added = parsed("recording")
    url = LINK.format("MToxMDAxNjMyMToxMjM0NTY3ODk6MA%3D%3D")
    assert started == CallEvent("started", call)
    assert completed == CallEvent("recording", call, recording_url=url)
    assert added == CallEvent("recording", call, recording_url=url)
    too_short = {**scenario("recording")[1], "completion_code": 4002}
    assert parse(too_short) == CallEvent("started", call)


@pytest.mark.parametrize(
    ("reason", "direction", "status"),
    [
        (1121, 1, "busy"),
        (1122, 1, "declined"),
        (1123, 1, "declined"),
        (1111, 1, "no-answer"),
        (1110, 1, "no-answer"),  # the customer gave up: a missed call
        (1110, 2, "cancelled"),  # our employee gave up
        (1163, 1, "no-answer"),
        (1131, 2, "unavailable"),
        (4201, 2, "unavailable"),
        (1133, 2, "failed"),
        (2001, 2, "failed"),
        (3201, 2, "failed"),
        (1162, 1, "congestion"),
        (1100, 1, "no-answer"),
        (None, 1, "no-answer"),
    ],
)
def test_a_missed_calls_status_comes_from_its_disconnect_reason(
    reason: int | None, direction: int, status: str
) -> None:
    summary = {**scenario("busy")[-1], "disconnect_reason": reason, "call_direction": direction}
    assert parse(summary).status == status


@pytest.mark.parametrize("reason", [1110, 1121, 1122, 1131, 2001, 5001])
def test_an_answered_call_is_never_shown_as_missed(reason: int) -> None:
    summary = {**scenario("answered")[-1], "disconnect_reason": reason}
    assert (parse(summary).status, parse(summary).duration) == ("answered", 73)
    # entry_result alone, or talk_time alone, is enough
    assert parse({**summary, "talk_time": 0}).status == "answered"
    assert parse({**summary, "entry_result": 0}).status == "answered"


def test_numbers_may_be_integers_and_times_strings() -> None:
    summary = {
        **scenario("answered")[-1],
        "from": {"number": 79161234567},
        "to": {"extension": 101},
        "talk_time": "1765090808",
        "end_time": "1765090881",
        "entry_result": "1",
        "call_direction": "2",
    }
    event = parse(summary)
    assert (event.to_number, event.duration, event.direction, event.extension) == (None, 73, Direction.OUTBOUND, None)
    event = parse({**summary, "call_direction": 1, "entry_result": 0, "talk_time": 0})
    assert (event.from_number, event.extension, event.status) == ("79161234567", "101", "no-answer")


@pytest.mark.parametrize(
    ("json_field", "field"),
    [
        ('{"call_state": "Appeared"}', "entry_id"),
        ('{"entry_id": "e1", "call_state": "Ringing"}', "call_state"),
        ('{"entry_id": "e1", "talk_time": "soon"}', "talk_time"),
        ('{"entry_id": "e1", "talk_time": true}', "talk_time"),
        ('{"entry_id": "e1", "entry_result": 2}', "entry_result"),
        ('{"entry_id": "", "end_time": 1}', "entry_id"),
        ('{"entry_id": "e\\u0000", "end_time": 1}', "entry_id"),
        ('{"entry_id": "e1", "end_time": 1, "from": {"number": ["1"]}}', "from"),
        ('{"entry_id": "e1", "end_time": 1, "to": "101"}', "to"),
        ('{"entry_id": "e1"}', None),  # no kind of event
    ],
)
def test_a_bad_event_names_its_field(json_field: str, field: str | None) -> None:
    with pytest.raises(ValidationError) as raised:
        parse(json_field)  # type: ignore[arg-type]  # form() takes the json string as it is
    messages = raised.value.messages
    assert isinstance(messages, dict) and "json" in messages
    if field is not None:
        assert field in messages["json"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"vpbx_api_key=k&sign=s", "Missing data"),
        (b"json=%5B1%5D", "JSON object"),
        (b"json=%7Bnope", "Not valid JSON"),
    ],
)
def test_a_form_without_an_event_is_a_validation_error(body: bytes, message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        SOURCES.pbx["mango"].parse(body, {})
    assert message in str(raised.value.messages)


# --- the signature --------------------------------------------------------------------------------


def configured(base: Settings | None = None) -> Settings:
    settings = base or Settings(database_url="sqlite://", inbound_token="inbound-token")
    return settings.with_overrides(vendor={"MANGO_API_KEY": API_KEY, "MANGO_API_SALT": API_SALT})


def request(headers: dict[str, str] | None = None, query: dict[str, str] | None = None) -> HookRequest:
    return HookRequest("POST", headers or {"Content-Type": "application/x-www-form-urlencoded"}, query or {})


SCHEME = mango.MangoSignature()


def verify(body: bytes, settings: Settings | None = None) -> str:
    return SCHEME.verify(request(), body, settings or configured(), "mango").scheme


def test_the_sign_is_mangos_formula_sha256_of_key_json_salt() -> None:
    # Mango's VPBX API manual: sign = sha256(vpbx_api_key + json + vpbx_api_salt), lowercase hex
    payload = '{"entry_id":"MToxMDAx","call_state":"Appeared"}'
    expected = hashlib.sha256(f"{API_KEY}{payload}{API_SALT}".encode()).hexdigest()
    assert mango.sign(API_KEY, payload, API_SALT) == expected
    assert mango.sign("key", "{}", "salt") == "6a591005f93c3d5080524c57ebe649861d4ac51865ee447be2031ae531acb3e8"


def test_a_signed_event_is_accepted() -> None:
    for name in ("answered", "queue", "recording"):
        for event in scenario(name):
            assert verify(form(event)) == "mango-sign"
    # Cyrillic in the json: signed over its UTF-8 bytes as Mango sends them
    assert verify(form({**scenario("answered")[0], "to": {"extension": "101", "acd_group": "Продажи"}})) == "mango-sign"
    # an uppercase hex sign is the same sign
    payload = json.dumps(scenario("busy")[0])
    assert verify(form(payload, sign=mango.sign(API_KEY, payload, API_SALT).upper())) == "mango-sign"


@pytest.mark.parametrize(
    "body",
    [
        # the json changed after signing (another entry_id, a longer call)
        urlencode(
            {
                "vpbx_api_key": API_KEY,
                "sign": mango.sign(API_KEY, '{"entry_id":"a","end_time":1}', API_SALT),
                "json": '{"entry_id":"b","end_time":1}',
            }
        ).encode(),
        form(scenario("answered")[0], salt="guessed-salt"),  # forged: another salt
        form(scenario("answered")[0], salt="s4lt-before-rotation"),  # stale: the salt before it was rotated
        form(scenario("answered")[0], key="other-key"),  # another VPBX's key, signed with its own key
        form(scenario("answered")[0], sign=""),
        form(scenario("answered")[0], sign="0" * 64),
        b"vpbx_api_key=" + API_KEY.encode() + b"&json=%7B%7D",  # no sign
        urlencode({"sign": mango.sign(API_KEY, "{}", API_SALT), "json": "{}"}).encode(),  # no key
        b"",
        b"\xff\xfe",
    ],
)
def test_a_forged_or_stale_sign_is_refused(body: bytes) -> None:
    with pytest.raises(AuthFailure) as raised:
        verify(body)
    assert (raised.value.status, raised.value.code) == (401, "bad_signature")


def test_the_key_in_the_form_must_be_ours_even_when_the_sign_holds_for_it() -> None:
    payload = json.dumps(scenario("answered")[0])
    body = urlencode({"vpbx_api_key": "other", "sign": mango.sign("other", payload, API_SALT), "json": payload})
    with pytest.raises(AuthFailure):
        verify(body.encode())


def test_the_scheme_needs_both_settings_and_leaves_the_token_to_the_token_check() -> None:
    base = Settings(database_url="sqlite://", inbound_token="inbound-token")
    assert SCHEME.configured(configured(base), "mango")
    assert not SCHEME.configured(base.with_overrides(vendor={"MANGO_API_KEY": API_KEY}), "mango")
    assert not SCHEME.configured(base.with_overrides(vendor={"MANGO_API_SALT": API_SALT}), "mango")
    assert SCHEME.present(request())
    assert not SCHEME.present(request({"Authorization": "Bearer inbound-token"}))
    assert not SCHEME.present(request(query={"token": "inbound-token"}))
    signatures = SOURCES.pbx["mango"].signatures
    # configured: an unsigned request is checked by the sign (read from the body) ...
    assert authenticate_before_body(configured(base), request(), "mango", signatures=signatures) is signatures[0]
    # ... and the bearer and ?token= of contract §4 still work
    bearer = request({"Authorization": "Bearer inbound-token"})
    assert authenticate_before_body(configured(base), bearer, "mango", signatures=signatures).scheme == "bearer"  # type: ignore[union-attr]
    token = request(query={"token": "inbound-token"})
    assert authenticate_before_body(base, token, "mango", signatures=signatures).scheme == "query-token"  # type: ignore[union-attr]
    # not configured: no sign is asked for, the token is
    with pytest.raises(AuthFailure):
        authenticate_before_body(base, request(), "mango", signatures=signatures)


def test_a_connection_check_and_dtmf_are_answered_and_not_stored() -> None:
    settings = configured()
    assert mango.answer(request(), b"", settings) is not None
    dtmf = form({"entry_id": "e1", "call_id": "c1", "dtmf": "1", "seq": 1, "timestamp": 1765090800})
    assert mango.answer(request(), dtmf, settings) is not None
    for event in scenario("queue") + scenario("recording"):
        assert mango.answer(request(), form(event), settings) is None


# --- hostile bodies -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
KEYS = [
    "entry_id",
    "call_id",
    "call_state",
    "location",
    "from",
    "to",
    "seq",
    "timestamp",
    "disconnect_reason",
    "call_direction",
    "line_number",
    "create_time",
    "forward_time",
    "talk_time",
    "end_time",
    "entry_result",
    "recording_id",
    "recording_state",
    "completion_code",
]
fixture_events = [
    event for name in ("answered", "transfer", "queue", "outbound", "recording") for event in scenario(name)
]


def _accepts_or_names_a_field(body: bytes) -> None:
    try:
        event = SOURCES.pbx["mango"].parse(body, {})
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages
        return
    assert isinstance(event, CallEvent)
    assert event.call_id and event.event in ("started", "answered", "finished", "recording")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=300))
def test_arbitrary_bytes_are_an_event_or_a_validation_error(body: bytes) -> None:
    _accepts_or_names_a_field(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=json_values)
def test_arbitrary_json_is_an_event_or_a_validation_error(payload: Any) -> None:
    _accepts_or_names_a_field(form(json.dumps(payload)))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(fixture_events),
    changes=st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4),
    party=st.dictionaries(st.sampled_from(["number", "extension", "line_number"]), json_values, max_size=3),
)
def test_mutated_events_are_an_event_or_a_validation_error(
    base: dict[str, Any], changes: dict[str, Any], party: dict[str, Any]
) -> None:
    _accepts_or_names_a_field(form(json.dumps({**base, **changes})))
    _accepts_or_names_a_field(form(json.dumps({**base, "from": party, "to": party})))

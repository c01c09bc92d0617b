"""The generic PBX event's fast path (msgspec) agrees with its marshmallow schema, the contract.

`parse_generic_body` lets msgspec take the common valid event and hands everything else to the
schema. The fast path may decline what the schema accepts (the schema then loads it), but must
never accept what the schema refuses nor read a field differently: these tests look for both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, get_args

import msgspec
import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.events import CallEvent
from b24scribe.transcript import Direction
from schemas import pbx_events
from schemas.pbx_events import (
    GENERIC_CALL_EVENT,
    DirectionName,
    _GenericCallEventFast,
    _parse_generic_fast,
    parse_generic,
    parse_generic_body,
)
from schemas.source import load_json
from tests.conftest import auth
from tests.fast_paths import HOSTILE_BODIES, HOSTILE_TEXT, assert_fast_path_agrees, changed, texts
from tests.test_pbx_flow import FINISHED

TYPICAL = {**FINISHED, "user_id": 7}  # every field of the schema


def outcome(parse: Callable[[bytes], CallEvent], body: bytes) -> CallEvent | dict[str, Any]:
    """What a parser makes of a body: the event, or the error messages."""
    try:
        return parse(body)
    except ValidationError as error:
        return error.messages if isinstance(error.messages, dict) else {"_body": error.messages}


def by_schema(body: bytes) -> CallEvent | dict[str, Any]:
    """What the contract makes of a body."""
    return outcome(lambda raw: parse_generic(load_json(raw)), body)


# Values the schema accepts, and, per field, values at or past its edges.
VALID: dict[str, st.SearchStrategy[Any]] = {
    "event": st.sampled_from(pbx_events.EVENTS),
    "call_id": texts(1, 2, 127, 128),
    "direction": st.sampled_from(get_args(DirectionName)),
    "from": texts(0, 1, 63, 64),
    "to": texts(0, 64),
    "extension": texts(1, 64),
    "user_id": st.integers(min_value=1, max_value=2**31 - 1),
    "started_at": st.one_of(
        st.sampled_from(["2026-11-25T10:20:30+01:00", "2026-11-25 10:20:30+0100", "2026-11-25T10:20:30Z"]),
        st.sampled_from([" 1700000000.123456 ", "1700000000", 1700000000, 1700000000.5]),
        st.integers(min_value=-(10**10), max_value=10**10),
    ),
    "duration": st.integers(min_value=0, max_value=604_800),
    "status": st.sampled_from(pbx_events.STATUSES),
    "recording_url": st.sampled_from(["https://pbx.example/r.wav", "http://pbx/r.wav", "http://10.0.0.5:8088/r?id=1"]),
    "line": texts(0, 64),
}
EDGES: dict[str, st.SearchStrategy[Any]] = {
    "event": st.sampled_from(["finished", "call.ended", "CALL.STARTED", "call.started "]),
    "call_id": st.one_of(texts(0, 129), HOSTILE_TEXT, st.sampled_from(["a\u2028b", "\u200b"])),
    "direction": st.sampled_from(["Inbound", "in", ""]),
    "from": st.one_of(texts(65, 66), HOSTILE_TEXT),
    "to": st.one_of(texts(65), HOSTILE_TEXT),
    "extension": st.one_of(texts(65), HOSTILE_TEXT),
    "user_id": st.sampled_from([0, -1, "5", " 5", 5.0, 5.5, "x", 2**31, 2**70, 2**31 - 1]),
    "started_at": st.sampled_from(
        ["2026-11-25T10:20:30", "17000000001234", "yesterday", 1e20, -1e18, "2026-13-01T00:00+00:00"]
    ),
    "duration": st.sampled_from([-1, "73", 73.0, 73.5, "73s", 604_801, 2**70]),
    "status": st.sampled_from(["ANSWER", "congestion", "Answered", ""]),
    "recording_url": st.sampled_from(
        ["ftp://pbx/r.wav", "pbx/r.wav", "https://", "http://a b/r.wav", "http://pbx/r\x00.wav", "http://pbx/\ud800"]
    ),
    "line": st.one_of(texts(65), HOSTILE_TEXT),
}
REQUIRED = ("event", "call_id")


def payloads() -> st.SearchStrategy[dict[str, Any]]:
    """A valid event, then nothing, or one to three fields edged, junked, dropped, or an unknown one added."""
    return changed(VALID, EDGES, REQUIRED, ("from_", "callId", "Event", "extra"), most_changes=3)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads(), st.booleans())
def test_the_fast_path_never_accepts_what_the_schema_refuses_or_reads_it_differently(
    payload: dict[str, Any], ensure_ascii: bool
) -> None:
    body = json.dumps(payload, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    assert_fast_path_agrees(body, _parse_generic_fast, lambda raw: outcome(parse_generic_body, raw), by_schema)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)))
def test_arbitrary_bytes_are_never_taken_by_the_fast_path_unless_the_schema_agrees(body: bytes) -> None:
    assert_fast_path_agrees(body, _parse_generic_fast, lambda raw: outcome(parse_generic_body, raw), by_schema)


@pytest.mark.parametrize(
    "body",
    [
        b'{"event": "call.started", "call_id": "a", "call_id": "b"}',  # a repeated key: the last wins in both
        b'\xef\xbb\xbf{"event": "call.started", "call_id": "a"}',  # a UTF-8 BOM
        b'{"event": "call.started", "call_id": "\\ud800"}',  # a lone surrogate
        b'{"event": "call.started", "call_id": "a", "duration": NaN}',
        b'{"event": "call.started", "call_id": "a", "user_id": 1e400}',
        b'{"event": "call.started", "call_id": "a"} trailing',
        b'{"event": "call.started", "call_id": "1700000000.\xff"}',  # not UTF-8 inside a string
        b'{"event": "call.started", "call_id": "\xed\xa0\x80"}',  # an encoded surrogate
        b'{"event": "call.started", "call_id": "a\\u0000b"}',
        b'{"event": "call.started", "call_id": "a", "from": "\\u0085"}',
        b'{"event": "call.started", "call_id": "a", "user_id": ' + b"9" * 5000 + b"}",
        b'{"event": "call.finished", "call_id": "a", "duration": 604801}',
        b'{"event": "call.started", "call_id": "a", "user_id": 2147483648}',
        *HOSTILE_BODIES,
    ],
)
def test_json_corner_cases_end_as_the_schema_says(body: bytes) -> None:
    assert_fast_path_agrees(body, _parse_generic_fast, lambda raw: outcome(parse_generic_body, raw), by_schema)


@pytest.mark.parametrize(
    "payload",
    [
        TYPICAL,
        {"event": "call.started", "call_id": "1700000000.123", "from": "+15551234567", "to": "101"},
        {"event": "call.finished", "call_id": "x", "duration": 0, "status": "no-answer", "started_at": 1700000000},
    ],
)
def test_typical_events_take_the_fast_path(payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    assert _parse_generic_fast(body) == by_schema(body)
    assert isinstance(_parse_generic_fast(body), CallEvent)


def test_the_fast_path_knows_exactly_the_schemas_fields_and_values() -> None:
    schema_keys = {field.data_key or name for name, field in GENERIC_CALL_EVENT.fields.items()}
    assert set(_GenericCallEventFast.__struct_encode_fields__) == schema_keys
    assert set(get_args(DirectionName)) == {direction.value for direction in Direction}
    decoded = msgspec.json.decode(json.dumps(TYPICAL).encode(), type=_GenericCallEventFast)
    assert decoded.from_ == TYPICAL["from"]


@pytest.mark.parametrize("started_at", [1e20, -1e18, 1e300])
def test_a_time_out_of_range_is_a_422_naming_started_at_not_a_crash(client: FlaskClient, started_at: Any) -> None:
    event = {"event": "call.started", "call_id": "far-future", "started_at": started_at}
    response = client.post("/hooks/pbx/generic", json=event, headers=auth())
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.json is not None
    assert "started_at" in json.dumps(response.json)

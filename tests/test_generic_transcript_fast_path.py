"""The generic transcript's fast path (msgspec) agrees with its marshmallow schemas, the contract.

`load` lets msgspec take the common valid callback and hands everything else to the schemas. The
fast path may decline what the schemas accept (they then load it), but must never accept what they
refuse nor read a field differently: these tests look for both.
"""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.transcript import Side
from bench.common import generic_transcript
from schemas.generic_transcript import (
    GENERIC_TRANSCRIPT,
    GenericSegmentSchema,
    SideName,
    _GenericTranscriptFast,
    _load_fast,
    _SegmentFast,
    load,
)
from schemas.source import load_json
from tests.fast_paths import HOSTILE_BODIES, HOSTILE_TEXT, JUNK, assert_fast_path_agrees, changed, texts


def outcome(body: bytes, fast_path: bool = True) -> dict[str, Any]:
    """What a body loads to (the fast path first, or the schemas only), or the error messages."""
    try:
        return load(body) if fast_path else GENERIC_TRANSCRIPT.load(load_json(body))
    except ValidationError as error:
        return {"errors": error.messages}


def by_schema(body: bytes) -> dict[str, Any]:
    return outcome(body, fast_path=False)


SECONDS = st.one_of(st.floats(min_value=0, max_value=1e6), st.integers(min_value=0, max_value=10**6), st.just(-0.0))
SEGMENT_VALID: dict[str, st.SearchStrategy[Any]] = {
    "start": SECONDS,
    "end": SECONDS,
    "text": texts(0, 1, 20),
    "side": st.sampled_from(get_args(SideName)),
    "channel": st.integers(min_value=0, max_value=31),
    "speaker": st.one_of(texts(0, 1, 3), st.integers(min_value=-(2**70), max_value=2**70)),
}
SEGMENT_EDGES: dict[str, st.SearchStrategy[Any]] = {
    "start": st.sampled_from([-0.001, -1, "1.5", 1e300, 2**80, 604_800, 604_800.001]),
    "end": st.sampled_from([-1, "2", 1e308, 604_800, 604_801]),
    "text": st.one_of(st.sampled_from([1, None, ["a"]]), HOSTILE_TEXT),
    "side": st.sampled_from(["user", "client", "", "Agent"]),
    "channel": st.sampled_from([-1, 32, 3.0, "3", 1.5, True]),
    "speaker": st.one_of(st.sampled_from([True, 1.0, None, [], {}]), HOSTILE_TEXT),
}
ENVELOPE_VALID: dict[str, st.SearchStrategy[Any]] = {
    "cost": st.one_of(st.floats(min_value=0, max_value=1e6), st.integers(min_value=0, max_value=10**6)),
    "cost_currency": texts(0, 3, 50),
    "job_id": texts(1, 128),
    "pbx": texts(1, 32),
    "call": texts(1, 128),
    "b24_call_id": texts(1, 128),
}
ENVELOPE_EDGES: dict[str, st.SearchStrategy[Any]] = {
    "cost": st.sampled_from([-0.01, "0.12", 1e308, 2**80]),
    "cost_currency": st.one_of(texts(51), HOSTILE_TEXT),
    "job_id": st.one_of(texts(0, 129), HOSTILE_TEXT),
    "pbx": st.one_of(texts(0, 33), HOSTILE_TEXT),
    "call": st.one_of(texts(0, 129), HOSTILE_TEXT),
    "b24_call_id": st.one_of(texts(0, 129), HOSTILE_TEXT),
}


UNKNOWN = ("Start", "words", "confidence", "segments_")


@st.composite
def callbacks(draw: st.DrawFn) -> dict[str, Any]:
    segments = draw(st.lists(changed(SEGMENT_VALID, SEGMENT_EDGES, ("start", "end", "text"), UNKNOWN), max_size=4))
    for segment in segments:  # mostly ending after it starts (else every payload is refused for that)
        start, end = segment.get("start"), segment.get("end")
        if type(start) in (int, float) and type(end) in (int, float) and draw(st.integers(0, 9)):
            segment["end"] = max(start, end)
    payload = draw(changed(ENVELOPE_VALID, ENVELOPE_EDGES, (), UNKNOWN))
    if draw(st.integers(0, 9)):  # mostly present; else missing or junk
        payload["segments"] = segments
    elif draw(st.booleans()):
        payload["segments"] = draw(JUNK)
    return payload


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(callbacks(), st.booleans())
def test_the_fast_path_never_accepts_what_the_schema_refuses_or_reads_it_differently(
    payload: dict[str, Any], ensure_ascii: bool
) -> None:
    body = json.dumps(payload, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    assert_fast_path_agrees(body, _load_fast, outcome, by_schema)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)))
def test_arbitrary_bytes_are_never_taken_by_the_fast_path_unless_the_schema_agrees(body: bytes) -> None:
    assert_fast_path_agrees(body, _load_fast, outcome, by_schema)


SEGMENT = '{"start": 0.5, "end": 1.5, "text": "Hello"'
VALID_SEGMENT = {"start": 0.5, "end": 1.5, "text": "Hello", "side": "User", "channel": 1, "speaker": "A"}
EDGE_VALUES: dict[str, list[Any]] = {
    "start": [-0.001, -1, "1.5", 1e300, 2**80, True, None],
    "end": [-1, "2", 1e308, 0.4999, False, 604_800, 604_800.5],
    "text": [1, None, ["a"], "", "a\x00b", "\ud800", "\x85"],
    "side": ["user", "client", "", "Agent", None],
    "channel": [-1, 31, 32, 3.0, "3", 1.5, True, None],
    "speaker": [True, 1.0, None, [], {}, "", 0, -5, 2**70, "\x00", "\udfff"],
}


@pytest.mark.parametrize(("name", "value"), [(name, value) for name, values in EDGE_VALUES.items() for value in values])
def test_each_segment_field_at_its_edges_ends_as_the_schema_says(name: str, value: Any) -> None:
    for payload in ({"segments": [{**VALID_SEGMENT, name: value}]}, {"segments": [{**VALID_SEGMENT, name: value}] * 2}):
        assert_fast_path_agrees(json.dumps(payload).encode(), _load_fast, outcome, by_schema)


@pytest.mark.parametrize(
    "body",
    [
        b'{"segments": [' + SEGMENT.encode() + b', "text": "again"}]}',  # a repeated key: the last wins in both
        b'\xef\xbb\xbf{"segments": [' + SEGMENT.encode() + b"}]}",  # a UTF-8 BOM
        b'{"segments": [' + SEGMENT.encode() + b', "speaker": "\\ud800"}]}',  # a lone surrogate
        b'{"segments": [{"start": NaN, "end": 1, "text": "x"}]}',
        b'{"segments": [{"start": 0, "end": Infinity, "text": "x"}]}',
        b'{"segments": [{"start": 0, "end": 1e400, "text": "x"}]}',
        b'{"segments": [{"start": 2, "end": 1, "text": "x"}]}',  # ends before it starts
        b'{"segments": [' + SEGMENT.encode() + b"}]} trailing",
        b"[]",
        b'{"segments": []}',
        b'{"segments": [' + SEGMENT.encode() + b', "text": "caf\xe9"}]}',  # not UTF-8 inside a string
        b'{"segments": [' + SEGMENT.encode() + b'}], "job_id": "\xed\xa0\x80"}',  # an encoded surrogate
        b'{"segments": [' + SEGMENT.encode() + b'}], "call": "a\\u0000b", "pbx": "x"}',
        b'{"segments": [' + SEGMENT.encode() + b', "channel": ' + b"3" * 5000 + b"}]}",
        *HOSTILE_BODIES,
    ],
)
def test_json_corner_cases_end_as_the_schema_says(body: bytes) -> None:
    assert_fast_path_agrees(body, _load_fast, outcome, by_schema)


ENVELOPE_EDGE_VALUES: dict[str, list[Any]] = {
    "cost": [-0.01, "0.12", 0, 2**80, None, True],
    "cost_currency": ["x" * 50, "é" * 51, "", None, 1, "US\x00", "\ud800"],
    "job_id": ["", "j" * 128, "☎" * 129, None, 7, "j\x00", "j\u2028", "\udfff"],
    "pbx": ["", "p" * 32, "p" * 33, None, "p\x1b"],
    "call": ["", "c" * 128, "😀" * 129, None, 1700000000.5, "c\x7f", "\ud800"],
    "b24_call_id": ["", "b" * 128, "b" * 129, None, "b\x00"],
    "segments": [None, [], {}, "x", [None], [[]]],
}


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, values in ENVELOPE_EDGE_VALUES.items() for value in values]
)
def test_each_envelope_field_at_its_edges_ends_as_the_schema_says(name: str, value: Any) -> None:
    body = json.dumps({"segments": [VALID_SEGMENT], name: value}).encode()
    assert_fast_path_agrees(body, _load_fast, outcome, by_schema)


@pytest.mark.parametrize("count", [1, 30, 300])
def test_typical_callbacks_take_the_fast_path(count: int) -> None:
    body = generic_transcript(count)
    fast = _load_fast(body)
    assert fast is not None and len(fast["segments"]) == count
    assert fast == by_schema(body)


def test_the_fast_path_knows_exactly_the_schemas_fields_and_values() -> None:
    assert set(_GenericTranscriptFast.__struct_fields__) == set(GENERIC_TRANSCRIPT.fields)
    assert set(_SegmentFast.__struct_fields__) == set(GenericSegmentSchema().fields)
    assert set(get_args(SideName)) == {side.value for side in Side}

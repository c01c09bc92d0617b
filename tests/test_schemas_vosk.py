"""Vosk results, one list per channel posted by the user's script, become Bitrix24 MESSAGES."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.messages import SideRules, build_messages
from b24scribe.transcript import CallReference, Segment, Transcript
from schemas import vosk
from tests.test_vendor_properties import (
    PROPERTY_SETTINGS,
    Payload,
    assert_bitrix24_accepts,
    json_values,
    mutated,
    side_rules,
    timed,
    word_text,
)

FIXTURES = Path(__file__).parent / "fixtures" / "vosk"
CHANNEL_0 = {"channel": "0"}
CHANNEL_1 = {"channel": "1"}


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def encode(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def errors_of(body: Any, query: dict[str, str] | None = None) -> Any:
    with pytest.raises(ValidationError) as caught:
        vosk.parse(encode(body), CHANNEL_1 if query is None else query)
    return caught.value.messages


def segments_of(body: Any, query: dict[str, str] = CHANNEL_1) -> list[Segment]:
    transcript = vosk.parse(encode(body), query).transcript
    assert transcript is not None
    return transcript.segments


def test_one_channels_list_gives_one_segment_per_non_empty_result() -> None:
    result = vosk.parse(fixture("channel1.json"), CHANNEL_1)

    assert result.status == "completed"
    assert result.vendor_job_id is None  # retries are told apart by their bytes
    assert result.reference == CallReference()
    assert result.transcript is not None
    assert result.transcript.segments == [
        Segment(0.12, 1.53, "good afternoon acme support", channel=1),
        Segment(4.02, 5.58, "what's the order number", channel=1),
    ]  # the final {"text": ""} is dropped
    assert build_messages(result.transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "good afternoon acme support"},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "what's the order number"},
    ]


def test_both_channels_together_make_the_call() -> None:
    segments = segments_of(fixture("channel0.json"), CHANNEL_0) + segments_of(fixture("channel1.json"))
    assert build_messages(Transcript(segments=segments), SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "good afternoon acme support"},
        {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "hi i'm calling about my order"},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "what's the order number"},
    ]


def test_without_the_channel_in_the_url_the_list_is_refused_saying_what_to_add() -> None:
    assert errors_of(fixture("channel1.json"), {}) == {"channel": [vosk.CHANNEL_REQUIRED]}
    assert segments_of([{"text": ""}], {}) == []  # a silent channel names nobody, and needs nobody


def test_one_result_alone_partials_alternatives_and_speaker_vectors() -> None:
    first = fixture_json("channel1.json")[0]
    assert segments_of(first) == [Segment(0.12, 1.53, "good afternoon acme support", channel=1)]

    alternatives = {"alternatives": [{"confidence": 212.3, **first}, {"confidence": 180.0, "result": [], "text": ""}]}
    with_speaker = {**first, "spk": [0.1, -0.4, 0.9], "spk_frames": 153}
    partial = {"partial": "good after"}
    assert segments_of([partial, alternatives, with_speaker, {"text": ""}]) == [
        Segment(0.12, 1.53, "good afternoon acme support", channel=1),
        Segment(0.12, 1.53, "good afternoon acme support", channel=1),
    ]


def test_a_result_without_text_takes_its_words() -> None:
    first = fixture_json("channel1.json")[0]
    del first["text"]
    assert segments_of([first]) == [Segment(0.12, 1.53, "good afternoon acme support", channel=1)]


def test_text_without_word_times_is_refused_saying_set_words() -> None:
    assert errors_of([{"text": "good afternoon"}]) == {0: {"result": [vosk._WORDS_REQUIRED]}}


def test_broken_results_are_named_by_path() -> None:
    body = fixture_json("channel1.json")
    body[0]["result"][0]["start"] = "0.12"
    body[1]["result"][-1]["end"] = 4.0  # before the first word's start, 4.02
    body[2] = "text"

    assert errors_of(body) == {
        0: {"result": {0: {"start": ["Not a valid number of seconds."]}}},
        1: {"result": {3: {"end": ["Must not be before the first word's start."]}}},
        2: ["Not a valid object."],
    }
    assert errors_of({"text": 5}) == {"text": ["Not a valid string."]}
    assert errors_of(b'"hello"') == {"_schema": ["The body must be a JSON list of Vosk results (or one result)."]}
    assert errors_of(b"[1,", {}) == {"_schema": ["The body is not valid JSON (JSONDecodeError)."]}


def test_the_channel_must_be_0_or_1() -> None:
    assert "channel" in errors_of(fixture("channel1.json"), {"channel": "2"})


# --- properties (contract §6) ---------------------------------------------------------------------


@st.composite
def vosk_payloads(draw: st.DrawFn) -> Payload:
    results: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 20))):
        words = []
        clock = 0.0
        for _ in range(draw(st.integers(0, 6))):
            start, end = draw(timed())
            start, end = max(start, clock), max(end, clock)
            clock = end
            words.append({"conf": 1.0, "start": start, "end": end, "word": draw(word_text)})
        item: dict[str, Any] = {"result": words, "text": draw(word_text)} if words else {"text": ""}
        results.append(item)
    results.append({"text": ""})
    return results, {"channel": draw(st.sampled_from("01"))}


@PROPERTY_SETTINGS
@given(payload=vosk_payloads(), rules=side_rules)
def test_valid_payloads_become_messages_bitrix24_accepts(payload: Payload, rules: SideRules) -> None:
    body, query = payload
    result = vosk.parse(encode(body), query)
    assert result.status == "completed" and result.transcript is not None
    assert {segment.channel for segment in result.transcript.segments} <= {int(query["channel"])}
    assert_bitrix24_accepts(build_messages(result.transcript, rules))


@PROPERTY_SETTINGS
@given(payload=mutated(vosk_payloads()))
def test_broken_payloads_give_field_named_errors_never_a_crash(payload: Payload) -> None:
    body, query = payload
    try:
        result = vosk.parse(encode(body), query)
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages
        return
    assert result.transcript is not None
    assert_bitrix24_accepts(build_messages(result.transcript, SideRules()))


@PROPERTY_SETTINGS
@given(body=json_values, channel=st.sampled_from(["", "0", "1"]))
def test_arbitrary_json_is_refused_by_field_not_by_crash(body: Any, channel: str) -> None:
    try:
        vosk.parse(encode(body), {"channel": channel})
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages

"""Yandex SpeechKit v2 operations, posted as SpeechKit gave them, become Bitrix24 MESSAGES."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.transcript import CallReference, Segment
from schemas import yandex
from schemas._vendor_payload import _DURATION_MESSAGE as DURATION_MESSAGE
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

FIXTURES = Path(__file__).parent / "fixtures" / "yandex"
STEREO_MESSAGES = [  # channelTag "1" is channel 0, the caller: the client on an inbound call
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "добрый день компания акме"},
    {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "здравствуйте я звоню по поводу заказа"},
    {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "назовите номер заказа"},
    {"SIDE": "Client", "START_TIME": 6, "STOP_TIME": 9, "MESSAGE": "номер 12345"},
]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def encode(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()


def errors_of(body: Any, query: dict[str, str] | None = None) -> Any:
    with pytest.raises(ValidationError) as caught:
        yandex.parse(encode(body), query or {})
    return caught.value.messages


def transcript_of(body: Any, query: dict[str, str] | None = None) -> Any:
    transcript = yandex.parse(encode(body), query or {}).transcript
    assert transcript is not None
    return transcript


def test_a_stereo_operation_gives_one_segment_per_chunk_on_its_0_based_channel() -> None:
    result = yandex.parse(fixture("operation_stereo.json"), {})

    assert result.status == "completed"
    assert result.vendor_job_id == "e03sup6d5h1qr2kvtbe5"
    assert result.reference == CallReference()
    assert result.transcript is not None
    assert result.transcript.segments[:2] == [
        Segment(0.099999999, 1.499999999, "добрый день компания акме", channel=1),  # channelTag "2"
        Segment(1.199999999, 3.599999999, "здравствуйте я звоню по поводу заказа", channel=0),
    ]
    # the chunk's text (numbers in figures), not its spelled-out words
    assert result.transcript.segments[3].text == "номер 12345"
    assert build_messages(result.transcript, SideRules()) == STEREO_MESSAGES


def test_the_response_alone_and_the_bare_chunks_read_the_same() -> None:
    operation = fixture_json("operation_stereo.json")
    expected = transcript_of(fixture("operation_stereo.json"))

    assert transcript_of(operation["response"]) == expected
    assert transcript_of(operation["response"]["chunks"]) == expected
    assert yandex.parse(encode(operation["response"]), {}).vendor_job_id is None


def test_a_failed_operation_keeps_the_message() -> None:
    result = yandex.parse(fixture("operation_failed.json"), {})

    assert result.status == "failed"
    assert result.failure_reason == "Invalid audio: the file is not in OGG_OPUS format"
    assert result.vendor_job_id == "e03k2m9q0v7tjc1h4n8d"
    coded = yandex.parse(encode({"id": "e1", "done": True, "error": {"code": 8}}), {})
    assert coded.failure_reason == "Yandex SpeechKit reported error code 8."


def test_a_mono_result_needs_the_channel_in_the_url() -> None:
    transcript = transcript_of(fixture("response_mono.json"))
    assert {segment.channel for segment in transcript.segments} == {None}  # one tag only: mono
    with pytest.raises(ValidationError) as caught:
        check_attributable(transcript)
    assert "segments" in caught.value.messages

    one_channel = transcript_of(fixture("response_mono.json"), {"channel": "1"})
    assert build_messages(one_channel, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "добрый день компания акме"},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "назовите номер заказа"},
    ]


def test_a_chunk_without_words_sits_where_its_channel_last_ended_and_empty_chunks_are_skipped() -> None:
    body = fixture_json("operation_stereo.json")
    chunks = body["response"]["chunks"]
    del chunks[2]["alternatives"][0]["words"]  # channel "2": its previous chunk ended at 1.499999999s
    chunks.append({"alternatives": [], "channelTag": "1"})
    chunks.append({"channelTag": "2"})

    segments = transcript_of(body).segments
    assert len(segments) == 4
    assert segments[2] == Segment(1.499999999, 1.499999999, "назовите номер заказа", channel=1)


def test_integer_tags_and_other_duration_forms_are_read_too() -> None:
    body = fixture_json("operation_stereo.json")
    for chunk in body["response"]["chunks"]:
        chunk["channelTag"] = int(chunk["channelTag"])
    body["response"]["chunks"][0]["alternatives"][0]["words"][0]["startTime"] = {"nanos": 100_000_000}

    assert build_messages(transcript_of(body), SideRules()) == STEREO_MESSAGES


def test_an_unfinished_operation_and_an_unknown_shape_are_refused() -> None:
    assert errors_of({"id": "e03", "done": False}) == {"done": [yandex._NOT_DONE]}
    assert errors_of({"id": "e03"}) == {"chunks": [yandex._ACCEPTED_SHAPES]}
    assert errors_of(b"1") == {"_schema": ["The body must be a JSON object or list."]}
    assert errors_of({"done": True, "response": {"chunks": {}}}) == {"response": {"chunks": ["Not a valid list."]}}


def test_broken_chunks_are_named_by_path() -> None:
    body = fixture_json("operation_stereo.json")
    chunks = body["response"]["chunks"]
    chunks[0]["channelTag"] = "0"
    chunks[1]["alternatives"][0]["text"] = None
    chunks[2]["alternatives"][0]["words"][0]["startTime"] = "4.05"
    chunks[3]["alternatives"][0]["words"][-1]["endTime"] = "1s"
    BEFORE_START = "Must not be before the first word's startTime."  # noqa: N806

    assert errors_of(body) == {
        "response": {
            "chunks": {
                0: {"channelTag": [yandex._CHANNEL_TAG]},
                1: {"alternatives": {0: {"text": ["Not a valid string."]}}},
                2: {"alternatives": {0: {"words": {0: {"startTime": [DURATION_MESSAGE]}}}}},
                3: {"alternatives": {0: {"words": {5: {"endTime": [BEFORE_START]}}}}},
            }
        }
    }


@pytest.mark.parametrize("tag", ["33", "", "1.0", "٣", True, 1.0, None])
def test_bad_channel_tags_are_refused(tag: Any) -> None:
    body = fixture_json("operation_stereo.json")
    body["response"]["chunks"][0]["channelTag"] = tag
    assert errors_of(body) == {"response": {"chunks": {0: {"channelTag": [yandex._CHANNEL_TAG]}}}}


# --- properties (contract §6) ---------------------------------------------------------------------


def _noisy(seconds: float) -> str:
    return f"{seconds:.9f}s"


@st.composite
def yandex_payloads(draw: st.DrawFn) -> Payload:
    chunks: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 15))):
        words = []
        clock = 0.0
        for _ in range(draw(st.integers(0, 5))):
            start, end = draw(timed())
            start, end = max(start, clock), max(end, clock)  # words come in order
            clock = end
            words.append({"startTime": _noisy(start), "endTime": _noisy(end), "word": draw(word_text)})
        chunk: dict[str, Any] = {"alternatives": [{"words": words, "text": draw(word_text)}]}
        chunk["channelTag"] = draw(st.sampled_from(["1", "2"]))
        chunks.append(chunk)
    chunks.append({"alternatives": [{"words": [], "text": "ok"}], "channelTag": "1"})
    chunks.append({"alternatives": [{"words": [], "text": "ok"}], "channelTag": "2"})
    return {"done": True, "id": "e03sup6d5h1qr2kvtbe5", "response": {"chunks": chunks}}, {}


@PROPERTY_SETTINGS
@given(payload=yandex_payloads(), rules=side_rules)
def test_valid_payloads_become_messages_bitrix24_accepts(payload: Payload, rules: SideRules) -> None:
    body, query = payload
    result = yandex.parse(encode(body), query)
    assert result.status == "completed" and result.transcript is not None
    check_attributable(result.transcript)
    assert_bitrix24_accepts(build_messages(result.transcript, rules))


@PROPERTY_SETTINGS
@given(payload=mutated(yandex_payloads()))
def test_broken_payloads_give_field_named_errors_never_a_crash(payload: Payload) -> None:
    body, query = payload
    try:
        result = yandex.parse(encode(body), query)
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages
        return
    if result.transcript is None:
        assert result.status == "failed" and result.failure_reason
        return
    try:
        check_attributable(result.transcript)
    except ValidationError:
        return
    assert_bitrix24_accepts(build_messages(result.transcript, SideRules()))


@PROPERTY_SETTINGS
@given(body=json_values)
def test_arbitrary_json_is_refused_by_field_not_by_crash(body: Any) -> None:
    try:
        yandex.parse(encode(body), {})
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages

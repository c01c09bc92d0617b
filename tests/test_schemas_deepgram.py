"""Deepgram calls back with its whole /v1/listen response; we read it into Bitrix24 MESSAGES."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from marshmallow import ValidationError

from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.transcript import CallReference, Segment
from schemas import deepgram

FIXTURES = Path(__file__).parent / "fixtures" / "deepgram"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def errors_of(body: Any, query: dict[str, str] | None = None) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ValidationError) as caught:
        deepgram.parse(raw, query or {})
    return caught.value.messages


def test_a_stereo_call_gives_one_segment_per_utterance_on_its_channel() -> None:
    result = deepgram.parse(fixture("multichannel_utterances.json"), {})

    assert result.status == "completed"
    assert result.vendor_job_id == "a3c51d2e-7f0b-4e21-9d8a-5b6c7d8e9f01"
    assert result.reference == CallReference(pbx="asterisk", pbx_call_id="1700000000.123")
    assert result.transcript is not None
    assert result.transcript.granularity == "segment"
    assert result.transcript.segments == [
        Segment(0.64, 2.4, "Hi, I'm calling about my order.", channel=0),
        Segment(6.72, 7.68, "It hasn't arrived.", channel=0),
        Segment(0.08, 1.44, "Good afternoon, Acme support.", channel=1),
        Segment(2.96, 5.12, "Sorry to hear that. What's the order number?", channel=1),
    ]


def test_a_stereo_call_becomes_messages_in_time_order_caller_on_channel_0() -> None:
    transcript = deepgram.parse(fixture("multichannel_utterances.json"), {}).transcript
    assert transcript is not None

    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "Client", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "User", "START_TIME": 2, "STOP_TIME": 6, "MESSAGE": "Sorry to hear that. What's the order number?"},
        {"SIDE": "Client", "START_TIME": 6, "STOP_TIME": 8, "MESSAGE": "It hasn't arrived."},
    ]


def test_without_utterances_the_diarized_words_are_grouped_by_speaker() -> None:
    result = deepgram.parse(fixture("diarized_mono_words.json"), {})

    assert result.reference == CallReference(b24_call_id="externalCall.716f1cb73def9700a23842adf9c4c568.1773130779")
    transcript = result.transcript
    assert transcript is not None
    assert transcript.granularity == "word"
    assert transcript.segments[:2] == [
        Segment(0.24, 0.48, "Good", speaker="0"),
        Segment(0.48, 0.88, "morning,", speaker="0"),
    ]
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
        {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
        {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
        {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
    ]


def test_a_single_channel_is_mono_even_though_utterances_say_channel_0() -> None:
    body = fixture_json("diarized_mono_words.json")
    words = body["results"]["channels"][0]["alternatives"][0]["words"]
    body["results"]["utterances"] = [
        {
            "start": 0.24,
            "end": 1.6,
            "channel": 0,
            "speaker": 0,
            "transcript": "Good morning, this is Anna.",
            "words": words[:5],
        }
    ]

    transcript = deepgram.parse(json.dumps(body).encode(), {}).transcript

    assert transcript is not None
    assert transcript.segments == [Segment(0.24, 1.6, "Good morning, this is Anna.", speaker="0")]


def test_a_mono_call_without_diarization_parses_but_cannot_be_attributed() -> None:
    transcript = deepgram.parse(fixture("mono_no_speakers.json"), {}).transcript
    assert transcript is not None
    assert [segment.text for segment in transcript.segments] == ["hello", "is", "anybody", "there"]

    with pytest.raises(ValidationError) as caught:
        check_attributable(transcript)
    assert "segments" in caught.value.messages


def test_channel_in_the_url_says_which_channel_the_file_held() -> None:
    transcript = deepgram.parse(fixture("mono_no_speakers.json"), {"channel": "1"}).transcript
    assert transcript is not None

    assert {segment.channel for segment in transcript.segments} == {1}
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "hello is anybody there"},
    ]


def test_an_error_body_is_a_failed_job_with_deepgrams_message() -> None:
    result = deepgram.parse(fixture("failed.json"), {})

    assert result.status == "failed"
    assert result.failure_reason == "Bad Request: failed to process audio: corrupt or unsupported data"
    assert result.vendor_job_id == "d5b1c0a4-9e8f-4d7c-b6a5-f4e3d2c1b0a9"
    assert result.transcript is None


def test_a_body_without_results_names_the_missing_field() -> None:
    body = fixture_json("multichannel_utterances.json")
    del body["results"]

    assert errors_of(body) == {"results": ["Missing data for required field."]}


def test_a_negative_word_time_names_its_path() -> None:
    body = fixture_json("diarized_mono_words.json")
    body["results"]["channels"][0]["alternatives"][0]["words"][12]["start"] = -0.5

    assert errors_of(body) == {
        "results": {
            "channels": {0: {"alternatives": {0: {"words": {12: {"start": ["Must be greater than or equal to 0."]}}}}}}
        }
    }


def test_wrong_types_in_utterances_are_each_named() -> None:
    body = fixture_json("multichannel_utterances.json")
    utterances = body["results"]["utterances"]
    utterances[0]["transcript"] = 42
    utterances[1]["end"] = "7.68"
    utterances[2]["start"] = 3.0  # after its end
    del utterances[3]["start"]

    assert errors_of(body) == {
        "results": {
            "utterances": {
                0: {"transcript": ["Not a valid string."]},
                1: {"end": ["Not a valid number of seconds."]},
                2: {"end": ["Must not be before start."]},
                3: {"start": ["Missing data for required field."]},
            }
        }
    }


def test_the_envelope_is_checked_by_marshmallow() -> None:
    body = fixture_json("multichannel_utterances.json")
    body["results"]["channels"][1]["alternatives"] = []
    body["metadata"]["request_id"] = 7

    assert errors_of(body) == {
        "metadata": {"request_id": ["Not a valid string."]},
        "results": {"channels": {1: {"alternatives": ["Shorter than minimum length 1."]}}},
    }


def test_a_body_that_is_not_a_json_object_is_refused() -> None:
    assert errors_of(b"<html>502 Bad Gateway</html>") == {"_schema": ["The body is not valid JSON (JSONDecodeError)."]}
    assert errors_of(b"[1, 2]") == {"_schema": ["The body must be a JSON object."]}


def test_an_unknown_channel_in_the_url_is_refused() -> None:
    assert errors_of(fixture("multichannel_utterances.json"), {"channel": "left"}) == {
        "channel": ["Must be 0 or 1: the one channel of the call this recording holds."]
    }


def test_vendor_registration() -> None:
    assert deepgram.VENDOR.name == "deepgram"
    assert deepgram.VENDOR.fetch is None
    assert deepgram.VENDOR.auth_header is None

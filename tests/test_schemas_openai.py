"""A script posts OpenAI's (or another Whisper's) result as is; `openai` recognises the shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from marshmallow import ValidationError

from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.transcript import Segment
from schemas import openai

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def errors_of(body: Any, query: dict[str, str] | None = None) -> Any:
    with pytest.raises(ValidationError) as caught:
        openai.parse(json.dumps(body).encode(), query or {})
    return caught.value.messages


def test_each_channel_of_a_stereo_call_is_posted_as_its_own_verbose_json() -> None:
    caller = openai.parse(fixture("openai/verbose_json_channel0.json"), {"channel": "0"})
    callee = openai.parse(fixture("openai/verbose_json_channel1.json"), {"channel": "1"})

    assert caller.status == callee.status == "completed"
    assert caller.vendor_job_id is None  # no job id: the body's hash deduplicates
    assert caller.transcript is not None and callee.transcript is not None
    assert caller.transcript.segments == [
        Segment(0.64, 2.4, " Hi, I'm calling about my order.", channel=0),
        Segment(6.72, 7.68, " It hasn't arrived.", channel=0),
    ]
    assert build_messages(caller.transcript, SideRules()) == [
        {"SIDE": "Client", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "Client", "START_TIME": 6, "STOP_TIME": 8, "MESSAGE": "It hasn't arrived."},
    ]
    # a whitespace-only segment (silence) gives no message
    assert build_messages(callee.transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "User", "START_TIME": 2, "STOP_TIME": 6, "MESSAGE": "Sorry to hear that. What's the order number?"},
    ]


def test_diarized_json_maps_speakers_by_who_spoke_first() -> None:
    transcript = openai.parse(fixture("openai/diarized_json.json"), {}).transcript
    assert transcript is not None

    assert transcript.segments[1] == Segment(2.4, 3.92, " Hello, I'd like to book a table.", speaker="B")
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
        {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
        {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
        {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
    ]


def test_word_timestamps_only_give_word_segments_and_mono_needs_a_channel() -> None:
    transcript = openai.parse(fixture("openai/verbose_json_words.json"), {}).transcript
    assert transcript is not None
    assert transcript.granularity == "word"
    with pytest.raises(ValidationError):
        check_attributable(transcript)

    transcript = openai.parse(fixture("openai/verbose_json_words.json"), {"channel": "0"}).transcript
    assert transcript is not None
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "Client", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Hello is anybody there"},
    ]


def test_whispercpp_and_fasterwhisper_shapes_are_recognised_too() -> None:
    whispercpp = openai.parse(fixture("whispercpp/stereo_diarize.json"), {}).transcript
    fasterwhisper = openai.parse(fixture("fasterwhisper/segments_list.json"), {"channel": "1"}).transcript

    assert whispercpp is not None and whispercpp.segments[0] == Segment(
        0.0, 1.44, " Good afternoon, Acme support.", channel=1
    )
    assert fasterwhisper is not None and fasterwhisper.segments[0] == Segment(
        0.0, 1.44, " Good afternoon, Acme support.", channel=1
    )


def test_an_unknown_shape_says_which_shapes_are_accepted() -> None:
    assert errors_of({"text": "hello"}) == {"segments": [openai._ACCEPTED_SHAPES]}


def test_broken_segments_are_named_by_path() -> None:
    body = json.loads(fixture("openai/diarized_json.json"))
    body["segments"][0]["start"] = -0.24
    body["segments"][1]["end"] = 1.0  # before its start
    body["segments"][2]["text"] = ["For", "how", "many?"]
    body["segments"][3]["speaker"] = {"name": "B"}

    assert errors_of(body) == {
        "segments": {
            0: {"start": ["Must be greater than or equal to 0."]},
            1: {"end": ["Must not be before start."]},
            2: {"text": ["Not a valid string."]},
            3: {"speaker": ["Not a valid string or integer."]},
        }
    }


def test_not_a_number_and_infinity_are_not_times() -> None:
    raw = b'{"segments": [{"start": NaN, "end": 1.0, "text": "a"}, {"start": 0, "end": Infinity, "text": "b"}]}'

    with pytest.raises(ValidationError) as caught:
        openai.parse(raw, {"channel": "0"})
    assert caught.value.messages == {
        "segments": {
            0: {"start": ["Not a finite number."]},
            1: {"end": ["Must be a finite number of at most 604800 seconds."]},
        }
    }


def test_vendor_registration() -> None:
    assert openai.VENDOR.name == "openai"
    assert openai.VENDOR.fetch is None

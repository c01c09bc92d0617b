"""A script posts whisper.cpp's `-oj` output; its stereo speakers are channels, "?" takes turns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from marshmallow import ValidationError

from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.transcript import UNDECIDED_SPEAKER, Segment
from schemas import whispercpp

FIXTURES = Path(__file__).parent / "fixtures" / "whispercpp"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def errors_of(body: Any) -> Any:
    with pytest.raises(ValidationError) as caught:
        whispercpp.VENDOR.parse(json.dumps(body).encode(), {})
    return caught.value.messages


def test_diarize_speakers_0_and_1_are_the_louder_stereo_channel() -> None:
    result = whispercpp.VENDOR.parse(fixture("stereo_diarize.json"), {})
    transcript = result.transcript
    assert transcript is not None

    assert result.vendor_job_id is None
    assert transcript.segments == [
        Segment(0.0, 1.44, " Good afternoon, Acme support.", channel=1),
        Segment(1.64, 3.4, " Hi, I'm calling about my order.", channel=0),
        Segment(3.4, 3.9, " Mm-hmm.", speaker=UNDECIDED_SPEAKER),
        Segment(4.16, 5.12, " What's the order number?", channel=1),
    ]
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "User", "START_TIME": 3, "STOP_TIME": 4, "MESSAGE": "Mm-hmm."},  # opposite of the previous
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
    ]


def test_tinydiarize_turns_alternate_two_speakers() -> None:
    transcript = whispercpp.VENDOR.parse(fixture("tinydiarize.json"), {}).transcript
    assert transcript is not None

    assert [segment.speaker for segment in transcript.segments] == ["A", "B", "A", "B"]
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
        {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
        {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
        {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
    ]


def test_a_mono_file_without_diarization_cannot_be_attributed_unless_the_url_names_its_channel() -> None:
    transcript = whispercpp.VENDOR.parse(fixture("mono.json"), {}).transcript
    assert transcript is not None
    with pytest.raises(ValidationError):
        check_attributable(transcript)

    transcript = whispercpp.VENDOR.parse(fixture("mono.json"), {"channel": "1"}).transcript
    assert transcript is not None
    assert transcript.segments == [Segment(0.06, 2.0, " Hello, is anybody there?", channel=1)]


def test_the_servers_verbose_json_is_accepted() -> None:
    body = {
        "task": "transcribe",
        "language": "en",
        "duration": 2.0,
        "segments": [{"start": 0.0, "end": 1.2, "text": " Hi."}],
    }

    transcript = whispercpp.VENDOR.parse(json.dumps(body).encode(), {"channel": "0"}).transcript

    assert transcript is not None and transcript.segments == [Segment(0.0, 1.2, " Hi.", channel=0)]


def test_broken_segments_are_named_by_path() -> None:
    body = json.loads(fixture("stereo_diarize.json"))
    del body["transcription"][0]["offsets"]
    body["transcription"][1]["offsets"]["to"] = -10
    body["transcription"][2]["speaker"] = 0
    body["transcription"][3]["offsets"]["to"] = 10

    assert errors_of(body) == {
        "transcription": {
            0: {"offsets": ["Missing data for required field."]},
            1: {"offsets": {"to": ["Must be greater than or equal to 0."]}},
            2: {"speaker": ["Not a valid string."]},
            3: {"offsets": {"to": ["Must not be before from."]}},
        }
    }


def test_output_without_transcription_is_refused() -> None:
    assert errors_of({"result": {"language": "en"}}) == {"transcription": ["Missing data for required field."]}

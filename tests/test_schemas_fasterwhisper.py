"""A script posts faster-whisper's segments, one file per channel (`?channel=0|1`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from marshmallow import ValidationError

from b24scribe.messages import SideRules, build_messages
from b24scribe.transcript import Segment
from schemas import fasterwhisper

FIXTURES = Path(__file__).parent / "fixtures" / "fasterwhisper"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def errors_of(body: Any, query: dict[str, str] | None = None) -> Any:
    with pytest.raises(ValidationError) as caught:
        fasterwhisper.VENDOR.parse(json.dumps(body).encode(), query or {"channel": "1"})
    return caught.value.messages


def test_a_list_of_segment_dicts_from_one_channel() -> None:
    result = fasterwhisper.VENDOR.parse(fixture("segments_list.json"), {"channel": "1"})
    transcript = result.transcript
    assert transcript is not None

    assert result.vendor_job_id is None
    assert transcript.segments == [
        Segment(0.0, 1.44, " Good afternoon, Acme support.", channel=1),
        Segment(2.96, 5.12, " Sorry to hear that. What's the order number?", channel=1),
    ]
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "User", "START_TIME": 2, "STOP_TIME": 6, "MESSAGE": "Sorry to hear that. What's the order number?"},
    ]


def test_segments_under_a_segments_key() -> None:
    transcript = fasterwhisper.VENDOR.parse(fixture("segments_object.json"), {"channel": "0"}).transcript

    assert transcript is not None
    assert transcript.segments == [Segment(0.64, 2.4, " Hi, I'm calling about my order.", channel=0)]


def test_namedtuples_dumped_as_arrays_are_read_by_position() -> None:
    transcript = fasterwhisper.VENDOR.parse(fixture("namedtuples.json"), {"channel": "1"}).transcript

    assert transcript is not None
    assert transcript.segments == [
        Segment(0.0, 1.44, " Good afternoon, Acme support.", channel=1),
        Segment(2.96, 5.12, " Sorry to hear that.", channel=1),
    ]


def test_broken_rows_are_named_by_position() -> None:
    body = [[1, 0, 0.0], [2, 0, "0.5", 1.0, " a"], [3, 0, 2.0, 1.0, " b"], {"start": 0, "end": 1}]

    assert errors_of(body) == {
        0: ["Not a valid segment: expected [id, seek, start, end, text, …]."],
        1: {2: ["Not a valid number of seconds."]},
        2: {3: ["Must not be before the start (index 2)."]},
        3: {"text": ["Missing data for required field."]},
    }


def test_an_object_without_segments_is_refused() -> None:
    assert errors_of({"language": "en"}) == {"segments": ["Missing data for required field."]}

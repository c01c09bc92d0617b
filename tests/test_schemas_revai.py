"""Rev.ai calls back with the job; we fetch its transcript and read the monologues into MESSAGES."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from marshmallow import ValidationError

from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.transcript import CallReference, Segment
from schemas import revai

FIXTURES = Path(__file__).parent / "fixtures" / "revai"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def errors_of(parse: Any, body: Any, query: dict[str, str] | None = None) -> Any:
    with pytest.raises(ValidationError) as caught:
        parse(json.dumps(body).encode(), query or {})
    return caught.value.messages


def test_a_transcribed_job_asks_for_its_transcript_and_names_the_call_in_metadata() -> None:
    result = revai.parse(fixture("callback_transcribed.json"), {})

    assert result.status == "fetch"
    assert result.fetch_id == "Umx5c6F7pH7r"
    assert result.vendor_job_id == "Umx5c6F7pH7r"
    assert result.reference == CallReference(pbx="asterisk", pbx_call_id="1700000000.123")


def test_the_fetch_asks_for_revs_json_transcript_with_the_bearer_key() -> None:
    fetch = revai.VENDOR.fetch
    assert fetch is not None

    url = fetch.default_api_url + fetch.path.format(id="Umx5c6F7pH7r")
    assert url == "https://api.rev.ai/speechtotext/v1/jobs/Umx5c6F7pH7r/transcript"
    assert fetch.headers("tok") == {
        "Authorization": "Bearer tok",
        "Accept": "application/vnd.rev.transcript.v1.0+json",
    }
    assert revai.VENDOR.auth_header is None  # Rev.ai sends "Authorization: Bearer <inbound token>"


def test_a_failed_job_keeps_revs_failure_detail() -> None:
    result = revai.parse(fixture("callback_failed.json"), {})

    assert result.status == "failed"
    assert result.failure_reason == "Failed to download media file. Please check your url and file type"
    assert result.vendor_job_id == "Ojf2W3mNqC8s"
    assert result.reference == CallReference(b24_call_id="externalCall.716f1cb73def9700a23842adf9c4c568.1773130779")


def test_free_text_metadata_names_no_call() -> None:
    body = fixture_json("callback_transcribed.json")
    body["job"]["metadata"] = "InternalOrderNumber 123456789"

    assert revai.parse(json.dumps(body).encode(), {}).reference.is_empty()


def test_a_job_still_in_progress_is_refused_by_name() -> None:
    body = fixture_json("callback_transcribed.json")
    body["job"]["status"] = "in_progress"

    assert errors_of(revai.parse, body) == {
        "job": {"status": ["Must be transcribed or failed: the job is in_progress."]}
    }


def test_channel_transcripts_map_speakers_to_channels_when_the_url_says_so() -> None:
    result = revai.parse_transcript(fixture("transcript_stereo.json"), {"speaker_channels_count": "2"})
    transcript = result.transcript
    assert transcript is not None

    assert result.vendor_job_id is None  # the transcript names no job: the callback's id stays
    assert transcript.segments == [
        Segment(0.08, 1.44, "Good afternoon, Acme support.", channel=1, speaker="1"),
        Segment(1.64, 3.4, "Hi, I'm calling about my order.", channel=0, speaker="0"),
        Segment(4.16, 5.12, "What's the order number?", channel=1, speaker="1"),
    ]
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
    ]


def test_without_the_channel_hint_monologue_speakers_are_diarized_voices() -> None:
    transcript = revai.parse_transcript(fixture("transcript_stereo.json"), {}).transcript
    assert transcript is not None

    assert [(segment.channel, segment.speaker) for segment in transcript.segments] == [
        (None, "1"),
        (None, "0"),
        (None, "1"),
    ]


def test_text_elements_without_space_elements_are_still_spaced() -> None:
    transcript = revai.parse_transcript(fixture("transcript_diarized.json"), {}).transcript
    assert transcript is not None

    assert transcript.segments == [
        Segment(0.5, 2.85, "Hello World.", speaker="1"),
        Segment(3.0, 7.78, "monologues are a block of text.", speaker="2"),
    ]
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Hello World."},
        {"SIDE": "Client", "START_TIME": 3, "STOP_TIME": 8, "MESSAGE": "monologues are a block of text."},
    ]


def test_an_undiarized_transcript_names_one_speaker_and_cannot_be_attributed() -> None:
    transcript = revai.parse_transcript(fixture("transcript_skip_diarization.json"), {}).transcript
    assert transcript is not None
    assert transcript.segments == [Segment(0.06, 2.0, "Hello, is anybody there?")]

    with pytest.raises(ValidationError) as caught:
        check_attributable(transcript)
    assert "segments" in caught.value.messages


def test_a_monologue_of_tags_only_gives_no_segment() -> None:
    body = {"monologues": [{"speaker": 0, "elements": [{"type": "unknown", "value": "<laugh>"}]}]}

    transcript = revai.parse_transcript(json.dumps(body).encode(), {"channel": "1"}).transcript

    assert transcript is not None and transcript.segments == []


def test_broken_elements_are_named_by_path() -> None:
    body = fixture_json("transcript_stereo.json")
    del body["monologues"][0]["elements"][2]["ts"]
    body["monologues"][1]["elements"][0]["end_ts"] = -1
    body["monologues"][2]["speaker"] = "agent"

    assert errors_of(revai.parse_transcript, body) == {
        "monologues": {
            0: {"elements": {2: {"ts": ["Missing data for required field."]}}},
            1: {"elements": {0: {"end_ts": ["Must be greater than or equal to 0."]}}},
            2: {"speaker": ["Not a valid integer."]},
        }
    }


def test_a_transcript_without_monologues_is_refused() -> None:
    assert errors_of(revai.parse_transcript, {"elements": []}) == {"monologues": ["Missing data for required field."]}


def test_a_bad_speaker_channels_count_is_refused_when_the_callback_arrives() -> None:
    assert errors_of(revai.parse, fixture_json("callback_transcribed.json"), {"speaker_channels_count": "two"}) == {
        "speaker_channels_count": ["Must be an integer from 1 to 8, as given to Rev.ai."]
    }

"""AssemblyAI's webhook names a transcript; we fetch it and read it into Bitrix24 MESSAGES."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from marshmallow import ValidationError

from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.transcript import Segment
from schemas import assemblyai

FIXTURES = Path(__file__).parent / "fixtures" / "assemblyai"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def transcript_errors(body: Any, query: dict[str, str] | None = None) -> Any:
    with pytest.raises(ValidationError) as caught:
        assemblyai.parse_transcript(json.dumps(body).encode(), query or {})
    return caught.value.messages


def test_a_completed_webhook_asks_for_the_transcript_to_be_fetched() -> None:
    result = assemblyai.parse(fixture("webhook_completed.json"), {"pbx": "asterisk", "call": "1700000000.123"})

    assert result.status == "fetch"
    assert result.fetch_id == "5552493-16d8-42d8-8feb-c2a16b56f6e8"
    assert result.vendor_job_id == "5552493-16d8-42d8-8feb-c2a16b56f6e8"
    assert result.reference.is_empty()  # the URL names the call: AssemblyAI has no metadata field


def test_an_error_webhook_is_fetched_too_because_only_the_transcript_says_why() -> None:
    result = assemblyai.parse(fixture("webhook_error.json"), {})

    assert result.status == "fetch"
    assert result.fetch_id == "6a1e07c2-93b4-4f2f-9b1d-2f0c5e7d8a91"


def test_the_fetch_goes_to_the_v2_transcript_with_the_api_key() -> None:
    fetch = assemblyai.VENDOR.fetch
    assert fetch is not None

    assert fetch.default_api_url + fetch.path.format(id="abc") == "https://api.assemblyai.com/v2/transcript/abc"
    assert fetch.headers("key-123")["authorization"] == "key-123"
    assert fetch.parse is assemblyai.parse_transcript
    assert assemblyai.VENDOR.auth_header == "X-B24scribe-Token"


def test_a_multichannel_transcript_maps_channel_1_to_our_channel_0() -> None:
    result = assemblyai.parse_transcript(fixture("transcript_multichannel.json"), {})

    assert result.status == "completed"
    assert result.vendor_job_id == "5552493-16d8-42d8-8feb-c2a16b56f6e8"
    transcript = result.transcript
    assert transcript is not None
    assert transcript.segments == [
        Segment(0.08, 1.44, "Good afternoon, Acme support.", channel=1, speaker="2"),
        Segment(1.64, 3.4, "Hi, I'm calling about my order.", channel=0, speaker="1"),
        Segment(4.16, 5.12, "What's the order number?", channel=1, speaker="2"),
    ]
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
    ]


def test_a_diarized_transcript_maps_speakers_by_who_spoke_first() -> None:
    transcript = assemblyai.parse_transcript(fixture("transcript_diarized.json"), {}).transcript
    assert transcript is not None

    assert transcript.segments[0] == Segment(0.24, 1.6, "Good morning, this is Anna.", speaker="A")
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
        {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
        {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
        {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
    ]


def test_without_utterances_the_words_are_used_and_a_mono_file_cannot_be_attributed() -> None:
    transcript = assemblyai.parse_transcript(fixture("transcript_mono_words.json"), {}).transcript
    assert transcript is not None
    assert transcript.granularity == "word"
    assert transcript.segments[0] == Segment(0.06, 0.56, "Hello,")

    with pytest.raises(ValidationError) as caught:
        check_attributable(transcript)
    assert "segments" in caught.value.messages


def test_a_one_channel_file_says_its_channel_in_the_url() -> None:
    transcript = assemblyai.parse_transcript(fixture("transcript_mono_words.json"), {"channel": "0"}).transcript
    assert transcript is not None

    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "Client", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Hello, is anybody there?"},
    ]


def test_an_errored_transcript_is_a_failed_job_with_assemblyais_reason() -> None:
    result = assemblyai.parse_transcript(fixture("transcript_error.json"), {})

    assert result.status == "failed"
    assert result.failure_reason is not None
    assert result.failure_reason.startswith("Download error, unable to download https://pbx.example/rec/")
    assert result.vendor_job_id == "6a1e07c2-93b4-4f2f-9b1d-2f0c5e7d8a91"


def test_a_transcript_still_processing_is_refused_by_name() -> None:
    body = fixture_json("transcript_multichannel.json")
    body["status"] = "processing"

    assert transcript_errors(body) == {"status": ["Must be completed or error: the transcript is processing."]}


def test_broken_utterances_are_named_by_path() -> None:
    body = fixture_json("transcript_multichannel.json")
    body["utterances"][0]["start"] = -80
    body["utterances"][1]["channel"] = "left"
    body["utterances"][2]["text"] = None

    assert transcript_errors(body) == {
        "utterances": {
            0: {"start": ["Must be greater than or equal to 0."]},
            1: {"channel": ['Not a valid channel number ("1", "2", …).']},
            2: {"text": ["Not a valid string."]},
        }
    }


def test_a_completed_transcript_without_words_is_refused() -> None:
    body = fixture_json("transcript_mono_words.json")
    body["words"] = None

    assert transcript_errors(body) == {"words": ["Missing data for required field."]}


def test_a_webhook_without_its_transcript_id_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        assemblyai.parse(b'{"status": "completed"}', {})
    assert caught.value.messages == {"transcript_id": ["Missing data for required field."]}


def test_a_bad_channel_in_the_url_is_refused_when_the_webhook_arrives() -> None:
    with pytest.raises(ValidationError) as caught:
        assemblyai.parse(fixture("webhook_completed.json"), {"channel": "2"})
    assert "channel" in caught.value.messages

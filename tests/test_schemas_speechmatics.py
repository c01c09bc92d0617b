"""Speechmatics notifies with the json-v2 transcript (words only); we group them into MESSAGES."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from marshmallow import ValidationError

from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.transcript import CallReference, Segment
from schemas import speechmatics

FIXTURES = Path(__file__).parent / "fixtures" / "speechmatics"
SUCCESS = {"id": "r6sr3jlzjj", "status": "success"}


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def errors_of(body: Any, query: dict[str, str] | None = None) -> Any:
    with pytest.raises(ValidationError) as caught:
        speechmatics.parse(json.dumps(body).encode(), query or SUCCESS)
    return caught.value.messages


def test_channel_diarization_gives_words_on_0_based_channels_with_glued_punctuation() -> None:
    result = speechmatics.parse(fixture("channel_diarization.json"), SUCCESS)

    assert result.status == "completed"
    assert result.vendor_job_id == "r6sr3jlzjj"
    assert result.reference == CallReference(pbx="asterisk", pbx_call_id="1700000000.123")
    transcript = result.transcript
    assert transcript is not None
    assert transcript.granularity == "word"
    assert transcript.segments[:3] == [
        Segment(0.08, 0.32, "Good", channel=1),
        Segment(0.32, 0.72, "afternoon", channel=1),
        Segment(0.72, 0.72, ",", channel=1, glue=True),
    ]


def test_a_backchannel_does_not_cut_the_other_sides_sentence() -> None:
    transcript = speechmatics.parse(fixture("channel_diarization.json"), SUCCESS).transcript
    assert transcript is not None

    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Good afternoon, Acme support. Mm-hmm."},
        {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
    ]


def test_custom_channel_labels_map_by_their_position_and_details_name_the_call() -> None:
    result = speechmatics.parse(fixture("channel_labels.json"), {"id": "a1b2c3d4e5", "status": "success"})
    transcript = result.transcript
    assert transcript is not None

    assert result.reference == CallReference(b24_call_id="externalCall.716f1cb73def9700a23842adf9c4c568.1773130779")
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "Client", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Hello world."},
        {"SIDE": "User", "START_TIME": 2, "STOP_TIME": 3, "MESSAGE": "Hi there!"},
    ]


def test_speakers_unknown_words_and_opening_marks() -> None:
    transcript = speechmatics.parse(fixture("speaker_diarization.json"), SUCCESS).transcript
    assert transcript is not None

    segments = transcript.segments
    assert segments[0] == Segment(0.3, 0.6, "Buenas", speaker="S1")  # a leading UU takes the next speaker
    assert segments[5:9] == [
        Segment(2.0, 2.0, "¿", speaker="S2"),
        Segment(2.0, 2.4, "Tienen", speaker="S2", glue=True),  # "¿" attaches to the next word
        Segment(2.4, 2.7, "mesa", speaker="S2"),
        Segment(2.7, 3.1, "libre", speaker="S2"),  # UU inside S2's sentence stays S2
    ]
    assert build_messages(transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Buenas tardes, dígame."},
        {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "¿Tienen mesa libre?"},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 5, "MESSAGE": "Sí."},
    ]


def test_a_transcript_of_unknown_speakers_only_cannot_be_attributed() -> None:
    transcript = speechmatics.parse(fixture("mono_no_diarization.json"), SUCCESS).transcript
    assert transcript is not None
    assert {segment.speaker for segment in transcript.segments} == {None}

    with pytest.raises(ValidationError) as caught:
        check_attributable(transcript)
    assert "segments" in caught.value.messages


def test_a_failed_job_keeps_the_last_error_message() -> None:
    result = speechmatics.parse(fixture("failed_jobinfo.json"), {"id": "1uyo82b1bv", "status": "fetch_error"})

    assert result.status == "failed"
    assert result.failure_reason == (
        'unable to fetch audio: Get "https://pbx.example/rec/missing.wav": response status 404'
    )
    assert result.vendor_job_id == "1uyo82b1bv"
    assert result.reference == CallReference(pbx="asterisk", pbx_call_id="1700000000.127")


def test_a_failed_job_without_a_json_body_still_fails_with_its_status() -> None:
    result = speechmatics.parse(b"", {"id": "1uyo82b1bv", "status": "trim_error"})

    assert result.status == "failed"
    assert result.failure_reason == "Speechmatics notification status trim_error."
    assert result.vendor_job_id == "1uyo82b1bv"


def test_the_job_id_falls_back_to_the_id_speechmatics_adds_to_the_url() -> None:
    body = fixture_json("channel_labels.json")
    del body["job"]

    assert speechmatics.parse(json.dumps(body).encode(), {"id": "zz9", "status": "success"}).vendor_job_id == "zz9"


def test_unknown_item_types_are_ignored() -> None:
    body = fixture_json("channel_labels.json")
    body["results"].insert(1, {"type": "speaker_change", "start_time": 1.2, "end_time": 1.2, "alternatives": []})

    transcript = speechmatics.parse(json.dumps(body).encode(), SUCCESS).transcript
    assert transcript is not None
    assert len(transcript.segments) == 6


def test_a_jobinfo_only_notification_says_to_send_the_transcript() -> None:
    body = {"job": {"id": "r6sr3jlzjj", "status": "done"}}

    assert errors_of(body) == {"results": [speechmatics._RESULTS_REQUIRED]}


def test_broken_items_are_named_by_path() -> None:
    body = fixture_json("channel_diarization.json")
    results = body["results"]
    results[0]["start_time"] = "0.08"
    results[1]["alternatives"] = []
    results[3]["alternatives"][0]["content"] = 5
    results[4]["channel"] = "channel_x"
    results[6]["end_time"] = -1.0

    assert errors_of(body) == {
        "results": {
            0: {"start_time": ["Not a valid number of seconds."]},
            1: {"alternatives": ["Must be a non-empty list."]},
            3: {"alternatives": {0: {"content": ["Not a valid string."]}}},
            4: {"channel": ["Not one of channel_diarization_labels, nor a default label like channel_1."]},
            6: {"end_time": ["Must be greater than or equal to 0."]},
        }
    }


def test_default_channel_labels_in_either_spelling() -> None:
    body = fixture_json("channel_labels.json")
    for item in body["results"]:
        item["channel"] = "Channel 1" if item["channel"] == "Agent" else "Channel 2"
    body["metadata"]["transcription_config"].pop("channel_diarization_labels")

    transcript = speechmatics.parse(json.dumps(body).encode(), SUCCESS).transcript
    assert transcript is not None
    assert [segment.channel for segment in transcript.segments] == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("label", ["channel_" + "9" * 5000, "Channel 33", "channel_0", "channel_100"])
def test_a_default_channel_label_past_channel_32_names_the_channel_field(label: str) -> None:
    document = fixture_json("channel_diarization.json")
    document["results"][0]["channel"] = label
    errors = errors_of(document)
    assert "Not one of channel_diarization_labels" in errors["results"][0]["channel"][0]


def test_channel_32_is_the_last_default_label() -> None:
    document = fixture_json("channel_diarization.json")
    document["results"][0]["channel"] = "channel_32"
    assert speechmatics.parse(json.dumps(document).encode(), SUCCESS).transcript.segments[0].channel == 31  # type: ignore[union-attr]


def test_more_than_32_channel_labels_is_a_422_naming_the_field() -> None:
    document = fixture_json("channel_labels.json")
    document["metadata"]["transcription_config"]["channel_diarization_labels"] = [f"L{i}" for i in range(33)]
    assert "channel_diarization_labels" in json.dumps(errors_of(document))

"""Gladia v2 posts the pre-recorded result (utterances) to the callback URL; we read it as segments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.transcript import CallReference, Direction, Role, Segment
from schemas import gladia
from schemas.registry import SOURCES
from tests.test_vendor_properties import assert_bitrix24_accepts, json_values, mutated, timed, word_text

FIXTURES = Path(__file__).parent / "fixtures" / "gladia"
CALL_ID = "externalCall.716f1cb73def9700a23842adf9c4c568.1773130779"
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def errors_of(body: Any, query: dict[str, str] | None = None) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ValidationError) as caught:
        gladia.parse(raw, query or {})
    return caught.value.messages


def test_a_stereo_callback_keeps_each_utterances_channel_and_names_the_call_in_custom_metadata() -> None:
    result = gladia.parse(fixture("stereo_callback.json"), {})

    assert result.status == "completed"
    assert result.vendor_job_id == "45463597-20b7-4af7-b3b3-f5fb778203ab"
    assert result.reference == CallReference(b24_call_id=CALL_ID)
    assert result.transcript is not None
    assert result.transcript.granularity == "segment"
    assert result.transcript.segments == [
        Segment(0.12, 1.9, "Good afternoon, Acme support.", channel=1),
        Segment(1.2, 3.4, "Hi, I'm calling about my order.", channel=0),
        Segment(4.0, 5.6, "What's the order number?", channel=1),
    ]
    assert build_messages(result.transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
    ]


def test_channel0_and_direction_decide_the_sides_of_a_stereo_call() -> None:
    transcript = gladia.parse(fixture("stereo_callback.json"), {}).transcript
    assert transcript is not None

    rules = SideRules(direction=Direction.OUTBOUND, channel0=Role.CALLER)  # channel 0: the employee calling out
    assert [m["SIDE"] for m in build_messages(transcript, rules)] == ["Client", "User", "Client"]


def test_a_diarized_mono_callback_uses_speakers_and_the_pbx_call_in_custom_metadata() -> None:
    result = gladia.parse(fixture("diarized_mono_callback.json"), {})

    assert result.reference == CallReference(pbx="asterisk", pbx_call_id="1700000000.123")
    assert result.transcript is not None
    assert result.transcript.segments[:2] == [
        Segment(0.3, 1.8, "Good morning, this is Anna.", speaker="0"),  # channel 0 of a mono file: no channel
        Segment(2.1, 3.9, "Hello, I'd like to book a table.", speaker="1"),
    ]
    assert build_messages(result.transcript, SideRules()) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
        {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
        {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
        {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
    ]


def test_a_mono_callback_without_diarization_cannot_be_attributed() -> None:
    body = fixture_json("diarized_mono_callback.json")
    for utterance in body["payload"]["transcription"]["utterances"]:
        del utterance["speaker"]
    transcript = gladia.parse(json.dumps(body).encode(), {}).transcript
    assert transcript is not None

    with pytest.raises(ValidationError) as caught:
        check_attributable(transcript)
    assert "segments" in caught.value.messages


def test_the_url_says_which_one_channel_a_file_held() -> None:
    body = fixture_json("diarized_mono_callback.json")
    transcript = gladia.parse(json.dumps(body).encode(), {"channel": "1"}).transcript
    assert transcript is not None

    assert {segment.channel for segment in transcript.segments} == {1}
    assert {m["SIDE"] for m in build_messages(transcript, SideRules())} == {"User"}


def test_without_metadata_the_channels_seen_decide_stereo() -> None:
    body = fixture_json("stereo_callback.json")
    del body["payload"]["metadata"]
    transcript = gladia.parse(json.dumps(body).encode(), {}).transcript
    assert transcript is not None

    assert [segment.channel for segment in transcript.segments] == [1, 0, 1]


def test_the_short_metadata_keys_name_a_call_too() -> None:
    body = fixture_json("stereo_callback.json")
    body["custom_metadata"] = {"pbx": "asterisk", "call": "1700000000.9"}

    assert gladia.parse(json.dumps(body).encode(), {}).reference == CallReference(
        pbx="asterisk", pbx_call_id="1700000000.9"
    )
    body["custom_metadata"] = {"user": "John Doe"}
    assert gladia.parse(json.dumps(body).encode(), {}).reference.is_empty()


def test_a_failed_job_keeps_gladias_message() -> None:
    result = gladia.parse(fixture("error_callback.json"), {})

    assert result.status == "failed"
    assert result.failure_reason == "The audio file could not be decoded: unsupported codec."
    assert result.vendor_job_id == "b2f1c7e0-5a44-4f0e-8e53-6d2a1f9c0b77"
    assert result.reference == CallReference(b24_call_id="externalCall.f.1")
    assert result.transcript is None


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ({"status_code": 500, "exception": "InternalError", "message": ""}, "InternalError"),
        ({"status_code": 504}, "Gladia reported transcription.error (status code 504)."),
        (None, "Gladia reported transcription.error without a message."),
    ],
)
def test_a_failed_jobs_reason_falls_back_to_what_the_error_has(error: Any, reason: str) -> None:
    body = {"id": "j1", "event": "transcription.error", "error": error}

    assert gladia.parse(json.dumps(body).encode(), {}).failure_reason == reason


def test_an_account_webhook_with_only_the_id_says_to_use_the_callback() -> None:
    body = {"event": "transcription.success", "payload": {"id": "45463597-20b7-4af7-b3b3-f5fb778203ab"}}

    assert errors_of(body) == {"payload": {"transcription": [gladia._WEBHOOK_ONLY]}}


def test_other_events_and_broken_envelopes_are_named() -> None:
    assert errors_of({"id": "j", "event": "transcription.created"}) == {
        "event": ["Must be one of: transcription.success, transcription.error."]
    }
    assert errors_of({"id": 5, "event": "transcription.success"}) == {"id": ["Not a valid string."]}
    assert errors_of({"event": "transcription.success"}) == {"payload": ["Missing data for required field."]}
    assert errors_of({"event": "transcription.success", "payload": {"transcription": {"utterances": {}}}}) == {
        "payload": {"transcription": {"utterances": ["Not a valid list."]}}
    }
    assert errors_of(b"[]") == {"_schema": ["The body must be a JSON object."]}


def test_broken_utterances_are_named_by_path() -> None:
    body = fixture_json("stereo_callback.json")
    body["payload"]["metadata"]["number_of_distinct_channels"] = "2"
    utterances = body["payload"]["transcription"]["utterances"]
    utterances[0]["text"] = None
    utterances[1]["start"] = "1.2"
    utterances[2]["channel"] = -1
    utterances.append({"text": "late", "start": 9.0, "end": 8.0})

    assert errors_of(body) == {
        "payload": {
            "metadata": {"number_of_distinct_channels": ["Not a valid integer."]},
            "transcription": {
                "utterances": {
                    0: {"text": ["Not a valid string."]},
                    1: {"start": ["Not a valid number of seconds."]},
                    2: {"channel": ["Must be greater than or equal to 0."]},
                    3: {"end": ["Must not be before start."]},
                }
            },
        }
    }


def test_the_registry_checks_its_results_and_names_it() -> None:
    vendor = SOURCES.stt["gladia"]
    assert vendor.name == "gladia" and vendor.fetch is None and vendor.signatures == ()
    body = fixture_json("stereo_callback.json")
    body["id"] = "x" * 129  # longer than any job id column (contract §12)

    with pytest.raises(ValidationError):
        vendor.parse(json.dumps(body).encode(), {})


# --- properties (contract §6) ------------------------------------------------------------------


@st.composite
def gladia_payloads(draw: st.DrawFn) -> tuple[Any, dict[str, str]]:
    stereo = draw(st.booleans())
    utterances = []
    for _ in range(draw(st.integers(0, 30))):
        start, end = draw(timed())
        utterance: dict[str, Any] = {"text": draw(word_text), "start": start, "end": end, "language": "en"}
        utterance["channel"] = draw(st.integers(0, 1)) if stereo else 0
        if not stereo or draw(st.booleans()):
            utterance["speaker"] = draw(st.integers(0, 3))
        utterances.append(utterance)
    body = {
        "id": "45463597",
        "event": "transcription.success",
        "payload": {
            "metadata": {"number_of_distinct_channels": 2 if stereo else 1},
            "transcription": {"full_transcript": "", "utterances": utterances},
        },
        "custom_metadata": {"b24scribe_b24_call_id": CALL_ID},
    }
    return body, {}


side_rules = st.builds(
    SideRules, direction=st.sampled_from(Direction), channel0=st.sampled_from(Role), first_speaker=st.sampled_from(Role)
)


@PROPERTY_SETTINGS
@given(payload=gladia_payloads(), rules=side_rules)
def test_valid_callbacks_become_messages_bitrix24_accepts(
    payload: tuple[Any, dict[str, str]], rules: SideRules
) -> None:
    body, query = payload
    result = SOURCES.stt["gladia"].parse(json.dumps(body).encode(), query)
    assert result.status == "completed" and result.transcript is not None
    segments = result.transcript.segments
    stereo = body["payload"]["metadata"]["number_of_distinct_channels"] == 2
    # contract §6.3: stereo keeps 0-based channels, mono relies on speakers only
    assert all((segment.channel is not None) == stereo for segment in segments)
    check_attributable(result.transcript)
    messages = build_messages(result.transcript, rules)
    assert_bitrix24_accepts(messages)
    spoken = [u for u in body["payload"]["transcription"]["utterances"] if u["text"].strip()]
    assert len(messages) <= len(spoken)  # at most one message per utterance (empty ones are dropped)
    for message in messages:  # contract §6.2: floor(start), max(ceil(end), start + 1)
        assert any(int(u["start"] // 1) == message["START_TIME"] for u in spoken)


@PROPERTY_SETTINGS
@given(payload=mutated(gladia_payloads()))
def test_broken_callbacks_give_field_named_errors_never_a_crash(payload: tuple[Any, dict[str, str]]) -> None:
    body, query = payload
    try:
        result = SOURCES.stt["gladia"].parse(json.dumps(body).encode(), query)
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages
        return
    if result.transcript is None:
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
        SOURCES.stt["gladia"].parse(json.dumps(body).encode(), {})
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages

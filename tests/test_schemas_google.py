"""Google Speech-to-Text results, posted as Google's API gave them, become Bitrix24 MESSAGES."""

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
from schemas import google
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

FIXTURES = Path(__file__).parent / "fixtures" / "google"
STEREO_MESSAGES = [
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
    {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
    {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
]
DIARIZED_MESSAGES = [
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
    {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
    {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 6, "MESSAGE": "For how many?"},
    {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


def encode(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def errors_of(body: Any, query: dict[str, str] | None = None) -> Any:
    with pytest.raises(ValidationError) as caught:
        google.parse(encode(body), query or {})
    return caught.value.messages


def messages_of(body: Any, query: dict[str, str] | None = None) -> list[dict[str, Any]]:
    transcript = google.parse(encode(body), query or {}).transcript
    assert transcript is not None
    return build_messages(transcript, SideRules())  # type: ignore[return-value]


def slow(body: Any, query: dict[str, str] | None = None) -> Any:
    """The reference reading (plain JSON), which the msgspec fast path must match."""
    return google.parse_slow(encode(body), google.channel_from_query(query or {}))


# --- fixtures -------------------------------------------------------------------------------------


def test_a_stereo_operation_gives_one_segment_per_result_on_its_0_based_channel() -> None:
    result = google.parse(fixture("operation_stereo.json"), {})

    assert result.status == "completed"
    assert result.vendor_job_id == "4517398062171658425"
    assert result.reference == CallReference()  # Google carries nothing of ours: the URL names the call
    assert result.transcript is not None
    assert result.transcript.granularity == "segment"
    assert result.transcript.segments == [
        Segment(0.1, 1.8, "Good afternoon, Acme support.", channel=1),  # channelTag 2
        Segment(1.2, 3.9, "Hi, I'm calling about my order.", channel=0),  # channelTag 1
        Segment(4.0, 5.8, " What's the order number?", channel=1),  # starts at its first word, "4s"
    ]  # the last result has no alternatives: skipped
    assert messages_of(fixture("operation_stereo.json")) == STEREO_MESSAGES


def test_the_response_alone_and_the_bare_results_list_read_the_same() -> None:
    operation = fixture_json("operation_stereo.json")
    expected = google.parse(fixture("operation_stereo.json"), {}).transcript

    response = google.parse(encode(operation["response"]), {})
    assert response.transcript == expected
    assert response.vendor_job_id == "8307046453523117011"  # the response's requestId
    listed = google.parse(encode(operation["response"]["results"]), {})
    assert listed.transcript == expected
    assert listed.vendor_job_id is None  # nothing to tell a retry by but its bytes


def test_diarized_mono_takes_the_speaker_tagged_words_of_the_final_result() -> None:
    result = google.parse(fixture("response_diarized_mono.json"), {})

    assert result.vendor_job_id == "6914585301208263937"
    transcript = result.transcript
    assert transcript is not None
    assert transcript.granularity == "word"
    assert len(transcript.segments) == 18  # the final result's words only, not the earlier results' too
    assert transcript.segments[:2] == [
        Segment(0.0, 0.4, "Good", speaker="1"),  # startTime left out: zero
        Segment(0.4, 0.9, "morning,", speaker="1"),
    ]
    assert build_messages(transcript, SideRules()) == DIARIZED_MESSAGES


def test_speaker_tags_without_labels_and_an_untagged_word_take_their_neighbours_speaker() -> None:
    body = fixture_json("response_diarized_mono.json")
    words = body["results"][-1]["alternatives"][0]["words"]
    for word in words:
        del word["speakerLabel"]
    del words[0]["speakerTag"]  # takes the next word's speaker
    del words[6]["speakerTag"]  # takes the previous word's
    for read in (google.parse(encode(body), {}), slow(body)):
        segments = read.transcript.segments
        assert [segments[0].speaker, segments[6].speaker] == ["1", "2"]
    assert messages_of(body) == DIARIZED_MESSAGES


def test_tagged_words_spread_over_results_are_all_kept() -> None:
    body = fixture_json("response_diarized_mono.json")
    final_words = body["results"][-1]["alternatives"][0]["words"]
    body["results"][0]["alternatives"][0]["words"] = final_words[:12]
    body["results"][1]["alternatives"][0]["words"] = final_words[12:]
    del body["results"][-1]

    assert messages_of(body) == DIARIZED_MESSAGES
    assert slow(body).transcript == google.parse(encode(body), {}).transcript


def test_a_failed_operation_keeps_googles_message() -> None:
    result = google.parse(fixture("operation_failed.json"), {})

    assert result.status == "failed"
    assert result.failure_reason == "Must use single channel (mono) audio, but WAV header indicates 2 channels."
    assert result.vendor_job_id == "8116740322904470373"
    assert result.transcript is None


def test_a_failure_without_a_message_names_the_code_and_an_output_error_fails_too() -> None:
    failed = google.parse(encode({"name": "op1", "done": True, "error": {"code": 14}}), {})
    assert failed.failure_reason == "Google Speech-to-Text reported error code 14."
    output_error = {"done": True, "response": {"outputError": {"code": 7, "message": "No write access to gs://x"}}}
    result = google.parse(encode(output_error), {})
    assert (result.status, result.failure_reason) == ("failed", "No write access to gs://x")


def test_v2_batch_inline_results_of_one_channel_file() -> None:
    result = google.parse(fixture("v2_batch_inline_channel1.json"), {"channel": "1"})

    assert result.vendor_job_id == (
        "projects/acme-telephony/locations/global/operations/1a2b3c4d-0000-4e5f-9a8b-7c6d5e4f3a2b"
    )
    assert result.transcript is not None
    assert result.transcript.segments == [
        Segment(0.1, 1.8, "Good afternoon, Acme support.", channel=1),
        Segment(4.0, 5.8, " What's the order number?", channel=1),
    ]


def test_a_v2_file_error_is_a_failed_job_and_cloud_storage_output_says_what_to_post() -> None:
    body = fixture_json("v2_batch_inline_channel1.json")
    (uri,) = body["response"]["results"]
    body["response"]["results"][uri] = {"error": {"code": 3, "message": "Audio can't be decoded."}}
    assert google.parse(encode(body), {}).failure_reason == "Audio can't be decoded."

    body["response"]["results"][uri] = {"cloudStorageResult": {"uri": "gs://out/result.json"}}
    errors = errors_of(body)
    assert "Cloud Storage" in errors["response"]["results"][uri]["inlineResult"][0]


def test_a_mono_transcript_without_diarization_cannot_be_attributed_but_channel_says_which() -> None:
    body = fixture_json("operation_stereo.json")
    for result in body["response"]["results"]:
        result.pop("channelTag")
    transcript = google.parse(encode(body), {}).transcript
    assert transcript is not None
    with pytest.raises(ValidationError) as caught:
        check_attributable(transcript)
    assert "segments" in caught.value.messages

    one_channel = google.parse(encode(body), {"channel": "1"}).transcript
    assert one_channel is not None
    assert {segment.channel for segment in one_channel.segments} == {1}


def test_one_channel_tag_only_is_mono() -> None:
    body = fixture_json("operation_stereo.json")
    for result in body["response"]["results"]:
        result["channelTag"] = 1
    transcript = google.parse(encode(body), {}).transcript
    assert transcript is not None
    assert {segment.channel for segment in transcript.segments} == {None}


def test_a_result_without_words_starts_where_its_channel_last_ended() -> None:
    body = fixture_json("operation_stereo.json")
    del body["response"]["results"][2]["alternatives"][0]["words"]  # channel 2's second result

    transcript = google.parse(encode(body), {}).transcript
    assert transcript is not None
    assert transcript.segments[2] == Segment(1.8, 5.8, " What's the order number?", channel=1)


def test_other_duration_forms_are_read_off_the_fast_path() -> None:
    body = fixture_json("operation_stereo.json")
    words = body["response"]["results"][0]["alternatives"][0]["words"]
    words[0]["startTime"] = {"seconds": "0", "nanos": 100_000_000}
    body["response"]["results"][0]["resultEndTime"] = 1.8

    assert messages_of(body) == STEREO_MESSAGES


def test_the_fast_path_reads_every_fixture_as_the_slow_one() -> None:
    for name, query in (
        ("operation_stereo.json", {}),
        ("response_diarized_mono.json", {}),
        ("operation_failed.json", {}),
        ("v2_batch_inline_channel1.json", {"channel": "1"}),
        ("v2_batch_inline_channel0.json", {"channel": "0"}),
    ):
        assert google.parse(fixture(name), query) == slow(fixture(name), query), name


# --- refusals, by field -----------------------------------------------------------------------


def test_an_unfinished_operation_is_refused() -> None:
    body = {"name": "4517398062171658425", "metadata": {"progressPercent": 40}, "done": False}
    assert errors_of(body) == {"done": [google._NOT_DONE]}
    assert errors_of({"name": "x", "metadata": {}}) == {"results": [google._ACCEPTED_SHAPES]}


def test_a_body_that_is_no_object_nor_list_is_refused() -> None:
    assert errors_of(b'"results"') == {"_schema": ["The body must be a JSON object or list."]}
    assert "_schema" in errors_of(b"{not json")


def test_broken_results_are_named_by_path() -> None:
    body = fixture_json("operation_stereo.json")
    results = body["response"]["results"]
    results[0]["resultEndTime"] = "1.8"
    results[1]["channelTag"] = "1"
    results[2]["alternatives"][0]["words"][0]["startTime"] = "-4s"
    results[3] = ["not", "a", "result"]

    assert errors_of(body) == {
        "response": {
            "results": {
                0: {"resultEndTime": [DURATION_MESSAGE]},
                1: {"channelTag": ["Must be an integer from 1 to 32."]},
                2: {"alternatives": {0: {"words": {0: {"startTime": [DURATION_MESSAGE]}}}}},
                3: ["Not a valid object."],
            }
        }
    }


def test_a_broken_tagged_word_is_named_by_path() -> None:
    body = fixture_json("response_diarized_mono.json")
    words = body["results"][2]["alternatives"][0]["words"]
    words[3]["word"] = 7
    words[4]["endTime"] = "1s"  # before its startTime, 1.3s

    assert errors_of(body) == {
        "results": {
            2: {
                "alternatives": {
                    0: {
                        "words": {
                            3: {"word": ["Not a valid string."]},
                            4: {"endTime": ["Must not be before startTime."]},
                        }
                    }
                }
            }
        }
    }


@pytest.mark.parametrize("value", ["1.5", "1,5s", "s", "", "-1s", "nans", "infs", "999999999999999s"])
def test_bad_durations_are_refused(value: str) -> None:
    body = fixture_json("operation_stereo.json")
    body["response"]["results"][1]["resultEndTime"] = value
    assert "resultEndTime" in errors_of(body)["response"]["results"][1]


def test_a_channel_tag_beyond_32_is_refused() -> None:
    body = fixture_json("operation_stereo.json")
    body["response"]["results"][0]["channelTag"] = 33
    assert errors_of(body) == {"response": {"results": {0: {"channelTag": ["Must be an integer from 1 to 32."]}}}}


# --- properties (contract §6) ---------------------------------------------------------------------


def _duration(seconds: float) -> str:
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


@st.composite
def google_payloads(draw: st.DrawFn) -> Payload:
    """A finished operation: stereo per-channel results, or mono with a final speaker-tagged result."""
    stereo = draw(st.booleans())
    results: list[dict[str, Any]] = []
    tagged: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 12))):
        words = []
        for _ in range(draw(st.integers(0, 6))):
            start, end = draw(timed())
            word: dict[str, Any] = {"endTime": _duration(end), "word": draw(word_text)}
            if start or draw(st.booleans()):
                word["startTime"] = _duration(start)
            words.append(word)
        result: dict[str, Any] = {"alternatives": [{"transcript": draw(word_text), "words": words}]}
        if draw(st.booleans()):
            result["resultEndTime"] = _duration(draw(timed())[1])
        if draw(st.integers(0, 5)) == 0:
            result["alternatives"] = []
        if stereo:
            result["channelTag"] = draw(st.sampled_from([1, 2]))
        else:
            tagged.extend({**word, "speakerTag": draw(st.integers(1, 3))} for word in words)
        results.append(result)
    if stereo:  # both channels present, or it is mono
        results.append({"alternatives": [{"transcript": "ok"}], "channelTag": 1, "resultEndTime": "1s"})
        results.append({"alternatives": [{"transcript": "ok"}], "channelTag": 2, "resultEndTime": "2s"})
    else:  # at least one tagged word, or nothing can be attributed
        tagged.append({"startTime": "0s", "endTime": "1s", "word": "ok", "speakerTag": 1})
        results.append({"alternatives": [{"transcript": "", "words": tagged}]})
    body = {"name": "4517398062171658425", "done": True, "response": {"results": results}}
    return body, {}


@PROPERTY_SETTINGS
@given(payload=google_payloads(), rules=side_rules)
def test_valid_payloads_become_messages_bitrix24_accepts(payload: Payload, rules: SideRules) -> None:
    body, query = payload
    result = google.parse(encode(body), query)
    assert result.status == "completed" and result.transcript is not None
    assert result == slow(body, query)  # the fast path changes nothing
    check_attributable(result.transcript)
    assert_bitrix24_accepts(build_messages(result.transcript, rules))


@PROPERTY_SETTINGS
@given(payload=mutated(google_payloads()))
def test_broken_payloads_give_field_named_errors_never_a_crash(payload: Payload) -> None:
    body, query = payload
    try:
        result = google.parse(encode(body), query)
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
        google.parse(encode(body), {})
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages

"""AWS Transcribe: the output JSON (string times, punctuation without times, channel and speaker
labels, audio segments), the EventBridge job event and its SNS envelope, the SNS signature rules."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.messages import SideRules, build_messages, check_attributable
from b24scribe.settings import Settings
from b24scribe.transcript import Segment
from schemas import aws
from schemas.registry import SOURCES
from tests.test_vendor_properties import assert_bitrix24_accepts, json_values, mutated, side_rules, timed, word_text

FIXTURES = Path(__file__).parent / "fixtures" / "aws"
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STEREO = [
    {"SIDE": "Client", "START_TIME": 4, "STOP_TIME": 7, "MESSAGE": "I've been on hold for an hour."},
    {"SIDE": "User", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Sorry about that."},
    {"SIDE": "Client", "START_TIME": 9, "STOP_TIME": 11, "MESSAGE": "Can you check my order?"},
    {"SIDE": "User", "START_TIME": 10, "STOP_TIME": 13, "MESSAGE": "Of course, one moment."},
]
DIARIZED = [
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Good morning, this is Anna."},
    {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 5, "MESSAGE": "Hello, I'd like to book a table."},
    {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
    {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
]


def fixture_json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_bytes())


def parse(body: Any, query: dict[str, str] | None = None) -> Any:
    return SOURCES.stt["aws"].parse(body if isinstance(body, bytes) else json.dumps(body).encode(), query or {})


def messages(body: Any, query: dict[str, str] | None = None) -> list[dict[str, Any]]:
    result = parse(body, query)
    assert result.status == "completed" and result.transcript is not None
    check_attributable(result.transcript)
    return build_messages(result.transcript, SideRules())


def errors_of(body: Any, query: dict[str, str] | None = None) -> Any:
    with pytest.raises(ValidationError) as caught:
        parse(body, query)
    return caught.value.messages


# --- the output JSON ---------------------------------------------------------------------------------


def test_an_older_stereo_output_reads_the_words_of_each_channel_with_punctuation_glued() -> None:
    result = parse(fixture_json("stereo_output.json"))
    assert (result.status, result.vendor_job_id) == ("completed", "b24-stereo-2f9c")
    transcript = result.transcript
    assert transcript.granularity == "word"
    assert transcript.segments[6:9] == [
        Segment(6.25, 6.87, "hour", channel=0),
        Segment(6.87, 6.87, ".", channel=0, glue=True),  # punctuation has no time: the word's end
        Segment(9.02, 9.2, "Can", channel=0),
    ]
    assert build_messages(transcript, SideRules()) == STEREO


def test_a_newer_stereo_output_labels_the_channel_on_each_item() -> None:
    body = fixture_json("stereo_output.json")
    items = [item for channel in body["results"]["channel_labels"]["channels"] for item in channel["items"]]
    body["results"]["items"] = items
    assert messages(body) == STEREO


def test_a_diarized_output_uses_its_audio_segments() -> None:
    result = parse(fixture_json("diarized_output.json"))
    assert result.transcript.granularity == "segment"
    assert result.transcript.segments[0] == Segment(0.5, 2.29, "Good morning, this is Anna.", speaker="spk_0")
    assert build_messages(result.transcript, SideRules()) == DIARIZED


def test_diarized_words_without_audio_segments_are_grouped_per_speaker() -> None:
    body = fixture_json("diarized_output.json")
    del body["results"]["audio_segments"]
    assert parse(body).transcript.granularity == "word"
    assert messages(body) == DIARIZED


def test_older_diarized_words_take_their_speaker_from_speaker_labels() -> None:
    body = fixture_json("diarized_output.json")
    del body["results"]["audio_segments"]
    for item in body["results"]["items"]:
        del item["speaker_label"]
    assert messages(body) == DIARIZED


def test_audio_segments_without_labels_give_way_to_the_words() -> None:
    body = fixture_json("diarized_output.json")
    for segment in body["results"]["audio_segments"]:
        del segment["speaker_label"]
    assert parse(body).transcript.granularity == "word"
    assert messages(body) == DIARIZED


def test_one_channel_per_file_is_named_by_the_url() -> None:
    body = fixture_json("diarized_output.json")
    del body["results"]["audio_segments"]
    result = parse(body, {"channel": "1"})
    assert {segment.channel for segment in result.transcript.segments} == {1}
    assert {segment.speaker for segment in result.transcript.segments} == {None}


def test_a_mono_output_without_speakers_is_unattributable() -> None:
    body = fixture_json("diarized_output.json")
    del body["results"]["audio_segments"], body["results"]["speaker_labels"]
    for item in body["results"]["items"]:
        del item["speaker_label"]
    result = parse(body)
    with pytest.raises(ValidationError):
        check_attributable(result.transcript)


def test_bad_items_are_named_by_their_field() -> None:
    body = fixture_json("diarized_output.json")
    del body["results"]["audio_segments"]
    items = body["results"]["items"]
    items[0]["start_time"] = "soon"
    items[1]["end_time"] = "-1"
    del items[3]["alternatives"]
    items[4]["speaker_label"] = 7
    items[5]["channel_label"] = "left"
    items[9]["start_time"], items[9]["end_time"] = "4.0", "3.5"
    found = errors_of(body)["results"]["items"]
    assert found[0] == {"start_time": [aws._TIME]}
    assert found[1] == {"end_time": [aws._TIME]}
    assert found[3] == {"alternatives": ["Must be a non-empty list."]}
    assert found[4] == {"speaker_label": ["Not a valid string."]}
    assert found[5] == {"channel_label": ['Not a valid channel label ("ch_0", "ch_1").']}
    assert found[9] == {"end_time": ["Must not be before start_time."]}


def test_bad_envelopes_are_named_by_their_field() -> None:
    assert errors_of({"jobName": "j"}) == {"results": ["Missing data for required field."]}
    assert errors_of({"jobName": 5, "results": {}}) == {"jobName": ["Not a valid job name."]}
    assert errors_of({"jobName": "j", "results": {"items": {}}}) == {"results": {"items": ["Not a valid list."]}}
    assert "_schema" in errors_of({"hello": "world"})
    assert "_schema" in errors_of(b"[1, 2]")
    assert "_schema" in errors_of(b"\xff")
    segments = fixture_json("diarized_output.json")
    segments["results"]["audio_segments"][2]["end_time"] = "1e400"
    assert errors_of(segments) == {"results": {"audio_segments": {2: {"end_time": [aws._TIME]}}}}


# --- the EventBridge event and the SNS envelope ---------------------------------------------------------


def test_a_completed_event_is_a_fetch_of_its_job() -> None:
    result = parse(fixture_json("event_completed.json"))
    assert (result.status, result.fetch_id, result.vendor_job_id) == ("fetch", "b24-stereo-2f9c", "b24-stereo-2f9c")


def test_a_failed_event_carries_awss_reason() -> None:
    result = parse(fixture_json("event_failed.json"))
    assert result.status == "failed"
    assert result.failure_reason == fixture_json("event_failed.json")["detail"]["FailureReason"]
    event = fixture_json("event_failed.json")
    del event["detail"]["FailureReason"]
    assert parse(event).failure_reason == "AWS Transcribe reported the job FAILED without a reason."


def test_an_sns_notification_carries_the_event_as_its_message() -> None:
    result = parse(fixture_json("sns_notification.json"))
    assert (result.status, result.fetch_id) == ("fetch", "b24-stereo-2f9c")
    confirmation = fixture_json("sns_subscription_confirmation.json")
    assert list(errors_of(confirmation)) == ["Type"]
    broken = fixture_json("sns_notification.json")
    broken["Message"] = "not json"
    assert errors_of(broken) == {"Message": ["Not a JSON EventBridge event."]}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda e: e.update(source="aws.s3"), "source"),
        (lambda e: e.update({"detail-type": "Object Created"}), "detail-type"),
        (lambda e: e["detail"].update(TranscriptionJobStatus="IN_PROGRESS"), "detail"),
        (lambda e: e["detail"].pop("TranscriptionJobName"), "detail"),
        (lambda e: e.update(region="../evil"), "region"),
        (lambda e: e.update(detail=[]), "detail"),
    ],
)
def test_bad_events_are_named_by_their_field(change: Any, field: str) -> None:
    event = fixture_json("event_completed.json")
    change(event)
    assert list(errors_of(event)) == [field]


def test_sns_string_to_sign_follows_the_documented_field_order() -> None:
    notification = {"Type": "Notification", "MessageId": "m", "TopicArn": "t", "Message": "x", "Timestamp": "s"}
    assert (
        aws.string_to_sign(notification) == b"Message\nx\nMessageId\nm\nTimestamp\ns\nTopicArn\nt\nType\nNotification\n"
    )
    with_subject = {**notification, "Subject": "hi"}
    assert b"MessageId\nm\nSubject\nhi\nTimestamp" in aws.string_to_sign(with_subject)
    confirmation = {**notification, "Type": "SubscriptionConfirmation", "SubscribeURL": "u", "Token": "k"}
    assert aws.string_to_sign(confirmation) == (
        b"Message\nx\nMessageId\nm\nSubscribeURL\nu\nTimestamp\ns\nToken\nk\nTopicArn\nt\nType\nSubscriptionConfirmation\n"
    )


def test_certificates_and_subscriptions_come_only_from_sns(settings: Settings) -> None:
    allowed = aws.certificate_url_allowed
    assert allowed("https://sns.eu-central-1.amazonaws.com/SimpleNotificationService-abc.pem", settings)
    for url in (
        "http://sns.eu-central-1.amazonaws.com/SimpleNotificationService-abc.pem",
        "https://sns.eu-central-1.amazonaws.com.attacker.example/x.pem",
        "https://attacker.example/sns.eu-central-1.amazonaws.com/x.pem",
        "https://s3.amazonaws.com/bucket/x.pem",
        "https://sns.eu-central-1.amazonaws.com/x.txt",
        "https://user@sns.eu-central-1.amazonaws.com/x.pem",
    ):
        assert not allowed(url, settings), url
    topic = "arn:aws:sns:eu-central-1:111122223333:transcribe-jobs"
    subscribe = aws.subscribe_url_allowed
    assert subscribe("https://sns.eu-central-1.amazonaws.com/?Action=ConfirmSubscription", topic, settings)
    assert not subscribe("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription", topic, settings)
    assert not subscribe("http://sns.eu-central-1.amazonaws.com/?Action=ConfirmSubscription", topic, settings)
    test_only = settings.with_overrides(vendor={"AWS_SNS_TEST_HOSTS": "127.0.0.1:9"})
    assert allowed("http://127.0.0.1:9/cert.pem", test_only)
    assert not allowed("http://127.0.0.1:9/cert.pem", settings)


def test_sns_is_verified_only_for_the_configured_topics(settings: Settings) -> None:
    assert not aws.SNS_SIGNATURE.configured(settings, "aws")
    topics = settings.with_overrides(vendor={"AWS_SNS_TOPIC_ARNS": "arn:aws:sns:eu-central-1:1:t"})
    assert aws.SNS_SIGNATURE.configured(topics, "aws")


def test_transcript_uris_are_downloaded_only_from_aws_or_the_configured_endpoint() -> None:
    allowed = aws._allowed_download_host
    assert allowed("s3.eu-central-1.amazonaws.com", None)
    assert allowed("my-bucket.s3.us-west-2.amazonaws.com", None)
    assert allowed("127.0.0.1:4566", "http://127.0.0.1:4566")
    assert not allowed("127.0.0.1:4566", None)
    assert not allowed("amazonaws.com.attacker.example", None)
    assert aws._bucket_and_key("s3.eu-central-1.amazonaws.com", "/b/k/x.json", False) == ("b", "k/x.json")
    assert aws._bucket_and_key("b.s3.eu-central-1.amazonaws.com", "/k/x%20y.json", False) == ("b", "k/x y.json")


# --- properties (contract §6) -------------------------------------------------------------------------


@st.composite
def aws_outputs(draw: st.DrawFn) -> tuple[Any, dict[str, str]]:
    style = draw(st.sampled_from(["speakers", "channels", "segments", "old-channels"]))
    items: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 50))):
        if draw(st.integers(0, 4)) == 0:
            item: dict[str, Any] = {"type": "punctuation", "alternatives": [{"confidence": "0.0", "content": "."}]}
        else:
            start, end = draw(timed())
            item = {
                "type": "pronunciation",
                "start_time": f"{start:.3f}",
                "end_time": f"{max(end, start):.3f}",
                "alternatives": [{"confidence": "0.9", "content": draw(word_text)}],
            }
        if style == "speakers":
            item["speaker_label"] = draw(st.sampled_from(["spk_0", "spk_1", "spk_2"]))
        else:
            item["channel_label"] = draw(st.sampled_from(["ch_0", "ch_1"]))
        items.append(item)
    ok = {"type": "pronunciation", "start_time": "0.0", "end_time": "1.0", "alternatives": [{"content": "ok"}]}
    results: dict[str, Any] = {"transcripts": [{"transcript": ""}], "items": items}
    if style == "speakers" or style == "segments":
        items.append({**ok, "speaker_label": "spk_0"})
    else:
        items += [{**ok, "channel_label": label} for label in ("ch_0", "ch_1")]
    if style == "old-channels":
        results["channel_labels"] = {
            "channels": [
                {"channel_label": label, "items": [i for i in items if i["channel_label"] == label]}
                for label in ("ch_0", "ch_1")
            ],
            "number_of_channels": 2,
        }
        results["items"] = [{k: v for k, v in i.items() if k != "channel_label"} for i in items]
    if style == "segments":
        segments = []
        for index in range(draw(st.integers(1, 8))):
            start, end = draw(timed())
            segments.append(
                {
                    "id": index,
                    "transcript": draw(word_text),
                    "start_time": str(start),
                    "end_time": str(end),
                    "speaker_label": draw(st.sampled_from(["spk_0", "spk_1"])),
                    "items": [],
                }
            )
        results["audio_segments"] = segments
    return {"jobName": "job-1", "accountId": "111122223333", "status": "COMPLETED", "results": results}, {}


@PROPERTY_SETTINGS
@given(payload=aws_outputs(), rules=side_rules)
def test_valid_outputs_become_messages_bitrix24_accepts(payload: tuple[Any, dict[str, str]], rules: SideRules) -> None:
    body, query = payload
    result = parse(body, query)
    assert result.status == "completed" and result.transcript is not None
    check_attributable(result.transcript)
    out = build_messages(result.transcript, rules)
    assert_bitrix24_accepts(out)
    for segment in result.transcript.segments:
        assert 0 <= segment.start <= segment.end
        assert segment.channel in (None, 0, 1)  # ch_0/ch_1 are already counted from 0


@PROPERTY_SETTINGS
@given(payload=mutated(aws_outputs()))
def test_broken_outputs_give_field_named_errors_never_a_crash(payload: tuple[Any, dict[str, str]]) -> None:
    body, query = payload
    try:
        result = parse(body, query)
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
@given(payload=mutated(st.just((fixture_json("event_completed.json"), {}))))
def test_broken_events_give_field_named_errors_never_a_crash(payload: tuple[Any, dict[str, str]]) -> None:
    try:
        result = parse(copy.deepcopy(payload[0]))
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages
        return
    assert result.status in ("fetch", "failed") and result.vendor_job_id


@PROPERTY_SETTINGS
@given(body=json_values)
def test_arbitrary_json_is_refused_by_field_not_by_crash(body: Any) -> None:
    try:
        parse(body)
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages

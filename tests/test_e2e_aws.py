"""AWS Transcribe end to end: the output JSON posted as is, the EventBridge job event (direct, with the
API destination's bearer or Basic credential, or in a signed SNS envelope) fetched through boto3 from
a fake AWS (GetTranscriptionJob, then the transcript file: presigned GET or S3 GetObject), delivered
as the right MESSAGES on the right call; failures recorded; retries de-duplicated; SNS signatures
made with SNS's own algorithm accepted, forged and stale ones refused with nothing stored."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask

from app import create_app
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import INBOUND_TOKEN, admin, auth, finished_call
from tests.fake_aws import FakeAws, _self_signed, fake_aws  # noqa: F401 (the fixture)
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_new_sources import events
from tests.test_vendors_end_to_end import attached_messages, fixture, state

TOPIC = "arn:aws:sns:eu-central-1:111122223333:transcribe-jobs"
JOB = "b24-stereo-2f9c"
STEREO_CALL = [
    {"SIDE": "Client", "START_TIME": 4, "STOP_TIME": 7, "MESSAGE": "I've been on hold for an hour."},
    {"SIDE": "User", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Sorry about that."},
    {"SIDE": "Client", "START_TIME": 9, "STOP_TIME": 11, "MESSAGE": "Can you check my order?"},
    {"SIDE": "User", "START_TIME": 10, "STOP_TIME": 13, "MESSAGE": "Of course, one moment."},
]
DIARIZED_CALL = [
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Good morning, this is Anna."},
    {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 5, "MESSAGE": "Hello, I'd like to book a table."},
    {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
    {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
]
PRESIGNED = (
    f"/aws-transcribe-eu-central-1-prod/111122223333/{JOB}/asrOutput.json"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=0f1e2d3c"
)


@pytest.fixture
def aws_app(settings: Settings, db: Database, fake_aws: FakeAws) -> Flask:  # noqa: F811
    vendor = {
        "AWS_API_URL": fake_aws.url,
        "AWS_SNS_TOPIC_ARNS": TOPIC,
        "AWS_SNS_TEST_HOSTS": fake_aws.host,  # tests only: the fake serves the certificate and SubscribeURL
    }
    return create_app(settings.with_overrides(vendor=vendor))


@pytest.fixture
def drain(aws_app: Flask) -> Any:
    return Worker(aws_app.extensions["b24scribe.db"], aws_app.extensions["b24scribe.settings"], SOURCES).drain


def post(app: Flask, body: bytes, query: str = "", headers: dict[str, str] | None = None) -> Any:
    merged = {"Content-Type": "application/json", **(auth() if headers is None else headers)}
    return app.test_client().post(f"/hooks/stt/aws?{query}", data=body, headers=merged)


def job(fake: FakeAws, name: str = JOB, uri: str | None = None, tags: dict[str, str] | None = None) -> dict[str, Any]:
    described: dict[str, Any] = json.loads(fixture("aws/get_transcription_job.json"))["TranscriptionJob"]
    described["TranscriptionJobName"] = name
    described["Transcript"]["TranscriptFileUri"] = uri or fake.url + PRESIGNED
    described["Tags"] = [{"Key": key, "Value": value} for key, value in (tags or {}).items()]
    fake.add_job(described)
    return described


def sns_post(app: Flask, body: bytes, kind: str = "Notification", query: str = "") -> Any:
    """POST as SNS does: text/plain, the message type and topic in headers, no other credential."""
    headers = {
        "Content-Type": "text/plain; charset=UTF-8",
        "x-amz-sns-message-type": kind,
        "x-amz-sns-message-id": json.loads(body)["MessageId"],
        "x-amz-sns-topic-arn": TOPIC,
    }
    return app.test_client().post(f"/hooks/stt/aws?{query}", data=body, headers=headers)


def notification(event: bytes, published: datetime | None = None, message_id: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(fixture("aws/sns_notification.json"))
    message["Message"] = event.decode()
    message["Timestamp"] = (published or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    message.pop("SigningCertURL")
    if message_id:
        message["MessageId"] = message_id
    return message


def test_the_output_json_posted_as_is(aws_app: Flask, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    assert post(aws_app, fixture("aws/stereo_output.json"), f"b24_call_id={call_id}").status_code == 202
    drain()
    assert attached_messages(fake_bitrix24, call_id) == STEREO_CALL


def test_an_eventbridge_event_fetches_the_job_and_its_presigned_file(
    aws_app: Flask,
    drain: Any,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    job(fake_aws, tags={"b24scribe_b24_call_id": call_id})
    fake_aws.serve(PRESIGNED, fixture("aws/stereo_output.json"))

    response = post(aws_app, fixture("aws/event_completed.json"), f"b24_call_id={call_id}")
    assert response.status_code == 202
    drain()

    assert fake_aws.targets() == ["Transcribe.GetTranscriptionJob", f"GET {PRESIGNED}"]
    signed = fake_aws.requests[0].headers["authorization"]
    # SigV4 with the standard chain's credentials, for the event's region (no B24SCRIBE_AWS_REGION)
    assert "Credential=AKIAFAKETESTKEY00001/" in signed and "/eu-central-1/transcribe/aws4_request" in signed
    assert json.loads(fake_aws.requests[0].body) == {"TranscriptionJobName": JOB}
    assert "authorization" not in fake_aws.requests[1].headers  # a presigned URL carries its own
    assert attached_messages(fake_bitrix24, call_id) == STEREO_CALL


def test_a_file_in_the_output_bucket_is_read_through_s3_with_basic_auth_from_the_api_destination(
    settings: Settings,
    db: Database,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    vendor = {"AWS_API_URL": fake_aws.url, "AWS_REGION": "us-west-2"}
    app = create_app(settings.with_overrides(vendor=vendor))
    call_id = finished_call(fake_bitrix24.webhook_url)
    job(fake_aws, name="b24-diarized-7a1e", uri=f"{fake_aws.url}/b24scribe-transcripts/calls/b24-diarized-7a1e.json")
    fake_aws.serve("/b24scribe-transcripts/calls/b24-diarized-7a1e.json", fixture("aws/diarized_output.json"))
    event = fixture("aws/event_completed.json").replace(JOB.encode(), b"b24-diarized-7a1e")
    basic = {"Authorization": "Basic " + base64.b64encode(f"eventbridge:{INBOUND_TOKEN}".encode()).decode()}

    assert post(app, event, f"b24_call_id={call_id}", headers=basic).status_code == 202
    Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES).drain()

    get_object = fake_aws.requests[1]
    assert (get_object.method, get_object.path) == ("GET", "/b24scribe-transcripts/calls/b24-diarized-7a1e.json")
    assert "/us-west-2/s3/aws4_request" in get_object.headers["authorization"]  # B24SCRIBE_AWS_REGION wins
    assert attached_messages(fake_bitrix24, call_id) == DIARIZED_CALL


def test_a_transcript_uri_off_aws_is_never_fetched(
    aws_app: Flask,
    drain: Any,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    job(fake_aws, uri="https://attacker.example/asrOutput.json?X-Amz-Signature=1")
    assert post(aws_app, fixture("aws/event_completed.json"), "b24_call_id=externalCall.x.1").status_code == 202
    drain()
    assert fake_aws.targets() == ["Transcribe.GetTranscriptionJob"]
    [fetch] = state(aws_app, "externalCall.x.1")["jobs"]
    assert (fetch["state"], fetch["last_error"]) == (
        "dead",
        "aws TranscriptFileUri is not on an AWS host: not downloaded",
    )
    assert fake_bitrix24.calls_to("telephony.call.attachTranscription") == []


def test_tags_naming_another_call_than_the_url_stop_the_fetch(
    aws_app: Flask,
    drain: Any,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    job(fake_aws, tags={"b24scribe_pbx": "asterisk", "b24scribe_call": "1700000000.999"})
    fake_aws.serve(PRESIGNED, fixture("aws/stereo_output.json"))
    query = "pbx=asterisk&call=1700000000.123"
    assert post(aws_app, fixture("aws/event_completed.json"), query).status_code == 202
    drain()
    assert fake_aws.targets() == ["Transcribe.GetTranscriptionJob"]
    assert fake_bitrix24.calls_to("telephony.call.attachTranscription") == []
    found = aws_app.test_client().get("/v1/calls/asterisk/1700000000.123", headers=admin()).json
    [fetch] = found["jobs"]
    assert (fetch["state"], fetch["last_error"]) == ("dead", "the URL's call is not the one the job's tags name")


def test_a_failed_job_is_recorded_with_awss_reason_and_nothing_is_sent(
    aws_app: Flask,
    drain: Any,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    assert post(aws_app, fixture("aws/event_failed.json"), "b24_call_id=externalCall.f.1").status_code == 202
    drain()
    transcript = state(aws_app, "externalCall.f.1")["transcripts"][0]
    assert transcript["state"] == "failed"
    assert transcript["reason"] == json.loads(fixture("aws/event_failed.json"))["detail"]["FailureReason"]
    assert fake_aws.requests == []  # the event said it all
    assert fake_bitrix24.requests == []


def test_a_job_found_failed_by_the_fetch_is_recorded_with_its_failure_reason(
    aws_app: Flask,
    drain: Any,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    described = job(fake_aws)
    described.update(TranscriptionJobStatus="FAILED", FailureReason="Your audio file is too short.")
    described.pop("Transcript")
    assert post(aws_app, fixture("aws/event_completed.json"), "b24_call_id=externalCall.f.2").status_code == 202
    drain()
    transcript = state(aws_app, "externalCall.f.2")["transcripts"][0]
    assert (transcript["state"], transcript["reason"]) == ("failed", "Your audio file is too short.")
    assert fake_bitrix24.requests == []


def test_an_unknown_job_kills_the_fetch_saying_why(
    aws_app: Flask,
    drain: Any,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    assert post(aws_app, fixture("aws/event_completed.json"), "b24_call_id=externalCall.u.1").status_code == 202
    drain()
    [fetch] = state(aws_app, "externalCall.u.1")["jobs"]
    assert fetch["state"] == "dead" and "BadRequestException" in fetch["last_error"]
    assert fake_bitrix24.requests == []


def test_a_retried_event_is_a_duplicate(
    aws_app: Flask,
    drain: Any,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    job(fake_aws)
    fake_aws.serve(PRESIGNED, fixture("aws/stereo_output.json"))
    first = post(aws_app, fixture("aws/event_completed.json"), f"b24_call_id={call_id}")
    again = post(aws_app, fixture("aws/event_completed.json"), f"b24_call_id={call_id}")
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json["duplicate"] is True
    drain()
    assert attached_messages(fake_bitrix24, call_id) == STEREO_CALL  # exactly one attach
    assert fake_aws.targets().count("Transcribe.GetTranscriptionJob") == 1


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_signed_sns_notification_is_verified_and_delivered(
    version: str,
    aws_app: Flask,
    drain: Any,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    job(fake_aws)
    fake_aws.serve(PRESIGNED, fixture("aws/stereo_output.json"))
    body = fake_aws.sign_sns(notification(fixture("aws/event_completed.json")), version)

    first = sns_post(aws_app, body, query=f"b24_call_id={call_id}")
    # SNS retries with the same MessageId; EventBridge may publish the job's event twice (a new one)
    again = sns_post(aws_app, body, query=f"b24_call_id={call_id}")
    twice = fake_aws.sign_sns(notification(fixture("aws/event_completed.json"), message_id="m-2"), version)
    repeated = sns_post(aws_app, twice, query=f"b24_call_id={call_id}")
    assert (first.status_code, again.status_code, repeated.status_code) == (202, 200, 200)
    drain()
    assert attached_messages(fake_bitrix24, call_id) == STEREO_CALL
    cert_gets = [r for r in fake_aws.requests if r.path.endswith(".pem")]
    assert len(cert_gets) <= 1  # cached (another test may have fetched it already)


def test_forged_stale_and_foreign_sns_messages_are_401_and_nothing_is_stored(
    aws_app: Flask,
    db: Database,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    event = fixture("aws/event_completed.json")
    other_key, _ = _self_signed()
    forged = fake_aws.sign_sns(notification(event, message_id="m-forged"), key=other_key)
    stale = fake_aws.sign_sns(notification(event, datetime.now(UTC) - timedelta(hours=2), "m-stale"))
    tampered = fake_aws.sign_sns(notification(event, message_id="m-tampered")).replace(b"COMPLETED", b"FAILED")
    foreign_topic = notification(event, message_id="m-topic")
    foreign_topic["TopicArn"] = "arn:aws:sns:eu-central-1:999999999999:someone-elses"
    off_sns = notification(event, message_id="m-cert")
    off_sns["SigningCertURL"] = "https://attacker.example/SimpleNotificationService-x.pem"

    for body in (forged, stale, tampered, fake_aws.sign_sns(foreign_topic), fake_aws.sign_sns(off_sns)):
        response = sns_post(aws_app, body)
        assert (response.status_code, response.json["error"]["code"]) == (401, "bad_signature"), body
    unsigned = sns_post(aws_app, json.dumps(notification(event, message_id="m-unsigned")).encode())
    assert unsigned.status_code == 401
    assert events(db) == 0
    assert not any("attacker" in r.path for r in fake_aws.requests)


def test_a_subscription_confirmation_is_followed_to_sns_and_nothing_is_stored(
    aws_app: Flask,
    db: Database,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    confirm = f"/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=2336412f37fb"
    fake_aws.serve(confirm, b"<ConfirmSubscriptionResponse/>")
    message: dict[str, Any] = json.loads(fixture("aws/sns_subscription_confirmation.json"))
    message.update(
        SubscribeURL=fake_aws.url + confirm, Timestamp=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    )
    message.pop("SigningCertURL")

    response = sns_post(aws_app, fake_aws.sign_sns(message, "2"), kind="SubscriptionConfirmation")
    assert (response.status_code, response.get_data()) == (200, b"subscription confirmed\n")
    assert f"GET {confirm}" in fake_aws.targets()
    assert events(db) == 0

    message.update(SubscribeURL="https://sns.eu-central-1.amazonaws.com.attacker.example/?Action=ConfirmSubscription")
    refused = sns_post(aws_app, fake_aws.sign_sns(message, "2"), kind="SubscriptionConfirmation")
    assert refused.status_code == 422
    assert events(db) == 0


def test_one_eventbridge_url_for_every_call_the_jobs_tags_name_each_call(
    aws_app: Flask,
    drain: Any,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    job(fake_aws, tags={"b24scribe_b24_call_id": call_id})
    fake_aws.serve(PRESIGNED, fixture("aws/stereo_output.json"))

    response = post(aws_app, fixture("aws/event_completed.json"), "")  # the rule's URL names no call
    assert response.status_code == 202
    drain()

    assert attached_messages(fake_bitrix24, call_id) == STEREO_CALL
    found = aws_app.test_client().get(f"/v1/calls/by-b24/{call_id}", headers=admin()).json
    assert [part["state"] for part in found["transcripts"]] == ["delivered"]


def test_a_job_whose_tags_name_no_call_is_dead_saying_how_to_name_it(
    aws_app: Flask,
    drain: Any,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    job(fake_aws, tags={"team": "support"})
    fake_aws.serve(PRESIGNED, fixture("aws/stereo_output.json"))
    assert post(aws_app, fixture("aws/event_completed.json"), "").status_code == 202
    drain()
    dead = aws_app.test_client().get("/v1/jobs?state=dead", headers=admin()).json
    [fetch] = [j for j in dead["jobs"] if j["kind"] == "fetch"]
    assert "neither the callback nor the vendor's job names the call" in fetch["last_error"]
    assert "b24_call_id" in fetch["last_error"]
    assert fake_bitrix24.calls_to("telephony.call.attachTranscription") == []


def test_a_failed_job_named_only_by_its_tags_is_recorded_on_that_call(
    aws_app: Flask,
    drain: Any,
    fake_bitrix24: FakeBitrix24,
    fake_aws: FakeAws,  # noqa: F811
) -> None:
    described = job(fake_aws, name="b24-failed-0c3d", tags={"b24scribe_b24_call_id": "externalCall.f.3"})
    described.update(TranscriptionJobStatus="FAILED", FailureReason="Your audio file is too short.")
    described.pop("Transcript")
    assert post(aws_app, fixture("aws/event_failed.json"), "").status_code == 202  # the rule's URL names no call
    drain()
    transcript = state(aws_app, "externalCall.f.3")["transcripts"][0]
    assert transcript["state"] == "failed"
    assert transcript["reason"] == json.loads(fixture("aws/event_failed.json"))["detail"]["FailureReason"]
    assert fake_bitrix24.requests == []

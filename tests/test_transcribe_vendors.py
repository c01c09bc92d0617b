"""b24scribe asks AssemblyAI or Rev.ai itself (contract §10), end to end against fakes that call back as
those vendors do: one generic PBX event in, the recording uploaded to the vendor, the vendor's
callback (which carries only the job) let in by the call's own credential in the vendor's header,
the transcript fetched, and the call registered, finished, its recording and its transcript attached
with exact MESSAGES. Exactly one vendor job per call, whatever answer is lost; a callback without the
call's credential is refused; a 429 backs off; a mono recording asks for diarization."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask

from b24scribe.callbacks import callback_secret, callback_url
from b24scribe.checks import check_transcription_vendor
from b24scribe.db import Database
from b24scribe.delivery.submit import SUBMITTERS, AssemblyAI, Submission
from b24scribe.models import InboundEvent, Job
from b24scribe.settings import Settings, load_settings
from bench.recording import RecordingServer
from schemas.registry import SOURCES
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai import Submission as AssemblyAISubmission
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_revai import FakeRevAI
from tests.fake_revai import Submission as RevAISubmission
from tests.transcribe_support import (
    ORDER,
    call_row,
    drain_until,
    finished,
    methods,
    own_secret,
    post_event,
)

VENDORS = ["assemblyai", "revai"]
# what both fakes serve for a stereo recording (the fixtures tests/test_vendors_end_to_end.py serves):
# channel 1, the employee, greets first
STEREO_SUPPORT_CALL = [
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
    {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
    {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
]

Fake = FakeAssemblyAI | FakeRevAI


def vendor_keys(fake_assemblyai: FakeAssemblyAI, fake_revai: FakeRevAI) -> dict[str, str]:
    return {
        "ASSEMBLYAI_API_KEY": fake_assemblyai.api_key,
        "ASSEMBLYAI_API_URL": fake_assemblyai.url,
        "REVAI_API_KEY": fake_revai.api_key,
        "REVAI_API_URL": fake_revai.url,
    }


@pytest.fixture
def service(
    public_app: Callable[..., tuple[Flask, str]], fake_assemblyai: FakeAssemblyAI, fake_revai: FakeRevAI
) -> Callable[..., tuple[Flask, str]]:
    """Start the app over real HTTP (the vendor calls it back) with transcription requests to `vendor`."""
    keys = vendor_keys(fake_assemblyai, fake_revai)
    return lambda vendor, **overrides: public_app(**({"transcribe_with": vendor, "vendor": keys} | overrides))


def the_fake(request: pytest.FixtureRequest, vendor: str) -> Fake:
    fake: Fake = request.getfixturevalue(f"fake_{vendor}")
    return fake


def job_id(submission: AssemblyAISubmission | RevAISubmission) -> str:
    """The vendor's job id of a submission the fake took."""
    return submission.transcript_id if isinstance(submission, AssemblyAISubmission) else submission.job_id


def test_assemblyai_gets_the_uploaded_stereo_recording_and_the_call_ends_with_its_exact_transcript(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_assemblyai: FakeAssemblyAI,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, public = service("assemblyai")
    url = recordings.add("rec-a1", 400_000)
    post_event(app, finished("1700000000.1", url))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (upload,) = fake_assemblyai.uploads  # the bytes went to /v2/upload, then by their upload_url
    assert upload.sha256 == recordings.served(url).sha256
    (submission,) = fake_assemblyai.submissions
    body = submission.body
    assert body["audio_url"] == upload.upload_url and submission.from_upload
    assert body["multichannel"] is True and "speaker_labels" not in body
    webhook = urlsplit(body["webhook_url"])
    assert f"{webhook.scheme}://{webhook.netloc}" == public  # no credential in the URL: no userinfo ...
    assert webhook.path == "/hooks/stt/assemblyai"
    assert parse_qs(webhook.query) == {"pbx": ["generic"], "call": ["1700000000.1"]}  # ... and no ?token=
    # the call's own credential, in the header /hooks/stt/assemblyai reads
    assert body["webhook_auth_header_name"] == SOURCES.stt["assemblyai"].auth_header == AssemblyAI.auth_header
    assert body["webhook_auth_header_value"] == own_secret(app, "assemblyai", "1700000000.1")
    (callback,) = fake_assemblyai.wait_for_callbacks()
    assert callback.status == 202
    assert callback.json() == {"transcript_id": submission.transcript_id, "status": "completed"}

    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL
    row = call_row(db, "1700000000.1")
    assert (row.transcription_state, row.transcription_job_id) == ("submitted", submission.transcript_id)


def test_revai_gets_the_stereo_recording_as_multipart_and_the_call_ends_with_its_exact_transcript(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_revai: FakeRevAI,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, public = service("revai")
    url = recordings.add("rec-r1", 400_000)
    post_event(app, finished("1700000000.1", url))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (submission,) = fake_revai.submissions
    assert submission.body_kind == "multipart" and submission.audio_sha256 == recordings.served(url).sha256
    assert (submission.media_filename, submission.media_content_type) == ("recording.wav", "audio/wav")
    options = submission.options
    assert options["speaker_channels_count"] == 2 and "skip_diarization" not in options
    assert options["metadata"] == "pbx=generic&call=1700000000.1"  # what /hooks/stt/revai reads back
    notification = options["notification_config"]
    assert notification["auth_headers"] == {"Authorization": f"Bearer {own_secret(app, 'revai', '1700000000.1')}"}
    target = urlsplit(notification["url"])
    assert f"{target.scheme}://{target.netloc}" == public and target.path == "/hooks/stt/revai"
    assert parse_qs(target.query) == {  # no ?token=; the channel count, so speakers read as channels
        "pbx": ["generic"],
        "call": ["1700000000.1"],
        "speaker_channels_count": ["2"],
    }
    # Rev.ai counts only a 200 as delivered and sends again after our 202: that second one is a duplicate
    callback, *again = fake_revai.wait_for_callbacks()
    assert callback.status == 202 and callback.json()["job"]["status"] == "transcribed"
    assert all(repeat.status == 200 for repeat in again)

    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL
    row = call_row(db, "1700000000.1")
    assert (row.transcription_state, row.transcription_job_id) == ("submitted", submission.job_id)


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_mono_recording_asks_for_diarization(
    vendor: str,
    request: pytest.FixtureRequest,
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
) -> None:
    fake = the_fake(request, vendor)
    app, _ = service(vendor)
    fake.hold_callbacks()  # only the submission matters
    post_event(app, finished("1700000000.2", recordings.add("rec-m", 100_000), recording_channels=1))
    drain_until(app, lambda: bool(fake.submissions))

    (submission,) = fake.submissions
    if isinstance(submission, AssemblyAISubmission):
        assert submission.body["speaker_labels"] is True and "multichannel" not in submission.body
    else:  # Rev.ai diarizes unless told to skip it, and reads no channels
        assert "speaker_channels_count" not in submission.options and "skip_diarization" not in submission.options
        assert "speaker_channels_count" not in parse_qs(urlsplit(submission.notification["url"]).query)


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_recording_the_vendor_can_fetch_goes_by_url_and_the_vendor_reads_those_bytes(
    vendor: str,
    request: pytest.FixtureRequest,
    settings: Settings,
    fake_assemblyai: FakeAssemblyAI,
    fake_revai: FakeRevAI,
    recordings: RecordingServer,
) -> None:
    fake = the_fake(request, vendor)
    fake.hold_callbacks()
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com",
        transcribe_with=vendor,
        vendor=vendor_keys(fake_assemblyai, fake_revai),
    )
    url = recordings.add("rec-u", 150_000)
    metadata = (("b24scribe_pbx", "generic"), ("b24scribe_call", "1700000000.3"))
    target = callback_url(configured, vendor, configured.portal, "generic", "1700000000.3", "query")
    with requests.Session() as http:
        taken = SUBMITTERS[vendor].submit(http, configured, Submission(metadata, target, 2, url=url))

    (submission,) = fake.submissions
    assert taken == job_id(submission)
    deadline = time.monotonic() + 5
    while submission.audio_sha256 is None and time.monotonic() < deadline:  # the vendor fetches it itself
        time.sleep(0.02)
    assert submission.audio_sha256 == recordings.served(url).sha256
    if isinstance(submission, AssemblyAISubmission):
        assert submission.body["audio_url"] == url and fake_assemblyai.uploads == []
    else:
        assert submission.body_kind == "url" and submission.options["source_config"] == {"url": url}


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_lost_answer_is_looked_up_and_never_makes_a_second_vendor_job(
    vendor: str,
    request: pytest.FixtureRequest,
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    fake = the_fake(request, vendor)
    app, _ = service(vendor)
    fake.drop_after_accept()  # the vendor took it, its answer never came back
    post_event(app, finished("1700000000.5", recordings.add("rec-5", 200_000)))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert len(fake.submissions) == 1
    assert fake.submissions[0].answered is None  # the answer was indeed lost
    assert call_row(db, "1700000000.5").transcription_job_id == job_id(fake.submissions[0])
    assert methods(fake_bitrix24) == ORDER


def credential(vendor: str, secret: str) -> dict[str, str]:
    """The header the vendor sends the callback's credential back in."""
    if vendor == "assemblyai":
        return {AssemblyAI.auth_header: secret}
    return {"Authorization": f"Bearer {secret}"}


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_callback_without_the_calls_own_credential_is_refused_and_nothing_is_stored(
    vendor: str, service: Callable[..., tuple[Flask, str]], db: Database
) -> None:
    app, _ = service(vendor)
    client = app.test_client()
    body = (
        {"transcript_id": "5552493-16d8-42d8-8feb-c2a16b56f6e8", "status": "completed"}
        if vendor == "assemblyai"
        else {"job": {"id": "Umx5c6F7pH7r", "status": "transcribed"}}
    )
    hook = f"/hooks/stt/{vendor}?pbx=generic&call=1700000000.6"
    settings: Settings = app.extensions["b24scribe.settings"]
    other_call = callback_secret(settings, vendor, settings.portal, "generic", "1700000000.7") or ""
    other_vendor = callback_secret(settings, "deepgram", settings.portal, "generic", "1700000000.6") or ""
    for wrong in ("0" * 40, other_call, other_vendor):
        refused = client.post(hook, json=body, headers=credential(vendor, wrong))
        assert refused.status_code == 401, wrong
    with db.read() as session:
        assert session.query(InboundEvent).count() == 0

    let_in = client.post(hook, json=body, headers=credential(vendor, own_secret(app, vendor, "1700000000.6")))
    assert let_in.status_code == 202  # the call's own credential opens its own callback
    with db.read() as session:
        assert session.query(InboundEvent).count() == 1


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_vendor_429_backs_off_for_its_retry_after_without_spending_an_attempt(
    vendor: str,
    request: pytest.FixtureRequest,
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    fake = the_fake(request, vendor)
    app, _ = service(vendor)
    fake.fail_next(429, retry_after=120)
    post_event(app, finished("1700000000.8", recordings.add("rec-8", 100_000)))
    before = time.time()
    drain_until(app, lambda: bool(fake.submissions))
    drain_until(app, lambda: True)

    assert [s.answered for s in fake.submissions] == [429]  # nothing more within the back-off
    with db.read() as session:
        job = session.query(Job).filter(Job.kind == "transcribe").one()
        assert job.state == "pending" and job.attempts == 0
        assert 100 <= job.next_attempt_at - before <= 130
        assert f"{vendor} answered HTTP 429" in (job.last_error or "")


@pytest.mark.parametrize(
    ("vendor", "shown"),
    [
        ("assemblyai", "assemblyai answered HTTP 401: Authentication error, API token missing/invalid"),
        ("revai", "revai answered HTTP 401: Authorization has been denied for this request"),
    ],
)
def test_a_rejected_submission_is_shown_on_the_call_with_the_vendors_reason(
    vendor: str,
    shown: str,
    request: pytest.FixtureRequest,
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    fake = the_fake(request, vendor)
    app, _ = service(vendor)
    fake.fail_next(401)
    post_event(app, finished("1700000000.9", recordings.add("rec-9", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000000.9").transcription_state == "failed")
    assert call_row(db, "1700000000.9").transcription_error == shown
    assert len(fake.submissions) == 1  # not retried


@pytest.mark.parametrize("vendor", VENDORS)
def test_check_tries_the_vendor_key_with_a_harmless_request(
    vendor: str,
    request: pytest.FixtureRequest,
    settings: Settings,
    fake_assemblyai: FakeAssemblyAI,
    fake_revai: FakeRevAI,
) -> None:
    fake = the_fake(request, vendor)
    keys = vendor_keys(fake_assemblyai, fake_revai)
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com", transcribe_with=vendor, vendor=keys
    )
    (good,) = check_transcription_vendor(configured)
    assert good.level == "ok"
    wrong = configured.with_overrides(vendor=keys | {f"{vendor.upper()}_API_KEY": "nope"})
    (bad,) = check_transcription_vendor(wrong)
    assert bad.level == "problem" and f"{vendor} answered HTTP 401" in bad.message
    assert fake.submissions == []  # nothing was submitted


@pytest.mark.parametrize("vendor", VENDORS)
def test_transcribe_with_accepts_the_vendor(vendor: str) -> None:
    environ = {
        "B24SCRIBE_PUBLIC_URL": "https://b24scribe.example.com",
        "B24SCRIBE_INBOUND_TOKEN": "t" * 20,
        "B24SCRIBE_TRANSCRIBE_WITH": vendor.upper(),
    }
    assert load_settings(environ, dotenv=False).transcribe_with == vendor

"""b24scribe asks ElevenLabs itself (contract §10), end to end against a fake that answers and calls
back as ElevenLabs does: one generic PBX event in, the recording sent as a multipart form with the
call named in `webhook_metadata`, the workspace webhook's event (signed with ElevenLabs-Signature, no
per-call URL or credential) let in by its signature, and the call registered, finished, its
recording and its exact transcript attached. ElevenLabs lists no jobs, so a lost answer is never
submitted again: the webhook still brings the transcript, or the call says why none came. A webhook
the callback did not bring in time is read back by its transcription id; a forged signature is
refused; a 429 backs off; a 4xx is shown with ElevenLabs' own message."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import requests
from flask import Flask
from sqlalchemy import update

from b24scribe.checks import check_transcription_vendor
from b24scribe.db import Database
from b24scribe.delivery.submit import SUBMITTERS, Submission
from b24scribe.delivery.submit_elevenlabs import ANSWER_LOST
from b24scribe.models import Job
from b24scribe.settings import Settings, load_settings
from bench.recording import RecordingServer
from tests.conftest import auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_elevenlabs_stt import FakeElevenLabs, sign
from tests.fake_elevenlabs_stt import Submission as ElevenLabsSubmission
from tests.test_transcribe_vendors import STEREO_SUPPORT_CALL
from tests.transcribe_support import (
    ORDER,
    call_row,
    drain_until,
    finished,
    methods,
    post_event,
    stt_events,
    transcribe_job,
    worker_of,
)

TIMEOUT_MINUTES = 0.01  # 0.6 s: the fake finishes a job in 0.2 s
# what the fake serves for a mono recording (tests/fixtures/elevenlabs/diarized_webhook.json, as
# tests/test_e2e_elevenlabs.py reads it): speaker_0, the employee of an inbound call, first
DIARIZED_CALL = [
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
    {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
    {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
    {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
]


def keys(fake: FakeElevenLabs) -> dict[str, str]:
    return {
        "ELEVENLABS_API_KEY": fake.api_key,
        "ELEVENLABS_API_URL": fake.url,
        "ELEVENLABS_WEBHOOK_SECRET": fake.webhook_secret,
    }


@pytest.fixture
def fake_elevenlabs() -> Iterator[FakeElevenLabs]:
    """The fake's own fixture (tests/fake_elevenlabs_stt.py), here while conftest.py does not load that module."""
    fake = FakeElevenLabs().start()
    yield fake
    fake.stop()


@pytest.fixture
def service(
    public_app: Callable[..., tuple[Flask, str]], fake_elevenlabs: FakeElevenLabs
) -> Callable[..., tuple[Flask, str]]:
    """Start the app over real HTTP transcribing with ElevenLabs, and point the fake workspace's
    webhook at its /hooks/stt/elevenlabs (`vendor` settings are added to the fake's keys)."""

    def start(vendor: dict[str, str] | None = None, **overrides: object) -> tuple[Flask, str]:
        settings = keys(fake_elevenlabs) | (vendor or {})
        app, public = public_app(transcribe_with="elevenlabs", vendor=settings, **overrides)
        fake_elevenlabs.webhook_url = f"{public}/hooks/stt/elevenlabs"
        return app, public

    return start


def job_id(submission: ElevenLabsSubmission) -> str:
    """What b24scribe keeps of an ElevenLabs job: the transcription id, then the webhook's request id."""
    return f"{submission.transcription_id}/{submission.request_id}"


def test_a_stereo_recording_is_uploaded_for_multichannel_and_the_signed_webhook_puts_its_exact_transcript_on_the_card(
    service: Callable[..., tuple[Flask, str]],
    fake_elevenlabs: FakeElevenLabs,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, public = service()
    url = recordings.add("rec-e1", 400_000)
    post_event(app, finished("1700000000.1", url))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (submission,) = fake_elevenlabs.submissions
    assert submission.api_key == fake_elevenlabs.api_key
    assert submission.audio_sha256 == recordings.served(url).sha256  # the bytes, as the `file` part
    assert (submission.file_name, submission.file_content_type) == ("recording.wav", "audio/wav")
    assert submission.fields == {
        "model_id": "scribe_v2",
        "timestamps_granularity": "word",
        "use_multi_channel": "true",  # one speaker per channel; no diarization
        "webhook": "true",
        "webhook_metadata": '{"b24scribe_pbx": "generic", "b24scribe_call": "1700000000.1"}',
    }  # no callback URL, no credential: the webhook is the workspace's own
    (callback,) = fake_elevenlabs.wait_for_callbacks()
    assert callback.url == f"{public}/hooks/stt/elevenlabs"  # no query: the metadata names the call
    assert callback.headers["ElevenLabs-Signature"].startswith("t=") and "Authorization" not in callback.headers
    assert callback.status == 202

    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL
    row = call_row(db, "1700000000.1")
    assert (row.transcription_state, row.transcription_job_id) == ("submitted", job_id(submission))


def test_a_mono_recording_asks_for_diarization_with_the_configured_model_language_and_webhook(
    service: Callable[..., tuple[Flask, str]],
    fake_elevenlabs: FakeElevenLabs,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
) -> None:
    settings = {"ELEVENLABS_MODEL": "scribe_v1", "ELEVENLABS_LANGUAGE": "en", "ELEVENLABS_WEBHOOK_ID": "wh_b24scribe"}
    app, _ = service(settings)
    post_event(app, finished("1700000000.2", recordings.add("rec-e2", 100_000), recording_channels=1))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    (submission,) = fake_elevenlabs.submissions
    fields = submission.fields
    assert fields["diarize"] == "true" and "use_multi_channel" not in fields
    assert (fields["model_id"], fields["language_code"], fields["webhook_id"]) == ("scribe_v1", "en", "wh_b24scribe")
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == DIARIZED_CALL


def test_a_recording_elevenlabs_can_fetch_goes_as_source_url_and_elevenlabs_reads_those_bytes(
    settings: Settings, fake_elevenlabs: FakeElevenLabs, recordings: RecordingServer
) -> None:
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com", transcribe_with="elevenlabs", vendor=keys(fake_elevenlabs)
    )
    url = recordings.add("rec-e3", 150_000)
    metadata = (("b24scribe_pbx", "generic"), ("b24scribe_call", "1700000000.3"), ("b24scribe_portal", "other"))
    target = "https://b24scribe.example.com/hooks/stt/elevenlabs?pbx=generic&call=1700000000.3"
    with requests.Session() as http:
        taken = SUBMITTERS["elevenlabs"].submit(http, configured, Submission(metadata, target, 2, url=url))

    (submission,) = fake_elevenlabs.submissions
    assert taken == job_id(submission)
    assert submission.fields["source_url"] == url and submission.file_name is None
    assert submission.metadata == dict(metadata)
    deadline = time.monotonic() + 5
    while submission.audio_sha256 is None and time.monotonic() < deadline:  # ElevenLabs fetches it itself
        time.sleep(0.02)
    assert submission.audio_sha256 == recordings.served(url).sha256


def test_a_lost_answer_is_never_submitted_again_and_the_webhook_still_brings_the_transcript(
    service: Callable[..., tuple[Flask, str]],
    fake_elevenlabs: FakeElevenLabs,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_elevenlabs.drop_after_accept()  # ElevenLabs took it, its answer never came back
    post_event(app, finished("1700000000.5", recordings.add("rec-e5", 200_000)))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    (submission,) = fake_elevenlabs.submissions  # exactly one ElevenLabs job
    assert submission.answered is None  # the answer was indeed lost
    assert methods(fake_bitrix24) == ORDER
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL
    row = call_row(db, "1700000000.5")
    assert (row.transcription_state, row.transcription_job_id) == ("submitted", ANSWER_LOST)


def test_a_lost_answer_whose_webhook_never_comes_fails_the_call_with_the_reason_and_is_not_resubmitted(
    service: Callable[..., tuple[Flask, str]],
    fake_elevenlabs: FakeElevenLabs,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service(transcribe_timeout_minutes=TIMEOUT_MINUTES)
    fake_elevenlabs.drop_after_accept()
    fake_elevenlabs.hold_callbacks()  # the webhook never comes
    post_event(app, finished("1700000000.6", recordings.add("rec-e6", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000000.6").transcription_state == "failed")

    error = call_row(db, "1700000000.6").transcription_error or ""
    assert error.startswith("elevenlabs could not transcribe the recording: its answer to the submission was lost")
    assert error.endswith("retry the call to submit it again")
    assert len(fake_elevenlabs.submissions) == 1 and fake_elevenlabs.reads == []  # nothing to ask for
    assert transcribe_job(db).state == "dead"
    assert methods(fake_bitrix24) == ORDER[:3]  # the recording is on the card, no transcript


def test_a_worker_that_died_before_sending_is_followed_by_a_submission_not_a_wait(
    service: Callable[..., tuple[Flask, str]],
    fake_elevenlabs: FakeElevenLabs,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    """A worker killed while downloading the recording leaves its job ambiguous, like one killed
    mid-request; but the call never reached `sending`, so nothing went out: submit it."""
    app, _ = service()
    post_event(app, finished("1700000000.8", recordings.add("rec-e8", 100_000)))
    worker_of(app).fold()
    with db.write() as session:  # taken back from a dead worker (`reclaim_dead_workers`)
        session.execute(update(Job).where(Job.kind == "transcribe").values(ambiguous=True))
    assert call_row(db, "1700000000.8").transcription_state == "queued"
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    (submission,) = fake_elevenlabs.submissions
    row = call_row(db, "1700000000.8")
    assert row.transcription_state == "submitted" and row.transcription_job_id != ANSWER_LOST


def test_a_webhook_signed_with_another_secret_is_refused_and_nothing_is_stored(
    service: Callable[..., tuple[Flask, str]],
    fake_elevenlabs: FakeElevenLabs,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    secret = fake_elevenlabs.webhook_secret  # the one b24scribe holds
    fake_elevenlabs.webhook_secret = "wsec_someone_elses_workspace"
    post_event(app, finished("1700000000.7", recordings.add("rec-e7", 100_000)))
    drain_until(app, lambda: bool(fake_elevenlabs.callbacks))

    (refused,) = fake_elevenlabs.wait_for_callbacks()  # a 4xx: ElevenLabs does not send it again
    assert refused.status == 401
    # nor does a body signed right but with a stale timestamp, or with no signature and a wrong token
    client = app.test_client()
    hook = "/hooks/stt/elevenlabs"
    stale = sign(secret, int(time.time()) - 3600, refused.body)
    assert client.post(hook, data=refused.body, headers={"ElevenLabs-Signature": stale}).status_code == 401
    assert client.post(hook, data=refused.body, headers=auth("not-the-token")).status_code == 401
    drain_until(app, lambda: True)
    assert stt_events(db) == 0
    assert "telephony.call.attachtranscription" not in methods(fake_bitrix24)


def test_a_429_backs_off_for_its_retry_after_without_spending_an_attempt(
    service: Callable[..., tuple[Flask, str]],
    fake_elevenlabs: FakeElevenLabs,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_elevenlabs.fail_next(429, retry_after=120)
    post_event(app, finished("1700000000.8", recordings.add("rec-e8", 100_000)))
    before = time.time()
    drain_until(app, lambda: bool(fake_elevenlabs.submissions))
    drain_until(app, lambda: True)

    assert [s.answered for s in fake_elevenlabs.submissions] == [429]  # nothing more within the back-off
    job = transcribe_job(db)
    assert job.state == "pending" and job.attempts == 0
    assert 100 <= job.next_attempt_at - before <= 130
    assert "elevenlabs answered HTTP 429: Too many concurrent requests" in (job.last_error or "")


@pytest.mark.parametrize(
    ("refusal", "shown"),
    [
        ("key", "elevenlabs answered HTTP 401: Invalid API key"),
        ("model", "elevenlabs answered HTTP 422: model_id: must be one of scribe_v1, scribe_v2"),
    ],
)
def test_a_rejected_submission_is_shown_on_the_call_with_elevenlabs_own_message(
    refusal: str,
    shown: str,
    service: Callable[..., tuple[Flask, str]],
    fake_elevenlabs: FakeElevenLabs,
    recordings: RecordingServer,
    db: Database,
) -> None:
    wrong = {"ELEVENLABS_API_KEY": "revoked"} if refusal == "key" else {"ELEVENLABS_MODEL": "scribe_v9"}
    app, _ = service(wrong)
    post_event(app, finished("1700000000.9", recordings.add("rec-e9", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000000.9").transcription_state == "failed")

    assert call_row(db, "1700000000.9").transcription_error == shown
    assert len(fake_elevenlabs.submissions) == 1  # not retried
    assert transcribe_job(db).state == "dead"


def test_when_the_webhook_does_not_come_the_transcript_is_read_back_and_the_late_webhook_is_a_duplicate(
    service: Callable[..., tuple[Flask, str]],
    fake_elevenlabs: FakeElevenLabs,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service(transcribe_timeout_minutes=TIMEOUT_MINUTES)
    fake_elevenlabs.hold_callbacks()  # ElevenLabs finishes the job, its webhook does not come
    post_event(app, finished("1700000001.1", recordings.add("rec-e10", 200_000)))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL
    (submission,) = fake_elevenlabs.submissions
    assert fake_elevenlabs.reads == [fake_elevenlabs.transcript_path(submission)]
    assert fake_elevenlabs.callbacks == []
    assert transcribe_job(db).state == "done"

    fake_elevenlabs.release_callbacks()  # the webhook comes after all: the same transcript, stored once
    (late,) = fake_elevenlabs.wait_for_callbacks()
    assert late.status == 200  # the hook's answer to a duplicate
    drain_until(app, lambda: True)
    assert methods(fake_bitrix24).count("telephony.call.attachtranscription") == 1
    assert stt_events(db) == 1


def test_a_transcript_elevenlabs_does_not_have_when_the_wait_is_over_fails_the_call_with_the_reason(
    service: Callable[..., tuple[Flask, str]],
    fake_elevenlabs: FakeElevenLabs,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service(transcribe_timeout_minutes=TIMEOUT_MINUTES)
    fake_elevenlabs.hold_callbacks()
    fake_elevenlabs.keep_processing()  # no transcript to read back
    post_event(app, finished("1700000001.2", recordings.add("rec-e11", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000001.2").transcription_state == "failed")

    (submission,) = fake_elevenlabs.submissions
    assert fake_elevenlabs.reads == [fake_elevenlabs.transcript_path(submission)]
    assert call_row(db, "1700000001.2").transcription_error == (
        f"elevenlabs could not transcribe the recording: ElevenLabs has no transcript {submission.transcription_id} "
        "and its webhook did not come: the job failed, or the workspace webhook does not point at /hooks/stt/elevenlabs"
    )
    assert methods(fake_bitrix24) == ORDER[:3]


def test_check_tries_the_key_with_a_harmless_read_and_submits_nothing(
    settings: Settings, fake_elevenlabs: FakeElevenLabs
) -> None:
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com", transcribe_with="elevenlabs", vendor=keys(fake_elevenlabs)
    )
    (good,) = check_transcription_vendor(configured)
    assert good.level == "ok"
    wrong = configured.with_overrides(vendor=keys(fake_elevenlabs) | {"ELEVENLABS_API_KEY": "nope"})
    (bad,) = check_transcription_vendor(wrong)
    assert bad.level == "problem" and "elevenlabs answered HTTP 401: Invalid API key" in bad.message
    assert fake_elevenlabs.submissions == []
    # one transcript no one has, asked for with the right key (the wrong one is refused before)
    assert fake_elevenlabs.reads == ["/v1/speech-to-text/transcripts/b24scribe-key-check"]
    unsigned = {k: v for k, v in keys(fake_elevenlabs).items() if k != "ELEVENLABS_WEBHOOK_SECRET"}
    works, unsafe = check_transcription_vendor(configured.with_overrides(vendor=unsigned))
    assert works.level == "ok" and unsafe.level == "warning"
    assert "B24SCRIBE_ELEVENLABS_WEBHOOK_SECRET is not set" in unsafe.message


def test_transcribe_with_accepts_elevenlabs() -> None:
    environ = {
        "B24SCRIBE_PUBLIC_URL": "https://b24scribe.example.com",
        "B24SCRIBE_INBOUND_TOKEN": "t" * 20,
        "B24SCRIBE_TRANSCRIBE_WITH": "ElevenLabs",
    }
    assert load_settings(environ, dotenv=False).transcribe_with == "elevenlabs"

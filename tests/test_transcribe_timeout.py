"""A vendor whose callback does not come within B24SCRIBE_TRANSCRIBE_TIMEOUT_MINUTES (contract §10) is
asked how its job stands, end to end against fake AssemblyAI and Rev.ai whose callbacks are held: a
finished job's transcript still ends on the card, with exact MESSAGES (the job asked, then the
transcript fetched), and the callback that comes late is a duplicate; a job still processing is
waited for and asked again, up to three periods in all; a failed job, or a status the vendor
refuses to show, is shown on the call with the reason. (Deepgram, which has no status to ask, is
tests/test_transcribe.py's.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from b24scribe.db import Database
from b24scribe.models import InboundEvent
from bench.recording import RecordingServer
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_revai import FakeRevAI
from tests.test_transcribe_vendors import STEREO_SUPPORT_CALL, VENDORS, Fake, job_id, the_fake, vendor_keys
from tests.transcribe_support import ORDER, call_row, drain_until, finished, methods, post_event, transcribe_job

TIMEOUT_MINUTES = 0.01  # 0.6 s: the fakes finish a job in 0.2 s
NO_SPEECH = "The audio file has no speech in it."


@pytest.fixture
def service(
    public_app: Callable[..., tuple[Flask, str]], fake_assemblyai: FakeAssemblyAI, fake_revai: FakeRevAI
) -> Callable[[str], Flask]:
    """Start the app over real HTTP, transcribing with `vendor` and a tiny callback timeout."""
    keys = vendor_keys(fake_assemblyai, fake_revai)
    settings = {"transcribe_timeout_minutes": TIMEOUT_MINUTES, "vendor": keys}
    return lambda vendor: public_app(transcribe_with=vendor, **settings)[0]


def status_path(fake: Fake, vendor_job_id: str) -> str:
    """What the vendor is asked for a job's status."""
    if isinstance(fake, FakeAssemblyAI):
        return f"/v2/transcript/{vendor_job_id}"
    return f"/speechtotext/v1/jobs/{vendor_job_id}"


def transcript_path(fake: Fake, vendor_job_id: str) -> str:
    """What the transcript is fetched from (AssemblyAI: the same transcript, now completed)."""
    if isinstance(fake, FakeAssemblyAI):
        return f"/v2/transcript/{vendor_job_id}"
    return f"/speechtotext/v1/jobs/{vendor_job_id}/transcript"


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_vendor_that_never_calls_back_is_asked_and_the_transcript_still_ends_on_the_card(
    vendor: str,
    request: pytest.FixtureRequest,
    service: Callable[[str], Flask],
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    fake = the_fake(request, vendor)
    app = service(vendor)
    fake.hold_callbacks()  # the vendor finishes the job, its callback never comes
    post_event(app, finished("1700000002.1", recordings.add("rec-t1", 200_000)))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL  # stereo: Rev.ai's channels read as channels
    assert fake.callbacks == []
    (submission,) = fake.submissions
    vendor_job_id = job_id(submission)
    assert fake.reads == [status_path(fake, vendor_job_id), transcript_path(fake, vendor_job_id)]
    row = call_row(db, "1700000002.1")
    assert (row.transcription_state, row.transcription_error) == ("submitted", None)
    assert transcribe_job(db).state == "done"

    fake.release_callbacks()  # the callback comes after all: the same transcript, stored once
    (late,) = fake.wait_for_callbacks()
    assert late.status == 200  # the hook's answer to a duplicate
    drain_until(app, lambda: True)
    assert methods(fake_bitrix24).count("telephony.call.attachtranscription") == 1
    with db.read() as session:
        assert session.query(InboundEvent).filter(InboundEvent.source == "stt").count() == 1


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_job_still_processing_is_asked_again_later_and_not_failed_at_once(
    vendor: str,
    request: pytest.FixtureRequest,
    service: Callable[[str], Flask],
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    fake = the_fake(request, vendor)
    app = service(vendor)
    fake.hold_callbacks()
    fake.keep_processing()
    post_event(app, finished("1700000002.2", recordings.add("rec-t2", 200_000)))
    drain_until(app, lambda: len(fake.reads) >= 1)  # the first period is over: asked once
    drain_until(app, lambda: transcribe_job(db).state == "pending")

    job = transcribe_job(db)
    assert job.attempts == 0 and f"{vendor} says the job is still processing" in (job.last_error or "")
    assert call_row(db, "1700000002.2").transcription_state == "submitted"  # not failed

    fake.finish_processing()
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL
    vendor_job_id = job_id(fake.submissions[0])
    *asked, fetched = fake.reads
    assert len(asked) >= 2 and set(asked) == {status_path(fake, vendor_job_id)}
    assert fetched == transcript_path(fake, vendor_job_id)
    assert call_row(db, "1700000002.2").transcription_state == "submitted"


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_job_processing_for_three_periods_fails_with_the_reason(
    vendor: str,
    request: pytest.FixtureRequest,
    service: Callable[[str], Flask],
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    fake = the_fake(request, vendor)
    app = service(vendor)
    fake.hold_callbacks()
    fake.keep_processing()
    post_event(app, finished("1700000002.3", recordings.add("rec-t3", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000002.3").transcription_state == "failed")

    row = call_row(db, "1700000002.3")
    assert row.transcription_error == f"{vendor} was still processing the recording after 0.03 minutes"
    assert fake.reads == [status_path(fake, job_id(fake.submissions[0]))] * 3  # once a period
    job = transcribe_job(db)
    assert job.state == "dead" and job.last_error == row.transcription_error
    assert row.transcription_submitted_at is not None
    assert job.updated_at - row.transcription_submitted_at >= 3 * TIMEOUT_MINUTES * 60 - 0.05
    assert "telephony.call.attachtranscription" not in methods(fake_bitrix24)


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_failed_vendor_job_shows_its_reason_on_the_call(
    vendor: str,
    request: pytest.FixtureRequest,
    service: Callable[[str], Flask],
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    fake = the_fake(request, vendor)
    app = service(vendor)
    fake.hold_callbacks()
    fake.fail_jobs(NO_SPEECH)
    post_event(app, finished("1700000002.4", recordings.add("rec-t4", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000002.4").transcription_state == "failed")

    row = call_row(db, "1700000002.4")
    assert row.transcription_error == f"{vendor} could not transcribe the recording: {NO_SPEECH}"
    job = transcribe_job(db)
    assert job.state == "dead" and job.last_error == row.transcription_error
    assert len(fake.submissions) == 1  # not submitted again
    assert methods(fake_bitrix24) == ORDER[:3]  # the recording is on the card, no transcript


@pytest.mark.parametrize(
    ("vendor", "shown"),
    [
        ("assemblyai", "assemblyai answered HTTP 401: Authentication error, API token missing/invalid"),
        ("revai", "revai answered HTTP 401: Authorization has been denied for this request"),
    ],
)
def test_a_status_the_vendor_refuses_to_show_is_shown_on_the_call(
    vendor: str,
    shown: str,
    request: pytest.FixtureRequest,
    service: Callable[[str], Flask],
    recordings: RecordingServer,
    db: Database,
) -> None:
    fake = the_fake(request, vendor)
    app = service(vendor)
    fake.hold_callbacks()
    post_event(app, finished("1700000002.5", recordings.add("rec-t5", 100_000)))
    drain_until(app, lambda: bool(fake.submissions))
    fake.api_key = "rotated"  # the key b24scribe holds no longer opens the vendor's API
    drain_until(app, lambda: call_row(db, "1700000002.5").transcription_state == "failed")

    row = call_row(db, "1700000002.5")
    assert row.transcription_error == f"{vendor} did not call back and its job could not be read: {shown}"
    assert transcribe_job(db).state == "dead"

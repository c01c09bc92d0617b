"""b24scribe asks the STT vendor itself (contract §10), end to end against a fake Deepgram that calls
back as Deepgram does: one generic PBX event in, the call registered, finished, its recording attached
and its transcript attached, with exact MESSAGES. Exactly one vendor job per call, whatever is lost on
the way; short, unanswered and opted-out calls are not submitted; a callback without the call's own
credential is refused; a 429 backs off."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from b24scribe import outbox
from b24scribe.callbacks import callback_secret
from b24scribe.checks import check_transcription_vendor
from b24scribe.db import Database
from b24scribe.delivery.submit import SUBMITTERS
from b24scribe.models import InboundEvent, Job
from b24scribe.settings import TRANSCRIBE_VENDORS, Settings, SettingsError, load_settings
from bench.recording import RecordingServer
from tests.conftest import INBOUND_TOKEN, admin, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_deepgram import DEFAULT_SCRIPT, FakeDeepgram, build_result
from tests.test_status_page import sign_in
from tests.transcribe_support import (
    ORDER,
    call_row,
    drain_until,
    finished,
    methods,
    post_event,
    worker_of,
)


@pytest.fixture
def service(
    public_app: Callable[..., tuple[Flask, str]], fake_deepgram: FakeDeepgram
) -> Callable[..., tuple[Flask, str]]:
    """Start the app over real HTTP (the vendor calls it back) with transcription by Deepgram on."""
    keys = {"DEEPGRAM_API_KEY": fake_deepgram.api_key, "DEEPGRAM_API_URL": fake_deepgram.url}
    return lambda **overrides: public_app(**({"transcribe_with": "deepgram", "vendor": keys} | overrides))


def test_an_answered_call_with_a_stereo_recording_ends_with_its_recording_and_exact_transcript_on_the_card(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_deepgram: FakeDeepgram,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, public = service()
    url = recordings.add("rec-1", 400_000)
    answer = app.test_client().post("/hooks/pbx/generic", json=finished("1700000000.1", url), headers=auth())
    assert answer.status_code == 202
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (submission,) = fake_deepgram.submissions
    assert submission.query["multichannel"] == "true" and submission.query["utterances"] == "true"
    assert "diarize" not in submission.query
    assert submission.body_kind == "bytes" and submission.audio_sha256 == recordings.served(url).sha256
    callback = urlsplit(submission.query["callback"])
    assert callback.path == "/hooks/stt/deepgram" and parse_qs(callback.query) == {
        "pbx": ["generic"],
        "call": ["1700000000.1"],
    }
    assert callback.username == "b24scribe" and callback.password  # the call's own credential
    assert f"{callback.scheme}://{callback.hostname}:{callback.port}" == public

    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    # the fake Deepgram speaks the default script: channel 1 (callee: the employee) greets first
    assert attach.params["MESSAGES"] == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
    ]
    # what Deepgram's request log says the request cost: 5.5 s at $0.0043 a minute
    cost = pytest.approx(5.5 / 60 * 0.0043, abs=1e-6)
    assert (attach.params["COST"], attach.params["COST_CURRENCY"]) == (cost, "USD")
    row = call_row(db, "1700000000.1")
    assert (row.transcription_state, row.transcription_job_id) == ("submitted", submission.request_id)
    shown = app.test_client().get("/v1/calls/generic/1700000000.1", headers=admin()).json
    assert shown is not None and shown["transcription"]["state"] == "submitted"
    assert shown["transcription"]["vendor_job_id"] == submission.request_id
    page = app.test_client()
    sign_in(page)
    html = page.get(f"/status/calls/{row.id}").get_data(as_text=True)
    assert 'id="call-transcription"' in html and submission.request_id in html


def test_the_cost_is_asked_for_only_when_a_transcript_goes(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_deepgram: FakeDeepgram,
    recordings: RecordingServer,
    db: Database,
) -> None:
    """An attach that finds its transcript already on the card (a re-run, another part's job) sends
    nothing, and asks Deepgram for nothing either."""
    app, _ = service()
    post_event(app, finished("1700000000.4", recordings.add("rec-4", 200_000)))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))
    asked = list(fake_deepgram.reads)
    assert any(path.endswith(f"/requests/{fake_deepgram.submissions[0].request_id}") for path in asked)

    with db.write() as session:  # the call's attach job once more
        call_id, portal = session.execute(select(Job.call_id, Job.portal).where(Job.kind == "attach")).one()
        outbox.enqueue(session, "attach", call_id=call_id, portal=portal, now=time.time())
    worker_of(app).drain()
    assert len(fake_bitrix24.calls_to("telephony.call.attachTranscription")) == 1
    assert fake_deepgram.reads == asked


def test_a_key_without_usage_read_attaches_the_transcript_without_a_cost(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_deepgram: FakeDeepgram,
    recordings: RecordingServer,
) -> None:
    app, _ = service()
    fake_deepgram.usage_read = False  # the request log answers 403: the cost is unknown, nothing waits for it
    post_event(app, finished("1700000000.3", recordings.add("rec-3", 200_000)))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert len(attach.params["MESSAGES"]) == 3 and "COST" not in attach.params and "COST_CURRENCY" not in attach.params


def test_a_mono_recording_on_a_public_host_goes_by_url_and_asks_for_diarization(
    service: Callable[..., tuple[Flask, str]], fake_deepgram: FakeDeepgram, fake_bitrix24: FakeBitrix24
) -> None:
    app, _ = service(recording_mode="url")
    fake_deepgram.hold_callbacks()  # the fake cannot fetch a public host: only the submission matters
    recording = "https://recordings.example.com/calls/1700000000.2.wav"
    event = finished("1700000000.2", recording, recording_channels=1)
    post_event(app, event)
    drain_until(app, lambda: bool(fake_deepgram.submissions))

    (submission,) = fake_deepgram.submissions
    assert submission.body_kind == "url" and submission.audio_url == recording
    assert submission.query["diarize"] == "true" and "multichannel" not in submission.query


@pytest.mark.parametrize(
    "changes",
    [
        {"duration": 3},  # shorter than B24SCRIBE_TRANSCRIBE_MIN_SECONDS (5)
        {"status": "no-answer", "duration": 0},
        {"status": "busy", "duration": 0},
        {"transcribe": False},  # the PBX said no for this call
        {"recording_url": None},
    ],
    ids=["short", "no-answer", "busy", "opted-out", "no-recording"],
)
def test_short_unanswered_opted_out_and_unrecorded_calls_are_not_submitted(
    service: Callable[..., tuple[Flask, str]],
    fake_deepgram: FakeDeepgram,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
    changes: dict[str, Any],
) -> None:
    app, _ = service()
    url = recordings.add("rec-3", 100_000)
    event = finished("1700000000.3", url, **changes)
    post_event(app, event)
    drain_until(app, lambda: "telephony.externalcall.finish" in methods(fake_bitrix24))
    worker_of(app).drain()

    assert fake_deepgram.submissions == []
    with db.read() as session:
        assert session.query(Job).filter(Job.kind == "transcribe").count() == 0
    assert call_row(db, "1700000000.3").transcription_state is None


def test_a_portal_with_transcription_off_is_not_submitted(
    service: Callable[..., tuple[Flask, str]],
    fake_deepgram: FakeDeepgram,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    settings: Settings,
) -> None:
    app, _ = service(transcribe_off_portals=(settings.portal,))
    event = finished("1700000000.4", recordings.add("rec-4", 100_000))
    post_event(app, event)
    drain_until(app, lambda: "telephony.externalcall.attachrecord" in methods(fake_bitrix24))
    assert fake_deepgram.submissions == []


def test_a_lost_answer_is_looked_up_and_never_makes_a_second_vendor_job(
    service: Callable[..., tuple[Flask, str]],
    fake_deepgram: FakeDeepgram,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_deepgram.drop_after_accept()  # Deepgram took it, the answer never came back
    event = finished("1700000000.5", recordings.add("rec-5", 200_000))
    post_event(app, event)
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert len(fake_deepgram.submissions) == 1
    assert call_row(db, "1700000000.5").transcription_job_id == fake_deepgram.submissions[0].request_id
    assert methods(fake_bitrix24) == ORDER


def test_a_callback_that_lost_its_query_and_metadata_finds_its_call_by_the_vendor_job_id(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_deepgram: FakeDeepgram,
    recordings: RecordingServer,
    db: Database,
) -> None:
    """A relay in front of b24scribe (or a vendor) that drops the query: the callback carries only the
    vendor's request id, which b24scribe stored with the call when it submitted the recording."""
    app, _ = service()
    fake_deepgram.hold_callbacks()
    post_event(app, finished("1700000000.9", recordings.add("rec-9", 200_000)))
    drain_until(app, lambda: call_row(db, "1700000000.9").transcription_state == "submitted")
    (submission,) = fake_deepgram.submissions
    body = build_result(DEFAULT_SCRIPT, submission.query, {}, submission.request_id, "")
    assert "extra" not in body["metadata"]  # nothing in the body names the call but the request id

    answer = app.test_client().post("/hooks/stt/deepgram", json=body, headers=auth())
    assert answer.status_code == 202, answer.get_data(as_text=True)
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert [m["MESSAGE"] for m in attach.params["MESSAGES"]] == [line[3] for line in DEFAULT_SCRIPT]

    # an unknown request id still names no call: refused with the field to fix
    unknown = build_result(DEFAULT_SCRIPT, submission.query, {}, "not-a-job-of-ours", "")
    refused = app.test_client().post("/hooks/stt/deepgram", json=unknown, headers=auth())
    assert refused.status_code == 422 and "call" in refused.get_data(as_text=True)


def test_a_callback_without_the_calls_own_credential_is_refused_and_nothing_is_stored(
    service: Callable[..., tuple[Flask, str]], fake_deepgram: FakeDeepgram, db: Database
) -> None:
    app, _ = service()
    client: FlaskClient = app.test_client()
    body = {"metadata": {"request_id": "x"}, "results": {"channels": []}}

    def basic(password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"b24scribe:{password}".encode()).decode()}

    wrong = client.post("/hooks/stt/deepgram?pbx=generic&call=1700000000.6", json=body, headers=basic("0" * 40))
    assert wrong.status_code == 401
    settings = app.extensions["b24scribe.settings"]
    other = callback_secret(settings, "deepgram", settings.portal, "generic", "1700000000.7") or ""
    moved = client.post("/hooks/stt/deepgram?pbx=generic&call=1700000000.6", json=body, headers=basic(other))
    assert moved.status_code == 401  # another call's credential does not open this call
    with db.read() as session:
        assert session.query(InboundEvent).count() == 0


def test_a_vendor_429_backs_off_for_its_retry_after_without_spending_an_attempt(
    service: Callable[..., tuple[Flask, str]],
    fake_deepgram: FakeDeepgram,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_deepgram.fail_next(429, retry_after=120)
    event = finished("1700000000.8", recordings.add("rec-8", 100_000))
    post_event(app, event)
    before = time.time()
    drain_until(app, lambda: bool(fake_deepgram.submissions))
    worker_of(app).drain()

    assert len(fake_deepgram.submissions) == 1  # the refused one; nothing more within the back-off
    with db.read() as session:
        job = session.query(Job).filter(Job.kind == "transcribe").one()
        assert job.state == "pending" and job.attempts == 0
        assert 100 <= job.next_attempt_at - before <= 130
        assert "429" in (job.last_error or "")


def test_a_rejected_key_is_shown_on_the_call(
    service: Callable[..., tuple[Flask, str]],
    fake_deepgram: FakeDeepgram,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_deepgram.fail_next(401)
    event = finished("1700000000.9", recordings.add("rec-9", 100_000))
    post_event(app, event)
    drain_until(app, lambda: call_row(db, "1700000000.9").transcription_state == "failed")
    row = call_row(db, "1700000000.9")
    assert "deepgram answered HTTP 401" in (row.transcription_error or "")


def test_a_worker_killed_during_the_submission_never_makes_a_second_vendor_job(
    service: Callable[..., tuple[Flask, str]],
    settings: Settings,
    fake_deepgram: FakeDeepgram,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, public = service()
    fake_deepgram.answer_delay = 6.0  # Deepgram takes the recording; its answer comes after the kill
    event = finished("1700000001.1", recordings.add("rec-k", 200_000))
    post_event(app, event)
    env = {
        **os.environ,
        "B24SCRIBE_DATABASE_URL": settings.database_url,
        "B24SCRIBE_BITRIX24_WEBHOOK_URL": settings.bitrix24_webhook_url or "",
        "B24SCRIBE_INBOUND_TOKEN": INBOUND_TOKEN,
        "B24SCRIBE_PUBLIC_URL": public,
        "B24SCRIBE_TRANSCRIBE_WITH": "deepgram",
        "B24SCRIBE_DEEPGRAM_API_KEY": fake_deepgram.api_key,
        "B24SCRIBE_DEEPGRAM_API_URL": fake_deepgram.url,
        "B24SCRIBE_RECORDING_HOSTS": "127.0.0.1",
        "B24SCRIBE_WORKER_DEAD_AFTER_SECONDS": "2",
        "B24SCRIBE_WORKER_POLL_SECONDS": "0.1",
        "B24SCRIBE_RATE_PER_SECOND": "1000",
        "B24SCRIBE_RATE_BURST": "1000",
    }
    command = [sys.executable, "-m", "flask", "--app", "app", "worker"]
    root = Path(__file__).resolve().parent.parent
    workers: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        workers.append(process)
        return process

    def wait(predicate: Callable[[], bool], timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    try:
        first = start()
        wait(lambda: bool(fake_deepgram.submissions))
        first.send_signal(signal.SIGKILL)  # mid-submission: Deepgram has it, the worker never hears back
        first.wait(timeout=10)
        start()
        wait(lambda: bool(call_row(db, "1700000001.1").transcription_job_id))
        wait(lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))
    finally:
        for process in workers:
            process.kill()
            process.wait(timeout=10)

    assert len(fake_deepgram.submissions) == 1
    assert call_row(db, "1700000001.1").transcription_job_id == fake_deepgram.submissions[0].request_id
    assert methods(fake_bitrix24).count("telephony.call.attachtranscription") == 1


def test_check_tries_the_vendor_key_with_a_harmless_request(settings: Settings, fake_deepgram: FakeDeepgram) -> None:
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com",
        transcribe_with="deepgram",
        vendor={"DEEPGRAM_API_KEY": fake_deepgram.api_key, "DEEPGRAM_API_URL": fake_deepgram.url},
    )
    (good,) = check_transcription_vendor(configured)
    assert good.level == "ok"
    wrong = configured.with_overrides(vendor={"DEEPGRAM_API_KEY": "nope", "DEEPGRAM_API_URL": fake_deepgram.url})
    (bad,) = check_transcription_vendor(wrong)
    assert bad.level == "problem" and "401" in bad.message
    assert fake_deepgram.submissions == []  # nothing was submitted


def test_a_vendor_that_never_calls_back_is_reported_on_the_call_after_the_timeout(
    service: Callable[..., tuple[Flask, str]],
    fake_deepgram: FakeDeepgram,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service(transcribe_timeout_minutes=0.01)  # 0.6 s
    fake_deepgram.hold_callbacks()
    event = finished("1700000001.2", recordings.add("rec-t", 100_000))
    post_event(app, event)
    drain_until(app, lambda: call_row(db, "1700000001.2").transcription_state == "failed")

    row = call_row(db, "1700000001.2")
    assert row.transcription_error == "deepgram did not call back within 0.01 minutes"
    assert len(fake_deepgram.submissions) == 1
    with db.read() as session:
        job = session.query(Job).filter(Job.kind == "transcribe").one()
        assert job.state == "dead" and job.last_error == row.transcription_error


def test_every_vendor_the_setting_takes_has_a_submitter_and_every_submitter_is_taken() -> None:
    assert set(TRANSCRIBE_VENDORS) == set(SUBMITTERS)


def test_transcribe_with_needs_a_known_vendor_the_public_url_and_the_inbound_token() -> None:
    base = {"B24SCRIBE_PUBLIC_URL": "https://b24scribe.example.com", "B24SCRIBE_INBOUND_TOKEN": "t" * 20}
    assert load_settings(base | {"B24SCRIBE_TRANSCRIBE_WITH": "Deepgram"}, dotenv=False).transcribe_with == "deepgram"
    for environ, named in (
        (base | {"B24SCRIBE_TRANSCRIBE_WITH": "acme"}, "B24SCRIBE_TRANSCRIBE_WITH: expected one of deepgram"),
        ({"B24SCRIBE_INBOUND_TOKEN": "t" * 20, "B24SCRIBE_TRANSCRIBE_WITH": "deepgram"}, "B24SCRIBE_PUBLIC_URL"),
        ({"B24SCRIBE_PUBLIC_URL": "https://x.example", "B24SCRIBE_TRANSCRIBE_WITH": "deepgram"}, "INBOUND_TOKEN"),
    ):
        with pytest.raises(SettingsError) as error:
            load_settings(environ, dotenv=False)
        assert named in str(error.value)


@pytest.mark.parametrize("vendor", ["deepgram", "assemblyai", "revai"])
def test_a_missing_vendor_key_is_named_by_check_and_on_the_call(
    vendor: str,
    service: Callable[..., tuple[Flask, str]],
    settings: Settings,
    fake_bitrix24: FakeBitrix24,
    recordings: RecordingServer,
    db: Database,
) -> None:
    configured = settings.with_overrides(public_url="https://b24scribe.example.com", transcribe_with=vendor)
    (finding,) = check_transcription_vendor(configured)
    assert finding.level == "problem" and f"B24SCRIBE_{vendor.upper()}_API_KEY is not set" in finding.message

    app, _ = service(transcribe_with=vendor, vendor={})
    post_event(app, finished("1700000001.3", recordings.add("rec-nokey", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000001.3").transcription_state == "failed")
    assert call_row(db, "1700000001.3").transcription_error == f"B24SCRIBE_{vendor.upper()}_API_KEY is not set"

"""b24scribe asks Gladia itself (contract §10), end to end against a fake that calls back as Gladia does:
one generic PBX event in, the recording uploaded to Gladia, the job asked for with a callback whose
URL carries the call's own credential as `?token=` (Gladia sends no header of its own) and the call
in `custom_metadata`, Gladia's callback with the whole result, and the call registered, finished,
its recording and its transcript attached with exact MESSAGES. Exactly one Gladia job per call,
whatever answer is lost; a callback without the call's credential is refused; a 429 backs off; a
4xx is shown on the call; a callback that never comes is made up for by asking the job's status."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask

from b24scribe.callbacks import callback_secret, callback_url
from b24scribe.checks import check_transcription_vendor
from b24scribe.db import Database
from b24scribe.delivery.submit import SUBMITTERS, Submission
from b24scribe.models import InboundEvent
from b24scribe.settings import Settings, load_settings
from bench.recording import RecordingServer
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_gladia_stt import FIXTURES, FakeGladia, fake_gladia  # noqa: F401 (the fixture)
from tests.transcribe_support import (
    ORDER,
    call_row,
    drain_until,
    finished,
    methods,
    own_secret,
    post_event,
    transcribe_job,
)

# what the fake serves for a job without diarization (two distinct channels): channel 1, the
# employee, greets first
STEREO_SUPPORT_CALL = [
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
    {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
    {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
]
# ... and for a diarized mono job: the first speaker answers the inbound call, the employee
DIARIZED_BOOKING = [
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
    {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
    {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
    {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
]
TIMEOUT_MINUTES = 0.01  # 0.6 s: the fake finishes a job in 0.2 s


def keys(fake: FakeGladia) -> dict[str, str]:
    return {"GLADIA_API_KEY": fake.api_key, "GLADIA_API_URL": fake.url}


@pytest.fixture
def service(public_app: Callable[..., tuple[Flask, str]], fake_gladia: FakeGladia) -> Callable[..., tuple[Flask, str]]:  # noqa: F811
    """Start the app over real HTTP (Gladia calls it back) with transcription requests to Gladia."""
    return lambda **overrides: public_app(**({"transcribe_with": "gladia", "vendor": keys(fake_gladia)} | overrides))


def test_the_uploaded_stereo_recording_ends_on_the_card_with_its_exact_transcript(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_gladia: FakeGladia,  # noqa: F811
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, public = service()
    url = recordings.add("rec-g1", 400_000)
    post_event(app, finished("1700000000.1", url))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (upload,) = fake_gladia.uploads  # the bytes went to /v2/upload as `audio`, then by their audio_url
    assert upload.sha256 == recordings.served(url).sha256
    assert (upload.filename, upload.content_type) == ("recording.wav", "audio/wav")
    (submission,) = fake_gladia.submissions
    body = submission.body
    assert body["audio_url"] == upload.audio_url and submission.from_upload
    assert "diarization" not in body  # Gladia reads the distinct channels by itself
    assert "language_config" not in body  # the language is detected
    assert body["callback"] is True and body["callback_config"]["method"] == "POST"
    # the call in Gladia's own metadata, read back by /hooks/stt/gladia
    assert body["custom_metadata"] == {"b24scribe_pbx": "generic", "b24scribe_call": "1700000000.1"}
    target = urlsplit(body["callback_config"]["url"])
    assert f"{target.scheme}://{target.netloc}" == public and target.path == "/hooks/stt/gladia"
    assert parse_qs(target.query) == {  # Gladia sends no header of its own: the call's credential goes as ?token=
        "pbx": ["generic"],
        "call": ["1700000000.1"],
        "token": [own_secret(app, "gladia", "1700000000.1")],
    }
    (callback,) = fake_gladia.wait_for_callbacks()
    assert callback.status == 202 and callback.method == "POST"
    assert callback.json()["event"] == "transcription.success" and callback.json()["id"] == submission.job_id

    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL
    row = call_row(db, "1700000000.1")
    assert (row.transcription_state, row.transcription_job_id) == ("submitted", submission.job_id)


def test_a_mono_recording_asks_for_diarization_and_its_speakers_become_the_sides(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_gladia: FakeGladia,  # noqa: F811
    recordings: RecordingServer,
) -> None:
    app, _ = service(vendor=keys(fake_gladia) | {"GLADIA_LANGUAGE": "en"})
    post_event(app, finished("1700000000.2", recordings.add("rec-g2", 100_000), recording_channels=1))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    (submission,) = fake_gladia.submissions
    assert submission.body["diarization"] is True
    assert submission.body["language_config"] == {"languages": ["en"]}  # B24SCRIBE_GLADIA_LANGUAGE
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == DIARIZED_BOOKING


def test_a_recording_gladia_can_fetch_goes_by_url_and_gladia_reads_those_bytes(
    settings: Settings,
    fake_gladia: FakeGladia,  # noqa: F811
    recordings: RecordingServer,
) -> None:
    fake_gladia.hold_callbacks()
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com", transcribe_with="gladia", vendor=keys(fake_gladia)
    )
    url = recordings.add("rec-g3", 150_000)
    metadata = (("b24scribe_pbx", "generic"), ("b24scribe_call", "1700000000.3"))
    target = callback_url(configured, "gladia", configured.portal, "generic", "1700000000.3", "query")
    with requests.Session() as http:
        taken = SUBMITTERS["gladia"].submit(http, configured, Submission(metadata, target, 2, url=url))

    (submission,) = fake_gladia.submissions
    assert taken == submission.job_id and submission.answered == 201
    deadline = time.monotonic() + 5
    while submission.audio_sha256 is None and time.monotonic() < deadline:  # Gladia fetches it itself
        time.sleep(0.02)
    assert submission.audio_sha256 == recordings.served(url).sha256
    assert submission.body["audio_url"] == url and fake_gladia.uploads == []


def test_a_lost_answer_is_looked_up_by_the_calls_metadata_and_never_makes_a_second_job(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_gladia: FakeGladia,  # noqa: F811
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_gladia.drop_after_accept()  # Gladia took the job, its answer never came back
    post_event(app, finished("1700000000.5", recordings.add("rec-g5", 200_000)))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    (submission,) = fake_gladia.submissions
    assert submission.answered is None  # the answer was indeed lost
    assert len(fake_gladia.uploads) == 1  # and the lookup found the job: nothing uploaded again
    assert call_row(db, "1700000000.5").transcription_job_id == submission.job_id
    (asked,) = fake_gladia.list_queries  # the list, filtered by the call's metadata
    assert json.loads(asked["custom_metadata"][0]) == {"b24scribe_pbx": "generic", "b24scribe_call": "1700000000.5"}
    assert methods(fake_bitrix24) == ORDER


def test_find_matches_exactly_the_calls_keys_among_the_jobs_since_the_given_time_page_by_page(
    settings: Settings,
    fake_gladia: FakeGladia,  # noqa: F811
    recordings: RecordingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_gladia.hold_callbacks()
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com", transcribe_with="gladia", vendor=keys(fake_gladia)
    )
    url = recordings.add("rec-g6", 50_000)
    call = (("b24scribe_pbx", "generic"), ("b24scribe_call", "1700000000.6"))
    on_another_portal = (*call, ("b24scribe_portal", "other.bitrix24.com"))
    gladia = SUBMITTERS["gladia"]
    monkeypatch.setattr(gladia, "page_size", 1)  # one job a page: the call's own job is on the second
    with requests.Session() as http:
        before = time.time()
        for metadata in (call, on_another_portal):
            target = callback_url(configured, "gladia", configured.portal, "generic", "1700000000.6", "query")
            gladia.submit(http, configured, Submission(metadata, target, 2, url=url))
        own_job, other_job = (s.job_id for s in fake_gladia.submissions)
        assert gladia.find(http, configured, call, before) == own_job  # newest first: the other one came first
        assert [query["offset"] for query in fake_gladia.list_queries] == [["0"], ["1"]]
        assert gladia.find(http, configured, on_another_portal, before) == other_job
        assert gladia.find(http, configured, (("b24scribe_pbx", "generic"), ("b24scribe_call", "x")), before) is None
        assert gladia.find(http, configured, call, time.time() + 3600) is None  # none made since then


def test_a_callback_without_the_calls_own_credential_is_refused_and_nothing_is_stored(
    service: Callable[..., tuple[Flask, str]], db: Database
) -> None:
    app, _ = service()
    client = app.test_client()
    body = json.loads((FIXTURES / "stereo_callback.json").read_text())
    body["custom_metadata"] = {"b24scribe_pbx": "generic", "b24scribe_call": "1700000000.7"}
    settings: Settings = app.extensions["b24scribe.settings"]
    other_call = callback_secret(settings, "gladia", settings.portal, "generic", "1700000000.8") or ""
    other_vendor = callback_secret(settings, "deepgram", settings.portal, "generic", "1700000000.7") or ""
    hook = "/hooks/stt/gladia?pbx=generic&call=1700000000.7"
    for wrong in ("0" * 40, other_call, other_vendor):
        refused = client.post(f"{hook}&token={wrong}", json=body)
        assert refused.status_code == 401, wrong
    assert client.post(hook, json=body).status_code == 401  # no credential at all
    with db.read() as session:
        assert session.query(InboundEvent).count() == 0

    let_in = client.post(f"{hook}&token={own_secret(app, 'gladia', '1700000000.7')}", json=body)
    assert let_in.status_code == 202  # the call's own credential opens its own callback
    with db.read() as session:
        assert session.query(InboundEvent).count() == 1


def test_a_429_backs_off_for_its_retry_after_without_spending_an_attempt(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_gladia: FakeGladia,  # noqa: F811
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_gladia.fail_next(429, retry_after=120)
    post_event(app, finished("1700000000.9", recordings.add("rec-g9", 100_000)))
    before = time.time()
    drain_until(app, lambda: bool(fake_gladia.submissions))
    drain_until(app, lambda: True)

    assert [s.answered for s in fake_gladia.submissions] == [429]  # nothing more within the back-off
    job = transcribe_job(db)
    assert job.state == "pending" and job.attempts == 0
    assert 100 <= job.next_attempt_at - before <= 130
    assert "gladia answered HTTP 429: Too Many Requests" in (job.last_error or "")


def test_a_rejected_submission_is_shown_on_the_call_with_gladias_reason(
    service: Callable[..., tuple[Flask, str]],
    fake_gladia: FakeGladia,  # noqa: F811
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_gladia.fail_next(401)
    post_event(app, finished("1700000000.10", recordings.add("rec-g10", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000000.10").transcription_state == "failed")

    assert call_row(db, "1700000000.10").transcription_error == "gladia answered HTTP 401: gladia key not found"
    assert len(fake_gladia.submissions) == 1  # not retried


def test_a_callback_that_never_comes_is_made_up_for_by_the_jobs_status(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_gladia: FakeGladia,  # noqa: F811
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service(transcribe_timeout_minutes=TIMEOUT_MINUTES)
    fake_gladia.hold_callbacks()  # Gladia finishes the job, its callback never comes
    post_event(app, finished("1700000002.1", recordings.add("rec-gt1", 200_000)))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL
    assert fake_gladia.callbacks == []
    (submission,) = fake_gladia.submissions
    assert fake_gladia.reads == [f"/v2/pre-recorded/{submission.job_id}"]  # the job, with its result
    assert transcribe_job(db).state == "done"

    fake_gladia.release_callbacks()  # the callback comes after all: the same transcript, stored once
    (late,) = fake_gladia.wait_for_callbacks()
    assert late.status == 200  # the hook's answer to a duplicate
    drain_until(app, lambda: True)
    assert methods(fake_bitrix24).count("telephony.call.attachtranscription") == 1
    with db.read() as session:
        assert session.query(InboundEvent).filter(InboundEvent.source == "stt").count() == 1


def test_a_job_that_ended_in_error_is_shown_on_the_call(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_gladia: FakeGladia,  # noqa: F811
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service(transcribe_timeout_minutes=TIMEOUT_MINUTES)
    fake_gladia.hold_callbacks()
    fake_gladia.fail_jobs("The audio file has no speech in it.")
    post_event(app, finished("1700000002.4", recordings.add("rec-gt4", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000002.4").transcription_state == "failed")

    row = call_row(db, "1700000002.4")  # the job shows only its code; the callback would have said more
    assert row.transcription_error == "gladia could not transcribe the recording: the job ended in error (code 500)"
    assert transcribe_job(db).state == "dead" and len(fake_gladia.submissions) == 1
    assert methods(fake_bitrix24) == ORDER[:3]  # the recording is on the card, no transcript


def test_check_tries_the_key_with_a_harmless_request(
    settings: Settings,
    fake_gladia: FakeGladia,  # noqa: F811
) -> None:
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com", transcribe_with="gladia", vendor=keys(fake_gladia)
    )
    (good,) = check_transcription_vendor(configured)
    assert good.level == "ok"
    wrong = configured.with_overrides(vendor=keys(fake_gladia) | {"GLADIA_API_KEY": "nope"})
    (bad,) = check_transcription_vendor(wrong)
    assert bad.level == "problem" and "gladia answered HTTP 401: gladia key not found" in bad.message
    assert fake_gladia.submissions == [] and fake_gladia.uploads == []  # nothing was submitted


def test_transcribe_with_accepts_gladia() -> None:
    environ = {
        "B24SCRIBE_PUBLIC_URL": "https://b24scribe.example.com",
        "B24SCRIBE_INBOUND_TOKEN": "t" * 20,
        "B24SCRIBE_TRANSCRIBE_WITH": "Gladia",
    }
    assert load_settings(environ, dotenv=False).transcribe_with == "gladia"

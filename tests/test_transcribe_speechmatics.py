"""b24scribe asks Speechmatics itself (contract §10), end to end against a fake batch API that notifies
as Speechmatics does: one generic PBX event in, the recording uploaded as a job's `data_file` (or
fetched by Speechmatics from its URL), the notification carrying the json-v2 transcript let in by
the call's own credential in its Authorization header, and the call registered, finished, its
recording and its transcript attached with exact MESSAGES. Exactly one Speechmatics job per call,
whatever answer is lost; a notification without the call's credential is refused; a 429 backs off,
another 4xx is shown on the call; a notification that never comes is made up for by asking the job."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
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
from b24scribe.transcript import CallReference
from bench.recording import RecordingServer
from schemas import speechmatics
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_speechmatics_stt import FakeSpeechmatics
from tests.test_transcribe_vendors import STEREO_SUPPORT_CALL
from tests.transcribe_support import (
    ORDER,
    call_row,
    drain_until,
    finished,
    methods,
    own_secret,
    post_event,
    stt_events,
    transcribe_job,
)

TIMEOUT_MINUTES = 0.01  # 0.6 s: the fake finishes a job in 0.2 s
NO_SPEECH = "The audio file has no speech in it."


@pytest.fixture
def fake_speechmatics() -> Iterator[FakeSpeechmatics]:
    """A running fake Speechmatics; `url` is its API base URL, `api_key` the key it accepts."""
    fake = FakeSpeechmatics().start()
    yield fake
    fake.stop()


def keys(fake: FakeSpeechmatics, **more: str) -> dict[str, str]:
    return {"SPEECHMATICS_API_KEY": fake.api_key, "SPEECHMATICS_API_URL": fake.url, **more}


@pytest.fixture
def service(
    public_app: Callable[..., tuple[Flask, str]], fake_speechmatics: FakeSpeechmatics
) -> Callable[..., tuple[Flask, str]]:
    """Start the app over real HTTP (Speechmatics notifies it there), transcribing with Speechmatics."""
    return lambda **overrides: public_app(
        **({"transcribe_with": "speechmatics", "vendor": keys(fake_speechmatics)} | overrides)
    )


def test_a_stereo_recording_is_uploaded_for_channel_diarization_and_the_call_ends_with_its_exact_transcript(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_speechmatics: FakeSpeechmatics,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, public = service()
    url = recordings.add("rec-s1", 400_000)
    post_event(app, finished("1700000003.1", url))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (submission,) = fake_speechmatics.submissions
    assert submission.fields == ["config", "data_file"]  # the bytes, in the form beside the config
    assert submission.audio_sha256 == recordings.served(url).sha256
    assert (submission.data_filename, submission.data_content_type) == ("recording.wav", "audio/wav")
    config = submission.config
    assert "fetch_data" not in config
    assert config["transcription_config"] == {
        "language": "auto",  # calls come in any language
        "diarization": "channel",
        "channel_diarization_labels": ["channel_1", "channel_2"],
    }
    assert config["tracking"] == {"details": {"b24scribe_pbx": "generic", "b24scribe_call": "1700000003.1"}}
    (notification,) = config["notification_config"]
    assert notification["contents"] == ["transcript"]  # the json-v2 transcript itself, what the hook parses
    assert notification["auth_headers"] == [f"Authorization: Bearer {own_secret(app, 'speechmatics', '1700000003.1')}"]
    target = urlsplit(notification["url"])
    assert f"{target.scheme}://{target.netloc}" == public and target.path == "/hooks/stt/speechmatics"
    assert parse_qs(target.query) == {"pbx": ["generic"], "call": ["1700000003.1"]}  # no ?token=

    (callback,) = fake_speechmatics.wait_for_callbacks()
    assert callback.status == 202
    assert parse_qs(urlsplit(callback.url).query)["status"] == ["success"]
    assert callback.json()["job"]["id"] == submission.job_id
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL
    row = call_row(db, "1700000003.1")
    assert (row.transcription_state, row.transcription_job_id) == ("submitted", submission.job_id)


def test_a_mono_recording_asks_for_speaker_diarization_and_the_first_speaker_is_the_employee(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_speechmatics: FakeSpeechmatics,
    recordings: RecordingServer,
) -> None:
    app, _ = service()
    post_event(app, finished("1700000003.2", recordings.add("rec-s2", 100_000), recording_channels=1))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    (submission,) = fake_speechmatics.submissions
    assert submission.config["transcription_config"] == {"language": "auto", "diarization": "speaker"}
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL  # S1 greets: the employee, S2 the customer


def test_a_recording_speechmatics_can_fetch_goes_by_url_in_the_configured_language(
    settings: Settings, fake_speechmatics: FakeSpeechmatics, recordings: RecordingServer
) -> None:
    fake_speechmatics.hold_callbacks()
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com",
        transcribe_with="speechmatics",
        vendor=keys(fake_speechmatics, SPEECHMATICS_LANGUAGE="de"),
    )
    url = recordings.add("rec-s3", 150_000)
    metadata = (("b24scribe_pbx", "generic"), ("b24scribe_call", "1700000003.3"), ("b24scribe_portal", "b.example"))
    target = callback_url(configured, "speechmatics", "b.example", "generic", "1700000003.3", "header")
    with requests.Session() as http:
        taken = SUBMITTERS["speechmatics"].submit(http, configured, Submission(metadata, target, 2, url=url))

    (submission,) = fake_speechmatics.submissions
    assert taken == submission.job_id
    assert submission.fields == ["config"] and submission.config["fetch_data"] == {"url": url}
    assert submission.config["transcription_config"]["language"] == "de"
    assert submission.config["tracking"]["details"]["b24scribe_portal"] == "b.example"
    deadline = time.monotonic() + 5
    while submission.audio_sha256 is None and time.monotonic() < deadline:  # Speechmatics fetches it itself
        time.sleep(0.02)
    assert submission.audio_sha256 == recordings.served(url).sha256


def test_a_lost_answer_is_looked_up_in_the_job_list_and_never_makes_a_second_job(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_speechmatics: FakeSpeechmatics,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_speechmatics.drop_after_accept()  # Speechmatics took it, its answer never came back
    post_event(app, finished("1700000003.4", recordings.add("rec-s4", 200_000)))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    (submission,) = fake_speechmatics.submissions
    assert submission.answered is None  # the answer was indeed lost
    assert "/v2/jobs" in fake_speechmatics.reads  # looked up by the call its tracking names
    assert call_row(db, "1700000003.4").transcription_job_id == submission.job_id
    assert methods(fake_bitrix24) == ORDER


def test_find_pages_back_through_the_job_list_to_the_calls_job(
    settings: Settings, fake_speechmatics: FakeSpeechmatics, recordings: RecordingServer
) -> None:
    fake_speechmatics.hold_callbacks()
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com", transcribe_with="speechmatics", vendor=keys(fake_speechmatics)
    )
    url = recordings.add("rec-s5", 50_000)
    speechmatics = SUBMITTERS["speechmatics"]
    since = time.time()

    def submit(call: str) -> str:
        metadata = (("b24scribe_pbx", "generic"), ("b24scribe_call", call))
        target = callback_url(configured, "speechmatics", configured.portal, "generic", call, "header")
        with requests.Session() as http:
            return speechmatics.submit(http, configured, Submission(metadata, target, 2, url=url))

    wanted = submit("1700000003.5")
    for number in range(105):  # more than a page of later jobs
        submit(f"1700000004.{number}")
        time.sleep(0.002)  # each its own millisecond, as created_before pages by them
    with requests.Session() as http:
        found = speechmatics.find(
            http, configured, (("b24scribe_pbx", "generic"), ("b24scribe_call", "1700000003.5")), since
        )
        missing = speechmatics.find(http, configured, (("b24scribe_pbx", "generic"), ("b24scribe_call", "nope")), since)
    assert found == wanted
    assert missing is None
    assert fake_speechmatics.reads.count("/v2/jobs") == 4  # two pages for each look-up


def test_a_notification_without_the_calls_own_credential_is_refused_and_nothing_is_stored(
    service: Callable[..., tuple[Flask, str]], db: Database
) -> None:
    app, _ = service()
    client = app.test_client()
    body = json.loads((Path(__file__).parent / "fixtures" / "speechmatics" / "channel_diarization.json").read_text())
    body["job"]["tracking"] = {"details": {"b24scribe_pbx": "generic", "b24scribe_call": "1700000003.6"}}
    hook = "/hooks/stt/speechmatics?pbx=generic&call=1700000003.6&id=r6sr3jlzjj&status=success"
    settings: Settings = app.extensions["b24scribe.settings"]
    other_call = callback_secret(settings, "speechmatics", settings.portal, "generic", "1700000003.7") or ""
    other_vendor = callback_secret(settings, "revai", settings.portal, "generic", "1700000003.6") or ""
    for wrong in ("0" * 40, other_call, other_vendor):
        refused = client.post(hook, json=body, headers={"Authorization": f"Bearer {wrong}"})
        assert refused.status_code == 401, wrong
    assert stt_events(db) == 0

    own = {"Authorization": f"Bearer {own_secret(app, 'speechmatics', '1700000003.6')}"}
    assert client.post(hook, json=body, headers=own).status_code == 202  # its own credential opens its own door
    assert stt_events(db) == 1


def test_the_transcript_names_its_call_by_the_tracking_details_it_was_submitted_with(
    service: Callable[..., tuple[Flask, str]], db: Database
) -> None:
    app, _ = service()
    body = json.loads((Path(__file__).parent / "fixtures" / "speechmatics" / "channel_diarization.json").read_text())
    body["job"]["tracking"] = {"details": {"b24scribe_pbx": "generic", "b24scribe_call": "1700000003.7"}}
    assert speechmatics.parse(json.dumps(body).encode(), {}).reference == CallReference(
        pbx="generic", pbx_call_id="1700000003.7"
    )
    own = {"Authorization": f"Bearer {own_secret(app, 'speechmatics', '1700000003.6')}"}
    hook = "/hooks/stt/speechmatics?pbx=generic&call=1700000003.6&id=r6sr3jlzjj&status=success"
    answer = app.test_client().post(hook, json=body, headers=own)
    assert answer.status_code == 422  # the URL names one call, the transcript another
    assert answer.get_json()["error"]["fields"]["call"] == [
        "the URL says '1700000003.6' but the payload says '1700000003.7'"
    ]
    with db.read() as session:
        assert [event.state for event in session.query(InboundEvent)] == ["rejected"]  # kept for a replay only


def test_a_429_backs_off_for_its_retry_after_without_spending_an_attempt(
    service: Callable[..., tuple[Flask, str]],
    fake_speechmatics: FakeSpeechmatics,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_speechmatics.fail_next(429, retry_after=120)
    post_event(app, finished("1700000003.8", recordings.add("rec-s8", 100_000)))
    before = time.time()
    drain_until(app, lambda: bool(fake_speechmatics.submissions))
    drain_until(app, lambda: True)

    assert [s.answered for s in fake_speechmatics.submissions] == [429]  # nothing more within the back-off
    job = transcribe_job(db)
    assert job.state == "pending" and job.attempts == 0
    assert 100 <= job.next_attempt_at - before <= 130
    assert "speechmatics answered HTTP 429: Rate Limited" in (job.last_error or "")


def test_a_rejected_submission_is_shown_on_the_call_with_speechmatics_reason(
    service: Callable[..., tuple[Flask, str]],
    fake_speechmatics: FakeSpeechmatics,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_speechmatics.fail_next(403)
    post_event(app, finished("1700000003.9", recordings.add("rec-s9", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000003.9").transcription_state == "failed")

    assert call_row(db, "1700000003.9").transcription_error == "speechmatics answered HTTP 403: Forbidden"
    assert len(fake_speechmatics.submissions) == 1  # not retried
    assert transcribe_job(db).state == "dead"


def test_a_notification_that_never_comes_is_made_up_for_by_asking_the_job(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_speechmatics: FakeSpeechmatics,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service(transcribe_timeout_minutes=TIMEOUT_MINUTES)
    fake_speechmatics.hold_callbacks()  # the job is done, its notification never comes
    post_event(app, finished("1700000003.10", recordings.add("rec-s10", 200_000)))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL
    assert fake_speechmatics.callbacks == []
    job_id = fake_speechmatics.submissions[0].job_id
    assert fake_speechmatics.reads == [f"/v2/jobs/{job_id}", f"/v2/jobs/{job_id}/transcript"]
    assert transcribe_job(db).state == "done"

    fake_speechmatics.release_callbacks()  # it comes after all: the same transcript, stored once
    (late,) = fake_speechmatics.wait_for_callbacks()
    assert late.status == 200  # the hook's answer to a duplicate
    drain_until(app, lambda: True)
    assert methods(fake_bitrix24).count("telephony.call.attachtranscription") == 1
    assert stt_events(db) == 1


def test_a_job_still_running_is_waited_for_and_a_rejected_one_shows_its_error(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_speechmatics: FakeSpeechmatics,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service(transcribe_timeout_minutes=TIMEOUT_MINUTES)
    fake_speechmatics.hold_callbacks()
    fake_speechmatics.keep_processing()
    post_event(app, finished("1700000003.11", recordings.add("rec-s11", 100_000)))
    drain_until(app, lambda: len(fake_speechmatics.reads) >= 1)
    drain_until(app, lambda: transcribe_job(db).state == "pending")
    job = transcribe_job(db)
    assert job.attempts == 0 and "speechmatics says the job is still processing" in (job.last_error or "")
    assert call_row(db, "1700000003.11").transcription_state == "submitted"  # not failed

    fake_speechmatics.fail_jobs(NO_SPEECH)
    fake_speechmatics.finish_processing()
    drain_until(app, lambda: call_row(db, "1700000003.11").transcription_state == "failed")
    row = call_row(db, "1700000003.11")
    assert row.transcription_error == f"speechmatics could not transcribe the recording: {NO_SPEECH}"
    assert transcribe_job(db).state == "dead"
    assert methods(fake_bitrix24) == ORDER[:3]  # the recording is on the card, no transcript
    assert len(fake_speechmatics.submissions) == 1


def test_check_tries_the_key_with_a_harmless_request(settings: Settings, fake_speechmatics: FakeSpeechmatics) -> None:
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com", transcribe_with="speechmatics", vendor=keys(fake_speechmatics)
    )
    (good,) = check_transcription_vendor(configured)
    assert good.level == "ok"
    wrong = configured.with_overrides(vendor=keys(fake_speechmatics) | {"SPEECHMATICS_API_KEY": "nope"})
    (bad,) = check_transcription_vendor(wrong)
    assert bad.level == "problem" and "speechmatics answered HTTP 401: Permission Denied" in bad.message
    assert fake_speechmatics.submissions == []  # nothing was submitted


def test_transcribe_with_accepts_speechmatics() -> None:
    environ: dict[str, Any] = {
        "B24SCRIBE_PUBLIC_URL": "https://b24scribe.example.com",
        "B24SCRIBE_INBOUND_TOKEN": "t" * 20,
        "B24SCRIBE_TRANSCRIBE_WITH": "Speechmatics",
    }
    assert load_settings(environ, dotenv=False).transcribe_with == "speechmatics"

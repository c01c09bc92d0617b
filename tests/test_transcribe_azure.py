"""b24scribe asks Azure AI Speech itself (contract §10), end to end against a fake that answers and
calls back as Azure does: one generic PBX event in; a recording Azure can fetch goes to batch
transcription by URL, with the call in the transcription's customProperties, and the Speech
resource's signed web hook (or, without one, the transcription's own status once the callback wait
is over) leads the hook to the result file; a recording Azure cannot fetch goes to fast
transcription as bytes, whose answer is the transcript. Either way the call is registered,
finished, its recording and its transcript attached with exact MESSAGES. Exactly one Azure
transcription per call, whatever answer is lost; an unsigned or wrongly signed web hook is refused;
a 429 backs off; a refusal is shown on the call with Azure's message."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from sqlalchemy import update

from b24scribe.callbacks import callback_secret
from b24scribe.checks import check_transcription_vendor
from b24scribe.db import Database
from b24scribe.models import Call, InboundEvent, Job
from b24scribe.settings import Settings, load_settings
from bench.recording import RecordingServer
from tests.fake_azure_stt import WRONG_KEY, FakeAzureSpeech
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_schemas_azure import DIARIZED_MESSAGES, STEREO_MESSAGES
from tests.transcribe_support import ORDER, call_row, drain_until, finished, methods, post_event, transcribe_job

SECRET = "azure-web-hook-secret-5f1c"
TIMEOUT_MINUTES = 0.01  # 0.6 s: the fake finishes a transcription in 0.2 s
NO_SPEECH = "The audio file has no speech in it."


@pytest.fixture
def fake_azure() -> Iterator[FakeAzureSpeech]:
    fake = FakeAzureSpeech().start()
    yield fake
    fake.stop()


def keys(fake: FakeAzureSpeech, **more: str) -> dict[str, str]:
    return {"AZURE_API_KEY": fake.api_key, "AZURE_API_URL": fake.url, "AZURE_WEBHOOK_SECRET": SECRET, **more}


@pytest.fixture
def service(
    public_app: Callable[..., tuple[Flask, str]], fake_azure: FakeAzureSpeech
) -> Callable[..., tuple[Flask, str]]:
    """Start the app over real HTTP with transcription requests to Azure; `web_hook` registers the
    Speech resource's web hook at the app's /hooks/stt/azure, as its owner would once."""

    def start(web_hook: bool = True, **overrides: object) -> tuple[Flask, str]:
        app, public = public_app(**({"transcribe_with": "azure", "vendor": keys(fake_azure)} | overrides))
        if web_hook:
            fake_azure.register_web_hook(f"{public}/hooks/stt/azure", SECRET)
        return app, public

    return start


@pytest.fixture
def by_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recording server stands for a public host: Azure is sent the URL and fetches it itself."""
    monkeypatch.setattr("b24scribe.delivery.transcribe.fetchable", lambda url: True)


def stored_events(db: Database) -> int:
    with db.read() as session:
        return session.query(InboundEvent).filter(InboundEvent.source == "stt").count()


@pytest.mark.usefixtures("by_url")
def test_a_fetchable_stereo_recording_goes_to_batch_transcription_and_the_web_hook_brings_its_exact_transcript(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_azure: FakeAzureSpeech,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    url = recordings.add("rec-az1", 400_000)
    post_event(app, finished("1700000003.1", url))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_MESSAGES
    (submission,) = fake_azure.submissions
    assert submission.audio_sha256 == recordings.served(url).sha256  # Azure fetched the URL itself
    body = submission.body
    assert body["contentUrls"] == [url] and body["locale"] == "en-US"
    assert body["properties"] == {"timeToLiveHours": 48, "wordLevelTimestampsEnabled": False, "channels": [0, 1]}
    # the call, for the resource-wide web hook that names no call in its URL
    assert body["customProperties"] == {"b24scribe_pbx": "generic", "b24scribe_call": "1700000003.1"}
    assert fake_azure.fast == []
    (callback,) = fake_azure.wait_for_callbacks()
    assert callback.status == 202 and callback.json()["status"] == "Succeeded"
    # the hook read the files with the key, the result file (a SAS URL) without it
    assert f"/speechtotext/transcriptions/{submission.transcription_id}/files" in fake_azure.reads
    assert fake_azure.content_reads == [(f"/results/{submission.transcription_id}_0_0.json", False)]
    row = call_row(db, "1700000003.1")
    assert (row.transcription_state, row.transcription_job_id) == ("submitted", submission.transcription_id)


def test_a_recording_azure_cannot_fetch_goes_as_bytes_to_fast_transcription_and_its_answer_is_the_transcript(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_azure: FakeAzureSpeech,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    url = recordings.add("rec-az2", 300_000)  # on 127.0.0.1: Azure could not fetch it
    post_event(app, finished("1700000003.2", url))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_MESSAGES
    (fast,) = fake_azure.fast
    assert fast.audio_sha256 == recordings.served(url).sha256
    assert (fast.audio_filename, fast.audio_content_type) == ("recording.wav", "audio/wav")
    assert fast.definition == {"locales": ["en-US"], "channels": [0, 1]}
    assert fake_azure.submissions == [] and fake_azure.callbacks == []  # no batch job, nothing to call back
    row = call_row(db, "1700000003.2")
    assert row.transcription_state == "transcribed"
    assert (transcribe_job(db).result or {}).get("transcript") == "transcribed at once"


@pytest.mark.parametrize("route", ["batch", "fast"])
def test_a_mono_recording_asks_for_diarization_and_speakers_become_sides(
    route: str,
    request: pytest.FixtureRequest,
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_azure: FakeAzureSpeech,
    recordings: RecordingServer,
) -> None:
    if route == "batch":
        request.getfixturevalue("by_url")
    app, _ = service()
    post_event(app, finished("1700000003.3", recordings.add("rec-az3", 100_000), recording_channels=1))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    diarization = {"enabled": True, "maxSpeakers": 2}
    if route == "batch":
        (submission,) = fake_azure.submissions
        assert submission.properties["diarization"] == diarization and "channels" not in submission.properties
    else:  # fast transcription counts speakers from 0, the result file from 1: the same sides either way
        (fast,) = fake_azure.fast
        assert fast.definition == {"locales": ["en-US"], "diarization": diarization}
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == DIARIZED_MESSAGES


@pytest.mark.usefixtures("by_url")
def test_several_locales_let_azure_identify_the_language(
    service: Callable[..., tuple[Flask, str]], fake_azure: FakeAzureSpeech, recordings: RecordingServer
) -> None:
    app, _ = service(vendor=keys(fake_azure, AZURE_LOCALE="ru-RU, en-US"))
    fake_azure.hold_callbacks()
    post_event(app, finished("1700000003.4", recordings.add("rec-az4", 100_000)))
    drain_until(app, lambda: bool(fake_azure.submissions))

    body = fake_azure.submissions[0].body
    assert body["locale"] == "ru-RU"
    assert body["properties"]["languageIdentification"] == {"candidateLocales": ["ru-RU", "en-US"]}


@pytest.mark.usefixtures("by_url")
def test_a_lost_answer_is_looked_up_by_custom_properties_and_never_makes_a_second_transcription(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_azure: FakeAzureSpeech,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_azure.page_size = 1  # the look-up pages through the list by @nextLink
    fake_azure.drop_after_accept()  # Azure took it, its answer never came back
    post_event(app, finished("1700000003.5", recordings.add("rec-az5", 200_000)))
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))

    (submission,) = fake_azure.submissions
    assert submission.answered is None  # the answer was indeed lost
    assert "/speechtotext/transcriptions" in fake_azure.reads  # found in the list
    assert call_row(db, "1700000003.5").transcription_job_id == submission.transcription_id
    assert methods(fake_bitrix24) == ORDER


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    signature = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return {
        "Content-Type": "application/json",
        "X-MicrosoftSpeechServices-Event": "TranscriptionCompletion",
        "X-MicrosoftSpeechServices-Signature": signature,
    }


def test_a_web_hook_without_the_resources_signature_is_refused_and_nothing_is_stored(
    service: Callable[..., tuple[Flask, str]], db: Database
) -> None:
    app, _ = service()
    client = app.test_client()
    body = json.dumps(
        {
            "self": "https://westeurope.api.cognitive.microsoft.com/speechtotext/transcriptions/"
            "5cff1d03-118f-4c4c-b3ba-e1f1cd88c14d?api-version=2024-11-15",
            "status": "Failed",
            "properties": {"error": {"code": "InvalidData", "message": NO_SPEECH}},
            "customProperties": {"b24scribe_pbx": "generic", "b24scribe_call": "1700000003.6"},
        }
    ).encode()
    settings: Settings = app.extensions["b24scribe.settings"]
    other_call = callback_secret(settings, "azure", settings.portal, "generic", "1700000003.7") or ""
    refused = [
        client.post("/hooks/stt/azure", data=body, headers=signed(body, "rotated-out-secret")),
        client.post("/hooks/stt/azure", data=body, headers=signed(body + b" ")),  # signed over other bytes
        client.post("/hooks/stt/azure", data=body, headers={"Content-Type": "application/json"}),
        client.post(
            "/hooks/stt/azure?pbx=generic&call=1700000003.6",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {other_call}"},
        ),
    ]
    assert [answer.status_code for answer in refused] == [401, 401, 401, 401]
    assert stored_events(db) == 0

    let_in = client.post("/hooks/stt/azure", data=body, headers=signed(body))
    assert let_in.status_code == 202  # the resource's own signature opens the hook
    assert stored_events(db) == 1


@pytest.mark.parametrize("route", ["batch", "fast"])
def test_a_429_backs_off_for_its_retry_after_without_spending_an_attempt(
    route: str,
    request: pytest.FixtureRequest,
    service: Callable[..., tuple[Flask, str]],
    fake_azure: FakeAzureSpeech,
    recordings: RecordingServer,
    db: Database,
) -> None:
    if route == "batch":
        request.getfixturevalue("by_url")
    app, _ = service()
    fake_azure.fail_next(429, retry_after=120)
    post_event(app, finished("1700000003.8", recordings.add("rec-az8", 100_000)))
    before = time.time()
    drain_until(app, lambda: bool(fake_azure.submissions or fake_azure.fast))
    drain_until(app, lambda: True)

    tried = fake_azure.submissions if route == "batch" else fake_azure.fast
    assert [attempt.answered for attempt in tried] == [429]  # nothing more within the back-off
    job = transcribe_job(db)
    assert job.state == "pending" and job.attempts == 0
    assert 100 <= job.next_attempt_at - before <= 130
    assert "azure answered HTTP 429: Too many requests: try again later" in (job.last_error or "")


@pytest.mark.parametrize("route", ["batch", "fast"])
def test_a_wrong_key_is_shown_on_the_call_with_azures_message_and_not_retried(
    route: str,
    request: pytest.FixtureRequest,
    service: Callable[..., tuple[Flask, str]],
    fake_azure: FakeAzureSpeech,
    recordings: RecordingServer,
    db: Database,
) -> None:
    if route == "batch":
        request.getfixturevalue("by_url")
    app, _ = service(vendor=keys(fake_azure, AZURE_API_KEY="revoked"))
    post_event(app, finished("1700000003.9", recordings.add("rec-az9", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000003.9").transcription_state == "failed")

    assert call_row(db, "1700000003.9").transcription_error == f"azure answered HTTP 401: {WRONG_KEY}"
    assert len(fake_azure.submissions) + len(fake_azure.fast) == 1  # not retried


@pytest.mark.usefixtures("by_url")
def test_without_a_web_hook_the_transcription_is_asked_after_the_wait_and_still_ends_on_the_card(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_azure: FakeAzureSpeech,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service(web_hook=False, transcribe_timeout_minutes=TIMEOUT_MINUTES)
    fake_azure.keep_processing()  # still running when first asked: asked again a period later
    post_event(app, finished("1700000003.10", recordings.add("rec-az10", 200_000)))
    drain_until(app, lambda: bool(fake_azure.reads))
    drain_until(app, lambda: transcribe_job(db).state == "pending")
    assert "azure says the job is still processing" in (transcribe_job(db).last_error or "")

    fake_azure.finish_processing()
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))
    assert methods(fake_bitrix24) == ORDER
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_MESSAGES
    (submission,) = fake_azure.submissions
    entity = f"/speechtotext/transcriptions/{submission.transcription_id}"
    *asked, files = fake_azure.reads
    assert len(asked) >= 2 and set(asked) == {entity} and files == f"{entity}/files"
    assert fake_azure.callbacks == []
    assert transcribe_job(db).state == "done"


@pytest.mark.usefixtures("by_url")
def test_a_failed_transcription_shows_azures_reason_on_the_call(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_azure: FakeAzureSpeech,
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service(web_hook=False, transcribe_timeout_minutes=TIMEOUT_MINUTES)
    fake_azure.fail_jobs(NO_SPEECH)
    post_event(app, finished("1700000003.11", recordings.add("rec-az11", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000003.11").transcription_state == "failed")

    row = call_row(db, "1700000003.11")
    assert row.transcription_error == f"azure could not transcribe the recording: {NO_SPEECH}"
    assert len(fake_azure.submissions) == 1 and methods(fake_bitrix24) == ORDER[:3]


def test_check_tries_the_key_with_a_harmless_request(settings: Settings, fake_azure: FakeAzureSpeech) -> None:
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com", transcribe_with="azure", vendor=keys(fake_azure)
    )
    (good,) = check_transcription_vendor(configured)
    assert good.level == "ok"
    wrong = configured.with_overrides(vendor=keys(fake_azure, AZURE_API_KEY="nope"))
    (bad,) = check_transcription_vendor(wrong)
    assert bad.level == "problem" and f"azure answered HTTP 401: {WRONG_KEY}" in bad.message
    assert fake_azure.submissions == [] and fake_azure.fast == []  # nothing was submitted
    nowhere = configured.with_overrides(vendor={"AZURE_API_KEY": fake_azure.api_key})
    (unset,) = check_transcription_vendor(nowhere)
    assert "B24SCRIBE_AZURE_API_URL" in unset.message and "B24SCRIBE_AZURE_REGION" in unset.message


def test_transcribe_with_accepts_azure() -> None:
    environ = {
        "B24SCRIBE_PUBLIC_URL": "https://b24scribe.example.com",
        "B24SCRIBE_INBOUND_TOKEN": "t" * 20,
        "B24SCRIBE_TRANSCRIBE_WITH": "Azure",
    }
    assert load_settings(environ, dotenv=False).transcribe_with == "azure"


@pytest.mark.usefixtures("by_url")
def test_without_a_web_hook_azure_is_asked_a_minute_after_the_submission_then_after_as_long_again(
    service: Callable[..., tuple[Flask, str]],
    fake_bitrix24: FakeBitrix24,
    fake_azure: FakeAzureSpeech,
    recordings: RecordingServer,
    db: Database,
) -> None:
    """The default B24SCRIBE_TRANSCRIBE_TIMEOUT_MINUTES (60) is not how long an Azure transcript takes
    to reach the card when no web hook is registered: Azure is asked after a minute, then after as long
    again as the transcription has taken so far."""
    app, _ = service(web_hook=False)
    fake_azure.keep_processing()
    post_event(app, finished("1700000003.12", recordings.add("rec-az12", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000003.12").transcription_state == "submitted")
    submitted_at = call_row(db, "1700000003.12").transcription_submitted_at or 0.0
    assert transcribe_job(db).next_attempt_at - submitted_at == pytest.approx(60, abs=2)

    def five_minutes_later() -> None:  # the transcription was submitted five minutes ago, and the job is due
        with db.write() as session:
            session.execute(update(Call).values(transcription_submitted_at=time.time() - 300))
            session.execute(update(Job).where(Job.kind == "transcribe").values(next_attempt_at=time.time()))

    five_minutes_later()
    drain_until(app, lambda: bool(fake_azure.reads))
    job = transcribe_job(db)
    assert job.state == "pending" and job.attempts == 0
    assert job.next_attempt_at - time.time() == pytest.approx(300, abs=5)  # as long again as it has taken

    fake_azure.finish_processing()
    drain_until(app, lambda: fake_azure.submissions[0].status == "Succeeded")
    five_minutes_later()
    drain_until(app, lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24))
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_MESSAGES

"""Zadarma's recordings on the call card (contract §9, schemas/zadarma.py): a signed `NOTIFY_RECORD`
names its recording by an id, b24scribe asks Zadarma's API for the link (signed as Zadarma's SDKs sign,
checked by a fake API that verifies it as Zadarma documents) and attaches the file after finish and
before the transcript; a link not ready yet is asked again; a key or secret the API refuses ends
with the reason on the call; in url mode the link itself is Bitrix24's RECORD_URL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from b24scribe.delivery.download import DownloadFailed, NotReady, Refused
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from bench.recording import RecordingServer, wav_sha256
from schemas import zadarma
from schemas.registry import SOURCES
from tests.conftest import admin, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_zadarma_api import FakeZadarmaApi, running
from tests.test_e2e_zadarma import notifications, post

KEY, SECRET = "a248a6a984459935b569", "zadarma-recordings-secret-71d2"
CALL = "in_6b1e0d2f3a4c5b6d7e8f9a0b1c2d3e4f"  # the "answered" fixtures' pbx_call_id
REC_ID = "1764066030.123456"  # their NOTIFY_RECORD's call_id_with_rec
SIZE = 50_000  # a WAV file of this many bytes; over Bitrix24's inline limit is tests/test_recordings.py's
TRANSCRIPT = {"segments": [{"start": 0.5, "end": 2.2, "text": "Acme, good morning", "speaker": "A"}]}


@pytest.fixture
def api() -> Iterator[FakeZadarmaApi]:
    yield from running(KEY, SECRET)


@pytest.fixture
def files() -> Iterator[RecordingServer]:
    with RecordingServer() as server:
        yield server


def zadarma_settings(settings: Settings, api: FakeZadarmaApi, **vendor: str) -> Settings:
    """Upload mode, downloads allowed from 127.0.0.1 (the recording server stands in for
    api.zadarma.com's download links), retries at once; the API key and secret, the fake's URL."""
    keys = {"ZADARMA_API_KEY": KEY, "ZADARMA_API_SECRET": SECRET, "ZADARMA_API_URL": api.url} | vendor
    return settings.with_overrides(
        recording_mode="upload", recording_hosts=("127.0.0.1",), retry_schedule=(0.0, 0.0, 0.0), vendor=keys
    )


def start(settings: Settings, fake_bitrix24: FakeBitrix24) -> tuple[FlaskClient, Worker]:
    fake_bitrix24.add_user(3, "100")  # the extension that answers in the "answered" fixtures
    app: Flask = create_app(settings)
    return app.test_client(), Worker(app.extensions["b24scribe.db"], settings, SOURCES)


def call_and_transcript(client: FlaskClient, secret: str = SECRET) -> None:
    """The "answered" call as Zadarma notifies it (NOTIFY_RECORD last), then its transcript."""
    for fields in notifications("answered"):
        answer = post(client, fields, secret=secret)
        assert answer.status_code == 202, (fields["event"], answer.get_json())
    transcript = client.post(f"/hooks/stt/generic?pbx=zadarma&call={CALL}", json=TRANSCRIPT, headers=auth())
    assert transcript.status_code == 202


def methods(fake: FakeBitrix24) -> list[str]:
    return [request.method for request in fake.requests]


def call_view(client: FlaskClient) -> dict[str, Any]:
    response = client.get(f"/v1/calls/zadarma/{quote(CALL)}", headers=admin())
    assert response.status_code == 200 and response.json is not None
    view: dict[str, Any] = response.json
    return view


@pytest.mark.usefixtures("db")
def test_a_signed_notify_record_is_attached_after_finish_and_before_the_transcript(
    settings: Settings, fake_bitrix24: FakeBitrix24, api: FakeZadarmaApi, files: RecordingServer
) -> None:
    link = files.add(REC_ID, SIZE)
    api.links[REC_ID] = link
    client, worker = start(zadarma_settings(settings, api), fake_bitrix24)
    call_and_transcript(client)
    worker.drain()

    assert methods(fake_bitrix24) == [
        "telephony.externalcall.register",
        "telephony.externalcall.finish",
        "telephony.externalcall.attachrecord",
        "telephony.call.attachtranscription",
    ]
    [asked] = api.asked
    assert asked.verified and asked.params == {"call_id": REC_ID, "format": "json"}
    assert asked.authorization is not None and asked.authorization.startswith(f"{KEY}:")
    [(_, [attached])] = fake_bitrix24.records_by_call().items()
    assert (attached.via, attached.filename) == ("content", f"{REC_ID}.wav")
    assert attached.sha256 == wav_sha256(SIZE) == files.served(link).sha256
    recording = call_view(client)["recording"]
    assert (recording["state"], recording["file"]) == ("attached", f"{REC_ID}.wav")
    assert recording["url"] == "https://api.zadarma.com/v1/pbx/record/request/"  # the call keeps the request


@pytest.mark.usefixtures("db")
@pytest.mark.parametrize("status", [404, 400])  # a 404, or Zadarma's {"status": "error"} with a 400
def test_a_recording_the_api_has_not_stored_yet_is_asked_again_and_attached(
    settings: Settings, fake_bitrix24: FakeBitrix24, api: FakeZadarmaApi, files: RecordingServer, status: int
) -> None:
    api.links[REC_ID] = files.add(REC_ID, SIZE)
    api.not_ready(2, status)
    client, worker = start(zadarma_settings(settings, api), fake_bitrix24)
    call_and_transcript(client)
    worker.drain()

    assert [asked.status for asked in api.asked] == [status, status, 200]
    assert all(asked.verified for asked in api.asked)
    [(_, [attached])] = fake_bitrix24.records_by_call().items()
    assert attached.sha256 == wav_sha256(SIZE)
    assert methods(fake_bitrix24)[-2:] == ["telephony.externalcall.attachrecord", "telephony.call.attachtranscription"]
    view = call_view(client)
    assert view["recording"]["state"] == "attached"
    [job] = [job for job in view["jobs"] if job["kind"] == "record"]
    assert (job["state"], job["attempts"]) == ("done", 2)


@pytest.mark.usefixtures("db")
@pytest.mark.parametrize(
    ("wrong", "named"),
    [("ZADARMA_API_KEY", "B24SCRIBE_ZADARMA_API_KEY"), ("ZADARMA_API_SECRET", "B24SCRIBE_ZADARMA_API_SECRET")],
)
def test_a_key_or_secret_the_api_refuses_ends_with_the_reason_on_the_call(
    settings: Settings,
    fake_bitrix24: FakeBitrix24,
    api: FakeZadarmaApi,
    files: RecordingServer,
    wrong: str,
    named: str,
) -> None:
    link = files.add(REC_ID, SIZE)
    api.links[REC_ID] = link
    configured = zadarma_settings(settings, api, **{wrong: "not-the-" + wrong.lower()})
    client, worker = start(configured, fake_bitrix24)
    # the notifications verify with the secret b24scribe has (a wrong one refuses them at the hook)
    call_and_transcript(client, secret=configured.vendor["ZADARMA_API_SECRET"])
    worker.drain()

    [asked] = api.asked  # refused for good: not asked again
    assert (asked.verified, asked.status) == (False, 401)
    assert files.served(link).requests == 0
    assert "telephony.externalcall.attachrecord" not in methods(fake_bitrix24)
    assert methods(fake_bitrix24)[-1] == "telephony.call.attachtranscription"  # the transcript goes on
    recording = call_view(client)["recording"]
    assert recording["state"] == "refused"
    assert "HTTP 401" in recording["reason"] and named in recording["reason"]
    assert KEY not in recording["reason"] and SECRET not in recording["reason"]


@pytest.mark.usefixtures("db")
def test_url_mode_passes_the_link_the_api_gives_as_record_url(
    settings: Settings, fake_bitrix24: FakeBitrix24, api: FakeZadarmaApi, files: RecordingServer
) -> None:
    link = files.add(REC_ID, SIZE)
    api.links[REC_ID] = link
    configured = zadarma_settings(settings, api).with_overrides(recording_mode="url", recording_hosts=())
    client, worker = start(configured, fake_bitrix24)
    call_and_transcript(client)
    worker.drain()

    [request] = fake_bitrix24.calls_to("telephony.externalcall.attachrecord")
    assert request.params["RECORD_URL"] == link  # the file's own URL, not the API request
    assert files.served(link).requests == 0  # Bitrix24 fetches it; b24scribe downloads nothing
    [(_, [attached])] = fake_bitrix24.records_by_call().items()
    assert (attached.via, attached.url) == ("url", link)
    assert call_view(client)["recording"]["state"] == "attached"


@pytest.mark.usefixtures("db")
def test_without_the_api_key_notify_record_is_answered_and_not_stored(
    settings: Settings, fake_bitrix24: FakeBitrix24, api: FakeZadarmaApi
) -> None:
    configured = zadarma_settings(settings, api).with_overrides(vendor={"ZADARMA_API_SECRET": SECRET})
    client, worker = start(configured, fake_bitrix24)
    for fields in notifications("answered"):
        answer = post(client, fields, secret=SECRET)
        if fields["event"] == "NOTIFY_RECORD":
            assert (answer.status_code, answer.get_json()) == (200, {"ignored": True})
        else:
            assert answer.status_code == 202
    worker.drain()
    assert api.asked == []
    assert "telephony.externalcall.attachrecord" not in methods(fake_bitrix24)
    assert call_view(client)["recording"] is None


# --- the API request on its own -----------------------------------------------------------------


def test_the_api_signature_is_zadarmas_for_the_sdks_example_request() -> None:
    """The SDK's examples/pbx_record_request.php asks call_id 1458832388.1585217 (the SDK adds
    format=json). The expected value was computed apart from Python, with the documented recipe:
    q='call_id=1458832388.1585217&format=json'; printf '%s' "/v1/pbx/record/request/$q$(printf '%s' "$q"
    | md5sum | cut -d' ' -f1)" | openssl dgst -sha1 -hmac 8a8e91d214fb728889c7, the hex then base64."""
    parameters = {"call_id": "1458832388.1585217", "format": "json"}
    signature = zadarma.api_signature("/v1/pbx/record/request/", parameters, "8a8e91d214fb728889c7")
    assert signature == "MGVhODkyODZkN2JjZGQyOTQwY2ZjMDIyYmQ3NzQwZTUwZTUxZDVmMA=="


def test_the_query_is_encoded_as_phps_http_build_query() -> None:
    assert zadarma.api_query({"pbx_call_id": "in_a~b c/é", "call_id": "1.2"}) == (
        "call_id=1.2&pbx_call_id=in_a%7Eb+c%2F%C3%A9"
    )


def resolve(settings: Settings, url: str) -> str:
    with requests.Session() as http:
        return zadarma.resolve_recording(url, settings, http)


def test_a_request_by_pbx_call_id_takes_the_first_of_its_links(
    settings: Settings, api: FakeZadarmaApi, files: RecordingServer
) -> None:
    first, second = files.add("first", 1000), files.add("second", 1000)
    api.links |= {"1.1": first, "1.2": second}
    api.calls[CALL] = ["1.1", "1.2"]
    url = f"https://api.zadarma.com/v1/pbx/record/request/?pbx_call_id={CALL}"
    assert resolve(zadarma_settings(settings, api), url) == first
    assert api.asked[0].params == {"pbx_call_id": CALL, "format": "json"} and api.asked[0].verified


def test_any_other_url_is_taken_as_it_is_and_nothing_is_asked(settings: Settings, api: FakeZadarmaApi) -> None:
    relayed = "https://records.example/1764066030.123456.mp3"
    assert resolve(zadarma_settings(settings, api), relayed) == relayed
    assert api.asked == []


def test_without_the_key_the_stored_request_is_refused_naming_the_settings(
    settings: Settings, api: FakeZadarmaApi
) -> None:
    unset = zadarma_settings(settings, api).with_overrides(vendor={"ZADARMA_API_SECRET": SECRET})
    with pytest.raises(Refused, match="B24SCRIBE_ZADARMA_API_KEY and B24SCRIBE_ZADARMA_API_SECRET"):
        resolve(unset, zadarma.record_request_url(REC_ID))
    assert api.asked == []


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (429, {"status": "error", "message": "You exceeded the rate limit"}, DownloadFailed),
        (502, {}, DownloadFailed),
        (200, {"status": "error", "message": "Record not found"}, NotReady),
        (200, {"status": "success"}, NotReady),  # no link yet
        (200, {"status": "success", "link": "ftp://api.zadarma.com/x.mp3"}, Refused),
        (403, {"status": "error", "message": "Forbidden"}, Refused),
        (405, {}, Refused),
    ],
)
def test_what_the_api_answers_without_a_link(
    settings: Settings, status: int, body: dict[str, Any], error: type[Exception]
) -> None:
    class Scripted(FakeZadarmaApi):
        def _decide(self, path: str, params: dict[str, str], verified: bool) -> tuple[int, dict[str, Any]]:
            return (status, body) if verified else super()._decide(path, params, verified)

    api = Scripted(KEY, SECRET).start()
    try:
        with pytest.raises(error) as raised:
            resolve(zadarma_settings(settings, api), zadarma.record_request_url(REC_ID))
    finally:
        api.stop()
    if status != 200:
        assert f"HTTP {status}" in str(raised.value)
    assert api.asked[0].verified


def test_an_unreachable_api_is_retried(settings: Settings, api: FakeZadarmaApi) -> None:
    gone = zadarma_settings(settings, api, ZADARMA_API_URL="http://127.0.0.1:9")  # discard port: closed
    with pytest.raises(DownloadFailed, match="unreachable"):
        resolve(gone, zadarma.record_request_url(REC_ID))

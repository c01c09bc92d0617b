"""Recordings on the call card (contract §9): attachRecord after finish and before the transcript,
downloads only from allowed hosts, a recording not ready yet retried, never attached twice."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import admin, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_e2e_twilio_pbx import PUBLIC_URL
from tests.test_e2e_twilio_pbx import post as post_twilio
from tests.test_schemas_twilio_pbx import AUTH_TOKEN, FIXTURES

CALL_ID = "1700000000.123"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 64
OTHER_WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(reversed(range(256))) * 64
TRANSCRIPT = {"segments": [{"start": 0.5, "end": 2.2, "text": "Acme, good morning", "speaker": "A"}]}


@dataclass
class Served:
    body: bytes
    content_type: str = "audio/wav"
    not_found_first: int = 0  # answer 404 this many times before the file appears


@dataclass
class RecordingServer:
    """A PBX's web server publishing recordings, counting every request it gets."""

    host: str
    files: dict[str, Served] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    port: int = 0
    on_request: Callable[[str | None], None] | None = None  # given each request's Authorization header

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"


@pytest.fixture
def pbx_files() -> Iterator[RecordingServer]:
    yield from _serve("127.0.0.1")


@pytest.fixture
def outside_host() -> Iterator[RecordingServer]:
    yield from _serve("127.0.0.2")  # another loopback address: a host the allow-list does not name


def _serve(host: str) -> Iterator[RecordingServer]:
    server = RecordingServer(host)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.hits.append(self.path)
            if server.on_request is not None:
                server.on_request(self.headers.get("Authorization"))
            served = server.files.get(self.path)
            if served is None or served.not_found_first > 0:
                if served is not None:
                    served.not_found_first -= 1
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", served.content_type)
            self.send_header("Content-Length", str(len(served.body)))
            self.end_headers()
            self.wfile.write(served.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer((host, 0), Handler)
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Upload mode (the default users get), downloads allowed from 127.0.0.1 only; retries at once
    (the schedule's length still counts)."""
    return settings.with_overrides(
        recording_mode="upload", recording_hosts=("127.0.0.1",), retry_schedule=(0.0, 0.0, 0.0)
    )


def finished(recording_url: str | None, call_id: str = CALL_ID) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": "call.finished",
        "call_id": call_id,
        "direction": "inbound",
        "from": "+15551234567",
        "extension": "101",
        "duration": 73,
        "status": "answered",
    }
    if recording_url is not None:
        event["recording_url"] = recording_url
    return event


def post(client: FlaskClient, path: str, body: dict[str, Any]) -> None:
    response = client.post(path, json=body, headers=auth())
    assert response.status_code in (200, 202), response.get_data(as_text=True)


def post_transcript(client: FlaskClient, call_id: str = CALL_ID) -> None:
    post(client, f"/hooks/stt/generic?pbx=generic&call={quote(call_id)}", TRANSCRIPT)


def recording_of(client: FlaskClient, call_id: str = CALL_ID) -> dict[str, Any]:
    response = client.get(f"/v1/calls/generic/{quote(call_id)}", headers=admin())
    assert response.status_code == 200
    assert response.json is not None
    recording: dict[str, Any] = response.json["recording"]
    return recording


def methods(fake: FakeBitrix24) -> list[str]:
    return [request.method for request in fake.requests]


def b24_call_id(fake: FakeBitrix24) -> str:
    return str(fake.calls_to("telephony.externalcall.register")[0].response["result"]["CALL_ID"])


def test_register_finish_attach_record_then_transcript_in_that_order(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, pbx_files: RecordingServer
) -> None:
    pbx_files.files["/monitor/2026/12/07/in-101-1700000000.123.wav"] = Served(WAV)
    post(client, "/hooks/pbx/generic", finished(pbx_files.url("/monitor/2026/12/07/in-101-1700000000.123.wav")))
    post_transcript(client)
    worker.drain()

    assert methods(fake_bitrix24) == [
        "telephony.externalcall.register",
        "telephony.externalcall.finish",
        "telephony.externalcall.attachrecord",
        "telephony.call.attachtranscription",
    ]
    assert "RECORD_URL" not in fake_bitrix24.calls_to("telephony.externalcall.finish")[0].params  # upload mode
    [attached] = fake_bitrix24.records_by_call()[b24_call_id(fake_bitrix24)]
    assert attached.via == "content"
    assert attached.filename == "in-101-1700000000.123.wav"  # the URL's own name
    assert attached.sha256 == hashlib.sha256(WAV).hexdigest()
    recording = recording_of(client)
    assert recording["state"] == "attached"
    assert recording["file"] == "in-101-1700000000.123.wav"
    assert recording["sha256"] == hashlib.sha256(WAV).hexdigest()


def test_a_recording_that_404s_twice_and_then_appears_is_attached(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, pbx_files: RecordingServer
) -> None:
    pbx_files.files["/rec/late"] = Served(WAV, not_found_first=2)
    post(client, "/hooks/pbx/generic", finished(pbx_files.url("/rec/late")))
    worker.drain()

    assert pbx_files.hits == ["/rec/late"] * 3
    [attached] = fake_bitrix24.records_by_call()[b24_call_id(fake_bitrix24)]
    assert attached.filename == f"{CALL_ID}.wav"  # no name in the URL: the call id and the Content-Type
    assert attached.sha256 == hashlib.sha256(WAV).hexdigest()
    recording = recording_of(client)
    assert recording["state"] == "attached" and recording["reason"] is None
    response = client.get(f"/v1/calls/generic/{quote(CALL_ID)}", headers=admin())
    assert response.json is not None
    [job] = [job for job in response.json["jobs"] if job["kind"] == "record"]
    assert job["state"] == "done" and job["attempts"] == 2


def test_a_host_outside_the_allow_list_is_never_contacted_and_the_transcript_goes_on(
    client: FlaskClient,
    worker: Worker,
    fake_bitrix24: FakeBitrix24,
    pbx_files: RecordingServer,
    outside_host: RecordingServer,
) -> None:
    outside_host.files["/rec.wav"] = Served(WAV)
    post(client, "/hooks/pbx/generic", finished(outside_host.url("/rec.wav")))
    post_transcript(client)
    worker.drain()

    assert outside_host.hits == []
    assert "telephony.externalcall.attachrecord" not in methods(fake_bitrix24)
    assert methods(fake_bitrix24)[-1] == "telephony.call.attachtranscription"  # not held for 30 minutes
    recording = recording_of(client)
    assert recording["state"] == "refused"
    assert "127.0.0.2" in recording["reason"] and "RECORDING_HOSTS" in recording["reason"]


def test_a_redirect_to_another_host_is_not_followed(
    client: FlaskClient,
    worker: Worker,
    fake_bitrix24: FakeBitrix24,
    pbx_files: RecordingServer,
    outside_host: RecordingServer,
) -> None:
    outside_host.files["/rec.wav"] = Served(WAV)
    # the allowed host answers with a redirect to the outside one
    redirector = ThreadingHTTPServer(("127.0.0.1", 0), _redirect_to(outside_host.url("/rec.wav")))
    thread = threading.Thread(target=redirector.serve_forever, daemon=True)
    thread.start()
    try:
        post(client, "/hooks/pbx/generic", finished(f"http://127.0.0.1:{redirector.server_address[1]}/rec.wav"))
        worker.drain()
    finally:
        redirector.shutdown()
        redirector.server_close()
    assert outside_host.hits == []
    assert recording_of(client)["state"] == "refused"


def _redirect_to(location: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def test_the_same_recording_reported_again_is_not_attached_twice_and_a_new_one_replaces_it(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, pbx_files: RecordingServer
) -> None:
    pbx_files.files["/a.wav"] = Served(WAV)
    pbx_files.files["/copy-of-a.wav"] = Served(WAV)
    pbx_files.files["/b.wav"] = Served(OTHER_WAV)
    post(client, "/hooks/pbx/generic", finished(pbx_files.url("/a.wav")))
    worker.drain()
    ready = {"event": "recording.ready", "call_id": CALL_ID, "channels": 2}
    post(client, "/hooks/pbx/generic", ready | {"recording_url": pbx_files.url("/copy-of-a.wav")})
    worker.drain()
    history = fake_bitrix24.records_by_call()[b24_call_id(fake_bitrix24)]
    assert [entry.filename for entry in history] == ["a.wav"]  # the same bytes under another URL

    post(client, "/hooks/pbx/generic", ready | {"recording_url": pbx_files.url("/b.wav")})
    worker.drain()
    history = fake_bitrix24.records_by_call()[b24_call_id(fake_bitrix24)]
    assert [entry.filename for entry in history] == ["a.wav", "b.wav"]
    assert history[-1].sha256 == hashlib.sha256(OTHER_WAV).hexdigest()
    recording = recording_of(client)
    assert recording["file"] == "b.wav" and recording["channels"] == 2


def test_a_large_recording_goes_through_the_upload_url(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, pbx_files: RecordingServer
) -> None:
    big = b"ID3" + os.urandom(6 * 1024 * 1024)
    pbx_files.files["/big.mp3"] = Served(big, "audio/mpeg")
    post(client, "/hooks/pbx/generic", finished(pbx_files.url("/big.mp3")))
    worker.drain()

    [attached] = fake_bitrix24.records_by_call()[b24_call_id(fake_bitrix24)]
    assert attached.via == "upload"
    assert (attached.filename, attached.size) == ("big.mp3", len(big))
    assert attached.sha256 == hashlib.sha256(big).hexdigest()
    [request] = fake_bitrix24.calls_to("telephony.externalcall.attachrecord")
    assert "FILE_CONTENT" not in request.params


def test_a_transcript_waits_for_a_recording_on_its_way(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, pbx_files: RecordingServer, db: Database
) -> None:
    app = create_app(_settings_of(client).with_overrides(retry_schedule=(3600.0,)))
    slow_worker = Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES)
    slow = app.test_client()
    pbx_files.files["/later.wav"] = Served(WAV, not_found_first=1)
    post(slow, "/hooks/pbx/generic", finished(pbx_files.url("/later.wav")))
    post_transcript(slow)
    slow_worker.drain()

    assert methods(fake_bitrix24) == ["telephony.externalcall.register", "telephony.externalcall.finish"]
    recording = recording_of(slow)
    assert recording["state"] == "pending" and "not ready" in recording["reason"]
    response = slow.get(f"/v1/calls/generic/{quote(CALL_ID)}", headers=admin())
    assert response.json is not None
    assert "recording" in response.json["transcripts"][0]["reason"]


def test_without_the_recording_the_transcript_goes_after_the_wait(
    client: FlaskClient, fake_bitrix24: FakeBitrix24, pbx_files: RecordingServer
) -> None:
    app = create_app(_settings_of(client).with_overrides(retry_schedule=(3600.0,), recording_wait_minutes=0.0))
    worker = Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES)
    post(client, "/hooks/pbx/generic", finished(pbx_files.url("/never.wav")))
    post_transcript(client)
    worker.drain()
    assert methods(fake_bitrix24)[-1] == "telephony.call.attachtranscription"
    assert recording_of(client)["state"] == "pending"


def test_url_mode_passes_record_url_and_downloads_nothing(
    client: FlaskClient, fake_bitrix24: FakeBitrix24, pbx_files: RecordingServer
) -> None:
    app = create_app(_settings_of(client).with_overrides(recording_mode="url", recording_hosts=()))
    worker = Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES)
    url = pbx_files.url("/rec/1700000000.123.mp3")
    post(client, "/hooks/pbx/generic", finished(url))
    worker.drain()
    [request] = fake_bitrix24.calls_to("telephony.externalcall.attachrecord")
    assert request.params["RECORD_URL"] == url
    assert pbx_files.hits == []
    [attached] = fake_bitrix24.records_by_call()[b24_call_id(fake_bitrix24)]
    assert (attached.via, attached.url) == ("url", url)
    assert recording_of(client)["state"] == "attached"


def test_a_recording_reported_before_the_call_finishes_waits_for_finish(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, pbx_files: RecordingServer
) -> None:
    pbx_files.files["/early.wav"] = Served(WAV)
    post(
        client,
        "/hooks/pbx/generic",
        {"event": "recording.ready", "call_id": CALL_ID, "recording_url": pbx_files.url("/early.wav")},
    )
    worker.drain()
    assert fake_bitrix24.requests == [] and pbx_files.hits == []
    assert recording_of(client)["state"] == "pending"

    post(client, "/hooks/pbx/generic", finished(None))
    worker.drain()
    assert methods(fake_bitrix24)[-1] == "telephony.externalcall.attachrecord"
    assert recording_of(client)["state"] == "attached"


def test_in_dry_run_nothing_is_downloaded(
    database_url: str, db: Database, pbx_files: RecordingServer, settings: Settings
) -> None:
    app: Flask = create_app(settings.with_overrides(bitrix24_webhook_url=None))
    worker = Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES)
    client = app.test_client()
    post(client, "/hooks/pbx/generic", finished(pbx_files.url("/rec.wav")))
    worker.drain()
    assert pbx_files.hits == []
    assert recording_of(client)["state"] == "dry-run"


def _settings_of(client: FlaskClient) -> Settings:
    settings: Settings = client.application.extensions["b24scribe.settings"]
    return settings


def test_a_twilio_recording_is_downloaded_with_the_account_sid_and_auth_token(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24, pbx_files: RecordingServer
) -> None:
    """Twilio's recording callback, signed as Twilio signs it, names a media URL that asks for HTTP
    Basic auth (account SID, auth token): here served by a local server in Twilio's URL shape."""
    account = "ACa1b2c3d4e5f60718293a4b5c6d7e8f90"
    media = f"/2010-04-01/Accounts/{account}/Recordings/RE00000000000000000000000000000001.mp3"
    pbx_files.files[media] = Served(b"ID3" + bytes(5000), "audio/mpeg")
    seen: list[str | None] = []
    pbx_files.on_request = seen.append
    app = create_app(settings.with_overrides(vendor={"TWILIO_AUTH_TOKEN": AUTH_TOKEN}, public_url=PUBLIC_URL))
    client = app.test_client()
    for path in sorted(FIXTURES.glob("answered_*.txt")):
        body = path.read_bytes().strip()
        if "recording" in path.stem:
            fields = dict(parse_qsl(body.decode()))
            fields["RecordingUrl"] = pbx_files.url(media.removesuffix(".mp3"))
            body = urlencode(fields).encode()
        assert post_twilio(client, body).status_code == 202, path.stem
    Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES).drain()

    expected = "Basic " + base64.b64encode(f"{account}:{AUTH_TOKEN}".encode()).decode()
    assert seen == [expected]
    [(call_id, [attached])] = fake_bitrix24.records_by_call().items()
    assert attached.filename == "RE00000000000000000000000000000001.mp3"
    assert [r.method for r in fake_bitrix24.requests][-1] == "telephony.externalcall.attachrecord"

"""What the transcription-request tests share (tests/test_transcribe*.py): the app served at its own
public URL (the vendor calls it back there), the recording server, the PBX event, and draining the
worker until something is so."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from app import create_app
from b24scribe.callbacks import callback_secret
from b24scribe.db import Database
from b24scribe.models import Call, InboundEvent, Job
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from bench.recording import RecordingServer
from schemas.registry import SOURCES
from tests.conftest import auth
from tests.fake_bitrix24 import FakeBitrix24

# what the fake Bitrix24 answers, in order, for a submitted call (it records methods lower-cased)
ORDER = [
    "telephony.externalcall.register",
    "telephony.externalcall.finish",
    "telephony.externalcall.attachrecord",
    "telephony.call.attachtranscription",
]
# how every test app transcribes: recordings downloaded from the local recording server, no waits
TRANSCRIBING = {"recording_mode": "upload", "recording_hosts": ("127.0.0.1",), "retry_schedule": (0.0, 0.0, 0.0)}


class _LateApp:
    """A WSGI app set after the server's port is known (the app's public URL names that port)."""

    app: Any = None

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.app(environ, start_response)


@pytest.fixture
def recordings() -> Iterator[RecordingServer]:
    with RecordingServer() as server:
        yield server


@pytest.fixture
def public_app(settings: Settings, db: Database) -> Iterator[Callable[..., tuple[Flask, str]]]:
    """`start(**setting overrides)`: an app served over real HTTP whose B24SCRIBE_PUBLIC_URL is its own
    address, transcribing as TRANSCRIBING says → (the app, its public URL)."""
    servers: list[Any] = []

    def start(**overrides: Any) -> tuple[Flask, str]:
        late = _LateApp()
        server = make_server("127.0.0.1", 0, late, threaded=True)
        public = f"http://127.0.0.1:{server.server_port}"
        late.app = create_app(settings.with_overrides(**({"public_url": public} | TRANSCRIBING | overrides)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return late.app, public

    yield start
    for server in servers:
        server.shutdown()


def finished(call_id: str, recording: str | None, **changes: Any) -> dict[str, Any]:
    """An answered inbound `call.finished` with a stereo recording (`changes` replace or, as None, drop)."""
    event = {
        "event": "call.finished",
        "call_id": call_id,
        "direction": "inbound",
        "from": "+15551234567",
        "to": "+15550000000",
        "extension": "101",
        "started_at": "2026-12-07T10:20:30+01:00",
        "duration": 42,
        "status": "answered",
        "recording_url": recording,
        "recording_channels": 2,
    }
    return {k: v for k, v in (event | changes).items() if v is not None}


def post_event(app: Flask, event: dict[str, Any]) -> None:
    answer = app.test_client().post("/hooks/pbx/generic", json=event, headers=auth())
    assert answer.status_code == 202, answer.get_data(as_text=True)


def worker_of(app: Flask) -> Worker:
    return Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES)


def drain_until(app: Flask, done: Callable[[], bool], timeout: float = 15.0) -> None:
    worker = worker_of(app)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.drain()
        if done():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def methods(fake: FakeBitrix24) -> list[str]:
    return [r.method for r in fake.requests if r.method.startswith("telephony.") and r.status == 200]


def call_row(db: Database, pbx_call_id: str) -> Call:
    with db.read() as session:
        row = session.query(Call).filter(Call.pbx_call_id == pbx_call_id).one()
        session.expunge(row)
        return row


def transcribe_job(db: Database) -> Job:
    """The one transcribe job (detached)."""
    with db.read() as session:
        job = session.query(Job).filter(Job.kind == "transcribe").one()
        session.expunge(job)
        return job


def stt_events(db: Database) -> int:
    """How many transcript events are stored."""
    with db.read() as session:
        return session.query(InboundEvent).filter(InboundEvent.source == "stt").count()


def own_secret(app: Flask, vendor: str, pbx_call_id: str) -> str:
    """The per-call credential of a generic PBX call's callback from `vendor`."""
    settings: Settings = app.extensions["b24scribe.settings"]
    secret = callback_secret(settings, vendor, settings.portal, "generic", pbx_call_id)
    assert secret
    return secret

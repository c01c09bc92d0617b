"""Fixtures: a fresh database per test (SQLite, and PostgreSQL when reachable), the app, a worker,
the fake Bitrix24, a live HTTP server, and a helper that signs like the real senders."""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from standardwebhooks.webhooks import Webhook
from werkzeug.serving import make_server

from app import create_app
from b24scribe.db import Database
from b24scribe.models import Base
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES

if TYPE_CHECKING:
    from tests.fake_bitrix24 import FakeBitrix24

pytest_plugins = [
    "tests.fake_bitrix24",
    "tests.fake_vendor_api",
    "tests.fake_deepgram",
    "tests.fake_assemblyai",
    "tests.fake_revai",
    "tests.transcribe_support",
]

INBOUND_TOKEN = "test-inbound-token-7f3a"
ADMIN_TOKEN = "test-admin-token-91c2"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"test-standard-webhooks-secret-32b").decode()
POSTGRES_URL = os.environ.get("B24SCRIBE_TEST_POSTGRES_URL")

BACKENDS = ["sqlite"] + (["postgresql"] if POSTGRES_URL else [])


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A fresh, empty, migrated-by-metadata database for one test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/b24scribe.sqlite3"
        return
    assert POSTGRES_URL is not None
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    with admin.connect() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """The test's database with every table created."""
    database = Database(database_url)
    Base.metadata.create_all(database.write_engine)
    yield database
    database.dispose()


def make_settings(database_url: str, webhook_url: str) -> Settings:
    """Settings for a test: this database, this (fake) Bitrix24, the test secrets."""
    return Settings(
        database_url=database_url,
        bitrix24_webhook_url=webhook_url,
        bitrix24_timeout=2.0,
        inbound_token=INBOUND_TOKEN,
        webhook_secret=WEBHOOK_SECRET,
        admin_token=ADMIN_TOKEN,
        lease_seconds=5.0,
        rate_per_second=1000.0,
        rate_burst=1000,
        log_format="json",
        # Recordings are passed by URL: a cloud PBX's fixtures name its real hosts, and tests never
        # talk to the outside world. tests/test_recordings.py downloads (upload mode) from local servers.
        recording_mode="url",
    )


@pytest.fixture
def settings(database_url: str, fake_bitrix24: FakeBitrix24) -> Settings:
    """Settings pointing at the fake Bitrix24, with the test secrets."""
    return make_settings(database_url, fake_bitrix24.webhook_url)


@pytest.fixture
def app(settings: Settings, db: Database) -> Flask:
    """The app on the test's settings and database."""
    return create_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client for the app."""
    return app.test_client()


@pytest.fixture
def worker(app: Flask) -> Worker:
    """A worker sharing the app's database and settings (tests drain it in-process)."""
    return Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES)


@pytest.fixture
def live_url(app: Flask) -> Iterator[str]:
    """The app served over real HTTP on 127.0.0.1 (threaded werkzeug server)."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


def auth(token: str = INBOUND_TOKEN) -> dict[str, str]:
    """The bearer header a PBX or vendor sends."""
    return {"Authorization": f"Bearer {token}"}


def admin() -> dict[str, str]:
    """The admin API's bearer header."""
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def sign_standard_webhook(
    body: bytes, msg_id: str | None = None, secret: str = WEBHOOK_SECRET, timestamp: float | None = None
) -> dict[str, str]:
    """Standard Webhooks headers made with the reference library."""
    from datetime import UTC, datetime

    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    moment = datetime.fromtimestamp(timestamp if timestamp is not None else time.time(), UTC)
    signature = Webhook(secret).sign(msg_id, moment, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(moment.timestamp())), "webhook-signature": signature}


def finished_call(webhook_url: str, phone: str = "+15551234567") -> str:
    """Register and finish a call on a (fake) portal directly, as another integration would; its CALL_ID."""
    import requests

    with requests.Session() as http:
        registered = http.post(
            webhook_url + "telephony.externalCall.register.json",
            json={"USER_ID": 1, "PHONE_NUMBER": phone, "TYPE": 2, "EXTERNAL_CALL_ID": f"other-{time.time_ns()}"},
            timeout=5,
        ).json()
        call_id = str(registered["result"]["CALL_ID"])
        http.post(
            webhook_url + "telephony.externalCall.finish.json",
            json={"CALL_ID": call_id, "USER_ID": 1, "DURATION": 42},
            timeout=5,
        ).raise_for_status()
    return call_id

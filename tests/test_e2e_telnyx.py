"""Telnyx Call Control webhooks end to end: signed over HTTP, folded by the worker, registered and
finished once per call session in the fake Bitrix24 with the right user, status and duration."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app import create_app
from b24scribe.db import Database
from b24scribe.models import Call, InboundEvent
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas import telnyx
from schemas.registry import SOURCES
from tests.conftest import auth
from tests.fake_bitrix24 import FakeBitrix24

FIXTURES = Path(__file__).parent / "fixtures" / "telnyx"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
HOOK = "/hooks/pbx/telnyx"


@pytest.fixture
def telnyx_app(settings: Settings, db: Database, fake_bitrix24: FakeBitrix24) -> Iterator[tuple[Flask, Worker]]:
    for user_id, inner in ((4, "104"), (5, "105"), (6, "106")):
        fake_bitrix24.add_user(user_id, inner)
    configured = settings.with_overrides(vendor={"TELNYX_PUBLIC_KEY": telnyx.public_key_setting(KEY)})
    app = create_app(configured)
    yield app, Worker(app.extensions["b24scribe.db"], configured, SOURCES)


def signed(body: bytes, key: Ed25519PrivateKey = KEY, timestamp: int | None = None) -> dict[str, Any]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "data": body,
        "headers": {
            "Content-Type": "application/json",
            "telnyx-timestamp": stamp,
            "telnyx-signature-ed25519": telnyx.sign(key, stamp, body),
        },
    }


def post_scenario(client: FlaskClient, worker: Worker, scenario: str) -> None:
    """Every webhook of the scenario in order, the worker running between them (as it would)."""
    files = sorted(FIXTURES.glob(f"{scenario}_[0-9]*.json"))
    assert files
    for path in files:
        answer = client.post(HOOK, **signed(path.read_bytes()))
        assert answer.status_code == 202, answer.get_json()
        worker.drain()


def events(db: Database) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.count()).select_from(InboundEvent)) or 0)


@pytest.mark.parametrize(
    ("scenario", "user", "status_code", "duration"),
    [
        ("answered", "101", "200", 72),
        ("busy", "105", "486", 0),
        ("no_answer", "106", "304", 0),
        ("transfer", "104", "200", 120),  # transferred from 101 to 104: 104 took it
        ("queue", "104", "200", 100),  # 104 and 105 rang, 104 answered, 105's cancelled leg undoes nothing
        ("outbound", "101", "200", 60),
    ],
)
def test_each_scenario_is_one_call_with_its_user_status_and_duration(
    telnyx_app: tuple[Flask, Worker],
    fake_bitrix24: FakeBitrix24,
    scenario: str,
    user: str,
    status_code: str,
    duration: int,
) -> None:
    app, worker = telnyx_app
    post_scenario(app.test_client(), worker, scenario)

    [registered] = fake_bitrix24.calls_to("telephony.externalCall.register")
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert (
        registered.params["EXTERNAL_CALL_ID"]
        == json.loads(next(FIXTURES.glob(f"{scenario}_01_*.json")).read_bytes())["data"]["payload"]["call_session_id"]
    )
    assert registered.params["TYPE"] == (1 if scenario == "outbound" else 2)
    assert registered.params["PHONE_NUMBER"] == "+15551230001"
    assert finished.params["USER_PHONE_INNER"] == user
    assert (finished.params["STATUS_CODE"], finished.params["DURATION"]) == (status_code, duration)


def test_the_answered_legs_may_hang_up_in_any_order(
    telnyx_app: tuple[Flask, Worker], fake_bitrix24: FakeBitrix24
) -> None:
    app, worker = telnyx_app
    client = app.test_client()
    files = sorted(FIXTURES.glob("answered_[0-9]*.json"))
    for path in [*files[:5], files[6], files[5]]:  # the caller's leg ends before the agent's
        assert client.post(HOOK, **signed(path.read_bytes())).status_code == 202
    worker.drain()
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert (finished.params["USER_PHONE_INNER"], finished.params["STATUS_CODE"], finished.params["DURATION"]) == (
        "101",
        "200",
        72,
    )


def test_forged_and_stale_signatures_are_refused_and_nothing_is_stored(
    telnyx_app: tuple[Flask, Worker], db: Database
) -> None:
    client = telnyx_app[0].test_client()
    body = (FIXTURES / "answered_01_initiated.json").read_bytes()
    forged = client.post(HOOK, **signed(body, key=Ed25519PrivateKey.generate()))
    assert (forged.status_code, forged.get_json()["error"]["code"]) == (401, "bad_signature")
    stale = client.post(HOOK, **signed(body, timestamp=int(time.time()) - 600))
    assert (stale.status_code, stale.get_json()["error"]["code"]) == (401, "bad_signature")
    changed = signed(body)
    changed["data"] = body.replace(b"+15551230001", b"+15550000000")
    assert client.post(HOOK, **changed).status_code == 401
    assert client.post(HOOK, data=body, headers={"Content-Type": "application/json"}).status_code == 401
    assert events(db) == 0
    # the inbound token of contract §4 still works
    assert client.post(HOOK, data=body, headers={**auth(), "Content-Type": "application/json"}).status_code == 202
    assert events(db) == 1


def test_a_retried_delivery_is_a_duplicate_even_with_another_attempt_number(
    telnyx_app: tuple[Flask, Worker], db: Database
) -> None:
    client = telnyx_app[0].test_client()
    webhook = json.loads((FIXTURES / "busy_04_hangup.json").read_bytes())
    first = client.post(HOOK, **signed(json.dumps(webhook).encode()))
    webhook["meta"]["attempt"] = 2  # Telnyx's retry: the same data.id, other bytes
    again = client.post(HOOK, **signed(json.dumps(webhook).encode()))
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json()["duplicate"] is True
    assert first.get_json()["event_id"] == again.get_json()["event_id"]
    assert events(db) == 1


def test_a_recording_saved_webhook_keeps_its_url_on_the_call(
    telnyx_app: tuple[Flask, Worker], fake_bitrix24: FakeBitrix24, db: Database
) -> None:
    app, worker = telnyx_app
    client = app.test_client()
    post_scenario(client, worker, "answered")
    saved = client.post(HOOK, **signed((FIXTURES / "recording_01_saved.json").read_bytes()))
    assert saved.status_code == 202
    worker.drain()
    assert len(fake_bitrix24.calls_to("telephony.externalCall.finish")) == 1  # still one call
    with db.read() as session:
        recording = session.scalar(select(Call.recording_url).where(Call.pbx_call_id == "answered-5f3c"))
    assert recording == "https://s3.amazonaws.com/telephony-recorder-prod/rec.wav?X-Amz-Expires=600"

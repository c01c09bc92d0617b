"""Vonage end to end: its signed event webhooks, as Vonage posts them, through HTTP, the worker and
the fake Bitrix24. Each scenario (answered, busy, no answer, transfer, queue, outbound) is one
registered and finished call with the right user, status code and talk time, whichever leg ends
first; a forged or stale token stores nothing; a retried or replayed delivery is a 200 duplicate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas import vonage
from schemas.registry import SOURCES
from tests.conftest import admin, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_new_sources import events

FIXTURES = Path(__file__).parent / "fixtures" / "vonage"
SECRET = "vonage-e2e-signature-secret-7c2d9a1f"
HOOK = "/hooks/pbx/vonage"
CALLER = ["caller_started.json", "caller_ringing.json", "caller_answered.json"]
AGENT_102 = "?extension=102"


@pytest.fixture
def vonage_app(settings: Settings, db: Database, fake_bitrix24: FakeBitrix24) -> Iterator[tuple[Flask, Worker]]:
    fake_bitrix24.add_user(2, "102", active=True)  # 101 is user 1
    configured = settings.with_overrides(vendor={"VONAGE_SIGNATURE_SECRET": SECRET})
    app = create_app(configured)
    yield app, Worker(app.extensions["b24scribe.db"], configured, SOURCES)


def post(client: FlaskClient, name: str, query: str = "", secret: str = SECRET, token: str | None = None) -> Any:
    """POST a fixture as Vonage does: the JSON body and a JWT over it."""
    body = (FIXTURES / name).read_bytes()
    token = token or vonage.sign(secret, body, jti=f"jti-{time.monotonic_ns()}")
    headers = {"Authorization": f"Bearer {token}"}
    return client.post(HOOK + query, data=body, content_type="application/json", headers=headers)


SCENARIOS: dict[str, list[tuple[str, str]]] = {
    "answered": [
        *[(name, "") for name in CALLER],
        ("agent_started.json", ""),
        ("agent_ringing.json", ""),
        ("agent_answered.json", ""),
        ("agent_completed.json", ""),
        ("caller_completed.json", ""),
    ],
    # the caller hangs up first: the caller's leg ends before the agent's
    "answered_caller_hangs_up": [
        *[(name, "") for name in CALLER],
        ("agent_answered.json", ""),
        ("caller_completed.json", ""),
        ("agent_completed.json", ""),
    ],
    "busy": [
        *[(name, "") for name in CALLER],
        ("agent_started.json", ""),
        ("agent_busy.json", ""),
        ("caller_completed.json", ""),
    ],
    "no_answer": [
        *[(name, "") for name in CALLER],
        ("agent_started.json", ""),
        ("agent_ringing.json", ""),
        ("agent_timeout.json", ""),
        ("caller_completed.json", ""),
    ],
    # 101 answers and transfers to 102 (a phone endpoint named by its eventUrl), who ends the call
    "transfer": [
        *[(name, "") for name in CALLER],
        ("agent_answered.json", ""),
        ("agent_completed.json", ""),
        ("transfer.json", ""),
        ("agent2_answered.json", AGENT_102),
        ("agent2_completed.json", AGENT_102),
        ("caller_completed.json", ""),
    ],
    # both agents ring; 101 answers; 102's leg is cancelled after it, and arrives last
    "queue": [
        *[(name, "") for name in CALLER],
        ("agent_started.json", ""),
        ("agent_ringing.json", ""),
        ("agent_answered.json", ""),
        ("agent_completed.json", ""),
        ("caller_completed.json", ""),
        ("agent2_cancelled.json", AGENT_102 + "&call=CON-f972836a-550f-45fa-956c-12a2ab5b7d22"),
    ],
    "outbound": [
        (name, "?direction=outbound&extension=101")
        for name in ("outbound_started.json", "outbound_answered.json", "outbound_completed.json")
    ],
}


@pytest.mark.parametrize(
    ("scenario", "user", "status_code", "duration", "call_type"),
    [
        ("answered", {"USER_PHONE_INNER": "101"}, "200", 47, 2),
        ("answered_caller_hangs_up", {"USER_PHONE_INNER": "101"}, "200", 47, 2),
        ("busy", {"USER_PHONE_INNER": "101"}, "486", 0, 2),
        ("no_answer", {"USER_PHONE_INNER": "101"}, "304", 0, 2),
        ("transfer", {"USER_PHONE_INNER": "102"}, "200", 30, 2),
        ("queue", {"USER_PHONE_INNER": "101"}, "200", 47, 2),
        ("outbound", {"USER_PHONE_INNER": "101"}, "200", 95, 1),
    ],
)
def test_each_scenario_is_one_registered_and_finished_call(
    vonage_app: tuple[Flask, Worker],
    fake_bitrix24: FakeBitrix24,
    scenario: str,
    user: dict[str, str],
    status_code: str,
    duration: int,
    call_type: int,
) -> None:
    app, worker = vonage_app
    client = app.test_client()
    for name, query in SCENARIOS[scenario]:
        answered = post(client, name, query)
        assert answered.status_code in (200, 202), (name, answered.get_json())
    worker.drain()

    [registered] = fake_bitrix24.calls_to("telephony.externalCall.register")
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert registered.params["PHONE_NUMBER"] == "447700900000"
    assert registered.params["TYPE"] == call_type
    assert registered.params["EXTERNAL_CALL_ID"] == "CON-f972836a-550f-45fa-956c-12a2ab5b7d22"
    assert {key: finished.params.get(key) for key in user} == user
    assert (finished.params["STATUS_CODE"], finished.params["DURATION"]) == (status_code, duration)


def test_a_forged_or_stale_token_is_a_401_and_nothing_is_stored(vonage_app: tuple[Flask, Worker], db: Database) -> None:
    client = vonage_app[0].test_client()
    forged = post(client, "caller_started.json", secret="not-the-vonage-signature-secret-0")
    assert (forged.status_code, forged.get_json()["error"]["code"]) == (401, "bad_signature")
    body = (FIXTURES / "caller_started.json").read_bytes()
    stale = post(client, "caller_started.json", token=vonage.sign(SECRET, body, issued_at=time.time() - 3600))
    assert stale.status_code == 401
    other_body = post(client, "caller_started.json", token=vonage.sign(SECRET, body + b"\n"))
    assert other_body.status_code == 401
    unsigned = client.post(HOOK, data=body, content_type="application/json")
    assert unsigned.status_code == 401
    assert events(db) == 0
    # the inbound token of contract §4 still works beside the signature
    assert client.post(HOOK, data=body, content_type="application/json", headers=auth()).status_code == 202
    assert events(db) == 1


def test_a_retried_or_replayed_delivery_is_a_200_duplicate(vonage_app: tuple[Flask, Worker], db: Database) -> None:
    client = vonage_app[0].test_client()
    body = (FIXTURES / "caller_completed.json").read_bytes()
    token = vonage.sign(SECRET, body, jti="first")
    first = post(client, "caller_completed.json", token=token)
    replayed = post(client, "caller_completed.json", token=token)  # the same request again
    retried = post(client, "caller_completed.json", token=vonage.sign(SECRET, body, jti="retry"))  # a new token
    assert (first.status_code, replayed.status_code, retried.status_code) == (202, 200, 200)
    assert first.get_json()["event_id"] == replayed.get_json()["event_id"] == retried.get_json()["event_id"]
    assert replayed.get_json()["duplicate"] is True
    assert events(db) == 1


def test_events_that_are_no_call_state_are_answered_and_not_stored(
    vonage_app: tuple[Flask, Worker], db: Database
) -> None:
    client = vonage_app[0].test_client()
    for name in ("transfer.json", "input.json"):
        assert post(client, name).status_code == 200
    assert post(client, "recording.json").status_code == 202
    assert events(db) == 1


def test_a_recording_lands_on_its_call(vonage_app: tuple[Flask, Worker], fake_bitrix24: FakeBitrix24) -> None:
    app, worker = vonage_app
    client = app.test_client()
    for name, query in [*SCENARIOS["answered"], ("recording.json", "")]:
        assert post(client, name, query).status_code == 202
    worker.drain()
    call = client.get("/v1/calls/vonage/CON-f972836a-550f-45fa-956c-12a2ab5b7d22", headers=admin()).get_json()
    assert (call["status"], call["duration"], call["extension"]) == ("answered", 47, "101")
    assert len(fake_bitrix24.calls_to("telephony.externalCall.finish")) == 1
    # the recording is known with its call (attaching it, with Vonage's JWT, is the recordings' job)
    recording_url = "https://api.nexmo.com/v1/files/aaaaaaaa-bbbb-cccc-dddd-0123456789ab"
    assert recording_url in str(call)

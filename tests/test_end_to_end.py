"""The whole path through real HTTP: a transcript posted to the service lands on the Bitrix24 call."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import ADMIN_TOKEN, INBOUND_TOKEN, admin, auth, finished_call
from tests.fake_bitrix24 import FakeBitrix24

ROOT = Path(__file__).resolve().parent.parent


TRANSCRIPT = {
    "segments": [
        {"start": 0.4, "end": 2.9, "text": "Good afternoon,   Acme support.", "channel": 0},
        {"start": 3.2, "end": 6.0, "text": "Hello! I'd like to change my plan.", "channel": 1},
        {"start": 6.5, "end": 6.9, "text": "  ", "channel": 0},
        {"start": 7.1, "end": 9.0, "text": "Sure, one moment.", "channel": 0},
    ],
    "cost": 0.12,
    "cost_currency": "USD",
}
# An inbound call, channel 0 = caller (the client) by default.
EXPECTED_MESSAGES = [
    {"SIDE": "Client", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Good afternoon, Acme support."},
    {"SIDE": "User", "START_TIME": 3, "STOP_TIME": 6, "MESSAGE": "Hello! I'd like to change my plan."},
    {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Sure, one moment."},
]


def test_a_generic_transcript_reaches_bitrix24_once_and_the_call_shows_its_transcript_id(
    live_url: str, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)

    posted = requests.post(f"{live_url}/hooks/stt/generic?b24_call_id={call_id}", json=TRANSCRIPT, headers=auth())
    assert posted.status_code == 202
    again = requests.post(f"{live_url}/hooks/stt/generic?b24_call_id={call_id}", json=TRANSCRIPT, headers=auth())
    assert again.status_code == 200 and again.json()["duplicate"] is True

    worker.drain()

    attached = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert len(attached) == 1
    assert attached[0].params == {
        "CALL_ID": call_id,
        "MESSAGES": EXPECTED_MESSAGES,
        "COST": 0.12,
        "COST_CURRENCY": "USD",
    }
    transcript_id = fake_bitrix24.statistics[call_id]["TRANSCRIPT_ID"]
    assert transcript_id is not None

    state = requests.get(f"{live_url}/v1/calls/by-b24/{call_id}", headers=admin()).json()
    assert state["b24_call_id"] == call_id
    assert state["transcripts"][0]["state"] == "delivered"
    assert state["transcripts"][0]["transcript_id"] == transcript_id
    assert state["jobs"][0]["state"] == "done"


def test_a_transcript_for_a_call_not_yet_finished_is_retried_until_it_is(
    live_url: str, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    registered = requests.post(
        fake_bitrix24.webhook_url + "telephony.externalCall.register.json",
        json={"USER_ID": 1, "PHONE_NUMBER": "+15550001111", "TYPE": 2, "EXTERNAL_CALL_ID": "x-1"},
        timeout=5,
    ).json()
    call_id = registered["result"]["CALL_ID"]
    requests.post(f"{live_url}/hooks/stt/generic?b24_call_id={call_id}", json=TRANSCRIPT, headers=auth())
    worker.drain()

    state = requests.get(f"{live_url}/v1/calls/by-b24/{call_id}", headers=admin()).json()
    job = state["jobs"][0]
    assert job["state"] == "pending" and job["attempts"] == 1
    assert job["last_error"] == f"Call {call_id} is not found. Is it finished?"
    assert state["transcripts"][0]["state"] == "pending"


def test_dry_run_records_the_exact_request_and_sends_nothing(
    settings: Settings, db: object, fake_bitrix24: FakeBitrix24
) -> None:
    from app import create_app

    app = create_app(settings.with_overrides(bitrix24_webhook_url=None))
    client = app.test_client()
    assert client.post("/hooks/stt/generic?b24_call_id=CALL-9", json=TRANSCRIPT, headers=auth()).status_code == 202
    Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES).drain()

    state = client.get("/v1/calls/by-b24/CALL-9", headers=admin()).json
    assert state is not None
    job = state["jobs"][0]
    assert job["state"] == "done"
    assert job["result"]["dry_run"] is True
    assert job["request"] == {
        "method": "telephony.call.attachTranscription",
        "params": {"CALL_ID": "CALL-9", "MESSAGES": EXPECTED_MESSAGES, "COST": 0.12, "COST_CURRENCY": "USD"},
    }
    assert fake_bitrix24.requests == []


# --- a worker killed mid-delivery -------------------------------------------------------------


@pytest.fixture
def worker_process(settings: Settings, db: object) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start `flask worker` subprocesses on the test's database and settings."""
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "B24SCRIBE_DATABASE_URL": settings.database_url,
            "B24SCRIBE_BITRIX24_WEBHOOK_URL": settings.bitrix24_webhook_url or "",
            "B24SCRIBE_INBOUND_TOKEN": INBOUND_TOKEN,
            "B24SCRIBE_ADMIN_TOKEN": ADMIN_TOKEN,
            "B24SCRIBE_LEASE_SECONDS": "2",
            "B24SCRIBE_BITRIX24_TIMEOUT": "30",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "app", "worker"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


@pytest.mark.parametrize("statistics_visible", [True, False], ids=["lookup", "lookup-denied"])
def test_a_job_survives_a_worker_killed_mid_delivery_and_is_delivered_once(
    live_url: str,
    fake_bitrix24: FakeBitrix24,
    worker_process: Callable[[], subprocess.Popen[bytes]],
    statistics_visible: bool,
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    fake_bitrix24.configure(deny_statistics=not statistics_visible)
    # The portal takes the transcript, then answers only after 3 s: the worker dies in between.
    fake_bitrix24.inject_slow("telephony.call.attachTranscription", seconds=3.0)
    requests.post(f"{live_url}/hooks/stt/generic?b24_call_id={call_id}", json=TRANSCRIPT, headers=auth())

    first = worker_process()
    wait_for(lambda: fake_bitrix24.calls_to("telephony.call.attachTranscription"))
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)

    worker_process()

    def delivered() -> bool:
        state = requests.get(f"{live_url}/v1/calls/by-b24/{call_id}", headers=admin()).json()
        return bool(state["jobs"][0]["state"] == "done")

    wait_for(delivered, timeout=30)
    state = requests.get(f"{live_url}/v1/calls/by-b24/{call_id}", headers=admin()).json()
    attachments = fake_bitrix24.attachments_by_call()[call_id]
    if statistics_visible:
        # The new worker looked on the Bitrix24 side, found the transcript and did not resend.
        assert len(attachments) == 1
        assert state["transcripts"][0]["transcript_id"] == attachments[0]
    else:
        # The portal hides its statistics: resent once, and flagged as a possible duplicate.
        assert len(attachments) == 2
        assert state["jobs"][0]["result"]["possible_duplicate"] is True

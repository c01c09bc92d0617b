"""Graceful shutdown: SIGTERM lets the delivery in flight finish and be recorded, then exit 0. And
the ungraceful kind: a SIGKILLed worker's job and portal slot are taken back within 15 s by another
worker, without waiting out the job's lease; a live worker on a long request is never taken for dead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from b24scribe import outbox
from b24scribe.db import Database
from b24scribe.models import Job, WorkerHeartbeat
from b24scribe.settings import Settings
from tests.conftest import ADMIN_TOKEN, INBOUND_TOKEN, auth, finished_call
from tests.fake_bitrix24 import FakeBitrix24

ROOT = Path(__file__).resolve().parent.parent
ATTACH = "telephony.call.attachTranscription"
LEASE_SECONDS = 2.0
TRANSCRIPT = {"segments": [{"start": 0.0, "end": 2.0, "text": "Thank you for calling.", "channel": 0}]}

StartWorker = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_worker(settings: Settings, db: Database, tmp_path: Path) -> Iterator[StartWorker]:
    """`flask worker` subprocesses on the test's database, each in its own process group."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(**overrides: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "B24SCRIBE_DATABASE_URL": settings.database_url,
            "B24SCRIBE_BITRIX24_WEBHOOK_URL": settings.bitrix24_webhook_url or "",
            "B24SCRIBE_INBOUND_TOKEN": INBOUND_TOKEN,
            "B24SCRIBE_ADMIN_TOKEN": ADMIN_TOKEN,
            "B24SCRIBE_LEASE_SECONDS": str(LEASE_SECONDS),
            "B24SCRIBE_BITRIX24_TIMEOUT": "30",
            "B24SCRIBE_RATE_PER_SECOND": "100",
            "B24SCRIBE_RATE_BURST": "100",
            **{f"B24SCRIBE_{name.upper()}": value for name, value in overrides.items()},
        }
        log = (tmp_path / f"worker-{len(processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "app", "worker"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_mid_delivery_lets_it_finish_and_be_recorded_then_exits_0(
    client: FlaskClient, db: Database, fake_bitrix24: FakeBitrix24, start_worker: StartWorker
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    # The portal takes 4 s to answer - twice the lease: the lease must be renewed after SIGTERM.
    fake_bitrix24.inject_slow(ATTACH, seconds=2 * LEASE_SECONDS)
    answer = client.post(f"/hooks/stt/generic?b24_call_id={call_id}", json=TRANSCRIPT, headers=auth())
    assert answer.status_code == 202

    worker = start_worker()
    wait_for(lambda: fake_bitrix24.calls_to(ATTACH), timeout=30, what="the attach request")
    worker.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    # Meanwhile another worker's sweeper runs after the lease would have expired un-renewed.
    time.sleep(LEASE_SECONDS * 1.5)
    assert worker.poll() is None, "the worker waits for its delivery"
    with db.write() as session:
        assert outbox.reclaim_expired(session) == 0, "the lease is still renewed while the delivery finishes"

    assert worker.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 2 * LEASE_SECONDS + 5
    attachments = fake_bitrix24.attachments_by_call()[call_id]
    assert len(attachments) == 1
    with db.read() as session:
        (job,) = session.scalars(select(Job).where(Job.kind == "attach")).all()
        assert (job.state, job.lease_owner, job.attempts) == ("done", None, 0)
        assert job.result is not None and job.result["TRANSCRIPT_ID"] == attachments[0]
        assert session.scalars(select(WorkerHeartbeat)).all() == [], "the worker signed off"


def test_sigterm_to_an_idle_worker_exits_0_at_once(
    db: Database, fake_bitrix24: FakeBitrix24, start_worker: StartWorker
) -> None:
    worker = start_worker()

    def heartbeat() -> bool:
        with db.read() as session:
            return bool(session.scalars(select(WorkerHeartbeat)).all())

    wait_for(heartbeat, timeout=30, what="the worker's first heartbeat")
    worker.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert worker.wait(timeout=15) == 0
    assert time.monotonic() - started < 3
    assert fake_bitrix24.requests == []


def holder_pid(db: Database) -> int | None:
    """The pid of the worker process holding the attach job's lease (worker ids are host:pid:nonce)."""
    with db.read() as session:
        worker = session.scalar(select(Job.lease_worker).where(Job.kind == "attach", Job.state == "leased"))
    return int(worker.split(":")[1]) if worker else None


def test_a_sigkilled_worker_holding_a_slot_gives_it_back_within_15_seconds_without_waiting_out_its_lease(
    client: FlaskClient, db: Database, fake_bitrix24: FakeBitrix24, start_worker: StartWorker
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    fake_bitrix24.inject_slow(ATTACH, seconds=60)  # performed at once, answered never (for the holder)
    # One slot per portal, a 120-s lease: only the heartbeat can bring the job back within 15 s.
    workers = [start_worker(lease_seconds="120", portal_concurrency="1") for _ in range(2)]
    answer = client.post(f"/hooks/stt/generic?b24_call_id={call_id}", json=TRANSCRIPT, headers=auth())
    assert answer.status_code == 202
    wait_for(lambda: fake_bitrix24.calls_to(ATTACH), timeout=30, what="the attach request")
    pid = holder_pid(db)
    assert pid in {w.pid for w in workers}

    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    def done() -> bool:
        with db.read() as session:
            return session.scalar(select(Job.state).where(Job.kind == "attach")) == "done"

    wait_for(done, timeout=20, what="the job to be taken back and finished")
    assert time.monotonic() - killed < 15
    # The dead worker's request had landed: the survivor looked it up instead of attaching again.
    assert len(fake_bitrix24.calls_to("voximplant.statistic.get")) == 1
    assert len(fake_bitrix24.calls_to(ATTACH)) == 1
    assert len(fake_bitrix24.attachments_by_call()[call_id]) == 1
    with db.read() as session:
        (job,) = session.scalars(select(Job).where(Job.kind == "attach")).all()
        assert (job.attempts, job.lease_owner) == (0, None)
        beats = session.scalars(select(WorkerHeartbeat.worker_id)).all()
        assert all(f":{pid}:" not in worker for worker in beats), "the dead worker's heartbeat row is gone"


def test_a_live_worker_on_a_request_longer_than_the_dead_after_time_is_never_taken_for_dead(
    client: FlaskClient, db: Database, fake_bitrix24: FakeBitrix24, start_worker: StartWorker
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    fake_bitrix24.inject_slow(ATTACH, seconds=7)  # more than three times the dead-after time
    for _ in range(2):
        start_worker(worker_dead_after_seconds="2", lease_seconds="120")
    answer = client.post(f"/hooks/stt/generic?b24_call_id={call_id}", json=TRANSCRIPT, headers=auth())
    assert answer.status_code == 202

    def done() -> bool:
        with db.read() as session:
            return session.scalar(select(Job.state).where(Job.kind == "attach")) == "done"

    wait_for(done, timeout=40, what="the slow attach to finish")
    assert len(fake_bitrix24.calls_to(ATTACH)) == 1, "sent once: nobody took the job back"
    assert fake_bitrix24.calls_to("voximplant.statistic.get") == []
    with db.read() as session:
        (job,) = session.scalars(select(Job).where(Job.kind == "attach")).all()
        assert (job.attempts, job.ambiguous, job.last_error) == (0, False, None)

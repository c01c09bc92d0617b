"""The worker loop: folding and delivery take turns, a slow answer holds one slot only, a stall is
not followed by a burst, a job's failure is the job's, heartbeats take back a dead worker's jobs,
and a lost database connection is survived. Every test runs on SQLite and, when reachable,
PostgreSQL (the connection-killing one on PostgreSQL only)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, select, text, update

from app import create_app
from b24scribe import folding, outbox
from b24scribe import worker as worker_module
from b24scribe.db import Database
from b24scribe.delivery import steps
from b24scribe.models import Call, Job, WorkerHeartbeat
from b24scribe.settings import Settings, SettingsError, load_settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import POSTGRES_URL, auth, finished_call
from tests.fake_bitrix24 import FakeBitrix24

ATTACH = "telephony.call.attachTranscription"
STATISTICS = "voximplant.statistic.get"


def transcript(text: str) -> dict[str, Any]:
    return {"segments": [{"start": 0.0, "end": 2.0, "text": text, "channel": 0}]}


def post_transcript(app: Flask, call_id: str, text: str = "Thank you for calling.") -> None:
    answer = app.test_client().post(f"/hooks/stt/generic?b24_call_id={call_id}", json=transcript(text), headers=auth())
    assert answer.status_code == 202, answer.get_data(as_text=True)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll until `predicate()` holds; how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def running(worker: Worker) -> Iterator[threading.Thread]:
    """The worker's loops, heartbeat and senders in a background thread, stopped at the end."""
    thread = threading.Thread(target=worker.run_forever, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        worker.stopping.set()
        thread.join(timeout=30)


def jobs(db: Database, kind: str = "attach") -> list[Job]:
    with db.read() as session:
        found = list(session.scalars(select(Job).where(Job.kind == kind).order_by(Job.id)))
        session.expunge_all()
        return found


def service(settings: Settings, **changes: Any) -> tuple[Flask, Worker]:
    configured = settings.with_overrides(**changes)
    app = create_app(configured)
    return app, Worker(app.extensions["b24scribe.db"], configured, SOURCES)


# --- 1. folding and delivery take turns ---------------------------------------------------------


def test_folding_and_delivery_take_turns_so_delivery_never_starves_while_events_arrive(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, worker = service(settings)
    waiting_call = finished_call(fake_bitrix24.webhook_url)
    post_transcript(app, waiting_call)
    assert folding.apply_pending(db, worker.settings, SOURCES) == 1  # its attach job is due
    monkeypatch.setattr(worker_module, "FOLD_SECONDS", 0.0)  # a fold pass: one batch
    folded = 0
    for turn in range(3):  # events keep arriving: each turn has new ones to fold
        for i in range(5):
            answer = app.test_client().post(
                "/hooks/pbx/generic",
                json={
                    "event": "call.started",
                    "call_id": f"busy-{turn}-{i}",
                    "from": "+15551230000",
                    "extension": "101",
                },
                headers=auth(),
            )
            assert answer.status_code == 202
        assert worker.run_once()
        assert worker.wait_for_senders(10)
        with db.read() as session:
            folded = session.scalar(select(Job.id).where(Job.kind == "apply", Job.state == "done").limit(1)) or folded
        if turn == 0:
            assert folded, "the turn folded"
            assert fake_bitrix24.attachments_by_call().get(waiting_call), "and delivered in the same turn"
    assert len(fake_bitrix24.calls_to("telephony.externalCall.register")) >= 5, "the folded calls are delivered too"


# --- 4. portal slots: a slow answer, and the burst after a stall -------------------------------


def test_a_slow_answer_does_not_delay_the_portals_other_calls_by_more_than_one_token(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    app, worker = service(settings, rate_per_second=2.0, rate_burst=1, bitrix24_timeout=10.0, portal_concurrency=4)
    calls = [finished_call(fake_bitrix24.webhook_url) for _ in range(5)]
    fake_bitrix24.inject_slow(ATTACH, seconds=4.0)  # the first attach is answered after 4 s
    for call_id in calls:
        post_transcript(app, call_id)

    with running(worker):
        wait_for(lambda: len(fake_bitrix24.calls_to(ATTACH)) == 5, timeout=20, what="five attach requests")
        wait_for(lambda: all(job.state == "done" for job in jobs(db)), timeout=20, what="every attach done")

    arrivals = sorted(r.timestamp for r in fake_bitrix24.calls_to(ATTACH))
    slow = next(r for r in fake_bitrix24.calls_to(ATTACH) if r.fault == "slow")
    assert slow.timestamp == arrivals[0]
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    assert max(gaps) <= 0.5 + 0.4, f"one token (0.5 s) apart, not held up by the slow answer: {gaps}"
    assert arrivals[-1] < slow.timestamp + 4.0, "the others went out while the slow one was unanswered"
    assert sorted(len(ids) for ids in fake_bitrix24.attachments_by_call().values()) == [1] * 5


def test_after_a_stall_the_portal_sends_at_its_rate_not_in_a_burst(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    # Both slots stall for 3 s; meanwhile the bucket would refill to its burst of 10.
    app, worker = service(settings, rate_per_second=2.0, rate_burst=10, bitrix24_timeout=10.0, portal_concurrency=2)
    calls = [finished_call(fake_bitrix24.webhook_url) for _ in range(10)]
    fake_bitrix24.inject_slow(ATTACH, seconds=3.0, times=2)
    for call_id in calls:
        post_transcript(app, call_id)

    with running(worker):
        # one read: two could see no jobs yet (all() of nothing holds), then ten
        wait_for(lambda: [job.state for job in jobs(db)] == ["done"] * 10, 30, "every attach")

    requests = sorted(fake_bitrix24.calls_to(ATTACH), key=lambda r: r.timestamp)
    assert [r.fault for r in requests[:2]] == ["slow", "slow"]
    resumed = requests[0].timestamp + 3.0
    after = [r.timestamp for r in requests[2:]]
    assert after[0] >= resumed - 0.1, "nothing went out while both slots were stalled"
    in_first_second = [t for t in after if t < resumed + 1.0]
    # concurrency (2) tokens at once, then 2/s: at most 2 + 2 in the first second, not all 8
    assert len(in_first_second) <= 4, f"a burst after the stall: {[round(t - resumed, 2) for t in after]}"


# --- 5. a job's failure is the job's --------------------------------------------------------------


def test_a_poison_job_ends_dead_with_its_reason_while_the_portals_other_calls_keep_their_pace(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, worker = service(settings, rate_per_second=5.0, rate_burst=1, retry_schedule=(0.2, 0.2))
    calls = [finished_call(fake_bitrix24.webhook_url) for _ in range(6)]
    poisoned = calls[2]
    translate = steps.build_attach

    def build_attach(call: Any, parts: Any, settings: Settings) -> Any:
        if call.b24_call_id == poisoned:
            raise RuntimeError("speaker 7 has no side")  # a translation bug, for this call only
        return translate(call, parts, settings)

    monkeypatch.setattr(steps, "build_attach", build_attach)
    for call_id in calls:
        post_transcript(app, call_id)

    with running(worker):
        wait_for(lambda: {job.state for job in jobs(db)} == {"done", "dead"} and len(jobs(db)) == 6, 20, "the outcomes")

    by_state = {job.state: job for job in jobs(db)}
    dead = by_state["dead"]
    assert dead.attempts == 3 and dead.lease_owner is None
    assert (
        dead.last_error
        == "gave up after 3 attempts: unexpected RuntimeError while handling the job: speaker 7 has no side"
    )
    assert [job.state for job in jobs(db)].count("done") == 5
    delivered = fake_bitrix24.attachments_by_call()
    assert poisoned not in delivered and all(len(delivered[c]) == 1 for c in calls if c != poisoned)
    arrivals = sorted(r.timestamp for r in fake_bitrix24.calls_to(ATTACH))
    assert arrivals[-1] - arrivals[0] <= 4 * 0.2 + 2.0, (
        "the others went at the portal's pace (5/s), not held by the poison job"
    )


def test_a_fold_that_fails_unexpectedly_never_stops_delivery(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, worker = service(settings)
    call_id = finished_call(fake_bitrix24.webhook_url)
    post_transcript(app, call_id)
    folding.apply_pending(db, worker.settings, SOURCES)

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("a bug in folding")

    monkeypatch.setattr(folding, "apply_pending", broken)
    assert worker.run_once() is True
    worker.wait_for_senders(10)
    assert len(fake_bitrix24.attachments_by_call()[call_id]) == 1
    assert [job.state for job in jobs(db)] == ["done"]


# --- 3. heartbeats ------------------------------------------------------------------------------


def test_a_worker_not_seen_for_the_dead_after_time_loses_its_jobs_and_slots_to_a_live_one(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    app, dead = service(settings, portal_concurrency=1, lease_seconds=600.0)
    live = Worker(dead.db, dead.settings, SOURCES)
    call_id = finished_call(fake_bitrix24.webhook_url)
    post_transcript(app, call_id)
    folding.apply_pending(db, dead.settings, SOURCES)
    now = time.time()
    dead.beat(now)
    held = dead.claim()
    assert held is not None
    assert live.claim() is None, "the portal's only slot is held"

    live.beat(now + 9.0)  # 9 s without a beat: not dead yet
    assert jobs(db)[0].state == "leased"
    assert live.beat(now + 10.5) == 1  # 10.5 s: dead; its 600-s lease is not waited out
    job = jobs(db)[0]
    assert (job.state, job.ambiguous, job.lease_owner, job.attempts) == ("pending", True, None, 0)
    assert "no heartbeat for 10 s" in (job.last_error or "")
    with db.read() as session:
        assert session.scalars(select(WorkerHeartbeat.worker_id)).all() == [live.worker_id]
    with db.write() as session:
        taken = outbox.claim_next(session, "live", live.pace, not db.is_sqlite, now=now + 10.5)
    assert taken is not None and taken.ambiguous, "its slot is free; the request is looked up first"


# --- 6. the database goes away ------------------------------------------------------------------


@pytest.mark.skipif(POSTGRES_URL is None, reason="kills PostgreSQL server connections")
def test_the_worker_survives_its_database_connections_being_killed_and_resumes(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    if db.is_sqlite:
        pytest.skip("PostgreSQL only")
    name = f"b24scribe-test-{uuid.uuid4().hex[:8]}"
    app = create_app(settings)
    own = Database(f"{settings.database_url}&application_name={name}")
    worker = Worker(own, settings, SOURCES)
    admin = create_engine(settings.database_url, isolation_level="AUTOCOMMIT")

    def kill_connections() -> int:
        with admin.connect() as connection:
            return len(
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = :name"
                    ),
                    {"name": name},
                ).all()
            )

    try:
        with running(worker) as thread:
            first = finished_call(fake_bitrix24.webhook_url)
            post_transcript(app, first)
            # recorded, not only sent: a kill between the two leaves the job to be taken back after its lease
            wait_for(lambda: [job.state for job in jobs(db)] == ["done"], 10, "the first delivery recorded")
            for _ in range(3):  # killed again and again, mid-poll
                assert kill_connections() >= 1, "the worker's connections were found"
                time.sleep(0.3)
            second = finished_call(fake_bitrix24.webhook_url)
            post_transcript(app, second)
            took = wait_for(lambda: fake_bitrix24.attachments_by_call().get(second), 10, "delivery after the kill")
            assert thread.is_alive()
            wait_for(lambda: [job.state for job in jobs(db)] == ["done", "done"], 10, "both recorded")
        assert took < 10
        assert sorted(len(ids) for ids in fake_bitrix24.attachments_by_call().values()) == [1, 1]  # once each
    finally:
        own.dispose()
        admin.dispose()
        app.extensions["b24scribe.db"].dispose()


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("PORTAL_CONCURRENCY", "0", "B24SCRIBE_PORTAL_CONCURRENCY: must be at least 1"),
        ("PORTAL_CONCURRENCY", "four", "B24SCRIBE_PORTAL_CONCURRENCY: expected a number"),
        ("WORKER_DEAD_AFTER_SECONDS", "0.5", "B24SCRIBE_WORKER_DEAD_AFTER_SECONDS: must be at least 1.0"),
        ("WORKER_SENDERS", "0", "B24SCRIBE_WORKER_SENDERS: must be at least 1"),
    ],
)
def test_engine_settings_are_checked_at_start_naming_the_variable(name: str, raw: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings({f"B24SCRIBE_{name}": raw}, dotenv=False)


def test_engine_settings_defaults_and_values() -> None:
    defaults = load_settings({}, dotenv=False)
    assert (defaults.portal_concurrency, defaults.worker_dead_after_seconds, defaults.worker_senders) == (4, 10.0, 32)
    chosen = load_settings(
        {
            "B24SCRIBE_PORTAL_CONCURRENCY": "2",
            "B24SCRIBE_WORKER_DEAD_AFTER_SECONDS": "5",
            "B24SCRIBE_WORKER_SENDERS": "8",
        },
        dotenv=False,
    )
    assert (chosen.portal_concurrency, chosen.worker_dead_after_seconds, chosen.worker_senders) == (2, 5.0, 8)
    assert Worker(Database("sqlite://"), chosen, SOURCES).beat_interval() == pytest.approx(1.0), (
        "five beats per dead-after"
    )


# --- 7. no job waits for ever for a wake-up ----------------------------------------------------


def registered_call(db: Database) -> tuple[int, int]:
    """A registered call with its finish job due: (call id, finish job id)."""
    now = time.time()
    with db.write() as session:
        call = Call(portal="p", pbx="generic", pbx_call_id=f"race-{uuid.uuid4().hex[:8]}", extension="101")
        call.b24_call_id, call.stage, call.finish_reported = "CALL-1", "registered", True
        call.created_at = call.updated_at = now
        session.add(call)
        session.flush()
        finish = outbox.enqueue(session, "finish", call_id=call.id, portal="p", now=now)
        return call.id, finish.id


def test_a_transcript_folded_while_its_call_finishes_is_released_not_left_waiting(
    settings: Settings, db: Database
) -> None:
    """The lost wake-up: a fold reads the call (locked) as not finished and parks its attach job
    "waiting" while a worker records the call's finish. The finish's outcome locks the call row
    too, so it waits for the fold to commit and then releases the fold's job (on PostgreSQL, where
    the two really overlap; SQLite has one writer at a time)."""
    if db.is_sqlite:
        pytest.skip("PostgreSQL only: SQLite never runs two write transactions at once")
    worker = Worker(db, settings.with_overrides(bitrix24_webhook_url=None), SOURCES)  # dry run: the finish is recorded
    call_id, _ = registered_call(db)
    claims = worker.claim_batch()
    assert [c.kind for c in claims] == ["finish"]

    with db.write() as fold:  # what folding a transcript does: lock the call, read its stage, queue
        stage = fold.execute(select(Call.stage).where(Call.id == call_id).with_for_update()).scalar_one()
        assert stage == "registered"
        attach = outbox.enqueue(fold, "attach", call_id=call_id, portal="p", waiting=stage != "finished")
        finishing = threading.Thread(target=worker.deliverer.run_batch, args=(claims,))
        finishing.start()  # the worker records the finish meanwhile
        finishing.join(timeout=0.5)
        assert finishing.is_alive(), "the finish waits for the fold's lock on the call"
    finishing.join(timeout=10)

    with db.read() as session:
        assert session.get_one(Call, call_id).stage == "finished"
        assert session.get_one(Job, attach.id).state == "pending"


def test_housekeeping_releases_waiting_jobs_whose_call_already_reached_their_stage(
    settings: Settings, db: Database
) -> None:
    """The safety net: whatever made a wake-up go missing, housekeeping makes due the waiting jobs
    whose call is already where they need it, a bounded number per round, and leaves the others."""
    now = time.time()
    with db.write() as session:
        calls = {}
        for name, stage in [("finished", "finished"), ("registered", "registered"), ("new", "new")]:
            call = Call(portal="p", pbx="generic", pbx_call_id=name, stage=stage, created_at=now, updated_at=now)
            session.add(call)
            session.flush()
            calls[name] = call.id
        stuck = [
            outbox.enqueue(session, "attach", call_id=calls["finished"], portal="p", waiting=True, now=now - 60).id,
            outbox.enqueue(session, "finish", call_id=calls["registered"], portal="p", waiting=True, now=now - 50).id,
        ]
        fine = [
            outbox.enqueue(session, "attach", call_id=calls["registered"], portal="p", waiting=True, now=now - 40).id,
            outbox.enqueue(session, "finish", call_id=calls["new"], portal="p", waiting=True, now=now - 30).id,
        ]
    worker = Worker(db, settings, SOURCES)
    worker_module.WAKE_UP_SWEEP, sweep = 1, worker_module.WAKE_UP_SWEEP
    try:
        released = [worker.release_overdue_waiting() for _ in range(4)]  # one job per round, then over again
        assert released == [1, 1, 0, 0]
        assert worker.release_overdue_waiting() == 0
    finally:
        worker_module.WAKE_UP_SWEEP = sweep
    states = {job.id: job.state for kind in ("attach", "finish") for job in jobs(db, kind)}
    assert [states[i] for i in stuck] == ["pending", "pending"]
    assert [states[i] for i in fine] == ["waiting", "waiting"]

    worker.housekeeping()  # and housekeeping runs it every round
    with db.write() as session:
        session.execute(update(Job).where(Job.id.in_(fine)).values(state="waiting"))
        session.execute(update(Call).where(Call.id == calls["registered"]).values(stage="finished"))
    worker.housekeeping()
    assert {job.id: job.state for job in jobs(db, "attach")}[fine[0]] == "pending"


# --- 8. the outcomes of many sender threads share transactions ---------------------------------


def test_outcomes_of_concurrent_senders_are_written_in_shared_transactions(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    """Sender threads' outcomes join one group commit; each still waits until its own is durable
    (the call's next step is due when the sender lets go), and every job ends done exactly once."""
    worker = Worker(db, settings.with_overrides(worker_senders=8, portal_concurrency=8), SOURCES)
    now = time.time()
    with db.write() as session:
        for index in range(24):
            call = Call(
                portal=settings.portal,
                pbx="generic",
                pbx_call_id=f"group-{index}",
                extension="101",
                finish_reported=True,
                duration=5,
                status="answered",
                created_at=now,
                updated_at=now,
            )
            session.add(call)
            session.flush()
            outbox.enqueue(session, "register", call_id=call.id, portal=settings.portal, now=now)
            outbox.enqueue(session, "finish", call_id=call.id, portal=settings.portal, waiting=True, now=now)
    fake_bitrix24.configure(latency=0.02)  # requests overlap, so outcomes arrive together
    worker.drain(timeout=60)

    done = [job.state for kind in ("register", "finish") for job in jobs(db, kind)]
    assert done == ["done"] * 48
    assert len(fake_bitrix24.calls_to("telephony.externalCall.finish")) == 24
    assert worker.deliverer.group_commits < 48, "some outcomes shared a transaction"

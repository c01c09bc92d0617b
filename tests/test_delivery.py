"""Executing claimed jobs in batches: dry-run outcomes are recorded together (a few transactions
for many jobs), and whatever goes wrong with one job — a transcript that cannot be translated, an
outcome that cannot be stored — is that job's failure alone: an attempt, the retry schedule, then
dead with the reason. Every test runs on SQLite and, when reachable, PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import select

from b24scribe import folding, outbox
from b24scribe.db import Database
from b24scribe.models import Call, InboundEvent, Job, TranscriptPart
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES


def dry_run(settings: Settings, **changes: Any) -> Settings:
    """The test's settings without a portal: jobs are recorded, nothing is sent."""
    return settings.with_overrides(bitrix24_webhook_url=None, **changes)


def add_calls(db: Database, count: int, portals: int = 3) -> list[int]:
    """`count` calls of a PBX over `portals` portals, each with a register job and a finish job waiting for it."""
    now = time.time()
    ids = []
    with db.write() as session:
        for index in range(count):
            call = Call(
                portal=f"portal-{index % portals}",
                pbx="generic",
                pbx_call_id=f"call-{index}",
                direction="inbound",
                from_number="+15551230000",
                extension="101",
                duration=30,
                status="answered",
                finish_reported=True,
                stage="new",
                created_at=now,
                updated_at=now,
            )
            session.add(call)
            session.flush()
            outbox.enqueue(session, "register", call_id=call.id, portal=call.portal, now=now)
            outbox.enqueue(session, "finish", call_id=call.id, portal=call.portal, waiting=True, now=now)
            ids.append(call.id)
    return ids


def job_states(db: Database) -> list[tuple[int | None, str, str, int]]:
    with db.read() as session:
        return [
            (job.call_id, job.kind, job.state, job.attempts)
            for job in session.scalars(select(Job).where(Job.kind != "apply").order_by(Job.id))
        ]


@contextmanager
def counting_writes(db: Database) -> Iterator[list[int]]:
    """Count the write transactions `db` runs inside the block."""
    count = [0]
    write = db.write

    @contextmanager
    def counted() -> Iterator[Any]:
        count[0] += 1
        with write() as session:
            yield session

    db.write = counted  # type: ignore[method-assign]
    try:
        yield count
    finally:
        db.write = write  # type: ignore[method-assign]


@pytest.mark.parametrize("portals", [1, 40])
def test_a_dry_run_drain_claims_and_records_many_jobs_per_transaction(
    settings: Settings, db: Database, portals: int
) -> None:
    # one portal too: in dry-run nothing is in flight, so its slots do not bound a batch
    calls = add_calls(db, 40, portals=portals)
    worker = Worker(db, dry_run(settings), SOURCES)
    worker.fold = lambda: 0  # type: ignore[method-assign]  # no events: count delivery's own writes
    with counting_writes(db) as writes:
        worker.drain()

    assert job_states(db) == [(c, kind, "done", 0) for c in calls for kind in ("register", "finish")]
    with db.read() as session:
        assert {call.stage for call in session.scalars(select(Call))} == {"finished"}
    # 80 jobs in three batches (one job per call per batch: registers first, then their finishes),
    # each one claim and one outcome transaction, and the empty claim that ends the drain: not two
    # per job. (PostgreSQL may need a batch more: rows another claimer holds are skipped.)
    assert writes[0] <= 9, f"{writes[0]} write transactions for 80 jobs"


def test_a_fetched_transcript_without_speakers_or_channels_ends_dead_with_the_reason(
    settings: Settings, db: Database
) -> None:
    """A vendor's transcript fetched without diarization: the attach cannot tell the sides apart.
    It fails like any job (an attempt each, on the schedule), then is dead and says why."""
    now = time.time()
    with db.write() as session:
        call = Call(portal="p", b24_call_id="CALL-1", external=True, stage="finished", created_at=now, updated_at=now)
        session.add(call)
        session.flush()
        event = InboundEvent(
            source="stt",
            provider="assemblyai",
            dedupe_key="t-1",
            received_at=now,
            query={},
            body=b"{}",
            state="accepted",
        )
        session.add(event)
        session.flush()
        session.add(
            TranscriptPart(
                call_id=call.id,
                event_id=event.id,
                vendor="assemblyai",
                status="completed",
                segments=[[0.0, 2.0, "Hello, Acme support.", None, None, None, False]],
                received_at=now,
                delivery_state="queued",
            )
        )
        attach = outbox.enqueue(session, "attach", call_id=call.id, portal="p", now=now)
    worker = Worker(db, dry_run(settings, retry_schedule=(0.0, 0.0)), SOURCES)
    worker.drain()

    with db.read() as session:
        job = session.get_one(Job, attach.id)
    assert (job.state, job.attempts, job.lease_owner) == ("dead", 3, None)
    assert job.last_error is not None
    assert job.last_error.startswith("gave up after 3 attempts: unexpected ValidationError while handling the job:")
    assert "names no side, channel or speaker" in job.last_error


def test_a_job_whose_outcome_cannot_be_recorded_fails_alone(
    settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dry-run batches record their outcomes in one transaction: one that cannot be written
    costs only its own job an attempt."""
    calls = add_calls(db, 4)
    worker = Worker(db, dry_run(settings, retry_schedule=(60.0,)), SOURCES)
    complete = outbox.complete

    def complete_unless_poisoned(session: Any, job: Job, result: Any, now: float) -> None:
        if job.call_id == calls[1]:
            raise ValueError("a result that cannot be stored")
        complete(session, job, result, now)

    monkeypatch.setattr(outbox, "complete", complete_unless_poisoned)
    worker.drain()

    states = {(call, kind): (state, attempts) for call, kind, state, attempts in job_states(db)}
    assert states[(calls[1], "register")] == ("pending", 1)
    assert states[(calls[1], "finish")] == ("waiting", 0)
    assert [states[(c, "finish")] for c in calls if c != calls[1]] == [("done", 0)] * 3
    with db.read() as session:
        failed = session.scalars(select(Job).where(Job.call_id == calls[1], Job.kind == "register")).one()
    assert failed.last_error == "unexpected ValueError while recording the outcome: a result that cannot be stored"


def test_an_unexpected_error_in_one_job_of_a_batch_leaves_the_others_to_finish(
    settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = add_calls(db, 5)
    worker = Worker(db, dry_run(settings, retry_schedule=(60.0,)), SOURCES)
    from b24scribe.delivery import steps

    register_params = steps.register_params

    def broken_for_one(call: Call, settings: Settings) -> dict[str, Any]:
        if call.id == calls[2]:
            raise KeyError("EXTENSION_MAP")
        return register_params(call, settings)

    monkeypatch.setattr(steps, "register_params", broken_for_one)
    worker.drain()

    states = {(call, kind): (state, attempts) for call, kind, state, attempts in job_states(db)}
    assert states.pop((calls[2], "register")) == ("pending", 1)
    assert states.pop((calls[2], "finish")) == ("waiting", 0)
    assert set(states.values()) == {("done", 0)}
    inbox_untouched = folding.apply_pending(db, worker.settings, SOURCES)
    assert inbox_untouched == 0

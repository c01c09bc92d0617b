"""Recording jobs' outcomes: per sender thread, gathered, then written in group commits.

Outcomes are recorded together, in one transaction that also checks every lease is still ours: at
the end of the batch, and before any request goes out (`Recorder.flush`). Sender threads share those
transactions: an outcome joins the next group commit (`GroupCommit`), and its thread waits until it
is durable before the job lets go of its lease, so the call's next step is never claimed before it.
A thread's batch (its outcomes, calls, stalled portals and requests sent) is thread-local (`Batch`).
Failure policy: a job's failure is the job's (an outcome that cannot be written is written alone,
and the one that still fails becomes its job's failure); only a lost database is nobody's failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from b24scribe import metrics, outbox, ratelimit
from b24scribe.db import Database
from b24scribe.models import Call, Job, JobState
from b24scribe.outbox import Claim
from b24scribe.ratelimit import Pace

log = structlog.get_logger(__name__)

MAX_REASON = 500  # characters of an unexpected error kept as the job's last_error
_CALL_ROWS = select(Call).where(Call.id.in_(bindparam("b_ids", expanding=True))).order_by(Call.id)
_CALLS = {False: _CALL_ROWS, True: _CALL_ROWS.with_for_update()}  # locked on PostgreSQL

Apply = Callable[[Session, Job], None]
OnLost = Callable[[Session], None]


def database_unavailable(error: BaseException) -> bool:
    """The database went away (restart, lost connection): nobody's failure, the worker waits."""
    return isinstance(error, OperationalError | InterfaceError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    )


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A job's outcome waiting for the batch's next flush."""

    claim: Claim
    apply: Apply
    on_lost: OnLost | None


@dataclass(slots=True)
class _Entry:
    """One thread's outcomes waiting for a group commit, and what became of them."""

    outcomes: list[_Outcome]
    stalled: dict[str, int]
    done: bool = False
    error: BaseException | None = None


class GroupCommit:
    """Outcomes of many threads written in one transaction: the first thread to arrive writes
    everything queued (its own and any others'), the rest wait for it; whoever arrives while a
    write is under way is in the next one. Nobody waits for a timer: under load the groups grow
    by themselves, alone a thread writes at once. A failed write fails every thread of its group
    (the caller's error handling runs in each)."""

    def __init__(self, write: Callable[[list[_Outcome], dict[str, int]], None]) -> None:
        self._write = write
        self._changed = threading.Condition()
        self._queue: list[_Entry] = []
        self._writing = False
        self.groups = 0  # group commits written (a figure for tests and benchmarks)

    def record(self, outcomes: list[_Outcome], stalled: dict[str, int]) -> None:
        """Write these outcomes, alone or with others'; returns once they are durable."""
        entry = _Entry(outcomes, stalled)
        with self._changed:
            self._queue.append(entry)
            while self._writing and not entry.done:
                self._changed.wait()
            if not entry.done:  # nobody is writing: this thread writes the queue
                group, self._queue, self._writing = self._queue, [], True
        if not entry.done:
            error: BaseException | None = None
            try:
                merged: dict[str, int] = {}
                for queued in group:
                    merged.update(queued.stalled)
                self._write([outcome for queued in group for outcome in queued.outcomes], merged)
                self.groups += 1
            except BaseException as failure:
                error = failure
            with self._changed:
                for queued in group:
                    queued.done, queued.error = True, error
                self._writing = False
                self._changed.notify_all()
        if entry.error is not None:
            raise entry.error


@dataclass(slots=True)
class Batch:
    """What the thread running a batch has gathered: outcomes not yet recorded, the batch's calls,
    requests sent for its current job, portals whose requests stalled (one per worker thread)."""

    outcomes: list[_Outcome] = field(default_factory=list)
    stalled: dict[str, int] = field(default_factory=dict)
    calls: dict[int, Call] = field(default_factory=dict)
    sent: int = 0


class Recorder:
    """Gathers each thread's outcomes and writes them, leases checked, in group commits."""

    def __init__(self, db: Database, pace: Pace, retry_schedule: Sequence[float]) -> None:
        self.db = db
        self.pace = pace
        self.retry_schedule = retry_schedule
        self._local = threading.local()
        self._group = GroupCommit(self._write_each_if_needed)

    @property
    def batch(self) -> Batch:
        """This thread's batch (an empty one outside `begin` … `end`)."""
        batch: Batch | None = getattr(self._local, "batch", None)
        if batch is None:
            batch = self._local.batch = Batch()
        return batch

    def begin(self, calls: dict[int, Call]) -> None:
        """Start this thread's batch with the calls its claims read."""
        self._local.batch = Batch(calls=calls)

    def end(self) -> None:
        """Forget this thread's batch (whatever was not flushed is dropped)."""
        self._local.batch = Batch()

    @property
    def group_commits(self) -> int:
        """How many transactions the outcomes recorded so far took (several outcomes may share one)."""
        return self._group.groups

    def record(self, claim: Claim, apply: Apply, on_lost: OnLost | None = None) -> None:
        """Queue the job's outcome; it is written with the batch's next flush, if the lease is
        still ours then (else `on_lost` runs instead: facts that must be kept regardless)."""
        self.batch.outcomes.append(_Outcome(claim, apply, on_lost))

    def fail_unexpectedly(self, claim: Claim, error: BaseException) -> None:
        """Drop what the job had queued and record the failure instead."""
        batch = self.batch
        batch.outcomes = [o for o in batch.outcomes if o.claim.job_id != claim.job_id]
        batch.outcomes.append(
            self._failure(claim, f"unexpected {type(error).__name__} while handling the job: {error}")
        )

    def _failure(self, claim: Claim, reason: str) -> _Outcome:
        """The outcome of a job that failed unexpectedly: an attempt spent, retried on the schedule."""
        reason, schedule = reason[:MAX_REASON], self.retry_schedule
        return _Outcome(claim, lambda s, j: outbox.retry_later(s, j, reason, time.time(), schedule=schedule), None)

    def flush(self) -> None:
        """Write what this thread's batch has gathered (with other threads' outcomes, perhaps)."""
        batch = self.batch
        outcomes, stalled = batch.outcomes, batch.stalled
        if not outcomes and not stalled:
            return
        batch.outcomes, batch.stalled = [], {}
        self._group.record(outcomes, stalled)

    def _write_each_if_needed(self, outcomes: list[_Outcome], stalled: dict[str, int]) -> None:
        """Write outcomes together; if that fails (not for a lost database), each alone."""
        try:
            self._write(outcomes, stalled)
        except Exception as error:
            if database_unavailable(error):
                raise
            # An outcome could not be written (a bug): write each alone, so the others keep theirs,
            # and the one that fails is its job's failure.
            for outcome in outcomes:
                try:
                    if len(outcomes) == 1:
                        raise error
                    self._write([outcome], {})
                except Exception as alone:
                    if database_unavailable(alone):
                        raise
                    log.exception("recording a job's outcome failed", error_type=type(alone).__name__)
                    reason = f"unexpected {type(alone).__name__} while recording the outcome: {alone}"
                    self._write([self._failure(outcome.claim, reason)], {})

    def _write(self, outcomes: list[_Outcome], stalled: dict[str, int]) -> None:
        now = time.time()
        ran: list[tuple[str, str]] = []
        lost = 0
        with self.db.write() as session:
            jobs = outbox.leased_jobs(session, [o.claim for o in outcomes])
            # One read for the batch's calls, kept referenced (the identity map holds objects weakly)
            # so the outcomes' get_one(Call, …) find them without a query each. On PostgreSQL the
            # rows are locked, in id order, before anything is changed or released: folding reads
            # a call with the same lock before it parks a job "waiting" for the call's stage, so
            # either it sees the stage this outcome commits, or its waiting job is committed
            # before `run_releases` below looks for it (no lost wake-up).
            call_ids = sorted({o.claim.call_id for o in outcomes if o.claim.call_id is not None})
            calls_query = _CALLS[not self.db.is_sqlite]
            calls = session.scalars(calls_query, {"b_ids": call_ids}).all() if call_ids else []
            for outcome in outcomes:
                job = jobs.get(outcome.claim.job_id)
                if job is None or job.state != JobState.LEASED:
                    lost += 1
                    if outcome.on_lost is not None:
                        outcome.on_lost(session)
                    continue
                outcome.apply(session, job)
                job.updated_at = now
                ran.append((outcome.claim.kind, job.state))
            outbox.run_releases(session, now)
            ratelimit.settle(session, stalled, now, self.pace)
            del calls
        for kind, state in ran:
            metrics.job_ran(kind, state)
        if lost:
            log.warning("lease lost; another worker owns the job now", jobs=lost)

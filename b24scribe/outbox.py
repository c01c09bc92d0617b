"""The outbox: a job table that is also the work queue, claimed with leases.

Jobs are claimed in batches, one transaction each (`claim_batch`); a lease names its worker
process, and the portal slot a job holds is its lease. Failure policy: fails open towards
delivery — a job whose worker stopped beating (`reclaim_dead_workers`, within seconds) or stopped
renewing its lease (`reclaim_expired`) is returned to the queue, marked ambiguous since its
request may have gone out, so a crash can delay a job but never lose it; the ledger and the
look-up before a resend keep the re-run from attaching twice. A dead job says why in `Job.dead_reason`
(a `DeadReason`: set where it dies, cleared when it is revived or replayed) and in words in `last_error`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, Executable, Integer, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.orm import Session

from b24scribe import ratelimit
from b24scribe.db import affected_rows
from b24scribe.models import OPEN_JOB_STATES, Call, DeadReason, Job, JobKind, JobState, WorkerHeartbeat
from b24scribe.ratelimit import Pace
from b24scribe.settings import DEFAULT_RETRY_SCHEDULE

RETRY_SCHEDULE: Sequence[float] = DEFAULT_RETRY_SCHEDULE
JITTER = 0.2
OPEN_STATES = OPEN_JOB_STATES  # the name callers import from here


def retry_delay(
    attempts: int, rng: random.Random | None = None, schedule: Sequence[float] = RETRY_SCHEDULE
) -> float | None:
    """Back-off before the next attempt after `attempts` failures, ±20 % jitter; None: give up."""
    if attempts < 1 or attempts > len(schedule):
        return None
    base = schedule[attempts - 1]
    return base * (1.0 + JITTER * (2.0 * (rng or random).random() - 1.0))


def enqueue(
    session: Session,
    kind: str,
    *,
    call_id: int | None = None,
    event_id: int | None = None,
    transcript_id: int | None = None,
    portal: str | None = None,
    waiting: bool = False,
    now: float | None = None,
) -> Job:
    """Add a job in the caller's transaction (the event and its job commit together)."""
    now = time.time() if now is None else now
    job = Job(
        kind=kind,
        call_id=call_id,
        event_id=event_id,
        transcript_id=transcript_id,
        portal=portal,
        state=JobState.WAITING if waiting else JobState.PENDING,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    return job


@dataclass(frozen=True, slots=True)
class Claim:
    """A leased job: who holds it and until when, and what the claim already read of it."""

    job_id: int
    kind: str
    portal: str | None
    owner: str
    attempts: int
    ambiguous: bool
    call_id: int | None = None
    event_id: int | None = None
    transcript_id: int | None = None
    claimed_at: float = 0.0


# The claim's statements, built once: a claim runs several times a second, and building and
# compiling them anew each time cost more CPU than SQLite's running them. Their parameters:
# ratelimit.blocked_params, and b_limit.
_NOW = ratelimit.NOW
# apply jobs are folded in batches by b24scribe.folding, not claimed one by one
_PENDING = (Job.state == JobState.PENDING, Job.kind != JobKind.APPLY)
_DUE = (*_PENDING, Job.next_attempt_at <= _NOW)
_NOT_BLOCKED = or_(Job.portal.is_(None), Job.portal.not_in(ratelimit.BLOCKED))
_ANY_CLAIMABLE = select(Job.id).where(*_DUE, _NOT_BLOCKED).limit(1)
_CLAIM_COLUMNS = (
    Job.id,
    Job.kind,
    Job.portal,
    Job.attempts,
    Job.ambiguous,
    Job.call_id,
    Job.event_id,
    Job.transcript_id,
)


def _candidates(first_time: bool, lock: bool) -> Executable:
    # retries: `+ 0` keeps SQLite's planner off ix_job_due, which would walk every due job (a
    # backlog of fresh ones) to find the few retries; it takes ix_job_claim (state, attempts, …)
    retries = (*_PENDING, Job.next_attempt_at + 0 <= _NOW, Job.attempts > 0)
    due = (*_DUE, Job.attempts == 0) if first_time else retries
    query = (
        select(*_CLAIM_COLUMNS)
        .where(*due, _NOT_BLOCKED)
        .order_by(Job.next_attempt_at, Job.id)
        .limit(bindparam("b_limit", type_=Integer()))
    )
    # locked: rows other claimers are taking are skipped, never waited for
    return query.with_for_update(skip_locked=True, of=Job) if lock else query


# (first_time, lock): due retries, then fresh jobs; locked on PostgreSQL
_CANDIDATES = {
    (first_time, lock): _candidates(first_time, lock) for first_time in (False, True) for lock in (False, True)
}
_LEASE = (
    update(Job)
    .where(Job.id.in_(bindparam("b_ids", expanding=True)))
    .values(
        state=JobState.LEASED,
        lease_owner=bindparam("b_owner"),
        lease_worker=bindparam("b_worker"),
        lease_expires_at=bindparam("b_expires"),
        updated_at=bindparam("b_updated"),
    )
)


def any_claimable(session: Session, pace: Pace, now: float | None = None) -> bool:
    """Whether any due job's portal may take a request now: a read, so an idle or throttled worker
    on SQLite does not take the write lock (which the hooks wait for) just to find nothing."""
    now = time.time() if now is None else now
    return session.connection().execute(_ANY_CLAIMABLE, ratelimit.blocked_params(now, pace)).first() is not None


def claim_batch(
    session: Session,
    owner: str,
    pace: Pace,
    is_postgres: bool,
    limit: int,
    now: float | None = None,
    worker: str | None = None,
) -> list[Claim]:
    """Lease up to `limit` due jobs whose portals may take a request now, in one transaction.

    Due retries come first (a backlog of fresh jobs never starves them), then fresh jobs by due
    time; portals that are paused, out of tokens or out of slots are left out in SQL. A batch
    holds at most one job per call, so a job never acts on a call its batch-mate changes.
    `worker` is the process holding the leases (its heartbeat row); by default `owner`.
    """
    now = time.time() if now is None else now
    params: dict[str, Any] = ratelimit.blocked_params(now, pace)
    wanted = limit * 2  # room for jobs of portals that run out of tokens or slots within the batch
    rows: list[Any] = []
    connection = session.connection()
    for first_time in (False, True):  # due retries, then fresh jobs
        params["b_limit"] = wanted - len(rows)
        rows += connection.execute(_CANDIDATES[first_time, is_postgres], params).all()
        if len(rows) >= wanted:
            break
    if not rows:
        return []
    portal_budgets = ratelimit.budgets(
        session, (row.portal for row in rows if row.portal is not None), now, pace, lock=is_postgres
    )
    chosen: list[Claim] = []
    calls: set[int] = set()
    for row in rows:
        if row.call_id is not None and row.call_id in calls:
            continue
        if row.portal is not None:
            budget = portal_budgets.get(row.portal)
            if budget is None or not budget.take():
                continue
        if row.call_id is not None:
            calls.add(row.call_id)
        chosen.append(
            Claim(
                row.id,
                row.kind,
                row.portal,
                owner,
                row.attempts,
                row.ambiguous,
                row.call_id,
                row.event_id,
                row.transcript_id,
                now,
            )
        )
        if len(chosen) >= limit:
            break
    if not chosen:
        return []
    for budget in portal_budgets.values():
        ratelimit.spend(budget, now)
    connection.execute(
        _LEASE,
        {
            "b_ids": [c.job_id for c in chosen],
            "b_owner": owner,
            "b_worker": worker or owner,
            "b_expires": now + pace.lease_seconds,
            "b_updated": now,
        },
    )
    return chosen


def claim_next(
    session: Session, owner: str, pace: Pace, is_postgres: bool, now: float | None = None, worker: str | None = None
) -> Claim | None:
    """Lease the next due job whose portal may take a request now, or return None."""
    claims = claim_batch(session, owner, pace, is_postgres, 1, now, worker)
    return claims[0] if claims else None


def next_due_at(session: Session) -> float | None:
    """When the earliest pending job becomes due (a cheap read for idle workers)."""
    return session.scalar(select(func.min(Job.next_attempt_at)).where(Job.state == JobState.PENDING))


def leased_job(session: Session, claim: Claim) -> Job | None:
    """The claimed job, if this worker still holds its lease (locked on PostgreSQL)."""
    return leased_jobs(session, [claim]).get(claim.job_id)


def leased_jobs(session: Session, claims: Sequence[Claim]) -> dict[int, Job]:
    """The claimed jobs whose leases their claims still hold, by id, in one query (locked on PostgreSQL)."""
    if not claims:
        return {}
    owners = {claim.job_id: claim.owner for claim in claims}
    query = _LEASED[session.get_bind().dialect.name == "postgresql"]
    return {job.id: job for job in session.scalars(query, {"b_ids": list(owners)}) if job.lease_owner == owners[job.id]}


_LEASED_ROWS = (
    select(Job).where(Job.id.in_(bindparam("b_ids", expanding=True)), Job.state == JobState.LEASED).order_by(Job.id)
)
_LEASED = {False: _LEASED_ROWS, True: _LEASED_ROWS.with_for_update()}  # locked on PostgreSQL


def renew_leases(session: Session, claims: Sequence[Claim], lease_seconds: float, now: float | None = None) -> int:
    """Extend the leases these claims still hold (a statement per owner); how many were renewed.

    A row its owner is recording an outcome for right now is skipped (SKIP LOCKED on PostgreSQL):
    the heartbeat never waits for, or deadlocks with, the delivery it keeps alive; the next beat
    renews it if it is still leased."""
    now = time.time() if now is None else now
    renewed = 0
    for owner in sorted({claim.owner for claim in claims}):
        ours = (
            select(Job.id)
            .where(
                Job.id.in_([c.job_id for c in claims if c.owner == owner]),
                Job.state == JobState.LEASED,
                Job.lease_owner == owner,
            )
            .with_for_update(skip_locked=True)
        )
        renewed += affected_rows(
            session.execute(
                update(Job)
                .where(Job.id.in_(ours))
                .values(lease_expires_at=now + lease_seconds, updated_at=now)
                .execution_options(synchronize_session=False)
            )
        )
    return renewed


def _release(job: Job) -> None:
    """End the lease, and with it the portal slot the job held."""
    job.lease_owner = None
    job.lease_worker = None
    job.lease_expires_at = None


def complete(session: Session, job: Job, result: dict[str, object] | None, now: float) -> None:
    """The job is done."""
    _release(job)
    job.state, job.result, job.ambiguous, job.last_error, job.updated_at = JobState.DONE, result, False, None, now


def retry_later(
    session: Session,
    job: Job,
    error: str,
    now: float,
    ambiguous: bool = False,
    rng: random.Random | None = None,
    schedule: Sequence[float] = RETRY_SCHEDULE,
) -> None:
    """A transient failure: spend an attempt and back off, or declare the job dead at the end."""
    _release(job)
    job.attempts += 1
    job.last_error = error
    job.ambiguous = job.ambiguous or ambiguous
    job.updated_at = now
    delay = retry_delay(job.attempts, rng, schedule)
    if delay is None:
        job.state, job.dead_reason = JobState.DEAD, DeadReason.RETRIES
        job.last_error = f"gave up after {job.attempts} attempts: {error}"
    else:
        job.state, job.dead_reason = JobState.PENDING, None
        job.next_attempt_at = now + delay


def defer(session: Session, job: Job, until: float, reason: str, now: float) -> None:
    """Put the job back without spending an attempt (throttled, waiting its turn)."""
    _release(job)
    job.state, job.next_attempt_at, job.last_error, job.updated_at = JobState.PENDING, until, reason, now


def kill(session: Session, job: Job, error: str, now: float) -> None:
    """A permanent failure: the job is dead, with the reason, until someone replays it."""
    _release(job)
    job.state, job.dead_reason, job.last_error, job.updated_at = JobState.DEAD, DeadReason.PERMANENT, error, now


def wait_for_call(session: Session, job: Job, reason: str, now: float) -> None:
    """Park the job until its call reaches the stage it needs (unblocked by `release_waiting`)."""
    _release(job)
    job.state, job.last_error, job.updated_at, job.next_attempt_at = JobState.WAITING, reason, now, now


def release_waiting(session: Session, call_id: int, kind: str, now: float) -> None:
    """Make a call's waiting jobs of `kind` due now (its call reached the stage they need).

    Gathered in the session and done for every call at once by `run_releases` before the
    transaction commits: one statement per kind for a whole batch of outcomes."""
    releases: dict[str, set[int]] = session.info.setdefault("release_waiting", {})
    releases.setdefault(kind, set()).add(call_id)


def hurry(session: Session, call_id: int, kind: str, reason: str) -> None:
    """Make a call's pending jobs of `kind` that were put off with `reason` due now (what they
    waited for has happened before their time was up); gathered, like `release_waiting`."""
    session.info.setdefault("hurry", set()).add((kind, reason, call_id))


def revive_orphans(session: Session, call_id: int) -> None:
    """Attach jobs given up as orphans come back when their call finally finishes (gathered too)."""
    session.info.setdefault("revive_orphans", set()).add(call_id)


def run_releases(session: Session, now: float) -> int:
    """Run what `release_waiting` and `revive_orphans` gathered in this session; how many jobs
    became due. Plain statements on the session's connection: the rows they change are not the
    session's objects."""
    # The statements below bypass the session's autoflush: a job parked or put off earlier in this
    # same transaction must be in the database before they look for it (no lost wake-up).
    session.flush()
    released = 0
    connection = session.connection()
    for kind, call_ids in sorted(session.info.pop("release_waiting", {}).items()):
        params = {"b_calls": sorted(call_ids), "b_kind": kind, "b_now": now}
        released += affected_rows(connection.execute(_RELEASE, params))
    hurried: dict[tuple[str, str], list[int]] = {}
    for kind, reason, call_id in sorted(session.info.pop("hurry", set())):
        hurried.setdefault((kind, reason), []).append(call_id)
    for (kind, reason), call_ids in hurried.items():
        params = {"b_calls": call_ids, "b_kind": kind, "b_reason": reason, "b_now": now}
        released += affected_rows(connection.execute(_HURRY, params))
    if revive := sorted(session.info.pop("revive_orphans", set())):
        released += affected_rows(connection.execute(_REVIVE, {"b_calls": revive, "b_now": now}))
    return released


# run_releases' statements, built once (they run with most outcomes)
_CALLS: BindParameter[list[int]] = bindparam("b_calls", expanding=True)
_RELEASE = (
    update(Job)
    .where(Job.call_id.in_(_CALLS), Job.kind == bindparam("b_kind"), Job.state == JobState.WAITING)
    .values(state=JobState.PENDING, next_attempt_at=_NOW, updated_at=_NOW, last_error=None)
)
_HURRY = (
    update(Job)
    .where(
        Job.call_id.in_(_CALLS),
        Job.kind == bindparam("b_kind"),
        Job.state == JobState.PENDING,
        Job.last_error == bindparam("b_reason"),
        Job.next_attempt_at > _NOW,
    )
    .values(next_attempt_at=_NOW, updated_at=_NOW)
)
_REVIVE = (
    update(Job)
    .where(
        Job.call_id.in_(_CALLS),
        Job.kind == JobKind.ATTACH,
        Job.state == JobState.DEAD,
        Job.dead_reason == DeadReason.ORPHAN,
    )
    .values(
        state=JobState.PENDING, attempts=0, next_attempt_at=_NOW, updated_at=_NOW, last_error=None, dead_reason=None
    )
)


# The stage a call must have reached for a waiting job of each kind to go ahead.
READY_STAGES = {
    JobKind.FINISH: ("registered", "finished"),
    JobKind.ATTACH: ("finished",),
    JobKind.RECORD: ("finished",),
}


def release_overdue_waiting(
    session: Session, after: tuple[float, int] | None, limit: int, now: float
) -> tuple[int, tuple[float, int] | None]:
    """Housekeeping's safety net for a wake-up that never came: make due the waiting jobs whose call
    has already reached the stage they need; how many, and where the next round goes on.

    Walks the waiting jobs `limit` at a time in (next_attempt_at, id) order from `after` (the index
    on state and due time), so a round costs the same however many jobs wait for calls the PBX has
    not finished yet; the cursor comes back None once the end is reached, and the walk starts over.
    """
    query = (
        select(Job.id, Job.kind, Job.next_attempt_at, Call.stage)
        .join(Call, Call.id == Job.call_id)
        .where(Job.state == JobState.WAITING)
        .order_by(Job.next_attempt_at, Job.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(
            or_(Job.next_attempt_at > after[0], and_(Job.next_attempt_at == after[0], Job.id > after[1]))
        )
    if session.get_bind().dialect.name == "postgresql":  # never waits for (or deadlocks with) a release
        query = query.with_for_update(skip_locked=True, of=Job)
    rows = session.execute(query).all()
    ready = [row.id for row in rows if row.stage in READY_STAGES.get(row.kind, ())]
    released = 0
    if ready:
        released = affected_rows(
            session.execute(
                update(Job)
                .where(Job.id.in_(ready), Job.state == JobState.WAITING)
                .values(state=JobState.PENDING, next_attempt_at=now, updated_at=now, last_error=None)
                .execution_options(synchronize_session=False)
            )
        )
    cursor = (rows[-1].next_attempt_at, rows[-1].id) if len(rows) == limit else None
    return released, cursor


def _taken_back(now: float, reason: str) -> dict[str, object]:
    return {
        "state": JobState.PENDING,
        "lease_owner": None,
        "lease_worker": None,
        "lease_expires_at": None,
        "ambiguous": True,
        "next_attempt_at": now,
        "updated_at": now,
        "last_error": reason,
    }


def reclaim_expired(session: Session, now: float | None = None) -> int:
    """Return jobs whose lease expired (their worker died) to the queue, marked ambiguous."""
    now = time.time() if now is None else now
    return affected_rows(
        session.execute(
            update(Job)
            .where(Job.state == JobState.LEASED, Job.lease_expires_at < now)
            .values(_taken_back(now, "the worker handling this job stopped; returned to the queue"))
        )
    )


def reclaim_dead_workers(
    session: Session, dead_after: float, now: float | None = None, alive: str | None = None
) -> int:
    """Take back the jobs (and so the portal slots) of workers not seen for `dead_after` seconds,
    without waiting out the jobs' own leases; marked ambiguous, since their requests may have gone
    out. The dead workers' heartbeat rows go too. `alive` (the caller itself) is never dead."""
    now = time.time() if now is None else now
    dead = [
        worker_id
        for worker_id in session.scalars(
            select(WorkerHeartbeat.worker_id).where(WorkerHeartbeat.seen_at < now - dead_after)
        )
        if worker_id != alive
    ]
    if not dead:
        return 0
    reason = f"the worker handling this job stopped (no heartbeat for {dead_after:g} s); returned to the queue"
    theirs = (
        select(Job.id).where(Job.state == JobState.LEASED, Job.lease_worker.in_(dead)).with_for_update(skip_locked=True)
    )
    taken = affected_rows(
        session.execute(
            update(Job)
            .where(Job.id.in_(theirs))
            .values(_taken_back(now, reason))
            .execution_options(synchronize_session=False)
        )
    )
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id.in_(dead)))
    return taken


def replay(session: Session, job_id: int, now: float | None = None) -> Job | None:
    """Make a dead job due again with a fresh attempt count (admin API and CLI)."""
    now = time.time() if now is None else now
    job = session.get(Job, job_id)
    if job is None or job.state != JobState.DEAD:
        return job
    job.state, job.attempts, job.next_attempt_at, job.updated_at = JobState.PENDING, 0, now, now
    job.dead_reason = None
    return job


def open_job(session: Session, call_id: int, kind: str, states: Sequence[str] = OPEN_STATES) -> Job | None:
    """The call's job of `kind` in one of `states` (by default: not finished yet), if any."""
    return session.scalars(
        select(Job).where(Job.call_id == call_id, Job.kind == kind, Job.state.in_(states)).limit(1)
    ).first()


def counts_by_state(session: Session) -> dict[str, int]:
    """How many jobs are in each state."""
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {state: count for state, count in rows}

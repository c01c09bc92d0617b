"""The outbox: a job table that is also the work queue, claimed with leases.

Failure policy: fails open towards delivery — a job whose worker stopped renewing its lease is
returned to the queue (marked ambiguous, since its request may have gone out), so a crash can
delay a job but never lose it; the ledger keeps the re-run from attaching twice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from b24scribe import ratelimit
from b24scribe.db import affected_rows
from b24scribe.models import Job, PortalPacing
from b24scribe.ratelimit import Pace
from b24scribe.settings import DEFAULT_RETRY_SCHEDULE

RETRY_SCHEDULE: Sequence[float] = DEFAULT_RETRY_SCHEDULE
JITTER = 0.2
OPEN_STATES = ("waiting", "pending", "leased")


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
        state="waiting" if waiting else "pending",
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
    """A leased job: who holds it and until when."""

    job_id: int
    kind: str
    portal: str | None
    owner: str
    attempts: int
    ambiguous: bool


def claim_next(session: Session, owner: str, pace: Pace, is_postgres: bool, now: float | None = None) -> Claim | None:
    """Lease the next due job whose portal may take a request now, or return None."""
    now = time.time() if now is None else now
    blocked_portal = exists().where(PortalPacing.portal == Job.portal, ratelimit.portal_blocked(now, pace))
    query = (
        select(Job)
        # apply jobs are folded in batches by b24scribe.inbox, not claimed one by one
        .where(Job.state == "pending", Job.next_attempt_at <= now, Job.kind != "apply", ~blocked_portal)
        .order_by(Job.next_attempt_at, Job.id)
        .limit(20)
    )
    if is_postgres:
        query = query.with_for_update(skip_locked=True, of=Job)
    tried_portals: set[str] = set()
    for job in session.scalars(query):
        if job.portal is not None:
            if job.portal in tried_portals:
                continue
            tried_portals.add(job.portal)
            if ratelimit.take_token(session, job.portal, owner, now, pace, lock=is_postgres) is not None:
                continue
        job.state = "leased"
        job.lease_owner = owner
        job.lease_expires_at = now + pace.lease_seconds
        job.updated_at = now
        return Claim(job.id, job.kind, job.portal, owner, job.attempts, job.ambiguous)
    return None


def next_due_at(session: Session) -> float | None:
    """When the earliest pending job becomes due (a cheap read for idle workers)."""
    return session.scalar(select(func.min(Job.next_attempt_at)).where(Job.state == "pending"))


def leased_job(session: Session, claim: Claim) -> Job | None:
    """The claimed job, if this worker still holds its lease (locked on PostgreSQL)."""
    query = select(Job).where(Job.id == claim.job_id, Job.state == "leased", Job.lease_owner == claim.owner)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return session.scalars(query).one_or_none()


def renew_lease(session: Session, claim: Claim, lease_seconds: float, now: float | None = None) -> bool:
    """Extend our lease; False when it is no longer ours (reclaimed after expiry)."""
    now = time.time() if now is None else now
    renewed = affected_rows(
        session.execute(
            update(Job)
            .where(Job.id == claim.job_id, Job.state == "leased", Job.lease_owner == claim.owner)
            .values(lease_expires_at=now + lease_seconds, updated_at=now)
        )
    )
    if claim.portal is not None:
        session.execute(
            update(PortalPacing)
            .where(PortalPacing.portal == claim.portal, PortalPacing.inflight_owner == claim.owner)
            .values(inflight_expires_at=now + lease_seconds)
        )
    return bool(renewed)


def _release(session: Session, job: Job, claim: Claim) -> None:
    job.lease_owner = None
    job.lease_expires_at = None
    if claim.portal is not None:
        ratelimit.release(session, claim.portal, claim.owner)


def complete(session: Session, job: Job, claim: Claim, result: dict[str, object] | None, now: float) -> None:
    """The job is done."""
    _release(session, job, claim)
    job.state, job.result, job.ambiguous, job.last_error, job.updated_at = "done", result, False, None, now


def retry_later(
    session: Session,
    job: Job,
    claim: Claim,
    error: str,
    now: float,
    ambiguous: bool = False,
    rng: random.Random | None = None,
    schedule: Sequence[float] = RETRY_SCHEDULE,
) -> None:
    """A transient failure: spend an attempt and back off, or declare the job dead at the end."""
    _release(session, job, claim)
    job.attempts += 1
    job.last_error = error
    job.ambiguous = job.ambiguous or ambiguous
    job.updated_at = now
    delay = retry_delay(job.attempts, rng, schedule)
    if delay is None:
        job.state = "dead"
        job.last_error = f"gave up after {job.attempts} attempts: {error}"
    else:
        job.state = "pending"
        job.next_attempt_at = now + delay


def defer(session: Session, job: Job, claim: Claim, until: float, reason: str, now: float) -> None:
    """Put the job back without spending an attempt (throttled, waiting its turn)."""
    _release(session, job, claim)
    job.state, job.next_attempt_at, job.last_error, job.updated_at = "pending", until, reason, now


def kill(session: Session, job: Job, claim: Claim | None, error: str, now: float) -> None:
    """A permanent failure: the job is dead, with the reason, until someone replays it."""
    if claim is not None:
        _release(session, job, claim)
    job.state, job.last_error, job.updated_at = "dead", error, now


def wait_for_call(session: Session, job: Job, claim: Claim, reason: str, now: float) -> None:
    """Park the job until its call reaches the stage it needs (unblocked by `release_waiting`)."""
    _release(session, job, claim)
    job.state, job.last_error, job.updated_at, job.next_attempt_at = "waiting", reason, now, now


def release_waiting(session: Session, call_id: int, kind: str, now: float) -> int:
    """Make a call's waiting jobs of `kind` due now (its call reached the stage they need)."""
    return affected_rows(
        session.execute(
            update(Job)
            .where(Job.call_id == call_id, Job.kind == kind, Job.state == "waiting")
            .values(state="pending", next_attempt_at=now, updated_at=now, last_error=None)
        )
    )


def reclaim_expired(session: Session, now: float | None = None) -> int:
    """Return jobs whose lease expired (their worker died) to the queue, marked ambiguous."""
    now = time.time() if now is None else now
    return affected_rows(
        session.execute(
            update(Job)
            .where(Job.state == "leased", Job.lease_expires_at < now)
            .values(
                state="pending",
                lease_owner=None,
                lease_expires_at=None,
                ambiguous=True,
                next_attempt_at=now,
                updated_at=now,
                last_error="the worker handling this job stopped; returned to the queue",
            )
        )
    )


def replay(session: Session, job_id: int, now: float | None = None) -> Job | None:
    """Make a dead job due again with a fresh attempt count (admin API and CLI)."""
    now = time.time() if now is None else now
    job = session.get(Job, job_id)
    if job is None or job.state != "dead":
        return job
    job.state, job.attempts, job.next_attempt_at, job.updated_at = "pending", 0, now, now
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

"""The inbox: the worker folds stored events into their calls, in batches.

Each accepted event has an `apply` job, committed with it by the hook. The worker takes a batch of
them in one transaction, reads each stored raw body again with the same code the hook validated it
with (`b24scribe.intake`), and folds it into its call, transcript and jobs (`b24scribe.ingest`).
Failure policy: fails safe — an event that can no longer be read (the code changed since it was
accepted) is not lost: its apply job goes dead with the reason, and `flask events replay` or a
job retry takes it up again after a fix.
"""

from __future__ import annotations

import time

import structlog
from marshmallow import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from b24scribe import outbox
from b24scribe.db import Database
from b24scribe.ingest import fold_call_event, fold_transcript
from b24scribe.intake import parse_call_event, parse_transcript, resolve_portal
from b24scribe.models import InboundEvent, Job
from b24scribe.settings import Settings

log = structlog.get_logger(__name__)
BATCH = 200


def fold_event(session: Session, settings: Settings, event: InboundEvent, now: float) -> None:
    """Fold one stored, accepted event into its call (raises ValidationError if unreadable)."""
    query = dict(event.query or {})
    portal = resolve_portal(settings, query)
    if event.source == "pbx":
        call_event = parse_call_event(event.provider, event.body, query)
        fold_call_event(session, portal, event.id, event.provider, call_event, now)
    else:
        parsed = parse_transcript(event.provider, event.body, query)
        fold_transcript(session, portal, event.id, event.provider, parsed.result, parsed.reference, parsed.options, now)


def apply_pending(db: Database, settings: Settings, limit: int = BATCH) -> int:
    """Fold up to `limit` stored events, oldest first, in one transaction; how many were taken."""
    with db.read() as session:  # the idle loop asks often: don't take the write lock for nothing
        due = (Job.state == "pending", Job.kind == "apply", Job.next_attempt_at <= time.time())
        if session.scalar(select(Job.id).where(*due).limit(1)) is None:
            return 0
    with db.write() as session:
        due = (Job.state == "pending", Job.kind == "apply", Job.next_attempt_at <= time.time())
        query = select(Job).where(*due).order_by(Job.id).limit(limit)
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        jobs = list(session.scalars(query))
        now = time.time()
        for job in jobs:
            event = session.get(InboundEvent, job.event_id)
            try:
                if event is None or event.state != "accepted":
                    raise LookupError(f"event {job.event_id} is not an accepted event")
                with session.begin_nested():
                    fold_event(session, settings, event, now)
            except (ValidationError, LookupError, KeyError) as error:
                reason = error.messages if isinstance(error, ValidationError) else str(error)
                job.state, job.last_error = "dead", f"the stored event can no longer be read: {reason}"
                log.error("stored event unreadable", event_id=job.event_id)
            except Exception as error:  # a bug or a passing failure: never block the events behind it
                job.attempts += 1
                delay = outbox.retry_delay(job.attempts, schedule=settings.retry_schedule)
                job.last_error = f"folding the event failed: {type(error).__name__}"
                if delay is None:
                    job.state = "dead"
                else:
                    job.next_attempt_at = now + delay
                log.exception("folding a stored event failed", event_id=job.event_id)
            else:
                job.state = "done"
            job.updated_at = now
    return len(jobs)

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
from dataclasses import dataclass

import structlog
from marshmallow import ValidationError
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from b24scribe import outbox
from b24scribe.db import Database
from b24scribe.ingest import CallEvent, fold_call_event, fold_transcript
from b24scribe.intake import ParsedTranscript, parse_call_event, parse_transcript, resolve_portal
from b24scribe.models import InboundEvent, Job
from b24scribe.settings import Settings

log = structlog.get_logger(__name__)
BATCH = 200
# Bodies read and parsed per batch at most (a one-hour transcript is ~1.5 MB): bounds memory.
BATCH_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Readable:
    """A stored event, parsed again: what to fold into which portal's call."""

    portal: str
    content: CallEvent | ParsedTranscript


def read_event(settings: Settings, source: str, provider: str, body: bytes, query: dict[str, str]) -> Readable:
    """Parse a stored event with the hooks' own code (raises ValidationError/KeyError if it can't be)."""
    portal = resolve_portal(settings, query)
    if source == "pbx":
        return Readable(portal, parse_call_event(provider, body, query))
    return Readable(portal, parse_transcript(provider, body, query))


def fold(session: Session, event_id: int, provider: str, readable: Readable, now: float) -> None:
    """Fold one parsed event into its call, transcript and jobs."""
    content = readable.content
    if isinstance(content, CallEvent):
        fold_call_event(session, readable.portal, event_id, provider, content, now)
    else:
        fold_transcript(
            session, readable.portal, event_id, provider, content.result, content.reference, content.options, now
        )


def _due() -> tuple[ColumnElement[bool], ...]:
    return (Job.state == "pending", Job.kind == "apply", Job.next_attempt_at <= time.time())


def apply_pending(db: Database, settings: Settings, limit: int = BATCH) -> int:
    """Fold due stored events, oldest first; how many were taken.

    Bodies are read and parsed outside the write transaction, so a batch of one-hour transcripts
    holds the (SQLite) write lock only for the short folds, not for their parsing.
    """
    with db.read() as session:  # the idle loop asks often: don't take the write lock for nothing
        candidates = session.execute(
            select(Job.id, Job.event_id, func.length(InboundEvent.body))
            .join(InboundEvent, InboundEvent.id == Job.event_id)
            .where(*_due())
            .order_by(Job.id)
            .limit(limit)
        ).all()
        if not candidates:
            return 0
        chosen: list[tuple[int, int]] = []
        size = 0
        for job_id, event_id, length in candidates:
            if chosen and size + (length or 0) > BATCH_BYTES:
                break
            chosen.append((job_id, event_id))
            size += length or 0
        events = {
            event.id: (event.source, event.provider, bytes(event.body), dict(event.query or {}), event.state)
            for event in session.scalars(select(InboundEvent).where(InboundEvent.id.in_([e for _, e in chosen])))
        }
    readings: dict[int, Readable | str] = {}
    for job_id, event_id in chosen:
        stored = events.get(event_id)
        try:
            if stored is None or stored[4] != "accepted":
                raise LookupError(f"event {event_id} is not an accepted event")
            readings[job_id] = read_event(settings, *stored[:4])
        except (ValidationError, LookupError, KeyError) as error:
            reason = error.messages if isinstance(error, ValidationError) else str(error)
            readings[job_id] = f"the stored event can no longer be read: {reason}"
    with db.write() as session:
        query = select(Job).where(Job.id.in_(list(readings)), *_due())
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)  # another worker may be folding some
        jobs = list(session.scalars(query))
        now = time.time()
        for job in jobs:
            reading = readings[job.id]
            if isinstance(reading, str):
                job.state, job.last_error, job.updated_at = "dead", reading, now
                log.error("stored event unreadable", event_id=job.event_id)
                continue
            try:
                with session.begin_nested():
                    fold(session, job.event_id or 0, events[job.event_id or 0][1], reading, now)
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

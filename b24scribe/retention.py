"""Retention: purge raw bodies and transcript text older than B24SCRIBE_RETENTION_DAYS (contract §12).

What "purged" keeps, so `/v1`, the CLI and the status page still tell what happened:

- the inbound event row: source, provider, when, accepted or rejected and why, the call it became,
  its dedupe key (a late retry of the same webhook is still recognised as a duplicate, not stored
  again); its raw body is emptied and `purged_at` set;
- the transcript row: vendor, state, Bitrix24 TRANSCRIPT_ID, delivery time; its segments (the text)
  are removed;
- the jobs: kind, state, attempts, result and last error; the attach request (which carries the
  transcript text) is removed.

Only what is finished is purged: an event whose jobs are all done or dead, whose transcript's call has
no open job (an attach job reads every part of its call, so one part must not lose its text while
the call is still being sent), or a rejected or replayed event (the retention period is the window
to replay it after a fix). Each batch is one short write transaction, so the worker never holds the
write lock for long; the candidates are read through the partial index `ix_inbound_event_unpurged`,
which holds only the events not yet purged.
Failure policy: fails safe — when in doubt (a job still open, a replay half done) the data is kept.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import structlog
from sqlalchemy import null, select, tuple_, update

from b24scribe.db import Database, affected_rows
from b24scribe.models import CLOSED_JOB_STATES, OPEN_JOB_STATES, InboundEvent, Job, JobKind, TranscriptPart

log = structlog.get_logger(__name__)
SECONDS_PER_DAY = 86400.0
BATCH = 100
# replaying: a replay stopped halfway, and its next run needs the body
PURGEABLE_EVENT_STATES = ("accepted", "rejected", "replayed")


@dataclass(slots=True)
class Purged:
    """What one purge run did."""

    events: int = 0
    rejected_events: int = 0
    transcripts: int = 0
    requests: int = 0
    kept_open: int = 0
    batches: int = 0
    by_source: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """How `flask purge` prints it."""
        sources = ", ".join(f"{name} {n}" for name, n in sorted(self.by_source.items()))
        return [
            f"purged {self.events} event body(ies)"
            + (f" ({sources})" if sources else "")
            + f", {self.rejected_events} of them rejected",
            f"purged the text of {self.transcripts} transcript(s) and {self.requests} attach request(s)",
            f"kept {self.kept_open} old event(s) whose call or jobs are still open",
        ]


def cutoff(older_than_days: float, now: float | None = None) -> float:
    """The receipt time before which data is old enough to purge."""
    return (time.time() if now is None else now) - older_than_days * SECONDS_PER_DAY


Cursor = tuple[float, int]
START: Cursor = (float("-inf"), 0)


def _purge_batch(db: Database, before: float, after: Cursor, now: float, report: Purged) -> Cursor | None:
    """Purge one batch of events received before `before`, after the cursor; the new cursor, or None at the end."""
    with db.write() as session:
        candidates = session.execute(
            select(InboundEvent.id, InboundEvent.received_at, InboundEvent.state, InboundEvent.source)
            .where(
                InboundEvent.purged_at.is_(None),
                InboundEvent.received_at < before,
                InboundEvent.received_at >= after[0],  # where the index range starts
                tuple_(InboundEvent.received_at, InboundEvent.id) > tuple_(*after),
            )
            .order_by(InboundEvent.received_at, InboundEvent.id)
            .limit(BATCH)
        ).all()
        if not candidates:
            return None
        ids = [row.id for row in candidates]
        busy = set(session.scalars(select(Job.event_id).where(Job.event_id.in_(ids), Job.state.in_(OPEN_JOB_STATES))))
        parts = session.execute(
            select(TranscriptPart.id, TranscriptPart.event_id, TranscriptPart.call_id).where(
                TranscriptPart.event_id.in_(ids)
            )
        ).all()
        part_calls = {part.call_id for part in parts if part.call_id is not None}
        open_calls = (
            set(session.scalars(select(Job.call_id).where(Job.call_id.in_(part_calls), Job.state.in_(OPEN_JOB_STATES))))
            if part_calls
            else set()
        )
        busy |= {part.event_id for part in parts if part.call_id in open_calls}
        chosen = [row for row in candidates if row.state in PURGEABLE_EVENT_STATES and row.id not in busy]
        report.kept_open += len(candidates) - len(chosen)
        chosen_ids = [row.id for row in chosen]
        if chosen_ids:
            session.execute(update(InboundEvent).where(InboundEvent.id.in_(chosen_ids)).values(body=b"", purged_at=now))
            chosen_set = set(chosen_ids)
            part_ids = [part.id for part in parts if part.event_id in chosen_set]
            calls = {part.call_id for part in parts if part.event_id in chosen_set and part.call_id is not None}
            if part_ids:
                report.transcripts += affected_rows(
                    session.execute(
                        update(TranscriptPart).where(TranscriptPart.id.in_(part_ids)).values(segments=null())
                    )
                )
            if calls:
                report.requests += affected_rows(
                    session.execute(
                        update(Job)
                        .where(
                            Job.call_id.in_(calls),
                            Job.kind == JobKind.ATTACH,
                            Job.state.in_(CLOSED_JOB_STATES),
                        )
                        .values(request=null())
                    )
                )
            report.events += len(chosen)
            report.rejected_events += sum(1 for row in chosen if row.state == "rejected")
            for row in chosen:
                report.by_source[row.source] = report.by_source.get(row.source, 0) + 1
        report.batches += 1
        last = candidates[-1]
        return (last.received_at, last.id)


def purge(
    db: Database,
    older_than_days: float,
    now: float | None = None,
    max_batches: int | None = None,
    start: Cursor = START,
) -> tuple[Purged, Cursor | None]:
    """Purge what is finished and was received more than `older_than_days` ago, one short batch at a time.

    `max_batches` bounds one run; the returned cursor resumes it (None: it reached the end).
    """
    now = time.time() if now is None else now
    before = cutoff(older_than_days, now)
    report = Purged()
    cursor: Cursor | None = start
    while cursor is not None and (max_batches is None or report.batches < max_batches):
        cursor = _purge_batch(db, before, cursor, now, report)
    return report, cursor


HOUSEKEEPING_BATCHES = 5
_resume: dict[str, Cursor] = {}
_resume_lock = threading.Lock()


def purge_expired(db: Database, retention_days: float, now: float | None = None) -> Purged:
    """The worker's share of retention: a few batches per housekeeping round, resumed where the last stopped
    (so old events that must be kept are not read again on every round)."""
    with _resume_lock:
        start = _resume.pop(db.url, START)
    report, cursor = purge(db, retention_days, now, max_batches=HOUSEKEEPING_BATCHES, start=start)
    if cursor is not None:
        with _resume_lock:
            _resume[db.url] = cursor
    if report.events:
        log.info("retention purged", events=report.events, transcripts=report.transcripts, requests=report.requests)
    return report

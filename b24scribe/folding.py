"""The inbox: the worker folds stored events into their calls, in batches, for a time budget.

Each accepted event has an `apply` job, committed with it by the hook. The worker takes a batch of
them, reads each stored raw body again with the same code the hook validated it with
(`b24scribe.parsing`), and folds the batch into its calls, transcripts and jobs with a few set-based
statements (`b24scribe.fold`). On SQLite the bodies are read and parsed before the write
transaction, so the database's one write lock (which the web's hooks wait for) is held only for
the short writes; batches are sized so that each write stays short. On PostgreSQL a batch is
claimed with FOR UPDATE SKIP LOCKED, so several workers fold different events side by side.

Failure policy: fails safe — if a batch cannot be folded, each of its events is folded in a
transaction of its own, so one bad event never blocks the others: it spends an attempt, backs off
and is retried, and is dead with the reason at the end of the schedule. An event that can no
longer be read (the code changed since it was accepted) is not lost: its apply job goes dead with
the reason, and `flask events replay` or a job retry takes it up again after a fix.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from marshmallow import ValidationError
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from b24scribe import outbox
from b24scribe.db import Database
from b24scribe.fold import Folding, Readable, TranscribePolicy, fold_batch
from b24scribe.models import InboundEvent, Job
from b24scribe.parsing import parse_call_event, parse_transcript, resolve_portal
from b24scribe.settings import Settings
from b24scribe.sources import Sources

log = structlog.get_logger(__name__)
BATCH = 10_000  # events taken per call of apply_pending at most (the time budget usually ends it first)
BUDGET_SECONDS = 0.05
# Bodies read and parsed per batch at most (a one-hour transcript is ~1.5 MB): bounds memory.
BATCH_BYTES = 8 * 1024 * 1024
# A batch's write transaction should take about this long: on SQLite the web's hooks wait for it.
WRITE_SECONDS = 0.025
FIRST_BATCH, MIN_BATCH, MAX_BATCH = 50, 8, 1000


def read_event(
    settings: Settings, sources: Sources, source: str, provider: str, body: bytes, query: dict[str, str]
) -> Readable:
    """Parse a stored event with the hooks' own code (raises ValidationError/KeyError if it can't be)."""
    portal = resolve_portal(settings, query)
    if source == "pbx":
        return Readable(portal, parse_call_event(sources, provider, body, query))
    return Readable(portal, parse_transcript(sources, provider, body, query))


@dataclass(frozen=True, slots=True)
class _Taken:
    """An apply job taken for folding: its event, read again, or why it cannot be."""

    job_id: int
    folding: Folding | None
    unreadable: str = ""


class _BatchSize:
    """How many events the next batch takes, so that its write transaction takes about WRITE_SECONDS.

    A write costs a fixed part (statements, the commit's fsync) and a part per event, both learnt
    from the recent writes (a least-squares line through them). The size is the one whose write
    takes WRITE_SECONDS; when the fixed part alone takes about that long (a slow disk, a busy
    machine), smaller batches would only fold fewer events per write: the size is then the one
    whose events cost as much as the fixed part.
    """

    def __init__(self) -> None:
        self.events = FIRST_BATCH
        self._seen: deque[tuple[int, float]] = deque(maxlen=32)

    def observe(self, asked: int, events: int, seconds: float) -> None:
        """A batch of `events` (of `asked`: fewer when fewer were due) took `seconds` to write."""
        if events <= 0:
            return
        self._seen.append((events, seconds))
        fixed, per_event = self._fit()
        if per_event is None:  # not enough different sizes yet: grow while short, shrink while long
            if events < asked and seconds <= WRITE_SECONDS:
                return  # a short batch that was quick says nothing about a full one
            wanted = events * min(2.0, max(0.5, WRITE_SECONDS / max(seconds, 1e-6)))
        else:
            wanted = max(WRITE_SECONDS - fixed, fixed) / per_event
        self.events = max(MIN_BATCH, min(MAX_BATCH, int(wanted)))

    def _fit(self) -> tuple[float, float | None]:
        """(fixed seconds, seconds per event) of the recent writes; None when they cannot tell."""
        count = len(self._seen)
        sizes = {events for events, _ in self._seen}
        if count < 4 or len(sizes) < 2:
            return 0.0, None
        mean_n = sum(n for n, _ in self._seen) / count
        mean_t = sum(t for _, t in self._seen) / count
        spread = sum((n - mean_n) ** 2 for n, _ in self._seen)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in self._seen) / spread
        if slope <= 0:
            return 0.0, None
        return max(0.0, mean_t - slope * mean_n), slope


_batch_size = _BatchSize()


@dataclass(frozen=True, slots=True)
class _Stored:
    """A due apply job and the stored event it folds."""

    job_id: int
    event_id: int
    source: str | None
    provider: str
    body: bytes
    query: dict[str, str]
    accepted: bool


_CANDIDATES = (
    select(Job.id, Job.event_id)
    # `+ 0`: SQLite's planner would otherwise walk ix_job_due, every pending job of every kind (a
    # delivery backlog of tens of thousands), and sort them by id, for each batch; this way it
    # takes ix_job_apply_due (kind, state, id), already in order
    .where(Job.state == "pending", Job.kind == "apply", Job.next_attempt_at + 0 <= bindparam("now"))
    .order_by(Job.id)
    .limit(bindparam("size"))
)
_CANDIDATES_LOCKED = _CANDIDATES.with_for_update(skip_locked=True, of=Job)  # PostgreSQL: others' rows skipped
_LENGTHS = select(InboundEvent.id, func.length(InboundEvent.body)).where(
    InboundEvent.id.in_(bindparam("ids", expanding=True))
)
_EVENTS = select(
    InboundEvent.id,
    InboundEvent.source,
    InboundEvent.provider,
    InboundEvent.body,
    InboundEvent.query,
    InboundEvent.state,
).where(InboundEvent.id.in_(bindparam("ids", expanding=True)))


def _load(session: Session, size: int, lock: bool) -> tuple[list[_Stored], bool]:
    """The oldest due apply jobs and their events (`lock`: locked, skipping those others hold), and
    whether more were due than it took (the batch was full, or cut short by BATCH_BYTES)."""
    query = _CANDIDATES_LOCKED if lock else _CANDIDATES
    # the jobs alone first: joining the events before the LIMIT would read every due event's row
    candidates = session.execute(query, {"now": time.time(), "size": size}).all()
    if not candidates:
        return [], False
    lengths: dict[int, int | None] = {
        event_id: length for event_id, length in session.execute(_LENGTHS, {"ids": [e for _, e in candidates]})
    }
    chosen: list[tuple[int, int]] = []
    total = 0
    for job_id, event_id in candidates:
        if event_id is None:
            continue  # an apply job always names its event
        length = lengths.get(event_id) or 0
        if chosen and total + length > BATCH_BYTES:
            break
        chosen.append((job_id, event_id))
        total += length
    rows = {row.id: row for row in session.execute(_EVENTS, {"ids": [event_id for _, event_id in chosen]})}
    loaded = []
    for job_id, event_id in chosen:
        row = rows.get(event_id)
        if row is None:
            loaded.append(_Stored(job_id, event_id, None, "", b"", {}, accepted=False))
        else:
            body, query_args = bytes(row.body), dict(row.query or {})
            loaded.append(
                _Stored(job_id, event_id, row.source, row.provider, body, query_args, row.state == "accepted")
            )
    return loaded, len(candidates) >= size or len(chosen) < len(candidates)


def _read(settings: Settings, sources: Sources, stored: _Stored) -> _Taken:
    """Parse a stored event again; an event that cannot be read says why."""
    try:
        if not stored.accepted or stored.source is None:
            raise LookupError(f"event {stored.event_id} is not an accepted event")
        readable = read_event(settings, sources, stored.source, stored.provider, stored.body, stored.query)
    except (ValidationError, LookupError, KeyError) as error:
        reason = error.messages if isinstance(error, ValidationError) else str(error)
        return _Taken(stored.job_id, None, f"the stored event can no longer be read: {reason}")
    return _Taken(stored.job_id, Folding(stored.event_id, stored.provider, readable))


_DONE = update(Job).where(Job.id == bindparam("b_id")).values(state="done", updated_at=bindparam("b_now"))
_DEAD = (
    update(Job)
    .where(Job.id == bindparam("b_id"))
    .values(state="dead", last_error=bindparam("b_error"), updated_at=bindparam("b_now"))
)


_STATES = select(Job.id, Job.state, Job.next_attempt_at).where(Job.id.in_(bindparam("ids", expanding=True)))
_STATES_LOCKED = _STATES.with_for_update(skip_locked=True)


def _still_due(session: Session, job_ids: Sequence[int], lock: bool) -> set[int]:
    """Which of these apply jobs are still due (another worker may have folded some meanwhile)."""
    # by primary key, filtered here: SQLite would otherwise walk the index of every due job
    query = _STATES_LOCKED if lock else _STATES
    now = time.time()
    rows = session.execute(query, {"ids": list(job_ids)})
    return {job_id for job_id, state, due_at in rows if state == "pending" and due_at <= now}


def transcribe_policy(settings: Settings) -> TranscribePolicy | None:
    """Which calls get a transcribe job (contract §10); None when b24scribe submits nothing itself."""
    if settings.transcribe_with is None:
        return None
    return TranscribePolicy(
        settings.transcribe_with, settings.transcribe_min_seconds, frozenset(settings.transcribe_off_portals)
    )


def _fold_taken(
    session: Session, taken: Sequence[_Taken], lock: bool, now: float, transcribe: TranscribePolicy | None
) -> None:
    """Fold the readable events of `taken` as one batch and close every apply job (done or dead)."""
    batch = [t.folding for t in taken if t.folding is not None]
    fold_batch(session, batch, now, lock_calls=lock, transcribe=transcribe)
    connection = session.connection()
    done = [{"b_id": t.job_id, "b_now": now} for t in taken if t.folding is not None]
    if done:
        connection.execute(_DONE, done)
    dead = [{"b_id": t.job_id, "b_error": t.unreadable, "b_now": now} for t in taken if t.folding is None]
    if dead:
        connection.execute(_DEAD, dead)
        for t in taken:
            if t.folding is None:
                log.error("stored event unreadable", job_id=t.job_id)


def _fold_alone(db: Database, settings: Settings, one: _Taken) -> bool:
    """Fold one event in a transaction of its own; on failure spend an attempt (False)."""
    lock = not db.is_sqlite
    try:
        with db.write() as session:
            if not _still_due(session, [one.job_id], lock):
                return True
            _fold_taken(session, [one], lock, time.time(), transcribe_policy(settings))
        return True
    except Exception as error:  # a bug or a passing failure: never block the events behind it
        log.exception("folding a stored event failed", job_id=one.job_id)
        failure = f"folding the event failed: {type(error).__name__}"
    with db.write() as session:
        job = session.get(Job, one.job_id)
        if job is None or job.state != "pending":
            return False
        now = time.time()
        job.attempts += 1
        delay = outbox.retry_delay(job.attempts, schedule=settings.retry_schedule)
        job.last_error, job.updated_at = failure, now
        if delay is None:
            job.state = "dead"
        else:
            job.next_attempt_at = now + delay
    return False


def _fold_once(db: Database, settings: Settings, sources: Sources, size: int) -> tuple[int, bool]:
    """Take and fold one batch; how many apply jobs it took, and whether more were due."""
    lock = not db.is_sqlite
    written = 0.0
    stored: list[_Stored] = []
    more = False
    try:
        if db.is_sqlite:
            with db.read() as session:  # read and parse outside the write lock the hooks wait for
                stored, more = _load(session, size, lock=False)
            if not stored:
                return 0, False
            taken = [_read(settings, sources, s) for s in stored]
            started = time.perf_counter()
            with db.write() as session:
                due = _still_due(session, [t.job_id for t in taken], lock=False)
                taken = [t for t in taken if t.job_id in due]
                _fold_taken(session, taken, lock, time.time(), transcribe_policy(settings))
            written = time.perf_counter() - started
        else:
            with db.write() as session:  # row locks only: other workers take other events meanwhile
                stored, more = _load(session, size, lock=True)
                if not stored:
                    return 0, False
                taken = [_read(settings, sources, s) for s in stored]
                started = time.perf_counter()
                _fold_taken(session, taken, lock, time.time(), transcribe_policy(settings))
            written = time.perf_counter() - started
    except Exception:
        if not stored:
            raise  # nothing taken: the database itself failed (the worker loop logs it and retries)
        # One event (or a passing failure) spoiled the batch: fold each event on its own.
        log.warning("folding a batch failed; folding its events one by one", events=len(stored), exc_info=True)
        for one in stored:
            _fold_alone(db, settings, _read(settings, sources, one))
        return len(stored), more
    _batch_size.observe(size, len(taken), written)
    return len(taken), more


def apply_pending(
    db: Database, settings: Settings, sources: Sources, limit: int = BATCH, budget_seconds: float = BUDGET_SECONDS
) -> int:
    """Fold due stored events, oldest first, until none is due, `limit` are taken or the budget is spent.

    Returns how many apply jobs were taken. At least one batch is folded whatever the budget, and
    the budget is checked between batches, so one call takes about `budget_seconds` (plus one batch).
    A batch that took every due event ends the call too: the events that arrived while it was
    written are left to gather for the next turn, rather than folded as a trickle of tiny write
    transactions (on SQLite each one is the write lock the hooks wait for, with a commit).
    """
    deadline = time.monotonic() + budget_seconds
    taken = 0
    while taken < limit:
        folded, more = _fold_once(db, settings, sources, min(_batch_size.events, limit - taken))
        taken += folded
        if not more or time.monotonic() >= deadline:
            break
    return taken

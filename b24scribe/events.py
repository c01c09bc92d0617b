"""Storing what the hooks receive, and folding it into calls, transcripts and jobs.

A hook stores the raw event and one `apply` job in ONE transaction and answers only after the
commit (contract §5); a duplicate delivery finds the stored event through the unique dedupe key and
creates no second job. The worker then folds each stored event into its call (`b24scribe.fold`,
called by `b24scribe.folding`), where the register, finish, attach and fetch jobs are planned.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, String, bindparam, insert, select
from sqlalchemy.orm import Session

from b24scribe import outbox
from b24scribe.db import Database, upsert_insert
from b24scribe.models import Call, InboundEvent, Job
from b24scribe.transcript import Direction, Segment, VendorResult


def _column_length(column: ColumnElement[Any]) -> int:
    assert isinstance(column.type, String) and column.type.length is not None
    return column.type.length


_MAX_KEY_LENGTH = _column_length(InboundEvent.__table__.c.dedupe_key)
_MAX_CONTENT_TYPE_LENGTH = _column_length(InboundEvent.__table__.c.content_type)
_HASHED = "~sha256:"  # marks a key kept as a readable prefix and the hash of the whole key
_HASHED_PREFIX_LENGTH = _MAX_KEY_LENGTH - len(_HASHED) - 64
# C0 and C1 control characters, DEL and lone surrogates: not storable (PostgreSQL text refuses NUL,
# UTF-8 cannot encode a surrogate), nor meant in a key or a header.
_UNSTORABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def bounded_key(key: str) -> str:
    """A dedupe key that fits its column and holds only printable text, and never collides by cutting.

    A short printable key is kept as it is (so keys stored before stay meaningful). Any other one
    (long, or holding a control character or a lone surrogate) becomes a readable prefix plus
    `~sha256:` and the hash of the whole key: two keys that differ only past the prefix, such as
    one long job id with `:0` and with `:1`, stay two keys. A short key that happens to contain
    the marker is hashed too, so a kept key can never equal a hashed one.
    """
    if len(key) <= _MAX_KEY_LENGTH and key.isprintable() and _HASHED not in key:
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    prefix = "".join(c if c.isprintable() else "?" for c in key[:_HASHED_PREFIX_LENGTH])
    return prefix + _HASHED + digest


def storable_content_type(content_type: str | None) -> str | None:
    """The Content-Type header as stored: within its column, control characters replaced by `?`."""
    if content_type is None or (len(content_type) <= _MAX_CONTENT_TYPE_LENGTH and content_type.isprintable()):
        return content_type
    return _UNSTORABLE.sub("?", content_type[:_MAX_CONTENT_TYPE_LENGTH])


# What each kind of event is called in answers and stored rejections.
EVENT_NOUNS = {"pbx": "call event", "stt": "transcript"}


def rejection_message(source: str) -> str:
    """The message of a 422 for an event that cannot be processed (its fields say why): the hooks'
    answer and what a replay stores read the same."""
    return f"the {EVENT_NOUNS[source]} cannot be processed: see fields"


@dataclass(frozen=True, slots=True)
class RawEvent:
    """The request as received, minus credentials: what is kept for replay.

    `content_type` is kept as stored (`storable_content_type`): the header is the sender's, of any length.
    """

    source: str  # pbx | stt
    provider: str
    body: bytes
    query: dict[str, str]
    content_type: str | None
    delivery_id: str | None = None  # Standard Webhooks webhook-id, when signed that way

    def __post_init__(self) -> None:
        content_type = self.content_type
        if content_type is not None and (
            len(content_type) > _MAX_CONTENT_TYPE_LENGTH or not content_type.isprintable()
        ):
            object.__setattr__(self, "content_type", storable_content_type(content_type))

    def dedupe_key(self, natural_key: str | None) -> str:
        """The vendor's delivery id, else its natural key (job id), else the hash of its bytes."""
        if self.delivery_id:
            return bounded_key(f"delivery:{self.delivery_id}")
        if natural_key:
            return bounded_key(f"key:{natural_key}")
        return "sha256:" + self.digest()

    def digest(self) -> str:
        """sha256 of what the event was read from: the body, and the query when there is one (a
        form PBX may send its event in the query with no body; `?token=` was dropped already)."""
        digest = hashlib.sha256(self.body)
        if self.query:
            digest.update(b"\n?" + json.dumps(self.query, sort_keys=True).encode())
        return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the hook answers: the event id, whether it was a duplicate, and a stored rejection."""

    event_id: int
    duplicate: bool
    rejected_with: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One PBX call life-cycle event in our own terms (contract §3.1)."""

    event: str  # started | answered | finished | recording (a recording of the call is ready)
    call_id: str
    direction: Direction | None = None
    from_number: str | None = None
    to_number: str | None = None
    extension: str | None = None
    user_id: int | None = None
    started_at: str | None = None
    duration: int | None = None
    status: str | None = None
    recording_url: str | None = None
    line: str | None = None
    recording_channels: int | None = None  # 1 or 2, when the PBX says how the recording is made
    transcribe: bool | None = None  # False: never submit this call for transcription (contract §10)


@dataclass(frozen=True, slots=True)
class TranscriptOptions:
    """Per-URL options of a transcript callback (contract §6.3)."""

    channel_slot: int | None = None
    side_overrides: dict[str, str] = field(default_factory=dict)
    direction: Direction | None = None


_EVENT_COLUMNS = ("source", "provider", "dedupe_key", "received_at", "content_type", "query", "body", "state", "error")
_APPLY_JOB = insert(Job).values(
    kind="apply",
    event_id=bindparam("event_id"),
    state="pending",
    attempts=0,
    ambiguous=False,
    next_attempt_at=bindparam("now"),
    created_at=bindparam("now"),
    updated_at=bindparam("now"),
)
_EXISTING = select(InboundEvent.id, InboundEvent.state, InboundEvent.error).where(
    InboundEvent.source == bindparam("source"),
    InboundEvent.provider == bindparam("provider"),
    InboundEvent.dedupe_key == bindparam("dedupe_key"),
)


@functools.cache
def _insert_event_statement(dialect: str) -> Any:
    # Built once (the hot path of every hook): only the parameters change per request.
    return (
        upsert_insert(dialect)(InboundEvent)
        .values({name: bindparam(name, type_=InboundEvent.__table__.c[name].type) for name in _EVENT_COLUMNS})
        .on_conflict_do_nothing(index_elements=["source", "provider", "dedupe_key"])
        .returning(InboundEvent.id)
    )


# The hooks' hot path on SQLite (the group committer's raw connection): the same two inserts as
# the Core statements, sent to the driver directly (SQLAlchemy's per-statement overhead was most
# of an event's cost under load).
_SQLITE_INSERT_EVENT = (
    "INSERT INTO inbound_event (source, provider, dedupe_key, received_at, content_type, query, body, state, error)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source, provider, dedupe_key) DO NOTHING"
)
_SQLITE_APPLY_JOB = (
    "INSERT INTO job (kind, event_id, state, attempts, ambiguous, next_attempt_at, created_at, updated_at)"
    " VALUES ('apply', ?, 'pending', 0, 0, ?, ?, ?)"
)
_SQLITE_EXISTING = "SELECT id, state, error FROM inbound_event WHERE source = ? AND provider = ? AND dedupe_key = ?"


# The same on PostgreSQL (the gevent web's group committer's psycopg connection): both inserts in
# one statement, so an event costs one round trip; the job is inserted only for a new, accepted event.
_POSTGRES_STORE = (
    "WITH event AS ("
    "INSERT INTO inbound_event (source, provider, dedupe_key, received_at, content_type, query, body, state, error)"
    " VALUES (%s, %s, %s, %s, %s, %s::json, %s, %s, %s::json)"
    " ON CONFLICT (source, provider, dedupe_key) DO NOTHING RETURNING id"
    "), apply AS ("
    "INSERT INTO job (kind, event_id, state, attempts, ambiguous, next_attempt_at, created_at, updated_at)"
    " SELECT 'apply', id, 'pending', 0, false, %s, %s, %s FROM event WHERE %s"
    ") SELECT id FROM event"
)
_POSTGRES_EXISTING = (
    "SELECT id, state, error FROM inbound_event WHERE source = %s AND provider = %s AND dedupe_key = %s"
)


def _store_postgres(driver: Any, raw: RawEvent, key: str, state: str, error: dict[str, Any] | None) -> Outcome:
    now = time.time()
    query = json.dumps(raw.query) if raw.query else "{}"
    # json.dumps(None) is JSON null, as SQLAlchemy's JSON type stores None (the Core path, `_store_core`)
    values = (raw.source, raw.provider, key, now, raw.content_type, query, raw.body, state, json.dumps(error))
    inserted = driver.execute(_POSTGRES_STORE, (*values, now, now, now, state == "accepted")).fetchone()
    if inserted is None:  # the dedupe key is taken: a duplicate
        event_id, stored_state, stored_error = driver.execute(
            _POSTGRES_EXISTING, (raw.source, raw.provider, key)
        ).fetchone()
        return Outcome(int(event_id), True, stored_error if stored_state == "rejected" else None)
    return Outcome(int(inserted[0]), False, error)


def _store_sqlite(
    driver: sqlite3.Connection, raw: RawEvent, key: str, state: str, error: dict[str, Any] | None
) -> Outcome:
    now = time.time()
    query = json.dumps(raw.query) if raw.query else "{}"
    error_json = None if error is None else json.dumps(error)
    # no RETURNING: a row to fetch would be one more step (and GIL hand-over) per event
    inserted = driver.execute(
        _SQLITE_INSERT_EVENT,
        (raw.source, raw.provider, key, now, raw.content_type, query, raw.body, state, error_json),
    )
    if inserted.rowcount == 0:  # the dedupe key is taken: a duplicate
        event_id, stored_state, stored_error = driver.execute(
            _SQLITE_EXISTING, (raw.source, raw.provider, key)
        ).fetchone()
        rejected = json.loads(stored_error) if stored_state == "rejected" and stored_error else None
        return Outcome(int(event_id), True, rejected)
    event_id = inserted.lastrowid
    assert event_id is not None
    if state == "accepted":
        driver.execute(_SQLITE_APPLY_JOB, (event_id, now, now, now))
    return Outcome(event_id, False, error)


def _store_core(connection: Connection, raw: RawEvent, key: str, state: str, error: dict[str, Any] | None) -> Outcome:
    now = time.time()
    values = {
        "source": raw.source,
        "provider": raw.provider,
        "dedupe_key": key,
        "received_at": now,
        "content_type": raw.content_type,
        "query": raw.query,
        "body": raw.body,
        "state": state,
        "error": error,
    }
    statement = _insert_event_statement(connection.dialect.name)
    event_id: int | None = connection.execute(statement, values).scalar_one_or_none()
    if event_id is None:
        event_id, stored_state, stored_error = connection.execute(
            _EXISTING, {"source": raw.source, "provider": raw.provider, "dedupe_key": key}
        ).one()
        return Outcome(event_id, True, stored_error if stored_state == "rejected" else None)
    if state == "accepted":
        connection.execute(_APPLY_JOB, {"event_id": event_id, "now": now})
    return Outcome(event_id, False, error)


def store_event_in(connection: Connection, raw: RawEvent, key: str) -> Outcome:
    """Store an accepted event and its `apply` job in the caller's transaction (a job's outcome that
    stores an event, such as a fetch placing a callback on its call)."""
    return _store_core(connection, raw, key, "accepted", None)


def _store(db: Database, raw: RawEvent, key: str, state: str, error: dict[str, Any] | None) -> Outcome:
    return db.transact(
        functools.partial(_store_core, raw=raw, key=key, state=state, error=error),
        on_sqlite=functools.partial(_store_sqlite, raw=raw, key=key, state=state, error=error),
        on_postgres=functools.partial(_store_postgres, raw=raw, key=key, state=state, error=error),
    )


def store_rejected(db: Database, raw: RawEvent, error: dict[str, Any], natural_key: str | None = None) -> Outcome:
    """Keep an authenticated but unprocessable event so it can be replayed after a fix.

    The error may quote the sender (an unknown field's name is a key of `fields`): its control
    characters and lone surrogates are replaced (`storable_error`) so that it can always be stored.
    """
    return _store(db, raw, raw.dedupe_key(natural_key), "rejected", storable_error(error))


def storable_error(value: Any) -> Any:
    """A JSON error with U+FFFD for every control character and lone surrogate in its strings and keys."""
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value) if _UNSTORABLE.search(value) else value
    if isinstance(value, dict):
        return {
            storable_error(key) if isinstance(key, str) else key: storable_error(item) for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [storable_error(item) for item in value]
    return value


def store_event(db: Database, raw: RawEvent, key: str) -> Outcome:
    """Store an accepted event and the outbox job that folds it into its call, in one commit.

    This is all a hook does before it answers 202: two small inserts, group-committed with other
    requests' on SQLite. The worker's `folding.apply_pending` does the rest (call, transcript, jobs).
    A duplicate (same dedupe key) stores nothing and answers with the stored event.
    """
    return _store(db, raw, key, "accepted", None)


def call_event_key(raw: RawEvent, call_id: str) -> str:
    """A PBX event is the same event when it is the same delivery, or the same bytes for the same call.

    The key leads with the call id, so the keys of one call, and of a PBX whose call ids grow
    (Asterisk's uniqueid is epoch.sequence), sit side by side in the dedupe index: a group commit
    then writes a few index pages instead of one random page per event (strace under
    bench/ingest.py's load: WAL frames per commit 34 → 20).
    """
    if raw.delivery_id:
        return raw.dedupe_key(None)
    return bounded_key(f"call:{call_id}:{raw.digest()}")


def transcript_key(raw: RawEvent, result: VendorResult, options: TranscriptOptions) -> str:
    """A transcript is the same when it is the same delivery, the same vendor job (and channel),
    or the same bytes for the same call (the call is named in the body or the query, both hashed)."""
    natural_key = f"{result.vendor_job_id}:{options.channel_slot}" if result.vendor_job_id else None
    if natural_key and result.status == "fetch":
        natural_key += ":fetch"
    return raw.dedupe_key(natural_key)


# A transcript part's columns a vendor result may leave unset (a failure, a result still to fetch).
# One file per channel (contract §11): `&parts=2` on both callbacks makes the first part wait for the
# second, at most PARTS_WAIT_SECONDS after it came, before the call's transcript is attached; the
# attach job is put off with this reason, and the second part's fold makes it due at once.
WAITING_FOR_PARTS = "waiting for the transcript's other channel (&parts=2)"
PARTS_WAIT_SECONDS = 600.0

PART_DEFAULTS: dict[str, Any] = {"granularity": "segment", "segments": None, "cost": None, "cost_currency": None}


def part_values(result: VendorResult) -> dict[str, Any]:
    """What a vendor's result writes into its transcript part: the one place the fold of a new
    callback, a replay and a fetched transcript decide it."""
    transcript = result.transcript
    if result.status == "completed" and transcript is not None:
        return {
            "status": "completed",
            "delivery_state": "queued",
            "failure_reason": None,
            "granularity": transcript.granularity,
            "segments": serialize_segments(transcript.segments),
            "cost": transcript.cost,
            "cost_currency": transcript.cost_currency,
        }
    if result.status == "fetch":
        return {"status": "fetching", "delivery_state": "queued", "failure_reason": None}
    reason = result.failure_reason or "the vendor reported no transcript"
    return {"status": "failed", "delivery_state": "failed", "failure_reason": reason}


def serialize_segments(segments: list[Segment]) -> list[list[Any]]:
    """Compact JSON rows for storage: [start, end, text, channel, speaker, side, glue]."""
    return [[s.start, s.end, s.text, s.channel, s.speaker, s.side.value if s.side else None, s.glue] for s in segments]


def queue_attach(session: Session, call: Call, event_id: int | None, now: float) -> None:
    """Make sure one attach job will send the call's whole transcript (it reads every part)."""
    # A leased job may already have read the parts: only a job not yet started can take this one.
    if outbox.open_job(session, call.id, "attach", states=("waiting", "pending")) is not None:
        return
    ready = call.stage == "finished"
    outbox.enqueue(
        session, "attach", call_id=call.id, event_id=event_id, portal=call.portal, waiting=not ready, now=now
    )

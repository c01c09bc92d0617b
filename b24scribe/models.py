"""SQLAlchemy models: inbound events, calls, transcripts, the outbox, the ledger, pacing.

The outbox's job kinds and states are defined here once (`JobKind`, `JobState`), with the tuples of
states the metrics, retention, the admin API and the status page read. They are `StrEnum`s: a member
equals the string stored in the column (which stays a plain string column, no data migration), so
queries, JSON and tests may use either.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobKind(StrEnum):
    """What an outbox job does."""

    REGISTER = "register"  # telephony.externalCall.register
    FINISH = "finish"  # telephony.externalCall.finish
    ATTACH = "attach"  # telephony.call.attachTranscription
    FETCH = "fetch"  # GET a finished transcript from an STT vendor's API
    RECORD = "record"  # telephony.externalCall.attachRecord (after downloading the file, in upload mode)
    TRANSCRIBE = "transcribe"  # submit the call's recording to the STT vendor (contract §10)
    APPLY = "apply"  # fold a stored event into its call (b24scribe.folding, never claimed one by one)


class JobState(StrEnum):
    """Where an outbox job is: waiting (blocked on its call) → pending → leased → done, or dead."""

    WAITING = "waiting"
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    DEAD = "dead"


# Every state, in the order the admin API lists them.
JOB_STATES: tuple[JobState, ...] = tuple(JobState)
# Not finished yet: the job will still run (retention keeps what such a job reads).
OPEN_JOB_STATES: tuple[JobState, ...] = (JobState.WAITING, JobState.PENDING, JobState.LEASED)
# Queued and not yet claimed: an attach job in one of these states picks up a newer transcript by itself.
QUEUED_JOB_STATES: tuple[JobState, ...] = (JobState.WAITING, JobState.PENDING)
# Finished, one way or the other.
CLOSED_JOB_STATES: tuple[JobState, ...] = (JobState.DONE, JobState.DEAD)
# The states /metrics gauges and the status page counts: the open ones and the given-up ones (each an
# index range that stays small; done jobs grow without bound and are counted as they happen).
GAUGED_JOB_STATES: tuple[JobState, ...] = (JobState.WAITING, JobState.PENDING, JobState.LEASED, JobState.DEAD)


class DeadReason(StrEnum):
    """Why a job is dead (`Job.dead_reason`); the human text stays in `Job.last_error`."""

    # the PBX never reported the attach job's call as finished: revived when it does (`outbox.revive_orphans`)
    ORPHAN = "orphan"
    # the retry schedule ran out (transient errors, or a job that failed unexpectedly every time)
    RETRIES = "retries"
    # a failure no retry can mend: Bitrix24 refused the request, no user, a purged transcript, …
    PERMANENT = "permanent"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class InboundEvent(Base):
    """Every authenticated request a hook received, raw body kept for replay."""

    __tablename__ = "inbound_event"
    __table_args__ = (
        UniqueConstraint("source", "provider", "dedupe_key", name="uq_inbound_event_dedupe"),
        # /metrics counts rejected events and the status page lists them, newest first
        Index("ix_inbound_event_state", "state", "id"),
        # retention reads the oldest events not yet purged: a partial index, so the purged ones are not in it
        Index(
            "ix_inbound_event_unpurged",
            "received_at",
            "id",
            sqlite_where=text("purged_at IS NULL"),
            postgresql_where=text("purged_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    source: Mapped[str] = mapped_column(String(8))  # pbx | stt
    provider: Mapped[str] = mapped_column(String(32))  # generic, asterisk, deepgram, …
    dedupe_key: Mapped[str] = mapped_column(String(200))
    received_at: Mapped[float] = mapped_column(Float)
    content_type: Mapped[str | None] = mapped_column(String(200))
    query: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # without the token
    body: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16))  # accepted | rejected | replaying | replayed
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    call_id: Mapped[int | None] = mapped_column(ForeignKey("call.id"), index=True)
    # set when retention emptied the body (and its transcript's text): the row still tells what happened
    purged_at: Mapped[float | None] = mapped_column(Float)


class Call(Base):
    """A phone call as the PBX reported it and as far as Bitrix24 has been told about it."""

    __tablename__ = "call"
    # per portal: two portals' PBXs may use the same call ids (contract §8)
    __table_args__ = (UniqueConstraint("portal", "pbx", "pbx_call_id", name="uq_call_portal_pbx_call"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    portal: Mapped[str] = mapped_column(String(200))
    pbx: Mapped[str | None] = mapped_column(String(32))
    pbx_call_id: Mapped[str | None] = mapped_column(String(128))
    b24_call_id: Mapped[str | None] = mapped_column(String(128), index=True)
    # registered by something else: we only attach transcripts (?b24_call_id=)
    external: Mapped[bool] = mapped_column(Boolean, default=False)
    direction: Mapped[str | None] = mapped_column(String(16))
    from_number: Mapped[str | None] = mapped_column(String(64))
    to_number: Mapped[str | None] = mapped_column(String(64))
    extension: Mapped[str | None] = mapped_column(String(64))
    user_id: Mapped[int | None] = mapped_column(Integer)
    line: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[str | None] = mapped_column(String(40))  # ISO-8601 with offset, as sent
    answered: Mapped[bool] = mapped_column(Boolean, default=False)
    duration: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str | None] = mapped_column(String(16))
    recording_url: Mapped[str | None] = mapped_column(Text)
    recording_channels: Mapped[int | None] = mapped_column(Integer)  # 1 or 2, when the PBX says
    # What became of the recording (contract §9), written by its record jobs: attached | dry-run |
    # refused | failed (None: none reported, or its first job has not run; an open record job: pending).
    recording_state: Mapped[str | None] = mapped_column(String(16))
    recording_error: Mapped[str | None] = mapped_column(Text)  # why it is not attached (yet)
    recording_attached_url: Mapped[str | None] = mapped_column(Text)  # the URL it was attached from
    recording_sha256: Mapped[str | None] = mapped_column(String(64))  # of the file uploaded (upload mode)
    recording_file: Mapped[str | None] = mapped_column(String(200))  # FILENAME sent to Bitrix24
    recording_attached_at: Mapped[float | None] = mapped_column(Float)
    # Transcription requests (contract §10): False when the PBX said "transcribe": false for this call.
    transcribe: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    # queued | submitted | failed | refused (None: not asked for), the vendor, its job id, why not
    transcription_state: Mapped[str | None] = mapped_column(String(16))
    transcription_vendor: Mapped[str | None] = mapped_column(String(32))
    transcription_job_id: Mapped[str | None] = mapped_column(String(128), index=True)
    transcription_error: Mapped[str | None] = mapped_column(Text)
    transcription_submitted_at: Mapped[float | None] = mapped_column(Float)
    finish_reported: Mapped[bool] = mapped_column(Boolean, default=False)
    # Bitrix24 side: new → registered → finished
    stage: Mapped[str] = mapped_column(String(16), default="new")
    registered_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    # a decision the service took for this call that the admin should know about
    note: Mapped[str | None] = mapped_column(Text)


class TranscriptPart(Base):
    """One vendor result for a call: a whole transcript, or one channel of it (`?channel=`)."""

    __tablename__ = "transcript"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    call_id: Mapped[int | None] = mapped_column(ForeignKey("call.id"), index=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("inbound_event.id"), index=True)
    vendor: Mapped[str] = mapped_column(String(32))
    vendor_job_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))  # completed | failed | fetching
    failure_reason: Mapped[str | None] = mapped_column(Text)
    channel_slot: Mapped[int | None] = mapped_column(Integer)  # None: the whole call
    granularity: Mapped[str] = mapped_column(String(8), default="segment")
    # [[start, end, text, channel, speaker, side, glue], …]
    segments: Mapped[list[Any] | None] = mapped_column(JSON)
    cost: Mapped[float | None] = mapped_column(Float)
    cost_currency: Mapped[str | None] = mapped_column(String(50))
    side_overrides: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    received_at: Mapped[float] = mapped_column(Float)
    # queued | delivered | dry-run | failed (the vendor's job failed) | empty (no speech)
    delivery_state: Mapped[str] = mapped_column(String(16))
    b24_transcript_id: Mapped[int | None] = mapped_column(BigInteger)
    delivered_at: Mapped[float | None] = mapped_column(Float)


class Job(Base):
    """The outbox: one unit of work towards Bitrix24 (or a vendor fetch), claimed with a lease."""

    __tablename__ = "job"
    __table_args__ = (
        Index("ix_job_due", "state", "next_attempt_at"),
        Index("ix_job_call_kind", "call_id", "kind", "state"),
        # claims take due retries first (attempts > 0), then fresh jobs by due time
        Index("ix_job_claim", "state", "attempts", "next_attempt_at"),
        # the fold takes the oldest due apply jobs: without it, it walks every pending delivery
        Index("ix_job_apply_due", "kind", "state", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # a JobKind
    call_id: Mapped[int | None] = mapped_column(ForeignKey("call.id"))
    event_id: Mapped[int | None] = mapped_column(ForeignKey("inbound_event.id"))
    transcript_id: Mapped[int | None] = mapped_column(ForeignKey("transcript.id"))
    portal: Mapped[str | None] = mapped_column(String(200))  # None: not paced (vendor fetch)
    state: Mapped[str] = mapped_column(String(16))  # a JobState
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    # the worker process holding the lease (its heartbeat row): a dead worker's jobs are taken back
    lease_worker: Mapped[str | None] = mapped_column(String(100))
    # the last attempt's request went out and no answer came back: look before resending
    ambiguous: Mapped[bool] = mapped_column(Boolean, default=False)
    last_error: Mapped[str | None] = mapped_column(Text)
    # a DeadReason while the job is dead (NULL otherwise, and for apply jobs the fold gave up on and
    # jobs that died before migration 0004); the revive of orphans selects on it, not on last_error
    dead_reason: Mapped[str | None] = mapped_column(String(16))
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # what was (or would be) sent
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class AttachLedger(Base):
    """Transcripts Bitrix24 confirmed: checked before every attempt so none is attached twice."""

    __tablename__ = "attach_ledger"
    __table_args__ = (UniqueConstraint("portal", "b24_call_id", "sha256", name="uq_attach_ledger_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    portal: Mapped[str] = mapped_column(String(200))
    b24_call_id: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    b24_transcript_id: Mapped[int | None] = mapped_column(BigInteger)
    possible_duplicate: Mapped[bool] = mapped_column(Boolean, default=False)
    attached_at: Mapped[float] = mapped_column(Float)


class PortalPacing(Base):
    """A portal's token bucket and pause, shared by all workers. Its in-flight slots are its leased
    jobs (at most B24SCRIBE_PORTAL_CONCURRENCY): a slot is freed with its job's lease."""

    __tablename__ = "portal_pacing"

    portal: Mapped[str] = mapped_column(String(200), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    refilled_at: Mapped[float] = mapped_column(Float)
    paused_until: Mapped[float] = mapped_column(Float, default=0.0)
    pause_reason: Mapped[str | None] = mapped_column(String(200))


class PortalState(StrEnum):
    """Where an installed portal (Bitrix24 local application, contract §8) stands."""

    INSTALLED = "installed"  # tokens held: its jobs go
    NEEDS_REINSTALL = "needs_reinstall"  # the refresh token was refused (invalid_grant): its jobs wait
    UNINSTALLED = "uninstalled"  # ONAPPUNINSTALL: tokens removed, its jobs wait


class Portal(Base):
    """A portal that installed the local application: its OAuth tokens, where its REST answers
    (`client_endpoint`), the `application_token` its events must carry and its own inbound token.

    Its `name` (the portal's domain) is what calls, jobs and pacing know it by; `member_id` is
    Bitrix24's id for it, the key an install is matched on. Webhook portals are settings, not rows."""

    __tablename__ = "portal"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    member_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    client_endpoint: Mapped[str | None] = mapped_column(Text)
    access_token: Mapped[str | None] = mapped_column(Text)
    refresh_token: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[float | None] = mapped_column(Float)
    application_token: Mapped[str | None] = mapped_column(String(64))
    inbound_token: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(20))
    state_reason: Mapped[str | None] = mapped_column(Text)
    installed_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    refreshed_at: Mapped[float | None] = mapped_column(Float)
    refreshes: Mapped[int] = mapped_column(Integer, default=0)


class WorkerHeartbeat(Base):
    """Each running worker process, for /readyz and for taking back a dead worker's jobs: a thread of
    its own beats every B24SCRIBE_WORKER_DEAD_AFTER_SECONDS / 5, whatever its requests wait for."""

    __tablename__ = "worker_heartbeat"

    worker_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    seen_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float] = mapped_column(Float)


# Read by retention, GET /v1/events/<id> (the jobs an event became) and /metrics (transcripts not
# delivered); created by migration 0002.
Index("ix_job_event_id", Job.event_id)
Index("ix_transcript_delivery_state", TranscriptPart.delivery_state)

"""Executing outbox jobs: register → finish → attachTranscription per call, and vendor fetches.

Claimed jobs come in batches that already carry what the claim read (kind, call, transcript, and
the call row itself, read in the claim's transaction by `Deliverer.prepare`); each executor reads
what else it needs and sends at most one request (plus the look-up before a resend). Outcomes are
recorded together, in one transaction that also checks every lease is still ours: at the end of
the batch, and before any request goes out. Sender threads share those transactions: an outcome
joins the next group commit (`GroupCommit`), and its thread waits until it is durable before the
job lets go of its lease, so the call's next step is never claimed before it. Failure policy: a job's failure
is the job's — any exception while handling or recording it (a bug, a transcript that cannot be
translated, a surprise answer) spends an attempt and follows the retry schedule to dead, with the
reason; only a lost database is nobody's failure (the worker backs off, the lease returns the job).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
import structlog
from marshmallow import ValidationError
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from b24scribe import metrics, outbox, ratelimit
from b24scribe.bitrix24 import (
    AmbiguousError,
    Bitrix24Client,
    Bitrix24Error,
    OperationLimitError,
    PermanentError,
    Response,
    ThrottledError,
    is_finish_call_not_found,
    is_unknown_user,
)
from b24scribe.db import Database
from b24scribe.ingest import queue_attach, serialize_segments
from b24scribe.models import AttachLedger, Call, InboundEvent, Job, TranscriptPart
from b24scribe.outbox import Claim
from b24scribe.ratelimit import Pace
from b24scribe.settings import Settings
from b24scribe.transcript import Direction, Role, Segment, Side, Transcript
from schemas.bitrix24 import SideRules, attach_params
from schemas.registry import STT_VENDORS

log = structlog.get_logger(__name__)

STATUS_CODES = {
    "answered": "200",
    "busy": "486",
    "no-answer": "304",
    "cancelled": "603-S",
    "declined": "603",
    "unavailable": "480",
    "congestion": "503",
    "failed": "OTHER",
}
TYPE_OUTBOUND, TYPE_INBOUND = 1, 2
UNKNOWN_NUMBER = "0"  # what Bitrix24 gets for anonymous/withheld numbers (it rejects an empty one)
PHONE_CHARACTERS = set("0123456789#*+,;")


MAX_REASON = 500  # characters of an unexpected error kept as the job's last_error


class LeaseLost(Exception):
    """Our lease expired and the job was reclaimed; the outcome is not ours to record."""


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A job's outcome waiting for the batch's next flush."""

    claim: Claim
    apply: Callable[[Session, Job], None]
    on_lost: Callable[[Session], None] | None


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


def pace_from(settings: Settings) -> Pace:
    """The pacing the settings give every portal."""
    return Pace(settings.rate_per_second, settings.rate_burst, settings.lease_seconds, settings.portal_concurrency)


def database_unavailable(error: BaseException) -> bool:
    """The database went away (restart, lost connection): nobody's failure, the worker waits."""
    return isinstance(error, OperationalError | InterfaceError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    )


def phone_for_bitrix24(number: str | None) -> str:
    """The number as Bitrix24 keeps it: only [0-9#*+,;], at most 20 characters, never empty."""
    kept = "".join(ch for ch in (number or "") if ch in PHONE_CHARACTERS)
    return kept[:20] if any(ch.isdigit() for ch in kept) else UNKNOWN_NUMBER


def external_call_id(pbx_call_id: str) -> str:
    """EXTERNAL_CALL_ID is varchar(64) in Bitrix24: longer ids are hashed, not cut (no collisions)."""
    if len(pbx_call_id) <= 64:
        return pbx_call_id
    return "sha1:" + hashlib.sha1(pbx_call_id.encode(), usedforsecurity=False).hexdigest()


def user_params(call: Call, settings: Settings) -> dict[str, Any]:
    """USER_ID when known, else the extension as USER_PHONE_INNER, else the default user."""
    if call.user_id:
        return {"USER_ID": call.user_id}
    if call.extension:
        return {"USER_PHONE_INNER": call.extension}
    if settings.default_user_id:
        return {"USER_ID": settings.default_user_id}
    return {}


def register_params(call: Call, settings: Settings) -> dict[str, Any]:
    """telephony.externalCall.register parameters for a call the PBX reported."""
    outbound = call.direction == Direction.OUTBOUND.value
    number = call.to_number if outbound else call.from_number
    phone = phone_for_bitrix24(number)
    params: dict[str, Any] = {
        **user_params(call, settings),
        "PHONE_NUMBER": phone,
        "TYPE": TYPE_OUTBOUND if outbound else TYPE_INBOUND,
        "EXTERNAL_CALL_ID": external_call_id(call.pbx_call_id or ""),
        # no lead for a withheld number: it would be a lead nobody can call back
        "CRM_CREATE": 1 if settings.crm_create and phone != UNKNOWN_NUMBER else 0,
        # a call that already ended gets no pop-up card
        "SHOW": 0 if call.finish_reported else 1,
    }
    if call.started_at:
        params["CALL_START_DATE"] = call.started_at
    if call.line:
        params["LINE_NUMBER"] = call.line[:50]
    return params


def finish_params(call: Call, settings: Settings) -> dict[str, Any]:
    """telephony.externalCall.finish parameters."""
    status = call.status or ("answered" if (call.duration or 0) > 0 else "no-answer")
    params: dict[str, Any] = {
        "CALL_ID": call.b24_call_id,
        **user_params(call, settings),
        "DURATION": max(0, int(call.duration or 0)),
        "STATUS_CODE": STATUS_CODES.get(status, "OTHER"),
    }
    if status in ("failed", "unavailable", "congestion"):
        params["FAILED_REASON"] = status
    if call.recording_url:
        params["RECORD_URL"] = call.recording_url
    return params


def side_rules(call: Call, settings: Settings, overrides: dict[str, Any]) -> SideRules:
    """How channels and speakers map to sides for this call (settings, then the callback URL)."""
    return SideRules(
        direction=Direction(call.direction or Direction.INBOUND.value),
        channel0=Role(overrides.get("channel0", settings.channel0.value)),
        first_speaker=Role(overrides.get("first_speaker", settings.first_speaker.value)),
    )


def _segments(rows: list[Any]) -> list[Segment]:
    return [
        Segment(start, end, text, channel, speaker, Side(side) if side else None, bool(glue))
        for start, end, text, channel, speaker, side, glue in rows
    ]


def current_parts(parts: list[TranscriptPart]) -> list[TranscriptPart]:
    """The parts that make up the call's transcript now: the newest whole transcript, or the newest
    part per channel received after it (one file per channel, `?channel=0|1`)."""
    slots: dict[int | None, TranscriptPart] = {}
    for part in sorted(parts, key=lambda p: p.id):
        if part.status != "completed":
            continue
        if part.channel_slot is None:
            slots = {}
        slots[part.channel_slot] = part
    return list(slots.values())


def build_attach(call: Call, parts: list[TranscriptPart], settings: Settings) -> dict[str, Any] | None:
    """The attachTranscription params for the call's whole transcript, or None if there is none."""
    chosen = current_parts(parts)
    if not chosen or call.b24_call_id is None:
        return None
    granularity = "word" if all(p.granularity == "word" for p in chosen) else "segment"
    segments: list[Segment] = []
    for part in chosen:
        segments.extend(_segments(part.segments or []))
    cost = sum(p.cost or 0.0 for p in chosen) or None
    currency = next((p.cost_currency for p in chosen if p.cost_currency), None)
    transcript = Transcript(segments=segments, granularity=granularity, cost=cost, cost_currency=currency)  # type: ignore[arg-type]
    return attach_params(call.b24_call_id, transcript, side_rules(call, settings, chosen[-1].side_overrides or {}))


def transcript_digest(params: dict[str, Any]) -> str:
    """The ledger key: sha256 of the exact request (a byte-identical transcript is never resent)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Deliverer:
    """Runs claimed jobs against their portals (or records them, in dry-run)."""

    db: Database
    settings: Settings
    clients: dict[str, Bitrix24Client]
    http: requests.Session
    # when this worker's heartbeat was last written (its own clock); 0: unknown (see `_lease_holds`)
    beat_at: float = 0.0
    # what the thread running a batch has gathered: outcomes not yet recorded, the batch's calls,
    # requests sent for its current job, portals whose requests stalled (one per worker thread)
    _local: threading.local = field(default_factory=threading.local, init=False, repr=False)
    # the calls claims read in their own transaction (`prepare`), by job id, until the job runs
    _prepared: dict[int, Call] = field(default_factory=dict, init=False, repr=False)
    _prepared_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _group: GroupCommit = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._group = GroupCommit(self._write_each_if_needed)

    @classmethod
    def from_settings(cls, db: Database, settings: Settings) -> Deliverer:
        """A deliverer with a client per configured portal (none in dry-run)."""
        http = requests.Session()  # vendor fetches
        # a client per portal, each with a keep-alive pool of as many connections as the portal has
        # requests in flight at most (its B24SCRIBE_PORTAL_CONCURRENCY slots)
        pool = max(1, min(settings.portal_concurrency, settings.worker_senders))
        clients = {
            portal: Bitrix24Client(url, settings.bitrix24_timeout, pool_size=pool)
            for portal, url in settings.portal_urls().items()
        }
        return cls(db, settings, clients, http)

    @property
    def dry_run(self) -> bool:
        """Nothing is sent: no portal is configured."""
        return not self.clients

    @property
    def group_commits(self) -> int:
        """How many transactions the outcomes recorded so far took (several outcomes may share one)."""
        return self._group.groups

    @property
    def pace(self) -> Pace:
        """The pacing every portal gets, from the settings."""
        return pace_from(self.settings)

    def prepare(self, session: Session, claims: Sequence[Claim]) -> None:
        """Read the claims' calls in the claim's own transaction (one query, no transaction of its
        own); each job finds its call there when it runs. Only the calls leave the session: the
        claim's other changes (its pacing rows) are still to be committed."""
        ids = sorted({claim.call_id for claim in claims if claim.call_id is not None})
        if not ids:
            return
        calls = {call.id: call for call in session.scalars(select(Call).where(Call.id.in_(ids)))}
        for call in calls.values():
            session.expunge(call)
        with self._prepared_lock:
            self._prepared.update((claim.job_id, calls[claim.call_id]) for claim in claims if claim.call_id in calls)

    def forget(self, claims: Sequence[Claim]) -> None:
        """Drop what `prepare` read for claims that will not run here."""
        with self._prepared_lock:
            for claim in claims:
                self._prepared.pop(claim.job_id, None)

    def run(self, claim: Claim) -> None:
        """Execute one claimed job and record its outcome."""
        self.run_batch([claim])

    def run_batch(self, claims: Sequence[Claim]) -> None:
        """Execute claimed jobs one after another and record their outcomes together: before any
        request goes out (what is done is durable before we wait on a portal) and at the end, in
        one transaction each."""
        local = self._local
        local.outcomes, local.stalled = [], {}
        local.calls = self._calls(claims)
        try:
            for claim in claims:
                self._run_one(claim)
            self._flush()
        finally:
            local.outcomes, local.calls, local.stalled = [], {}, {}

    def _run_one(self, claim: Claim) -> None:
        structlog.contextvars.bind_contextvars(job_id=claim.job_id, job_kind=claim.kind)
        self._local.sent = 0
        try:
            {"register": self._register, "finish": self._finish, "attach": self._attach, "fetch": self._fetch}[
                claim.kind
            ](claim)
        except LeaseLost:
            log.warning("lease lost; another worker owns the job now")
        except Exception as error:
            if database_unavailable(error):
                raise  # not the job's failure: the worker backs off; the lease brings the job back
            # Whatever went wrong is this job's failure: an attempt, the retry schedule, then dead.
            log.exception("job failed unexpectedly", error_type=type(error).__name__)
            self._fail_unexpectedly(claim, error)
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "job_kind", "call_id")

    def _fail_unexpectedly(self, claim: Claim, error: BaseException) -> None:
        """Drop what the job had queued and record the failure instead."""
        self._local.outcomes = [o for o in self._local.outcomes if o.claim.job_id != claim.job_id]
        self._local.outcomes.append(
            self._failure(claim, f"unexpected {type(error).__name__} while handling the job: {error}")
        )

    def _failure(self, claim: Claim, reason: str) -> _Outcome:
        """The outcome of a job that failed unexpectedly: an attempt spent, retried on the schedule."""
        reason, schedule = reason[:MAX_REASON], self.settings.retry_schedule
        return _Outcome(claim, lambda s, j: outbox.retry_later(s, j, reason, time.time(), schedule=schedule), None)

    # -- plumbing ---------------------------------------------------------------------------

    def _record(
        self, claim: Claim, apply: Callable[[Session, Job], None], on_lost: Callable[[Session], None] | None = None
    ) -> None:
        """Queue the job's outcome; it is written with the batch's next flush, if the lease is
        still ours then (else `on_lost` runs instead: facts that must be kept regardless)."""
        self._local.outcomes.append(_Outcome(claim, apply, on_lost))

    def _flush(self) -> None:
        outcomes: list[_Outcome] = self._local.outcomes
        stalled: dict[str, int] = self._local.stalled
        if not outcomes and not stalled:
            return
        self._local.outcomes, self._local.stalled = [], {}
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
            calls_query = select(Call).where(Call.id.in_(call_ids)).order_by(Call.id)
            if not self.db.is_sqlite:
                calls_query = calls_query.with_for_update()
            calls = session.scalars(calls_query).all() if call_ids else []
            for outcome in outcomes:
                job = jobs.get(outcome.claim.job_id)
                if job is None or job.state != "leased":
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

    def _calls(self, claims: Sequence[Claim]) -> dict[int, Call]:
        """The batch's calls: those its claims read (`prepare`), the others read once here (a batch
        holds at most one job per call)."""
        calls: dict[int, Call] = {}
        with self._prepared_lock:
            for claim in claims:
                call = self._prepared.pop(claim.job_id, None)
                if call is not None:
                    calls[call.id] = call
        ids = [claim.call_id for claim in claims if claim.call_id is not None and claim.call_id not in calls]
        if not ids:
            return calls
        with self.db.read() as session:
            calls.update((call.id, call) for call in session.scalars(select(Call).where(Call.id.in_(ids))))
            session.expunge_all()
        return calls

    def _load(self, claim: Claim) -> tuple[Claim, Call | None]:
        calls: dict[int, Call] = getattr(self._local, "calls", {})
        call = None
        if claim.call_id is not None:
            call = calls.get(claim.call_id)
            if call is None:  # a claim from outside a batch
                with self.db.read() as session:
                    call = session.get(Call, claim.call_id)
                    session.expunge_all()
        structlog.contextvars.bind_contextvars(call_id=claim.call_id)
        return claim, call

    def _send(self, claim: Claim, method: str, params: dict[str, Any]) -> Response | None:
        """Send to the job's portal, or in dry-run return None (the caller records the request)."""
        if self.dry_run:
            return None
        client = self.clients.get(claim.portal or "")
        if client is None:
            raise PermanentError(f"portal {claim.portal!r} is not configured (B24SCRIBE_BITRIX24_PORTALS)")
        self._flush()  # what the batch has done so far is recorded before we wait on a portal
        if claim.portal is not None and getattr(self._local, "sent", 0) > 0:
            self._wait_for_token(claim.portal)  # the claim paid for the first request only
        if not self._lease_holds(claim):
            raise LeaseLost()
        self._local.sent = getattr(self._local, "sent", 0) + 1
        started = time.monotonic()
        try:
            with metrics.bitrix24_request(method):
                return client.call(method, params)
        finally:
            if claim.portal is not None and time.monotonic() - started > self.pace.stall_seconds:
                self._local.stalled[claim.portal] = 1

    def _lease_holds(self, claim: Claim) -> bool:
        """Fencing, fails closed: send only while our lease has a margin left, so a worker that
        stalled past its lease cannot send behind the back of the job's next owner (whose look-up
        then comes at least the margin after our request).

        Without a read when the claim itself proves it: a lease is only taken back once it has
        expired or once its worker's heartbeat is B24SCRIBE_WORKER_DEAD_AFTER_SECONDS old, so a
        claim younger than its lease less the margin, by a worker that beat within half the dead-
        after time, still holds (workers' clocks may differ by up to that half). Anything older,
        or a worker whose beats lag, asks the database."""
        margin = min(self.settings.lease_seconds / 3, self.settings.bitrix24_timeout)
        now = time.time()
        if (
            claim.claimed_at <= now < claim.claimed_at + self.settings.lease_seconds - margin
            and 0.0 <= now - self.beat_at < self.settings.worker_dead_after_seconds / 2
        ):
            return True
        with self.db.read() as session:
            expires = session.scalar(
                select(Job.lease_expires_at).where(
                    Job.id == claim.job_id, Job.state == "leased", Job.lease_owner == claim.owner
                )
            )
        return expires is not None and expires - time.time() > margin

    def _wait_for_token(self, portal: str) -> None:
        pace = self.pace
        deadline = time.monotonic() + 2.0 / pace.rate_per_second
        while True:
            with self.db.write() as session:
                wait = ratelimit.take_followup_token(session, portal, time.time(), pace)
            if wait is None or time.monotonic() >= deadline:
                return
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))

    def _fail(self, claim: Claim, error: Bitrix24Error, note: str = "") -> None:
        """Map a Bitrix24 error to what the outbox does with the job."""
        now = time.time()
        message = f"{error.code + ': ' if error.code else ''}{error.description}{note}"
        log.info("bitrix24 error", status=error.status, code=error.code, retryable=error.retryable)

        def apply(session: Session, job: Job) -> None:
            if isinstance(error, ThrottledError):
                until = now + ratelimit.THROTTLE_PAUSE_SECONDS
                if claim.portal:
                    ratelimit.pause(session, claim.portal, until, "QUERY_LIMIT_EXCEEDED", now)
                outbox.defer(session, job, until, message, now)
            elif isinstance(error, OperationLimitError):
                if claim.portal:
                    ratelimit.pause(session, claim.portal, error.reset_at, "OPERATION_TIME_LIMIT", now)
                outbox.defer(session, job, error.reset_at, message, now)
            elif error.retryable:
                outbox.retry_later(
                    session,
                    job,
                    message,
                    now,
                    ambiguous=isinstance(error, AmbiguousError),
                    schedule=self.settings.retry_schedule,
                )
            else:
                outbox.kill(session, job, message, now)
                if job.call_id:
                    session.get_one(Call, job.call_id).last_error = message

        self._record(claim, apply)

    # -- register ---------------------------------------------------------------------------

    def _register(self, claim: Claim) -> None:
        _, call = self._load(claim)
        assert call is not None
        if call.stage != "new":
            self._record(claim, lambda s, j: outbox.complete(s, j, {"skipped": "already registered"}, time.time()))
            return
        params = register_params(call, self.settings)
        if "USER_ID" not in params and "USER_PHONE_INNER" not in params:
            reason = "no Bitrix24 user for this call: the PBX sent no extension; set B24SCRIBE_DEFAULT_USER_ID"
            self._record(claim, lambda s, j: outbox.kill(s, j, reason, time.time()))
            return
        try:
            response = self._send(claim, "telephony.externalCall.register", params)
        except Bitrix24Error as error:
            if is_unknown_user(error) and "USER_PHONE_INNER" in params and self.settings.default_user_id:
                self._fallback_to_default_user(claim, call.id, error)
                return
            self._fail(claim, error)
            return
        b24_call_id = f"dry-run.{call.id}" if response is None else str(response.result["CALL_ID"])

        def apply(session: Session, job: Job) -> None:
            now = time.time()
            row = session.get_one(Call, call.id)
            row.b24_call_id, row.stage, row.registered_at, row.last_error = b24_call_id, "registered", now, None
            job.request = {"method": "telephony.externalCall.register", "params": params}
            outbox.complete(session, job, {"CALL_ID": b24_call_id, "dry_run": response is None}, now)
            outbox.release_waiting(session, call.id, "finish", now)

        self._record(claim, apply)

    def _fallback_to_default_user(self, claim: Claim, call_id: int, error: Bitrix24Error) -> None:
        default_user = self.settings.default_user_id

        def apply(session: Session, job: Job) -> None:
            now = time.time()
            row = session.get_one(Call, call_id)
            row.user_id = default_user
            row.note = f"extension {row.extension!r} matches no Bitrix24 user; used B24SCRIBE_DEFAULT_USER_ID"
            outbox.defer(session, job, now, error.description, now)

        self._record(claim, apply)

    # -- finish -----------------------------------------------------------------------------

    def _finish(self, claim: Claim) -> None:
        _, call = self._load(claim)
        assert call is not None
        if call.stage == "finished":
            self._record(claim, lambda s, j: outbox.complete(s, j, {"skipped": "already finished"}, time.time()))
            return
        if call.stage != "registered":
            self._record(claim, lambda s, j: outbox.wait_for_call(s, j, "waiting for register", time.time()))
            return
        params = finish_params(call, self.settings)
        try:
            response = self._send(claim, "telephony.externalCall.finish", params)
        except Bitrix24Error as error:
            if is_finish_call_not_found(error) and call.b24_call_id:
                self._finish_not_found(claim, call, error)
                return
            self._fail(claim, error)
            return
        self._mark_finished(claim, call.id, params, None if response is None else response.result)

    def _mark_finished(self, claim: Claim, call_id: int, params: dict[str, Any], result: Any) -> None:
        def apply(session: Session, job: Job) -> None:
            now = time.time()
            row = session.get_one(Call, call_id)
            row.stage, row.finished_at, row.last_error = "finished", now, None
            job.request = {"method": "telephony.externalCall.finish", "params": params}
            summary: dict[str, object] = (
                {"ID": result.get("ID")} if isinstance(result, dict) else {"dry_run": result is None}
            )
            outbox.complete(session, job, summary, now)
            outbox.release_waiting(session, call_id, "attach", now)
            outbox.revive_orphans(session, call_id)

        self._record(claim, apply)

    def _finish_not_found(self, claim: Claim, call: Call, error: Bitrix24Error) -> None:
        """finish is not idempotent: after "Call is not found" look whether it was finished already."""
        try:
            rows = self._statistics(claim, call.b24_call_id or "")
        except PermanentError:
            rows = None  # the portal denies voximplant.statistic.get
        except Bitrix24Error as lookup_error:
            self._fail(claim, lookup_error, " (while checking whether the call was already finished)")
            return
        if rows or (rows is None and claim.ambiguous):
            # Our earlier attempt landed (or, unverifiable, most likely did after a lost answer).
            self._mark_finished(claim, call.id, finish_params(call, self.settings), rows[0] if rows else {})
            return

        def apply(session: Session, job: Job) -> None:
            # The registration is gone (finished by someone else's 30-day cleanup, or never made):
            # register again and finish that, rather than lose the call.
            now = time.time()
            row = session.get_one(Call, call.id)
            row.stage, row.b24_call_id = "new", None
            row.last_error = f"{error.description}: registering the call again"
            outbox.enqueue(session, "register", call_id=call.id, portal=call.portal, now=now)
            outbox.wait_for_call(session, job, "waiting for register", now)

        self._record(claim, apply)

    def _statistics(self, claim: Claim, b24_call_id: str) -> list[dict[str, Any]]:
        response = self._send(claim, "voximplant.statistic.get", {"FILTER": {"CALL_ID": b24_call_id}})
        result = response.result if response else []
        return [row for row in result if isinstance(row, dict)] if isinstance(result, list) else []

    # -- attach -----------------------------------------------------------------------------

    def _attach(self, claim: Claim) -> None:
        _, call = self._load(claim)
        assert call is not None
        if call.stage != "finished":
            self._record(claim, lambda s, j: outbox.wait_for_call(s, j, "waiting for the call to finish", time.time()))
            return
        with self.db.read() as session:
            parts = list(session.scalars(select(TranscriptPart).where(TranscriptPart.call_id == call.id)))
            session.expunge_all()
            params = build_attach(call, parts, self.settings)
            attached = self._attached_ids(session, call)
        if any(part.segments is None for part in current_parts(parts)):
            # A part's text went with retention: sending the rest would replace the whole
            # transcript on the card with a partial one. Fails closed; the card keeps what it has.
            reason = (
                "a part of this call's transcript was purged after B24SCRIBE_RETENTION_DAYS; "
                "sending the rest would replace the transcript in Bitrix24 with a partial one"
            )
            self._record(claim, lambda s, j: outbox.kill(s, j, reason, time.time()))
            return
        if params is None:
            self._record(claim, lambda s, j: outbox.complete(s, j, {"skipped": "no completed transcript"}, time.time()))
            return
        digest = transcript_digest(params)
        if digest in attached:
            self._mark_attached(claim, call, parts, params, digest, attached[digest], False)
            return
        if not params["MESSAGES"]:
            self._mark_attached(claim, call, parts, params, digest, None, False, note="no speech: nothing to attach")
            return
        possible_duplicate = False
        if claim.ambiguous and not self.dry_run:
            try:
                rows = self._statistics(claim, call.b24_call_id or "")
                landed = next((r.get("TRANSCRIPT_ID") for r in rows if r.get("TRANSCRIPT_ID")), None)
                if landed and int(landed) not in set(attached.values()):
                    self._mark_attached(claim, call, parts, params, digest, int(landed), False)
                    return
            except PermanentError:
                possible_duplicate = True  # the portal denies the lookup: resend and say so
            except Bitrix24Error as error:
                self._fail(claim, error, " (while checking whether the transcript already landed)")
                return
        try:
            response = self._send(claim, "telephony.call.attachTranscription", params)
        except Bitrix24Error as error:
            self._fail(claim, error)
            return
        transcript_id = None if response is None else int(response.result["TRANSCRIPT_ID"])
        self._mark_attached(
            claim, call, parts, params, digest, transcript_id, possible_duplicate, dry_run=response is None
        )

    def _attached_ids(self, session: Session, call: Call) -> dict[str, int | None]:
        rows = session.execute(
            select(AttachLedger.sha256, AttachLedger.b24_transcript_id).where(
                AttachLedger.portal == call.portal, AttachLedger.b24_call_id == call.b24_call_id
            )
        ).all()
        return {sha: transcript_id for sha, transcript_id in rows}

    def _mark_attached(
        self,
        claim: Claim,
        call: Call,
        parts: list[TranscriptPart],
        params: dict[str, Any],
        digest: str,
        transcript_id: int | None,
        possible_duplicate: bool,
        dry_run: bool = False,
        note: str | None = None,
    ) -> None:
        chosen_ids = [p.id for p in current_parts(parts)]
        ledger_values = {
            "portal": call.portal,
            "b24_call_id": call.b24_call_id,
            "sha256": digest,
            "b24_transcript_id": transcript_id,
            "possible_duplicate": possible_duplicate,
            "attached_at": time.time(),
        }

        def apply(session: Session, job: Job) -> None:
            now = time.time()
            if not dry_run and note is None:
                _insert_ledger(session, ledger_values)
            session.execute(
                update(TranscriptPart)
                .where(TranscriptPart.id.in_(chosen_ids))
                .values(
                    delivery_state="empty" if note else "dry-run" if dry_run else "delivered",
                    b24_transcript_id=transcript_id,
                    delivered_at=now,
                )
            )
            job.request = {"method": "telephony.call.attachTranscription", "params": params}
            result: dict[str, Any] = {"TRANSCRIPT_ID": transcript_id, "dry_run": dry_run}
            if possible_duplicate:
                result["possible_duplicate"] = True
            if note:
                result["note"] = note
            outbox.complete(session, job, result, now)

        def keep_the_fact(session: Session) -> None:
            # the lease is lost but the transcript landed: keep the fact, or a re-run would attach again
            if transcript_id is not None and not dry_run:
                _insert_ledger(session, ledger_values)

        self._record(claim, apply, on_lost=keep_the_fact)

    # -- fetch ------------------------------------------------------------------------------

    def _fetch(self, claim: Claim) -> None:
        _, call = self._load(claim)
        with self.db.read() as session:
            part = session.get_one(TranscriptPart, claim.transcript_id)
            # the callback URL's options (?channel=, ?speaker_channels_count=, …) apply to the fetch too
            callback_query = dict(session.get_one(InboundEvent, part.event_id).query or {})
            session.expunge_all()
        vendor = STT_VENDORS[part.vendor]
        assert vendor.fetch is not None and part.vendor_job_id
        base = (self.settings.vendor_setting(vendor.name, "API_URL") or vendor.fetch.default_api_url).rstrip("/")
        api_key = self.settings.vendor_setting(vendor.name, "API_KEY")
        if not api_key:
            self._fetch_failed(claim, f"B24SCRIBE_{vendor.name.upper()}_API_KEY is not set", retry=False)
            return
        # Only the configured API host is ever fetched; the id from the payload is one path segment.
        url = base + vendor.fetch.path.format(id=quote(part.vendor_job_id, safe=""))
        try:
            answer = self.http.get(url, headers=vendor.fetch.headers(api_key), timeout=self.settings.bitrix24_timeout)
        except requests.RequestException as exc:
            self._fetch_failed(claim, f"{vendor.name} API unreachable: {type(exc).__name__}", retry=True)
            return
        if answer.status_code >= 500 or answer.status_code == 429:
            self._fetch_failed(claim, f"{vendor.name} API answered HTTP {answer.status_code}", retry=True)
            return
        if answer.status_code != 200:
            self._fetch_failed(claim, f"{vendor.name} API answered HTTP {answer.status_code}", retry=False)
            return
        try:
            result = vendor.fetch.parse(answer.content, callback_query)
        except ValidationError as exc:
            self._fetch_failed(
                claim, f"{vendor.name} transcript unreadable: {sorted(_field_paths(exc.messages))}", retry=False
            )
            return

        def apply(session: Session, job: Job) -> None:
            now = time.time()
            row = session.get_one(TranscriptPart, part.id)
            if result.status == "completed" and result.transcript is not None:
                row.status, row.granularity = "completed", result.transcript.granularity
                row.segments = serialize_segments(result.transcript.segments)
                row.cost, row.cost_currency = result.transcript.cost, result.transcript.cost_currency
                if job.call_id:
                    queue_attach(session, session.get_one(Call, job.call_id), job.event_id, now)
            else:
                row.status, row.delivery_state = "failed", "failed"
                row.failure_reason = result.failure_reason or "the vendor reported no transcript"
            outbox.complete(session, job, {"status": row.status}, now)

        self._record(claim, apply)

    def _fetch_failed(self, claim: Claim, reason: str, retry: bool) -> None:
        def apply(session: Session, job: Job) -> None:
            now = time.time()
            if retry:
                outbox.retry_later(session, job, reason, now, schedule=self.settings.retry_schedule)
            else:
                outbox.kill(session, job, reason, now)
            if job.state == "dead" and job.transcript_id:
                part = session.get_one(TranscriptPart, job.transcript_id)
                part.failure_reason = reason

        self._record(claim, apply)


def _field_paths(messages: Any, prefix: str = "") -> set[str]:
    if isinstance(messages, dict):
        paths: set[str] = set()
        for key, value in messages.items():
            paths |= _field_paths(value, f"{prefix}.{key}" if prefix else str(key))
        return paths
    return {prefix or "_schema"}


def _insert_ledger(session: Session, values: dict[str, Any]) -> None:
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    session.execute(
        insert(AttachLedger).values(**values).on_conflict_do_nothing(index_elements=["portal", "b24_call_id", "sha256"])
    )

"""Executing outbox jobs: register → finish → attachTranscription per call, and vendor fetches.

Each executor reads what it needs, sends at most one request, and records the outcome in one
transaction that also checks the lease is still ours.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
import structlog
from marshmallow import ValidationError
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
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


class LeaseLost(Exception):
    """Our lease expired and the job was reclaimed; the outcome is not ours to record."""


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
    # requests sent so far for the job each claim owner (one per worker thread) is running
    _sent: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_settings(cls, db: Database, settings: Settings) -> Deliverer:
        """A deliverer with a client per configured portal (none in dry-run)."""
        http = requests.Session()
        clients = {
            portal: Bitrix24Client(url, settings.bitrix24_timeout, http)
            for portal, url in settings.portal_urls().items()
        }
        return cls(db, settings, clients, http)

    @property
    def dry_run(self) -> bool:
        """Nothing is sent: no portal is configured."""
        return not self.clients

    def run(self, claim: Claim) -> None:
        """Execute one claimed job and record its outcome."""
        structlog.contextvars.bind_contextvars(job_id=claim.job_id, job_kind=claim.kind)
        self._sent[claim.owner] = 0
        try:
            {"register": self._register, "finish": self._finish, "attach": self._attach, "fetch": self._fetch}[
                claim.kind
            ](claim)
        except LeaseLost:
            log.warning("lease lost; another worker owns the job now")
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "job_kind")

    # -- plumbing ---------------------------------------------------------------------------

    def _record(self, claim: Claim, apply: Callable[[Session, Job], None]) -> None:
        now = time.time()
        with self.db.write() as session:
            job = outbox.leased_job(session, claim)
            if job is None:
                raise LeaseLost()
            apply(session, job)
            job.updated_at = now
        metrics.job_ran(claim.kind, job.state)

    def _load(self, claim: Claim) -> tuple[Job, Call | None]:
        with self.db.read() as session:
            job = session.get_one(Job, claim.job_id)
            call = session.get(Call, job.call_id) if job.call_id else None
            session.expunge_all()
        structlog.contextvars.bind_contextvars(call_id=job.call_id)
        return job, call

    def _send(self, claim: Claim, method: str, params: dict[str, Any]) -> Response | None:
        """Send to the job's portal, or in dry-run return None (the caller records the request)."""
        if self.dry_run:
            return None
        client = self.clients.get(claim.portal or "")
        if client is None:
            raise PermanentError(f"portal {claim.portal!r} is not configured (B24SCRIBE_BITRIX24_PORTALS)")
        if claim.portal is not None and self._sent.get(claim.owner, 0) > 0:
            self._wait_for_token(claim.portal)  # the claim paid for the first request only
        if not self._lease_holds(claim):
            raise LeaseLost()
        self._sent[claim.owner] = self._sent.get(claim.owner, 0) + 1
        with metrics.bitrix24_request(method):
            return client.call(method, params)

    def _lease_holds(self, claim: Claim) -> bool:
        """Fencing, fails closed: send only while our lease has a margin left, so a worker that
        stalled past its lease cannot send behind the back of the job's next owner (whose look-up
        then comes at least the margin after our request)."""
        with self.db.read() as session:
            expires = session.scalar(
                select(Job.lease_expires_at).where(
                    Job.id == claim.job_id, Job.state == "leased", Job.lease_owner == claim.owner
                )
            )
        margin = min(self.settings.lease_seconds / 3, self.settings.bitrix24_timeout)
        return expires is not None and expires - time.time() > margin

    def _wait_for_token(self, portal: str) -> None:
        pace = Pace(self.settings.rate_per_second, self.settings.rate_burst, self.settings.lease_seconds)
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
                outbox.defer(session, job, claim, until, message, now)
            elif isinstance(error, OperationLimitError):
                if claim.portal:
                    ratelimit.pause(session, claim.portal, error.reset_at, "OPERATION_TIME_LIMIT", now)
                outbox.defer(session, job, claim, error.reset_at, message, now)
            elif error.retryable:
                outbox.retry_later(
                    session,
                    job,
                    claim,
                    message,
                    now,
                    ambiguous=isinstance(error, AmbiguousError),
                    schedule=self.settings.retry_schedule,
                )
            else:
                outbox.kill(session, job, claim, message, now)
                if job.call_id:
                    session.get_one(Call, job.call_id).last_error = message

        self._record(claim, apply)

    # -- register ---------------------------------------------------------------------------

    def _register(self, claim: Claim) -> None:
        job, call = self._load(claim)
        assert call is not None
        if call.stage != "new":
            self._record(
                claim, lambda s, j: outbox.complete(s, j, claim, {"skipped": "already registered"}, time.time())
            )
            return
        params = register_params(call, self.settings)
        if "USER_ID" not in params and "USER_PHONE_INNER" not in params:
            reason = "no Bitrix24 user for this call: the PBX sent no extension; set B24SCRIBE_DEFAULT_USER_ID"
            self._record(claim, lambda s, j: outbox.kill(s, j, claim, reason, time.time()))
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
            outbox.complete(session, job, claim, {"CALL_ID": b24_call_id, "dry_run": response is None}, now)
            outbox.release_waiting(session, call.id, "finish", now)

        self._record(claim, apply)

    def _fallback_to_default_user(self, claim: Claim, call_id: int, error: Bitrix24Error) -> None:
        default_user = self.settings.default_user_id

        def apply(session: Session, job: Job) -> None:
            now = time.time()
            row = session.get_one(Call, call_id)
            row.user_id = default_user
            row.note = f"extension {row.extension!r} matches no Bitrix24 user; used B24SCRIBE_DEFAULT_USER_ID"
            outbox.defer(session, job, claim, now, error.description, now)

        self._record(claim, apply)

    # -- finish -----------------------------------------------------------------------------

    def _finish(self, claim: Claim) -> None:
        job, call = self._load(claim)
        assert call is not None
        if call.stage == "finished":
            self._record(claim, lambda s, j: outbox.complete(s, j, claim, {"skipped": "already finished"}, time.time()))
            return
        if call.stage != "registered":
            self._record(claim, lambda s, j: outbox.wait_for_call(s, j, claim, "waiting for register", time.time()))
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
            outbox.complete(session, job, claim, summary, now)
            outbox.release_waiting(session, call_id, "attach", now)
            _revive_orphans(session, call_id, now)

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
            outbox.wait_for_call(session, job, claim, "waiting for register", now)

        self._record(claim, apply)

    def _statistics(self, claim: Claim, b24_call_id: str) -> list[dict[str, Any]]:
        response = self._send(claim, "voximplant.statistic.get", {"FILTER": {"CALL_ID": b24_call_id}})
        result = response.result if response else []
        return [row for row in result if isinstance(row, dict)] if isinstance(result, list) else []

    # -- attach -----------------------------------------------------------------------------

    def _attach(self, claim: Claim) -> None:
        job, call = self._load(claim)
        assert call is not None
        if call.stage != "finished":
            self._record(
                claim, lambda s, j: outbox.wait_for_call(s, j, claim, "waiting for the call to finish", time.time())
            )
            return
        with self.db.read() as session:
            parts = list(session.scalars(select(TranscriptPart).where(TranscriptPart.call_id == call.id)))
            session.expunge_all()
            params = build_attach(call, parts, self.settings)
            attached = self._attached_ids(session, call)
        if params is None:
            self._record(
                claim, lambda s, j: outbox.complete(s, j, claim, {"skipped": "no completed transcript"}, time.time())
            )
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
            outbox.complete(session, job, claim, result, now)

        try:
            self._record(claim, apply)
        except LeaseLost:
            if transcript_id is not None and not dry_run:
                with self.db.write() as session:  # keep the fact, or a re-run would attach again
                    _insert_ledger(session, ledger_values)
            raise

    # -- fetch ------------------------------------------------------------------------------

    def _fetch(self, claim: Claim) -> None:
        job, call = self._load(claim)
        with self.db.read() as session:
            part = session.get_one(TranscriptPart, job.transcript_id)
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
            outbox.complete(session, job, claim, {"status": row.status}, now)

        self._record(claim, apply)

    def _fetch_failed(self, claim: Claim, reason: str, retry: bool) -> None:
        def apply(session: Session, job: Job) -> None:
            now = time.time()
            if retry:
                outbox.retry_later(session, job, claim, reason, now, schedule=self.settings.retry_schedule)
            else:
                outbox.kill(session, job, claim, reason, now)
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


def _revive_orphans(session: Session, call_id: int, now: float) -> None:
    """Attach jobs given up as orphans come back when their call finally finishes."""
    session.execute(
        update(Job)
        .where(Job.call_id == call_id, Job.kind == "attach", Job.state == "dead", Job.last_error.like("orphan:%"))
        .values(state="pending", attempts=0, next_attempt_at=now, updated_at=now, last_error=None)
    )

"""The deliverer: runs claimed jobs, one batch per thread, and records their outcomes together.

Claimed jobs come in batches that already carry what the claim read (kind, call, transcript, and
the call row itself, read in the claim's transaction by `Deliverer.prepare`); each job goes to its
step (`steps.Steps` for Bitrix24, `fetches.VendorFetches` for a vendor's API), which reads what
else it needs and sends at most one request (plus the look-up before a resend). Failure policy: a
job's failure is the job's — any exception while handling or recording it (a bug, a transcript that
cannot be translated, a surprise answer) spends an attempt and follows the retry schedule to dead,
with the reason; only a lost database is nobody's failure (the worker backs off, the lease returns
the job).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import requests
import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from b24scribe.bitrix24 import Bitrix24Client
from b24scribe.db import Database
from b24scribe.delivery.fetches import VendorFetches
from b24scribe.delivery.recording import Recorder, database_unavailable
from b24scribe.delivery.sender import LeaseLost, PortalSender, clients_from, pace_from
from b24scribe.delivery.steps import Steps
from b24scribe.delivery.transcribe import Transcriptions
from b24scribe.models import Call, JobKind
from b24scribe.outbox import Claim
from b24scribe.ratelimit import Pace
from b24scribe.settings import Settings
from b24scribe.sources import Sources

log = structlog.get_logger(__name__)
_CALLS = select(Call).where(Call.id.in_(bindparam("b_ids", expanding=True)))


class Deliverer:
    """Runs claimed jobs against their portals (or records them, in dry-run)."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        sources: Sources,
        clients: dict[str, Bitrix24Client],
        http: requests.Session,
    ) -> None:
        self.db = db
        self.settings = settings
        self.sources = sources
        self.recorder = Recorder(db, pace_from(settings), settings.retry_schedule)
        self.sender = PortalSender(db, settings, clients, self.recorder)
        self.steps = Steps(db, settings, self.sender, self.recorder, sources, http)
        self.fetches = VendorFetches(db, settings, sources, http, self.recorder)
        self.transcriptions = Transcriptions(db, settings, sources, http, self.recorder)
        self._run: dict[str, Callable[[Claim, Call | None], None]] = {
            JobKind.REGISTER: self._register,
            JobKind.FINISH: self._finish,
            JobKind.ATTACH: self._attach,
            JobKind.FETCH: self._fetch,
            JobKind.RECORD: self._attach_record,
            JobKind.TRANSCRIBE: self._transcribe,
        }
        # the calls claims read in their own transaction (`prepare`), by job id, until the job runs
        self._prepared: dict[int, Call] = {}
        self._prepared_lock = threading.Lock()

    @classmethod
    def from_settings(cls, db: Database, settings: Settings, sources: Sources) -> Deliverer:
        """A deliverer with a client per configured portal (none in dry-run)."""
        return cls(db, settings, sources, clients_from(settings), requests.Session())  # the session: vendor fetches

    @property
    def dry_run(self) -> bool:
        """Nothing is sent: no portal is configured (the sender decides, see `PortalSender.dry_run`)."""
        return self.sender.dry_run

    @property
    def beat_at(self) -> float:
        """When this worker's heartbeat was last written (its own clock); 0: unknown (lease fencing)."""
        return self.sender.beat_at

    @beat_at.setter
    def beat_at(self, value: float) -> None:
        self.sender.beat_at = value

    @property
    def group_commits(self) -> int:
        """How many transactions the outcomes recorded so far took (several outcomes may share one)."""
        return self.recorder.group_commits

    @property
    def pace(self) -> Pace:
        """The pacing every portal gets, from the settings."""
        return self.sender.pace

    def prepare(self, session: Session, claims: Sequence[Claim]) -> None:
        """Read the claims' calls in the claim's own transaction (one query, no transaction of its
        own); each job finds its call there when it runs. Only the calls leave the session: the
        claim's other changes (its pacing rows) are still to be committed."""
        ids = sorted({claim.call_id for claim in claims if claim.call_id is not None})
        if not ids:
            return
        calls = {call.id: call for call in session.scalars(_CALLS, {"b_ids": ids})}
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
        self.recorder.begin(self._calls(claims))
        try:
            for claim in claims:
                self._run_one(claim)
            self.recorder.flush()
        finally:
            self.recorder.end()

    def _run_one(self, claim: Claim) -> None:
        structlog.contextvars.bind_contextvars(job_id=claim.job_id, job_kind=claim.kind)
        self.recorder.batch.sent = 0
        try:
            self._run[claim.kind](claim, self._load(claim))
        except LeaseLost:
            log.warning("lease lost; another worker owns the job now")
        except Exception as error:
            if database_unavailable(error):
                raise  # not the job's failure: the worker backs off; the lease brings the job back
            # Whatever went wrong is this job's failure: an attempt, the retry schedule, then dead.
            log.exception("job failed unexpectedly", error_type=type(error).__name__)
            self.recorder.fail_unexpectedly(claim, error)
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "job_kind", "call_id")

    def _register(self, claim: Claim, call: Call | None) -> None:
        assert call is not None
        self.steps.register(claim, call)

    def _finish(self, claim: Claim, call: Call | None) -> None:
        assert call is not None
        self.steps.finish(claim, call)

    def _attach(self, claim: Claim, call: Call | None) -> None:
        assert call is not None
        self.steps.attach(claim, call)

    def _attach_record(self, claim: Claim, call: Call | None) -> None:
        assert call is not None
        self.steps.attach_record(claim, call)

    def _transcribe(self, claim: Claim, call: Call | None) -> None:
        assert call is not None
        self.transcriptions.transcribe(claim, call)

    def _fetch(self, claim: Claim, call: Call | None) -> None:
        self.fetches.fetch(claim)

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

    def _load(self, claim: Claim) -> Call | None:
        call = None
        if claim.call_id is not None:
            call = self.recorder.batch.calls.get(claim.call_id)
            if call is None:  # a claim from outside a batch
                with self.db.read() as session:
                    call = session.get(Call, claim.call_id)
                    session.expunge_all()
        structlog.contextvars.bind_contextvars(call_id=claim.call_id)
        return call

"""The worker process: claims due jobs, runs them, renews leases, sweeps, and stops gracefully."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from types import FrameType

import structlog
from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite

from b24scribe import inbox, metrics, outbox
from b24scribe.db import Database, affected_rows
from b24scribe.delivery import Deliverer
from b24scribe.models import Call, Job, WorkerHeartbeat
from b24scribe.outbox import Claim
from b24scribe.ratelimit import Pace
from b24scribe.settings import Settings

log = structlog.get_logger(__name__)

HOUSEKEEPING_SECONDS = 5.0
IDLE_SLEEP_SECONDS = 0.05


class Worker:
    """One worker process; `threads` claim loops share it (each holds at most one job)."""

    def __init__(self, db: Database, settings: Settings, threads: int = 1) -> None:
        self.db = db
        self.settings = settings
        self.threads = threads
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.pace = Pace(settings.rate_per_second, settings.rate_burst, settings.lease_seconds)
        self.deliverer = Deliverer.from_settings(db, settings)
        self.stopping = threading.Event()
        # The renewer outlives `stopping`: jobs still in flight after SIGTERM keep their leases.
        self._renewer_stop = threading.Event()
        self._held: dict[int, Claim] = {}
        self._held_lock = threading.Lock()
        self._last_housekeeping = 0.0

    # -- one step ---------------------------------------------------------------------------

    def claim(self) -> Claim | None:
        """Lease the next due job, if any."""
        owner = f"{self.worker_id}:{threading.get_ident()}"
        with self.db.write() as session:
            return outbox.claim_next(session, owner, self.pace, is_postgres=not self.db.is_sqlite)

    def run_once(self) -> bool:
        """Fold newly stored events, else claim and run one job; False when nothing was due."""
        if inbox.apply_pending(self.db, self.settings):
            return True
        claim = self.claim()
        if claim is None:
            return False
        with self._held_lock:
            self._held[claim.job_id] = claim
        try:
            self.deliverer.run(claim)
        except Exception:
            # The job keeps its lease and comes back when it expires; the loop goes on.
            log.exception("job failed unexpectedly")
        finally:
            with self._held_lock:
                self._held.pop(claim.job_id, None)
        return True

    def drain(self, timeout: float = 30.0) -> int:
        """Run jobs until none is due (tests and the CLI); returns how many ran."""
        ran, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline and self.run_once():
            ran += 1
        return ran

    def housekeeping(self, now: float | None = None) -> None:
        """Heartbeat, reclaim expired leases, report orphaned transcripts."""
        now = time.time() if now is None else now
        with self.db.write() as session:
            insert = postgresql.insert if not self.db.is_sqlite else sqlite.insert
            session.execute(
                insert(WorkerHeartbeat)
                .values(worker_id=self.worker_id, seen_at=now, started_at=now)
                .on_conflict_do_update(index_elements=["worker_id"], set_={"seen_at": now})
            )
            reclaimed = outbox.reclaim_expired(session, now)
            orphaned = affected_rows(
                session.execute(
                    update(Job)
                    .where(
                        Job.kind == "attach",
                        Job.state == "waiting",
                        Job.created_at < now - self.settings.orphan_after_seconds,
                        Job.call_id.in_(
                            Call.__table__.select().with_only_columns(Call.id).where(Call.stage != "finished")
                        ),
                    )
                    .values(
                        state="dead",
                        updated_at=now,
                        last_error=(
                            f"orphan: the PBX did not report this call as finished within "
                            f"{self.settings.orphan_after_seconds / 3600:g} h; the transcript is kept and is sent "
                            "if the call finishes later"
                        ),
                    )
                )
            )
        metrics.jobs_died("attach", orphaned)
        if reclaimed or orphaned:
            log.warning("housekeeping", reclaimed_leases=reclaimed, orphaned_transcripts=orphaned)

    # -- the loop ---------------------------------------------------------------------------

    def _renew_leases(self) -> None:
        interval = max(0.2, self.settings.lease_seconds / 3)
        while not self._renewer_stop.wait(interval):
            with self._held_lock:
                claims = list(self._held.values())
            for claim in claims:
                try:
                    with self.db.write() as session:
                        outbox.renew_lease(session, claim, self.settings.lease_seconds)
                except Exception:
                    log.exception("lease renewal failed")

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                if time.monotonic() - self._last_housekeeping > HOUSEKEEPING_SECONDS:
                    self._last_housekeeping = time.monotonic()
                    self.housekeeping()
                if self.run_once():
                    continue
            except Exception:
                log.exception("worker loop error; retrying")
            self.stopping.wait(self._idle_sleep())

    def _idle_sleep(self) -> float:
        with self.db.read() as session:
            due = outbox.next_due_at(session)
        if due is None:
            return IDLE_SLEEP_SECONDS
        return min(self.settings.worker_poll_seconds, max(IDLE_SLEEP_SECONDS, due - time.time()))

    def run_forever(self, install_signals: bool = True) -> None:
        """Work until SIGTERM/SIGINT; in-flight jobs finish (or their leases return them)."""
        if install_signals:

            def stop(signum: int, _frame: FrameType | None) -> None:
                log.info("stopping: finishing in-flight jobs", signal=signum)
                self.stopping.set()

            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
        log.info("worker started", worker_id=self.worker_id, threads=self.threads, dry_run=self.settings.dry_run)
        renewer = threading.Thread(target=self._renew_leases, name="lease-renewer", daemon=True)
        renewer.start()
        loops = [threading.Thread(target=self._loop, name=f"claim-{i}") for i in range(self.threads)]
        for thread in loops:
            thread.start()
        for thread in loops:
            thread.join()
        self._renewer_stop.set()
        renewer.join(timeout=10)
        with self.db.write() as session:
            session.query(WorkerHeartbeat).filter_by(worker_id=self.worker_id).delete()
        log.info("worker stopped", worker_id=self.worker_id)

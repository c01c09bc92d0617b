"""The worker process: folds stored events and delivers jobs in turns, beats, sweeps, stops gracefully.

Each claim loop takes turns: a fold pass bounded by time (`b24scribe.folding`), then a batch of due
jobs claimed in one transaction and run one after another, so delivery never starves while events
arrive. A heartbeat thread of its own (it never waits behind a request) marks the process alive,
renews its leases and takes back the jobs and portal slots of workers whose heartbeats stopped.
When sending, claimed jobs go to sender threads (B24SCRIBE_WORKER_SENDERS) whose outcomes share
group commits; a claim is taken once half of the senders are free, so claims stay batches.
Housekeeping also releases waiting jobs whose call already reached the stage they need, a bounded
walk per round: a wake-up that went missing delays a job by a round, never for ever.
Failure policy: fails open towards delivery — a lost database or a failing fold makes the loop
back off and go on, never stop; a job's failure is that job's (see `Deliverer.run_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

import structlog
from sqlalchemy import update
from sqlalchemy.orm import Session

from b24scribe import folding, metrics, outbox, retention
from b24scribe.db import Database, affected_rows, upsert_insert
from b24scribe.delivery import Deliverer, database_unavailable, pace_from
from b24scribe.models import Call, DeadReason, Job, JobKind, JobState, WorkerHeartbeat
from b24scribe.outbox import Claim
from b24scribe.settings import Settings
from b24scribe.sources import Sources

log = structlog.get_logger(__name__)

HOUSEKEEPING_SECONDS = 5.0
IDLE_SLEEP_SECONDS = 0.05
CLAIM_BATCH = 32  # jobs claimed per transaction by one loop
WAKE_UP_SWEEP = 500  # waiting jobs housekeeping looks at per round (see outbox.release_overdue_waiting)
FOLD_SECONDS = 0.2  # a fold pass's time budget, between two delivery batches
# After a turn that only folded a handful of events, wait this long so the next fold takes a batch
# instead of a trickle: on SQLite every fold is a write transaction (an fsync, the lock the hooks
# wait for), so many tiny folds cost the hooks more than a few larger ones.
GATHER_SECONDS = 0.1
GATHER_BELOW = 200  # events
BACKOFF_MAX_SECONDS = 2.0  # the longest pause between tries while the database is away


class Worker:
    """One worker process; `threads` claim loops share it and its B24SCRIBE_WORKER_SENDERS sender threads."""

    def __init__(self, db: Database, settings: Settings, sources: Sources, threads: int = 1) -> None:
        self.db = db
        self.settings = settings
        self.sources = sources
        self.threads = threads
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.deliverer = Deliverer.from_settings(db, settings, sources)
        self.pace = pace_from(settings)
        if self.deliverer.dry_run:  # nothing is ever in flight: a portal's slots do not bound a batch
            self.pace = dataclasses.replace(self.pace, concurrency=max(self.pace.concurrency, CLAIM_BATCH))
        self.stopping = threading.Event()
        # The heartbeat outlives `stopping`: jobs still in flight after SIGTERM keep their leases.
        self._beat_stop = threading.Event()
        self._held: dict[int, Claim] = {}
        self._held_lock = threading.Lock()
        self._senders = ThreadPoolExecutor(settings.worker_senders, thread_name_prefix="sender")
        self._sending = 0  # jobs with a sender thread now
        self._senders_idle = threading.Condition(self._held_lock)  # notified whenever a sender finishes
        self._sweep_after: tuple[float, int] | None = None
        self.claims = 0  # claim transactions that leased jobs (a figure for tests and benchmarks)
        self._found_jobs = False  # the last claim leased jobs (on SQLite the next one skips the read first)
        self.last_turn = (0, 0)  # events folded and jobs claimed by the last turn
        self._sent = 0  # jobs the sender threads have finished (drain looks again when it moves)
        self._last_housekeeping = 0.0
        self._started_at = time.time()

    # -- one step ---------------------------------------------------------------------------

    def claim_batch(self, limit: int = CLAIM_BATCH) -> list[Claim]:
        """Lease up to `limit` due jobs whose portals may take them now, in one transaction."""
        owner = f"{self.worker_id}:{threading.get_ident()}"
        now = time.time()
        if self.db.is_sqlite and not self._found_jobs:
            # After a claim that found jobs, more are likely due: the read would only cost CPU.
            with self.db.read() as session:
                if not outbox.any_claimable(session, self.pace, now):
                    return []
        with self.db.write() as session:
            claims = outbox.claim_batch(
                session,
                owner,
                self.pace,
                is_postgres=not self.db.is_sqlite,
                limit=limit,
                now=now,
                worker=self.worker_id,
            )
            self._found_jobs = bool(claims)
            if claims:
                self.claims += 1
                self.deliverer.prepare(session, claims)  # the jobs' calls, read in this transaction
                if now - self.deliverer.beat_at > self.beat_interval():
                    # the heartbeat thread is late (or not running: `drain`): a claim proves we are alive
                    self._mark_alive(session, now)
        if claims and now - self.deliverer.beat_at > self.beat_interval():
            self.deliverer.beat_at = now
        return claims

    def claim(self) -> Claim | None:
        """Lease the next due job, if any."""
        claims = self.claim_batch(1)
        return claims[0] if claims else None

    def run_once(self) -> bool:
        """One turn: a fold pass bounded by time, then one batch of deliveries; False when neither
        found work."""
        folded = self.fold()
        delivered = self.deliver()
        self.last_turn = (folded, delivered)
        return bool(folded or delivered)

    def fold(self) -> int:
        """Fold stored events for about FOLD_SECONDS; a fold that fails never stops delivery."""
        try:
            return folding.apply_pending(self.db, self.settings, self.sources, budget_seconds=FOLD_SECONDS)
        except Exception as error:
            if database_unavailable(error):
                raise
            log.exception("folding stored events failed; delivery goes on", error_type=type(error).__name__)
            return 0

    def deliver(self) -> int:
        """Claim due jobs and run them; how many were claimed.

        In dry-run a batch is run here, one job after another (nothing waits on a portal). When
        sending, each job goes to a sender thread of its own, and only as many are claimed as
        senders are free: a slow answer holds one sender and one of its portal's slots, never
        the jobs claimed beside it.
        """
        if self.deliverer.dry_run:
            claims = self.claim_batch()
            self._hold(claims)
            try:
                self.deliverer.run_batch(claims)
            finally:
                self._let_go(claims)
            return len(claims)
        senders = self.settings.worker_senders
        with self._held_lock:
            # a claim is a transaction: while the senders are busy, wait (briefly) until half of
            # them are free, rather than claim a job or two each time one finishes
            self._senders_idle.wait_for(lambda: senders - self._sending >= max(1, senders // 2), IDLE_SLEEP_SECONDS)
            free = senders - self._sending
        claims = self.claim_batch(min(CLAIM_BATCH, free)) if free > 0 else []
        self._hold(claims)
        with self._held_lock:
            self._sending += len(claims)
        for index, claim in enumerate(claims):
            try:
                self._senders.submit(self._send, claim)
            except RuntimeError:  # the sender pool is shut down: the leases bring the rest back
                rest = claims[index:]
                self.deliverer.forget(rest)
                self._let_go(rest)
                with self._held_lock:
                    self._sending -= len(rest)
                    self._senders_idle.notify_all()
                raise
        return len(claims)

    def _send(self, claim: Claim) -> None:
        try:
            self.deliverer.run(claim)
        except Exception as error:  # the database went away: the job's lease brings it back
            log.warning("a job's outcome could not be recorded", job_id=claim.job_id, error_type=type(error).__name__)
        finally:
            self._let_go([claim])
            with self._held_lock:
                self._sending -= 1
                self._sent += 1
                self._senders_idle.notify_all()

    def _hold(self, claims: list[Claim]) -> None:
        with self._held_lock:
            self._held.update((claim.job_id, claim) for claim in claims)

    def _let_go(self, claims: list[Claim]) -> None:
        with self._held_lock:
            for claim in claims:
                self._held.pop(claim.job_id, None)

    def wait_for_senders(self, timeout: float | None = None) -> bool:
        """Wait until no job is with a sender thread; False if one still is at the timeout."""
        with self._held_lock:
            return self._senders_idle.wait_for(lambda: self._sending == 0, timeout)

    def drain(self, timeout: float = 30.0) -> int:
        """Take turns until none finds work and no job is being sent (tests and the CLI); returns
        how many turns had work."""
        ran, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._held_lock:
                sent_before = self._sent
            if self.run_once():
                ran += 1
                continue
            with self._held_lock:
                sending = self._sending
                if not sending:
                    if self._sent == sent_before:
                        break
                    # a sender finished after this turn's claim looked: its outcome may have made
                    # the call's next step due, so look once more
                    continue
                # a finished job may have made the next step of its call due: look again then
                self._senders_idle.wait_for(
                    functools.partial(self._fewer_sending, sending), max(0.0, min(1.0, deadline - time.monotonic()))
                )
        return ran

    def _fewer_sending(self, than: int) -> bool:
        return self._sending < than

    def beat(self, now: float | None = None) -> int:
        """Heartbeat: mark this worker alive, renew the leases it holds, and take back the jobs of
        workers not seen for B24SCRIBE_WORKER_DEAD_AFTER_SECONDS; how many were taken back."""
        now = time.time() if now is None else now
        with self._held_lock:
            held = list(self._held.values())
        with self.db.write() as session:
            self._mark_alive(session, now)
            outbox.renew_leases(session, held, self.settings.lease_seconds, now)
            taken = outbox.reclaim_dead_workers(
                session, self.settings.worker_dead_after_seconds, now, alive=self.worker_id
            )
        self.deliverer.beat_at = now  # committed: until dead-after from now, nobody takes our jobs
        if taken:
            log.warning("took back the jobs of a dead worker", jobs=taken)
        return taken

    def _mark_alive(self, session: Session, now: float) -> None:
        insert = upsert_insert("sqlite" if self.db.is_sqlite else "postgresql")
        session.execute(
            insert(WorkerHeartbeat)
            .values(worker_id=self.worker_id, seen_at=now, started_at=self._started_at)
            .on_conflict_do_update(index_elements=["worker_id"], set_={"seen_at": now})
        )

    def release_overdue_waiting(self, now: float | None = None) -> int:
        """Make due the waiting jobs whose call already reached the stage they need (a wake-up that
        was lost); WAKE_UP_SWEEP of them per round, going on where the last round stopped."""
        now = time.time() if now is None else now
        with self.db.write() as session:
            released, self._sweep_after = outbox.release_overdue_waiting(session, self._sweep_after, WAKE_UP_SWEEP, now)
        if released:
            log.warning("released waiting jobs whose call had already reached their stage", jobs=released)
        return released

    def housekeeping(self, now: float | None = None) -> None:
        """Heartbeat, reclaim expired leases, report orphaned transcripts, purge what retention ends."""
        now = time.time() if now is None else now
        self.beat(now)
        with self.db.write() as session:
            reclaimed = outbox.reclaim_expired(session, now)
            orphaned = affected_rows(
                session.execute(
                    update(Job)
                    .where(
                        Job.kind == JobKind.ATTACH,
                        Job.state == JobState.WAITING,
                        Job.created_at < now - self.settings.orphan_after_seconds,
                        Job.call_id.in_(
                            Call.__table__.select().with_only_columns(Call.id).where(Call.stage != "finished")
                        ),
                    )
                    .values(
                        state=JobState.DEAD,
                        dead_reason=DeadReason.ORPHAN,
                        updated_at=now,
                        # the words are for people; the revive selects on dead_reason
                        last_error=(
                            f"orphan: the PBX did not report this call as finished within "
                            f"{self.settings.orphan_after_seconds / 3600:g} h; the transcript is kept and is sent "
                            "if the call finishes later"
                        ),
                    )
                )
            )
        metrics.jobs_died(JobKind.ATTACH, orphaned)
        self.release_overdue_waiting(now)
        if reclaimed or orphaned:
            log.warning("housekeeping", reclaimed_leases=reclaimed, orphaned_transcripts=orphaned)
        retention.purge_expired(self.db, self.settings.retention_days, now)  # small batches, resumed next round

    # -- the loop ---------------------------------------------------------------------------

    def beat_interval(self) -> float:
        """How often the heartbeat thread beats: five beats before a worker counts as dead, three
        lease renewals within a lease."""
        return max(0.2, min(self.settings.worker_dead_after_seconds / 5, self.settings.lease_seconds / 3))

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(self.beat_interval()):
            try:
                self.beat()
            except Exception as error:
                if database_unavailable(error):
                    log.warning("heartbeat failed: the database is unavailable", error_type=type(error).__name__)
                else:
                    log.exception("heartbeat failed", error_type=type(error).__name__)

    def _loop(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                if time.monotonic() - self._last_housekeeping > HOUSEKEEPING_SECONDS:
                    self._last_housekeeping = time.monotonic()
                    self.housekeeping()
                worked = self.run_once()
                failures = 0
                if worked:
                    folded, delivered = self.last_turn
                    if delivered or folded >= GATHER_BELOW:
                        continue
                    pause = GATHER_SECONDS
                else:
                    pause = self._idle_sleep()
            except Exception as error:
                failures += 1
                pause = min(BACKOFF_MAX_SECONDS, 0.05 * 2**failures)
                if database_unavailable(error):
                    log.warning("database unavailable; retrying", retry_in=pause, error_type=type(error).__name__)
                else:
                    log.exception("worker loop error; retrying", retry_in=pause)
            self.stopping.wait(pause)

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
        log.info("worker started", worker_id=self.worker_id, threads=self.threads, dry_run=self.deliverer.dry_run)
        try:
            self.beat()  # seen before its first claim, so its leases can be taken back if it dies
        except Exception:
            log.exception("first heartbeat failed; the heartbeat thread retries")
        beating = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        beating.start()
        loops = [threading.Thread(target=self._loop, name=f"claim-{i}") for i in range(self.threads)]
        for thread in loops:
            thread.start()
        for thread in loops:
            thread.join()
        self._senders.shutdown(wait=True)  # the requests in flight finish and are recorded
        self._beat_stop.set()
        beating.join(timeout=10)
        try:
            with self.db.write() as session:
                session.query(WorkerHeartbeat).filter_by(worker_id=self.worker_id).delete()
        except Exception:
            log.exception("signing off failed; the heartbeat row ages out")
        log.info("worker stopped", worker_id=self.worker_id)

"""Prometheus metrics with bounded labels, merged across gunicorn workers and the worker process.

Counters and histograms live in each process. Under gunicorn (and in `flask worker`) they are
written to PROMETHEUS_MULTIPROC_DIR, and `/metrics` merges every process's files with
prometheus_client's MultiProcessCollector. When the variable is unset, gunicorn.conf.py and the
worker command both use a private directory derived from the working directory and the database
URL (`default_multiprocess_dir`), so the web processes and the worker of one deployment meet in
the same place without configuration.

The queue gauges (open and dead jobs by state, oldest due job, worker heartbeat, stored rejections,
transcripts not delivered, each portal's state) are NOT process state: they are read from the database when `/metrics`
is scraped and rendered from a registry built for that one scrape (`database_metrics`). The
database is the one thing every process shares, so this is the truth at scrape time. The
alternatives are wrong here: a custom collector registered in the default registry is not merged
in multiprocess mode, and a gauge set by whichever process last looked
(`multiprocess_mode="max"`/`"liveall"`) reports stale or per-process copies of one global number.

Every gauge query reads an index range of what is open or failed, never the history: with millions
of stored events a scrape stays a few milliseconds. Done jobs and delivered transcripts grow without
bound, so they are not gauges: `b24scribe_job_runs_total{state="done"}` counts them as they happen.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from b24scribe.bitrix24 import (
    AmbiguousError,
    Bitrix24Error,
    OperationLimitError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from b24scribe.models import (
    GAUGED_JOB_STATES,
    InboundEvent,
    Job,
    JobState,
    PortalState,
    TranscriptPart,
    WorkerHeartbeat,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Gauged states: the open ones and the given-up ones (each an index range that stays small).
JOB_STATES = GAUGED_JOB_STATES
TRANSCRIPT_STATES = ("queued", "failed")
HEARTBEAT_FRESH_SECONDS = 30.0
WEBHOOK_PORTAL_STATE = "configured"  # a webhook portal of the settings: it has no other state

EVENTS_RECEIVED = Counter(
    "b24scribe_events_received_total",
    "Hook requests stored or recognised, by source and outcome",
    ["source", "provider", "outcome"],
)
REJECTIONS = Counter(
    "b24scribe_rejections_total",
    "Hook requests refused before storing, by source and reason",
    ["source", "provider", "reason"],
)
BITRIX24_REQUESTS = Counter(
    "b24scribe_bitrix24_requests_total",
    "Requests sent to Bitrix24, by method and outcome (ok, transient, ambiguous, throttled, "
    "operation_limit, permanent)",
    ["method", "outcome"],
)
BITRIX24_ERRORS = Counter(
    "b24scribe_bitrix24_errors_total",
    "Failed Bitrix24 requests by method and error code (HTTP_<status>, UNREACHABLE, NO_ANSWER without one)",
    ["method", "code"],
)
BITRIX24_SECONDS = Histogram(
    "b24scribe_bitrix24_request_seconds",
    "Time a Bitrix24 request took, by method",
    ["method"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0),
)
THROTTLE_PAUSES = Counter(
    "b24scribe_throttle_pauses_total",
    "Times Bitrix24 made the service pause a portal, by reason",
    ["reason"],
)
JOB_RUNS = Counter(
    "b24scribe_job_runs_total",
    "Job executions by kind and the state they left the job in",
    ["kind", "state"],
)
JOBS_DEAD = Counter(
    "b24scribe_jobs_dead_total",
    "Jobs given up (dead: listed, replayable), by kind",
    ["kind"],
)

_OUTCOMES: tuple[tuple[type[Bitrix24Error], str], ...] = (
    (ThrottledError, "throttled"),
    (OperationLimitError, "operation_limit"),
    (AmbiguousError, "ambiguous"),
    (TransientError, "transient"),
    (PermanentError, "permanent"),
)


class Metrics:
    """The counters the views touch (kept on the app as `b24scribe.metrics`)."""

    def __init__(self) -> None:
        self._received: dict[tuple[str, str, str], Any] = {}  # labelled children: one lookup per event

    def received(self, source: str, provider: str, outcome: str) -> None:
        """Count a stored, duplicate or rejected event."""
        key = (source, provider, outcome)
        counter = self._received.get(key)
        if counter is None:  # bounded: sources × known providers × 3 outcomes
            counter = self._received[key] = EVENTS_RECEIVED.labels(source, provider, outcome)
        counter.inc()

    def rejected(self, source: str, provider: str, reason: str) -> None:
        """Count a request refused before storing (authentication, size)."""
        REJECTIONS.labels(source, provider, reason).inc()


def error_code(error: Bitrix24Error) -> str:
    """A bounded label for a Bitrix24 failure: its error code, else what kind of failure it was."""
    if error.code:
        return error.code[:64]
    if error.status is not None:
        # Bitrix24 sends error "" for its own validation failures (ERROR_CORE in its docs).
        return "ERROR_CORE" if error.code == "" and error.status < 500 else f"HTTP_{error.status}"
    return "NO_ANSWER" if isinstance(error, AmbiguousError) else "UNREACHABLE"


@contextmanager
def bitrix24_request(method: str) -> Iterator[None]:
    """Count one Bitrix24 request around the call that sends it: outcome, error code, time, pauses."""
    started = time.perf_counter()
    try:
        yield
    except Bitrix24Error as error:
        outcome = next((name for kind, name in _OUTCOMES if isinstance(error, kind)), "error")
        BITRIX24_REQUESTS.labels(method, outcome).inc()
        BITRIX24_ERRORS.labels(method, error_code(error)).inc()
        if isinstance(error, ThrottledError):
            THROTTLE_PAUSES.labels("QUERY_LIMIT_EXCEEDED").inc()
        elif isinstance(error, OperationLimitError):
            THROTTLE_PAUSES.labels("OPERATION_TIME_LIMIT").inc()
        raise
    except Exception:
        BITRIX24_REQUESTS.labels(method, "error").inc()
        raise
    else:
        BITRIX24_REQUESTS.labels(method, "ok").inc()
    finally:
        BITRIX24_SECONDS.labels(method).observe(time.perf_counter() - started)


def job_ran(kind: str, state: str) -> None:
    """Count a job execution by the state it left the job in (done, pending, waiting, dead)."""
    JOB_RUNS.labels(kind, state).inc()
    if state == JobState.DEAD:
        JOBS_DEAD.labels(kind).inc()


def jobs_died(kind: str, count: int) -> None:
    """Count jobs given up outside an execution (the worker's orphan sweep)."""
    if count:
        JOBS_DEAD.labels(kind).inc(count)


# -- scrape-time gauges from the database ------------------------------------------------------


class _Families(Collector):
    """A collector that yields metric families computed beforehand (one scrape's snapshot)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def portal_state_family(portals: Mapping[str, str]) -> Metric:
    """`b24scribe_portal_state{portal,state}`: an installed portal has a series per PortalState, 1 for
    the one it is in; a webhook portal one series, `configured`. Bounded: one row per portal."""
    family = GaugeMetricFamily(
        "b24scribe_portal_state",
        "Each portal's state (1: the one it is in): installed, needs_reinstall (its jobs wait: install the "
        "local application again), uninstalled; webhook portals: configured",
        labels=["portal", "state"],
    )
    for portal, current in portals.items():
        states = [WEBHOOK_PORTAL_STATE] if current == WEBHOOK_PORTAL_STATE else [state.value for state in PortalState]
        for state in states:
            family.add_metric([portal, state], 1.0 if state == current else 0.0)
    return family


def database_metrics(
    session: Session, now: float | None = None, portals: Mapping[str, str] | None = None
) -> list[Metric]:
    """The queue as the database has it now: one family per gauge; with `portals` (each portal's
    state by name, as `b24scribe.portals.Directory` read it for this scrape), their states too.

    Five Core statements (not ORM: their per-statement overhead was most of a scrape), each an index
    range over what is open or failed: ix_job_due, ix_inbound_event_state, ix_transcript_delivery_state.
    """
    now = time.time() if now is None else now
    connection = session.connection()
    job_counts = dict(
        connection.execute(select(Job.state, func.count()).where(Job.state.in_(JOB_STATES)).group_by(Job.state)).all()
    )
    jobs = GaugeMetricFamily(
        "b24scribe_jobs",
        "Outbox jobs open or given up, by state (dead: see `jobs list`; done ones: b24scribe_job_runs_total)",
        labels=["state"],
    )
    for job_state in JOB_STATES:
        jobs.add_metric([job_state.value], job_counts.get(job_state, 0))
    oldest_due = connection.execute(
        select(func.min(Job.next_attempt_at)).where(Job.state == JobState.PENDING, Job.next_attempt_at <= now)
    ).scalar()
    due_age = GaugeMetricFamily(
        "b24scribe_oldest_due_job_age_seconds",
        "How long the oldest due pending job has been waiting for a worker (0: none due)",
        value=0.0 if oldest_due is None else max(0.0, now - oldest_due),
    )
    newest_beat, live = connection.execute(
        select(
            func.max(WorkerHeartbeat.seen_at),
            func.count().filter(WorkerHeartbeat.seen_at >= now - HEARTBEAT_FRESH_SECONDS),
        )
    ).one()
    heartbeat = GaugeMetricFamily(
        "b24scribe_worker_heartbeat_age_seconds",
        "Seconds since the freshest worker heartbeat (+Inf: no worker ever ran)",
        value=float("inf") if newest_beat is None else max(0.0, now - newest_beat),
    )
    live_workers = GaugeMetricFamily(
        "b24scribe_workers",
        f"Worker processes with a heartbeat in the last {HEARTBEAT_FRESH_SECONDS:g} s",
        value=live or 0,
    )
    rejected = GaugeMetricFamily(
        "b24scribe_rejected_events",
        "Stored events that could not be processed (replay with `flask events replay --rejected`)",
        value=connection.execute(
            select(func.count()).select_from(InboundEvent).where(InboundEvent.state == "rejected")
        ).scalar()
        or 0,
    )
    transcript_counts = dict(
        connection.execute(
            select(TranscriptPart.delivery_state, func.count())
            .where(TranscriptPart.delivery_state.in_(TRANSCRIPT_STATES))
            .group_by(TranscriptPart.delivery_state)
        ).all()
    )
    transcripts = GaugeMetricFamily(
        "b24scribe_transcripts",
        "Transcripts not delivered, by state (queued: on their way; failed: the vendor's transcription failed)",
        labels=["state"],
    )
    for state in TRANSCRIPT_STATES:
        transcripts.add_metric([state], transcript_counts.get(state, 0))
    families: list[Metric] = [jobs, due_age, heartbeat, live_workers, rejected, transcripts]
    if portals is not None:
        families.append(portal_state_family(portals))
    return families


def render(session: Session | None, portals: Mapping[str, str] | None = None) -> bytes:
    """The /metrics body: every process's counters (merged when multiprocess) plus the database gauges
    (and the portals' states, given as `database_metrics` takes them)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        output = generate_latest(registry)
    else:
        output = generate_latest(REGISTRY)
    if session is not None:
        snapshot = CollectorRegistry(auto_describe=False)
        snapshot.register(_Families(database_metrics(session, portals=portals)))
        output += generate_latest(snapshot)
    return output


# -- sharing one directory between processes ---------------------------------------------------


def default_multiprocess_dir(database_url: str, cwd: str | None = None) -> Path:
    """The directory a deployment's processes share when PROMETHEUS_MULTIPROC_DIR is unset.

    Keyed by working directory and database URL (hashed: the URL may hold a password), per user.
    """
    key = hashlib.sha256(f"{cwd or os.getcwd()}\0{database_url}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"b24scribe-metrics-{os.getuid()}-{key}"


def prepare_multiprocess_dir(database_url: str) -> str:
    """Make this process (and its children) write metrics to the shared directory; returns it.

    Call before anything is counted: counters already touched stay in memory.
    """
    configured = os.environ.get(MULTIPROC_ENV)
    path = configured or str(default_multiprocess_dir(database_url))
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    # Fails closed: a directory someone else made in a shared /tmp could feed us fake numbers
    # (a directory the operator named is trusted: it may be a volume owned by a group).
    if not stat.S_ISDIR(info.st_mode) or (configured is None and info.st_uid != os.getuid()):
        raise RuntimeError(f"{MULTIPROC_ENV}: {path} is not a directory owned by this user")
    os.environ[MULTIPROC_ENV] = path
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return path


_PID_IN_NAME = re.compile(r"_(\d+)\.db$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_process_files(path: str) -> int:
    """Delete the metric files of processes that no longer run (a restart starts counting afresh)."""
    removed = 0
    for name in glob.glob(os.path.join(path, "*.db")):
        match = _PID_IN_NAME.search(name)
        if match and not _alive(int(match.group(1))):
            os.remove(name)
            removed += 1
    return removed


def mark_process_dead(pid: int) -> None:
    """Forget a dead process's live gauges (gunicorn's child_exit)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

"""`/livez` (the process answers), `/readyz` (it can do its job) and `/metrics` (Prometheus).

With B24SCRIBE_METRICS_TOKEN set, `/metrics` and the details of `/readyz` need
`Authorization: Bearer <token>`; `/readyz` without it still answers the bare ready (200) or not
ready (503), which is all a load balancer or an orchestrator's probe needs. Unset: both are open.

`/readyz` never takes the write lock: it reads (one read transaction, which on SQLite in WAL mode
waits for no writer) and asks the database whether it would accept a write (see `_writable`).
"""

from __future__ import annotations

import hmac
import os
import time

import structlog
from flask import Response, current_app, jsonify, request
from flask_smorest import Blueprint
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from b24scribe import metrics
from b24scribe.db import Database
from b24scribe.models import Job, WorkerHeartbeat
from b24scribe.portals import Directory
from b24scribe.settings import Settings
from b24scribe.sources import Sources
from handlers.errors import ApiError
from handlers.openapi import METRICS_SECURITY, NO_SECURITY, ErrorSchema, LivenessSchema, ReadinessSchema

log = structlog.get_logger(__name__)
bp = Blueprint(
    "health",
    __name__,
    description="Liveness, readiness and Prometheus metrics. With B24SCRIBE_METRICS_TOKEN set, /metrics and the "
    "details of /readyz need Authorization: Bearer <B24SCRIBE_METRICS_TOKEN>.",
)
HEARTBEAT_FRESH_SECONDS = metrics.HEARTBEAT_FRESH_SECONDS
OLDEST_DUE_JOB_SECONDS = 600.0
# Below this much free space a SQLite database is as good as read-only (a commit needs room for its WAL).
MIN_FREE_BYTES = 16 * 1024 * 1024


def _db() -> Database:
    db: Database = current_app.extensions["b24scribe.db"]
    return db


def _settings() -> Settings:
    settings: Settings = current_app.extensions["b24scribe.settings"]
    return settings


def _metrics_access() -> bool | None:
    """True: the request may see details (no token configured, or the right one sent); False: it sent a
    wrong one; None: it sent none while one is configured."""
    expected = _settings().metrics_token
    if expected is None:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not given.strip():
        return None
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())


def _portal_states() -> dict[str, str] | None:
    """Each portal's state by name, read now; None when the database cannot say (fails open: the
    database check, or the missing gauges, already tell; readiness never depends on portals)."""
    try:
        snapshot = Directory(_db(), _settings()).snapshot()
    except Exception as exc:
        log.warning("portal states unavailable", error=type(exc).__name__)
        return None
    return {name: str(info.state) for name, info in snapshot.portals.items()}


def _refuse_wrong_token() -> None:
    raise ApiError(401, "unauthenticated", "send Authorization: Bearer <B24SCRIBE_METRICS_TOKEN>")


def _writable(db: Database, session: Session) -> None:
    """Raise if the database would refuse a write, without writing (so without the write lock).

    PostgreSQL says so itself: a hot standby, or `default_transaction_read_only`, makes
    `transaction_read_only` on. SQLite has no such question over the Python driver
    (sqlite3_db_readonly is not exposed), and its answer would be about our own connection anyway; a
    write fails when the file, or the directory that holds its -wal and -shm files, is not writable
    by this process, or the disk is full: exactly what is checked here.
    """
    if not db.is_sqlite:
        if session.execute(text("SHOW transaction_read_only")).scalar() != "off":
            raise PermissionError("the database is read-only")
        return
    session.execute(text("SELECT 1"))
    path = make_url(db.url).database
    if not path or path == ":memory:":
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.access(path, os.W_OK) or not os.access(directory, os.W_OK):
        raise PermissionError("the database file or its directory is not writable")
    stats = os.statvfs(directory)
    if stats.f_bavail * stats.f_frsize < MIN_FREE_BYTES:
        raise OSError("the disk holding the database is full")


@bp.get("/livez")
@bp.response(200, LivenessSchema)
@bp.doc(security=NO_SECURITY)
def livez() -> Response:
    """Liveness: the process answers; no dependencies are checked."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@bp.response(200, ReadinessSchema, description="ready: every check is ok")
@bp.alt_response(503, schema=ReadinessSchema, description="not ready: the failing checks say why")
@bp.alt_response(401, schema=ErrorSchema, description="a wrong B24SCRIBE_METRICS_TOKEN was sent")
@bp.doc(security=[*METRICS_SECURITY, {}])
def readyz() -> tuple[Response, int]:
    """Readiness: database writable, a worker heartbeat within 30 s, no due job waiting over 10 min.

    With B24SCRIBE_METRICS_TOKEN set and not sent, the answer is only `{"status": …}` and its code.
    """
    access = _metrics_access()
    if access is False:
        _refuse_wrong_token()
    checks: dict[str, dict[str, object]] = {}
    now = time.time()
    db = _db()
    try:
        with db.read() as session:
            _writable(db, session)
            newest_beat = session.scalar(select(func.max(WorkerHeartbeat.seen_at)))
            oldest_due = session.scalar(
                select(func.min(Job.next_attempt_at)).where(Job.state == "pending", Job.next_attempt_at <= now)
            )
        checks["database"] = {"ok": True}
    except Exception as exc:  # any failure here is exactly what readiness reports
        log.warning("readiness: database check failed", error=type(exc).__name__)
        checks["database"] = {"ok": False, "error": type(exc).__name__}
        newest_beat = oldest_due = None
    beat_age = None if newest_beat is None else now - newest_beat
    checks["worker"] = {
        "ok": beat_age is not None and beat_age <= HEARTBEAT_FRESH_SECONDS,
        "heartbeat_age_seconds": None if beat_age is None else round(beat_age, 1),
    }
    due_age = 0.0 if oldest_due is None else now - oldest_due
    checks["queue"] = {"ok": due_age <= OLDEST_DUE_JOB_SECONDS, "oldest_due_job_age_seconds": round(due_age, 1)}
    ready = all(bool(check["ok"]) for check in checks.values())
    status = "ok" if ready else "unavailable"
    if access is None:
        return jsonify({"status": status}), 200 if ready else 503
    body: dict[str, object] = {"status": status, "checks": checks}
    if (portals := _portal_states()) is not None:
        body["portals"] = portals  # shown, not judged: a portal needing re-install holds only its own jobs
    return jsonify(body), 200 if ready else 503


_declared: set[tuple[str, str]] = set()


def _declare_sources() -> None:
    """Every source of the registry has its series from the start, at 0 (a dashboard sees a source
    that never sent anything). Declared when scraped, in the process that serves /metrics: by then
    gunicorn has set up the shared metrics directory, which a process creating the app may not have."""
    sources: Sources = current_app.extensions["b24scribe.sources"]
    for kind, name in sources.labels():
        if (kind, name) not in _declared:
            for outcome in ("accepted", "duplicate", "rejected"):
                metrics.EVENTS_RECEIVED.labels(kind, name, outcome)
            _declared.add((kind, name))


@bp.get("/metrics")
@bp.alt_response(401, schema=ErrorSchema, description="B24SCRIBE_METRICS_TOKEN is set and was not sent, or is wrong")
@bp.doc(
    security=[*METRICS_SECURITY, {}],
    responses={
        "200": {
            "description": "Prometheus text exposition: counters of every web and worker process, and queue gauges "
            "read from the database at scrape time",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        }
    },
)
def metrics_view() -> Response:
    """Prometheus metrics (Bearer B24SCRIBE_METRICS_TOKEN when it is set)."""
    if not _metrics_access():
        _refuse_wrong_token()
    _declare_sources()
    portals = _portal_states()
    try:
        with _db().read() as session:
            body = metrics.render(session, portals)
    except Exception as exc:  # fails open: the process counters are still worth scraping
        log.warning("metrics: database gauges unavailable", error=type(exc).__name__)
        body = metrics.render(None)
    return Response(body, mimetype=None, content_type=CONTENT_TYPE_LATEST)

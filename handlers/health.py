"""`/livez` (the process answers), `/readyz` (it can do its job) and `/metrics` (Prometheus)."""

from __future__ import annotations

import time

import structlog
from flask import Response, current_app, jsonify
from flask_smorest import Blueprint
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import func, select, text

from b24scribe import metrics
from b24scribe.db import Database
from b24scribe.models import Job, WorkerHeartbeat
from handlers.openapi import NO_SECURITY, LivenessSchema, ReadinessSchema

log = structlog.get_logger(__name__)
bp = Blueprint("health", __name__, description="Liveness, readiness and Prometheus metrics (no authentication).")
HEARTBEAT_FRESH_SECONDS = metrics.HEARTBEAT_FRESH_SECONDS
OLDEST_DUE_JOB_SECONDS = 600.0


def _db() -> Database:
    db: Database = current_app.extensions["b24scribe.db"]
    return db


@bp.get("/livez")
@bp.response(200, LivenessSchema)
@bp.doc(security=NO_SECURITY)
def livez() -> Response:
    """Liveness: the process answers; no dependencies are checked."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@bp.response(200, ReadinessSchema, description="ready: every check is ok")
@bp.alt_response(503, schema=ReadinessSchema, description="not ready: the failing checks say why")
@bp.doc(security=NO_SECURITY)
def readyz() -> tuple[Response, int]:
    """Readiness: database writable, a worker heartbeat within 30 s, no due job waiting over 10 min."""
    checks: dict[str, dict[str, object]] = {}
    now = time.time()
    try:
        with _db().write() as session:
            session.execute(text("SELECT 1"))
            if session.get_bind().dialect.name == "postgresql":
                read_only = session.execute(text("SHOW transaction_read_only")).scalar()
                if read_only != "off":
                    raise PermissionError("the database is read-only")
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
    return jsonify({"status": "ok" if ready else "unavailable", "checks": checks}), 200 if ready else 503


@bp.get("/metrics")
@bp.doc(
    security=NO_SECURITY,
    responses={
        "200": {
            "description": "Prometheus text exposition: counters of every web and worker process, and queue gauges "
            "read from the database at scrape time",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        }
    },
)
def metrics_view() -> Response:
    """Prometheus metrics."""
    try:
        with _db().read() as session:
            body = metrics.render(session)
    except Exception as exc:  # fails open: the process counters are still worth scraping
        log.warning("metrics: database gauges unavailable", error=type(exc).__name__)
        body = metrics.render(None)
    return Response(body, mimetype=None, content_type=CONTENT_TYPE_LATEST)

"""`/livez` (the process answers) and `/readyz` (it can do its job)."""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import func, select, text

from b24scribe.db import Database
from b24scribe.models import Job, WorkerHeartbeat

bp = Blueprint("health", __name__)
HEARTBEAT_FRESH_SECONDS = 30.0
OLDEST_DUE_JOB_SECONDS = 600.0


@bp.get("/livez")
def livez() -> Response:
    """Liveness: no dependencies."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Readiness: database writable, a worker heartbeat within 30 s, no due job older than 10 min."""
    db: Database = current_app.extensions["b24scribe.db"]
    checks: dict[str, dict[str, object]] = {}
    now = time.time()
    try:
        with db.write() as session:
            session.execute(text("SELECT 1"))
            newest_beat = session.scalar(select(func.max(WorkerHeartbeat.seen_at)))
            oldest_due = session.scalar(
                select(func.min(Job.next_attempt_at)).where(Job.state == "pending", Job.next_attempt_at <= now)
            )
        checks["database"] = {"ok": True}
    except Exception as exc:  # any failure here is exactly what readiness reports
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

"""The admin API under `/v1`: calls, the outbox, replay. Bearer B24SCRIBE_ADMIN_TOKEN."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select

from b24scribe import outbox
from b24scribe.calls import describe_call, describe_job, find_by_b24, find_by_pbx
from b24scribe.db import Database
from b24scribe.models import Job
from b24scribe.settings import Settings
from handlers.errors import ApiError

bp = Blueprint("admin", __name__, url_prefix="/v1")
JOB_STATES = ("waiting", "pending", "leased", "done", "dead")


def _db() -> Database:
    db: Database = current_app.extensions["b24scribe.db"]
    return db


@bp.before_request
def require_admin_token() -> None:
    """Fails closed: no admin token configured means no admin API."""
    settings: Settings = current_app.extensions["b24scribe.settings"]
    if settings.admin_token is None:
        raise ApiError(403, "admin_disabled", "the admin API is disabled: set B24SCRIBE_ADMIN_TOKEN")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.admin_token.encode()):
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer <B24SCRIBE_ADMIN_TOKEN>")


@bp.get("/calls/by-b24/<path:b24_call_id>")
def call_by_b24(b24_call_id: str) -> Response:
    """A call by its Bitrix24 CALL_ID."""
    with _db().read() as session:
        call = find_by_b24(session, b24_call_id)
        if call is None:
            raise ApiError(404, "unknown_call", "no call with this Bitrix24 CALL_ID has reached the service")
        return jsonify(describe_call(session, call))


@bp.get("/calls/<pbx>/<path:pbx_call_id>")
def call_by_pbx(pbx: str, pbx_call_id: str) -> Response:
    """A call by the PBX's own id."""
    with _db().read() as session:
        call = find_by_pbx(session, pbx, pbx_call_id)
        if call is None:
            raise ApiError(404, "unknown_call", f"no call {pbx_call_id!r} from PBX {pbx!r} has reached the service")
        return jsonify(describe_call(session, call))


@bp.get("/jobs")
def list_jobs() -> Response:
    """The outbox: counts by state and the jobs in one state (newest first, at most `limit`)."""
    state = request.args.get("state")
    if state is not None and state not in JOB_STATES:
        raise ApiError(
            422, "invalid_query", "unknown job state", {"state": [f"must be one of: {', '.join(JOB_STATES)}"]}
        )
    try:
        limit = min(1000, max(1, int(request.args.get("limit", "100"))))
    except ValueError:
        raise ApiError(422, "invalid_query", "limit must be a number", {"limit": ["must be a whole number"]}) from None
    with _db().read() as session:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state is not None:
            query = query.where(Job.state == state)
        jobs = [describe_job(job) for job in session.scalars(query)]
        return jsonify({"counts": outbox.counts_by_state(session), "jobs": jobs})


@bp.post("/jobs/<int:job_id>/retry")
def retry_job(job_id: int) -> tuple[Response, int]:
    """Replay a dead job now, with a fresh attempt count."""
    with _db().write() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ApiError(404, "unknown_job", f"no job {job_id}")
        if job.state != "dead":
            raise ApiError(409, "not_dead", f"job {job_id} is {job.state}; only dead jobs are retried")
        outbox.replay(session, job_id)
        return jsonify(describe_job(job)), 202

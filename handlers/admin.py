"""The admin API under `/v1`: calls, the outbox, replay. Bearer B24SCRIBE_ADMIN_TOKEN."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Response, current_app, jsonify, request
from flask_smorest import Blueprint
from marshmallow import Schema
from sqlalchemy import select

from b24scribe import outbox
from b24scribe.calls import describe_call, describe_job, find_by_b24, find_by_pbx
from b24scribe.db import Database
from b24scribe.models import Job
from b24scribe.settings import Settings
from handlers.errors import ApiError
from handlers.openapi import ADMIN_SECURITY, CallSchema, ErrorSchema, JobListSchema, JobSchema

bp = Blueprint(
    "admin",
    __name__,
    url_prefix="/v1",
    description="Calls, the outbox and replay, for integrators. Authorization: Bearer <B24SCRIBE_ADMIN_TOKEN>.",
)
JOB_STATES = ("waiting", "pending", "leased", "done", "dead")


def _admin_errors(*extra: tuple[int, str]) -> list[tuple[int, str]]:
    return [
        (401, "the admin token is missing or wrong"),
        (403, "the admin API is disabled: B24SCRIBE_ADMIN_TOKEN is not set"),
        *extra,
    ]


View = TypeVar("View", bound=Callable[..., Any])


def documented(success: int, schema: type[Schema], *errors: tuple[int, str]) -> Callable[[View], View]:
    """Document an admin view: its success body, the admin security and its error answers."""

    def decorate(view: View) -> View:
        view = bp.doc(security=ADMIN_SECURITY)(view)
        view = bp.response(success, schema)(view)
        for status, description in _admin_errors(*errors):
            view = bp.alt_response(status, schema=ErrorSchema, description=description)(view)
        return view

    return decorate


def is_admin_token(given: str | None) -> bool:
    """Whether `given` is the configured admin token (constant-time; False when none is configured)."""
    settings: Settings = current_app.extensions["b24scribe.settings"]
    if settings.admin_token is None or not given:
        return False
    return hmac.compare_digest(given.encode(), settings.admin_token.encode())


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
    if scheme.lower() != "bearer" or not is_admin_token(given.strip()):
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer <B24SCRIBE_ADMIN_TOKEN>")


@bp.get("/calls/by-b24/<path:b24_call_id>")
@documented(200, CallSchema, (404, "no call with this CALL_ID has reached the service"))
def call_by_b24(b24_call_id: str) -> Response:
    """A call by its Bitrix24 CALL_ID."""
    with _db().read() as session:
        call = find_by_b24(session, b24_call_id)
        if call is None:
            raise ApiError(404, "unknown_call", "no call with this Bitrix24 CALL_ID has reached the service")
        return jsonify(describe_call(session, call))


@bp.get("/calls/<pbx>/<path:pbx_call_id>")
@documented(200, CallSchema, (404, "no such call from this PBX"))
def call_by_pbx(pbx: str, pbx_call_id: str) -> Response:
    """A call by the PBX's own id."""
    with _db().read() as session:
        call = find_by_pbx(session, pbx, pbx_call_id)
        if call is None:
            raise ApiError(404, "unknown_call", f"no call {pbx_call_id!r} from PBX {pbx!r} has reached the service")
        return jsonify(describe_call(session, call))


@bp.get("/jobs")
@documented(200, JobListSchema, (422, "unknown state or a limit that is not a number"))
@bp.doc(
    parameters=[
        {
            "name": "state",
            "in": "query",
            "schema": {"type": "string", "enum": list(JOB_STATES)},
            "description": "only jobs in this state",
        },
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            "description": "at most this many jobs, newest first",
        },
    ]
)
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
@documented(202, JobSchema, (404, "no such job"), (409, "the job is not dead"))
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

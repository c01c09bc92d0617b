"""The admin API under `/v1`: calls, portals, stored events, the outbox, replay. Bearer B24SCRIBE_ADMIN_TOKEN.

Everything stored is answered through `displayable`: a stored lone surrogate, NUL or control
character comes out as U+FFFD, so any JSON parser reads every answer (contract §12).
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Response, current_app, jsonify, request
from flask_smorest import Blueprint
from marshmallow import Schema
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from b24scribe import outbox
from b24scribe.calls import AmbiguousCall, describe_call, describe_job, find_by_b24, find_by_pbx, iso
from b24scribe.checks import portal_fix
from b24scribe.db import Database
from b24scribe.delivery import pace_from
from b24scribe.limits import MAX_B24_CALL_ID_LENGTH, MAX_PBX_LENGTH, id_problem
from b24scribe.models import JOB_STATES, Call, InboundEvent, Job, JobState, Portal, PortalPacing, TranscriptPart
from b24scribe.portals import Directory, Snapshot
from b24scribe.replay import field_summary
from b24scribe.settings import Settings
from handlers.errors import ApiError
from handlers.openapi import (
    ADMIN_SECURITY,
    CallSchema,
    ErrorSchema,
    EventSchema,
    JobListSchema,
    JobSchema,
    PortalListSchema,
)

bp = Blueprint(
    "admin",
    __name__,
    url_prefix="/v1",
    description="Calls, the outbox and replay, for integrators. Authorization: Bearer <B24SCRIBE_ADMIN_TOKEN>.",
)
# The largest id a row can have (a signed 64-bit integer on SQLite and PostgreSQL): a path id above it
# is a 404 like any other id no row has, not an overflow in the database driver.
MAX_ROW_ID = 2**63 - 1
MAX_JOBS_LISTED = 1000
# the jobs a portal's entry counts: those still to go (waiting, pending) and those given up (dead)
PORTAL_JOB_STATES = (JobState.WAITING, JobState.PENDING, JobState.DEAD)
_UNDISPLAYABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


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


def displayable(value: Any) -> Any:
    """`value` with every string safe to encode and show: lone surrogates, NUL and control characters
    (but tab and newlines) become U+FFFD, bytes are decoded leniently. Dicts and lists are walked."""
    if isinstance(value, str):
        return _UNDISPLAYABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {displayable(key): displayable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [displayable(item) for item in value]
    if isinstance(value, bytes):
        return displayable(value.decode("utf-8", "replace"))
    return value


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
    if id_problem(b24_call_id, MAX_B24_CALL_ID_LENGTH) is not None:  # no row can have it (contract §12)
        raise ApiError(404, "unknown_call", "no call with this Bitrix24 CALL_ID has reached the service")
    with _db().read() as session:
        call = find_by_b24(session, b24_call_id)
        if call is None:
            raise ApiError(404, "unknown_call", "no call with this Bitrix24 CALL_ID has reached the service")
        return jsonify(displayable(describe_call(session, call)))


@bp.get("/calls/<pbx>/<path:pbx_call_id>")
@documented(
    200,
    CallSchema,
    (404, "no such call from this PBX"),
    (409, "several portals have a call with this id: add ?portal="),
)
@bp.doc(
    parameters=[
        {
            "name": "portal",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "the portal the call belongs to (calls are keyed per portal)",
        }
    ]
)
def call_by_pbx(pbx: str, pbx_call_id: str) -> Response:
    """A call by the PBX's own id."""
    storable = id_problem(pbx, MAX_PBX_LENGTH) is None and id_problem(pbx_call_id) is None
    portal = request.args.get("portal") or None
    with _db().read() as session:
        try:
            call = find_by_pbx(session, pbx, pbx_call_id, portal) if storable else None  # else no row can have it
        except AmbiguousCall as ambiguous:
            problem = f"must be one of: {', '.join(ambiguous.portals)} (each has a call with this id)"
            raise ApiError(409, "ambiguous_call", displayable(str(ambiguous)), {"portal": [problem]}) from None
        if call is None:
            raise ApiError(
                404, "unknown_call", displayable(f"no call {pbx_call_id!r} from PBX {pbx!r} has reached the service")
            )
        return jsonify(displayable(describe_call(session, call)))


@bp.get("/jobs")
@documented(200, JobListSchema, (422, "unknown state, or a limit that is not a whole number from 1 to 1000"))
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
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_JOBS_LISTED, "default": 100},
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
        limit = int(request.args.get("limit", "100"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_JOBS_LISTED:
        raise ApiError(
            422,
            "invalid_query",
            "limit is out of range",
            {"limit": [f"must be a whole number from 1 to {MAX_JOBS_LISTED}"]},
        )
    with _db().read() as session:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state is not None:
            query = query.where(Job.state == state)
        jobs = [describe_job(job) for job in session.scalars(query)]
        return jsonify(displayable({"counts": outbox.counts_by_state(session), "jobs": jobs}))


@bp.post(f"/jobs/<int(max={MAX_ROW_ID}):job_id>/retry")
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
        return jsonify(displayable(describe_job(job))), 202


def _event_outcome(state: str, error: dict[str, Any], apply_job: Job | None, folded: bool) -> tuple[str, str | None]:
    """What happened to a stored event, in one word, and why when it did not go through."""
    if state in ("rejected", "replaying"):
        return "rejected", field_summary(error.get("fields") or {}) or str(error.get("message", "")) or None
    if state == "replayed":
        return "replayed", f"replayed as event {error.get('replayed_as')} after a fix"
    if apply_job is not None and apply_job.state == "dead":
        return "failed", apply_job.last_error
    if (apply_job is None and folded) or (apply_job is not None and apply_job.state == "done"):
        return "folded", None
    return "accepted", None


def describe_event(session: Session, event_id: int) -> dict[str, Any] | None:
    """One stored inbound event and what it became (None: no such event). Never its body."""
    row = session.execute(
        select(
            InboundEvent.id,
            InboundEvent.source,
            InboundEvent.provider,
            InboundEvent.received_at,
            InboundEvent.content_type,
            InboundEvent.query,
            InboundEvent.state,
            InboundEvent.error,
            InboundEvent.call_id,
            InboundEvent.purged_at,
            func.length(InboundEvent.body).label("body_bytes"),
        ).where(InboundEvent.id == event_id)
    ).one_or_none()
    if row is None:
        return None
    error = dict(row.error or {}) if isinstance(row.error, dict) else {}
    parts = list(
        session.scalars(select(TranscriptPart).where(TranscriptPart.event_id == event_id).order_by(TranscriptPart.id))
    )
    part_ids = [part.id for part in parts]
    became = or_(Job.event_id == event_id, Job.transcript_id.in_(part_ids)) if part_ids else Job.event_id == event_id
    jobs = list(session.scalars(select(Job).where(became).order_by(Job.id)))
    apply_job = next((job for job in jobs if job.kind == "apply"), None)
    call_id = row.call_id or next((part.call_id for part in parts if part.call_id is not None), None)
    call = session.get(Call, call_id) if call_id is not None else None
    described = describe_call(session, call) if call is not None else None
    outcome, reason = _event_outcome(row.state, error, apply_job, call is not None or bool(parts))
    transcripts = [t for t in (described or {}).get("transcripts", []) if t["id"] in part_ids]
    return {
        "id": row.id,
        "source": row.source,
        "provider": row.provider,
        "received_at": iso(row.received_at),
        "content_type": row.content_type,
        "query": row.query or {},
        "body_bytes": row.body_bytes or 0,
        "state": row.state,
        "outcome": outcome,
        "reason": reason,
        "fields": error.get("fields") if row.state in ("rejected", "replaying") else None,
        "replayed_as": error.get("replayed_as"),
        "purged_at": iso(row.purged_at),
        "call": None
        if described is None
        else {key: described[key] for key in ("id", "pbx", "pbx_call_id", "b24_call_id", "portal", "stage")},
        "transcripts": transcripts,
        "jobs": [describe_job(job) for job in jobs],
    }


@bp.get(f"/events/<int(max={MAX_ROW_ID}):event_id>")
@documented(200, EventSchema, (404, "no such event"))
def event(event_id: int) -> Response:
    """One stored inbound event: when, from whom, accepted, folded or rejected (and why), and what it became."""
    with _db().read() as session:
        shown = describe_event(session, event_id)
    if shown is None:
        raise ApiError(404, "unknown_event", f"no event {event_id}")
    return jsonify(displayable(shown))


def portals_snapshot() -> Snapshot:
    """Every portal as the database has it now (not the hooks' cached view: these pages are read rarely)."""
    settings: Settings = current_app.extensions["b24scribe.settings"]
    return Directory(_db(), settings).snapshot()


def describe_portals(session: Session, snapshot: Snapshot, settings: Settings, now: float) -> list[dict[str, Any]]:
    """Each portal of `snapshot`, webhook and installed: its state and what to do about it, its own
    inbound token, its pacing and its jobs still to go or given up. Never an OAuth token, the
    application_token or a webhook URL (the caller shows this to admins only: it holds inbound tokens)."""
    names = list(snapshot.portals)
    if not names:
        return []
    rows = {row.name: row for row in session.scalars(select(Portal).where(Portal.name.in_(names)))}
    pacing = {row.portal: row for row in session.scalars(select(PortalPacing).where(PortalPacing.portal.in_(names)))}
    jobs: dict[str, dict[str, int]] = {name: dict.fromkeys(PORTAL_JOB_STATES, 0) for name in names}
    for portal, state, count in session.execute(
        select(Job.portal, Job.state, func.count())
        .where(Job.state.in_(PORTAL_JOB_STATES), Job.portal.in_(names))
        .group_by(Job.portal, Job.state)
    ):
        jobs[str(portal)][state] = count  # never None: the query names the portals
    pace = pace_from(settings)
    described = []
    for name, info in snapshot.portals.items():
        row = rows.get(name) if info.kind == "application" else None  # a webhook portal of that name wins
        bucket = pacing.get(name)
        paused = bucket is not None and bucket.paused_until > now
        described.append(
            {
                "name": name,
                "kind": info.kind,
                "member_id": info.member_id,
                "state": str(info.state),
                "state_reason": info.state_reason,
                "fix": portal_fix(name, info.state),
                "inbound_token": info.inbound_token,
                "installed_at": iso(row.installed_at) if row is not None else None,
                "refreshed_at": iso(row.refreshed_at) if row is not None else None,
                "refreshes": row.refreshes if row is not None else None,
                "pacing": None
                if bucket is None
                else {
                    "tokens": round(pace.tokens_at(bucket.tokens, bucket.refilled_at, now), 1),
                    "paused_until": iso(bucket.paused_until) if paused else None,
                    "pause_reason": bucket.pause_reason if paused else None,
                },
                "jobs": {str(state): count for state, count in jobs[name].items()},
            }
        )
    return described


@bp.get("/portals")
@documented(200, PortalListSchema)
def list_portals() -> Response:
    """Every portal, webhook and installed: state, its own inbound token, pacing and jobs waiting or dead."""
    settings: Settings = current_app.extensions["b24scribe.settings"]
    snapshot = portals_snapshot()
    with _db().read() as session:
        portals = describe_portals(session, snapshot, settings, time.time())
    return jsonify(displayable({"portals": portals}))

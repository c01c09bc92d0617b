"""The status page under `/status/`: what failed and why, for the integrator and the admin, in a browser.

Server-rendered (Jinja, inline CSS, no script, no CDN). Authenticated with B24SCRIBE_ADMIN_TOKEN:
a login form sets it in an HttpOnly, SameSite=Strict cookie scoped to /status, or a client sends
`Authorization: Bearer`. Every POST carries a CSRF token derived from the admin token. Fails
closed: no admin token configured, no page.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, url_for
from sqlalchemy import select
from werkzeug.wrappers import Response as BaseResponse

from b24scribe import outbox
from b24scribe.calls import describe_call, iso
from b24scribe.db import Database
from b24scribe.models import Call, InboundEvent, Job, TranscriptPart
from b24scribe.replay import field_summary, replay_event
from b24scribe.settings import Settings
from handlers.admin import is_admin_token

bp = Blueprint("status", __name__, url_prefix="/status", template_folder="templates")
COOKIE = "b24scribe_admin"
OPEN_ENDPOINTS = {"status.login"}
RECENT_CALLS = 50
LISTED = 100
# What a redirect after a button may tell the page: fixed texts, so no text from a URL is ever shown.
NOTICES = {
    "retried": "Job {id} is queued again.",
    "not-dead": "Job {id} is not dead, so it was left alone.",
    "accepted": "Event {id} now passes and is stored as a new event.",
    "duplicate": "Event {id} had already been stored.",
    "rejected": "Event {id} is still rejected: its reason is below.",
    "retranslated": "Event {id} was translated again.",
    "skipped": "Event {id} was left as it is.",
    "missing": "There is no event {id}.",
}


def _db() -> Database:
    db: Database = current_app.extensions["b24scribe.db"]
    return db


def _settings() -> Settings:
    settings: Settings = current_app.extensions["b24scribe.settings"]
    return settings


def csrf_token() -> str:
    """The form token: bound to the admin token, so it stops working when the token changes."""
    secret = (_settings().admin_token or "").encode()
    return hmac.new(secret, b"b24scribe status page csrf", hashlib.sha256).hexdigest()


def _authenticated() -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and is_admin_token(given.strip()):
        return True
    return is_admin_token(request.cookies.get(COOKIE))


def _notice() -> str | None:
    ident = request.args.get("id", "")
    text = NOTICES.get(request.args.get("notice", ""))
    return text.format(id=ident) if text and ident.isdigit() else None


def _page(template: str, status: int = 200, **context: Any) -> Response:
    html = render_template(template, csrf_token=csrf_token(), nonce=g.csp_nonce, notice=_notice(), **context)
    return Response(html, status=status, mimetype="text/html")


@bp.before_request
def require_admin() -> BaseResponse | None:
    """Fails closed: no admin token, no page; POSTs need the CSRF token too."""
    g.csp_nonce = secrets.token_urlsafe(16)
    if _settings().admin_token is None:
        return _page("status_disabled.html", 403)
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    if not _authenticated():
        if request.method == "GET":
            return redirect(url_for("status.login"))
        return _page("status_login.html", 401, error="Sign in first.")
    if request.method == "POST" and not hmac.compare_digest(request.form.get("csrf_token", ""), csrf_token()):
        return _page("status_message.html", 403, message="The form expired: reload the page and try again.")
    return None


@bp.after_request
def secure_headers(response: Response) -> Response:
    """No scripts at all, styles only from our own inline block, never framed, never cached."""
    nonce = g.get("csp_nonce", "")
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse:
    """The admin token form; a right token is kept in an HttpOnly cookie for /status only."""
    if request.method == "GET":
        return _page("status_login.html")
    given = request.form.get("token", "").strip()
    if not is_admin_token(given):
        return _page("status_login.html", 401, error="That is not the admin token (B24SCRIBE_ADMIN_TOKEN).")
    response = redirect(url_for("status.overview"))
    response.set_cookie(
        COOKIE, given, httponly=True, samesite="Strict", secure=request.is_secure, path=bp.url_prefix or "/"
    )
    return response


@bp.post("/logout")
def logout() -> BaseResponse:
    """Forget the cookie."""
    response = redirect(url_for("status.login"))
    response.delete_cookie(COOKIE, path=bp.url_prefix or "/", httponly=True, samesite="Strict")
    return response


def _call_row(call: Call) -> dict[str, Any]:
    return {
        "id": call.id,
        "pbx": call.pbx,
        "pbx_call_id": call.pbx_call_id,
        "b24_call_id": call.b24_call_id,
        "stage": call.stage,
        "portal": call.portal,
        "direction": call.direction,
        "started_at": call.started_at,
        "duration": call.duration,
        "status": call.status,
        "last_error": call.last_error,
        "updated_at": iso(call.updated_at),
    }


@bp.get("/")
def overview() -> Response:
    """Recent calls, transcripts waiting or failed, dead jobs and rejected events."""
    with _db().read() as session:
        counts = outbox.counts_by_state(session)
        calls = [
            _call_row(call)
            for call in session.scalars(
                select(Call).order_by(Call.updated_at.desc(), Call.id.desc()).limit(RECENT_CALLS)
            )
        ]
        parts = session.scalars(
            select(TranscriptPart)
            .where(TranscriptPart.delivery_state.in_(("queued", "failed")))
            .order_by(TranscriptPart.id.desc())
            .limit(LISTED)
        ).all()
        described: dict[int, dict[str, Any]] = {}
        transcripts = []
        for part in parts:
            if part.call_id is None:
                continue
            if part.call_id not in described:
                described[part.call_id] = describe_call(session, session.get_one(Call, part.call_id))
            call = described[part.call_id]
            shown = next((t for t in call["transcripts"] if t["id"] == part.id), None)
            if shown is not None and shown["state"] not in ("delivered", "empty"):
                transcripts.append({**shown, "call": call})
        dead_jobs = [
            {
                "id": job.id,
                "kind": job.kind,
                "call": job.call_id,
                "attempts": job.attempts,
                "last_error": job.last_error,
                "updated_at": iso(job.updated_at),
            }
            for job in session.scalars(
                select(Job).where(Job.state == "dead").order_by(Job.updated_at.desc()).limit(LISTED)
            )
        ]
        rejected = [
            {
                "id": event.id,
                "source": event.source,
                "provider": event.provider,
                "received_at": iso(event.received_at),
                "reason": field_summary((event.error or {}).get("fields") or {})
                or (event.error or {}).get("message", ""),
            }
            for event in session.scalars(
                select(InboundEvent)
                .where(InboundEvent.state.in_(("rejected", "replaying")))
                .order_by(InboundEvent.id.desc())
                .limit(LISTED)
            )
        ]
    return _page(
        "status_overview.html",
        counts=counts,
        calls=calls,
        transcripts=transcripts,
        dead_jobs=dead_jobs,
        rejected=rejected,
    )


@bp.get("/calls/<int:call_id>")
def call_page(call_id: int) -> Response:
    """One call: Bitrix24 CALL_ID and stage, each transcript's state and reason, each job."""
    with _db().read() as session:
        call = session.get(Call, call_id)
        if call is None:
            return _page("status_message.html", 404, message=f"No call {call_id}.")
        shown = describe_call(session, call)
    for job in shown["jobs"]:
        job.pop("request", None)  # holds the transcript's text: not for a status page
    return _page("status_call.html", call=shown)


def _back(notice: str, ident: int) -> BaseResponse:
    """Back to the page the button was on (only a /status page), saying what happened."""
    target = request.form.get("next", "").split("?")[0]
    if not target.startswith(f"{bp.url_prefix}/") or "//" in target or "\\" in target:
        target = url_for("status.overview")
    return redirect(f"{target}?{urlencode({'notice': notice, 'id': ident})}", code=303)


@bp.post("/jobs/<int:job_id>/retry")
def retry_job(job_id: int) -> BaseResponse:
    """Replay a dead job now, with a fresh attempt count."""
    with _db().write() as session:
        job = session.get(Job, job_id)
        if job is None:
            return _page("status_message.html", 404, message=f"No job {job_id}.")
        if job.state != "dead":
            return _back("not-dead", job_id)
        outbox.replay(session, job_id)
    return _back("retried", job_id)


@bp.post("/events/<int:event_id>/replay")
def replay(event_id: int) -> BaseResponse:
    """Parse a rejected event again (after a fix) and store it if it now passes."""
    outcome = replay_event(_db(), _settings(), event_id)
    return _back(outcome.outcome, event_id)

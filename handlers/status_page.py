"""The status page under `/status/`: what failed and why, for the integrator and the admin, in a browser.

Server-rendered (Jinja, inline CSS, no script, no CDN). Authenticated with B24SCRIBE_ADMIN_TOKEN:
the sign-in form checks it and sets a signed, expiring session cookie (never the token itself;
HttpOnly, SameSite=Lax, scoped to /status, `Secure` when the request came over https or
B24SCRIBE_PUBLIC_URL is https, which is how a service behind a TLS-terminating proxy knows), or a
client sends `Authorization: Bearer`. The session is signed with a key derived from the admin token,
so rotating the token ends every session. Failed sign-ins are slowed down per client address. Every
POST carries a CSRF token derived from the admin token. Fails closed: no admin token configured, no
page. Everything stored is shown through `displayable`, so no stored byte can break a page.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, url_for
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import func, select
from sqlalchemy.orm import defer
from werkzeug.wrappers import Response as BaseResponse

from b24scribe import outbox
from b24scribe.calls import describe_call, iso
from b24scribe.db import Database
from b24scribe.models import Call, InboundEvent, Job, JobState, TranscriptPart
from b24scribe.replay import field_summary, replay_event
from b24scribe.settings import Settings
from b24scribe.sources import Sources
from handlers.admin import MAX_ROW_ID, describe_portals, displayable, is_admin_token, portals_snapshot

bp = Blueprint("status", __name__, url_prefix="/status", template_folder="templates")
COOKIE = "b24scribe_admin"
SESSION_SECONDS = 12 * 3600
OPEN_ENDPOINTS = {"status.login"}
RECENT_CALLS = 50
SHOWN_JOB_STATES = (JobState.PENDING, JobState.WAITING, JobState.LEASED, JobState.DEAD)
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


def _sources() -> Sources:
    sources: Sources = current_app.extensions["b24scribe.sources"]
    return sources


def _settings() -> Settings:
    settings: Settings = current_app.extensions["b24scribe.settings"]
    return settings


def csrf_token() -> str:
    """The form token: bound to the admin token, so it stops working when the token changes."""
    secret = (_settings().admin_token or "").encode()
    return hmac.new(secret, b"b24scribe status page csrf", hashlib.sha256).hexdigest()


def _sessions() -> URLSafeTimedSerializer:
    """Signs session cookies with a key derived from the admin token: a new token ends every session."""
    secret = hmac.new((_settings().admin_token or "").encode(), b"b24scribe status page session", hashlib.sha256)
    return URLSafeTimedSerializer(secret.hexdigest(), salt="b24scribe.status.session")


def new_session() -> str:
    """A session cookie's value: signed and timestamped, holding nothing secret."""
    return _sessions().dumps({"admin": True, "nonce": secrets.token_urlsafe(8)})


def valid_session(value: str | None) -> bool:
    """Whether a cookie holds a session signed with the current admin token and under SESSION_SECONDS old."""
    if not value:
        return False
    try:
        content = _sessions().loads(value, max_age=SESSION_SECONDS)
    except BadSignature:  # SignatureExpired is one too
        return False
    return isinstance(content, dict) and content.get("admin") is True


def _authenticated() -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and is_admin_token(given.strip()):
        return True
    return valid_session(request.cookies.get(COOKIE))


def _cookie_secure() -> bool:
    # X-Forwarded-Proto is not trusted (anyone can send it); B24SCRIBE_PUBLIC_URL is the operator's word.
    return request.is_secure or (_settings().public_url or "").startswith("https://")


class SignInThrottle:
    """Slows down failed sign-ins per client address: after n failures in a row, the next attempt is
    refused (429, without looking at the token) until a delay doubling from 1 s up to 60 s has passed,
    and each failed answer itself waits up to 2 s. Memory is bounded (the least recently failing
    addresses are forgotten first); a success or 15 quiet minutes forget an address. Per process.

    `sleep` is time.sleep: gevent patches it, so a waiting sign-in never blocks other requests.
    """

    MAX_ADDRESSES = 10_000
    FORGET_AFTER = 15 * 60.0
    MAX_DELAY = 60.0
    MAX_ANSWER_WAIT = 2.0

    def __init__(self, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.clock = clock
        self.sleep = sleep
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # address: (failures, last failure)
        self._lock = threading.Lock()

    def delay(self, failures: int) -> float:
        """Seconds an address must wait after this many failures in a row."""
        return 0.0 if failures <= 0 else min(self.MAX_DELAY, 2.0 ** (failures - 1))

    def wait_left(self, address: str) -> float:
        """Seconds before this address may try again (0: now)."""
        with self._lock:
            failures, last = self._failures.get(address, (0, 0.0))
        if failures and self.clock() - last > self.FORGET_AFTER:
            return 0.0
        return max(0.0, last + self.delay(failures) - self.clock())

    def failed(self, address: str) -> None:
        """Count a failure and make the answer wait (without holding the lock)."""
        now = self.clock()
        with self._lock:
            failures, last = self._failures.pop(address, (0, 0.0))
            if now - last > self.FORGET_AFTER:
                failures = 0
            failures += 1
            self._failures[address] = (failures, now)
            while len(self._failures) > self.MAX_ADDRESSES:
                self._failures.popitem(last=False)
        self.sleep(min(self.MAX_ANSWER_WAIT, self.delay(failures)))

    def succeeded(self, address: str) -> None:
        """Forget the address's failures."""
        with self._lock:
            self._failures.pop(address, None)


def throttle() -> SignInThrottle:
    """The app's sign-in throttle (one per process)."""
    found: SignInThrottle | None = current_app.extensions.get("b24scribe.sign_in_throttle")
    if found is None:
        found = current_app.extensions.setdefault("b24scribe.sign_in_throttle", SignInThrottle())
    return found


def _notice() -> str | None:
    ident = request.args.get("id", "")
    text = NOTICES.get(request.args.get("notice", ""))
    return text.format(id=ident) if text and ident.isdigit() else None


def _page(template: str, status: int = 200, **context: Any) -> Response:
    context = displayable(context)  # lone surrogates, NUL, control characters: shown as U+FFFD, never a 500
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
    # bytes: compare_digest refuses str with non-ASCII characters (a hostile form field was a 500)
    given = request.form.get("csrf_token", "").encode("utf-8", "surrogatepass")
    if request.method == "POST" and not hmac.compare_digest(given, csrf_token().encode()):
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
    """The admin token form; a right token starts a signed session, kept in an HttpOnly cookie for /status only."""
    if request.method == "GET":
        return _page("status_login.html")
    address = request.remote_addr or "unknown"
    wait = throttle().wait_left(address)
    if wait > 0:
        page = _page("status_login.html", 429, error=f"Too many failed sign-ins: try again in {wait:.0f} s.")
        page.headers["Retry-After"] = str(max(1, round(wait)))
        return page
    given = request.form.get("token", "").strip()
    if not is_admin_token(given):
        throttle().failed(address)
        return _page("status_login.html", 401, error="That is not the admin token (B24SCRIBE_ADMIN_TOKEN).")
    throttle().succeeded(address)
    response = redirect(url_for("status.overview"))
    response.set_cookie(
        COOKIE,
        new_session(),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="Lax",
        secure=_cookie_secure(),
        path=bp.url_prefix or "/",
    )
    return response


@bp.post("/logout")
def logout() -> BaseResponse:
    """Forget the cookie."""
    response = redirect(url_for("status.login"))
    response.delete_cookie(COOKIE, path=bp.url_prefix or "/", httponly=True, samesite="Lax", secure=_cookie_secure())
    return response


def _hook_rows() -> list[dict[str, Any]]:
    """Each source of the registry: the URL to paste into the PBX or vendor, and how it may sign in."""
    settings = _settings()
    base = settings.public_url or request.host_url.rstrip("/")
    rows = []
    for source in _sources():
        signatures = [
            f"{scheme.name} ({'set' if scheme.configured(settings, source.name) else 'secret not set'})"
            for scheme in source.signatures
        ]
        rows.append(
            {
                "kind": source.kind,
                "name": source.name,
                "url": f"{base}/hooks/{source.kind}/{source.name}",
                "summary": source.summary,
                "auth": ", ".join(["token" if settings.inbound_token else "token (not set)", *signatures]),
            }
        )
    return rows


def _install_url() -> str:
    """The local application's installation callback, as a portal's administrator enters it."""
    return f"{_settings().public_url or request.host_url.rstrip('/')}/b24/install"


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
    """Portals needing attention, dead jobs, transcripts waiting or failed, rejected events, recent
    calls, then the portals and hooks as configured."""
    snapshot = portals_snapshot()
    with _db().read() as session:
        portals = describe_portals(session, snapshot, _settings(), time.time())
        # one index range per state (the done history is not counted: it only grows)
        counts = {
            state: session.scalar(select(func.count()).select_from(Job).where(Job.state == state)) or 0
            for state in SHOWN_JOB_STATES
        }
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
                "purged_at": iso(event.purged_at),
            }
            for event in session.scalars(
                select(InboundEvent)
                .options(defer(InboundEvent.body))  # up to 20 MiB each, and never shown
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
        hooks=_hook_rows(),
        portals=portals,
        attention=[portal for portal in portals if portal["fix"]],
        install_url=_install_url() if _settings().app_mode else None,
    )


@bp.get(f"/calls/<int(max={MAX_ROW_ID}):call_id>")
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


@bp.post(f"/jobs/<int(max={MAX_ROW_ID}):job_id>/retry")
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


@bp.post(f"/events/<int(max={MAX_ROW_ID}):event_id>/replay")
def replay(event_id: int) -> BaseResponse:
    """Parse a rejected event again (after a fix) and store it if it now passes."""
    outcome = replay_event(_db(), _settings(), _sources(), event_id)
    return _back(outcome.outcome, event_id)

"""Portals (contract §8): the webhook portals of the settings, and the portals that installed the
local application, with their OAuth tokens, states and inbound tokens.

Three parts:

- `Directory`: which portals exist and what their inbound tokens open, for the hooks' hot path (a
  per-process view of the `portal` table, read again after `TTL_SECONDS`, or at once after an
  install in this process) and for the admin API.
- `install` / `uninstall`: what `POST /b24/install` and `POST /b24/events` store, after the offer
  has been verified (`verify_offer`).
- `OAuthTokens`: an installed portal's access token for the sender, and the one refresh on
  `expired_token`, under a lock every process and host shares (the portal's row: `SELECT … FOR
  UPDATE` on PostgreSQL, the database's write lock on SQLite). The rotated refresh token is
  committed before the new access token is used; a worker that waited for the lock finds the token
  changed and uses the new one instead of refreshing again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
import structlog
from marshmallow import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from b24scribe.bitrix24 import Bitrix24Error, TransientError
from b24scribe.db import Database
from b24scribe.limits import MAX_PORTAL_LENGTH, id_problem
from b24scribe.models import Job, JobState, Portal, PortalState
from b24scribe.settings import Settings

log = structlog.get_logger(__name__)

TTL_SECONDS = 2.0  # how stale a process's view of the installed portals may be
OAUTH_TIMEOUT_SECONDS = 10.0  # the refresh runs under the portal's lock: never for long
# the reason a job of a portal that cannot be called waits with (matched when the portal comes back)
PORTAL_WAITING = "waiting for the portal to install the local application again (see GET /v1/portals)"
WRONG_AUTH_TYPE_HINT = (
    "this method works only for a Bitrix24 application, not an incoming webhook: "
    "install b24scribe as a local application (README: Application mode)"
)


class PortalUnavailable(Bitrix24Error):
    """The portal cannot be called until the local application is installed again: its jobs wait
    (no attempt spent), and come back by themselves after a re-install."""

    retryable = True


@dataclass(frozen=True, slots=True)
class PortalInfo:
    """A portal as the hooks and the admin API see it."""

    name: str
    kind: str  # "webhook" | "application"
    state: str  # "configured" for webhook portals, else a PortalState
    member_id: str | None = None
    inbound_token: str | None = None
    state_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every portal at one moment: by name, by member_id and by inbound token."""

    portals: Mapping[str, PortalInfo]
    by_member: Mapping[str, str] = field(default_factory=dict)
    # the portals' own inbound tokens by their SHA-256: a hook finds a token's portal with one lookup,
    # however many portals there are, and compares the token itself in constant time
    _by_token_digest: Mapping[bytes, PortalInfo] = field(init=False)

    def __post_init__(self) -> None:
        index = {_digest(info.inbound_token): info for info in self.portals.values() if info.inbound_token}
        object.__setattr__(self, "_by_token_digest", index)

    def resolve(self, value: str) -> str | None:
        """A portal's name from its name, its domain or its member_id."""
        if value in self.portals:
            return value
        if (name := self.by_member.get(value)) is not None:
            return name
        lowered = value.lower()
        return lowered if lowered in self.portals else None

    def by_token(self, token: str) -> str | None:
        """The portal whose own inbound token this is."""
        info = self._by_token_digest.get(_digest(token))
        if info is None or info.inbound_token is None:
            return None
        return info.name if hmac.compare_digest(info.inbound_token.encode(), token.encode()) else None

    @property
    def has_tokens(self) -> bool:
        return bool(self._by_token_digest)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Directory:
    """A process's view of the portals, read again at most every `TTL_SECONDS`."""

    def __init__(self, db: Database | None, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._read_at = 0.0

    def invalidate(self) -> None:
        with self._lock:
            self._snapshot = None

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        with self._lock:
            if self._snapshot is not None and now - self._read_at < TTL_SECONDS:
                return self._snapshot
        snapshot = self._read()
        with self._lock:
            self._snapshot, self._read_at = snapshot, now
        return snapshot

    def _read(self) -> Snapshot:
        settings = self.settings
        portals: dict[str, PortalInfo] = {
            name: PortalInfo(name, "webhook", "configured", inbound_token=settings.portal_tokens.get(name))
            for name in settings.portal_urls()
        }
        by_member: dict[str, str] = {}
        if self.db is not None and settings.app_mode:
            with self.db.read() as session:
                for row in session.scalars(select(Portal).order_by(Portal.id)):
                    if row.name in portals:
                        continue  # a webhook portal of the same name wins: it is configured
                    portals[row.name] = PortalInfo(
                        row.name, "application", row.state, row.member_id, row.inbound_token, row.state_reason
                    )
                    by_member[row.member_id] = row.name
        return Snapshot(portals, by_member)

    def default(self, snapshot: Snapshot) -> str | None:
        """The portal a hook without `?portal=` goes to: the settings' portal, else the only
        installed one; None when there are several installed portals and no webhook one."""
        if self.settings.portal_urls() or not self.settings.app_mode:
            return self.settings.portal
        names = list(snapshot.portals)
        return names[0] if len(names) == 1 else None


def resolve_hook_portal(settings: Settings, directory: Directory, named: str | None) -> str:
    """The portal a hook without a portal's own token goes to: `?portal=` (a name, domain or
    member_id), else the default one. ValidationError naming `portal` when there is none."""
    snapshot = directory.snapshot()
    if named is None:
        default = directory.default(snapshot)
        if default is None:
            problem = (
                "several portals are installed: name one with ?portal=<member_id or domain>"
                if snapshot.portals
                else "no portal has installed the local application yet (or set B24SCRIBE_BITRIX24_WEBHOOK_URL)"
            )
            raise ValidationError({"portal": [problem]})
        return default
    if (found := snapshot.resolve(named)) is not None or named == settings.portal:
        return found or named
    if not snapshot.portals and not settings.app_mode:
        # dry-run: any printable label that fits the column is fine, nothing is sent
        if (label_problem := id_problem(named, MAX_PORTAL_LENGTH)) is not None:
            raise ValidationError({"portal": [label_problem]})
        return named
    known = ", ".join(sorted(snapshot.portals)) or "none yet"
    raise ValidationError({"portal": [f"must be a portal's name, domain or member_id; known: {known}"]})


# --- Installation ----------------------------------------------------------------------------


class InstallRefused(Exception):
    """An install or event that is not taken: `status` (403, 409, 422) and a message safe to show."""

    def __init__(self, status: int, message: str, field_name: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field_name


@dataclass(frozen=True, slots=True)
class Offer:
    """What an ONAPPINSTALL event offers: a portal's identity and its tokens."""

    member_id: str
    domain: str
    client_endpoint: str
    access_token: str
    refresh_token: str
    expires_at: float
    application_token: str


INSTALL_FIELDS = {
    "member_id": "auth[member_id]",
    "domain": "auth[domain]",
    "client_endpoint": "auth[client_endpoint]",
    "access_token": "auth[access_token]",
    "refresh_token": "auth[refresh_token]",
    "application_token": "auth[application_token]",
}
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
MAX_FIELD_LENGTHS = {"member_id": 64, "domain": 200, "application_token": 64}


def read_offer(form: Mapping[str, str], now: float) -> Offer:
    """The offer in an ONAPPINSTALL form, or InstallRefused(422) naming the field."""
    values: dict[str, Any] = {}
    for name, key in INSTALL_FIELDS.items():
        value = (form.get(key) or "").strip()
        if not value:
            raise InstallRefused(422, f"{key} is missing", key)
        if len(value) > MAX_FIELD_LENGTHS.get(name, 2000) or not value.isprintable():
            raise InstallRefused(422, f"{key} is not a valid value", key)
        values[name] = value
    endpoint = urlsplit(values["client_endpoint"])
    # https only (plain http for a portal on this machine: local testing); the install is verified by
    # a request to it, so it must be a portal's REST URL, never any URL an anonymous poster names
    plain_local = endpoint.scheme == "http" and (endpoint.hostname or "") in LOOPBACK_HOSTS
    if (endpoint.scheme != "https" and not plain_local) or not endpoint.netloc or not endpoint.path.endswith("/rest/"):
        message = "auth[client_endpoint] must be the portal's https REST URL ending with /rest/"
        raise InstallRefused(422, message, "auth[client_endpoint]")
    values["domain"] = values["domain"].lower()
    values["expires_at"] = now + _expires_in(form)
    return Offer(**values)


def _expires_in(form: Mapping[str, str]) -> float:
    try:
        seconds = float(form.get("auth[expires_in]") or 3600)
    except ValueError:
        seconds = 3600.0
    return min(max(seconds, 0.0), 86400.0) if seconds == seconds else 3600.0


def verify_offer(offer: Offer, settings: Settings) -> None:
    """Ask the portal whose application the offered token is (`app.info`): it must be ours."""
    try:
        answer = requests.post(
            offer.client_endpoint + "app.info.json",
            json={"auth": offer.access_token},
            timeout=min(settings.bitrix24_timeout, OAUTH_TIMEOUT_SECONDS),
            allow_redirects=False,
        )
        body = answer.json()
    except (requests.RequestException, ValueError):
        message = "the offered token could not be verified with app.info at auth[client_endpoint]"
        raise InstallRefused(403, message) from None
    result = body.get("result") if isinstance(body, dict) else None
    code = result.get("CODE") if isinstance(result, dict) else None
    ours = (settings.bitrix24_client_id or "").encode()
    if not isinstance(code, str) or not hmac.compare_digest(code.encode(), ours):
        raise InstallRefused(403, "the offered token is not for this application (app.info names another client id)")


def install(session: Session, offer: Offer, now: float) -> Portal:
    """Store the verified offer. A portal already installed takes new tokens only with the same
    application_token (403 otherwise); its inbound token is kept; its waiting jobs go again."""
    row = session.scalars(select(Portal).where(Portal.member_id == offer.member_id)).one_or_none()
    same_name = session.scalars(select(Portal).where(Portal.name == offer.domain)).one_or_none()
    if same_name is not None and same_name is not row:
        if same_name.state == PortalState.UNINSTALLED:
            session.delete(same_name)  # the domain moved to another member_id after an uninstall
            session.flush()
        else:
            raise InstallRefused(409, f"portal {offer.domain} is installed with another member_id")
    if row is None:
        row = Portal(
            member_id=offer.member_id,
            name=offer.domain,
            inbound_token=secrets.token_urlsafe(24),
            installed_at=now,
            refreshes=0,
        )
        session.add(row)
    elif (
        row.state != PortalState.UNINSTALLED
        and row.application_token is not None
        and not hmac.compare_digest(row.application_token.encode(), offer.application_token.encode())
    ):
        raise InstallRefused(403, "a re-install must carry the application_token the portal was installed with")
    if row.state == PortalState.UNINSTALLED:
        row.installed_at = now
    row.name = offer.domain
    row.client_endpoint, row.access_token, row.refresh_token = (
        offer.client_endpoint,
        offer.access_token,
        offer.refresh_token,
    )
    row.expires_at, row.application_token = offer.expires_at, offer.application_token
    row.state, row.state_reason, row.updated_at = PortalState.INSTALLED, None, now
    session.flush()
    resume_jobs(session, row.name, now)
    return row


def resume_jobs(session: Session, portal: str, now: float) -> int:
    """The portal can be called again: its jobs put off for it are due now."""
    result = session.execute(
        update(Job)
        .where(
            Job.portal == portal,
            Job.state == JobState.PENDING,
            Job.last_error == PORTAL_WAITING,
            Job.next_attempt_at > now,
        )
        .values(next_attempt_at=now, updated_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def check_event(session: Session, form: Mapping[str, str]) -> Portal:
    """The installed portal an event comes from, if it carries that portal's application_token."""
    member_id = (form.get("auth[member_id]") or "").strip()
    token = (form.get("auth[application_token]") or "").strip()
    readable = 0 < len(member_id) <= MAX_FIELD_LENGTHS["member_id"] and member_id.isprintable()
    query = select(Portal).where(Portal.member_id == member_id)
    row = session.scalars(query).one_or_none() if readable else None  # never a NUL into a query
    if row is None or row.application_token is None or not token:
        raise InstallRefused(403, "unknown portal or application_token")
    if not hmac.compare_digest(row.application_token.encode(), token.encode()):
        raise InstallRefused(403, "the application_token does not match the portal's")
    return row


def uninstall(row: Portal, now: float) -> None:
    """ONAPPUNINSTALL: the tokens are removed; the portal's jobs wait for a re-install."""
    row.access_token = row.refresh_token = None
    row.expires_at = None
    row.state, row.state_reason, row.updated_at = PortalState.UNINSTALLED, "the application was uninstalled", now


def mark_needs_reinstall(session: Session, name: str, reason: str, now: float) -> None:
    session.execute(
        update(Portal)
        .where(Portal.name == name, Portal.state == PortalState.INSTALLED)
        .values(state=PortalState.NEEDS_REINSTALL, state_reason=reason[:500], updated_at=now)
    )


# --- OAuth ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request to an installed portal needs: where, and with which access token."""

    client_endpoint: str
    access_token: str


class OAuthTokens:
    """Installed portals' access tokens for one worker process, and their refresh."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self._lock = threading.Lock()
        self._cache: dict[str, Credentials] = {}

    def installed(self, name: str) -> bool:
        return self.credentials(name) is not None

    def credentials(self, name: str) -> Credentials | None:
        """The portal's endpoint and access token, or None when it is not an installed portal.
        PortalUnavailable when it is one that cannot be called now."""
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None:
            return cached
        with self.db.read() as session:
            row = session.scalars(select(Portal).where(Portal.name == name)).one_or_none()
            if row is None:
                return None
            found = _usable(row)
        with self._lock:
            self._cache[name] = found
        return found

    def forget(self, name: str) -> None:
        with self._lock:
            self._cache.pop(name, None)

    def refresh(self, name: str, used: Credentials) -> Credentials:
        """After `expired_token`: one refresh for every process, under the portal's row lock.

        If another worker refreshed while we waited for the lock, its token is used as it is.
        `invalid_grant` marks the portal as needing a re-install (PortalUnavailable); an OAuth
        server that cannot be reached is a TransientError (the job is retried later)."""
        self.forget(name)
        problem: Bitrix24Error | None = None
        fresh: Credentials | None = None
        with self.db.write() as session:
            query = select(Portal).where(Portal.name == name)
            if not self.db.is_sqlite:
                query = query.with_for_update()
            row = session.scalars(query).one_or_none()
            if row is None:
                raise PortalUnavailable(f"portal {name} is no longer installed")
            if row.access_token is not None and row.access_token != used.access_token:
                fresh = _usable(row)  # another worker refreshed it while we waited
            else:
                now = time.time()
                try:
                    answer = self._ask(row.refresh_token or "")
                except _Refused as refused:
                    row.state, row.state_reason, row.updated_at = PortalState.NEEDS_REINSTALL, refused.reason, now
                    message = f"portal {name} needs the local application installed again: {refused.reason}"
                    problem = PortalUnavailable(message)
                except Bitrix24Error as error:
                    problem = error
                else:
                    # persisted (committed below) before the new access token is used
                    row.access_token, row.refresh_token = answer["access_token"], answer["refresh_token"]
                    row.expires_at = now + float(answer.get("expires_in") or 3600)
                    if isinstance(answer.get("client_endpoint"), str) and answer["client_endpoint"].endswith("/rest/"):
                        row.client_endpoint = answer["client_endpoint"]
                    row.refreshed_at, row.refreshes, row.updated_at = now, (row.refreshes or 0) + 1, now
                    fresh = _usable(row)
                    log.info("oauth token refreshed", portal=name)
        if problem is not None:
            raise problem
        assert fresh is not None
        with self._lock:
            self._cache[name] = fresh
        return fresh

    def _ask(self, refresh_token: str) -> dict[str, Any]:
        settings = self.settings
        params = {
            "grant_type": "refresh_token",
            "client_id": settings.bitrix24_client_id or "",
            "client_secret": settings.bitrix24_client_secret or "",
            "refresh_token": refresh_token,
        }
        try:
            answer = requests.get(
                f"{settings.bitrix24_oauth_url}/oauth/token/",
                params=params,
                timeout=min(settings.bitrix24_timeout, OAUTH_TIMEOUT_SECONDS),
                allow_redirects=False,
            )
            body = answer.json()
        except requests.RequestException as exc:
            raise TransientError(f"the OAuth server could not be reached: {type(exc).__name__}") from None
        except ValueError:
            raise TransientError(f"the OAuth server answered HTTP {answer.status_code} without JSON") from None
        if not isinstance(body, dict):
            raise TransientError("the OAuth server answered with unexpected JSON")
        error = body.get("error")
        if error == "invalid_grant":
            raise _Refused(f"invalid_grant: {body.get('error_description') or 'the refresh token was refused'}")
        if error == "invalid_client":
            raise TransientError("invalid_client: the OAuth server refuses B24SCRIBE_BITRIX24_CLIENT_ID/CLIENT_SECRET")
        if error or not isinstance(body.get("access_token"), str) or not isinstance(body.get("refresh_token"), str):
            raise TransientError(f"the OAuth server answered HTTP {answer.status_code}: {error or 'no tokens'}")
        return body


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _usable(row: Portal) -> Credentials:
    if row.state != PortalState.INSTALLED or not row.access_token or not row.client_endpoint:
        state = row.state.replace("_", " ")
        raise PortalUnavailable(f"portal {row.name} is {state}: {row.state_reason or ''}".rstrip(": "))
    return Credentials(row.client_endpoint, row.access_token)

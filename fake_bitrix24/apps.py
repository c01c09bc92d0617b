"""Bitrix24 applications, their installations on portals, and the OAuth tokens they hold.

Plain records and the form payloads Bitrix24 posts to an application (``ONAPPINSTALL``,
``ONAPPUNINSTALL``); the behaviour (the OAuth server, REST with tokens) lives in oauth.py.
"""

from __future__ import annotations

import hashlib
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

ACCESS_TOKEN_TTL = 3600  # seconds an access token lives
REFRESH_TOKEN_TTL = 180 * 24 * 3600  # seconds a refresh token lives
AUTHORIZATION_CODE_TTL = 30  # seconds an authorization code lives
OAUTH_DOMAIN = "oauth.bitrix.info"  # the `domain` the OAuth server answers with
APP_STATUS_LOCAL = "L"
DEFAULT_APP_SCOPES = ("telephony",)
DEFAULT_LANGUAGE = "en"

# REST-side token errors (HTTP 401), as Bitrix24 sends them.
NO_AUTH_FOUND = ("NO_AUTH_FOUND", "Wrong authorization data")
INVALID_TOKEN = ("invalid_token", "Unable to get application by token")
EXPIRED_TOKEN = ("expired_token", "The access token provided has expired")
NOT_INSTALLED = ("NOT_INSTALLED", "Application not installed")
TOKEN_SCOPE_MISSING = (
    "insufficient_scope",
    "The request requires higher privileges than provided by the access token",
)


@dataclass(frozen=True)
class App:
    """A Bitrix24 application (local, "uses API only"): its OAuth client and scopes."""

    client_id: str
    client_secret: str
    scopes: tuple[str, ...] = DEFAULT_APP_SCOPES
    version: int = 1
    access_token_ttl: int = ACCESS_TOKEN_TTL


@dataclass
class Installation:
    """One application installed on one portal; the token fields are the current ones.

    The fake updates this object on every refresh, so read ``access_token`` and
    ``refresh_token`` again after a refresh (or keep a copy of the old ones to test rotation).
    """

    app: App
    member_id: str
    domain: str
    client_endpoint: str
    server_endpoint: str
    local_id: int  # the application's ID on the portal (app.info ``ID``)
    application_token: str
    access_token: str = ""
    refresh_token: str = ""
    expires: int = 0  # unix time the current access token expires
    user_id: int = 1  # the installing user
    language_id: str = DEFAULT_LANGUAGE
    installed: bool = True

    @property
    def client_id(self) -> str:
        """The application's client id (``CODE`` in app.info)."""
        return self.app.client_id

    @property
    def expires_in(self) -> int:
        """Lifetime of an access token in seconds."""
        return self.app.access_token_ttl

    @property
    def scope(self) -> str:
        """The granted scopes as Bitrix24 writes them: comma-separated."""
        return ",".join(self.app.scopes)

    @property
    def status(self) -> str:
        """``L``: a local application."""
        return APP_STATUS_LOCAL


@dataclass
class AccessToken:
    """An issued access token; ``retired`` says why it no longer works before it expires."""

    token: str
    member_id: str
    client_id: str
    expires_at: float
    retired: Literal["", "superseded", "uninstalled"] = ""


@dataclass
class RefreshToken:
    """An issued refresh token (or authorization code); anything but ``state`` "" is invalid."""

    token: str
    member_id: str
    client_id: str
    expires_at: float
    state: Literal["", "used", "revoked", "uninstalled"] = ""


@dataclass(frozen=True)
class TokenRequest:
    """One request to the OAuth server as the fake saw and answered it."""

    timestamp: float
    http_method: str
    grant_type: str
    client_id: str
    refresh_token: str  # the refresh token presented ("" for other grants)
    code: str  # the authorization code presented ("" for other grants)
    member_id: str | None  # the portal the presented token or code belongs to, if known
    status: int
    response: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when new tokens were issued."""
        return self.status == 200 and "access_token" in self.response


# --- Identifiers ---------------------------------------------------------------------------


def new_token() -> str:
    """An opaque token shaped like Bitrix24's (70 hex digits)."""
    return secrets.token_hex(35)


def new_client_id() -> str:
    """A local application's client id, shaped like ``local.5f0a1b2c3d4e5f.12345678``."""
    return f"local.{secrets.token_hex(7)}.{secrets.randbelow(10**8):08d}"


def new_client_secret() -> str:
    """A client secret shaped like Bitrix24's (50 letters and digits)."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(50))


def member_id_for(domain: str) -> str:
    """A portal's member_id: 32 hex digits, stable for a domain."""
    return hashlib.blake2b(domain.lower().encode(), digest_size=16).hexdigest()


# --- Payloads ------------------------------------------------------------------------------


def token_answer(installation: Installation) -> dict[str, Any]:
    """The OAuth server's success body for an installation's current tokens."""
    return {
        "access_token": installation.access_token,
        "expires": installation.expires,
        "expires_in": installation.expires_in,
        "scope": installation.scope,
        "domain": OAUTH_DOMAIN,
        "server_endpoint": installation.server_endpoint,
        "status": installation.status,
        "client_endpoint": installation.client_endpoint,
        "member_id": installation.member_id,
        "user_id": installation.user_id,
        "refresh_token": installation.refresh_token,
    }


def install_payload(installation: Installation, now: float) -> dict[str, str]:
    """The form fields Bitrix24 posts to the installation callback (``ONAPPINSTALL``)."""
    return {
        "event": "ONAPPINSTALL",
        "data[VERSION]": str(installation.app.version),
        "data[ACTIVE]": "Y",
        "data[INSTALLED]": "Y",
        "data[LANGUAGE_ID]": installation.language_id,
        "ts": str(int(now)),
        "auth[access_token]": installation.access_token,
        "auth[expires]": str(installation.expires),
        "auth[expires_in]": str(installation.expires_in),
        "auth[scope]": installation.scope,
        "auth[domain]": installation.domain,
        "auth[server_endpoint]": installation.server_endpoint,
        "auth[status]": installation.status,
        "auth[client_endpoint]": installation.client_endpoint,
        "auth[member_id]": installation.member_id,
        "auth[user_id]": str(installation.user_id),
        "auth[refresh_token]": installation.refresh_token,
        "auth[application_token]": installation.application_token,
    }


def uninstall_payload(installation: Installation, now: float, clean: bool = False) -> dict[str, str]:
    """The form fields of ``ONAPPUNINSTALL``: the application token, no OAuth tokens."""
    return {
        "event": "ONAPPUNINSTALL",
        "data[CLEAN]": "1" if clean else "0",
        "data[LANGUAGE_ID]": installation.language_id,
        "ts": str(int(now)),
        "auth[domain]": installation.domain,
        "auth[server_endpoint]": installation.server_endpoint,
        "auth[status]": installation.status,
        "auth[client_endpoint]": installation.client_endpoint,
        "auth[member_id]": installation.member_id,
        "auth[application_token]": installation.application_token,
    }


def app_info(installation: Installation) -> dict[str, Any]:
    """The ``app.info`` result for a call made with the installation's token."""
    language = installation.language_id
    return {
        "ID": str(installation.local_id),
        "CODE": installation.client_id,
        "VERSION": installation.app.version,
        "STATUS": installation.status,
        "INSTALLED": installation.installed,
        "PAYMENT_EXPIRED": "N",
        "DAYS": None,
        "LANGUAGE_ID": language,
        "LICENSE": f"{language}_project",
        "LICENSE_TYPE": "project",
        "LICENSE_FAMILY": "project",
    }


def installation_summary(installation: Installation) -> dict[str, Any]:
    """An installation as JSON (control endpoints, the command line)."""
    return {
        "member_id": installation.member_id,
        "domain": installation.domain,
        "client_id": installation.client_id,
        "client_endpoint": installation.client_endpoint,
        "server_endpoint": installation.server_endpoint,
        "access_token": installation.access_token,
        "refresh_token": installation.refresh_token,
        "expires": installation.expires,
        "expires_in": installation.expires_in,
        "scope": installation.scope,
        "application_token": installation.application_token,
        "user_id": installation.user_id,
        "installed": installation.installed,
    }

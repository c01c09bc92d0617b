"""Authenticating hooks before anything is stored (contract §4). Fails closed: no credential, no entry.

Two steps, so that a body is never read for a request that cannot be authenticated (contract §12):
`authenticate_before_body` checks what the headers and the query carry (a bearer token, a Basic
password, a vendor's token header, `?token=`); only when the request carries the headers of a
signature scheme its source accepts (Standard Webhooks, a cloud PBX's HMAC, ...) and whose secret
is set does it hand back that scheme, which the caller runs on the body it then reads (at most the
route's limit). A scheme sees the request as a `HookRequest`: method, full public URL, headers and
query, and the raw body bytes.
"""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from b24scribe.callbacks import credential_for
from b24scribe.settings import Settings

if TYPE_CHECKING:
    from b24scribe.sources import SignatureScheme

STANDARD_WEBHOOK_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
STANDARD_WEBHOOK_TOLERANCE_SECONDS = 300  # the Standard Webhooks specification's 5 minutes


class AuthFailure(Exception):
    """The request is not authenticated: `status` 401/503, a code and a message safe to show."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Headers(Protocol):
    """Headers by name: werkzeug's, the hooks' view of the WSGI environ, or a plain dict."""

    def get(self, key: str, /) -> str | None: ...


class HookRequest:
    """What a credential check sees of a hook request: its method, its full public URL (what a
    signature over the URL covers), its headers (any case) and its query (first values).

    The URL is built only when a scheme asks for it: from B24SCRIBE_PUBLIC_URL when it is set (the
    URL the sender was given, whatever proxies say), else from the request's own scheme and Host.
    """

    __slots__ = ("method", "headers", "query", "_environ", "_public_url")

    def __init__(
        self,
        method: str,
        headers: Headers,
        query: Mapping[str, str],
        environ: Mapping[str, Any] | None = None,
        public_url: str | None = None,
    ) -> None:
        self.method, self.headers, self.query = method, headers, query
        self._environ = environ or {}
        self._public_url = public_url

    def header(self, name: str) -> str | None:
        """A header by its name in any case (werkzeug's headers ignore case; a plain dict is searched)."""
        value = self.headers.get(name)
        if value is None and isinstance(self.headers, dict):
            lowered = name.lower()
            value = next((v for k, v in self.headers.items() if k.lower() == lowered), None)
        return value

    @property
    def url(self) -> str:
        environ = self._environ
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        if self._public_url:
            base = self._public_url
        else:
            host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
            base = f"{environ.get('wsgi.url_scheme', 'http')}://{host}"
        return str(base + path + (f"?{query}" if query else ""))


@dataclass(frozen=True, slots=True)
class Authenticated:
    """How the request proved itself, the delivery id a signature scheme vouches for, if any, and
    the portal whose own inbound token it carried (None: the global token or a signature)."""

    scheme: str
    delivery_id: str | None = None
    portal: str | None = None


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _basic_password(value: str) -> str | None:
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except ValueError:  # not base64 (binascii.Error), not ASCII (a latin-1 header value), not UTF-8 inside
        return None
    return decoded.partition(":")[2]


def authenticate_before_body(
    settings: Settings,
    request: HookRequest,
    source: str,
    *,
    vendor_header: str | None = None,
    signatures: tuple[SignatureScheme, ...] = (),
    portal_for_token: Callable[[str], str | None] | None = None,
) -> Authenticated | SignatureScheme:
    """Check the credential the headers or the query carry, before any body byte is read.

    A scheme back means the request is signed over its body (it carries the scheme's headers, and
    the scheme's secret is set for `source`): read the body, at most the route's limit, and call
    `authenticate_signed_body` with it. Everything else is settled here: authenticated, or
    AuthFailure (401, or 503 when the route has no credential configured at all).

    `portal_for_token` names the portal whose own inbound token a credential is (contract §8): it
    opens that portal's hooks only (`Authenticated.portal`). The global token opens every portal's.
    """
    configured = [scheme for scheme in signatures if scheme.configured(settings, source)]
    for scheme in configured:
        if scheme.present(request):
            scheme.before_body(request, settings, source)  # e.g. a stale timestamp: refused unread
            return scheme
    token = settings.inbound_token
    if token is None and not configured and portal_for_token is None:
        raise AuthFailure(503, "hooks_disabled", "inbound hooks are disabled: set B24SCRIBE_INBOUND_TOKEN")
    authorization = request.header("authorization") or ""
    offered = _offered(request, authorization, vendor_header)
    if token is not None:
        for scheme_name, value in offered:
            if _same(value, token):
                return Authenticated(scheme_name)
    # the per-call credential of a callback b24scribe asked a vendor for (contract §10)
    expected = credential_for(settings, source, dict(request.query))
    if expected is not None and any(_same(value, expected) for _, value in offered):
        return Authenticated("call-credential")
    if portal_for_token is not None:
        for scheme_name, value in offered:
            if (portal := portal_for_token(value)) is not None:
                return Authenticated(scheme_name, portal=portal)
    if authorization or request.query.get("token"):
        raise AuthFailure(401, "bad_credentials", "the credential does not match B24SCRIBE_INBOUND_TOKEN")
    raise AuthFailure(
        401, "unauthenticated", "authenticate with Authorization: Bearer <token>, ?token=<token> or a signature"
    )


def _offered(request: HookRequest, authorization: str, vendor_header: str | None) -> list[tuple[str, str]]:
    """The credentials the request offers, by how: a bearer token, a Basic password, the
    vendor's token header, `?token=`."""
    offered: list[tuple[str, str]] = []
    scheme_name, _, value = authorization.partition(" ")
    if scheme_name.lower() == "bearer" and value.strip():
        offered.append(("bearer", value.strip()))
    if scheme_name.lower() == "basic" and value:
        password = _basic_password(value.strip())
        if password:
            offered.append(("basic", password))
    if vendor_header and (given := request.header(vendor_header)):
        given = given.strip().removeprefix("Bearer ").strip()
        if given:
            offered.append(("vendor-header", given))
    if given := request.query.get("token"):
        offered.append(("query-token", given))
    return offered


def authenticate_signed_body(
    settings: Settings, request: HookRequest, body: bytes, scheme: SignatureScheme, source: str
) -> Authenticated:
    """Verify the scheme's signature on the raw body bytes (after `authenticate_before_body`)."""
    return scheme.verify(request, body, settings, source)


class StandardWebhooks:
    """Standard Webhooks (standardwebhooks.com): HMAC-SHA256 over `id.timestamp.body`, with
    B24SCRIBE_WEBHOOK_SECRET, verified by the specification's own library. Its `webhook-id` is the
    delivery id: a retry carries the same one, so it is stored once."""

    name = "standard-webhooks"
    signature_header = "webhook-signature"
    description = (
        "Standard Webhooks signature (with webhook-id and webhook-timestamp, 5 min tolerance) "
        "made with B24SCRIBE_WEBHOOK_SECRET; generic hooks only"
    )

    def configured(self, settings: Settings, source: str) -> bool:
        return settings.webhook_secret is not None

    def present(self, request: HookRequest) -> bool:
        return all(request.header(name) is not None for name in STANDARD_WEBHOOK_HEADERS)

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        # The timestamp is in a header: a stale or malformed one is refused before the body is read.
        value = request.header("webhook-timestamp") or ""
        try:
            timestamp = int(value.strip())
        except ValueError:
            raise AuthFailure(
                401, "bad_signature", "Standard Webhooks signature rejected: webhook-timestamp is not a number"
            ) from None
        if abs(time.time() - timestamp) > STANDARD_WEBHOOK_TOLERANCE_SECONDS:
            raise AuthFailure(
                401, "bad_signature", "Standard Webhooks signature rejected: webhook-timestamp is not within 5 minutes"
            )

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        secret = settings.webhook_secret
        headers = {name: request.header(name) or "" for name in STANDARD_WEBHOOK_HEADERS}
        if secret is None:
            raise AuthFailure(401, "unauthenticated", "the request carries no Standard Webhooks signature")
        try:
            Webhook(secret).verify(body, headers, json_parse=False)
        except (WebhookVerificationError, ValueError, ArithmeticError) as exc:  # ValueError: malformed header/body
            raise AuthFailure(401, "bad_signature", f"Standard Webhooks signature rejected: {exc}") from None
        return Authenticated(self.name, headers["webhook-id"])


STANDARD_WEBHOOKS = StandardWebhooks()

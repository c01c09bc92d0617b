"""Authenticating hooks before anything is stored (contract §4). Fails closed: no credential, no entry.

Two steps, so that a body is never read for a request that cannot be authenticated (contract §12):
`authenticate_before_body` checks what the headers and the query carry (a bearer token, a Basic
password, a vendor's token header, `?token=`); only when the request carries the headers of a
scheme that signs the body (Standard Webhooks) does it defer to `authenticate_signed_body`, which
the caller runs on the body it then reads (at most the route's limit).
"""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from b24scribe.settings import Settings

STANDARD_WEBHOOK_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
STANDARD_WEBHOOK_TOLERANCE_SECONDS = 300  # the Standard Webhooks specification's 5 minutes


class AuthFailure(Exception):
    """The request is not authenticated: `status` 401/503, a code and a message safe to show."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True, slots=True)
class Authenticated:
    """How the request proved itself, and the Standard Webhooks delivery id if it was signed."""

    scheme: str
    delivery_id: str | None = None


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _basic_password(value: str) -> str | None:
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except ValueError:  # not base64 (binascii.Error), not ASCII (a latin-1 header value), not UTF-8 inside
        return None
    return decoded.partition(":")[2]


def _signs_the_body(settings: Settings, lowered: Mapping[str, str], standard_webhooks: bool) -> bool:
    """The request carries a Standard Webhooks signature this route can verify (its secret is set)."""
    return (
        standard_webhooks
        and settings.webhook_secret is not None
        and all(name in lowered for name in STANDARD_WEBHOOK_HEADERS)
    )


def authenticate_before_body(
    settings: Settings,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    *,
    vendor_header: str | None = None,
    standard_webhooks: bool = False,
) -> Authenticated | None:
    """Check the credential the headers or the query carry, before any body byte is read.

    None means the request is signed over its body (Standard Webhooks headers, and the route has
    the secret): read the body, at most the route's limit, and call `authenticate_signed_body`.
    Everything else is settled here: authenticated, or AuthFailure (401, or 503 when hooks are off).
    """
    token = settings.inbound_token
    if token is None and not (standard_webhooks and settings.webhook_secret is not None):
        raise AuthFailure(503, "hooks_disabled", "inbound hooks are disabled: set B24SCRIBE_INBOUND_TOKEN")
    lowered = {key.lower(): value for key, value in headers.items()}
    if _signs_the_body(settings, lowered, standard_webhooks):
        # The timestamp is in a header: a stale or malformed one is refused before the body is read.
        _check_timestamp(lowered["webhook-timestamp"])
        return None
    if token is not None:
        authorization = lowered.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value and _same(value.strip(), token):
            return Authenticated("bearer")
        if scheme.lower() == "basic" and value:
            password = _basic_password(value.strip())
            if password is not None and _same(password, token):
                return Authenticated("basic")
        if vendor_header and (given := lowered.get(vendor_header.lower())):
            given = given.strip().removeprefix("Bearer ").strip()
            if _same(given, token):
                return Authenticated("vendor-header")
        if (given := query.get("token")) and _same(given, token):
            return Authenticated("query-token")
    if lowered.get("authorization") or query.get("token"):
        raise AuthFailure(401, "bad_credentials", "the credential does not match B24SCRIBE_INBOUND_TOKEN")
    raise AuthFailure(
        401, "unauthenticated", "authenticate with Authorization: Bearer <token>, ?token=<token> or a signature"
    )


def _check_timestamp(value: str) -> None:
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


def authenticate_signed_body(settings: Settings, headers: Mapping[str, str], body: bytes) -> Authenticated:
    """Verify a Standard Webhooks signature on the raw body bytes (after `authenticate_before_body`)."""
    secret = settings.webhook_secret
    lowered = {key.lower(): value for key, value in headers.items()}
    if secret is None or not all(name in lowered for name in STANDARD_WEBHOOK_HEADERS):
        raise AuthFailure(401, "unauthenticated", "the request carries no Standard Webhooks signature")
    try:
        Webhook(secret).verify(body, {name: lowered[name] for name in STANDARD_WEBHOOK_HEADERS}, json_parse=False)
    except (WebhookVerificationError, ValueError, ArithmeticError) as exc:  # ValueError: malformed header or body
        raise AuthFailure(401, "bad_signature", f"Standard Webhooks signature rejected: {exc}") from None
    return Authenticated("standard-webhooks", lowered["webhook-id"])


def authenticate(
    settings: Settings,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    body: bytes,
    *,
    vendor_header: str | None = None,
    standard_webhooks: bool = False,
) -> Authenticated:
    """Both steps on a body already read (the hooks call them apart, reading the body in between)."""
    found = authenticate_before_body(
        settings, headers, query, vendor_header=vendor_header, standard_webhooks=standard_webhooks
    )
    return found if found is not None else authenticate_signed_body(settings, headers, body)

"""Authenticating hooks before anything is stored (SPEC 4). Fails closed: no credential, no entry."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from b24scribe.settings import Settings

STANDARD_WEBHOOK_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


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
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2]


def authenticate(
    settings: Settings,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    body: bytes,
    *,
    vendor_header: str | None = None,
    standard_webhooks: bool = False,
) -> Authenticated:
    """Check the request's credential against the configured secrets, on the raw body bytes."""
    token = settings.inbound_token
    signing_secret = settings.webhook_secret if standard_webhooks else None
    if token is None and signing_secret is None:
        raise AuthFailure(503, "hooks_disabled", "inbound hooks are disabled: set B24SCRIBE_INBOUND_TOKEN")
    lowered = {key.lower(): value for key, value in headers.items()}
    if signing_secret is not None and all(name in lowered for name in STANDARD_WEBHOOK_HEADERS):
        try:
            Webhook(signing_secret).verify(
                body, {name: lowered[name] for name in STANDARD_WEBHOOK_HEADERS}, json_parse=False
            )
        except (WebhookVerificationError, ValueError) as exc:  # ValueError: malformed header or body
            raise AuthFailure(401, "bad_signature", f"Standard Webhooks signature rejected: {exc}") from None
        return Authenticated("standard-webhooks", lowered["webhook-id"])
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

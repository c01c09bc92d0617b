"""A cloud PBX that signs its webhooks (`POST /hooks/pbx/acmepbx`), as Twilio-style PBXs do.

It posts JSON call events and signs each with HMAC-SHA256 over the full URL it posted to followed by
the raw body, base64-encoded in `X-Acme-Signature`, keyed with B24SCRIBE_ACMEPBX_WEBHOOK_SECRET. Its
retries carry the same `X-Acme-Delivery` id. The whole integration is this module plus its registry
line: the route, the credential check before storing, OpenAPI, metrics and `flask check` follow.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate

from b24scribe.events import CallEvent
from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest
from b24scribe.settings import Settings
from b24scribe.sources import HookAnswer, PbxSource
from b24scribe.transcript import Direction
from schemas.source import load_json

EVENTS = {"ringing": "started", "answered": "answered", "hangup": "finished"}


def sign(secret: str, url: str, body: bytes) -> str:
    """The signature the PBX sends (the tests sign with it too)."""
    return base64.b64encode(hmac.new(secret.encode(), url.encode() + body, hashlib.sha256).digest()).decode()


class AcmeSignature:
    """HMAC-SHA256 over URL + body: the URL matters, so a replayed body on another hook fails."""

    name = "acme-signature"
    signature_header = "X-Acme-Signature"
    description = "HMAC-SHA256 of the URL and the body, base64, with B24SCRIBE_ACMEPBX_WEBHOOK_SECRET"

    def configured(self, settings: Settings, source: str) -> bool:
        return bool(settings.vendor_setting(source, "WEBHOOK_SECRET"))

    def present(self, request: HookRequest) -> bool:
        return request.header(self.signature_header) is not None

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        """Nothing in the headers alone can be checked: the signature covers the body."""

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        secret = settings.vendor_setting(source, "WEBHOOK_SECRET") or ""
        given = (request.header(self.signature_header) or "").strip()
        if not hmac.compare_digest(given.encode(), sign(secret, request.url, body).encode()):
            raise AuthFailure(401, "bad_signature", "X-Acme-Signature does not match the URL and body")
        return Authenticated(self.name)


class AcmeEventSchema(Schema):
    id = fields.String(required=True, validate=validate.Length(min=1, max=128))
    type = fields.String(required=True, validate=validate.OneOf(sorted(EVENTS)))
    caller = fields.String(load_default=None, validate=validate.Length(max=64))
    agent = fields.String(load_default=None, validate=validate.Length(max=32))
    duration = fields.Integer(load_default=None, validate=validate.Range(min=0, max=604800))

    @post_load
    def to_event(self, data: dict[str, Any], **_: Any) -> CallEvent:
        return CallEvent(
            event=EVENTS[data["type"]],
            call_id=data["id"],
            direction=Direction.INBOUND,
            from_number=data["caller"],
            extension=data["agent"],
            duration=data["duration"],
            status="answered" if data["type"] == "hangup" else None,
        )


_SCHEMA = AcmeEventSchema()


def parse(body: bytes, query: Mapping[str, str]) -> CallEvent:
    payload = load_json(body)
    if not isinstance(payload, dict):
        raise ValidationError({"_body": ["expected a JSON object"]})
    event: CallEvent = _SCHEMA.load(payload)
    return event


def answer(request: HookRequest, body: bytes, settings: Settings) -> HookAnswer | None:
    """Like Zadarma, it checks the URL with a GET carrying a value to echo (authenticated like events)."""
    if request.method == "GET":
        return HookAnswer(200, (request.query.get("echo") or "").encode())
    return None


SOURCE = PbxSource(
    "acmepbx",
    parse,
    methods=("GET", "POST"),
    answer=answer,
    signatures=(AcmeSignature(),),
    delivery_header="X-Acme-Delivery",
    summary="Acme Cloud PBX (signed JSON events; a test source)",
    openapi_schema=AcmeEventSchema,
)

"""`POST /hooks/stt/<vendor>` and `POST /hooks/pbx/<pbx>`: authenticate, validate, store, answer."""

from __future__ import annotations

from typing import Any

import structlog
from flask import Response, current_app, request
from flask_smorest import Blueprint
from marshmallow import ValidationError

from b24scribe.db import Database
from b24scribe.inbound_auth import STANDARD_WEBHOOK_HEADERS, Authenticated, AuthFailure, authenticate
from b24scribe.ingest import Outcome, RawEvent, call_event_key, store_event, store_rejected, transcript_key
from b24scribe.intake import PBX_PARSERS, parse_call_event, parse_transcript, resolve_portal
from b24scribe.settings import Settings
from handlers.errors import ApiError
from handlers.openapi import document_pbx_hook, document_stt_hook
from schemas.registry import STT_VENDORS

log = structlog.get_logger(__name__)
bp = Blueprint(
    "hooks",
    __name__,
    url_prefix="/hooks",
    description="Inbound webhooks from PBXs and speech-to-text vendors. Every hook authenticates before anything "
    "is stored; a 2xx answer means the event is durably stored.",
)

STANDARD_WEBHOOK_SOURCES = {"generic"}
# (header, its WSGI environ key): read straight from the environ on every hook request
CREDENTIAL_HEADERS = tuple(
    (name, "HTTP_" + name.upper().replace("-", "_")) for name in ("authorization", *STANDARD_WEBHOOK_HEADERS)
)


def _settings() -> Settings:
    settings: Settings = current_app.extensions["b24scribe.settings"]
    return settings


def _db() -> Database:
    db: Database = current_app.extensions["b24scribe.db"]
    return db


def _credential_headers(vendor_header: str | None) -> dict[str, str]:
    """Only the headers a credential can be in (copying all of them is most of the cost of auth)."""
    environ = request.environ
    found = {name: value for name, key in CREDENTIAL_HEADERS if (value := environ.get(key)) is not None}
    if vendor_header and (value := request.headers.get(vendor_header)) is not None:
        found[vendor_header] = value
    return found


def _authenticate(source: str, provider: str, body: bytes, vendor_header: str | None = None) -> Authenticated:
    try:
        return authenticate(
            _settings(),
            _credential_headers(vendor_header),
            request.args,
            body,
            vendor_header=vendor_header,
            standard_webhooks=provider in STANDARD_WEBHOOK_SOURCES,
        )
    except AuthFailure as failure:
        current_app.extensions["b24scribe.metrics"].rejected(source, provider, failure.code)
        raise ApiError(failure.status, failure.code, failure.message) from None


def _query_without_token() -> dict[str, str]:
    return {key: value for key, value in request.args.items() if key != "token"}


_STORED = '{"event_id": %d, "duplicate": %s}\n'  # the answer to every stored event (no JSON encoder needed)


def _answer(outcome: Outcome, source: str, provider: str) -> Response:
    metrics = current_app.extensions["b24scribe.metrics"]
    if outcome.rejected_with is not None:
        metrics.received(source, provider, "rejected")
        raise ApiError(
            422,
            "invalid_payload",
            outcome.rejected_with.get("message", "invalid payload"),
            outcome.rejected_with.get("fields"),
        )
    metrics.received(source, provider, "duplicate" if outcome.duplicate else "accepted")
    structlog.contextvars.bind_contextvars(event_id=outcome.event_id)
    # debug: the access log already has a line per request; this one adds the event id when asked
    log.debug("event stored", source=source, provider=provider, duplicate=outcome.duplicate)
    if outcome.duplicate:
        return Response(_STORED % (outcome.event_id, "true"), 200, mimetype="application/json")
    return Response(_STORED % (outcome.event_id, "false"), 202, mimetype="application/json")


def _reject(raw: RawEvent, fields: dict[str, Any], message: str, natural_key: str | None = None) -> ApiError:
    """Store the unprocessable event (it can be replayed after a fix) and build the 422."""
    outcome = store_rejected(_db(), raw, {"message": message, "fields": fields}, natural_key)
    current_app.extensions["b24scribe.metrics"].received(raw.source, raw.provider, "rejected")
    return ApiError(422, "invalid_payload", message, {**fields, "event_id": outcome.event_id})


@bp.post("/stt/<vendor>")
@document_stt_hook(bp)
def stt_hook(vendor: str) -> Response:
    """A transcript callback from an STT vendor (or our generic format)."""
    adapter = STT_VENDORS.get(vendor)
    if adapter is None:
        raise ApiError(404, "unknown_vendor", f"no STT vendor {vendor!r}; known: {', '.join(sorted(STT_VENDORS))}")
    body = request.get_data(cache=False)
    auth = _authenticate("stt", vendor, body, adapter.auth_header)
    raw = RawEvent("stt", vendor, body, _query_without_token(), request.content_type, auth.delivery_id)
    try:
        resolve_portal(_settings(), request.args)  # an unknown ?portal= is a 422 now, not a dead job later
        parsed = parse_transcript(vendor, body, request.args)
    except ValidationError as error:
        messages = error.messages if isinstance(error.messages, dict) else {"_body": error.messages}
        raise _reject(raw, messages, "the transcript cannot be processed: see fields") from None
    outcome = store_event(_db(), raw, transcript_key(raw, parsed.result, parsed.reference, parsed.options))
    return _answer(outcome, "stt", vendor)


@bp.post("/pbx/<pbx>")
@document_pbx_hook(bp)
def pbx_hook(pbx: str) -> Response:
    """A call life-cycle event from a PBX."""
    if pbx not in PBX_PARSERS:
        raise ApiError(404, "unknown_pbx", f"no PBX {pbx!r}; known: {', '.join(sorted(PBX_PARSERS))}")
    body = request.get_data(cache=False)
    auth = _authenticate("pbx", pbx, body)
    raw = RawEvent("pbx", pbx, body, _query_without_token(), request.content_type, auth.delivery_id)
    try:
        resolve_portal(_settings(), request.args)
        event = parse_call_event(pbx, body, request.args)
    except ValidationError as error:
        messages = error.messages if isinstance(error.messages, dict) else {"_body": error.messages}
        raise _reject(raw, messages, "the call event cannot be processed: see fields") from None
    structlog.contextvars.bind_contextvars(pbx=pbx, pbx_call_id=event.call_id)
    outcome = store_event(_db(), raw, call_event_key(raw))
    return _answer(outcome, "pbx", pbx)

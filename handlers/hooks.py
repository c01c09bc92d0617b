"""`POST /hooks/stt/<vendor>` and `POST /hooks/pbx/<pbx>`: authenticate, validate, store, answer."""

from __future__ import annotations

from typing import Any

import structlog
from flask import Blueprint, Response, current_app, jsonify, request
from marshmallow import ValidationError
from werkzeug.datastructures import MultiDict

from b24scribe.db import Database
from b24scribe.inbound_auth import Authenticated, AuthFailure, authenticate
from b24scribe.ingest import (
    Outcome,
    RawEvent,
    TranscriptOptions,
    accept_call_event,
    accept_transcript,
    store_rejected,
)
from b24scribe.settings import Settings
from b24scribe.transcript import CallReference, Direction, Role
from handlers.errors import ApiError
from schemas.bitrix24 import check_attributable
from schemas.pbx_events import parse_asterisk, parse_generic
from schemas.registry import STT_VENDORS
from schemas.source import load_json

log = structlog.get_logger(__name__)
bp = Blueprint("hooks", __name__, url_prefix="/hooks")

PBX_PARSERS = {"generic": "json", "asterisk": "form"}
STANDARD_WEBHOOK_SOURCES = {"generic"}


def _settings() -> Settings:
    settings: Settings = current_app.extensions["b24scribe.settings"]
    return settings


def _db() -> Database:
    db: Database = current_app.extensions["b24scribe.db"]
    return db


def _authenticate(provider: str, body: bytes, vendor_header: str | None = None) -> Authenticated:
    try:
        return authenticate(
            _settings(),
            dict(request.headers),
            request.args,
            body,
            vendor_header=vendor_header,
            standard_webhooks=provider in STANDARD_WEBHOOK_SOURCES,
        )
    except AuthFailure as failure:
        current_app.extensions["b24scribe.metrics"].rejected(request.blueprint or "hooks", provider, failure.code)
        raise ApiError(failure.status, failure.code, failure.message) from None


def _query_without_token() -> dict[str, str]:
    return {key: value for key, value in request.args.items() if key != "token"}


def _answer(outcome: Outcome, source: str, provider: str) -> tuple[Response, int]:
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
    log.info("event stored", source=source, provider=provider, duplicate=outcome.duplicate)
    body = jsonify({"event_id": outcome.event_id, "duplicate": outcome.duplicate})
    return body, 200 if outcome.duplicate else 202


def _reject(raw: RawEvent, fields: dict[str, Any], message: str, natural_key: str | None = None) -> ApiError:
    """Store the unprocessable event (it can be replayed after a fix) and build the 422."""
    outcome = store_rejected(_db(), raw, {"message": message, "fields": fields}, natural_key)
    current_app.extensions["b24scribe.metrics"].received(raw.source, raw.provider, "rejected")
    return ApiError(422, "invalid_payload", message, {**fields, "event_id": outcome.event_id})


def _one_of(name: str, allowed: list[str]) -> str | None:
    value = request.args.get(name)
    if value is None:
        return None
    if value not in allowed:
        raise ValidationError({name: [f"must be one of: {', '.join(allowed)}"]})
    return value


def _transcript_options() -> TranscriptOptions:
    roles = [r.value for r in Role]
    channel = _one_of("channel", ["0", "1"])
    overrides = {name: value for name in ("channel0", "first_speaker") if (value := _one_of(name, roles)) is not None}
    direction = _one_of("direction", [d.value for d in Direction])
    return TranscriptOptions(
        channel_slot=int(channel) if channel is not None else None,
        side_overrides=overrides,
        direction=Direction(direction) if direction else None,
    )


def _call_reference(payload_reference: CallReference) -> CallReference:
    """The call named by the URL and/or the vendor's metadata; they must agree (SPEC 3.3)."""
    url = CallReference(
        pbx=request.args.get("pbx") or None,
        pbx_call_id=request.args.get("call") or None,
        b24_call_id=request.args.get("b24_call_id") or None,
    )
    errors: dict[str, list[str]] = {}
    for attribute, name in (("pbx", "pbx"), ("pbx_call_id", "call"), ("b24_call_id", "b24_call_id")):
        from_url, from_payload = getattr(url, attribute), getattr(payload_reference, attribute)
        if from_url and from_payload and from_url != from_payload:
            errors[name] = [f"the URL says {from_url!r} but the payload says {from_payload!r}"]
    if errors:
        raise ValidationError(errors)
    merged = CallReference(
        pbx=url.pbx or payload_reference.pbx,
        pbx_call_id=url.pbx_call_id or payload_reference.pbx_call_id,
        b24_call_id=url.b24_call_id or payload_reference.b24_call_id,
    )
    if merged.b24_call_id is None:
        if merged.pbx_call_id is None:
            raise ValidationError(
                {"call": ["name the call: add ?pbx=<pbx>&call=<pbx call id> or ?b24_call_id=<CALL_ID> to the URL"]}
            )
        if merged.pbx is None:
            raise ValidationError({"pbx": ["name the PBX the call id belongs to, e.g. ?pbx=asterisk"]})
    return merged


@bp.post("/stt/<vendor>")
def stt_hook(vendor: str) -> tuple[Response, int]:
    """A transcript callback from an STT vendor (or our generic format)."""
    adapter = STT_VENDORS.get(vendor)
    if adapter is None:
        raise ApiError(404, "unknown_vendor", f"no STT vendor {vendor!r}; known: {', '.join(sorted(STT_VENDORS))}")
    body = request.get_data(cache=False)
    auth = _authenticate(vendor, body, adapter.auth_header)
    raw = RawEvent("stt", vendor, body, _query_without_token(), request.content_type, auth.delivery_id)
    try:
        options = _transcript_options()
        result = adapter.parse(body, request.args)
        reference = _call_reference(result.reference)
        if result.status == "completed" and result.transcript is not None:
            check_attributable(result.transcript)
    except ValidationError as error:
        messages = error.messages if isinstance(error.messages, dict) else {"_body": error.messages}
        raise _reject(raw, messages, "the transcript cannot be processed: see fields") from None
    outcome = accept_transcript(_db(), _settings(), raw, result, reference, options)
    return _answer(outcome, "stt", vendor)


@bp.post("/pbx/<pbx>")
def pbx_hook(pbx: str) -> tuple[Response, int]:
    """A call life-cycle event from a PBX."""
    kind = PBX_PARSERS.get(pbx)
    if kind is None:
        raise ApiError(404, "unknown_pbx", f"no PBX {pbx!r}; known: {', '.join(sorted(PBX_PARSERS))}")
    body = request.get_data(cache=False)
    auth = _authenticate(pbx, body)
    raw = RawEvent("pbx", pbx, body, _query_without_token(), request.content_type, auth.delivery_id)
    try:
        if kind == "json":
            event = parse_generic(load_json(body))
        else:
            form = MultiDict(_parse_form(body)) if body else request.args
            event = parse_asterisk({k: v for k, v in form.items() if k != "token"})
    except ValidationError as error:
        messages = error.messages if isinstance(error.messages, dict) else {"_body": error.messages}
        raise _reject(raw, messages, "the call event cannot be processed: see fields") from None
    structlog.contextvars.bind_contextvars(pbx=pbx, pbx_call_id=event.call_id)
    outcome = accept_call_event(_db(), _settings(), raw, event)
    return _answer(outcome, "pbx", pbx)


def _parse_form(body: bytes) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise ValidationError({"_body": ["the form body is not UTF-8"]}) from None

"""The Bitrix24 local application's callbacks (contract §8): `POST /b24/install` and `POST /b24/events`.

Bitrix24 posts them form-encoded (`event`, `auth[member_id]`, `auth[application_token]`, …) and with
no token of ours. An install is taken only once the offered access token has been checked with the
portal itself (`app.info` must name our client id); an event only with the `application_token` the
portal was installed with. The bodies are small: anything above `MAX_FORM_BYTES` is refused unread.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl

import structlog
from flask import current_app, request
from flask_smorest import Blueprint
from marshmallow import Schema, fields

from b24scribe.db import Database
from b24scribe.portals import (
    Directory,
    InstallRefused,
    check_event,
    install,
    read_offer,
    uninstall,
    verify_offer,
)
from b24scribe.settings import Settings
from handlers.errors import ApiError
from handlers.openapi import ErrorSchema

log = structlog.get_logger(__name__)

bp = Blueprint(
    "b24app",
    __name__,
    url_prefix="/b24",
    description="The Bitrix24 local application's installation callback and event handler (form-encoded).",
)
MAX_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 100


class PortalInstalledSchema(Schema):
    portal = fields.String(metadata={"description": "the portal's name (its domain)"})
    member_id = fields.String()
    state = fields.String(metadata={"description": "installed, needs_reinstall or uninstalled"})
    event = fields.String(metadata={"description": "the event handled"})


def _services() -> tuple[Settings, Database, Directory]:
    extensions = current_app.extensions
    return extensions["b24scribe.settings"], extensions["b24scribe.db"], extensions["b24scribe.portals"]


def _form() -> dict[str, str]:
    """The form Bitrix24 posted (first value per name), read only if it is small."""
    length = request.content_length
    if length is not None and length > MAX_FORM_BYTES:
        raise ApiError(413, "body_too_large", f"the form is larger than {MAX_FORM_BYTES} bytes")
    body = request.stream.read(MAX_FORM_BYTES + 1)
    if len(body) > MAX_FORM_BYTES:
        raise ApiError(413, "body_too_large", f"the form is larger than {MAX_FORM_BYTES} bytes")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "unreadable_body", "expected a form-encoded UTF-8 body of at most 100 fields") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


def _refused(error: InstallRefused) -> ApiError:
    codes = {403: "forbidden", 409: "conflict", 422: "invalid_payload"}
    fields_ = {error.field: [error.message]} if error.field else None
    return ApiError(error.status, codes.get(error.status, "refused"), error.message, fields_)


def _install(form: dict[str, str]) -> dict[str, Any]:
    settings, db, directory = _services()
    if not settings.app_mode:
        raise ApiError(
            403,
            "app_mode_off",
            "installations are not taken: set B24SCRIBE_BITRIX24_CLIENT_ID and B24SCRIBE_BITRIX24_CLIENT_SECRET",
        )
    now = time.time()
    try:
        offer = read_offer(form, now)
        verify_offer(offer, settings)
        with db.write() as session:
            row = install(session, offer, now)
            answer = {"portal": row.name, "member_id": row.member_id, "state": row.state, "event": "ONAPPINSTALL"}
    except InstallRefused as error:
        log.warning("installation refused", status=error.status, reason=error.message)
        raise _refused(error) from None
    directory.invalidate()
    log.info("portal installed", portal=answer["portal"])
    return answer


@bp.post("/install")
@bp.response(200, PortalInstalledSchema)
@bp.alt_response(400, schema=ErrorSchema, description="not a form-encoded UTF-8 body of at most 100 fields")
@bp.alt_response(413, schema=ErrorSchema, description="the form is larger than 16 KiB")
@bp.alt_response(
    403,
    schema=ErrorSchema,
    description="the token is not ours, the application_token differs, or the local application is not configured",
)
@bp.alt_response(422, schema=ErrorSchema, description="a field of the ONAPPINSTALL form is missing or invalid")
def install_callback() -> dict[str, Any]:
    """Bitrix24's ONAPPINSTALL: stores the portal and its tokens, verified with app.info first."""
    form = _form()
    event = (form.get("event") or "ONAPPINSTALL").upper()
    if event != "ONAPPINSTALL":
        raise ApiError(422, "invalid_payload", "expected event ONAPPINSTALL", {"event": ["expected ONAPPINSTALL"]})
    return _install(form)


@bp.post("/events")
@bp.response(200, PortalInstalledSchema)
@bp.alt_response(400, schema=ErrorSchema, description="not a form-encoded UTF-8 body of at most 100 fields")
@bp.alt_response(413, schema=ErrorSchema, description="the form is larger than 16 KiB")
@bp.alt_response(403, schema=ErrorSchema, description="unknown portal or wrong application_token")
def event_handler() -> dict[str, Any]:
    """Bitrix24's later events (ONAPPUNINSTALL holds the portal's jobs), checked against the
    application_token the portal was installed with."""
    form = _form()
    event = (form.get("event") or "").upper()
    if event == "ONAPPINSTALL":
        return _install(form)
    _settings, db, directory = _services()
    now = time.time()
    try:
        with db.write() as session:
            row = check_event(session, form)
            if event == "ONAPPUNINSTALL":
                uninstall(row, now)
            answer = {"portal": row.name, "member_id": row.member_id, "state": row.state, "event": event}
    except InstallRefused as error:
        log.warning("portal event refused", portal_event=event[:40], reason=error.message)
        raise _refused(error) from None
    directory.invalidate()
    log.info("portal event", portal=answer["portal"], portal_event=event[:40])
    return answer

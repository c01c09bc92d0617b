"""One error shape for every error: {"error": {"code", "message", "fields"}}."""

from __future__ import annotations

import json
import math
import sqlite3
from typing import Any

import structlog
from flask import Flask, Response
from gunicorn.http.errors import NoMoreData, ParseException  # type: ignore[import-untyped]  # gunicorn ships no types
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import ClientDisconnected, HTTPException

# What gunicorn raises from `wsgi.input` when the body it frames is broken: a parse error (a bad
# chunk size, a missing chunk terminator, bad trailers) or NoMoreData (the sender closed the
# connection before the body's end, or before the last chunk). The sender's fault, so a 400 on
# every route, never a 500. (Reading a hook's body also takes any OSError as the same: handlers/hooks.py.)
BODY_ERRORS: tuple[type[Exception], ...] = (ParseException, NoMoreData)
STORAGE_RETRY_AFTER_SECONDS = 5  # what a 503 "could not store" asks the sender to wait before retrying

# Error fields echo what a sender sent (field names, values in messages) and are stored with a
# rejected event: bounded, so a body with 100,000 unknown keys is not answered (and stored) 100,000
# times over, and safe to store as JSON (no lone surrogates, no NUL: PostgreSQL's jsonb refuses both).
MAX_ERROR_ENTRIES = 20
MAX_ERROR_NAME_CHARS = 100
MAX_ERROR_MESSAGE_CHARS = 500
MAX_ERROR_DEPTH = 6
MORE_KEY = "…"


class ApiError(Exception):
    """An error a view wants to answer with."""

    def __init__(self, status: int, code: str, message: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields or {}


def safe_text(value: object, limit: int) -> str:
    """`value` as text that is valid Unicode without NUL, cut to `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates as \udc80
    return text.replace("\x00", "\\x00")


def bounded_fields(fields: Any, depth: int = 0) -> Any:
    """Error fields cut to their first MAX_ERROR_ENTRIES entries per level (then "…": "and N more"),
    names and messages cut and made safe to store as JSON. Bounding twice changes nothing."""
    if depth > MAX_ERROR_DEPTH:
        return "…"
    if isinstance(fields, dict):
        items = list(fields.items())
        if len(items) > MAX_ERROR_ENTRIES + 1:  # one more is shown rather than "and 1 more"
            items = [*items[:MAX_ERROR_ENTRIES], (MORE_KEY, [f"and {len(items) - MAX_ERROR_ENTRIES} more"])]
        return {safe_text(name, MAX_ERROR_NAME_CHARS): bounded_fields(value, depth + 1) for name, value in items}
    if isinstance(fields, list | tuple):
        entries = list(fields)
        if len(entries) > MAX_ERROR_ENTRIES + 1:
            entries = [*entries[:MAX_ERROR_ENTRIES], f"and {len(entries) - MAX_ERROR_ENTRIES} more"]
        return [bounded_fields(entry, depth + 1) for entry in entries]
    if fields is None or isinstance(fields, bool | int) or (isinstance(fields, float) and math.isfinite(fields)):
        return fields
    return safe_text(fields, MAX_ERROR_MESSAGE_CHARS)


def error_response(
    status: int,
    code: str,
    message: str,
    fields: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The JSON error body with its status (built without an app context: the hooks' lane has none)."""
    payload = {"error": {"code": code, "message": message, "fields": fields or {}}}
    body = json.dumps(payload, separators=(",", ":")) + "\n"
    return Response(body, status, headers=headers, content_type="application/json")


def answer_error(error: Exception, max_body_bytes: int | None) -> Response | None:
    """The answer to an error a view raised, or None for an unexpected one (a bug: 500)."""
    if isinstance(error, ApiError):
        return error_response(error.status, error.code, error.message, error.fields)
    if isinstance(error, SQLAlchemyError | sqlite3.Error):  # the SQLite hot path talks to the driver directly
        # Fails closed: nothing was acknowledged, so the sender retries (contract §5).
        structlog.get_logger(__name__).error("storage failed", error=type(error).__name__)
        return error_response(
            503,
            "storage_unavailable",
            "the service could not store the request; retry later",
            headers={"Retry-After": str(STORAGE_RETRY_AFTER_SECONDS)},
        )
    if isinstance(error, (*BODY_ERRORS, ClientDisconnected)):  # werkzeug names a body cut short so
        return error_response(400, "unreadable_body", unreadable_body_message(error))
    if isinstance(error, HTTPException):
        status = error.code or 500
        code = {413: "body_too_large", 404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        message = error.description or error.name
        if status == 413:
            message = f"the body is larger than the limit of {max_body_bytes} bytes (B24SCRIBE_MAX_BODY_BYTES)"
        return error_response(status, code, message)
    return None


def unreadable_body_message(error: Exception) -> str:
    """What was wrong with a body the server could not read (the exception's class names it)."""
    if isinstance(error, ParseException):
        return f"the request body is malformed ({type(error).__name__}): check its chunked encoding"
    return "the request body ended before it was complete (the sender closed the connection)"


def register_error_handlers(app: Flask) -> None:
    """Answer ApiError, storage errors, unreadable bodies and every HTTP error in the one shape."""

    def handle(error: Exception) -> Response:
        response = answer_error(error, app.config.get("MAX_CONTENT_LENGTH"))
        assert response is not None  # registered only for the types answer_error knows
        return response

    for error_type in (ApiError, SQLAlchemyError, sqlite3.Error, HTTPException, *BODY_ERRORS):
        app.register_error_handler(error_type, handle)

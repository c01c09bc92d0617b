"""One error shape for every error: {"error": {"code", "message", "fields"}} (STYLE 6)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import structlog
from flask import Flask, Response
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException


class ApiError(Exception):
    """An error a view wants to answer with."""

    def __init__(self, status: int, code: str, message: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields or {}


def error_response(status: int, code: str, message: str, fields: dict[str, Any] | None = None) -> Response:
    """The JSON error body with its status (built without an app context: the hooks' lane has none)."""
    payload = {"error": {"code": code, "message": message, "fields": fields or {}}}
    return Response(json.dumps(payload, separators=(",", ":")) + "\n", status, content_type="application/json")


def answer_error(error: Exception, max_body_bytes: int | None) -> Response | None:
    """The answer to an error a view raised, or None for an unexpected one (a bug: 500)."""
    if isinstance(error, ApiError):
        return error_response(error.status, error.code, error.message, error.fields)
    if isinstance(error, SQLAlchemyError | sqlite3.Error):  # the SQLite hot path talks to the driver directly
        # Fails closed: nothing was acknowledged, so the sender retries (SPEC 5).
        structlog.get_logger(__name__).error("storage failed", error=type(error).__name__)
        return error_response(503, "storage_unavailable", "the service could not store the request; retry later")
    if isinstance(error, HTTPException):
        status = error.code or 500
        code = {413: "body_too_large", 404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        message = error.description or error.name
        if status == 413:
            message = f"the body is larger than the limit of {max_body_bytes} bytes (B24SCRIBE_MAX_BODY_BYTES)"
        return error_response(status, code, message)
    return None


def register_error_handlers(app: Flask) -> None:
    """Answer ApiError, storage errors and every HTTP error in the one shape."""

    def handle(error: Exception) -> Response:
        response = answer_error(error, app.config.get("MAX_CONTENT_LENGTH"))
        assert response is not None  # registered only for the types answer_error knows
        return response

    for error_type in (ApiError, SQLAlchemyError, sqlite3.Error, HTTPException):
        app.register_error_handler(error_type, handle)

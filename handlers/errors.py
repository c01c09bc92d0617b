"""One error shape for every error: {"error": {"code", "message", "fields"}} (STYLE 6)."""

from __future__ import annotations

import sqlite3
from typing import Any

import structlog
from flask import Flask, Response, jsonify
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException


class ApiError(Exception):
    """An error a view wants to answer with."""

    def __init__(self, status: int, code: str, message: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields or {}


def error_response(status: int, code: str, message: str, fields: dict[str, Any] | None = None) -> tuple[Response, int]:
    """The JSON error body with its status."""
    return jsonify({"error": {"code": code, "message": message, "fields": fields or {}}}), status


def register_error_handlers(app: Flask) -> None:
    """Answer ApiError and every HTTP error in the one shape."""

    @app.errorhandler(ApiError)
    def handle_api_error(error: ApiError) -> tuple[Response, int]:
        return error_response(error.status, error.code, error.message, error.fields)

    @app.errorhandler(SQLAlchemyError)
    @app.errorhandler(sqlite3.Error)  # the SQLite hot path talks to the driver directly
    def handle_storage_error(error: Exception) -> tuple[Response, int]:
        # Fails closed: nothing was acknowledged, so the sender retries (SPEC 5).
        structlog.get_logger(__name__).error("storage failed", error=type(error).__name__)
        return error_response(503, "storage_unavailable", "the service could not store the request; retry later")

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException) -> tuple[Response, int]:
        status = error.code or 500
        code = {413: "body_too_large", 404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        message = error.description or error.name
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"the body is larger than the limit of {limit} bytes (B24SCRIBE_MAX_BODY_BYTES)"
        return error_response(status, code, message)

"""The REST protocol of the fake: requests in, replies and Bitrix24 errors out.

Shared by the server, the limits, the faults and the telephony methods, so it lives below all
of them: plain records and parsing, no state and no HTTP server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from fake_bitrix24.php import parse_php_form

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
_REST_PATH = re.compile(r"/rest/(?:(\d+)/([^/]+)/)?([^/]*)")


class ApiError(Exception):
    """A Bitrix24 error answer: HTTP status, ``error`` code and ``error_description``."""

    def __init__(self, status: int, code: str, description: str, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.code = code
        self.description = description
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        """The JSON body Bitrix24 sends for this error."""
        return {"error": self.code, "error_description": self.description, **self.extra}


@dataclass(frozen=True)
class IncomingRequest:
    """The parts of an HTTP request the fake looks at."""

    http_method: str
    path: str
    query: str
    body: bytes
    content_type: str
    host: str = ""  # the Host header (portals may be told apart by it)
    authorization: str = ""  # the Authorization header (``Bearer <token>``)


@dataclass
class Reply:
    """What the HTTP handler sends: a body, or a delay first, or nothing at all (drop)."""

    status: int
    payload: object
    content_type: str = JSON_CONTENT_TYPE
    delay_after: float = 0.0
    drop: bool = False

    def encode(self) -> bytes:
        """The response body bytes."""
        if isinstance(self.payload, bytes):
            return self.payload
        if isinstance(self.payload, str) and self.content_type != JSON_CONTENT_TYPE:
            return self.payload.encode("utf-8")
        return json.dumps(self.payload, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake saw and answered it (status 0: connection dropped)."""

    method: str
    params: dict[str, Any]
    http_method: str
    user_id: int | None
    code: str | None
    portal: str | None
    status: int
    response: object
    timestamp: float
    fault: str  # "", "injected", "error", "drop" or "slow"
    # Application (OAuth) requests: the portal's member_id, the token and its application.
    member_id: str | None = None
    access_token: str | None = None
    client_id: str | None = None


@dataclass(frozen=True)
class Page:
    """A list result: Bitrix24 puts ``total`` and ``next`` beside ``result``."""

    items: list[dict[str, Any]]
    total: int
    next: int | None


# --- Request parsing -----------------------------------------------------------------------


def parse_params(request: IncomingRequest) -> dict[str, Any]:
    """Query string plus body (JSON or PHP form), body keys winning."""
    params = parse_php_form(parse_qsl(request.query, keep_blank_values=True))
    if not request.body:
        return params
    if "json" in request.content_type.lower():
        try:
            decoded = json.loads(request.body)
        except ValueError as error:
            raise ApiError(400, "INVALID_REQUEST", f"Invalid JSON body: {error}") from None
        if not isinstance(decoded, dict):
            raise ApiError(400, "INVALID_REQUEST", "JSON body must be an object")
        params.update(decoded)
        return params
    text = request.body.decode("utf-8", errors="replace")
    params.update(parse_php_form(parse_qsl(text, keep_blank_values=True)))
    return params


def _parse_rest_path(path: str) -> tuple[int | None, str | None, str] | None:
    """(user_id, code, method) of ``/rest/<user>/<code>/<method>[.json]``; user None for OAuth."""
    match = _REST_PATH.fullmatch(path)
    if match is None:
        return None
    user, code, method = match.groups()
    method = method.lower()
    method = method.removesuffix(".json")
    return (int(user) if user else None, code, method)


def _local_iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _canonical(method: str) -> str:
    return method if method == "*" else method.lower().removesuffix(".json")

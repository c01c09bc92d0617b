"""A fake Bitrix24 REST server for the test suite and benchmarks.

It follows how Bitrix24 behaves towards incoming webhooks, as documented and observed: the
transport, the telephony methods with Bitrix24's own validation order and error strings, the
per-portal leaky bucket, and fault injection. Use the ``fake_bitrix24`` pytest fixture,
``with FakeBitrix24() as fake:``, or run it out of process::

    python -m tests.fake_bitrix24 --port 0 --burst 50 --rate 2

which prints one JSON line (webhook URLs, control URL) and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, urlsplit

import pytest

DEFAULT_PORTAL = "default"
DEFAULT_SCOPES = ("telephony", "user")
DEDUP_WINDOW_SECONDS = 30 * 60
OPERATING_WINDOW_MINUTES = 10
STATISTIC_PAGE_SIZE = 50
JSON_CONTENT_TYPE = "application/json; charset=utf-8"
TRANSCRIPT_MESSAGE_KEYS = frozenset({"SIDE", "START_TIME", "STOP_TIME", "MESSAGE"})
TRANSCRIPT_SIDES = ("User", "Client")
# The docs call these application-only: a webhook may get 403 WRONG_AUTH_TYPE (cfg).
APP_ONLY_METHODS = frozenset({"telephony.externalcall.register", "telephony.externalcall.finish"})

USER_NOT_SET = "USER_ID or USER_PHONE_INNER should be set"
USER_INACTIVE = "User is not found or is not active"
# The real string has no closing parenthesis (as Bitrix24 sends it).
CALL_NOT_REGISTERED = "Call is not found (call should be registered prior to finishing"

FINISH_RESULT_KEYS = (
    "ID",
    "CALL_ID",
    "EXTERNAL_CALL_ID",
    "PORTAL_USER_ID",
    "PHONE_NUMBER",
    "PORTAL_NUMBER",
    "CALL_DURATION",
    "CALL_START_DATE",
    "CALL_VOTE",
    "COST",
    "COST_CURRENCY",
    "CALL_FAILED_CODE",
    "CALL_FAILED_REASON",
    "REST_APP_ID",
    "CRM_ACTIVITY_ID",
    "COMMENT",
    "CRM_ENTITY_TYPE",
    "CRM_ENTITY_ID",
)
# Exceptions that can only mean a bug in the fake; answered as 500 instead of a dropped socket.
FAKE_BUGS = (LookupError, TypeError, ValueError, AttributeError, ArithmeticError)

_PHONE_JUNK = re.compile(r"[^0-9#*+,;]")
_NUMERIC_PREFIX = re.compile(r"[ \t\n\r\v\f]*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NUMERIC_STRING = re.compile(_NUMERIC_PREFIX.pattern + r"[ \t\n\r\v\f]*")
_ISO_8601 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})")
_REST_PATH = re.compile(r"/rest/(?:(\d+)/([^/]+)/)?([^/]*)")
_FILTER_KEY = re.compile(r"(=|!=|!)?([A-Z_]+)")


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


# --- PHP semantics -------------------------------------------------------------------------


def php_int(value: object) -> int:
    """PHP 8 ``(int)`` cast: floats truncate, strings use their numeric prefix, else 0."""
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else 0
    if isinstance(value, str):
        match = _NUMERIC_PREFIX.match(value)
        if match is None:
            return 0
        text = match.group().strip()
        with contextlib.suppress(ValueError):
            return int(text)
        number = float(text)
        return int(number) if math.isfinite(number) else 0
    if isinstance(value, list | dict):
        return 1 if value else 0
    return 0


def php_float(value: object) -> float:
    """PHP 8 ``(float)`` cast."""
    if isinstance(value, bool | int | float):
        return float(value)
    if isinstance(value, str):
        match = _NUMERIC_PREFIX.match(value)
        return float(match.group().strip()) if match else 0.0
    return 0.0


def php_str(value: object) -> str:
    """PHP string conversion as used in string interpolation."""
    if value is None or value is False:
        return ""
    if value is True:
        return "1"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list | dict):
        return "Array"
    return str(value)


def php_truthy(value: object) -> bool:
    """PHP truthiness: ``"0"`` and ``""`` are false, as are empty arrays."""
    if isinstance(value, str):
        return value not in ("", "0")
    return bool(value)


def php_loosely_equals_int(value: object, number: int) -> bool:
    """PHP 8 ``$value == $number`` for an int ``$number`` (used by ``in_array`` without strict)."""
    if isinstance(value, bool):
        return value == (number != 0)
    if isinstance(value, int | float):
        return value == number
    if isinstance(value, str):
        return _NUMERIC_STRING.fullmatch(value) is not None and float(value) == number
    return False


def strip_phone(value: object) -> str:
    """``CVoxImplantPhone::stripLetters``: keep only ``0-9 # * + , ;``."""
    return _PHONE_JUNK.sub("", php_str(value))


def parse_php_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Decode PHP bracket notation (``MESSAGES[0][SIDE]=User``) into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        _assign_php_key(root, _split_php_key(key), value)
    listified = _listify(root)
    return listified if isinstance(listified, dict) else {}


def _split_php_key(key: str) -> list[str]:
    base, bracket, rest = key.partition("[")
    # PHP turns dots and spaces of the top-level name into underscores.
    parts = [base.replace(".", "_").replace(" ", "_")]
    if bracket:
        parts.extend(re.findall(r"\[([^\]]*)\]", "[" + rest))
    return parts


def _assign_php_key(node: dict[str, Any], path: list[str], value: str) -> None:
    for position, part in enumerate(path):
        key = part if part else _next_php_index(node)
        if position == len(path) - 1:
            node[key] = value
            return
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child


def _next_php_index(node: Mapping[str, Any]) -> str:
    indexes = [int(key) for key in node if key.lstrip("-").isdigit()]
    return str(max(indexes) + 1 if indexes else 0)


def _listify(node: object) -> object:
    """Turn dicts keyed exactly "0".."n-1" (in order) into lists, recursively."""
    if not isinstance(node, dict):
        return node
    converted = {key: _listify(value) for key, value in node.items()}
    if converted and list(converted) == [str(index) for index in range(len(converted))]:
        return list(converted.values())
    return converted


# --- Records -------------------------------------------------------------------------------


@dataclass
class User:
    """A portal employee; only active, real users can register or finish calls."""

    id: int
    inner_phone: str
    active: bool = True
    real: bool = True
    name: str = ""


@dataclass(frozen=True)
class Webhook:
    """An incoming webhook ``/rest/<user_id>/<code>/`` of one portal."""

    user_id: int
    code: str
    portal: str
    scopes: tuple[str, ...]


@dataclass
class ActiveCall:
    """A registered, not yet finished call (``b_voximplant_call``)."""

    call_id: str
    user_id: int
    phone: str
    call_type: int
    line: str
    external_call_id: str
    created_at: float
    start_date: str
    crm_entity_type: str
    crm_entity_id: int | None

    @property
    def dedup_key(self) -> tuple[int, str, int]:
        """The part of the re-registration filter that is always compared."""
        return (self.user_id, self.phone, self.call_type)


@dataclass
class LeakyBucket:
    """Bitrix24's request-rate limiter: +1 per request, drains ``rate`` per second."""

    level: float = 0.0
    updated_at: float = 0.0

    def admit(self, now: float, burst: float, rate: float, count_rejected: bool) -> bool:
        """Take one request; False when the bucket would overflow ``burst``."""
        self.level = max(0.0, self.level - (now - self.updated_at) * rate)
        self.updated_at = now
        if self.level + 1 > burst:
            if count_rejected:
                self.level += 1
            return False
        self.level += 1
        return True


def _seed_users() -> dict[int, User]:
    return {
        1: User(1, "101", active=True, name="Active User"),
        2: User(2, "102", active=False, name="Inactive User"),
    }


@dataclass
class PortalState:
    """Everything one Bitrix24 portal holds. Read it after traffic has settled."""

    name: str
    users: dict[int, User] = field(default_factory=_seed_users)
    active_calls: dict[str, ActiveCall] = field(default_factory=dict)
    statistics: dict[str, dict[str, Any]] = field(default_factory=dict)
    transcripts: dict[int, dict[str, Any]] = field(default_factory=dict)
    attachments: dict[str, list[int]] = field(default_factory=dict)
    bucket: LeakyBucket = field(default_factory=LeakyBucket)
    operating: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    count_503: int = 0
    next_statistic_id: int = 1
    next_transcript_id: int = 1
    # Indexes keep register and statistic.get O(1) under load; dicts are ordered sets.
    calls_by_key: dict[tuple[int, str, int], dict[str, None]] = field(default_factory=dict)
    calls_by_external_id: dict[tuple[int, str, int, str], dict[str, None]] = field(default_factory=dict)
    statistics_by_external_id: dict[str, list[str]] = field(default_factory=dict)

    def clear(self) -> None:
        """Forget calls, statistics, transcripts and limiter state; keep users."""
        fresh = PortalState(self.name, users=self.users)
        self.__dict__.update(fresh.__dict__)

    def add_active_call(self, call: ActiveCall) -> None:
        """Store a newly registered call."""
        self.active_calls[call.call_id] = call
        self.calls_by_key.setdefault(call.dedup_key, {})[call.call_id] = None
        if call.external_call_id:
            external_key = (*call.dedup_key, call.external_call_id)
            self.calls_by_external_id.setdefault(external_key, {})[call.call_id] = None

    def pop_active_call(self, call_id: str) -> ActiveCall:
        """Remove a call that is being finished."""
        call = self.active_calls.pop(call_id)
        del self.calls_by_key[call.dedup_key][call_id]
        if call.external_call_id:
            del self.calls_by_external_id[(*call.dedup_key, call.external_call_id)][call_id]
        return call

    def dedup_candidates(self, candidate: ActiveCall) -> list[ActiveCall]:
        """Active calls that share the candidate's user, phone, type and (if given) external id."""
        if candidate.external_call_id:
            ids = self.calls_by_external_id.get((*candidate.dedup_key, candidate.external_call_id), {})
        else:
            ids = self.calls_by_key.get(candidate.dedup_key, {})
        return [self.active_calls[call_id] for call_id in ids]

    def add_statistics_row(self, row: dict[str, Any]) -> None:
        """Store a finished call's statistics row."""
        self.statistics[row["CALL_ID"]] = row
        if row["EXTERNAL_CALL_ID"]:
            self.statistics_by_external_id.setdefault(row["EXTERNAL_CALL_ID"], []).append(row["CALL_ID"])


@dataclass(frozen=True)
class FakeConfig:
    """Switches for limits, faults and Bitrix24 variants; change with ``configure``."""

    burst: float | None = None  # leaky bucket size; None: no request-rate limit
    rate: float = 2.0  # bucket drain per second
    count_rejected: bool = False  # do 503-rejected requests fill the bucket too
    operating_limit: float | None = None  # seconds per method per 10 min; None: no 429s
    operating_cost: float = 0.1  # seconds charged per call
    operating_in_time: bool = True  # emit time.operating and time.operating_reset_at
    error_rate: float = 0.0  # random 500s, the action is not performed
    drop_rate: float = 0.0  # random dropped connections, the action is not performed
    slow_rate: float = 0.0  # random slow answers, the action IS performed
    slow_seconds: float = 3.0
    latency: float = 0.0  # added before every request
    seed: int | None = None
    error_code: str = ""  # `error` of telephony validation errors: "" (real) or "ERROR_CORE" (docs)
    strict_messages: bool = True  # reject transcript lines with keys beyond the four
    deny_statistics: bool = False  # voximplant.statistic.get answers 403 ACCESS_DENIED
    deny_webhook_app_methods: bool = False  # register/finish via webhook: 403 WRONG_AUTH_TYPE
    finish_start_date_as_object: bool = True  # finish returns CALL_START_DATE as {} like PHP

    def updated(self, changes: Mapping[str, object]) -> FakeConfig:
        """A copy with ``changes`` applied; ValueError names an unknown or mistyped key."""
        types = {item.name: str(item.type) for item in dataclasses.fields(self)}
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in types:
                raise ValueError(f"unknown config key {name!r}; known: {sorted(types)}")
            checked[name] = _check_config_value(name, types[name], value)
        return dataclasses.replace(self, **checked)


def _check_config_value(name: str, declared: str, value: object) -> object:
    optional = declared.endswith("| None")
    base = declared.split("|")[0].strip()
    if value is None and optional:
        return None
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "float" and is_number:
        return float(value)  # type: ignore[arg-type]
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "str" and isinstance(value, str):
        return value
    raise ValueError(f"config {name}: expected {declared}, got {value!r}")


@dataclass
class Injection:
    """A scripted answer for the next ``remaining`` calls of ``method`` ("*": any)."""

    method: str
    remaining: int
    kind: Literal["answer", "drop", "slow"]
    status: int = 0
    body: object = None
    content_type: str = JSON_CONTENT_TYPE
    seconds: float = 0.0


class FaultDice:
    """Reproducible fault rolls in [0, 1) from a seed (a test tool, not for cryptography)."""

    def __init__(self, seed: int | None) -> None:
        self._seed = ""
        self._rolls = 0
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the sequence; no seed picks a random one."""
        self._seed = secrets.token_hex(8) if seed is None else str(seed)
        self._rolls = 0

    def roll(self) -> float:
        """The next number of the sequence."""
        self._rolls += 1
        text = f"{self._seed}:{self._rolls}".encode()
        digest = hashlib.blake2b(text, digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class IncomingRequest:
    """The parts of an HTTP request the fake looks at."""

    http_method: str
    path: str
    query: str
    body: bytes
    content_type: str


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


@dataclass
class Exchange:
    """What is known about a request while it is being processed."""

    started: float
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    user_id: int | None = None
    code: str | None = None
    portal: PortalState | None = None
    fault: str = ""


@dataclass(frozen=True)
class MethodCall:
    """An authenticated call handed to a method implementation."""

    portal: PortalState
    webhook: Webhook
    params: dict[str, Any]
    now: float


@dataclass(frozen=True)
class Page:
    """A list result: Bitrix24 puts ``total`` and ``next`` beside ``result``."""

    items: list[dict[str, Any]]
    total: int
    next: int | None


MethodHandler = Callable[[MethodCall], object]


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


def _database_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A statistics row as ``voximplant.statistic.get`` prints it: numbers come as strings."""
    printed: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, float):
            printed[key] = f"{value:.4f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            printed[key] = str(value)
        else:
            printed[key] = value
    return printed


# --- The fake ------------------------------------------------------------------------------


class FakeBitrix24:
    """State and behaviour of the fake portals, plus the HTTP server that exposes them."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self.config = FakeConfig()
        self._dice = FaultDice(None)
        self._portals: dict[str, PortalState] = {DEFAULT_PORTAL: PortalState(DEFAULT_PORTAL)}
        self._webhooks: dict[tuple[int, str], Webhook] = {}
        self._injections: list[Injection] = []
        self._requests: list[RecordedRequest] = []
        self._count_503 = 0
        self._clock_offset = 0.0
        self._server: FakeBitrix24Server | None = None
        self._thread: threading.Thread | None = None
        self._default_webhook = self._create_webhook(1, None, DEFAULT_PORTAL, DEFAULT_SCOPES)
        self._methods: dict[str, tuple[str | None, MethodHandler]] = {
            "telephony.externalcall.register": ("telephony", self._register),
            "telephony.externalcall.finish": ("telephony", self._finish),
            "telephony.call.attachtranscription": ("telephony", self._attach_transcription),
            "telephony.externalcall.show": ("telephony", self._show_or_hide),
            "telephony.externalcall.hide": ("telephony", self._show_or_hide),
            "voximplant.statistic.get": ("telephony", self._statistic_get),
            "user.current": (None, self._user_current),
            "profile": (None, self._user_current),
            "scope": (None, self._scope),
        }

    # Lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind the port and serve in a background thread."""
        if self._server is not None:
            return self
        self._server = FakeBitrix24Server((self._host, self._port), FakeBitrix24Handler, self)
        # A short poll interval keeps stop() (and so every fixture teardown) fast.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.02)
        self._thread = threading.Thread(target=serve, name="fake-bitrix24", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Addresses ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None:
            raise RuntimeError("FakeBitrix24 is not started; call start() first")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{self._host}:{self.port}"

    @property
    def webhook_url(self) -> str:
        """The default portal's webhook base URL, ending with ``/``."""
        return self.url_for(self._default_webhook)

    @property
    def control_url(self) -> str:
        """Base URL of the control endpoints, ending with ``/``."""
        return f"{self.base_url}/_fake/"

    def url_for(self, webhook: Webhook) -> str:
        """A webhook's base URL, ending with ``/``."""
        return f"{self.base_url}/rest/{webhook.user_id}/{webhook.code}/"

    # Setup ----------------------------------------------------------------------------------

    def add_webhook(
        self,
        code: str | None = None,
        portal: str = DEFAULT_PORTAL,
        user_id: int = 1,
        scopes: Iterable[str] = DEFAULT_SCOPES,
    ) -> str:
        """Create a webhook (and its portal, if new); returns its base URL."""
        with self._lock:
            webhook = self._create_webhook(user_id, code, portal, tuple(scopes))
        return self.url_for(webhook)

    def _create_webhook(self, user_id: int, code: str | None, portal: str, scopes: tuple[str, ...]) -> Webhook:
        webhook = Webhook(user_id, code or secrets.token_hex(8), portal, scopes)
        self._portals.setdefault(portal, PortalState(portal))
        self._webhooks[(webhook.user_id, webhook.code)] = webhook
        return webhook

    def add_user(self, user_id: int, inner_phone: str, active: bool = True, portal: str = DEFAULT_PORTAL) -> None:
        """Add or replace a portal user."""
        with self._lock:
            self._portals[portal].users[user_id] = User(user_id, inner_phone, active)

    def portal_state(self, name: str = DEFAULT_PORTAL) -> PortalState:
        """The live state of one portal (read it after traffic has settled)."""
        return self._portals[name]

    def configure(self, **changes: object) -> FakeConfig:
        """Change switches (see FakeConfig); a new ``seed`` restarts the fault sequence."""
        with self._lock:
            self.config = self.config.updated(changes)
            if "seed" in changes:
                self._dice.reseed(self.config.seed)
            return self.config

    def set_rate_limit(self, burst: float | None = 50, rate: float = 2.0) -> None:
        """Enable the per-portal leaky bucket (``burst=None`` disables it) with empty buckets."""
        self.configure(burst=burst, rate=rate)
        with self._lock:
            for portal in self._portals.values():
                portal.bucket = LeakyBucket()

    def set_operating_limit(self, limit: float | None = 480.0, cost: float = 0.1) -> None:
        """Enable 429 OPERATION_TIME_LIMIT after ``limit`` seconds per method per 10 minutes."""
        self.configure(operating_limit=limit, operating_cost=cost)

    def set_faults(
        self,
        error_rate: float = 0.0,
        slow_rate: float = 0.0,
        slow_seconds: float = 3.0,
        seed: int | None = None,
        drop_rate: float = 0.0,
    ) -> None:
        """Random faults: 500 without action, slow answer after the action, dropped connection."""
        self.configure(
            error_rate=error_rate,
            slow_rate=slow_rate,
            slow_seconds=slow_seconds,
            seed=seed,
            drop_rate=drop_rate,
        )

    def set_latency(self, seconds: float) -> None:
        """Delay every request by ``seconds`` before processing it."""
        self.configure(latency=seconds)

    def inject(
        self,
        method: str,
        status: int,
        body: object = None,
        times: int = 1,
        content_type: str | None = None,
    ) -> None:
        """The next ``times`` calls of ``method`` ("*": any) answer ``status``/``body`` unprocessed.

        ``body`` None picks Bitrix24's body for the status (503 QUERY_LIMIT_EXCEEDED, 429
        OPERATION_TIME_LIMIT, ...); a ``str`` body is sent as text/html (e.g. a 502 page).
        """
        if content_type is None:
            content_type = "text/html; charset=utf-8" if isinstance(body, str) else JSON_CONTENT_TYPE
        self._add_injection(Injection(_canonical(method), times, "answer", status, body, content_type))

    def inject_drop(self, method: str, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` get their connection closed, unprocessed."""
        self._add_injection(Injection(_canonical(method), times, "drop"))

    def inject_slow(self, method: str, seconds: float, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` are processed, then answered after ``seconds``."""
        self._add_injection(Injection(_canonical(method), times, "slow", seconds=seconds))

    def inject_operating_limit(self, method: str, reset_in: float = 1.0, times: int = 1) -> None:
        """The next ``times`` calls answer 429 OPERATION_TIME_LIMIT, resetting in ``reset_in`` s."""
        reset_at = math.ceil(self.now() + reset_in)
        body = _operating_limit_error(self._time_block(self.now(), 0.0, reset_at)).body()
        self.inject(method, 429, body, times)

    def _add_injection(self, injection: Injection) -> None:
        with self._lock:
            self._injections.append(injection)

    def advance_clock(self, seconds: float) -> None:
        """Move the fake's clock forward (dedup window, bucket drain, operating buckets)."""
        with self._lock:
            self._clock_offset += seconds

    def now(self) -> float:
        """The fake's clock: wall time plus ``advance_clock`` offsets."""
        return time.time() + self._clock_offset

    def reset(self, config: bool = False) -> None:
        """Forget requests, calls, transcripts, injections and limiter state; keep webhooks."""
        with self._lock:
            for portal in self._portals.values():
                portal.clear()
            self._injections.clear()
            self._requests.clear()
            self._count_503 = 0
            self._clock_offset = 0.0
            if config:
                self.config = FakeConfig()
            self._dice.reseed(self.config.seed)

    # Assertions helpers ---------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def calls_to(self, method: str) -> list[RecordedRequest]:
        """The recorded requests of one method (any case, ``.json`` allowed)."""
        wanted = _canonical(method)
        return [request for request in self.requests if request.method == wanted]

    @property
    def statistics(self) -> dict[str, dict[str, Any]]:
        """Default portal: CALL_ID → statistics row (copies)."""
        with self._lock:
            return {key: dict(row) for key, row in self._portals[DEFAULT_PORTAL].statistics.items()}

    @property
    def transcripts(self) -> dict[int, dict[str, Any]]:
        """Default portal: TRANSCRIPT_ID → {call_id, messages, cost, cost_currency} (copies)."""
        with self._lock:
            return {key: dict(item) for key, item in self._portals[DEFAULT_PORTAL].transcripts.items()}

    @property
    def active_calls(self) -> dict[str, ActiveCall]:
        """Default portal: CALL_ID → registered, unfinished call."""
        with self._lock:
            return dict(self._portals[DEFAULT_PORTAL].active_calls)

    def attachments_by_call(self, portal: str | None = DEFAULT_PORTAL) -> dict[str, list[int]]:
        """CALL_ID → TRANSCRIPT_IDs attached, in order; ``portal=None`` merges all portals."""
        with self._lock:
            return self._attachments_by_call(portal)

    def _attachments_by_call(self, portal: str | None) -> dict[str, list[int]]:
        names = list(self._portals) if portal is None else [portal]
        merged: dict[str, list[int]] = {}
        for name in names:
            for call_id, ids in self._portals[name].attachments.items():
                merged[call_id] = list(ids)
        return merged

    @property
    def count_503(self) -> int:
        """HTTP 503 answers so far, all portals (rate-limit rejections and injected 503s)."""
        with self._lock:
            return self._count_503

    def state_summary(self) -> dict[str, Any]:
        """Counts for ``GET /_fake/state``."""
        with self._lock:
            portals = self._portals.values()
            return {
                "requests": dict(Counter(request.method for request in self._requests)),
                "requests_total": len(self._requests),
                "responses": {
                    str(status): count for status, count in Counter(r.status for r in self._requests).items()
                },
                "count_503": self._count_503,
                "statistics": sum(len(portal.statistics) for portal in portals),
                "active_calls": sum(len(portal.active_calls) for portal in portals),
                "transcripts": sum(len(portal.transcripts) for portal in portals),
                "attachments_by_call": self._attachments_by_call(None),
                "portals": {portal.name: _portal_summary(portal) for portal in portals},
                "config": dataclasses.asdict(self.config),
            }

    # Request pipeline -----------------------------------------------------------------------

    def handle(self, request: IncomingRequest) -> Reply:
        """Answer one REST request: limits, auth, faults, then the method itself."""
        exchange = Exchange(started=self.now())
        latency = self.config.latency
        if latency > 0:
            time.sleep(latency)
        with self._lock:
            reply = self._process(exchange, request)
            self._record(exchange, request, reply)
        return reply

    def _process(self, exchange: Exchange, request: IncomingRequest) -> Reply:
        try:
            return self._process_or_raise(exchange, request)
        except ApiError as error:
            return Reply(error.status, error.body())

    def _process_or_raise(self, exchange: Exchange, request: IncomingRequest) -> Reply:
        webhook, portal = self._route(exchange, request)
        injection = self._take_injection(exchange.method)
        if injection is not None and injection.kind != "slow":
            exchange.fault = "injected"
            return self._injected_reply(injection)
        self._admit(portal, exchange.started)
        webhook, handler = self._authenticate(exchange, webhook)
        operating_key = (webhook.code, exchange.method)
        self._check_operating_limit(portal, operating_key, exchange.started)
        exchange.fault = self._roll_fault() or ("slow" if injection else "")
        if exchange.fault == "error":
            raise ApiError(500, "INTERNAL_SERVER_ERROR", "Internal server error")
        if exchange.fault == "drop":
            return Reply(0, None, drop=True)
        self._charge_operating(portal, operating_key, exchange.started)
        self._check_auth_type(exchange.method)
        result = handler(MethodCall(portal, webhook, exchange.params, exchange.started))
        reply = self._success_reply(result, portal, operating_key, exchange.started)
        if exchange.fault == "slow":  # performed; the answer comes late (the client may time out)
            reply.delay_after = injection.seconds if injection else self.config.slow_seconds
        return reply

    def _route(self, exchange: Exchange, request: IncomingRequest) -> tuple[Webhook | None, PortalState]:
        """Parse path and parameters; find the webhook and its portal (unknown: the default)."""
        route = _parse_rest_path(request.path)
        if route is None:
            raise ApiError(404, "NOT_FOUND", f"No such path: {request.path}")
        exchange.user_id, exchange.code, exchange.method = route
        exchange.params = parse_params(request)
        webhook = self._webhooks.get((exchange.user_id or 0, exchange.code or ""))
        exchange.portal = self._portals[webhook.portal if webhook else DEFAULT_PORTAL]
        return webhook, exchange.portal

    def _take_injection(self, method: str) -> Injection | None:
        for injection in self._injections:
            if injection.method in ("*", method):
                injection.remaining -= 1
                if injection.remaining <= 0:
                    self._injections.remove(injection)
                return injection
        return None

    def _injected_reply(self, injection: Injection) -> Reply:
        if injection.kind == "drop":
            return Reply(0, None, drop=True)
        body = injection.body
        if body is None:
            body = _default_error_body(injection.status)
        return Reply(injection.status, body, injection.content_type)

    def _admit(self, portal: PortalState, now: float) -> None:
        """Failure policy: the bucket is checked before auth, so bad credentials also count."""
        burst = self.config.burst
        if burst is None:
            return
        if not portal.bucket.admit(now, burst, self.config.rate, self.config.count_rejected):
            raise ApiError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")

    def _authenticate(self, exchange: Exchange, webhook: Webhook | None) -> tuple[Webhook, MethodHandler]:
        if exchange.user_id is None:
            raise ApiError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        if webhook is None:
            raise ApiError(401, "INVALID_CREDENTIALS", "Invalid request credentials")
        spec = self._methods.get(exchange.method)
        if spec is None:
            raise ApiError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        scope, handler = spec
        if scope is not None and scope not in webhook.scopes:
            raise ApiError(
                401,
                "insufficient_scope",
                "The request requires higher privileges than provided by the webhook token",
            )
        return webhook, handler

    def _roll_fault(self) -> str:
        config = self.config
        if config.error_rate <= 0 and config.drop_rate <= 0 and config.slow_rate <= 0:
            return ""
        roll = self._dice.roll()
        if roll < config.error_rate:
            return "error"
        if roll < config.error_rate + config.drop_rate:
            return "drop"
        if roll < config.error_rate + config.drop_rate + config.slow_rate:
            return "slow"
        return ""

    def _operating_usage(self, portal: PortalState, key: tuple[str, str], now: float) -> tuple[float, int]:
        """(seconds used in the last 10 minutes, unix time the oldest minute drops out)."""
        minutes = portal.operating.get(key, {})
        current = int(now // 60)
        for minute in [m for m in minutes if m <= current - OPERATING_WINDOW_MINUTES]:
            del minutes[minute]
        if not minutes:
            return 0.0, int(now) + OPERATING_WINDOW_MINUTES * 60
        return sum(minutes.values()), (min(minutes) + OPERATING_WINDOW_MINUTES) * 60

    def _check_operating_limit(self, portal: PortalState, key: tuple[str, str], now: float) -> None:
        limit = self.config.operating_limit
        if limit is None:
            return
        used, reset_at = self._operating_usage(portal, key, now)
        if used >= limit:
            raise _operating_limit_error(self._time_block(now, used, reset_at))

    def _charge_operating(self, portal: PortalState, key: tuple[str, str], now: float) -> None:
        minutes = portal.operating.setdefault(key, {})
        minute = int(now // 60)
        minutes[minute] = minutes.get(minute, 0.0) + self.config.operating_cost

    def _success_reply(self, result: object, portal: PortalState, key: tuple[str, str], started: float) -> Reply:
        used, reset_at = self._operating_usage(portal, key, started)
        timing = self._time_block(started, used, reset_at)
        if isinstance(result, Page):
            body: dict[str, Any] = {"result": result.items, "total": result.total}
            if result.next is not None:
                body["next"] = result.next
            body["time"] = timing
            return Reply(200, body)
        return Reply(200, {"result": result, "time": timing})

    def _time_block(self, started: float, operating: float, reset_at: int) -> dict[str, Any]:
        finish = self.now()
        block: dict[str, Any] = {
            "start": started,
            "finish": finish,
            "duration": finish - started,
            "processing": finish - started,
            "date_start": _local_iso(started),
            "date_finish": _local_iso(finish),
        }
        if self.config.operating_in_time:
            block["operating_reset_at"] = reset_at
            block["operating"] = round(operating, 4)
        return block

    def _record(self, exchange: Exchange, request: IncomingRequest, reply: Reply) -> None:
        if reply.status == 503:
            self._count_503 += 1
            if exchange.portal is not None:
                exchange.portal.count_503 += 1
        self._requests.append(
            RecordedRequest(
                method=exchange.method,
                params=exchange.params,
                http_method=request.http_method,
                user_id=exchange.user_id,
                code=exchange.code,
                portal=exchange.portal.name if exchange.portal else None,
                status=reply.status,
                response=reply.payload,
                timestamp=exchange.started,
                fault="drop" if reply.drop else exchange.fault,
            )
        )

    # Control endpoints ----------------------------------------------------------------------

    def handle_control(self, request: IncomingRequest) -> Reply:
        """``/_fake/state``, ``/_fake/config``, ``/_fake/reset``, ``/_fake/inject``."""
        action = request.path.removeprefix("/_fake/").strip("/")
        try:
            body = _control_body(request)
            return self._control(request.http_method, action, body)
        except (ValueError, TypeError, KeyError) as error:
            return Reply(400, {"error": "BAD_CONTROL_REQUEST", "error_description": str(error)})

    def _control(self, http_method: str, action: str, body: dict[str, Any]) -> Reply:
        if action == "state" and http_method == "GET":
            return Reply(200, self.state_summary())
        if action == "config" and http_method == "GET":
            return Reply(200, dataclasses.asdict(self.config))
        if action == "config" and http_method == "POST":
            config = self.configure(**body)
            if "burst" in body or "rate" in body:
                self.set_rate_limit(config.burst, config.rate)
            return Reply(200, dataclasses.asdict(config))
        if action == "reset" and http_method == "POST":
            self.reset(config=bool(body.get("config", False)))
            return Reply(200, {"ok": True})
        if action == "inject" and http_method == "POST":
            self._inject_from_control(body)
            return Reply(200, {"ok": True})
        return Reply(404, {"error": "NOT_FOUND", "error_description": f"{http_method} /_fake/{action}"})

    def _inject_from_control(self, body: dict[str, Any]) -> None:
        method = str(body.get("method", "*"))
        times = int(body.get("times", 1))
        if body.get("drop"):
            self.inject_drop(method, times)
        elif body.get("slow_seconds"):
            self.inject_slow(method, float(body["slow_seconds"]), times)
        else:
            self.inject(method, int(body["status"]), body.get("body"), times)

    # Methods --------------------------------------------------------------------------------

    def _core_error(self, description: str) -> ApiError:
        """A telephony validation error: HTTP 400, ``error`` "" (or ERROR_CORE, cfg)."""
        return ApiError(400, self.config.error_code, description)

    def _check_auth_type(self, method: str) -> None:
        if method in APP_ONLY_METHODS and self.config.deny_webhook_app_methods:
            raise ApiError(403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method")

    def _resolve_user(self, portal: PortalState, params: Mapping[str, Any]) -> int:
        """USER_ID if > 0, else the active real user whose inner phone is USER_PHONE_INNER."""
        user_id = php_int(params.get("USER_ID"))
        if user_id > 0:
            return user_id
        inner = php_str(params.get("USER_PHONE_INNER"))
        if inner:
            for user in portal.users.values():
                if user.active and user.real and user.inner_phone == inner:
                    return user.id
        raise self._core_error(USER_NOT_SET)

    def _require_active_user(self, portal: PortalState, user_id: int) -> None:
        user = portal.users.get(user_id)
        if user is None or not user.active or not user.real:
            raise self._core_error(USER_INACTIVE)

    def _parse_call_type(self, value: object) -> int:
        if not any(php_loosely_equals_int(value, number) for number in range(1, 6)):
            raise self._core_error("Unknown TYPE")
        return php_int(value)

    def _parse_start_date(self, value: object, now: float) -> str:
        if not php_truthy(value):
            return _local_iso(now)
        if not isinstance(value, str) or _ISO_8601.fullmatch(value) is None:
            raise self._core_error("CALL_START_DATE should be in the ISO-8601 format")
        try:
            return datetime.fromisoformat(value).isoformat(timespec="seconds")
        except ValueError:
            raise self._core_error("CALL_START_DATE should be in the ISO-8601 format") from None

    def _register(self, call: MethodCall) -> dict[str, Any]:
        params = call.params
        user_id = self._resolve_user(call.portal, params)
        call_type = self._parse_call_type(params.get("TYPE"))
        start_date = self._parse_start_date(params.get("CALL_START_DATE"), call.now)
        phone = strip_phone(params.get("PHONE_NUMBER"))
        if not phone:
            raise self._core_error("Unsupported phone number format")
        self._require_active_user(call.portal, user_id)
        with_crm = php_truthy(params.get("CRM_ENTITY_TYPE")) and php_truthy(params.get("CRM_ENTITY_ID"))
        candidate = ActiveCall(
            call_id=f"externalCall.{secrets.token_hex(16)}.{int(call.now)}",
            user_id=user_id,
            phone=phone,
            call_type=call_type,
            line=php_str(params.get("LINE_NUMBER"))[:50],
            external_call_id=php_str(params.get("EXTERNAL_CALL_ID")),
            created_at=call.now,
            start_date=start_date,
            crm_entity_type=php_str(params.get("CRM_ENTITY_TYPE")) if with_crm else "",
            crm_entity_id=php_int(params.get("CRM_ENTITY_ID")) if with_crm else None,
        )
        registered = self._find_duplicate(call.portal, candidate, call.now)
        if registered is None:
            registered = candidate
            call.portal.add_active_call(candidate)
        return {
            "CALL_ID": registered.call_id,
            "CRM_CREATED_LEAD": None,
            "CRM_CREATED_ENTITIES": [],
            "CRM_ENTITY_TYPE": registered.crm_entity_type,
            "CRM_ENTITY_ID": registered.crm_entity_id,
        }

    def _find_duplicate(self, portal: PortalState, candidate: ActiveCall, now: float) -> ActiveCall | None:
        """An active call < 30 min old with the same user, phone, type (+ line, external id)."""
        for existing in portal.dedup_candidates(candidate):
            if now - existing.created_at >= DEDUP_WINDOW_SECONDS:
                continue
            if candidate.line and existing.line != candidate.line:
                continue
            return existing
        return None

    def _finish(self, call: MethodCall) -> dict[str, Any]:
        params = call.params
        user_id = self._resolve_user(call.portal, params)
        call_id = params.get("CALL_ID")
        if not isinstance(call_id, str):
            raise ApiError(400, "INVALID_ARGUMENT", "CALL_ID must be a string")
        if call_id not in call.portal.active_calls:
            raise self._core_error(CALL_NOT_REGISTERED)
        self._require_active_user(call.portal, user_id)
        active = call.portal.pop_active_call(call_id)
        row = self._statistics_row(call.portal, active, user_id, params)
        call.portal.add_statistics_row(row)
        return self._finish_result(row, active)

    def _statistics_row(
        self, portal: PortalState, active: ActiveCall, user_id: int, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        duration = max(0, php_int(params.get("DURATION")))
        vote = php_int(params.get("VOTE"))
        row = {
            "ID": portal.next_statistic_id,
            "PORTAL_USER_ID": user_id,
            "PORTAL_NUMBER": active.line,
            "PHONE_NUMBER": active.phone,
            "CALL_ID": active.call_id,
            "EXTERNAL_CALL_ID": active.external_call_id or None,
            "CALL_CATEGORY": "external",
            "CALL_LOG": None,
            "CALL_DURATION": duration,
            "CALL_START_DATE": active.start_date,
            "CALL_RECORD_URL": php_str(params.get("RECORD_URL")) or None,
            "CALL_VOTE": vote if 1 <= vote <= 5 else None,
            "COST": php_float(params.get("COST")),
            "COST_CURRENCY": php_str(params.get("COST_CURRENCY")),
            "CALL_FAILED_CODE": php_str(params.get("STATUS_CODE")) or ("200" if duration else "304"),
            "CALL_FAILED_REASON": php_str(params.get("FAILED_REASON")),
            "CRM_ENTITY_TYPE": active.crm_entity_type,
            "CRM_ENTITY_ID": active.crm_entity_id,
            "CRM_ACTIVITY_ID": None,
            "REST_APP_ID": None,
            "REST_APP_NAME": None,
            "TRANSCRIPT_ID": None,
            "TRANSCRIPT_PENDING": "N",
            "SESSION_ID": None,
            "REDIAL_ATTEMPT": None,
            "COMMENT": None,
            "RECORD_DURATION": None,
            "RECORD_FILE_ID": None,
            "CALL_TYPE": active.call_type,
        }
        portal.next_statistic_id += 1
        return row

    def _finish_result(self, row: Mapping[str, Any], active: ActiveCall) -> dict[str, Any]:
        result = {key: row[key] for key in FINISH_RESULT_KEYS}
        result["INCOMING"] = str(active.call_type)
        result["CALL_STATUS"] = 1 if row["CALL_DURATION"] > 0 else 0
        result["REST_APP_NAME"] = False
        if self.config.finish_start_date_as_object:
            result["CALL_START_DATE"] = {}  # a PHP DateTime object serialises as {}
        return result

    def _attach_transcription(self, call: MethodCall) -> dict[str, Any]:
        params = call.params
        call_id = params.get("CALL_ID")
        if call_id is None:
            raise self._core_error("CALL_ID should be set")
        messages = params.get("MESSAGES")
        if not isinstance(messages, list | dict):
            raise self._core_error("MESSAGES should be an array")
        items = list(enumerate(messages)) if isinstance(messages, list) else list(messages.items())
        for key, message in items:
            self._validate_message(key, message)
        row = call.portal.statistics.get(php_str(call_id))
        if row is None:
            raise self._core_error(f"Call {php_str(call_id)} is not found. Is it finished?")
        if self.config.strict_messages:
            _reject_unknown_message_keys(message for _, message in items)
        return {"TRANSCRIPT_ID": self._store_transcript(call.portal, row, items, params)}

    def _validate_message(self, key: object, message: object) -> None:
        if not isinstance(message, dict):
            # PHP hits a TypeError on a non-array item; the REST server does not catch it.
            raise ApiError(500, "INTERNAL_SERVER_ERROR", f"MESSAGES[{key}] is not an array")
        if message.get("SIDE") not in TRANSCRIPT_SIDES:
            raise self._core_error(f"MESSAGES[{key}][SIDE] should be either Client or User")
        if php_int(message.get("START_TIME")) < 0:
            raise self._core_error(f"MESSAGES[{key}][START_TIME] should be greater or equal to zero")
        if php_int(message.get("STOP_TIME")) <= 0:
            raise self._core_error(f"MESSAGES[{key}][STOP_TIME] should be greater than zero")
        if message.get("MESSAGE") in (None, "", False):
            raise self._core_error(f"MESSAGES[{key}][MESSAGE] is empty")

    def _store_transcript(
        self,
        portal: PortalState,
        row: dict[str, Any],
        items: list[tuple[Any, Any]],
        params: Mapping[str, Any],
    ) -> int:
        transcript_id = portal.next_transcript_id
        portal.next_transcript_id += 1
        cost = params.get("COST")
        priced = php_truthy(cost)
        portal.transcripts[transcript_id] = {
            "call_id": row["CALL_ID"],
            "messages": [message for _, message in items],
            "cost": php_float(cost) if priced else None,
            "cost_currency": php_str(params.get("COST_CURRENCY")) if priced else None,
        }
        row["TRANSCRIPT_ID"] = transcript_id
        row["TRANSCRIPT_PENDING"] = "N"
        portal.attachments.setdefault(row["CALL_ID"], []).append(transcript_id)
        return transcript_id

    def _statistic_get(self, call: MethodCall) -> Page:
        if self.config.deny_statistics:
            raise ApiError(403, "ACCESS_DENIED", "Access denied!")
        filters = call.params.get("FILTER")
        conditions = _parse_filter(filters if isinstance(filters, dict) else {})
        rows = [
            row
            for row in _candidate_rows(call.portal, conditions)
            if all(_matches(row, condition) for condition in conditions)
        ]
        rows = _sorted_rows(rows, call.params.get("SORT"), call.params.get("ORDER"))
        start = max(0, php_int(call.params.get("start")))
        end = start + STATISTIC_PAGE_SIZE
        return Page(
            items=[_database_row(row) for row in rows[start:end]],
            total=len(rows),
            next=end if end < len(rows) else None,
        )

    def _show_or_hide(self, call: MethodCall) -> bool:
        call_id = call.params.get("CALL_ID")
        return isinstance(call_id, str) and call_id in call.portal.active_calls

    def _user_current(self, call: MethodCall) -> dict[str, Any]:
        user = call.portal.users.get(call.webhook.user_id)
        return {
            "ID": str(call.webhook.user_id),
            "ACTIVE": bool(user and user.active),
            "NAME": user.name if user else "",
            "LAST_NAME": "",
            "ADMIN": True,
            "UF_PHONE_INNER": user.inner_phone if user else "",
        }

    def _scope(self, call: MethodCall) -> list[str]:
        return list(call.webhook.scopes)


# --- Helpers used by the methods ------------------------------------------------------------


def _canonical(method: str) -> str:
    return method if method == "*" else method.lower().removesuffix(".json")


def _default_error_body(status: int) -> dict[str, Any]:
    known = {
        503: ("QUERY_LIMIT_EXCEEDED", "Too many requests"),
        429: ("OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit."),
        401: ("INVALID_CREDENTIALS", "Invalid request credentials"),
        403: ("WRONG_AUTH_TYPE", "Current authorization type is denied for this method"),
        404: ("ERROR_METHOD_NOT_FOUND", "Method not found!"),
    }
    code, description = known.get(status, ("INTERNAL_SERVER_ERROR", "Internal server error"))
    return {"error": code, "error_description": description}


def _operating_limit_error(timing: Mapping[str, Any]) -> ApiError:
    # Real 429s carry no Retry-After; the fake adds `time` so clients can read operating_reset_at.
    return ApiError(
        429,
        "OPERATION_TIME_LIMIT",
        "Method is blocked due to operation time limit.",
        {"time": dict(timing)},
    )


def _reject_unknown_message_keys(messages: Iterable[Mapping[str, Any]]) -> None:
    """Strict mode: the ORM refuses transcript-line fields it does not map."""
    for message in messages:
        unknown = sorted(set(message) - TRANSCRIPT_MESSAGE_KEYS)
        if unknown:
            raise ApiError(
                400,
                "ERROR_ARGUMENT",
                f"Bitrix\\Voximplant\\Model\\TranscriptLineTable Entity has no `{unknown[0]}` field.",
            )


def _parse_filter(filters: Mapping[str, Any]) -> list[tuple[bool, str, object]]:
    """(negated, field, value) per FILTER key; only =, ! and != are emulated."""
    conditions: list[tuple[bool, str, object]] = []
    for key, value in filters.items():
        match = _FILTER_KEY.fullmatch(str(key))
        if match is None:
            raise ApiError(400, "ERROR_ARGUMENT", f"Filter key {key!r} is not supported by the fake")
        operator, name = match.groups()
        conditions.append((operator in ("!", "!="), name, value))
    return conditions


def _candidate_rows(portal: PortalState, conditions: list[tuple[bool, str, object]]) -> list[dict[str, Any]]:
    """Use the CALL_ID / EXTERNAL_CALL_ID indexes when the filter pins one value."""
    for negated, name, value in conditions:
        if negated or isinstance(value, list | dict):
            continue
        if name == "CALL_ID":
            row = portal.statistics.get(php_str(value))
            return [row] if row else []
        if name == "EXTERNAL_CALL_ID":
            ids = portal.statistics_by_external_id.get(php_str(value), [])
            return [portal.statistics[call_id] for call_id in ids]
    return list(portal.statistics.values())


def _matches(row: Mapping[str, Any], condition: tuple[bool, str, object]) -> bool:
    negated, name, value = condition
    if name not in row:
        raise ApiError(400, "ERROR_ARGUMENT", f"Unknown filter field {name}")
    wanted = value if isinstance(value, list) else [value]
    found = php_str(row[name]) in {php_str(item) for item in wanted}
    return found != negated


def _sorted_rows(rows: list[dict[str, Any]], sort: object, order: object) -> list[dict[str, Any]]:
    if not isinstance(sort, str) or not sort:
        return rows
    descending = php_str(order).upper() == "DESC"
    return sorted(rows, key=lambda row: php_str(row.get(sort)), reverse=descending)


def _portal_summary(portal: PortalState) -> dict[str, Any]:
    return {
        "statistics": len(portal.statistics),
        "active_calls": len(portal.active_calls),
        "transcripts": len(portal.transcripts),
        "count_503": portal.count_503,
    }


def _control_body(request: IncomingRequest) -> dict[str, Any]:
    if not request.body:
        return {}
    decoded = json.loads(request.body)
    if not isinstance(decoded, dict):
        raise TypeError("control body must be a JSON object")
    return decoded


# --- HTTP ----------------------------------------------------------------------------------


class FakeBitrix24Server(ThreadingHTTPServer):
    """A threaded HTTP server that knows its FakeBitrix24."""

    daemon_threads = True
    block_on_close = False  # keep-alive connections must not hold up stop()
    request_queue_size = 256  # load tests open many connections at once

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        fake: FakeBitrix24,
    ) -> None:
        self.fake = fake
        super().__init__(address, handler)


class FakeBitrix24Handler(BaseHTTPRequestHandler):
    """Turns HTTP requests into IncomingRequest and Reply into bytes on the wire."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 120  # idle keep-alive connections are closed eventually
    server: FakeBitrix24Server

    def do_GET(self) -> None:
        """Serve a GET request."""
        self._serve()

    def do_POST(self) -> None:
        """Serve a POST request."""
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: thousands of requests would flood the test output."""

    def _serve(self) -> None:
        request = self._read_request()
        fake = self.server.fake
        control = request.path.startswith("/_fake/")
        try:
            reply = fake.handle_control(request) if control else fake.handle(request)
        except FAKE_BUGS as error:  # a fake's bug must not look like a dropped connection
            reply = Reply(500, {"error": "FAKE_BUG", "error_description": repr(error)})
            self.log_error("fake_bitrix24 failed: %r", error)
        self._send(reply)

    def _read_request(self) -> IncomingRequest:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        url = urlsplit(self.path)
        return IncomingRequest(
            http_method=self.command,
            path=url.path,
            query=url.query,
            body=body,
            content_type=self.headers.get("Content-Type", ""),
        )

    def _send(self, reply: Reply) -> None:
        if reply.delay_after > 0:
            time.sleep(reply.delay_after)
        if reply.drop:
            self._drop_connection()
            return
        body = reply.encode()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout) before a slow answer
            self.close_connection = True

    def _drop_connection(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


# --- pytest fixture ------------------------------------------------------------------------


@pytest.fixture
def fake_bitrix24() -> Iterator[FakeBitrix24]:
    """A running fake Bitrix24 on 127.0.0.1; ``fake_bitrix24.webhook_url`` is its webhook."""
    with FakeBitrix24() as fake:
        yield fake


# --- Command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of ``python -m tests.fake_bitrix24``."""
    parser = argparse.ArgumentParser(description="Fake Bitrix24 REST server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--portals", type=int, default=1, help="portals, one webhook each")
    parser.add_argument("--burst", type=float, default=None, help="leaky bucket size (off)")
    parser.add_argument("--rate", type=float, default=2.0, help="bucket drain per second")
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--drop-rate", type=float, default=0.0)
    parser.add_argument("--slow-rate", type=float, default=0.0)
    parser.add_argument("--slow-seconds", type=float, default=3.0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--operating-limit", type=float, default=None)
    parser.add_argument("--error-code", default="", choices=["", "ERROR_CORE"])
    parser.add_argument("--no-strict", action="store_true", help="accept extra message keys")
    parser.add_argument("--deny-webhook-app-methods", action="store_true")
    parser.add_argument("--deny-statistics", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> dict[str, object]:
    """FakeConfig changes from parsed command-line options."""
    return {
        "burst": args.burst,
        "rate": args.rate,
        "error_rate": args.error_rate,
        "drop_rate": args.drop_rate,
        "slow_rate": args.slow_rate,
        "slow_seconds": args.slow_seconds,
        "latency": args.latency,
        "seed": args.seed,
        "operating_limit": args.operating_limit,
        "error_code": args.error_code,
        "strict_messages": not args.no_strict,
        "deny_webhook_app_methods": args.deny_webhook_app_methods,
        "deny_statistics": args.deny_statistics,
    }


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT after printing one JSON line with the URLs."""
    args = build_parser().parse_args(argv)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    fake = FakeBitrix24(host=args.host, port=args.port)
    fake.configure(**config_from_args(args))
    with fake:
        portals = {DEFAULT_PORTAL: fake.webhook_url}
        for number in range(2, args.portals + 1):
            portals[f"portal{number}"] = fake.add_webhook(portal=f"portal{number}")
        announcement = {
            "webhook_url": fake.webhook_url,
            "webhook_urls": list(portals.values()),
            "portals": portals,
            "control_url": fake.control_url,
            "base_url": fake.base_url,
            "port": fake.port,
        }
        print(json.dumps(announcement), flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

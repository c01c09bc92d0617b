"""The FakeBitrix24 class, its control API, and the HTTP server that exposes it.

The request pipeline (route, injections, rate limit, auth, operating limit, random faults, the
method, the reply) is here; its steps live in limits.py, faults.py, telephony.py, records.py
(attachRecord and its streamed upload route) and (tokens, the OAuth server) oauth.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

from fake_bitrix24.apps import Installation
from fake_bitrix24.faults import FaultDice, FaultsMixin, Injection
from fake_bitrix24.limits import LeakyBucket, LimitsMixin, _operating_limit_error
from fake_bitrix24.multipart import BodyError, BodyReader
from fake_bitrix24.oauth import OAuthMixin, split_app_prefix
from fake_bitrix24.protocol import (
    JSON_CONTENT_TYPE,
    ApiError,
    IncomingRequest,
    Page,
    RecordedRequest,
    Reply,
    _canonical,
    _parse_rest_path,
    parse_params,
)
from fake_bitrix24.records import UPLOAD_PATH, RecordsMixin
from fake_bitrix24.state import (
    DEFAULT_PORTAL,
    DEFAULT_SCOPES,
    ActiveCall,
    FakeConfig,
    MethodCall,
    MethodHandler,
    PortalState,
    User,
    Webhook,
)
from fake_bitrix24.telephony import TelephonyMethods

# Exceptions that can only mean a bug in the fake; answered as 500 instead of a dropped socket.
FAKE_BUGS = (LookupError, TypeError, ValueError, AttributeError, ArithmeticError)


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
    app_route: bool = False  # ``/rest/<method>``: an application's call, authorized by a token
    member_id: str | None = None  # the portal the application endpoint belongs to
    access_token: str | None = None
    client_id: str | None = None
    installation: Installation | None = None


# --- The fake ------------------------------------------------------------------------------


class FakeBitrix24(TelephonyMethods, LimitsMixin, FaultsMixin, OAuthMixin, RecordsMixin):
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
            "telephony.externalcall.attachrecord": ("telephony", self._attach_record),
            "telephony.externalcall.show": ("telephony", self._show_or_hide),
            "telephony.externalcall.hide": ("telephony", self._show_or_hide),
            "voximplant.statistic.get": ("telephony", self._statistic_get),
            "user.current": (None, self._user_current),
            "profile": (None, self._user_current),
            "scope": (None, self._scope),
        }
        self._init_oauth()
        self._init_records()

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
        """Move the fake's clock forward (dedup window, bucket drain, operating buckets, tokens)."""
        with self._lock:
            self._clock_offset += seconds

    def now(self) -> float:
        """The fake's clock: wall time plus ``advance_clock`` offsets."""
        return time.time() + self._clock_offset

    def reset(self, config: bool = False) -> None:
        """Forget requests, calls, transcripts, records, upload URLs, injections and limiter state.

        Webhooks, applications, installations and their tokens are kept; the OAuth request log
        is cleared.
        """
        with self._lock:
            for portal in self._portals.values():
                portal.clear()
            self._injections.clear()
            self._requests.clear()
            self._token_requests.clear()
            self._forget_upload_tickets()
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
                "records": sum(len(history) for portal in portals for history in portal.records.values()),
                "attachments_by_call": self._attachments_by_call(None),
                "portals": {portal.name: _portal_summary(portal) for portal in portals},
                "config": dataclasses.asdict(self.config),
                **self._oauth_summary(),
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
        found, portal = self._route(exchange, request)
        injection = self._take_injection(exchange.method)
        if injection is not None and injection.kind != "slow":
            exchange.fault = "injected"
            return self._injected_reply(injection)
        self._admit(portal, exchange.started)
        if exchange.app_route:
            webhook, handler = self._authenticate_app(exchange)
        else:
            webhook, handler = self._authenticate(exchange, found)
        operating_key = (webhook.code, exchange.method)
        self._check_operating_limit(portal, operating_key, exchange.started)
        exchange.fault = self._roll_fault() or ("slow" if injection else "")
        if exchange.fault == "error":
            raise ApiError(500, "INTERNAL_SERVER_ERROR", "Internal server error")
        if exchange.fault == "drop":
            return Reply(0, None, drop=True)
        self._charge_operating(portal, operating_key, exchange.started)
        if not exchange.app_route:  # applications may call the application-only methods
            self._check_auth_type(exchange.method)
        result = handler(MethodCall(portal, webhook, exchange.params, exchange.started, exchange.installation))
        reply = self._success_reply(result, portal, operating_key, exchange.started)
        if exchange.fault == "slow":  # performed; the answer comes late (the client may time out)
            reply.delay_after = injection.seconds if injection else self.config.slow_seconds
        return reply

    def _route(self, exchange: Exchange, request: IncomingRequest) -> tuple[Webhook | None, PortalState]:
        """Parse path and parameters; find the webhook and its portal (unknown: the default).

        ``/rest/<method>`` and ``/p/<member_id>/rest/<method>`` are application calls (oauth.py).
        """
        member_id, path = split_app_prefix(request.path)
        route = _parse_rest_path(path)
        if route is None or (member_id is not None and route[0] is not None):
            raise ApiError(404, "NOT_FOUND", f"No such path: {request.path}")
        exchange.user_id, exchange.code, exchange.method = route
        exchange.params = parse_params(request)
        if exchange.user_id is None:
            exchange.portal = self._route_app(exchange, request, member_id)
            return None, exchange.portal
        webhook = self._webhooks.get((exchange.user_id or 0, exchange.code or ""))
        exchange.portal = self._portals[webhook.portal if webhook else DEFAULT_PORTAL]
        return webhook, exchange.portal

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
                member_id=exchange.member_id,
                access_token=exchange.access_token,
                client_id=exchange.client_id,
            )
        )

    # Control endpoints ----------------------------------------------------------------------

    def handle_control(self, request: IncomingRequest) -> Reply:
        """``/_fake/state``, ``config``, ``reset``, ``inject``, ``records``, and the application ones (oauth.py)."""
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
        if action == "records" and http_method == "GET":
            with self._lock:
                return Reply(200, {"records": self._records_json()})
        reply = self._oauth_control(http_method, action, body)
        if reply is not None:
            return reply
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


def _portal_summary(portal: PortalState) -> dict[str, Any]:
    return {
        "statistics": len(portal.statistics),
        "active_calls": len(portal.active_calls),
        "transcripts": len(portal.transcripts),
        "records": sum(len(history) for history in portal.records.values()),
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
        if urlsplit(self.path).path.startswith(UPLOAD_PATH):
            self._serve_upload()
            return
        request = self._read_request()
        fake = self.server.fake
        try:
            if request.path.startswith("/_fake/"):
                reply = fake.handle_control(request)
            elif request.path.startswith("/oauth/"):
                reply = fake.handle_oauth(request)
            else:
                reply = fake.handle(request)
        except FAKE_BUGS as error:  # a fake's bug must not look like a dropped connection
            reply = Reply(500, {"error": "FAKE_BUG", "error_description": repr(error)})
            self.log_error("fake_bitrix24 failed: %r", error)
        self._send(reply)

    def _serve_upload(self) -> None:
        """An upload URL: the body is handed over unread, so a 300 MB recording never sits in memory."""
        url = urlsplit(self.path)
        request = IncomingRequest(
            http_method=self.command,
            path=url.path,
            query=url.query,
            body=b"",
            content_type=self.headers.get("Content-Type", ""),
            host=self.headers.get("Host", ""),
            authorization=self.headers.get("Authorization", ""),
        )
        try:
            body = BodyReader.from_headers(self.rfile, self.headers)
        except BodyError as error:  # no telling where this body ends: answer, then close
            self._send(Reply(400, {"error": "INVALID_REQUEST", "error_description": str(error)}), close=True)
            return
        try:
            reply = self.server.fake.handle_upload(request, body)
        except FAKE_BUGS as error:
            reply = Reply(500, {"error": "FAKE_BUG", "error_description": repr(error)})
            self.log_error("fake_bitrix24 failed: %r", error)
        self._send(reply, close=not body.exhausted)

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
            host=self.headers.get("Host", ""),
            authorization=self.headers.get("Authorization", ""),
        )

    def _send(self, reply: Reply, close: bool = False) -> None:
        """Write the reply; ``close``: the request's body was not read to its end."""
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
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout) before a slow answer
            self.close_connection = True

    def _drop_connection(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

"""`POST /hooks/stt/<vendor>` and `POST /hooks/pbx/<pbx>`: authenticate, validate, store, answer.

The blueprint declares both routes; `HookLane` (installed by `app.register_middleware`) serves them
without Flask's dispatch, running the same receivers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from flask import Flask, Response, current_app, request
from flask_smorest import Blueprint
from marshmallow import ValidationError
from werkzeug.exceptions import ClientDisconnected, InternalServerError, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Request

from b24scribe.db import Database
from b24scribe.inbound_auth import STANDARD_WEBHOOK_HEADERS, Authenticated, AuthFailure, authenticate
from b24scribe.ingest import Outcome, RawEvent, call_event_key, store_event, store_rejected, transcript_key
from b24scribe.intake import PBX_PARSERS, parse_call_event, parse_transcript, resolve_portal
from b24scribe.metrics import Metrics
from b24scribe.settings import Settings
from handlers.errors import ApiError, answer_error
from handlers.openapi import document_pbx_hook, document_stt_hook
from schemas.registry import STT_VENDORS

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = structlog.get_logger(__name__)
_debug_log = logging.getLogger(__name__)  # the stdlib logger behind `log`: one level check per event
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


@dataclass(frozen=True, slots=True)
class Stored:
    """The answer to a stored event: its status and JSON body."""

    status: int
    body: bytes

    def response(self) -> Response:
        """As a Flask response (the views' way out)."""
        return Response(self.body, self.status, content_type="application/json")


@dataclass(frozen=True, slots=True)
class _Hook:
    """What one hook request works with: the request itself (not the proxy) and the app's services."""

    request: Request
    args: dict[str, str]  # the query, first value per name, as a plain dict (werkzeug's raises inside .get)
    settings: Settings
    db: Database
    metrics: Metrics
    source: str
    provider: str

    @classmethod
    def current(cls, source: str, provider: str) -> _Hook:
        """The Flask view's hook: the current request, the current app's services."""
        current: Request = request._get_current_object()  # type: ignore[attr-defined]  # once, not per attribute
        return cls.of(current, current_app.extensions, source, provider)

    @classmethod
    def of(cls, request: Request, extensions: dict[str, Any], source: str, provider: str) -> _Hook:
        """The hook of this request, with the services in the app's `extensions`."""
        return cls(
            request,
            request.args.to_dict() if request.args else {},
            extensions["b24scribe.settings"],
            extensions["b24scribe.db"],
            extensions["b24scribe.metrics"],
            source,
            provider,
        )

    def body(self) -> bytes:
        """The request body, whole, or 413 when it is over the limit (nothing is stored then).

        With a Content-Length (what PBXs and vendors send) exactly that many bytes are read in one
        call; werkzeug's stream, limited to MAX_CONTENT_LENGTH, would read in 64 KiB steps into
        fresh zeroed buffers (two 64 KiB allocations for a 200-byte event). A chunked body (no
        length; the server ends the stream) is read to its end, and one byte over the limit is a
        413: werkzeug would cut it at the limit and hand on the truncated body.
        """
        request = self.request
        limit = self.settings.max_body_bytes
        length = request.content_length
        if length is not None:
            if length > limit:
                raise RequestEntityTooLarge()
            body: bytes = request.environ["wsgi.input"].read(length)
            if len(body) != length:
                raise ClientDisconnected()  # the sender went away mid-body: 400, and it retries
            return body
        if not request.environ.get("wsgi.input_terminated"):
            return request.get_data(cache=False)  # no length and no end: werkzeug reads nothing
        body = _read_to_end(request.environ["wsgi.input"], limit + 1)
        if len(body) > limit:
            raise RequestEntityTooLarge()
        return body

    def credential_headers(self, vendor_header: str | None) -> dict[str, str]:
        """Only the headers a credential can be in (copying all of them is most of the cost of auth)."""
        environ = self.request.environ
        found = {name: value for name, key in CREDENTIAL_HEADERS if (value := environ.get(key)) is not None}
        if vendor_header and (value := self.request.headers.get(vendor_header)) is not None:
            found[vendor_header] = value
        return found

    def authenticate(self, body: bytes, vendor_header: str | None = None) -> Authenticated:
        try:
            return authenticate(
                self.settings,
                self.credential_headers(vendor_header),
                self.args,
                body,
                vendor_header=vendor_header,
                standard_webhooks=self.provider in STANDARD_WEBHOOK_SOURCES,
            )
        except AuthFailure as failure:
            self.metrics.rejected(self.source, self.provider, failure.code)
            raise ApiError(failure.status, failure.code, failure.message) from None

    def raw_event(self, body: bytes, auth: Authenticated) -> RawEvent:
        """What is stored: the request minus its credentials (`?token=` is dropped from the query)."""
        query = {key: value for key, value in self.args.items() if key != "token"} if self.args else {}
        return RawEvent(self.source, self.provider, body, query, self.request.content_type, auth.delivery_id)

    def answer(self, outcome: Outcome) -> Stored:
        """202 for a new event, 200 for a duplicate; the stored rejection's 422 again for a rejected one."""
        if outcome.rejected_with is not None:
            self.metrics.received(self.source, self.provider, "rejected")
            raise ApiError(
                422,
                "invalid_payload",
                outcome.rejected_with.get("message", "invalid payload"),
                outcome.rejected_with.get("fields"),
            )
        self.metrics.received(self.source, self.provider, "duplicate" if outcome.duplicate else "accepted")
        structlog.contextvars.bind_contextvars(event_id=outcome.event_id)
        if _debug_log.isEnabledFor(logging.DEBUG):  # the access log already has a line per request
            log.debug("event stored", source=self.source, provider=self.provider, duplicate=outcome.duplicate)
        if outcome.duplicate:
            return Stored(200, _STORED % (outcome.event_id, b"true"))
        return Stored(202, _STORED % (outcome.event_id, b"false"))

    def reject(self, raw: RawEvent, fields: dict[str, Any], message: str, natural_key: str | None = None) -> ApiError:
        """Store the unprocessable event (it can be replayed after a fix) and build the 422."""
        outcome = store_rejected(self.db, raw, {"message": message, "fields": fields}, natural_key)
        self.metrics.received(raw.source, raw.provider, "rejected")
        return ApiError(422, "invalid_payload", message, {**fields, "event_id": outcome.event_id})


def _read_to_end(stream: Any, at_most: int) -> bytes:
    """Read a stream until it ends or `at_most` bytes are in."""
    chunks: list[bytes] = []
    size = 0
    while size < at_most and (chunk := stream.read(min(at_most - size, 64 * 1024))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


_STORED = b'{"event_id": %d, "duplicate": %s}\n'  # the answer to every stored event (no JSON encoder needed)


def _field_errors(error: ValidationError) -> dict[str, Any]:
    return error.messages if isinstance(error.messages, dict) else {"_body": error.messages}


def receive_transcript(hook: _Hook, vendor: str) -> Stored:
    """Authenticate, validate, store and answer a transcript callback (both ways in call this)."""
    adapter = STT_VENDORS.get(vendor)
    if adapter is None:
        raise ApiError(404, "unknown_vendor", f"no STT vendor {vendor!r}; known: {', '.join(sorted(STT_VENDORS))}")
    body = hook.body()
    auth = hook.authenticate(body, adapter.auth_header)
    raw = hook.raw_event(body, auth)
    args = hook.args
    try:
        resolve_portal(hook.settings, args)  # an unknown ?portal= is a 422 now, not a dead job later
        parsed = parse_transcript(vendor, body, args)
    except ValidationError as error:
        raise hook.reject(raw, _field_errors(error), "the transcript cannot be processed: see fields") from None
    outcome = store_event(hook.db, raw, transcript_key(raw, parsed.result, parsed.options))
    return hook.answer(outcome)


def receive_call_event(hook: _Hook, pbx: str) -> Stored:
    """Authenticate, validate, store and answer a PBX call event (both ways in call this)."""
    if pbx not in PBX_PARSERS:
        raise ApiError(404, "unknown_pbx", f"no PBX {pbx!r}; known: {', '.join(sorted(PBX_PARSERS))}")
    body = hook.body()
    auth = hook.authenticate(body)
    raw = hook.raw_event(body, auth)
    args = hook.args
    try:
        resolve_portal(hook.settings, args)
        event = parse_call_event(pbx, body, args)
    except ValidationError as error:
        raise hook.reject(raw, _field_errors(error), "the call event cannot be processed: see fields") from None
    structlog.contextvars.bind_contextvars(pbx=pbx, pbx_call_id=event.call_id)
    return hook.answer(store_event(hook.db, raw, call_event_key(raw, event.call_id)))


@bp.post("/stt/<vendor>")
@document_stt_hook(bp)
def stt_hook(vendor: str) -> Response:
    """A transcript callback from an STT vendor (or our generic format)."""
    return receive_transcript(_Hook.current("stt", vendor), vendor).response()


@bp.post("/pbx/<pbx>")
@document_pbx_hook(bp)
def pbx_hook(pbx: str) -> Response:
    """A call life-cycle event from a PBX."""
    return receive_call_event(_Hook.current("pbx", pbx), pbx).response()


_RECEIVERS: dict[str, tuple[str, Callable[[_Hook, str], Stored], Container[str]]] = {
    "/hooks/pbx/": ("pbx", receive_call_event, PBX_PARSERS),
    "/hooks/stt/": ("stt", receive_transcript, STT_VENDORS),
}
_PREFIX_LENGTH = len("/hooks/pbx/")
assert {len(prefix) for prefix in _RECEIVERS} == {_PREFIX_LENGTH}  # one slice finds the receiver


class HookLane:
    """WSGI middleware: serves `POST /hooks/pbx/<known PBX>` and `POST /hooks/stt/<known vendor>`
    without Flask's request dispatch; every other request goes on to Flask.

    The hooks are the service's hot path (every call event of every PBX), and Flask's per-request
    work (request and app contexts, URL matching, signals, response objects) was a fifth of a PBX
    event's CPU under load (bench/ingest.py: 0.66 of the bare Flask ceiling without the lane). The lane
    runs the same receivers as the blueprint's views, which stay the routes' declaration (OpenAPI,
    `flask routes`) and answer everything the lane does not take (unknown names: 404; other
    methods: 405), and answers errors through the same `answer_error`. tests/test_hook_lane.py
    checks that both ways give the same answers.
    """

    def __init__(self, app: Flask, wsgi_app: WSGIApplication) -> None:
        self.wsgi_app = wsgi_app
        self._extensions = app.extensions
        self._max_body_bytes: int = app.extensions["b24scribe.settings"].max_body_bytes

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        receiver = _RECEIVERS.get(path[:_PREFIX_LENGTH]) if environ.get("REQUEST_METHOD") == "POST" else None
        name = path[_PREFIX_LENGTH:]
        if receiver is None or name not in receiver[2]:
            return self.wsgi_app(environ, start_response)
        source, receive, _known = receiver
        try:
            stored = receive(_Hook.of(Request(environ), self._extensions, source, name), name)
        except Exception as error:
            # Fails closed, as the views do: nothing acknowledged, so the sender retries.
            answer = answer_error(error, self._max_body_bytes)
            if answer is None:  # a bug: logged with its traceback, answered 500
                log.exception("unhandled error in a hook", path=path)
                answer = answer_error(InternalServerError(), None)
                assert answer is not None
            return answer(environ, start_response)
        # what `stored.response()` would send, without building a Response (every event comes this way)
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(stored.body)))]
        start_response(_STATUS_LINES[stored.status], headers)
        return [stored.body]


_STATUS_LINES = {status: f"{status} {HTTP_STATUS_CODES[status].upper()}" for status in (200, 202)}  # as werkzeug's

"""`POST /hooks/stt/<vendor>` and `POST /hooks/pbx/<pbx>`: authenticate, validate, store, answer.

The blueprint declares both routes; `HookLane` (installed by `app.register_middleware`) serves them
without Flask's dispatch, running the same receivers.

A hostile sender meets, in order (docs/security.md): at most 200 query fields; its credentials
checked before a byte of its body is read (only a signature over the body reads the body first);
the route's body limit (PBX events 64 KiB, transcripts B24SCRIBE_MAX_BODY_BYTES), enforced before
reading a declared length and while reading a chunked one; a deadline for the body to arrive; and
a 4xx in the one error shape for whatever it sends, stored as a rejected event once authenticated.
Only a failure to store is a 5xx.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
import structlog
from flask import Flask, Response, current_app, request
from flask_smorest import Blueprint
from gevent import monkey
from marshmallow import ValidationError
from werkzeug.exceptions import InternalServerError
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Request

from b24scribe.db import Database
from b24scribe.inbound_auth import (
    STANDARD_WEBHOOK_HEADERS,
    Authenticated,
    AuthFailure,
    authenticate_before_body,
    authenticate_signed_body,
)
from b24scribe.ingest import Outcome, RawEvent, call_event_key, store_event, store_rejected, transcript_key
from b24scribe.intake import MAX_FORM_FIELDS, PBX_PARSERS, parse_call_event, parse_transcript, resolve_portal
from b24scribe.metrics import Metrics
from b24scribe.settings import Settings
from handlers.errors import BODY_ERRORS, ApiError, answer_error, bounded_fields, unreadable_body_message
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

# Body limits per route (contract §12): a PBX event is a few hundred bytes, so 64 KiB is generous and
# keeps a hostile sender from making the hot path read megabytes; a transcript may be long.
PBX_MAX_BODY_BYTES = 64 * 1024
# Query and form fields of one request: urllib's parse_qsl takes any number (max_num_fields=None);
# the same bound the stored form is parsed with again on replay.
MAX_FIELDS = MAX_FORM_FIELDS
_BODY_READ = "b24scribe.body_read"  # environ key: set once the hook has read its whole body
# what reading a hook's body can raise: the server's body errors, and a connection reset mid-body
_READ_ERRORS: tuple[type[Exception], ...] = (*BODY_ERRORS, OSError)


class BodyTimeout(Exception):
    """The body did not arrive within the settings' body_timeout_seconds."""


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
    def of(cls, request: Request, extensions: dict[str, Any], source: str, provider: str) -> _Hook:
        """The hook of this request, with the services in the app's `extensions` (400: too many query fields)."""
        query: str = request.environ.get("QUERY_STRING", "")
        if query and (count := query.count("&") + 1) > MAX_FIELDS:  # how parse_qsl counts them
            problem = f"the query has {count} fields; at most {MAX_FIELDS} are read"
            raise ApiError(400, "too_many_fields", problem, {"_query": [problem]})
        return cls(
            request,
            request.args.to_dict() if query else {},
            extensions["b24scribe.settings"],
            extensions["b24scribe.db"],
            extensions["b24scribe.metrics"],
            source,
            provider,
        )

    def body(self, limit: int) -> bytes:
        """The request body, whole: 413 over `limit`, 400 when it cannot be read whole, 408 when it
        does not arrive within `body_timeout_seconds` (nothing is stored then).

        With a Content-Length (what PBXs and vendors send) a length over the limit is refused before
        a byte is read, and exactly that many bytes are read in one call; werkzeug's stream, limited
        to MAX_CONTENT_LENGTH, would read in 64 KiB steps into fresh zeroed buffers (two 64 KiB
        allocations for a 200-byte event). A chunked body (no length; the server ends the stream) is
        read until it passes the limit, which is a 413 right then: werkzeug would cut it at the
        limit and hand on the truncated body.
        """
        request = self.request
        environ = request.environ
        length = request.content_length
        if length is not None and length > limit:
            raise self._too_large(limit)
        if length is None and not environ.get("wsgi.input_terminated"):
            environ[_BODY_READ] = True
            return b""  # no length and no end (a WSGI server that does not frame chunked bodies)
        seconds = self.settings.body_timeout_seconds
        try:
            body = _read_within(environ, seconds, length, limit)
        except BodyTimeout:
            raise ApiError(408, "body_timeout", f"the body did not arrive within {seconds:g} seconds") from None
        except _READ_ERRORS as error:
            raise ApiError(400, "unreadable_body", unreadable_body_message(error)) from None
        if length is not None and len(body) != length:  # the sender went away mid-body: 400, and it retries
            raise ApiError(
                400, "unreadable_body", f"the body ended after {len(body)} of its {length} bytes (Content-Length)"
            )
        if len(body) > limit:
            raise self._too_large(limit)
        environ[_BODY_READ] = True
        return body

    def _too_large(self, limit: int) -> ApiError:
        if self.source == "pbx":
            message = f"the body is larger than the limit of {limit} bytes for PBX events"
        else:
            message = f"the body is larger than the limit of {limit} bytes (B24SCRIBE_MAX_BODY_BYTES)"
        return ApiError(413, "body_too_large", message)

    def credential_headers(self, vendor_header: str | None) -> dict[str, str]:
        """Only the headers a credential can be in (copying all of them is most of the cost of auth)."""
        environ = self.request.environ
        found = {name: value for name, key in CREDENTIAL_HEADERS if (value := environ.get(key)) is not None}
        if vendor_header and (value := self.request.headers.get(vendor_header)) is not None:
            found[vendor_header] = value
        return found

    def authenticate(self, limit: int, vendor_header: str | None = None) -> tuple[Authenticated, bytes]:
        """Authenticate, then read the body: a credential in the headers or the query is checked before
        a byte of it is read; only a signature over the body reads it first, at most `limit` (contract §12)."""
        headers = self.credential_headers(vendor_header)
        try:
            auth = authenticate_before_body(
                self.settings,
                headers,
                self.args,
                vendor_header=vendor_header,
                standard_webhooks=self.provider in STANDARD_WEBHOOK_SOURCES,
            )
            body = self.body(limit)
            if auth is None:
                auth = authenticate_signed_body(self.settings, headers, body)
        except AuthFailure as failure:
            self.metrics.rejected(self.source, self.provider, failure.code)
            raise ApiError(failure.status, failure.code, failure.message) from None
        return auth, body

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
                bounded_fields(outcome.rejected_with.get("fields")),
            )
        self.metrics.received(self.source, self.provider, "duplicate" if outcome.duplicate else "accepted")
        structlog.contextvars.bind_contextvars(event_id=outcome.event_id)
        if _debug_log.isEnabledFor(logging.DEBUG):  # the access log already has a line per request
            log.debug("event stored", source=self.source, provider=self.provider, duplicate=outcome.duplicate)
        if outcome.duplicate:
            return Stored(200, _STORED % (outcome.event_id, b"true"))
        return Stored(202, _STORED % (outcome.event_id, b"false"))

    def reject(self, raw: RawEvent, fields: dict[str, Any], message: str, natural_key: str | None = None) -> ApiError:
        """Store the unprocessable event (it can be replayed after a fix) and build the 422.

        The fields are bounded before they are stored: the status page and `/v1/events` draw them,
        and a body with thousands of unknown keys must not become thousands of error lines."""
        fields = bounded_fields(fields)
        outcome = store_rejected(self.db, raw, {"message": message, "fields": fields}, natural_key)
        self.metrics.received(raw.source, raw.provider, "rejected")
        return ApiError(422, "invalid_payload", message, {**fields, "event_id": outcome.event_id})

    def unreadable(self, raw: RawEvent, what: str) -> ApiError:
        """A parser raised something other than ValidationError: a bug, logged with its traceback.
        Fails closed but keeps the event: a 4xx, never a 500 (contract §12), stored as rejected for replay."""
        log.exception("a hook's parser failed", source=self.source, provider=self.provider)
        fields = {"_body": [f"this version cannot read the {what}; it is kept and can be replayed after a fix"]}
        return self.reject(raw, fields, f"the {what} cannot be processed: see fields")


def _read_within(environ: dict[str, Any], seconds: float, length: int | None, limit: int) -> bytes:
    """Read the body (`length` bytes, or to its end but at most `limit` + 1) within `seconds`.

    Under the gevent worker a gevent.Timeout interrupts the read. Under a threaded worker (gthread,
    sync) the watchdog shuts the socket's reading side at the deadline, which ends the read. With
    neither (the test client, werkzeug's server) the read is not timed.
    """
    stream = environ["wsgi.input"]
    if monkey.is_module_patched("socket"):
        with gevent.Timeout(seconds, BodyTimeout):
            return stream.read(length) if length is not None else _read_to_end(stream, limit + 1)
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return stream.read(length) if length is not None else _read_to_end(stream, limit + 1)
    key = _WATCHDOG.watch(sock, seconds)
    expired = False
    try:
        try:
            body: bytes = stream.read(length) if length is not None else _read_to_end(stream, limit + 1)
        finally:  # always: a socket still watched after its request would be shut under the next one
            expired = _WATCHDOG.release(key)
    except _READ_ERRORS:
        if expired:
            raise BodyTimeout() from None
        raise
    if expired:  # shut at the deadline, whether or not the last bytes made it: the connection is done
        raise BodyTimeout()
    return body


class _Watchdog:
    """Ends the body reads of threaded workers that run past their deadline.

    A blocking socket has no total deadline (a timeout per recv() lets a sender trickle a byte
    at a time for ever), so one thread per process wakes a few times a second while reads are
    watched and shuts the reading side of overdue sockets: the read sees the end of the stream.
    """

    TICK_SECONDS = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[int, tuple[float, socket.socket]] = {}
        self._expired: set[int] = set()
        self._keys = itertools.count()
        self._work = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, seconds: float) -> int:
        """Watch a read on `sock` for `seconds`; the key to release it with."""
        key = next(self._keys)
        with self._lock:
            self._due[key] = (time.monotonic() + seconds, sock)
            if self._thread is None or not self._thread.is_alive():  # none yet, or this is a forked child
                self._thread = threading.Thread(target=self._run, name="b24scribe-body-watchdog", daemon=True)
                self._thread.start()
        self._work.set()
        return key

    def release(self, key: int) -> bool:
        """Stop watching; True when the deadline had passed and the socket was shut."""
        with self._lock:
            self._due.pop(key, None)
            if key in self._expired:
                self._expired.discard(key)
                return True
        return False

    def _run(self) -> None:
        while True:
            self._work.wait()
            time.sleep(self.TICK_SECONDS)
            now = time.monotonic()
            with self._lock:
                overdue = [(key, sock) for key, (deadline, sock) in self._due.items() if deadline <= now]
                for key, _sock in overdue:
                    del self._due[key]
                    self._expired.add(key)
                if not self._due:
                    self._work.clear()
            for _key, sock in overdue:
                with contextlib.suppress(OSError):  # already closed by the sender
                    sock.shutdown(socket.SHUT_RD)


_WATCHDOG = _Watchdog()


def _read_to_end(stream: Any, at_most: int) -> bytes:
    """Read a stream until it ends or `at_most` bytes are in."""
    chunks: list[bytes] = []
    size = 0
    while size < at_most and (chunk := stream.read(min(at_most - size, 64 * 1024))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _close_unless_read(environ: dict[str, Any]) -> None:
    """An answer before the body was read whole: have gunicorn close the connection after it
    instead of reading and discarding the rest (up to 20 MiB a sender declared, at its pace).

    gunicorn (http/parser.py, `finish_body`) closes a connection whose body is marked failed; it
    marks it itself when reading raised. Other servers have no such flag and are left alone."""
    if environ.get(_BODY_READ):
        return
    if environ.get("CONTENT_LENGTH") in (None, "", "0") and not environ.get("HTTP_TRANSFER_ENCODING"):
        return  # nothing left to read
    stream: Any = environ.get("wsgi.input")
    if hasattr(stream, "failed"):
        stream.failed = True


_STORED = b'{"event_id": %d, "duplicate": %s}\n'  # the answer to every stored event (no JSON encoder needed)


def _field_errors(error: ValidationError) -> dict[str, Any]:
    return error.messages if isinstance(error.messages, dict) else {"_body": error.messages}


def receive_transcript(hook: _Hook, vendor: str) -> Stored:
    """Authenticate, validate, store and answer a transcript callback (both ways in call this)."""
    adapter = STT_VENDORS.get(vendor)
    if adapter is None:
        raise ApiError(404, "unknown_vendor", f"no STT vendor {vendor!r}; known: {', '.join(sorted(STT_VENDORS))}")
    auth, body = hook.authenticate(hook.settings.max_body_bytes, adapter.auth_header)
    raw = hook.raw_event(body, auth)
    args = hook.args
    try:
        resolve_portal(hook.settings, args)  # an unknown ?portal= is a 422 now, not a dead job later
        parsed = parse_transcript(vendor, body, args)
    except ValidationError as error:
        raise hook.reject(raw, _field_errors(error), "the transcript cannot be processed: see fields") from None
    except Exception:
        raise hook.unreadable(raw, "transcript") from None
    outcome = store_event(hook.db, raw, transcript_key(raw, parsed.result, parsed.options))
    return hook.answer(outcome)


def receive_call_event(hook: _Hook, pbx: str) -> Stored:
    """Authenticate, validate, store and answer a PBX call event (both ways in call this)."""
    if pbx not in PBX_PARSERS:
        raise ApiError(404, "unknown_pbx", f"no PBX {pbx!r}; known: {', '.join(sorted(PBX_PARSERS))}")
    auth, body = hook.authenticate(min(PBX_MAX_BODY_BYTES, hook.settings.max_body_bytes))
    raw = hook.raw_event(body, auth)
    args = hook.args
    if PBX_PARSERS[pbx] == "form" and (count := body.count(b"&") + 1) > MAX_FIELDS:
        fields = {"_body": [f"the form has {count} fields; at most {MAX_FIELDS} are read"]}
        raise hook.reject(raw, fields, "the call event cannot be processed: see fields")
    try:
        resolve_portal(hook.settings, args)
        event = parse_call_event(pbx, body, args)
    except ValidationError as error:
        raise hook.reject(raw, _field_errors(error), "the call event cannot be processed: see fields") from None
    except Exception:
        raise hook.unreadable(raw, "call event") from None
    structlog.contextvars.bind_contextvars(pbx=pbx, pbx_call_id=event.call_id)
    return hook.answer(store_event(hook.db, raw, call_event_key(raw, event.call_id)))


def serve(
    request: Request, extensions: dict[str, Any], source: str, name: str, receive: Callable[[_Hook, str], Stored]
) -> Stored:
    """One hook request, either way in: an answer given before its body was read closes the connection,
    and a request refused at the edge is counted by its reason."""
    try:
        return receive(_Hook.of(request, extensions, source, name), name)
    except ApiError as error:
        if error.code in _EDGE_REFUSALS and name in (PBX_PARSERS if source == "pbx" else STT_VENDORS):
            extensions["b24scribe.metrics"].rejected(source, name, error.code)  # bounded: known names only
        _close_unless_read(request.environ)
        raise
    except BaseException:
        _close_unless_read(request.environ)
        raise


# Refusals of a request's form, before anything is stored (authentication failures are counted where
# they are decided, `_Hook.authenticate`)
_EDGE_REFUSALS = frozenset({"too_many_fields", "body_too_large", "body_timeout", "unreadable_body"})


@bp.post("/stt/<vendor>")
@document_stt_hook(bp)
def stt_hook(vendor: str) -> Response:
    """A transcript callback from an STT vendor (or our generic format)."""
    current: Request = request._get_current_object()  # type: ignore[attr-defined]  # once, not per attribute
    return serve(current, current_app.extensions, "stt", vendor, receive_transcript).response()


@bp.post("/pbx/<pbx>")
@document_pbx_hook(bp)
def pbx_hook(pbx: str) -> Response:
    """A call life-cycle event from a PBX."""
    current: Request = request._get_current_object()  # type: ignore[attr-defined]  # once, not per attribute
    return serve(current, current_app.extensions, "pbx", pbx, receive_call_event).response()


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
            stored = serve(Request(environ), self._extensions, source, name, receive)
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

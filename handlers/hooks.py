"""`POST /hooks/stt/<vendor>` and `POST /hooks/pbx/<pbx>`: authenticate, validate, store, answer.

The hooks are one small WSGI application, `HookApp`, whose route table is the registry of sources
(b24scribe/sources.py): `app.py` mounts it at `/hooks` beside Flask (werkzeug's
DispatcherMiddleware), and nothing else serves those paths. They are the service's hot path (every
call event of every PBX), and Flask's per-request work (contexts, URL matching, signals, response
objects) was a fifth of a PBX event's CPU under load; `handlers/openapi.py` documents the routes from
the same registry.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
import structlog
from gevent import monkey
from marshmallow import ValidationError
from werkzeug.exceptions import InternalServerError, MethodNotAllowed, NotFound
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Request

from b24scribe.calls import submitted_call
from b24scribe.db import Database
from b24scribe.events import (
    EVENT_NOUNS,
    Outcome,
    RawEvent,
    call_event_key,
    rejection_message,
    store_event,
    store_rejected,
    transcript_key,
)
from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest, authenticate_before_body
from b24scribe.limits import MAX_PORTAL_LENGTH
from b24scribe.metrics import Metrics
from b24scribe.parsing import MAX_FORM_FIELDS, parse_call_event, parse_transcript
from b24scribe.portals import Directory, resolve_hook_portal
from b24scribe.settings import Settings
from b24scribe.sources import Kind, PbxSource, Source, Sources
from handlers.errors import BODY_ERRORS, ApiError, answer_error, bounded_fields, unreadable_body_message

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = structlog.get_logger(__name__)
_debug_log = logging.getLogger(__name__)  # the stdlib logger behind `log`: one level check per event

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
    """The answer to a stored event: its status and JSON body (or a source's own answer to a request
    that is not an event, with its content type)."""

    status: int
    body: bytes
    content_type: str = "application/json"


class _Headers:
    """A request's headers by name, read straight from the WSGI environ (no copy, no exceptions)."""

    __slots__ = ("_environ",)

    def __init__(self, environ: dict[str, Any]) -> None:
        self._environ = environ

    def get(self, name: str, /) -> str | None:
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        value: str | None = self._environ.get(key)
        return value


@dataclass(frozen=True, slots=True)
class _Hook:
    """What one hook request works with: the request itself (not the proxy) and the app's services."""

    request: Request
    args: dict[str, str]  # the query, first value per name, as a plain dict (werkzeug's raises inside .get)
    settings: Settings
    db: Database
    metrics: Metrics
    sources: Sources
    described: Source  # the source this route serves
    portals: Directory

    @property
    def source(self) -> Kind:
        return self.described.kind

    @property
    def provider(self) -> str:
        return self.described.name

    @classmethod
    def of(cls, request: Request, services: _Services, described: Source) -> _Hook:
        """The hook of this request, with the app's services (400: too many query fields)."""
        query: str = request.environ.get("QUERY_STRING", "")
        if query and (count := query.count("&") + 1) > MAX_FIELDS:  # how parse_qsl counts them
            problem = f"the query has {count} fields; at most {MAX_FIELDS} are read"
            raise ApiError(400, "too_many_fields", problem, {"_query": [problem]})
        return cls(
            request,
            request.args.to_dict() if query else {},
            services.settings,
            services.db,
            services.metrics,
            services.sources,
            described,
            services.portals,
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

    def hook_request(self) -> HookRequest:
        """The request as credential checks and a source's own answers see it."""
        environ = self.request.environ
        return HookRequest(environ["REQUEST_METHOD"], _Headers(environ), self.args, environ, self.settings.public_url)

    def authenticate(self, limit: int) -> tuple[Authenticated, bytes]:
        """Authenticate, then read the body: a credential in the headers or the query is checked before
        a byte of it is read; only a signature over the body reads it first, at most `limit` (contract §12)."""
        described = self.described
        environ = self.request.environ
        hook_request = self.hook_request()
        try:
            found = authenticate_before_body(
                self.settings,
                hook_request,
                described.name,
                vendor_header=described.auth_header,
                signatures=described.signatures,
                portal_for_token=self._portal_for_token(),
            )
            body = self.body(limit)
            auth = (
                found
                if isinstance(found, Authenticated)
                else found.verify(hook_request, body, self.settings, described.name)
            )
        except AuthFailure as failure:
            self.metrics.rejected(self.source, self.provider, failure.code)
            raise ApiError(failure.status, failure.code, failure.message) from None
        if auth.delivery_id is None and described.delivery_header:
            # the source's own delivery id (a retry carries the same one): the event's dedupe key
            delivery_id = environ.get("HTTP_" + described.delivery_header.upper().replace("-", "_"))
            if delivery_id:
                auth = Authenticated(auth.scheme, delivery_id)
        return auth, body

    def _portal_for_token(self) -> Callable[[str], str | None] | None:
        """Looks up portals' own inbound tokens, when any portal has one (contract §8)."""
        snapshot = self.portals.snapshot()
        return snapshot.by_token if snapshot.has_tokens else None

    def check_portal(self, auth: Authenticated, named: str | None = None) -> None:
        """A portal's own token opens that portal's hooks only: 403 for another portal, named by
        `?portal=` (or, `named`, by the vendor's metadata)."""
        named = self.args.get("portal") if named is None else named
        if auth.portal is not None and named is not None and self.portals.snapshot().resolve(named) != auth.portal:
            raise ApiError(403, "wrong_portal", f"this token opens the hooks of portal {auth.portal} only")

    def portal(self, auth: Authenticated) -> str:
        """The portal this hook delivers to (ValidationError naming `portal` when it is unknown)."""
        if auth.portal is not None:
            return auth.portal
        return resolve_hook_portal(self.settings, self.portals, self.args.get("portal"))

    def portal_from_metadata(self, raw: RawEvent, named: str) -> str:
        """The portal the vendor's metadata names (`b24scribe_portal`), for a callback whose URL names
        none, put on the stored event (ValidationError naming `portal` when it is unknown)."""
        portal = resolve_hook_portal(self.settings, self.portals, named[: MAX_PORTAL_LENGTH + 1])
        if portal != self.settings.portal:
            raw.query["portal"] = portal
        else:
            raw.query.pop("portal", None)
        return portal

    def submitted_call(self, vendor: str, job_id: str) -> dict[str, str] | None:
        """The call b24scribe submitted as this vendor job (a callback that named no call)."""
        with self.db.read() as session:
            return submitted_call(session, vendor, job_id, self.settings.portal)

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

    def unreadable(self, raw: RawEvent) -> ApiError:
        """A parser raised something other than ValidationError: a bug, logged with its traceback.
        Fails closed but keeps the event: a 4xx, never a 500 (contract §12), stored as rejected for replay."""
        log.exception("a hook's parser failed", source=self.source, provider=self.provider)
        what = EVENT_NOUNS[raw.source]
        fields = {"_body": [f"this version cannot read the {what}; it is kept and can be replayed after a fix"]}
        return self.reject(raw, fields, rejection_message(raw.source))


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


def receive(hook: _Hook) -> Stored:
    """Authenticate, validate, store and answer one hook request, for any source."""
    described = hook.described
    pbx = isinstance(described, PbxSource)
    limit = min(PBX_MAX_BODY_BYTES, hook.settings.max_body_bytes) if pbx else hook.settings.max_body_bytes
    auth, body = hook.authenticate(limit)
    if described.answer is not None and (own := described.answer(hook.hook_request(), body, hook.settings)):
        return Stored(own.status, own.body, own.content_type)  # not an event: nothing is stored
    hook.check_portal(auth)  # another portal's token: refused, nothing stored
    raw = hook.raw_event(body, auth)
    args = hook.args
    if isinstance(described, PbxSource) and described.form and (count := body.count(b"&") + 1) > MAX_FIELDS:
        fields = {"_body": [f"the form has {count} fields; at most {MAX_FIELDS} are read"]}
        raise hook.reject(raw, fields, rejection_message(raw.source))
    named_portal: str | None = None  # the portal the vendor's metadata names, for a URL that names none
    try:
        # an unknown ?portal= is a 422 now, not a dead job later; the event keeps the portal's name
        # unless it is the settings' own portal (which a replay then follows, as before)
        if (portal := hook.portal(auth)) != hook.settings.portal:
            raw.query["portal"] = portal
        else:
            raw.query.pop("portal", None)
        if pbx:
            event = parse_call_event(hook.sources, described.name, body, args)
            key = call_event_key(raw, event.call_id)
        else:
            parsed = parse_transcript(hook.sources, described.name, body, args, hook.submitted_call)
            if parsed.named_by_job:  # stored as if its URL had named the call (the fold reads the query)
                raw.query.update(parsed.named_by_job)
            elif parsed.reference.portal and "portal" not in args:
                named_portal = hook.portal_from_metadata(raw, parsed.reference.portal)
            key = transcript_key(raw, parsed.result, parsed.options)
    except ValidationError as error:
        raise hook.reject(raw, _field_errors(error), rejection_message(raw.source)) from None
    except Exception:
        raise hook.unreadable(raw) from None
    if named_portal is not None:
        hook.check_portal(auth, named_portal)
    if pbx:
        structlog.contextvars.bind_contextvars(pbx=described.name, pbx_call_id=event.call_id)
    return hook.answer(store_event(hook.db, raw, key))


# Refusals of a request's form, before anything is stored (authentication failures are counted where
# they are decided, `_Hook.authenticate`)
_EDGE_REFUSALS = frozenset({"too_many_fields", "body_too_large", "body_timeout", "unreadable_body"})
_UNKNOWN = {"pbx": ("unknown_pbx", "PBX"), "stt": ("unknown_vendor", "STT vendor")}


@dataclass(frozen=True, slots=True)
class _Services:
    """What every hook request works with: the app's settings, database, metrics and sources."""

    settings: Settings
    db: Database
    metrics: Metrics
    sources: Sources
    portals: Directory


class HookApp:
    """The hooks as a WSGI application mounted at `/hooks`: `POST /pbx/<name>` and `POST /stt/<name>`
    for every source in the registry, answered in the service's one error shape.

    Its route table is the registry: a name it does not hold is a 404 naming the known ones, another
    method a 405. An error it does not expect is logged with its traceback and answered 500; nothing
    was acknowledged, so the sender retries.
    """

    def __init__(
        self, settings: Settings, db: Database, metrics: Metrics, sources: Sources, portals: Directory | None = None
    ) -> None:
        self.services = _Services(settings, db, metrics, sources, portals or Directory(db, settings))
        self._max_body_bytes = settings.max_body_bytes

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        kind, _, name = path[1:].partition("/")
        try:
            described = self._route(kind, name, environ.get("REQUEST_METHOD", ""))
            stored = self._serve(environ, described)
        except Exception as error:
            # Fails closed: nothing acknowledged, so the sender retries.
            answer = answer_error(error, self._max_body_bytes)
            if answer is None:  # a bug: logged with its traceback, answered 500
                log.exception("unhandled error in a hook", path=environ.get("SCRIPT_NAME", "") + path)
                answer = answer_error(InternalServerError(), None)
                assert answer is not None
            if isinstance(error, MethodNotAllowed):
                answer.headers["Allow"] = ", ".join(error.valid_methods or ["POST"])
            return answer(environ, start_response)
        headers = [("Content-Type", stored.content_type), ("Content-Length", str(len(stored.body)))]
        status = _STATUS_LINES.get(stored.status) or f"{stored.status} {HTTP_STATUS_CODES.get(stored.status, '')}"
        start_response(status, headers)
        return [stored.body]

    def _route(self, kind: str, name: str, method: str) -> Source:
        """The source this path names (404: none; 405: not a POST)."""
        name, slash, below = name.partition("/")
        if kind not in _UNKNOWN or not name:
            raise NotFound()
        described = self.services.sources.of(kind).get(name)  # type: ignore[arg-type]  # kind checked above
        if slash and not (isinstance(described, PbxSource) and described.subpaths and below):
            raise NotFound()  # a path below a hook is the same hook only for a source that posts there
        if method not in (described.methods if described is not None else ("POST",)):
            raise MethodNotAllowed(valid_methods=list(described.methods if described is not None else ("POST",)))
        if described is None:
            code, noun = _UNKNOWN[kind]
            known = ", ".join(sorted(self.services.sources.of(kind)))  # type: ignore[arg-type]
            raise ApiError(404, code, f"no {noun} {name!r}; known: {known}")
        return described

    def _serve(self, environ: WSGIEnvironment, described: Source) -> Stored:
        """One hook request: an answer given before its body was read closes the connection, and a
        request refused at the edge is counted by its reason."""
        try:
            return receive(_Hook.of(Request(environ), self.services, described))
        except ApiError as error:
            if error.code in _EDGE_REFUSALS:
                self.services.metrics.rejected(described.kind, described.name, error.code)
            _close_unless_read(environ)
            raise
        except BaseException:
            _close_unless_read(environ)
            raise


_STATUS_LINES = {status: f"{status} {HTTP_STATUS_CODES[status].upper()}" for status in (200, 202)}  # as werkzeug's

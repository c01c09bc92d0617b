"""Hostile senders at the HTTP edge, against a real gunicorn started the way the Procfile does.

Raw sockets, so the test controls every byte and when it is sent: a sender that declares 20 MiB
and sends only its headers, one whose chunks are broken or never end, one that stalls mid-body.
Credentials are checked before the body is read; what cannot be read is a 4xx in the one error
shape, never a 500; a body that does not arrive in time is dropped; nothing of it is stored.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from b24scribe.db import Database
from b24scribe.models import InboundEvent
from tests.conftest import INBOUND_TOKEN, WEBHOOK_SECRET
from tests.operations import ROOT, free_port, wait_until

PBX = "/hooks/pbx/generic"
EVENT = json.dumps({"event": "call.finished", "call_id": "edge-1", "status": "answered"}).encode()
TWENTY_MIB = 20 * 1024 * 1024
BODY_TIMEOUT = 2.0  # B24SCRIBE_BODY_TIMEOUT_SECONDS for these servers (30 by default)
ANSWER_WITHIN = 3.0  # seconds: well under gunicorn's 5 s keep-alive, the longest it would wait by itself


@dataclass
class Web:
    """One gunicorn, its database and its log."""

    port: int
    database_url: str
    log: Path

    def stored(self) -> int:
        database = Database(self.database_url)
        try:
            with database.read() as session:
                return int(session.scalar(select(func.count()).select_from(InboundEvent)) or 0)
        finally:
            database.dispose()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=ANSWER_WITHIN)
        sock.settimeout(ANSWER_WITHIN)
        return sock


def start_web(directory: Path, worker_class: str) -> Iterator[Web]:
    """`gunicorn 'app:create_app()' --config gunicorn.conf.py` (the Procfile's web), one worker
    process, so that "another request is served meanwhile" is served by the same process."""
    directory.mkdir()
    port = free_port()
    database_url = f"sqlite:///{directory}/b24scribe.sqlite3"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("B24SCRIBE_") and k != "PROMETHEUS_MULTIPROC_DIR"},
        "B24SCRIBE_DATABASE_URL": database_url,
        "B24SCRIBE_INBOUND_TOKEN": INBOUND_TOKEN,
        "B24SCRIBE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "B24SCRIBE_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
        "B24SCRIBE_ACCESS_LOG": "0",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "1",
        "WEB_WORKER_CLASS": worker_class,
        "WEB_THREADS": "4",
        "TMPDIR": str(directory),
        "PYTHONUNBUFFERED": "1",
    }
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [str(bin_dir / "flask"), "--app", "app", "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    log = directory / "web.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(bin_dir / "gunicorn"), "app:create_app()", "--config", "gunicorn.conf.py"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    web = Web(port, database_url, log)
    try:

        def is_up() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/livez", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        wait_until(is_up, timeout=60, message=f"gunicorn ({worker_class}) on port {port}")
        yield web
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def gevent_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """The Procfile's web process as deployed: the gevent worker."""
    yield from start_web(tmp_path_factory.mktemp("gevent") / "web", "gevent")


@pytest.fixture(scope="module")
def gthread_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """The same with WEB_WORKER_CLASS=gthread."""
    yield from start_web(tmp_path_factory.mktemp("gthread") / "web", "gthread")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]
    closed: bool  # the server closed the connection after the answer
    seconds: float


def head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(sock: socket.socket, started: float | None = None) -> Answer:
    """Read one answer; then whether the server closes the connection (within ANSWER_WITHIN)."""
    started = time.monotonic() if started is None else started
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer after {data!r}"
        data += chunk
    header_block, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-answer"
        rest += chunk
    seconds = time.monotonic() - started
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except ConnectionResetError:
        closed = True
    return Answer(int(status_line.split()[1]), headers, json.loads(rest[:length]), closed, seconds)


def honest_event(web: Web, call_id: str) -> int:
    body = json.dumps({"event": "call.finished", "call_id": call_id, "status": "answered"})
    headers = {"Authorization": f"Bearer {INBOUND_TOKEN}", "Content-Type": "application/json"}
    return requests.post(f"http://127.0.0.1:{web.port}{PBX}", data=body, headers=headers, timeout=5).status_code


@pytest.mark.parametrize(
    ("path", "credential", "code"),
    [
        (PBX, None, "unauthenticated"),
        (PBX, "Authorization: Bearer not-the-token", "bad_credentials"),
        (f"{PBX}?token=not-the-token", None, "bad_credentials"),
        ("/hooks/stt/generic?b24_call_id=7", "Authorization: Basic dXNlcjpub3BlCg==", "bad_credentials"),
    ],
)
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_a_sender_without_the_token_gets_its_401_before_sending_a_byte_of_its_20_mib(
    request: pytest.FixtureRequest, worker_class: str, path: str, credential: str | None, code: str
) -> None:
    web: Web = request.getfixturevalue(f"{worker_class}_web")
    before = web.stored()
    with web.connect() as sock:
        sock.sendall(head(path, f"Content-Length: {TWENTY_MIB}", *([credential] if credential else [])))
        got = answer(sock)  # no body byte was sent: the 401 cannot have waited for one
    assert (got.status, got.body["error"]["code"]) == (401, code)
    assert set(got.body["error"]) == {"code", "message", "fields"}
    assert got.closed  # not kept open to read and discard the 20 MiB it declared
    assert web.stored() == before


def signature_headers(timestamp: float) -> list[str]:
    """Standard Webhooks headers (the signature itself is never reached in these tests)."""
    return [f"webhook-id: msg_{time.time_ns()}", f"webhook-timestamp: {int(timestamp)}", "webhook-signature: v1,x"]


def test_a_stale_standard_webhooks_timestamp_is_refused_before_the_body(gevent_web: Web) -> None:
    signed = signature_headers(time.time() - 3600)
    with gevent_web.connect() as sock:
        sock.sendall(head("/hooks/stt/generic?b24_call_id=7", f"Content-Length: {TWENTY_MIB}", *signed))
        got = answer(sock)
    assert (got.status, got.body["error"]["code"], got.closed) == (401, "bad_signature", True)


def test_a_signed_body_is_read_at_most_to_the_routes_limit(gevent_web: Web) -> None:
    signed = signature_headers(time.time())
    with gevent_web.connect() as sock:  # a signature must be checked on the body, but not on 20 MiB of it
        sock.sendall(head(PBX, f"Content-Length: {TWENTY_MIB}", *signed))
        got = answer(sock)
    assert (got.status, got.body["error"]["code"], got.closed) == (413, "body_too_large", True)
    assert "65536 bytes for PBX events" in got.body["error"]["message"]


def test_a_pbx_event_declared_over_64_kib_is_413_before_it_is_read(gevent_web: Web) -> None:
    with gevent_web.connect() as sock:
        sock.sendall(head(PBX, f"Authorization: Bearer {INBOUND_TOKEN}", f"Content-Length: {66 * 1000}"))
        got = answer(sock)
    assert (got.status, got.body["error"]["code"], got.closed) == (413, "body_too_large", True)


def test_a_chunked_pbx_event_is_413_as_soon_as_it_passes_64_kib(gevent_web: Web) -> None:
    before = gevent_web.stored()
    piece = b"x" * 16384
    with gevent_web.connect() as sock:
        sock.sendall(head(PBX, f"Authorization: Bearer {INBOUND_TOKEN}", "Transfer-Encoding: chunked"))
        for _ in range(5):  # 80 KiB, and never the last chunk: the answer cannot wait for the end
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        got = answer(sock)
    assert (got.status, got.body["error"]["code"]) == (413, "body_too_large")
    assert gevent_web.stored() == before


@pytest.mark.parametrize(
    ("body", "authorized", "status", "code"),
    [
        (b"zz\r\n{}\r\n0\r\n\r\n", True, 400, "unreadable_body"),  # a chunk size that is not hex
        (b"zz\r\n{}\r\n0\r\n\r\n", False, 401, "unauthenticated"),  # and without credentials: refused first
        (b"4\r\n{}\r\n0\r\n\r\n", True, 400, "unreadable_body"),  # a chunk shorter than its size
        (b"2\r\n{}\r\n", True, 400, "unreadable_body"),  # no last chunk: the sender closes
    ],
)
def test_a_broken_chunked_body_is_a_4xx_in_the_one_error_shape_never_a_500(
    gevent_web: Web, body: bytes, authorized: bool, status: int, code: str
) -> None:
    before = gevent_web.stored()
    credential = [f"Authorization: Bearer {INBOUND_TOKEN}"] if authorized else []
    for path in (PBX, "/hooks/stt/generic?b24_call_id=7", "/hooks/pbx/asterisk"):
        with gevent_web.connect() as sock:
            sock.sendall(head(path, "Transfer-Encoding: chunked", *credential) + body)
            sock.shutdown(socket.SHUT_WR)
            got = answer(sock)
        assert (got.status, got.body["error"]["code"]) == (status, code), path
        assert set(got.body["error"]) == {"code", "message", "fields"}
    assert gevent_web.stored() == before


def test_a_body_shorter_than_its_content_length_is_400_and_not_stored(gevent_web: Web) -> None:
    before = gevent_web.stored()
    with gevent_web.connect() as sock:
        sock.sendall(head(PBX, f"Authorization: Bearer {INBOUND_TOKEN}", f"Content-Length: {len(EVENT) + 40}") + EVENT)
        sock.shutdown(socket.SHUT_WR)  # the sender went away mid-body
        got = answer(sock)
    assert (got.status, got.body["error"]["code"]) == (400, "unreadable_body")
    assert f"after {len(EVENT)} of its {len(EVENT) + 40} bytes" in got.body["error"]["message"]
    assert gevent_web.stored() == before


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_a_body_that_stalls_is_dropped_while_honest_requests_are_served(
    worker_class: str, request: pytest.FixtureRequest
) -> None:
    web: Web = request.getfixturevalue(f"{worker_class}_web")
    before = web.stored()
    with web.connect() as sock:
        sock.sendall(head(PBX, f"Authorization: Bearer {INBOUND_TOKEN}", f"Content-Length: {len(EVENT)}"))
        sock.sendall(EVENT[:10])  # and then nothing
        started = time.monotonic()
        served = [honest_event(web, f"honest-{worker_class}-{n}") for n in range(3)]  # meanwhile, elsewhere
        assert served == [202, 202, 202]
        assert time.monotonic() - started < BODY_TIMEOUT  # not queued behind the stalled one
        sock.settimeout(BODY_TIMEOUT + ANSWER_WITHIN)
        got = answer(sock, started)
    # gevent: a gevent.Timeout interrupts the read; gthread: the watchdog shuts the socket's reading
    # side, which ends the read. Either way the socket can still carry the answer, then it closes.
    assert (got.status, got.body["error"]["code"], got.closed) == (408, "body_timeout", True)
    assert BODY_TIMEOUT - 0.1 <= got.seconds < BODY_TIMEOUT + 1.0
    assert web.stored() == before + 3  # the honest ones only

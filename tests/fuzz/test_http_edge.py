"""The hostile HTTP requests of tests/hostile.py over raw sockets, against the real server (gunicorn
with gevent, as the Procfile runs it, and `flask worker`): malformed chunked bodies, a Content-Length
larger than the body, a very long Content-Type, many query fields. No answer may be a 5xx, the
service must still answer afterwards, and whatever it accepted must be processed."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import requests

from app import create_app
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import ADMIN_TOKEN, INBOUND_TOKEN
from tests.fuzz.invariants import Fuzzer, ServerErrors, assert_clean, server_errors
from tests.hostile import RawRequest, raw_requests
from tests.operations import running_stack

ANSWER_WITHIN = 15.0  # seconds; every request below ends (or half-closes) its side, so 15 s is plenty


def exchange(url: str, raw: RawRequest) -> tuple[int | None, bytes]:
    """Send the bytes, close our side if asked, read the whole answer: (status or None, answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=ANSWER_WITHIN) as sock:
        try:
            sock.sendall(raw.data)
            if raw.half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close early (a bad request line): read what it said
        chunks: list[bytes] = []
        deadline = time.monotonic() + ANSWER_WITHIN
        try:
            while time.monotonic() < deadline and (chunk := sock.recv(65536)):
                chunks.append(chunk)
        except TimeoutError:
            chunks.append(b"<timed out>")
        except OSError:
            pass  # reset after the answer
    answer = b"".join(chunks)
    while True:
        status_line = answer.split(b"\r\n", 1)[0].split()
        if not (len(status_line) >= 2 and status_line[0].startswith(b"HTTP/") and status_line[1].isdigit()):
            return None, answer
        status = int(status_line[1])
        if 100 <= status < 200 and b"\r\n\r\n" in answer:  # an interim answer (100 Continue): the final one follows
            answer = answer.split(b"\r\n\r\n", 1)[1]
            continue
        return status, answer


def is_json_error(body: bytes) -> bool:
    """The one error shape (contract §5): {"error": {"code", "message", "fields"}}."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"code", "message", "fields"} <= set(error)


@pytest.mark.timeout(300)
def test_hostile_http_requests_to_gunicorn_get_no_5xx_and_what_is_accepted_is_processed(
    tmp_path: Path, database_url: str, settings: Settings
) -> None:
    environ = {
        "B24SCRIBE_DATABASE_URL": database_url,
        "B24SCRIBE_INBOUND_TOKEN": INBOUND_TOKEN,
        "B24SCRIBE_ADMIN_TOKEN": ADMIN_TOKEN,
        "B24SCRIBE_DEFAULT_USER_ID": "1",
        "B24SCRIBE_ACCESS_LOG": "0",
    }
    unanswered: list[str] = []
    not_json: list[str] = []  # malformed chunked bodies reach the app: its answer is the JSON error shape
    # the database is migrated by the stack (as the Procfile's release step does), so the app is made first
    app = create_app(settings)
    db: Database = app.extensions["b24scribe.db"]
    fuzz = Fuzzer(app.test_client(), Worker(db, settings, SOURCES), db, ServerErrors())
    with running_stack(tmp_path, environ, web_workers=1) as stack:
        for raw in raw_requests():
            status, answer = exchange(stack.url, raw)
            family = "http edge (gunicorn)"
            if status is None:
                # the server closed without a status line: allowed for what is not HTTP at all
                unanswered.append(f"{raw.name}: {answer[:80]!r}")
                fuzz.observe(family, raw.name, 400, b"")
                continue
            body = answer.split(b"\r\n\r\n", 1)[-1]
            fuzz.observe(family, raw.name, status, body)
            if raw.name.startswith("chunked:") and status >= 400 and not is_json_error(body):
                not_json.append(f"{raw.name}: {status} {body[:120]!r}")
        alive = requests.get(f"{stack.url}/livez", timeout=10)
        assert alive.status_code == 200, "the server stopped answering after the hostile requests"
        errors = [line for line in stack.output().splitlines() if '"level": "error"' in line or "Traceback" in line]
    # the stack's worker folds what was accepted; this process checks it the same way as in-process cases
    with server_errors() as captured:
        fuzz.errors = captured
        fuzz.settle()
    not_http = {"garbage request line", "HTTP/0.9 style", "request line with no version"}
    assert {line.split(":", 1)[0] for line in unanswered} <= not_http, unanswered
    assert_clean(fuzz, "hostile HTTP through gunicorn")
    assert not not_json, "errors the app answered without the JSON error shape:\n" + "\n".join(not_json)
    assert not errors, "the server logged errors:\n" + "\n".join(line[:300] for line in errors[:10])

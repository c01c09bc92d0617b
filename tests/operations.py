"""Helpers for the operations tests: a call with a transcript, a dead job, and the real process stack."""

from __future__ import annotations

import contextlib
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
from urllib.parse import quote

import requests
from flask.testing import FlaskClient
from sqlalchemy import update

from b24scribe.db import affected_rows
from b24scribe.models import Job
from b24scribe.worker import Worker
from tests.conftest import auth
from tests.fake_bitrix24 import FakeBitrix24

ROOT = Path(__file__).resolve().parent.parent
CALL_ID = "1700000000.123"
SENTENCE = "Your parcel with the blue umbrella ships on Thursday"
FINISHED: dict[str, Any] = {
    "event": "call.finished",
    "call_id": CALL_ID,
    "direction": "inbound",
    "from": "+15551234567",
    "to": "101",
    "extension": "101",
    "started_at": "2026-11-25T10:20:30+01:00",
    "duration": 73,
    "status": "answered",
}
TRANSCRIPT: dict[str, Any] = {
    "segments": [
        {"start": 0.4, "end": 2.9, "text": "Good afternoon, Acme support", "speaker": "A"},
        {"start": 3.2, "end": 6.0, "text": SENTENCE, "speaker": "B"},
    ]
}


def post_call(client: FlaskClient, call_id: str = CALL_ID, **changes: Any) -> dict[str, Any]:
    """A finished call from the generic PBX."""
    response = client.post("/hooks/pbx/generic", json={**FINISHED, "call_id": call_id, **changes}, headers=auth())
    assert response.status_code in (200, 202), response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json()
    return body


def post_transcript(client: FlaskClient, call_id: str = CALL_ID, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A generic transcript for the call."""
    response = client.post(
        f"/hooks/stt/generic?pbx=generic&call={quote(call_id)}", json=body or TRANSCRIPT, headers=auth()
    )
    assert response.status_code in (200, 202), response.get_data(as_text=True)
    answer: dict[str, Any] = response.get_json()
    return answer


def make_dead_attach(client: FlaskClient, worker: Worker, fake: FakeBitrix24, call_id: str = CALL_ID) -> None:
    """A call registered and finished in Bitrix24 whose transcript Bitrix24 refuses for good."""
    post_call(client, call_id)
    post_transcript(client, call_id)
    fake.inject(
        "telephony.call.attachTranscription",
        400,
        {"error": "ERROR_ARGUMENT", "error_description": "Transcription is too long for this portal"},
    )
    worker.drain()
    for _ in range(3):  # on a loaded machine a request can outlast the tests' 2 s timeout: try again now
        with worker.db.write() as session:
            retried = session.execute(
                update(Job).where(Job.kind == "attach", Job.state == "pending").values(next_attempt_at=0.0)
            )
        if not affected_rows(retried):
            return
        worker.drain()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """gunicorn (web) and `flask worker` as real processes, their output in files."""

    url: str
    web_log: Path
    worker_log: Path
    processes: list[subprocess.Popen[bytes]]

    def output(self) -> str:
        """Everything both processes printed so far."""
        return self.web_log.read_text(errors="replace") + self.worker_log.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        """The output's lines parsed as JSON (every line must be JSON)."""
        return [json.loads(line) for line in self.output().splitlines() if line.strip()]


def wait_until(condition: Any, timeout: float = 20.0, message: str = "condition") -> None:
    """Poll `condition()` until it is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {message}")


@contextlib.contextmanager
def running_stack(tmp_path: Path, environ: dict[str, str], web_workers: int = 2) -> Iterator[Stack]:
    """Start web and worker like the Procfile does (migrated database first), stop them after."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("B24SCRIBE_") and k != "PROMETHEUS_MULTIPROC_DIR"},
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": str(web_workers),
        "WEB_THREADS": "4",
        "TMPDIR": str(tmp_path),  # the default metrics directory lands in the test's own temp dir
        "PYTHONUNBUFFERED": "1",
        **environ,
    }
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [str(bin_dir / "flask"), "--app", "app", "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    web_log, worker_log = tmp_path / "web.log", tmp_path / "worker.log"
    processes: list[subprocess.Popen[bytes]] = []
    with web_log.open("wb") as web_out, worker_log.open("wb") as worker_out:
        processes.append(
            subprocess.Popen(
                [str(bin_dir / "gunicorn"), "app:create_app()", "--config", "gunicorn.conf.py"],
                cwd=ROOT,
                env=env,
                stdout=web_out,
                stderr=subprocess.STDOUT,
            )
        )
        processes.append(
            subprocess.Popen(
                [str(bin_dir / "flask"), "--app", "app", "worker"],
                cwd=ROOT,
                env=env,
                stdout=worker_out,
                stderr=subprocess.STDOUT,
            )
        )
    stack = Stack(f"http://127.0.0.1:{port}", web_log, worker_log, processes)
    try:

        def web_is_up() -> bool:
            try:
                return requests.get(f"{stack.url}/livez", timeout=5).status_code == 200
            except requests.RequestException:  # not listening yet, or a worker still booting
                return False

        wait_until(web_is_up, timeout=60, message=f"gunicorn on port {port}:\n{stack.output()}")
        yield stack
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

"""A stand-in for a vendor's REST API (AssemblyAI, Rev.ai): serves canned transcripts on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Served:
    """What one request got."""

    path: str
    headers: dict[str, str]


@dataclass
class FakeVendorApi:
    """Maps paths to (status, body); records every request."""

    routes: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    requests: list[Served] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def serve(self, path: str, body: bytes, status: int = 200) -> None:
        """Answer GET `path` with `body`."""
        self.routes[path] = (status, body)

    def start(self) -> FakeVendorApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                api.requests.append(Served(self.path, {k.lower(): v for k, v in self.headers.items()}))
                status, body = api.routes.get(self.path, (404, b'{"error": "not found"}'))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def fake_vendor_api() -> Iterator[FakeVendorApi]:
    """A running fake vendor API."""
    api = FakeVendorApi().start()
    yield api
    api.stop()

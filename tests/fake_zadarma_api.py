"""A stand-in for Zadarma's API on 127.0.0.1: `GET /v1/pbx/record/request/`, signed as Zadarma checks it.

It checks the `Authorization: <key>:<signature>` header the way Zadarma's documentation defines it
(https://zadarma.com/en/support/api/#intro_authorization, the PHP recipe below), written here apart
from schemas/zadarma.py so that a mistake in one is not repeated in the other:

    ksort($params);
    $paramsStr = http_build_query($params, null, '&', PHP_QUERY_RFC1738);
    $sign = base64_encode(hash_hmac('sha1', $method . $paramsStr . md5($paramsStr), $secret));

The parameters are the ones the request carries (the server recomputes from what it receives);
`$method` is the request's path. A request it cannot verify is a 401, as Zadarma answers it.
A recording is answered as Zadarma documents: `{"status": "success", "link": …, "lifetime_till": …}`
by `call_id`, `"links": […]` by `pbx_call_id`. `not_ready(times, status)` makes the next requests
answer that the file is not stored yet.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlsplit

RECORD_REQUEST = "/v1/pbx/record/request/"


def php_urlencode(text: str) -> str:
    """PHP's `urlencode` (what RFC 1738 mode uses): all but letters, digits and `-_.` %-encoded, a space
    a `+` (Python's quote_plus also spares `~`)."""
    return quote_plus(text, safe="").replace("~", "%7E")


def http_build_query(params: dict[str, str]) -> str:
    """PHP's `http_build_query($params, null, '&', PHP_QUERY_RFC1738)` of string values, after `ksort`."""
    return "&".join(f"{php_urlencode(name)}={php_urlencode(value)}" for name, value in sorted(params.items()))


def zadarma_signature(method: str, params: dict[str, str], secret: str) -> str:
    """`base64_encode(hash_hmac('sha1', $method . $paramsStr . md5($paramsStr), $secret))`: PHP's
    hash_hmac and md5 give lowercase hex."""
    query = http_build_query(params)
    checksum = hashlib.md5(query.encode(), usedforsecurity=False).hexdigest()
    signed = hmac.new(secret.encode(), f"{method}{query}{checksum}".encode(), hashlib.sha1).hexdigest()
    return base64.b64encode(signed.encode()).decode()


@dataclass
class Asked:
    """One request as it arrived, and whether its signature held."""

    path: str
    params: dict[str, str]
    authorization: str | None
    verified: bool
    status: int


@dataclass
class FakeZadarmaApi:
    """The API of one Zadarma account (its key and secret); `links` maps a recording's call_id
    (`call_id_with_rec`) to its file's URL, `calls` a pbx_call_id to its recordings' call_ids."""

    key: str
    secret: str
    links: dict[str, str] = field(default_factory=dict)
    calls: dict[str, list[str]] = field(default_factory=dict)
    asked: list[Asked] = field(default_factory=list)
    _not_ready: list[int] = field(default_factory=list)  # statuses of the next not-ready answers
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The base URL (B24SCRIBE_ZADARMA_API_URL)."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def not_ready(self, times: int, status: int = 404) -> None:
        """Answer the next `times` verified requests that the file is not stored yet, with this status."""
        self._not_ready.extend([status] * times)

    def answer(self, path: str, params: dict[str, str], authorization: str | None) -> tuple[int, dict[str, Any]]:
        """Zadarma's answer to a GET: (status, JSON body)."""
        verified = self._verified(path, params, authorization)
        status, body = self._decide(path, params, verified)
        self.asked.append(Asked(path, params, authorization, verified, status))
        return status, body

    def _verified(self, path: str, params: dict[str, str], authorization: str | None) -> bool:
        key, _, signature = (authorization or "").partition(":")
        expected = zadarma_signature(path, params, self.secret)
        return hmac.compare_digest(key.encode(), self.key.encode()) and hmac.compare_digest(
            signature.encode(), expected.encode()
        )

    def _decide(self, path: str, params: dict[str, str], verified: bool) -> tuple[int, dict[str, Any]]:
        if not verified:
            return 401, {"status": "error", "message": "Not authorized"}
        if path != RECORD_REQUEST:
            return 404, {"status": "error", "message": "Method not found"}
        if self._not_ready:
            return self._not_ready.pop(0), {"status": "error", "message": "Record not found"}
        lifetime_till = "2026-11-25 11:00:00"
        if (call_id := params.get("call_id")) is not None:
            if call_id not in self.links:
                return 404, {"status": "error", "message": "Record not found"}
            return 200, {"status": "success", "link": self.links[call_id], "lifetime_till": lifetime_till}
        if (pbx_call_id := params.get("pbx_call_id")) in self.calls:
            links = [self.links[name] for name in self.calls[pbx_call_id or ""]]
            return 200, {"status": "success", "links": links, "lifetime_till": lifetime_till}
        return 400, {"status": "error", "message": "Wrong parameters"}

    def start(self) -> FakeZadarmaApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                parts = urlsplit(self.path)
                params = dict(parse_qsl(parts.query, keep_blank_values=True))
                status, body = api.answer(parts.path, params, self.headers.get("Authorization"))
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def running(key: str, secret: str) -> Iterator[FakeZadarmaApi]:
    """A started fake for a fixture to yield; stopped afterwards."""
    api = FakeZadarmaApi(key, secret).start()
    try:
        yield api
    finally:
        api.stop()

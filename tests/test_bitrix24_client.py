"""The Bitrix24 client classifies every answer into what the outbox should do about it."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from b24scribe.bitrix24 import (
    AmbiguousError,
    Bitrix24Client,
    OperationLimitError,
    PermanentError,
    ThrottledError,
    TransientError,
    is_finish_call_not_found,
    is_not_finished,
    is_unknown_user,
)
from tests.fake_bitrix24 import FakeBitrix24


@pytest.fixture
def client(fake_bitrix24: FakeBitrix24) -> Bitrix24Client:
    return Bitrix24Client(fake_bitrix24.webhook_url, timeout=1.0)


def register(client: Bitrix24Client, **overrides: object) -> str:
    params = {"USER_ID": 1, "PHONE_NUMBER": "+15551234567", "TYPE": 2, "EXTERNAL_CALL_ID": f"c{time.time_ns()}"}
    return str(client.call("telephony.externalCall.register", {**params, **overrides}).result["CALL_ID"])


def test_a_success_returns_the_result_and_the_time_block(client: Bitrix24Client) -> None:
    response = client.call("telephony.externalCall.register", {"USER_ID": 1, "PHONE_NUMBER": "1", "TYPE": 2})
    assert response.result["CALL_ID"].startswith("externalCall.")
    assert "start" in response.time


@pytest.mark.parametrize("error_code", ["", "ERROR_CORE"])
def test_not_finished_is_transient_whichever_error_code_the_portal_uses(
    client: Bitrix24Client, fake_bitrix24: FakeBitrix24, error_code: str
) -> None:
    fake_bitrix24.configure(error_code=error_code)
    call_id = register(client)
    message = [{"SIDE": "User", "START_TIME": 0, "STOP_TIME": 1, "MESSAGE": "hi"}]
    with pytest.raises(TransientError) as raised:
        client.call("telephony.call.attachTranscription", {"CALL_ID": call_id, "MESSAGES": message})
    assert is_not_finished(raised.value)


def test_finishing_twice_is_recognised_as_call_not_found(client: Bitrix24Client) -> None:
    call_id = register(client)
    client.call("telephony.externalCall.finish", {"CALL_ID": call_id, "USER_ID": 1, "DURATION": 3})
    with pytest.raises(PermanentError) as raised:
        client.call("telephony.externalCall.finish", {"CALL_ID": call_id, "USER_ID": 1, "DURATION": 3})
    assert is_finish_call_not_found(raised.value)


def test_an_unknown_extension_is_recognised(client: Bitrix24Client) -> None:
    with pytest.raises(PermanentError) as raised:
        register(client, USER_ID=None, USER_PHONE_INNER="999")
    assert is_unknown_user(raised.value)


def test_a_validation_error_is_permanent(client: Bitrix24Client) -> None:
    with pytest.raises(PermanentError) as raised:
        register(client, TYPE=9)
    assert raised.value.description == "Unknown TYPE"


def test_a_full_bucket_is_throttled(client: Bitrix24Client, fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.inject("*", 503)
    with pytest.raises(ThrottledError):
        register(client)


def test_an_operation_time_limit_carries_its_reset_time(client: Bitrix24Client, fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.inject_operating_limit("telephony.externalCall.register", reset_in=30)
    with pytest.raises(OperationLimitError) as raised:
        register(client)
    assert time.time() + 20 < raised.value.reset_at < time.time() + 40


def test_bad_credentials_are_permanent(fake_bitrix24: FakeBitrix24) -> None:
    wrong = Bitrix24Client(fake_bitrix24.webhook_url.replace("/rest/1/", "/rest/1/x"), timeout=1.0)
    with pytest.raises(PermanentError) as raised:
        register(wrong)
    assert raised.value.code == "INVALID_CREDENTIALS"


def test_a_500_or_an_html_page_is_transient(client: Bitrix24Client, fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.inject("*", 500)
    with pytest.raises(TransientError) as raised:
        register(client)
    assert not isinstance(raised.value, AmbiguousError)
    fake_bitrix24.inject("*", 502, "<html>Bad gateway</html>")
    with pytest.raises(TransientError):
        register(client)


def test_an_answer_slower_than_the_timeout_is_ambiguous(client: Bitrix24Client, fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.inject_slow("telephony.externalCall.register", seconds=2.0)
    with pytest.raises(AmbiguousError):
        register(client)


def test_a_dropped_connection_is_ambiguous(client: Bitrix24Client, fake_bitrix24: FakeBitrix24) -> None:
    fake_bitrix24.inject_drop("telephony.externalCall.register")
    with pytest.raises(AmbiguousError):
        register(client)


def test_a_refused_connection_is_transient_and_not_ambiguous() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = Bitrix24Client(f"http://127.0.0.1:{port}/rest/1/abc/", timeout=1.0)
    with pytest.raises(TransientError) as raised:
        register(client)
    assert not isinstance(raised.value, AmbiguousError)


class _Recording(BaseHTTPRequestHandler):
    """Answers every POST with a result, and notes the connection and body it came on."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[int, str | None, bytes]] = []
    paths: list[str] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.client_address[1], self.headers["Content-Type"], body))
        self.paths.append(self.path)
        answer = json.dumps({"result": True, "time": {}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def test_requests_reuse_the_portals_keep_alive_connection_and_send_plain_json() -> None:
    """One connection carries one request after another (no connect per request), and the body is
    the JSON `requests` would send, non-ASCII escaped, with its content type."""
    _Recording.seen, _Recording.paths = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = Bitrix24Client(f"http://127.0.0.1:{server.server_port}/rest/1/abc", timeout=2.0, pool_size=2)
        for index in range(10):
            assert client.call("telephony.externalCall.finish", {"CALL_ID": f"c{index}", "NOTE": "Grüße"}).result
    finally:
        server.shutdown()
        server.server_close()
    assert len({port for port, _, _ in _Recording.seen}) == 1
    assert {content_type for _, content_type, _ in _Recording.seen} == {"application/json"}
    assert _Recording.seen[0][2] == json.dumps({"CALL_ID": "c0", "NOTE": "Grüße"}).encode()
    assert set(_Recording.paths) == {"/rest/1/abc/telephony.externalCall.finish.json"}


def test_a_proxy_from_the_environment_carries_the_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY is honoured as `requests` would: the request goes to the proxy, naming the portal."""
    _Recording.seen, _Recording.paths = [], []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_port}")
    try:
        client = Bitrix24Client("http://portal.example/rest/1/abc/", timeout=2.0)
        assert client.call("telephony.externalCall.finish", {"CALL_ID": "c0"}).result
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert _Recording.paths == ["http://portal.example/rest/1/abc/telephony.externalCall.finish.json"]

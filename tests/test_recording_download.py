"""Recording downloads against real HTTP servers on loopback: 127.0.0.1 is the PBX, 127.0.0.2 "another host".

Each server counts the connections it accepted, so "never contacted" is a number, not a hope.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from b24scribe.delivery.download import (
    MAX_FILENAME,
    Downloaded,
    DownloadFailed,
    NotReady,
    RecordingError,
    Refused,
    download,
    host_allowed,
    parse_hosts,
    recording_filename,
)

WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 40
MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 30
MIB = 1024 * 1024

Route = Callable[[BaseHTTPRequestHandler], None]


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0

    def get_request(self) -> tuple[socket.socket, Any]:
        accepted = super().get_request()
        self.connections += 1
        return accepted


class Pbx:
    """A threaded HTTP/1.1 server on one loopback address; routes map a path to what it answers."""

    def __init__(self, address: str, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()  # handlers that hold their answer wait for it
        pbx = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                pbx.seen.append((self.path, dict(self.headers.items())))
                route = pbx.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    answer(404, b"no such recording", "text/plain")(self)
                else:
                    route(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = _CountingServer((address, 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.host, self.port = address, self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def connections(self) -> int:
        return self.server.connections

    def url(self, path: str, userinfo: str = "") -> str:
        return f"{self.scheme}://{userinfo}{self.host}:{self.port}{path}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def answer(status: int, body: bytes = b"", content_type: str | None = "audio/wav", **headers: str) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        if content_type:
            handler.send_header("Content-Type", content_type)
        for name, value in headers.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return route


def redirect(location: str, status: int = 302) -> Route:
    return answer(status, b"", None, Location=location)


def chunked(pieces: Iterator[bytes], content_type: str = "audio/wav") -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for piece in pieces:
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            handler.close_connection = True

    return route


@pytest.fixture
def serve() -> Iterator[Callable[[str], Pbx]]:
    started: list[Pbx] = []

    def start(address: str = "127.0.0.1") -> Pbx:
        started.append(Pbx(address))
        return started[-1]

    yield start
    for pbx in started:
        pbx.stop()


@pytest.fixture
def pbx(serve: Callable[[str], Pbx]) -> Pbx:
    return serve("127.0.0.1")


@pytest.fixture
def other(serve: Callable[[str], Pbx]) -> Pbx:
    return serve("127.0.0.2")


@pytest.fixture(autouse=True)
def no_proxies_and_no_ca_bundle_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests lets these variables win over a session's own `proxies` and `verify`."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def fetch(url: str, tmp_path: Path, **options: Any) -> Downloaded:
    """Download and return what came (the file is gone by then: for the failures and the metadata)."""
    settings: dict[str, Any] = {"hosts": ("127.0.0.1",), "max_bytes": 10 * MIB, "timeout": 5.0, "call_ref": "c1"}
    settings.update(options)
    with download(url, directory=str(tmp_path), **settings) as downloaded:
        return downloaded


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


# --- a recording arrives -------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "content_type"), [("/rec/1700.wav", WAV, "audio/wav"), ("/r.mp3", MP3, None)])
def test_a_recording_downloads_into_a_temporary_file_that_goes_with_the_block(
    pbx: Pbx, tmp_path: Path, path: str, body: bytes, content_type: str | None
) -> None:
    pbx.routes[path] = answer(200, body, content_type)
    with download(
        pbx.url(path), hosts=("127.0.0.1",), max_bytes=MIB, timeout=5, call_ref="c1", directory=str(tmp_path)
    ) as downloaded:
        assert downloaded.path.parent == tmp_path
        assert downloaded.path.read_bytes() == body
        assert downloaded.size == len(body)
        assert downloaded.sha256 == hashlib.sha256(body).hexdigest()
        assert downloaded.content_type == content_type
        assert downloaded.filename == path.rsplit("/", 1)[-1]
    assert not downloaded.path.exists()
    assert list(tmp_path.iterdir()) == []
    assert pbx.seen[0][1]["Accept-Encoding"] == "identity"


def test_the_temporary_file_goes_when_the_block_raises(pbx: Pbx, tmp_path: Path) -> None:
    pbx.routes["/a.wav"] = answer(200, WAV)
    kept: list[Path] = []
    with (
        pytest.raises(RuntimeError, match="upload failed"),
        download(pbx.url("/a.wav"), hosts=["127.0.0.1"], max_bytes=MIB, timeout=5, call_ref="c1") as downloaded,
    ):
        kept.append(downloaded.path)
        assert downloaded.path.exists()
        raise RuntimeError("upload failed")
    assert not kept[0].exists()


def test_a_chunked_recording_downloads_and_the_callers_session_stays_usable(pbx: Pbx, tmp_path: Path) -> None:
    pbx.routes["/live"] = chunked(iter([WAV[:5], WAV[5:1000], WAV[1000:]]), "application/octet-stream")
    with requests.Session() as session:
        got = fetch(pbx.url("/live"), tmp_path, session=session, call_ref="1700000000.123")
        pbx.routes["/b.mp3"] = answer(200, MP3, "audio/mpeg")
        again = fetch(pbx.url("/b.mp3"), tmp_path, session=session)  # not closed by the first download
    assert (got.size, got.sha256) == (len(WAV), hashlib.sha256(WAV).hexdigest())
    assert got.filename == "1700000000.123.wav"  # sniffed: RIFF....WAVE
    assert (again.size, again.filename) == (len(MP3), "b.mp3")


def test_an_empty_answer_is_not_ready_yet(pbx: Pbx, tmp_path: Path) -> None:
    pbx.routes["/empty.wav"] = answer(200, b"")
    with pytest.raises(NotReady, match="empty"):
        fetch(pbx.url("/empty.wav"), tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- the allow-list ------------------------------------------------------------------------------


def test_a_host_outside_the_allow_list_is_never_contacted(pbx: Pbx, other: Pbx, tmp_path: Path) -> None:
    other.routes["/a.wav"] = answer(200, WAV)
    with pytest.raises(Refused, match="not in B24SCRIBE_RECORDING_HOSTS") as refused:
        fetch(other.url("/a.wav"), tmp_path, hosts=("127.0.0.1", "*.example.com"))
    assert refused.value.reason == "host_not_allowed"
    assert other.connections == 0
    assert pbx.connections == 0
    assert fetch(other.url("/a.wav"), tmp_path, hosts=("127.0.0.2",)).size == len(WAV)  # the same, allowed
    assert other.connections == 1


def test_a_host_outside_the_allow_list_is_not_even_looked_up(
    pbx: Pbx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
    with pytest.raises(Refused):
        fetch(f"http://localhost:{pbx.port}/a.wav", tmp_path, hosts=("127.0.0.1", "*.localhost"))
    with pytest.raises(Refused):
        fetch(f"http://recordings.pbx.invalid:{pbx.port}/a.wav", tmp_path, hosts=("pbx.invalid",))
    assert looked_up == []
    pbx.routes["/a.wav"] = answer(200, WAV)
    assert fetch(f"http://LOCALHOST.:{pbx.port}/a.wav", tmp_path, hosts=("localhost",)).size == len(WAV)
    assert looked_up and looked_up[0] == "localhost"  # the instrument works: an allowed name is looked up


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.1/a.wav", "file:///etc/passwd", "127.0.0.1/a.wav", "http:///a.wav", "http://127.0.0.1:99999/a.wav"],
)
def test_a_url_that_is_not_http_to_a_host_is_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(Refused) as refused:
        fetch(url, tmp_path)
    assert refused.value.reason == "bad_url"


def test_a_host_hidden_behind_userinfo_tricks_is_the_one_checked(pbx: Pbx, other: Pbx, tmp_path: Path) -> None:
    other.routes["/a.wav"] = answer(200, WAV)
    for url in (
        f"http://127.0.0.1:{pbx.port}\\@127.0.0.2:{other.port}/a.wav",
        f"http://127.0.0.1:{pbx.port}@127.0.0.2:{other.port}/a.wav",
    ):
        with pytest.raises(Refused):
            fetch(url, tmp_path)
    assert other.connections == 0


# --- redirects -----------------------------------------------------------------------------------


def test_a_redirect_on_the_same_host_is_followed(pbx: Pbx, tmp_path: Path) -> None:
    pbx.routes["/recording"] = redirect("/storage/1700.123.WAV?sig=abc", 302)
    pbx.routes["/storage/1700.123.WAV"] = answer(200, WAV, "application/octet-stream")
    got = fetch(pbx.url("/recording?id=5"), tmp_path)
    assert got.size == len(WAV)
    assert got.filename == "1700.123.wav"  # the origin URL names nothing, the file's URL does
    assert [path for path, _ in pbx.seen] == ["/recording?id=5", "/storage/1700.123.WAV?sig=abc"]


def test_a_redirect_to_another_host_is_refused_and_that_host_never_contacted(
    pbx: Pbx, other: Pbx, tmp_path: Path
) -> None:
    other.routes["/a.wav"] = answer(200, WAV)
    pbx.routes["/a.wav"] = redirect(other.url("/a.wav"), 307)
    with pytest.raises(Refused, match="another host") as refused:
        fetch(pbx.url("/a.wav"), tmp_path, hosts=("127.0.0.1", "127.0.0.2"))
    assert refused.value.reason == "redirect_off_host"
    assert other.connections == 0
    assert pbx.connections == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("hops", "follows"), [(3, True), (4, False)])
def test_at_most_three_redirects_are_followed(pbx: Pbx, tmp_path: Path, hops: int, follows: bool) -> None:
    for hop in range(hops):
        pbx.routes[f"/hop{hop}"] = redirect(f"/hop{hop + 1}", 301)
    pbx.routes[f"/hop{hops}"] = answer(200, WAV)
    if follows:
        assert fetch(pbx.url("/hop0"), tmp_path).size == len(WAV)
    else:
        with pytest.raises(Refused, match="more than 3 redirects") as refused:
            fetch(pbx.url("/hop0"), tmp_path)
        assert refused.value.reason == "too_many_redirects"
        assert f"/hop{hops}" not in [path for path, _ in pbx.seen]


def test_a_redirect_without_a_location_is_refused(pbx: Pbx, tmp_path: Path) -> None:
    pbx.routes["/a.wav"] = answer(302, b"", None)
    with pytest.raises(Refused, match="without a Location"):
        fetch(pbx.url("/a.wav"), tmp_path)


def self_signed(directory: Path) -> tuple[ssl.SSLContext, str]:
    """A server context for 127.0.0.1 and the certificate's path (the client's `verify`)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, str(cert_path)


def test_over_https_a_file_downloads_and_a_redirect_down_to_http_is_refused(
    serve: Callable[[str], Pbx], tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    context, cert = self_signed(certs)
    secure = Pbx("127.0.0.1", context)
    plain = serve("127.0.0.1")
    files = tmp_path / "files"
    files.mkdir()
    try:
        secure.routes["/a.wav"] = answer(200, WAV)
        secure.routes["/down.wav"] = redirect(plain.url("/a.wav"))
        plain.routes["/a.wav"] = answer(200, WAV)
        with requests.Session() as session:
            session.verify = cert
            assert fetch(secure.url("/a.wav"), files, session=session).sha256 == hashlib.sha256(WAV).hexdigest()
            with pytest.raises(Refused, match="from https to http"):
                fetch(secure.url("/down.wav"), files, session=session)
        with pytest.raises(DownloadFailed, match="TLS") as failed:  # the default trust store knows no such CA
            fetch(secure.url("/a.wav"), files)
        assert failed.value.reason == "tls"
    finally:
        secure.stop()
    assert plain.connections == 0
    assert list(files.iterdir()) == []


# --- credentials ---------------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials_go_to_the_urls_own_host_and_port_only(serve: Callable[[str], Pbx], tmp_path: Path) -> None:
    first, second = serve("127.0.0.1"), serve("127.0.0.1")
    first.routes["/a"] = redirect("/b")
    first.routes["/b"] = redirect(second.url("/c.wav"))  # the same host, another port
    second.routes["/c.wav"] = answer(200, WAV)
    assert fetch(first.url("/a"), tmp_path, auth=("bob", "pw")).size == len(WAV)
    assert [headers.get("Authorization") for _, headers in first.seen] == [basic("bob", "pw")] * 2
    assert "Authorization" not in second.seen[0][1]


def test_the_urls_userinfo_is_basic_auth(pbx: Pbx, tmp_path: Path) -> None:
    pbx.routes["/a.wav"] = answer(200, WAV)
    fetch(pbx.url("/a.wav", "alice:p%40ss@"), tmp_path)
    assert pbx.seen[0][1]["Authorization"] == basic("alice", "p@ss")


def test_no_error_message_shows_the_urls_userinfo_or_query(pbx: Pbx, other: Pbx, tmp_path: Path) -> None:
    pbx.routes["/gone.wav"] = answer(404, b"")
    pbx.routes["/broken.wav"] = answer(500, b"")
    pbx.routes["/away.wav"] = redirect(other.url("/a.wav", "alice:s3cret-pw@") + "?token=q70k3n")
    pbx.routes["/big.wav"] = answer(200, WAV)
    pbx.routes["/page.wav"] = answer(200, b"<html>" * 10, "text/html")
    userinfo = "alice:s3cret-pw@"
    cases: list[tuple[str, dict[str, Any]]] = [
        (other.url("/a.wav", userinfo), {}),
        (pbx.url("/gone.wav", userinfo), {}),
        (pbx.url("/broken.wav", userinfo), {}),
        (pbx.url("/away.wav", userinfo), {"hosts": ("127.0.0.1", "127.0.0.2")}),
        (pbx.url("/big.wav", userinfo), {"max_bytes": 100}),
        (pbx.url("/page.wav", userinfo), {}),
        (f"http://{userinfo}127.0.0.1:{free_port()}/a.wav", {}),
        (f"ftp://{userinfo}127.0.0.1/a.wav", {}),
    ]
    messages = []
    for url, options in cases:
        with pytest.raises(RecordingError) as failed:
            fetch(url + "?token=q70k3n", tmp_path, **options)
        messages.append(str(failed.value))
    assert len(messages) == len(cases)
    for message in messages:
        assert "\n" not in message
        for secret in ("alice", "s3cret", "q70k3n"):
            assert secret not in message, message


# --- statuses and broken servers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (404, NotReady, "not_ready"),
        (410, Refused, "gone"),
        (403, Refused, "http_status"),
        (401, Refused, "http_status"),
        (204, Refused, "http_status"),
        (429, DownloadFailed, "http_status"),
        (500, DownloadFailed, "http_status"),
        (503, DownloadFailed, "http_status"),
    ],
)
def test_a_status_says_whether_to_retry(
    pbx: Pbx, tmp_path: Path, status: int, error: type[RecordingError], reason: str
) -> None:
    pbx.routes["/a.wav"] = answer(status, b"" if status == 204 else b"nope", "text/plain")
    with pytest.raises(RecordingError) as failed:
        fetch(pbx.url("/a.wav"), tmp_path)
    assert type(failed.value) is error
    assert failed.value.reason == reason
    assert str(status) in str(failed.value)


def test_a_refused_connection_is_a_transient_failure(tmp_path: Path) -> None:
    with pytest.raises(DownloadFailed, match="connection refused") as failed:
        fetch(f"http://127.0.0.1:{free_port()}/a.wav", tmp_path)
    assert failed.value.reason == "unreachable"


def test_a_body_shorter_than_declared_is_a_transient_failure(pbx: Pbx, tmp_path: Path) -> None:
    def short(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "audio/wav")
        handler.send_header("Content-Length", str(len(WAV)))
        handler.end_headers()
        handler.wfile.write(WAV[: len(WAV) // 2])
        handler.close_connection = True

    pbx.routes["/a.wav"] = short
    with pytest.raises(DownloadFailed) as failed:
        fetch(pbx.url("/a.wav"), tmp_path)
    assert failed.value.reason == "incomplete"
    assert list(tmp_path.iterdir()) == []


def test_a_chunked_body_cut_off_before_its_end_is_a_transient_failure(pbx: Pbx, tmp_path: Path) -> None:
    def cut(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "audio/wav")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(WAV), WAV))  # no terminating chunk
        handler.close_connection = True

    pbx.routes["/a.wav"] = cut
    with pytest.raises(DownloadFailed, match="ended before the file"):
        fetch(pbx.url("/a.wav"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_never_answers_times_out(pbx: Pbx, tmp_path: Path) -> None:
    pbx.routes["/a.wav"] = lambda handler: pbx.release.wait(10)  # type: ignore[func-returns-value]
    started = time.monotonic()
    with pytest.raises(DownloadFailed, match="no answer") as failed:
        fetch(pbx.url("/a.wav"), tmp_path, timeout=0.3)
    assert failed.value.reason == "timeout"
    assert time.monotonic() - started < 2


def test_a_server_that_trickles_is_cut_off_after_the_grace(pbx: Pbx, tmp_path: Path) -> None:
    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "audio/wav")
        handler.send_header("Content-Length", str(len(WAV)))
        handler.end_headers()
        for byte in WAV:  # a byte every 50 ms: each read succeeds well within the timeout
            if pbx.release.wait(0.05):
                return
            try:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
            except OSError:
                return

    pbx.routes["/a.wav"] = trickle
    started = time.monotonic()
    with pytest.raises(DownloadFailed, match="too slow") as failed:
        fetch(pbx.url("/a.wav"), tmp_path, timeout=0.3)
    elapsed = time.monotonic() - started
    assert failed.value.reason == "too_slow"
    assert 0.8 < elapsed < 2.5  # three timeouts of grace (0.9 s), then cut
    assert list(tmp_path.iterdir()) == []


# --- the size limit ------------------------------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_before_the_body(pbx: Pbx, tmp_path: Path) -> None:
    body_sent = threading.Event()

    def huge(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "audio/wav")
        handler.send_header("Content-Length", str(2 * MIB))
        handler.end_headers()
        handler.wfile.flush()
        if not pbx.release.wait(10):  # the body comes only when the test says so
            return
        body_sent.set()

    pbx.routes["/a.wav"] = huge
    started = time.monotonic()
    with pytest.raises(Refused, match="over the limit") as refused:
        fetch(pbx.url("/a.wav"), tmp_path, max_bytes=MIB)
    assert refused.value.reason == "too_large"
    assert time.monotonic() - started < 2
    assert not body_sent.is_set()
    assert list(tmp_path.iterdir()) == []


def test_a_chunked_body_that_grows_past_the_limit_is_refused_and_removed(pbx: Pbx, tmp_path: Path) -> None:
    produced = [0]

    def endless() -> Iterator[bytes]:
        piece = WAV[:12] + bytes(64 * 1024 - 12)
        yield piece
        piece = bytes(64 * 1024)
        while produced[0] < 100 * MIB:
            produced[0] += len(piece)
            yield piece

    pbx.routes["/a.wav"] = chunked(endless())
    with pytest.raises(Refused, match="over the limit") as refused:
        fetch(pbx.url("/a.wav"), tmp_path, max_bytes=MIB)
    assert refused.value.reason == "too_large"
    assert list(tmp_path.iterdir()) == []
    assert produced[0] < 20 * MIB  # the server was stopped, not drained


def test_memory_stays_bounded_for_a_large_recording(pbx: Pbx, tmp_path: Path) -> None:
    size = 128 * MIB
    block = os.urandom(64 * 1024)
    first = b"RIFF" + b"\x00" * 4 + b"WAVE" + block[12:]
    expected = hashlib.sha256(first)
    for _ in range(size // len(block) - 1):
        expected.update(block)

    def big(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        handler.wfile.write(first)
        for _ in range(size // len(block) - 1):
            handler.wfile.write(block)

    pbx.routes["/call"] = big
    tracemalloc.start()
    try:
        got = fetch(pbx.url("/call"), tmp_path, max_bytes=200 * MIB, timeout=30, call_ref="c9")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (got.size, got.sha256, got.filename) == (size, expected.hexdigest(), "c9.wav")
    assert peak < 4 * MIB, peak


# --- file names ----------------------------------------------------------------------------------

RIFF = b"RIFF\x00\x00\x00\x00WAVEfmt "


@pytest.mark.parametrize(
    ("url", "content_type", "head", "name"),
    [
        ("https://pbx.example/rec/1700.123.WAV", None, b"", "1700.123.wav"),
        ("https://pbx.example/rec/call%20one.Mp3?x=1", "application/octet-stream", b"", "call one.mp3"),
        ("https://pbx.example/rec?id=5", "audio/mpeg", b"", "c1.mp3"),
        ("https://pbx.example/rec", "audio/mp3", b"", "c1.mp3"),
        ("https://pbx.example/rec", "Audio/X-WAV; charset=binary", b"", "c1.wav"),
        ("https://pbx.example/rec", "audio/wave", b"", "c1.wav"),
        ("https://pbx.example/rec", "audio/vnd.wave", b"", "c1.wav"),
        ("https://pbx.example/rec", "audio/wav", b"", "c1.wav"),
        ("https://pbx.example/rec.ogg", "application/octet-stream", RIFF, "c1.wav"),
        ("https://pbx.example/rec", None, b"ID3\x03\x00", "c1.mp3"),
        ("https://pbx.example/rec", "binary/octet-stream", b"\xff\xfb\x90\x64", "c1.mp3"),
        ("https://pbx.example/rec", "application/octet-stream", b"\xff\xf3\x40\xc4", "c1.mp3"),
        ("https://pbx.example/%2E%2E%2Fetc%2Fpasswd.wav", None, b"", "_etc_passwd.wav"),
        ("https://pbx.example/a%5Cb%00c%0A%E2%80%AEd.mp3", None, b"", "a_bcd.mp3"),
        ("https://pbx.example/.wav", "audio/wav", b"", "c1.wav"),
    ],
)
def test_the_filename_comes_from_the_url_then_the_content_type_then_the_bytes(
    url: str, content_type: str | None, head: bytes, name: str
) -> None:
    assert recording_filename(url, content_type, head, "c1") == name


@pytest.mark.parametrize(
    ("url", "content_type", "head"),
    [
        ("https://pbx.example/rec/1700.wav", "text/html; charset=utf-8", b"<html>"),
        ("https://pbx.example/rec/1700.mp3", "application/json", b"{}"),
        ("https://pbx.example/rec", "application/octet-stream", b"OggS\x00\x02"),
        ("https://pbx.example/rec", "audio/ogg", b"OggS\x00\x02"),
        ("https://pbx.example/rec", None, b"\xff\xf1\x50\x80"),  # AAC (ADTS): sync bits, layer 0
        ("https://pbx.example/rec", None, b""),
        ("https://pbx.example/rec.wav.exe", "application/octet-stream", b"MZ"),
    ],
)
def test_anything_but_wav_and_mp3_is_refused(url: str, content_type: str | None, head: bytes) -> None:
    with pytest.raises(Refused) as refused:
        recording_filename(url, content_type, head, "c1")
    assert refused.value.reason == "not_audio"


def test_a_long_name_is_cut_keeping_its_extension_and_the_call_ref_is_sanitized_too() -> None:
    long_name = recording_filename("https://pbx.example/" + "a" * 300 + ".MP3", None, b"", "c1")
    assert long_name == "a" * (MAX_FILENAME - 4) + ".mp3"
    assert recording_filename("https://pbx.example/rec", "audio/wav", b"", "pbx/1\\2\x00") == "pbx_1_2.wav"
    assert recording_filename("https://pbx.example/rec", "audio/wav", b"", "x" * 500) == "x" * 96 + ".wav"
    assert recording_filename("https://pbx.example/rec", "audio/wav", b"", "") == "recording.wav"


def test_a_page_served_as_a_recording_is_refused_after_its_first_bytes(pbx: Pbx, tmp_path: Path) -> None:
    pbx.routes["/login"] = answer(200, b"<!doctype html><title>Log in</title>" * 100, "text/html")
    pbx.routes["/blob"] = answer(200, b"\x00" * 5000, "application/octet-stream")
    with pytest.raises(Refused, match="text/html"):
        fetch(pbx.url("/login"), tmp_path)
    with pytest.raises(Refused, match="not a wav or mp3"):
        fetch(pbx.url("/blob"), tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- the allow-list's patterns -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "patterns", "allowed"),
    [
        ("pbx.example.com", ["pbx.example.com"], True),
        ("PBX.Example.COM.", ["pbx.example.com"], True),
        ("pbx.example.com", ["PBX.EXAMPLE.COM."], True),
        ("pbx.example.com.evil.net", ["pbx.example.com"], False),
        ("evilpbx.example.com", ["pbx.example.com"], False),
        ("a.b.example.com", ["*.example.com"], True),
        ("rec.example.com", ["*.example.com"], True),
        ("example.com", ["*.example.com"], False),
        ("badexample.com", ["*.example.com"], False),
        ("xn--bcher-kva.example", ["bücher.example"], True),
        ("Bücher.example", ["xn--bcher-kva.example"], True),
        ("a.bücher.example", ["*.xn--bcher-kva.example"], True),
        ("10.0.0.5", ["10.0.0.5"], True),
        ("10.0.0.50", ["10.0.0.5"], False),
        ("10.0.0.5", ["*.0.0.5"], False),
        ("2130706433", ["127.0.0.1"], False),
        ("127.1", ["127.0.0.1"], False),
        ("::1", ["::1"], True),
        ("[::1]", ["0:0:0:0:0:0:0:1"], True),
        ("[2001:DB8::1]", ["[2001:db8:0::1]"], True),
        ("2001:db8::2", ["2001:db8::1"], False),
        ("pbx.example.com", [], False),
        ("", ["*.example.com"], False),
        ("pbx.example.com", ["not a host", "*.example.com"], True),
    ],
)
def test_host_allowed(host: str, patterns: list[str], allowed: bool) -> None:
    assert host_allowed(host, patterns) is allowed


def test_parse_hosts_normalizes_and_drops_duplicates() -> None:
    assert parse_hosts(" a.example, *.B.Example. ,10.0.0.5,, [::1], A.example, bücher.example ") == (
        "a.example",
        "*.b.example",
        "10.0.0.5",
        "::1",
        "xn--bcher-kva.example",
    )
    assert parse_hosts("") == ()
    assert parse_hosts(" , ") == ()


@pytest.mark.parametrize(
    "entry",
    [
        "https://pbx.example",
        "pbx.example/rec",
        "pbx.example:8080",
        "user@pbx.example",
        "*",
        "*.",
        "*.10.0.0.5",
        "a.*.example",
        "**.example",
        "10.0.0.256",
        "bad host",
        "-pbx.example",
        "pbx..example",
        "a" * 64 + ".example",
    ],
)
def test_parse_hosts_names_a_bad_entry(entry: str) -> None:
    with pytest.raises(ValueError, match="is not a host name") as error:
        parse_hosts(f"good.example, {entry}")
    assert repr(entry) in str(error.value)

"""Recording downloads: GET a PBX's recording into a temporary file for upload to Bitrix24 (contract §9).

Only hosts in B24SCRIBE_RECORDING_HOSTS are contacted: the host is checked as text before anything
touches the network (no DNS lookup), and the request goes to a URL rebuilt from that checked host, so
no parser can read a different one out of it. Redirects are followed by hand, on the same host only
(at most `MAX_REDIRECTS`), never from https down to http. The body streams in `CHUNK_BYTES` reads to
a temporary file within `max_bytes`, hashed on the way.

Time: every socket operation (connect, each read) waits at most `timeout`, and the whole download
must keep an average pace: it may take `GRACE_TIMEOUTS` × `timeout` plus one second per
`MIN_AVERAGE_RATE` bytes received. A server that trickles a byte a second is cut off after the grace;
one that keeps up twice a telephone-quality wav's bit rate is never cut off; the worst case is bounded
by `max_bytes` (200 MiB at 32 KiB/s: under two hours).

Failure policy: fails closed. A host outside the list, a redirect off the host, a file over the
limit, a file that is not wav or mp3, a 410 or another 4xx is `Refused` for good. A 404 (and an
empty 200) right after hang-up is `NotReady`: the PBX has not written the file yet. 5xx, 408, 425,
429, an unreachable, broken or too slow server is `DownloadFailed`: both are retried on the retry
schedule. A 410 is not "not ready": the server says the file is gone and will not come back.
Every error's text is one line for an admin, without the URL's userinfo or query string.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import re
import socket
import ssl
import tempfile
import time
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urljoin, urlsplit

import idna
import requests
import urllib3.exceptions
from urllib3.util import parse_url

CHUNK_BYTES = 64 * 1024  # one read from the socket at most; memory stays bounded by it
MAX_REDIRECTS = 3
GRACE_TIMEOUTS = 3  # connect, first answer and redirects: this many timeouts before the pace counts
MIN_AVERAGE_RATE = 32 * 1024  # bytes/s: twice an 8 kHz 16-bit wav's bit rate
MAX_FILENAME = 100  # characters, extension included
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
TRANSIENT_STATUSES = frozenset({408, 425, 429})  # and every 5xx

_SNIFF_BYTES = 12  # "RIFF" size "WAVE" is the longest signature
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_AUDIO_TYPES = {
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/mpeg3": "mp3",
    "audio/x-mpeg-3": "mp3",
    "audio/x-mp3": "mp3",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/vnd.wave": "wav",
}
_NOT_RECORDING_TYPES = frozenset({"application/json", "application/xml", "application/javascript"})


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A recording on disk, ready to upload (the file is deleted when `download`'s block exits)."""

    path: Path
    size: int
    sha256: str  # hex
    content_type: str | None
    filename: str  # the FILENAME Bitrix24 gets: always ends in .wav or .mp3


class RecordingError(Exception):
    """Why a recording was not downloaded: `str()` is one line for an admin, `reason` a bounded metric label."""

    default_reason = "error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason


class NotReady(RecordingError):
    """The server has no file yet (404 right after hang-up): retry on the schedule."""

    default_reason = "not_ready"


class Refused(RecordingError):
    """Never to be downloaded as it stands: a host, redirect, size, type or status that retrying cannot fix."""

    default_reason = "refused"


class DownloadFailed(RecordingError):
    """A transient failure (5xx, 429, unreachable, timeout, broken connection): retry on the schedule."""

    default_reason = "failed"


def parse_hosts(value: str) -> tuple[str, ...]:
    """Parse B24SCRIBE_RECORDING_HOSTS ("a.example, *.b.example, 10.0.0.5") into normalized patterns."""
    patterns: list[str] = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            pattern = _normalize_pattern(entry)
        except ValueError as error:
            raise ValueError(f"{entry!r} is not a host name, IP address or *.domain pattern ({error})") from None
        if pattern not in patterns:
            patterns.append(pattern)
    return tuple(patterns)


def host_allowed(host: str, patterns: Sequence[str]) -> bool:
    """Whether `host` is in the allow-list: an exact name or IP, or a subdomain of a `*.` pattern's domain."""
    try:
        name = _normalize_host(host)
    except ValueError:
        return False
    is_ip = _is_ip(name)
    for raw in patterns:
        try:
            pattern = _normalize_pattern(raw)
        except ValueError:
            continue  # an entry that cannot be normalized matches nothing
        if pattern.startswith("*."):
            if not is_ip and name.endswith(pattern[1:]):
                return True
        elif name == pattern:
            return True
    return False


def recording_filename(url: str, content_type: str | None, head: bytes, call_ref: str) -> str:
    """The FILENAME for Bitrix24: the URL's last segment if it is a .wav/.mp3, else `<call_ref>.<wav|mp3>`
    from the Content-Type, else from the file's first bytes; `Refused` if none says wav or mp3."""
    media_type = _media_type(content_type)
    if media_type is not None and _is_text(media_type):  # an error or login page served with status 200
        raise Refused(f"the server sent {media_type}, not a recording", "not_audio")
    from_url = _url_filename(url)
    if from_url is not None:
        return from_url
    extension = _AUDIO_TYPES.get(media_type or "") or _sniff(head)
    if extension is None:
        described = media_type or "no Content-Type"
        raise Refused(f"not a wav or mp3 file ({described}); Bitrix24 takes only wav and mp3", "not_audio")
    return _sanitize(call_ref, extension)


@contextmanager
def download(
    url: str,
    *,
    hosts: Sequence[str],
    max_bytes: int,
    timeout: float,
    call_ref: str,
    session: requests.Session | None = None,
    auth: tuple[str, str] | None = None,
    directory: str | None = None,
) -> Iterator[Downloaded]:
    """Download the recording at `url` into a temporary file; the file is deleted when the block exits.

    `auth` (or the URL's userinfo) is sent as HTTP basic auth to the URL's own host, scheme and port
    only. Raises `NotReady`, `Refused` or `DownloadFailed` (all `RecordingError`) before yielding.
    """
    if max_bytes <= 0 or timeout <= 0:
        raise ValueError("max_bytes and timeout must be positive")
    http = session if session is not None else requests.Session()
    try:
        downloaded = _Download(http, hosts, max_bytes, timeout, call_ref, auth, directory).run(url)
    finally:
        if session is None:
            http.close()
    try:
        yield downloaded
    finally:
        downloaded.path.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class _Target:
    """A URL as requested: rebuilt from its checked parts, without userinfo or fragment."""

    url: str
    scheme: str
    host: str  # normalized
    port: int  # explicit or the scheme's default
    shown: str  # for messages: no userinfo, no query
    credentials: tuple[str, str] | None  # the URL's userinfo


class _Download:
    """One download: the redirect walk, then the body into a temporary file."""

    def __init__(
        self,
        http: requests.Session,
        hosts: Sequence[str],
        max_bytes: int,
        timeout: float,
        call_ref: str,
        auth: tuple[str, str] | None,
        directory: str | None,
    ) -> None:
        self.http = http
        self.hosts = hosts
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.call_ref = call_ref
        self.auth = auth
        self.directory = directory
        self.started = time.monotonic()

    def run(self, url: str) -> Downloaded:
        origin = current = _target(url)
        if not host_allowed(origin.host, self.hosts):
            raise Refused(f"{origin.shown}: host {origin.host} is not in B24SCRIBE_RECORDING_HOSTS", "host_not_allowed")
        credentials = self.auth or origin.credentials
        for followed in range(MAX_REDIRECTS + 1):
            response = self._get(current, credentials if _credentials_go_to(origin, current) else None)
            if response.status_code not in REDIRECT_STATUSES:
                with closing(response):
                    return self._save(response, origin, current)
            with closing(response):
                location = self.http.get_redirect_target(response)
            if not location:
                raise Refused(f"{current.shown}: HTTP {response.status_code} without a Location", "bad_redirect")
            if followed == MAX_REDIRECTS:
                raise Refused(f"{origin.shown}: more than {MAX_REDIRECTS} redirects", "too_many_redirects")
            if location.startswith("//"):
                location = f"{current.scheme}:{location}"
            following = _target(urljoin(current.url, location))
            if following.host != origin.host:
                raise Refused(
                    f"{current.shown}: redirected to another host ({following.host}); only the same host is followed",
                    "redirect_off_host",
                )
            if current.scheme == "https" and following.scheme == "http":
                raise Refused(f"{current.shown}: redirected from https to http", "redirect_off_host")
            current = following
        raise AssertionError("unreachable: the loop returns or raises")

    def _get(self, target: _Target, credentials: tuple[str, str] | None) -> requests.Response:
        prepared = self.http.prepare_request(
            requests.Request("GET", target.url, headers={"Accept-Encoding": "identity"}, auth=credentials)
        )
        assert prepared.url is not None
        sent_to = parse_url(prepared.url).host
        if sent_to is None or _normalize_host(sent_to) != target.host:  # belt and braces: the URL was rebuilt
            raise Refused(f"{target.shown}: the URL's host is ambiguous", "bad_url")
        settings = self.http.merge_environment_settings(prepared.url, {}, True, None, None)
        wait = self._wait(0, target)
        try:
            return self.http.send(prepared, allow_redirects=False, timeout=(wait, wait), **settings)
        except requests.exceptions.ConnectTimeout:
            raise self._timed_out(0, target, wait, "no connection within") from None
        except requests.exceptions.ReadTimeout:
            raise self._timed_out(0, target, wait, "no answer within") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidHeader):
            raise Refused(f"{target.shown}: not a valid URL", "bad_url") from None
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            raise _connection_failure(target, error) from None

    def _save(self, response: requests.Response, origin: _Target, current: _Target) -> Downloaded:
        status = response.status_code
        if status == 404:
            raise NotReady(f"{current.shown}: HTTP 404, the recording is not there yet", "not_ready")
        if status in TRANSIENT_STATUSES or status >= 500:
            raise DownloadFailed(f"{current.shown}: HTTP {status}", "http_status")
        if status != 200:
            raise Refused(f"{current.shown}: HTTP {status}", "gone" if status == 410 else "http_status")
        declared = response.raw.length_remaining
        if declared is not None and declared > self.max_bytes:
            raise Refused(
                f"{current.shown}: {declared} bytes declared, over the limit of {self.max_bytes}", "too_large"
            )
        content_type = response.headers.get("Content-Type")
        named_url = origin.url if _url_filename(origin.url) is not None else current.url
        digest, size, head, filename = hashlib.sha256(), 0, b"", None
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - the file outlives this function
            prefix="b24scribe-recording-", suffix=".part", dir=self.directory, delete=False
        )
        path = Path(handle.name)
        try:
            with handle:
                while chunk := self._read(response, size, current):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise Refused(f"{current.shown}: over the limit of {self.max_bytes} bytes", "too_large")
                    if filename is None:
                        head += chunk[: _SNIFF_BYTES - len(head)]
                        if len(head) >= _SNIFF_BYTES:  # decide now, not after 200 MiB of an error page
                            filename = recording_filename(named_url, content_type, head, self.call_ref)
                    digest.update(chunk)
                    _write(handle, chunk)
            if size == 0:
                raise NotReady(f"{current.shown}: the file is empty, not written yet", "not_ready")
            if declared is not None and size < declared:
                raise DownloadFailed(f"{current.shown}: {size} of {declared} bytes, then the end", "incomplete")
            if filename is None:
                filename = recording_filename(named_url, content_type, head, self.call_ref)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Downloaded(path, size, digest.hexdigest(), content_type, filename)

    def _read(self, response: requests.Response, received: int, target: _Target) -> bytes:
        """The next piece of the body (b"" at its end): one socket read at most, so the pace is checked often."""
        raw = response.raw
        wait = self._wait(received, target)
        if raw.connection is not None and raw.connection.sock is not None:
            raw.connection.sock.settimeout(wait)
        try:
            return raw.read1(CHUNK_BYTES, decode_content=True)
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
            raise self._timed_out(received, target, wait, "nothing received for") from None
        except urllib3.exceptions.DecodeError:
            raise DownloadFailed(f"{target.shown}: the body's Content-Encoding does not decode", "incomplete") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            if isinstance(_cause(error, (ConnectionResetError, BrokenPipeError)), OSError):
                raise DownloadFailed(f"{target.shown}: connection reset during the body", "incomplete") from None
            raise DownloadFailed(f"{target.shown}: the connection ended before the file did", "incomplete") from None

    def _wait(self, received: int, target: _Target) -> float:
        """How long the next socket operation may wait: `timeout`, or less when the pace is nearly spent."""
        left = GRACE_TIMEOUTS * self.timeout + received / MIN_AVERAGE_RATE - (time.monotonic() - self.started)
        if left <= 0:
            raise self._too_slow(received, target)
        return min(self.timeout, left)

    def _timed_out(self, received: int, target: _Target, wait: float, what: str) -> DownloadFailed:
        """A socket operation's timeout: the server's silence, or the pace spent (`wait` was cut short)."""
        if wait < self.timeout:
            return self._too_slow(received, target)
        return DownloadFailed(f"{target.shown}: {what} {wait:g} s", "timeout")

    def _too_slow(self, received: int, target: _Target) -> DownloadFailed:
        elapsed = time.monotonic() - self.started
        return DownloadFailed(
            f"{target.shown}: too slow ({received} bytes in {elapsed:.1f} s; "
            f"at least {MIN_AVERAGE_RATE // 1024} KiB/s on average is expected)",
            "too_slow",
        )


def _write(handle: IO[bytes], chunk: bytes) -> None:
    """Write to the temporary file; a full or failing disk is a transient failure, not the recording's."""
    try:
        handle.write(chunk)
    except OSError as error:
        code = getattr(error, "errno", None)
        raise DownloadFailed(f"cannot write the temporary file (errno {code})", "disk") from None


def _target(url: str) -> _Target:
    """Check a URL's scheme and host and rebuild it from them (`Refused` if it has neither right)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        hostname = parts.hostname
    except ValueError:
        raise Refused("the recording URL is not a valid URL", "bad_url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused(f"the recording URL's scheme is {scheme or 'missing'}, not http or https", "bad_url")
    if not hostname:
        raise Refused("the recording URL has no host", "bad_url")
    try:
        host = _normalize_host(hostname)
    except ValueError:
        raise Refused(f"the recording URL's host {_printable(hostname)!r} is not valid", "bad_url") from None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    path = parts.path if parts.path.startswith("/") else "/" + parts.path
    rebuilt = f"{scheme}://{netloc}{path}" + (f"?{parts.query}" if parts.query else "")
    credentials = None
    if parts.username is not None:
        credentials = (unquote(parts.username), unquote(parts.password or ""))
    shown = f"{scheme}://{netloc}{_printable(path)[:200]}"
    default_port = 443 if scheme == "https" else 80
    return _Target(rebuilt, scheme, host, port if port is not None else default_port, shown, credentials)


def _credentials_go_to(origin: _Target, target: _Target) -> bool:
    """Whether the origin's credentials may be sent to `target`: same scheme, host and port, or the
    upgrade from http to https on the default ports (requests' own rule for redirects)."""
    if (origin.scheme, origin.host, origin.port) == (target.scheme, target.host, target.port):
        return True
    return (origin.scheme, origin.port, target.scheme, target.port) == ("http", 80, "https", 443) and (
        origin.host == target.host
    )


def _normalize_host(host: str) -> str:
    """A host as compared: IP addresses in canonical form, names lowercase in IDNA (ASCII) form
    without a trailing dot; ValueError for anything else (a port, a path, a malformed IP)."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ValueError("empty")
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError as error:
            raise ValueError(f"not a valid international name: {error}") from None
    text = text.lower()
    if ":" in text:
        raise ValueError("no ports: any port is allowed")
    labels = text.split(".")
    if len(text) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("not a valid host name")
    if labels[-1].isdigit():  # resolvers read "10.0.0.256" or "2130706433" as addresses: refuse the guess
        raise ValueError("not a valid IP address")
    return text


def _normalize_pattern(pattern: str) -> str:
    """An allow-list entry normalized like a host; `*.domain` keeps its wildcard."""
    text = pattern.strip()
    if "/" in text or "@" in text:
        raise ValueError("a host, not a URL")
    if text.startswith("*."):
        domain = _normalize_host(text[2:])
        if _is_ip(domain):
            raise ValueError("a wildcard needs a domain, not an IP address")
        return "*." + domain
    return _normalize_host(text)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _media_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def _is_text(media_type: str) -> bool:
    return (
        media_type.startswith("text/") or media_type in _NOT_RECORDING_TYPES or media_type.endswith(("+json", "+xml"))
    )


def _sniff(head: bytes) -> str | None:
    """wav or mp3 by the file's first bytes (None: neither)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:3] == b"ID3":
        return "mp3"
    # an MPEG audio frame: 11 sync bits, then a version and a layer that are not "reserved" (AAC's
    # ADTS frames share the sync but have layer 0, and Bitrix24 does not take them)
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        version, layer = (head[1] >> 3) & 0b11, (head[1] >> 1) & 0b11
        if version != 0b01 and layer != 0b00:
            return "mp3"
    return None


def _url_filename(url: str) -> str | None:
    """The URL's last path segment, sanitized, when it names a .wav or .mp3 file (and more than that)."""
    try:
        segment = unquote(urlsplit(url).path.rsplit("/", 1)[-1], errors="replace")
    except ValueError:
        return None
    stem, dot, extension = segment.rpartition(".")
    if not dot or extension.lower() not in ("wav", "mp3"):
        return None
    cleaned = _clean(stem, MAX_FILENAME - len(extension) - 1)
    return f"{cleaned}.{extension.lower()}" if cleaned else None


def _sanitize(stem: str, extension: str) -> str:
    """`stem.extension` for a name made from the call's reference ("recording" if nothing is left of it)."""
    return f"{_clean(stem, MAX_FILENAME - len(extension) - 1) or 'recording'}.{extension}"


def _clean(stem: str, limit: int) -> str:
    """A file name's stem without separators, control or format characters, leading dots; at most `limit`."""
    cleaned = "".join("_" if char in "/\\" else char for char in stem if unicodedata.category(char) not in ("Cc", "Cf"))
    return cleaned.strip().lstrip(".").strip()[:limit].rstrip()


def _printable(text: str) -> str:
    """`text` fit for a one-line message: control characters replaced."""
    return "".join("?" if unicodedata.category(char) in ("Cc", "Cf") else char for char in text)


def _cause(error: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first of `kinds` among an error and what it wraps (urllib3 and requests nest them)."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds):
            return current
        nested = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        pending.extend(item for item in nested if isinstance(item, BaseException))
    return None


def _connection_failure(target: _Target, error: BaseException) -> RecordingError:
    """A transient failure named by what went wrong (no URL: requests' own texts carry the query string)."""
    if _cause(error, (ConnectionRefusedError,)) is not None:
        return DownloadFailed(f"{target.shown}: connection refused", "unreachable")
    if _cause(error, (socket.gaierror, urllib3.exceptions.NameResolutionError)) is not None:
        return DownloadFailed(f"{target.shown}: the host name does not resolve", "unreachable")
    if _cause(error, (ssl.SSLError, urllib3.exceptions.SSLError)) is not None:
        return DownloadFailed(f"{target.shown}: the TLS handshake failed", "tls")
    if _cause(error, (TimeoutError, urllib3.exceptions.TimeoutError)) is not None:
        return DownloadFailed(f"{target.shown}: timed out", "timeout")
    if _cause(error, (ConnectionResetError, BrokenPipeError)) is not None:
        return DownloadFailed(f"{target.shown}: connection reset", "unreachable")
    if _cause(error, (http.client.RemoteDisconnected,)) is not None:
        return DownloadFailed(f"{target.shown}: the server closed the connection without an answer", "unreachable")
    if _cause(error, (urllib3.exceptions.ProxyError,)) is not None:
        return DownloadFailed(f"{target.shown}: the proxy failed", "unreachable")
    return DownloadFailed(f"{target.shown}: connection failed ({type(error).__name__})", "unreachable")

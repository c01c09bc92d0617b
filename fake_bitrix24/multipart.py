"""Streaming reading of an upload: the request body's framing and its multipart/form-data parts.

The upload URL of attachRecord takes recordings of hundreds of MB, so nothing here holds a body
in memory: the body is read in bounded pieces (Content-Length or chunked transfer coding), the
part boundaries are found by a scanner that keeps only a boundary's length of overlap between
pieces, and the file part's bytes are hashed as they pass.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message

READ_SIZE = 256 * 1024  # bytes read from the socket at a time
MAX_PART_HEADER_BYTES = 16 * 1024  # one part's header block
_MAX_CHUNK_LINE = 1024  # a chunk-size line of the chunked transfer coding
_MAX_TRAILER_LINES = 64
_MAX_PADDING = 1024  # whitespace allowed between a boundary and its line break

Sink = Callable[[memoryview], None]


class BodyError(Exception):
    """The body ends early or its framing is malformed; the connection cannot be reused."""


class MultipartError(Exception):
    """The body is not a well-formed multipart/form-data body."""


class BodyReader:
    """A request body in bounded pieces, framed by Content-Length or chunked transfer coding."""

    def __init__(
        self, stream: io.BufferedIOBase, length: int = 0, chunked: bool = False, read_size: int = READ_SIZE
    ) -> None:
        self._stream = stream
        self._chunked = chunked
        self._read_size = read_size
        self._remaining = 0 if chunked else max(0, length)  # of the body, or of the current chunk
        self._done = not chunked and self._remaining == 0
        self._broken = False
        self.received = 0

    @classmethod
    def from_headers(cls, stream: io.BufferedIOBase, headers: Message) -> BodyReader:
        """The body announced by ``Transfer-Encoding`` (chunked wins) or ``Content-Length``."""
        codings = [item.strip().lower() for item in headers.get("Transfer-Encoding", "").split(",") if item.strip()]
        if codings:
            if codings[-1] != "chunked":
                raise BodyError(f"unsupported Transfer-Encoding {', '.join(codings)!r}")
            return cls(stream, chunked=True)
        declared = headers.get("Content-Length")
        if declared is None:
            return cls(stream, 0)
        if not declared.strip().isdigit():
            raise BodyError(f"bad Content-Length {declared!r}")
        return cls(stream, int(declared))

    @property
    def exhausted(self) -> bool:
        """The whole body was read, so the connection can carry the next request."""
        return self._done and not self._broken

    def read(self) -> bytes:
        """The next piece of the body (at most ``read_size`` bytes); ``b""`` at its end."""
        if self._done:
            return b""
        try:
            if self._chunked and self._remaining == 0:
                self._remaining = self._next_chunk_size()
                if self._remaining == 0:
                    self._skip_trailers()
                    self._done = True
                    return b""
            data = self._stream.read(min(self._remaining, self._read_size))
            if not data:
                raise BodyError("the body ends before its declared length")
            self._remaining -= len(data)
            self.received += len(data)
            if self._remaining == 0:
                if self._chunked:
                    self._expect_line_break()
                else:
                    self._done = True
            return data
        except (BodyError, OSError) as error:
            self._broken = self._done = True
            raise BodyError(str(error)) from None

    def drain(self) -> None:
        """Read the rest of the body and drop it (then the answer can follow on this connection)."""
        while self.read():
            pass

    def _next_chunk_size(self) -> int:
        line = self._stream.readline(_MAX_CHUNK_LINE + 1)
        if not line.endswith(b"\n"):
            raise BodyError("a chunk-size line is cut short or too long")
        size = line.split(b";", 1)[0].strip()
        if not size or any(character not in b"0123456789abcdefABCDEF" for character in size):
            raise BodyError(f"bad chunk size {size[:16]!r}")
        return int(size, 16)

    def _expect_line_break(self) -> None:
        if self._stream.read(2) != b"\r\n":
            raise BodyError("a chunk does not end with CRLF")

    def _skip_trailers(self) -> None:
        for _ in range(_MAX_TRAILER_LINES):
            line = self._stream.readline(_MAX_CHUNK_LINE + 1)
            if not line.endswith(b"\n"):
                raise BodyError("the chunked body's trailer is cut short")
            if line in (b"\r\n", b"\n"):
                return
        raise BodyError("too many trailer lines")


@dataclass(frozen=True)
class ReceivedFile:
    """A file part of a multipart body: the name the client gave, its size and SHA-256 (hex)."""

    filename: str
    size: int
    sha256: str
    content_type: str | None


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; MultipartError for anything else."""
    header = Message()
    header["Content-Type"] = content_type
    if header.get_content_type() != "multipart/form-data":
        raise MultipartError(f"the body is {header.get_content_type()}, not multipart/form-data")
    boundary = header.get_boundary()
    if not boundary or len(boundary) > 70:
        raise MultipartError("the Content-Type has no usable boundary")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise MultipartError("the boundary is not ASCII") from None


def receive_file(body: BodyReader, content_type: str, field: str) -> ReceivedFile | None:
    """Read a multipart/form-data body to its end; the file part named ``field``, if there is one.

    As PHP fills ``$_FILES``: a part is a file when its Content-Disposition has a ``filename``,
    and of several such parts with one name the last wins. Other parts are read and dropped.
    """
    return _PartScanner(body, multipart_boundary(content_type)).find_file(field)


class _Hasher:
    """Counts and hashes a file part's bytes as they pass."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def take(self, piece: memoryview) -> None:
        self.digest.update(piece)
        self.size += len(piece)


class _PartScanner:
    """Walks the parts of a multipart body, keeping at most one read piece plus a boundary."""

    def __init__(self, body: BodyReader, boundary: bytes) -> None:
        self._body = body
        # Every delimiter, the first included, is then CRLF "--" boundary: the body may start
        # with its first delimiter, with no line break before it.
        self._buffer = bytearray(b"\r\n")
        self._delimiter = b"\r\n--" + boundary

    def find_file(self, field: str) -> ReceivedFile | None:
        found: ReceivedFile | None = None
        self._pass_part(None)  # the preamble
        while not self._at_closing_delimiter():
            name, filename, part_type = _disposition(self._part_headers())
            if name != field or filename is None:
                self._pass_part(None)
                continue
            hasher = _Hasher()
            self._pass_part(hasher.take)
            found = ReceivedFile(filename, hasher.size, hasher.digest.hexdigest(), part_type)
        self._buffer.clear()
        self._body.drain()  # the epilogue
        return found

    def _fill(self) -> None:
        piece = self._body.read()
        if not piece:
            raise MultipartError("the body ends before its closing boundary")
        self._buffer += piece

    def _pass_part(self, sink: Sink | None) -> None:
        """Feed the bytes up to the next delimiter to ``sink`` and step over the delimiter."""
        delimiter = self._delimiter
        keep = len(delimiter) - 1  # a delimiter may straddle two pieces
        while True:
            index = self._buffer.find(delimiter)
            if index >= 0:
                self._emit(sink, index)
                del self._buffer[: index + len(delimiter)]
                return
            if len(self._buffer) > keep:
                passed = len(self._buffer) - keep
                self._emit(sink, passed)
                del self._buffer[:passed]
            self._fill()

    def _emit(self, sink: Sink | None, length: int) -> None:
        if sink is None or length == 0:
            return
        with memoryview(self._buffer) as view, view[:length] as piece:
            sink(piece)

    def _at_closing_delimiter(self) -> bool:
        """After a delimiter: ``--`` ends the body; else optional padding and CRLF start a part."""
        while len(self._buffer) < 2:
            self._fill()
        if self._buffer.startswith(b"--"):
            return True
        while (line_end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > _MAX_PADDING:
                raise MultipartError("a boundary is followed by something other than a line break")
            self._fill()
        if self._buffer[:line_end].strip(b" \t"):
            raise MultipartError("a boundary is followed by something other than a line break")
        del self._buffer[: line_end + 2]
        return False

    def _part_headers(self) -> dict[str, str]:
        while len(self._buffer) < 2:
            self._fill()
        if self._buffer.startswith(b"\r\n"):  # a part without headers
            del self._buffer[:2]
            return {}
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_PART_HEADER_BYTES:
                raise MultipartError("a part's headers are too long")
            self._fill()
        block = bytes(self._buffer[:end]).decode("utf-8", errors="replace")
        del self._buffer[: end + 4]
        return _parse_headers(block)


def _parse_headers(block: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = ""
    for line in block.split("\r\n"):
        if line[:1] in (" ", "\t") and last:  # an obsolete folded line
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MultipartError(f"a part header line has no name: {line[:40]!r}")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers


def _disposition(headers: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    """(name, filename, Content-Type) of a part; filename None when the part is not a file."""
    disposition = headers.get("content-disposition")
    if disposition is None:
        return None, None, headers.get("content-type")
    parsed = Message()
    parsed["Content-Disposition"] = disposition
    return (
        _parameter(parsed, "name"),
        _parameter(parsed, "filename"),
        headers.get("content-type"),
    )


def _parameter(parsed: Message, name: str) -> str | None:
    value = parsed.get_param(name, header="content-disposition")
    if value is None:
        return None
    return email.utils.collapse_rfc2231_value(value)

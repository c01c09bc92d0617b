"""A corpus of hostile input (contract §12): values, bodies and raw HTTP requests a sender might make.

Three layers, from the inside out:
- `HOSTILE_VALUES`: JSON values to put in any field (numbers beyond every range, NUL, lone
  surrogates, ids one past each stored column, 1 MB strings); `hostile_texts()` are JSON texts
  that no `json.dumps` makes (`1e400`, `NaN`, a 5,000-digit integer, repeated keys, invalid
  UTF-8, lone surrogate escapes, deep nesting).
- `BODIES`: whole request bodies with their content types, for every hook, built from valid
  events with one field made hostile at a time.
- `RAW_REQUESTS`: bytes to write to a socket, for what only a real server sees: bad chunk sizes,
  a missing last chunk, a Content-Length larger than the body, a very long Content-Type, many
  query fields.
Column lengths are read from `b24scribe/models.py`, so the corpus follows the schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from sqlalchemy import String

from b24scribe.models import Base
from tests.conftest import INBOUND_TOKEN

MEGABYTE = 1024 * 1024


def column_lengths() -> dict[str, int]:
    """`table.column` → declared length, for every String column of the models."""
    return {
        f"{table.name}.{column.name}": column.type.length
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type, String) and column.type.length
    }


def past_every_column() -> list[str]:
    """An id one character past each distinct column length (and a few far past)."""
    lengths = sorted(set(column_lengths().values()))
    return ["7" * (length + 1) for length in lengths] + ["x" * 1000, "y" * 65_536]


HOSTILE_NUMBERS: list[Any] = [
    -1,
    0,
    2**31,
    2**63,
    2**64,
    -(2**63) - 1,
    10**40,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    float("inf"),
    float("-inf"),
    float("nan"),
    True,
    False,
]
HOSTILE_STRINGS: list[str] = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",  # a lone surrogate: json.dumps writes it as the escape "\ud800"
    "x\udfffy",
    "\u202e\u0007\x1b[31m",  # bidi override, BEL, an ANSI escape
    "\t\r\n",
    "../../etc/passwd",
    "%00%2e%2e%2f",
    "'; DROP TABLE call; --",
    "😀" * 40,
    "\ufeff",
    "NaN",
    "1e400",
    "-1",
    "2026-13-45T25:61:61+99:99",
    "9" * 5000,
    "A" * MEGABYTE,
    *past_every_column(),
]
HOSTILE_VALUES: list[Any] = [
    *HOSTILE_NUMBERS,
    *HOSTILE_STRINGS,
    None,
    [],
    {},
    [None],
    {"": None},
    [[[[[[[[[[]]]]]]]]]],
]


def hostile_texts() -> dict[str, bytes]:
    """JSON texts that the standard encoder never writes, by name (each is a whole body)."""
    deep = 100_000
    return {
        "1e400": b'{"value": 1e400}',
        "-1e400": b'{"value": -1e400}',
        "NaN": b'{"value": NaN}',
        "Infinity": b'{"value": Infinity}',
        "5000-digit int": b'{"value": ' + b"9" * 5000 + b"}",
        "5000-digit negative int": b'{"value": -' + b"9" * 5000 + b"}",
        "lone surrogate escape": b'{"value": "\\ud800"}',
        "reversed surrogate pair": b'{"value": "\\udc00\\ud800"}',
        "NUL escape": b'{"value": "a\\u0000b"}',
        "raw NUL": b'{"value": "a\x00b"}',
        "invalid UTF-8": b'{"value": "\xff\xfe\xc0\xaf"}',
        "overlong UTF-8": b'{"value": "\xc0\xaf"}',
        "UTF-8 BOM": b'\xef\xbb\xbf{"value": 1}',
        "UTF-16": '{"value": 1}'.encode("utf-16"),
        "deep arrays": b'{"value": ' + b"[" * deep + b"]" * deep + b"}",
        "deep objects": b'{"value": ' + b'{"a":' * deep + b"1" + b"}" * deep + b"}",
        "unclosed deep": b"[" * deep,
        "trailing garbage": b'{"value": 1} {"value": 2}',
        "empty": b"",
        "whitespace": b" \n\t ",
        "null": b"null",
        "array": b"[]",
        "string": b'"x"',
        "number": b"1",
        "binary": bytes(range(256)),
    }


# Valid events each hook accepts, to be made hostile one field at a time.
CALL_ID = "fuzz.1700000000.1"
GENERIC_EVENT: dict[str, Any] = {
    "event": "call.finished",
    "call_id": CALL_ID,
    "direction": "inbound",
    "from": "+15551234567",
    "to": "101",
    "extension": "101",
    "user_id": 1,  # a user of the fake Bitrix24 (fake_bitrix24/), so real delivery can register it
    "started_at": "2026-11-25T10:20:30+01:00",
    "duration": 73,
    "status": "answered",
    "recording_url": "https://pbx.example/rec/1.wav",
    "line": "+15550000000",
}
GENERIC_TRANSCRIPT: dict[str, Any] = {
    "segments": [
        {"start": 0.4, "end": 2.9, "text": "Good afternoon", "channel": 0},
        {"start": 3.2, "end": 6.0, "text": "Hello", "speaker": "B"},
        {"start": 6.5, "end": 7.0, "text": "Thanks", "side": "Client"},
    ],
    "cost": 0.12,
    "cost_currency": "USD",
}
TRANSCRIPT_QUERY = {"pbx": "generic", "call": CALL_ID}


@dataclass(frozen=True)
class Body:
    """One hostile request to a hook: where, what, with which content type and query."""

    name: str
    path: str
    body: bytes
    content_type: str
    query: tuple[tuple[str, str], ...] = (("pbx", "generic"), ("call", CALL_ID))
    # one cell of a field × hostile value matrix (a sample of them is enough for CI); the rest is always run
    matrix: bool = False


def _with_value(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    copy: Any = json.loads(json.dumps(document))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    result: dict[str, Any] = copy
    return result


def _dumps(value: Any) -> bytes:
    # allow_nan writes NaN/Infinity; surrogates are escaped (ensure_ascii), so the bytes are ASCII
    return json.dumps(value, allow_nan=True).encode()


def _form(fields: dict[str, Any]) -> bytes:
    return urlencode(
        {key: str(value) for key, value in fields.items()}, encoding="utf-8", errors="surrogatepass"
    ).encode()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}…[{len(text)}]"


def bodies(include_huge: bool = True) -> Iterator[Body]:
    """Every hostile hook body of the corpus (`include_huge=False` leaves out the megabyte ones)."""
    values = [v for v in HOSTILE_VALUES if include_huge or not (isinstance(v, str) and len(v) > 70_000)]
    pbx = "/hooks/pbx/generic"
    asterisk = "/hooks/pbx/asterisk"
    stt = "/hooks/stt/generic"
    json_type, form_type = "application/json", "application/x-www-form-urlencoded"
    # one field of a valid event made hostile
    for key in GENERIC_EVENT:
        for value in values:
            document = _dumps(_with_value(GENERIC_EVENT, (key,), value))
            yield Body(f"pbx {key}={_short(value)}", pbx, document, json_type, matrix=True)
            if not isinstance(value, list | dict):
                form = _form(_with_value(GENERIC_EVENT, (key,), value))
                yield Body(f"asterisk {key}={_short(value)}", asterisk, form, form_type, matrix=True)
    for path in (
        ("segments", 0, "start"),
        ("segments", 0, "end"),
        ("segments", 0, "text"),
        ("segments", 0, "channel"),
        ("segments", 1, "speaker"),
        ("segments", 2, "side"),
        ("cost",),
        ("cost_currency",),
        ("segments",),
    ):
        for value in values:
            name = f"stt {'.'.join(map(str, path))}={_short(value)}"
            yield Body(
                name,
                stt,
                _dumps(_with_value(GENERIC_TRANSCRIPT, path, value)),
                json_type,
                (("pbx", "generic"), ("call", f"c{len(name)}")),
                matrix=True,
            )
    # texts no encoder writes, as the value of a field and as the whole body
    for name, text in hostile_texts().items():
        yield Body(f"pbx body {name}", pbx, text, json_type)
        yield Body(f"stt body {name}", stt, text, json_type)
        yield Body(f"asterisk body {name}", asterisk, text, form_type)
    for name, text in hostile_texts().items():
        if text.startswith(b'{"value": ') and text.endswith(b"}"):
            inner = text[len(b'{"value": ') : -1]
            yield Body(
                f"pbx user_id={name}", pbx, _dumps(GENERIC_EVENT)[:-1] + b', "user_id": ' + inner + b"}", json_type
            )
            event = _dumps({k: v for k, v in GENERIC_EVENT.items() if k != "duration"})
            yield Body(f"pbx duration={name}", pbx, event[:-1] + b', "duration": ' + inner + b"}", json_type)
            segment = b'{"segments": [{"start": ' + inner + b', "end": 2, "text": "hi", "channel": 0}]}'
            yield Body(f"stt start={name}", stt, segment, json_type)
            segment = b'{"segments": [{"start": 0, "end": 2, "text": ' + inner + b', "channel": 0}]}'
            yield Body(f"stt text={name}", stt, segment, json_type)
    # repeated keys: which one wins must not matter for safety
    repeated = b'{"event": "call.finished", "call_id": "a", "call_id": "' + b"b" * 300 + b'", "started_at": 1700000000}'
    yield Body("pbx repeated call_id", pbx, repeated, json_type)
    yield Body("asterisk repeated call_id", asterisk, b"event=finished&call_id=a&call_id=" + b"b" * 300, form_type)
    yield Body("asterisk repeated event", asterisk, b"event=finished&event=bogus&call_id=rep-1", form_type)
    # wrong content types for the right bytes, and the right type for the wrong bytes
    for content_type in (
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
        "",
        "application/json; charset=latin-1",
        form_type,
        "application/json" + "; x=y" * 2000,
    ):
        yield Body(f"pbx json as {content_type[:40]!r}", pbx, _dumps(GENERIC_EVENT), content_type)
        yield Body(f"stt json as {content_type[:40]!r}", stt, _dumps(GENERIC_TRANSCRIPT), content_type)
        yield Body(f"asterisk form as {content_type[:40]!r}", asterisk, _form(GENERIC_EVENT), content_type)
    yield Body("asterisk latin-1 form", asterisk, "event=finished&call_id=caf\xe9".encode("latin-1"), form_type)
    yield Body("asterisk %-escaped invalid UTF-8", asterisk, b"event=finished&call_id=%ff%fe", form_type)
    yield Body("asterisk %-escaped NUL", asterisk, b"event=finished&call_id=a%00b", form_type)
    # query-only asterisk (no body): every field in the URL
    for key in GENERIC_EVENT:
        for value in values:
            if isinstance(value, list | dict) or (isinstance(value, str) and len(value) > 8000):
                continue
            query = tuple((k, str(v)) for k, v in _with_value(GENERIC_EVENT, (key,), value).items())
            yield Body(f"asterisk query {key}={_short(value)}", asterisk, b"", "", query, matrix=True)
    # transcript references past their columns, and bad per-URL options
    for value in [*past_every_column()[:6], "\x00", "\ud800", "a b", "", "ünï", "../x"]:
        for name in ("call", "pbx", "b24_call_id", "portal", "channel", "channel0", "first_speaker", "direction"):
            query = (("pbx", "generic"), ("call", CALL_ID))
            query = tuple((k, v) for k, v in query if k != name) + ((name, value),)
            yield Body(f"stt ?{name}={_short(value)}", stt, _dumps(GENERIC_TRANSCRIPT), json_type, query)
    yield Body("stt unknown pbx", stt, _dumps(GENERIC_TRANSCRIPT), json_type, (("pbx", "no-such-pbx"), ("call", "x1")))
    # a call id with surrounding spaces: the transcript and the PBX's events must still meet
    for pbx_name in ("generic", "asterisk"):
        query = (("pbx", pbx_name), ("call", f" spaced-{pbx_name} "))
        yield Body(f"stt {pbx_name} call id with spaces", stt, _dumps(GENERIC_TRANSCRIPT), json_type, query)
    many = tuple((f"f{i}", "v") for i in range(5000)) + (("pbx", "generic"), ("call", CALL_ID))
    yield Body("stt 5000 query fields", stt, _dumps(GENERIC_TRANSCRIPT), json_type, many)
    # a megabyte where a few bytes are expected
    if include_huge:
        yield Body("pbx 1 MB body", pbx, _dumps({**GENERIC_EVENT, "line": "9" * MEGABYTE}), json_type)
        yield Body(
            "stt 1 MB segment",
            stt,
            _dumps(_with_value(GENERIC_TRANSCRIPT, ("segments", 0, "text"), "word " * (MEGABYTE // 5))),
            json_type,
        )


# --- raw HTTP requests, for a real server -------------------------------------------------------


@dataclass(frozen=True)
class RawRequest:
    """Bytes for a socket. `half_close`: shut the write side after sending (the body never completes)."""

    name: str
    data: bytes
    half_close: bool = True


def _request(path: str, headers: dict[str, str], body: bytes = b"", method: str = "POST") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


def raw_requests() -> list[RawRequest]:
    """HTTP-level hostile requests, each to a hook with valid credentials."""
    token = f"Bearer {INBOUND_TOKEN}"
    event = json.dumps({**GENERIC_EVENT, "call_id": "raw-http-1"}).encode()
    pbx = "/hooks/pbx/generic"
    stt = "/hooks/stt/generic?pbx=generic&call=raw-http-1"
    base = {"Authorization": token, "Content-Type": "application/json"}
    chunked = {**base, "Transfer-Encoding": "chunked"}
    many = "&".join(f"f{i}=v" for i in range(10_000))  # over gunicorn's request line limit: its 414
    few = "&".join(["a="] * 1000)  # under it: the app sees a thousand fields
    return [
        RawRequest("chunked: bad chunk size", _request(pbx, chunked, b"zz\r\n" + event + b"\r\n0\r\n\r\n")),
        RawRequest("chunked: negative chunk size", _request(pbx, chunked, b"-5\r\n" + event + b"\r\n0\r\n\r\n")),
        RawRequest("chunked: huge chunk size", _request(pbx, chunked, b"ffffffffffffffffffff\r\n" + event)),
        RawRequest(
            "chunked: size larger than the data",
            _request(pbx, chunked, f"{len(event) + 50:x}\r\n".encode() + event + b"\r\n0\r\n\r\n"),
        ),
        RawRequest(
            "chunked: missing last chunk", _request(pbx, chunked, f"{len(event):x}\r\n".encode() + event + b"\r\n")
        ),
        RawRequest(
            "chunked: no CRLF after data", _request(pbx, chunked, f"{len(event):x}\r\n".encode() + event + b"0\r\n\r\n")
        ),
        RawRequest(
            "chunked: chunk extension junk",
            _request(pbx, chunked, f"{len(event):x};".encode() + b"x" * 5000 + b"\r\n" + event + b"\r\n0\r\n\r\n"),
        ),
        RawRequest(
            "chunked and Content-Length",
            _request(
                pbx, {**chunked, "Content-Length": "5"}, f"{len(event):x}\r\n".encode() + event + b"\r\n0\r\n\r\n"
            ),
        ),
        RawRequest(
            "Content-Length larger than the body",
            _request(pbx, {**base, "Content-Length": str(len(event) + 100)}, event),
        ),
        RawRequest("Content-Length over the limit", _request(stt, {**base, "Content-Length": str(10**12)}, b"{}")),
        RawRequest("Content-Length negative", _request(pbx, {**base, "Content-Length": "-1"}, event)),
        RawRequest("Content-Length not a number", _request(pbx, {**base, "Content-Length": "12abc"}, event)),
        RawRequest(
            "Content-Length twice, different",
            _request(pbx, {**base, "Content-Length": str(len(event))}, event).replace(
                b"Content-Length", b"Content-Length: 3\r\nContent-Length", 1
            ),
        ),
        RawRequest("Content-Length 2**64", _request(pbx, {**base, "Content-Length": str(2**64)}, event)),
        RawRequest(
            "very long Content-Type",
            _request(
                pbx,
                {**base, "Content-Type": "application/json; " + "p=v; " * 1600, "Content-Length": str(len(event))},
                event,
            ),
        ),
        RawRequest(
            "Content-Type with NUL",
            _request(pbx, {**base, "Content-Type": "application/json\x00x", "Content-Length": str(len(event))}, event),
        ),
        RawRequest(
            "Content-Type latin-1",
            _request(
                pbx, {**base, "Content-Type": "application/json; x=\xe9\xff", "Content-Length": str(len(event))}, event
            ),
        ),
        RawRequest("1,000 query fields", _request(f"{pbx}?{few}", {**base, "Content-Length": str(len(event))}, event)),
        RawRequest(
            "1,000 query fields on a transcript", _request(f"{stt}&{few}", {**base, "Content-Length": "2"}, b"{}")
        ),
        RawRequest(
            "10,000 query fields", _request(f"{pbx}?{many}", {**base, "Content-Length": str(len(event))}, event)
        ),
        RawRequest(
            "10,000 query fields on a transcript", _request(f"{stt}&{many}", {**base, "Content-Length": "2"}, b"{}")
        ),
        RawRequest(
            "query with invalid UTF-8",
            _request(stt.replace("raw-http-1", "%ff%fe%00"), {**base, "Content-Length": "2"}, b"{}"),
        ),
        RawRequest("path with invalid UTF-8", _request("/hooks/stt/%ff%fe", {**base, "Content-Length": "2"}, b"{}")),
        RawRequest("path with NUL", _request("/hooks/pbx/gen%00eric", {**base, "Content-Length": "2"}, b"{}")),
        RawRequest(
            "a hook with a stray slash", _request(pbx + "/", {**base, "Content-Length": str(len(event))}, event)
        ),
        RawRequest(
            "8 KB Authorization",
            _request(pbx, {**base, "Authorization": "Bearer " + "t" * 8000, "Content-Length": str(len(event))}, event),
        ),
        RawRequest(
            "token in a 7 KB query",
            _request(
                f"{pbx}?token={quote(INBOUND_TOKEN)}&" + "a=" + "b" * 7000,
                {"Content-Type": "application/json", "Content-Length": str(len(event))},
                event,
            ),
        ),
        RawRequest("request line with no version", f"POST {pbx}\r\n\r\n".encode()),
        RawRequest("HTTP/0.9 style", f"GET {pbx}\r\n".encode()),
        RawRequest("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64))),
        RawRequest("header without colon", _request(pbx, base, b"").replace(b"Connection: close", b"Connection close")),
        RawRequest(
            "header with obs-fold",
            _request(pbx, {**base, "Content-Length": str(len(event))}, event).replace(
                b"Content-Type: application/json", b"Content-Type: application/json\r\n folded"
            ),
        ),
        RawRequest(
            "expect 100-continue, never sent",
            _request(pbx, {**base, "Expect": "100-continue", "Content-Length": str(len(event))}),
        ),
        RawRequest(
            "chunked transcript of 1 MB",
            _request(
                stt,
                chunked,
                b"".join(
                    f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
                    for piece in [
                        json.dumps(
                            {"segments": [{"start": 0, "end": 1, "text": "w " * (MEGABYTE // 2), "channel": 0}]}
                        ).encode()
                    ]
                )
                + b"0\r\n\r\n",
            ),
        ),
    ]

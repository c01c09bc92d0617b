"""Hostile input at the parsing layer (contract §12): whatever an authenticated sender posts, each parser
gives a result that can be stored and folded, or a ValidationError naming the field (a 422, kept as a
rejected event). Never another exception, never a 2xx for an event that can then never be processed."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError
from sqlalchemy import select

from b24scribe.db import Database
from b24scribe.events import CallEvent, RawEvent, bounded_key, call_event_key, storable_error, transcript_key
from b24scribe.limits import (
    MAX_CHANNEL,
    MAX_DURATION,
    MAX_ID_LENGTH,
    MAX_SECONDS,
    MAX_USER_ID,
    check_call_event,
    checked_vendor_result,
    has_unstorable,
)
from b24scribe.models import Call, InboundEvent, TranscriptPart
from b24scribe.parsing import parse_call_event, parse_transcript
from b24scribe.transcript import VendorResult
from b24scribe.worker import Worker
from schemas.registry import PBX_SOURCES as PBX_PARSERS
from schemas.registry import SOURCES, STT_VENDORS
from tests.conftest import admin, auth, sign_standard_webhook
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_pbx_flow import FINISHED

FIXTURES = Path(__file__).resolve().parent / "fixtures"
QUERY = {"pbx": "asterisk", "call": "1700000000.123"}
HOSTILE_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

# Raw JSON values no well-behaved sender writes, each exactly as it would sit in a body.
HOSTILE_JSON: list[bytes] = [
    b'"\\u0000"',
    b'"a\\u0000b"',
    b'"\\ud800"',  # a lone surrogate, as an escape
    b'"x\\udfff"',
    b'"\xed\xa0\x80"',  # the same, UTF-8-encoded (json.loads lets it through)
    b'"\xff\xfe"',  # not UTF-8
    b'"\x7f\xc2\x85\xc2\x9f"',  # DEL and C1 controls, raw
    b"1e400",
    b"-1e400",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    str(2**64).encode(),
    str(-(2**63) - 1).encode(),
    b"1" + b"0" * 5000,  # past Python's int() digit limit
    b'"' + b"9" * 5000 + b'"',
    b'"channel_' + b"9" * 5000 + b'"',
    b'"Channel 40"',
    b'"inf"',
    b'"nan"',
    b'"1e400"',
    b'"' + b"x" * 1_000_000 + b'"',  # 1 MB
    b"[" * 50_000 + b"]" * 50_000,  # deep nesting
    b'{"a": 1, "a": [2]}',
    b"{}",
    b"[]",
    b"null",
    b"true",
    b'""',
    b"-1",
    b"0.5",
]
HOSTILE_QUERY_VALUES = ["\x00", "a\x00", "\ud800", "\x1b[31m", "x" * 300, "²", "1e400", "-1", "", " "]
QUERY_NAMES = [
    "call",
    "pbx",
    "b24_call_id",
    "channel",
    "id",
    "status",
    "speaker_channels_count",
    "channel0",
    "direction",
]
_PLACEHOLDER = "@@hostile@@"


def fixture_bodies() -> list[tuple[str, Any]]:
    """(vendor, decoded fixture) for every vendor fixture, and the generic formats' typical bodies."""
    bodies = [
        (path.parent.name, json.loads(path.read_bytes()))
        for path in sorted(FIXTURES.glob("*/*.json"))
        if path.parent.name in STT_VENDORS  # a PBX's fixtures (tests/fixtures/<pbx>/) are not transcripts
    ]
    generic = {
        "segments": [{"start": 0.5, "end": 2.2, "text": "Hello", "channel": 0}, {"start": 3, "end": 4, "text": "Hi"}],
        "cost": 0.1,
        "cost_currency": "USD",
        "job_id": "job-1",
    }
    return [*bodies, ("generic", generic)]


FIXTURE_BODIES = fixture_bodies()


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node[:3]):
            yield from _paths(value, (*path, index))


@st.composite
def mutated(draw: st.DrawFn, document: Any) -> bytes:
    """The document with one value (or the whole) replaced by a hostile raw JSON value, or one key
    repeated with a hostile value before its own, or a hostile key added."""
    document = copy.deepcopy(document)
    path = draw(st.sampled_from(list(_paths(document))))
    hostile = draw(st.sampled_from(HOSTILE_JSON))
    how = draw(st.sampled_from(["replace", "repeat", "key"]))
    marker = json.dumps(_PLACEHOLDER).encode()
    if not path:
        return hostile
    *parents, last = path
    parent = document
    for step in parents:
        parent = parent[step]
    if how == "replace" or not isinstance(parent, dict):
        parent[last] = _PLACEHOLDER
        return json.dumps(document, ensure_ascii=draw(st.booleans())).encode().replace(marker, hostile)
    if how == "repeat":  # the same key twice: the hostile value first, then its own (the last wins)
        original = json.dumps(parent[last]).encode()
        parent[last] = _PLACEHOLDER
        repeated = hostile + b", " + json.dumps(last).encode() + b": " + original
        return json.dumps(document).encode().replace(marker, repeated)
    parent["\ud800\x00" + str(last)] = _PLACEHOLDER
    return json.dumps(document).encode().replace(marker, hostile)


def strings_in(value: Any) -> Iterator[Any]:
    """Every leaf of a parse result (dataclasses, lists and dicts walked)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from strings_in(getattr(value, item.name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(key)
            yield from strings_in(item)
    else:
        yield value


def assert_parsed_or_named(parse: Callable[[], Any]) -> None:
    """The parser either returns something storable, or raises a ValidationError naming a field."""
    try:
        result = parse()
    except ValidationError as error:
        assert isinstance(error.messages, dict) and error.messages, error.messages
        return
    for leaf in strings_in(result):
        if isinstance(leaf, str):
            assert not has_unstorable(leaf), repr(leaf[:80])
            leaf.encode()  # what the worker's transcript digest does
        elif isinstance(leaf, float):
            assert math.isfinite(leaf)
        elif isinstance(leaf, int) and not isinstance(leaf, bool):
            assert -1 <= leaf <= MAX_USER_ID
    json.dumps(dataclasses.asdict(result), ensure_ascii=False, default=str).encode()
    # what the backstops check holds too (the generic PBX event does not pass through one)
    if isinstance(result, CallEvent):
        assert check_call_event(result) is result
    else:
        vendor_result = result if isinstance(result, VendorResult) else result.result
        assert checked_vendor_result(vendor_result) is vendor_result


def parse_stt(vendor: str, body: bytes, query: Mapping[str, str]) -> Callable[[], Any]:
    return lambda: parse_transcript(SOURCES, vendor, body, query)


def fetch_parsers() -> list[tuple[str, Callable[[bytes, Mapping[str, str]], VendorResult]]]:
    # the one-GET fetches' parsers (a vendor's own multi-step fetch is tested with its fake API)
    return [
        (name, vendor.fetch.parse)
        for name, vendor in STT_VENDORS.items()
        if vendor.fetch is not None and vendor.fetch.parse is not None
    ]


# --- every registered parser, any input ----------------------------------------------------------------


@HOSTILE_SETTINGS
@given(vendor=st.sampled_from(sorted(STT_VENDORS)), body=st.binary(max_size=300))
def test_any_bytes_to_any_vendor_are_parsed_or_named(vendor: str, body: bytes) -> None:
    assert_parsed_or_named(parse_stt(vendor, body, QUERY))


def _hostile_text() -> st.SearchStrategy[str]:
    # st.text() never draws surrogates or many controls: mix them in on purpose
    return st.text(
        st.one_of(
            st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.sampled_from("\x00\x1f\x85")
        ),
        max_size=8,
    )


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | _hostile_text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_hostile_text(), children, max_size=3),
    max_leaves=12,
)


@HOSTILE_SETTINGS
@given(vendor=st.sampled_from(sorted(STT_VENDORS)), document=JSON_VALUES)
def test_any_json_to_any_vendor_is_parsed_or_named(vendor: str, document: Any) -> None:
    body = json.dumps(document).encode()  # NaN, Infinity and surrogate escapes included
    assert_parsed_or_named(parse_stt(vendor, body, QUERY))


@HOSTILE_SETTINGS
@given(data=st.data(), which=st.sampled_from(FIXTURE_BODIES), status=st.sampled_from(["success", "error"]))
def test_hostile_mutations_of_every_vendor_fixture_are_parsed_or_named(
    data: st.DataObject, which: tuple[str, Any], status: str
) -> None:
    vendor, document = which
    body = data.draw(mutated(document))
    assert_parsed_or_named(parse_stt(vendor, body, {**QUERY, "status": status}))
    for name, parse in fetch_parsers():
        if name == vendor:
            assert_parsed_or_named(lambda parse=parse: parse(body, QUERY))  # type: ignore[misc]


HOSTILE_STRINGS = [b'"a\\u0000b"', b'"\\ud800"', b'"\xed\xa0\x80"', b'"\x7f\xc2\x85\\u001b"', b'"\xff"']


def _string_leaves(document: Any) -> list[tuple[Any, ...]]:
    def value_at(path: tuple[Any, ...]) -> Any:
        node = document
        for step in path:
            node = node[step]
        return node

    return [path for path in _paths(document) if path and isinstance(value_at(path), str)]


@pytest.mark.parametrize(
    ("vendor", "document"), FIXTURE_BODIES, ids=[f"{v}-{i}" for i, (v, _) in enumerate(FIXTURE_BODIES)]
)
def test_every_string_of_every_fixture_made_hostile_is_parsed_or_named(vendor: str, document: Any) -> None:
    """Each string value in turn (text, ids, labels, speakers…) holds NUL, a lone surrogate, controls, bad UTF-8."""
    marker = json.dumps(_PLACEHOLDER).encode()
    for path in _string_leaves(document):
        changed = copy.deepcopy(document)
        parent = changed
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = _PLACEHOLDER
        encoded = json.dumps(changed).encode()
        for hostile in HOSTILE_STRINGS:
            body = encoded.replace(marker, hostile)
            for status in ("success", "error"):
                assert_parsed_or_named(parse_stt(vendor, body, {**QUERY, "status": status}))


@HOSTILE_SETTINGS
@given(
    vendor=st.sampled_from(sorted(STT_VENDORS)),
    name=st.sampled_from(QUERY_NAMES),
    value=st.sampled_from(HOSTILE_QUERY_VALUES),
)
def test_hostile_callback_urls_are_parsed_or_named(vendor: str, name: str, value: str) -> None:
    body = json.dumps(dict(FIXTURE_BODIES)[vendor]).encode()
    assert_parsed_or_named(parse_stt(vendor, body, {**QUERY, name: value}))


PBX_DOCUMENT = {**FINISHED, "user_id": 7}


@HOSTILE_SETTINGS
@given(pbx=st.sampled_from(sorted(PBX_PARSERS)), body=st.binary(max_size=300))
def test_any_bytes_to_any_pbx_parser_are_parsed_or_named(pbx: str, body: bytes) -> None:
    assert_parsed_or_named(lambda: parse_call_event(SOURCES, pbx, body, {}))


@HOSTILE_SETTINGS
@given(pbx=st.sampled_from(sorted(PBX_PARSERS)), document=JSON_VALUES)
def test_any_json_to_any_pbx_parser_is_parsed_or_named(pbx: str, document: Any) -> None:
    body = json.dumps(document).encode()
    assert_parsed_or_named(lambda: parse_call_event(SOURCES, pbx, body, {}))


@HOSTILE_SETTINGS
@given(data=st.data())
def test_hostile_mutations_of_a_generic_pbx_event_are_parsed_or_named(data: st.DataObject) -> None:
    body = data.draw(mutated(PBX_DOCUMENT))
    assert_parsed_or_named(lambda: parse_call_event(SOURCES, "generic", body, {}))


FORM_VALUES = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", "1e400", "9" * 5000, "%00", "%ED%A0%80", "%FF", "x" * 100_000, "PJSIP/%00"]),
    _hostile_text(),
)


@HOSTILE_SETTINGS
@given(name=st.sampled_from(sorted(PBX_DOCUMENT)), value=FORM_VALUES, in_query=st.booleans())
def test_hostile_asterisk_form_fields_are_parsed_or_named(name: str, value: str, in_query: bool) -> None:
    form = {key: str(item) for key, item in PBX_DOCUMENT.items()}
    form[name] = value
    if in_query:
        assert_parsed_or_named(lambda: parse_call_event(SOURCES, "asterisk", b"", form))
    else:
        body = "&".join(
            f"{key}={item if '%' in item else quote(item, safe='', errors='surrogatepass')}"
            for key, item in form.items()
        )
        assert_parsed_or_named(lambda: parse_call_event(SOURCES, "asterisk", body.encode("utf-8", "surrogatepass"), {}))


# --- the cases the review found, through the hooks ----------------------------------------------------


def stored_event(db: Database, event_id: int) -> InboundEvent:
    with db.read() as session:
        event = session.get_one(InboundEvent, event_id)
        session.expunge(event)
        return event


def rejected(client: FlaskClient, db: Database, url: str, body: bytes, content_type: str) -> dict[str, Any]:
    """Post the body, expect a 422, and check it was kept as a rejected event; the error's fields."""
    response = client.post(url, data=body, headers={**auth(), "Content-Type": content_type})
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.json is not None
    fields: dict[str, Any] = response.json["error"]["fields"]
    assert "cannot read" not in json.dumps(fields)  # a parser's own answer, not the hook's safety net for a crash
    assert stored_event(db, fields["event_id"]).state == "rejected"
    return fields


@pytest.fixture
def database(app: Flask) -> Database:
    db: Database = app.extensions["b24scribe.db"]
    return db


GENERIC_STT = "/hooks/stt/generic?pbx=generic&call=1700000000.123"
TRANSCRIPT = {"segments": [{"start": 0, "end": 1, "text": "Hello", "side": "User"}]}


def test_invalid_utf8_inside_a_generic_transcript_string_is_a_422_kept_for_replay(
    client: FlaskClient, database: Database
) -> None:
    body = b'{"segments": [{"start": 0, "end": 1, "text": "caf\xe9", "side": "User"}]}'
    fields = rejected(client, database, GENERIC_STT, body, "application/json")
    assert "_schema" in fields


def test_invalid_utf8_inside_a_generic_pbx_event_is_a_422_kept_for_replay(
    client: FlaskClient, database: Database
) -> None:
    body = b'{"event": "call.started", "call_id": "1700000000.\xff"}'
    rejected(client, database, "/hooks/pbx/generic", body, "application/json")


@pytest.mark.parametrize(
    ("field", "value"),
    [("call_id", "\\ud800"), ("call_id", "a\\u0000b"), ("from", "+1555\\u0000"), ("extension", "10\\u001b1")],
)
def test_a_lone_surrogate_or_control_character_in_a_pbx_field_is_a_422_naming_it(
    client: FlaskClient, database: Database, field: str, value: str
) -> None:
    body = ('{"event": "call.started", "call_id": "c-1", "%s": "%s"}' % (field, value)).encode()  # noqa: UP031
    assert field in rejected(client, database, "/hooks/pbx/generic", body, "application/json")


def test_a_speechmatics_channel_label_of_5000_digits_is_a_422_naming_it(
    client: FlaskClient, database: Database
) -> None:
    document = json.loads((FIXTURES / "speechmatics" / "channel_diarization.json").read_bytes())
    label = "channel_" + "9" * 5000
    for item in document["results"]:
        item["channel"] = label
    fields = rejected(
        client,
        database,
        "/hooks/stt/speechmatics?pbx=asterisk&call=1",
        json.dumps(document).encode(),
        "application/json",
    )
    assert "channel" in json.dumps(fields["results"])


@pytest.mark.parametrize("duration", ["inf", "-inf", "nan", "1e400", "604801"])
def test_an_asterisk_duration_out_of_range_is_a_422_naming_it(
    client: FlaskClient, database: Database, duration: str
) -> None:
    body = urlencode({"event": "finished", "call_id": "1700000000.9", "duration": duration}).encode()
    assert "duration" in rejected(client, database, "/hooks/pbx/asterisk", body, "application/x-www-form-urlencoded")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("pbx=asterisk&call=" + "x" * (MAX_ID_LENGTH + 1), "call"),
        ("pbx=asterisk&call=a%00b", "call"),
        ("pbx=" + "p" * 33 + "&call=1", "pbx"),
        ("b24_call_id=" + "B" * (MAX_ID_LENGTH + 1), "b24_call_id"),
        ("b24_call_id=ext%0A1", "b24_call_id"),
    ],
)
def test_a_call_named_in_the_url_that_no_column_can_hold_is_a_422_naming_it(
    client: FlaskClient, database: Database, query: str, field: str
) -> None:
    body = json.dumps({"segments": [{"start": 0, "end": 1, "text": "Hello", "side": "User"}]}).encode()
    assert field in rejected(client, database, f"/hooks/stt/generic?{query}", body, "application/json")


def test_an_unknown_field_named_with_a_surrogate_and_nul_is_kept_as_a_rejected_event(
    client: FlaskClient, database: Database
) -> None:
    body = b'{"event": "call.started", "call_id": "c-2", "\\ud800\\u0000": 1}'
    rejected(client, database, "/hooks/pbx/generic", body, "application/json")
    assert storable_error({"\ud800\x00": ["x\x00"]}) == {"\ufffd\ufffd": ["x\ufffd"]}


def test_text_with_control_characters_and_a_lone_surrogate_is_delivered_cleaned(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, database: Database
) -> None:
    body = (
        b'{"segments": [{"start": 0, "end": 1, "text": "Good\\u0000morning\\u001b \\ud83d", "side": "User"},'
        b' {"start": 1, "end": 2, "text": "Hi\\u0085there\\u0007", "side": "Client"}]}'
    )
    finished = client.post("/hooks/pbx/generic", json=FINISHED, headers=auth())
    assert finished.status_code == 202
    response = client.post(GENERIC_STT, data=body, headers={**auth(), "Content-Type": "application/json"})
    assert response.status_code == 202, response.get_data(as_text=True)
    worker.drain()
    [attach] = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    texts = [message["MESSAGE"] for message in attach.params["MESSAGES"]]
    assert texts == ["Good morning \ufffd", "Hi there"]


# --- field limits equal the columns ------------------------------------------------------------------


def _column_length(column: Any) -> int:
    length: int = column.type.length
    return length


# (field, the longest accepted value, one past it, the Call column it lands in)
PBX_LIMITS: list[tuple[str, Any, Any, str]] = [
    ("call_id", "c" * _column_length(Call.__table__.c.pbx_call_id), "c" * (MAX_ID_LENGTH + 1), "pbx_call_id"),
    ("from", "1" * _column_length(Call.__table__.c.from_number), "1" * 65, "from_number"),
    ("to", "2" * _column_length(Call.__table__.c.to_number), "2" * 65, "to_number"),
    ("extension", "3" * _column_length(Call.__table__.c.extension), "3" * 65, "extension"),
    ("line", "4" * _column_length(Call.__table__.c.line), "4" * 65, "line"),
    ("user_id", MAX_USER_ID, MAX_USER_ID + 1, "user_id"),
    ("duration", MAX_DURATION, MAX_DURATION + 1, "duration"),
]


def test_the_limits_are_the_columns() -> None:
    for field, longest, _, column in PBX_LIMITS:
        if isinstance(longest, str):
            assert len(longest) == _column_length(Call.__table__.c[column]), field
    assert MAX_ID_LENGTH == _column_length(Call.__table__.c.pbx_call_id) == 128
    assert MAX_USER_ID == 2**31 - 1  # an Integer column on PostgreSQL


@pytest.mark.parametrize("pbx", ["generic", "asterisk"])
def test_the_longest_accepted_pbx_fields_are_stored_and_folded_and_one_more_is_a_422(
    client: FlaskClient, worker: Worker, database: Database, pbx: str
) -> None:
    event = {**FINISHED, "call_id": "c" * MAX_ID_LENGTH}
    for field, longest, _, _ in PBX_LIMITS:
        event[field] = longest

    def post(payload: dict[str, Any]) -> Any:
        if pbx == "generic":
            return client.post("/hooks/pbx/generic", json=payload, headers=auth())
        return client.post("/hooks/pbx/asterisk", data={k: str(v) for k, v in payload.items()}, headers=auth())

    response = post(event)
    assert response.status_code == 202, response.get_data(as_text=True)
    worker.drain()
    with database.read() as session:
        call = session.scalars(select(Call).where(Call.pbx == pbx)).one()
        for field, longest, _, column in PBX_LIMITS:
            assert getattr(call, column) == longest, field
        assert call.finish_reported and call.status == "answered"
        folded_into = call.id
    assert stored_event(database, response.json["event_id"]).call_id == folded_into  # folded, not left pending
    for field, _, too_long, _ in PBX_LIMITS:
        response = post({**event, field: too_long})
        assert response.status_code == 422, (field, response.get_data(as_text=True))
        assert response.json is not None and field in response.json["error"]["fields"], field


def test_the_longest_accepted_transcript_fields_are_stored_and_folded_and_one_more_is_a_422(
    client: FlaskClient, worker: Worker, database: Database, fake_bitrix24: FakeBitrix24
) -> None:
    call_id = "k" * MAX_ID_LENGTH
    assert client.post("/hooks/pbx/generic", json={**FINISHED, "call_id": call_id}, headers=auth()).status_code == 202
    pbx = "asterisk"  # a transcript may name only a PBX whose hook can report its call
    document = {
        "segments": [
            {"start": 0, "end": 1, "text": "Hello", "channel": 0},
            {"start": 1, "end": MAX_SECONDS, "text": "Hi", "channel": MAX_CHANNEL},
        ],
        "cost": 0.5,
        "cost_currency": "C" * _column_length(TranscriptPart.__table__.c.cost_currency),
        "job_id": "j" * MAX_ID_LENGTH,
    }
    url = f"/hooks/stt/generic?pbx=generic&call={call_id}&channel0=caller"
    response = client.post(url, json=document, headers=auth())
    assert response.status_code == 202, response.get_data(as_text=True)
    # the same ids via the payload, for another PBX's call of the same id: a call of its own
    other = {**document, "pbx": pbx, "call": call_id, "job_id": "i" * MAX_ID_LENGTH}
    assert client.post("/hooks/stt/generic", json=other, headers=auth()).status_code == 202
    worker.drain()
    with database.read() as session:
        part = session.scalars(select(TranscriptPart).where(TranscriptPart.vendor_job_id == document["job_id"])).one()
        assert part.cost_currency == document["cost_currency"]
        assert part.delivery_state == "delivered"
        assert session.scalars(select(Call).where(Call.pbx == pbx, Call.pbx_call_id == call_id)).one()
    too_long: list[tuple[str, dict[str, Any]]] = [
        ("cost_currency", {"cost_currency": "C" * 51}),
        ("job_id", {"job_id": "j" * (MAX_ID_LENGTH + 1)}),
        ("pbx", {"pbx": "p" * (_column_length(Call.__table__.c.pbx) + 1), "call": call_id}),
        ("call", {"pbx": pbx, "call": "k" * (MAX_ID_LENGTH + 1)}),
        ("b24_call_id", {"b24_call_id": "B" * (MAX_ID_LENGTH + 1)}),
        ("segments", {"segments": [{"start": 0, "end": MAX_SECONDS + 1, "text": "x", "channel": 0}]}),
        ("segments", {"segments": [{"start": 0, "end": 1, "text": "x", "channel": MAX_CHANNEL + 1}]}),
    ]
    for field, change in too_long:
        payload = {key: value for key, value in document.items() if key != "job_id"} | change
        response = client.post("/hooks/stt/generic", json=payload, headers=auth())
        assert response.status_code == 422, (field, response.get_data(as_text=True))
        assert response.json is not None and field in response.json["error"]["fields"], field


# --- stored keys and headers --------------------------------------------------------------------------


def raw(delivery_id: str | None = None, content_type: str | None = "application/json") -> RawEvent:
    return RawEvent("stt", "generic", b"{}", {}, content_type, delivery_id)


def test_short_printable_keys_are_kept_as_they_were() -> None:
    assert raw().dedupe_key("job-1:0") == "key:job-1:0"
    assert raw("msg_2a").dedupe_key(None) == "delivery:msg_2a"
    assert call_event_key(raw(), "1700000000.1").startswith("call:1700000000.1:")


def test_long_ids_keep_their_channel_apart_and_fit_the_column() -> None:
    job_id = "j" * 400
    result = VendorResult(status="completed", vendor_job_id=job_id)
    from b24scribe.events import TranscriptOptions

    first = transcript_key(raw(), result, TranscriptOptions(channel_slot=0))
    second = transcript_key(raw(), result, TranscriptOptions(channel_slot=1))
    assert first != second
    assert len(first) == len(second) == _column_length(InboundEvent.__table__.c.dedupe_key)
    assert first.startswith("key:jjj") and "~sha256:" in first


@pytest.mark.parametrize("delivery_id", ["msg\x00one", "msg\ud800", "m\x1b", "x" * 5000, "delivery~sha256:" + "0" * 64])
def test_no_control_character_or_surrogate_ever_reaches_a_key(delivery_id: str) -> None:
    key = raw(delivery_id).dedupe_key(None)
    assert key.isprintable() and len(key) <= 200
    assert key != raw(delivery_id + "2").dedupe_key(None)
    assert raw(delivery_id).dedupe_key(None) == key  # the same delivery again finds it
    assert "~sha256:" in key and bounded_key(key) != key  # a kept key never equals a hashed one


@pytest.mark.parametrize("delivery_id", ["msg\x01one", "msg_" + "x" * 300])
def test_a_delivery_id_no_column_can_hold_is_stored_and_found_again_on_every_backend(
    client: FlaskClient, database: Database, delivery_id: str
) -> None:
    body = json.dumps({"segments": [{"start": 0, "end": 1, "text": "x", "side": "User"}]}).encode()
    headers = {**sign_standard_webhook(body, msg_id=delivery_id), "Content-Type": "application/json"}
    first = client.post("/hooks/stt/generic?pbx=asterisk&call=1", data=body, headers=headers)
    assert first.status_code == 202, first.get_data(as_text=True)
    again = client.post("/hooks/stt/generic?pbx=asterisk&call=1", data=body, headers=headers)
    assert again.status_code == 200 and again.json == {"event_id": first.json["event_id"], "duplicate": True}  # type: ignore[index]
    key = stored_event(database, first.json["event_id"]).dedupe_key  # type: ignore[index]
    assert key.isprintable() and len(key) <= 200 and "~sha256:" in key


def test_a_very_long_content_type_is_stored_within_its_column(client: FlaskClient, database: Database) -> None:
    content_type = "application/json; charset=utf-8; x=" + "y" * 5000 + "\x01"
    assert len(raw(content_type=content_type).content_type or "") == 200
    body = json.dumps({**FINISHED, "call_id": "ct-1"}).encode()
    response = client.post("/hooks/pbx/generic", data=body, headers={**auth(), "Content-Type": content_type})
    assert response.status_code in (202, 415, 422), response.get_data(as_text=True)
    if response.status_code == 202:
        stored = stored_event(database, response.json["event_id"])  # type: ignore[index]
        assert stored.content_type is not None and len(stored.content_type) <= 200


def test_the_event_admin_view_reads_a_rejected_hostile_event(client: FlaskClient, database: Database) -> None:
    body = b'{"event": "call.started", "call_id": "\\ud800", "\\u0000": 1}'
    fields = rejected(client, database, "/hooks/pbx/generic", body, "application/json")
    response = client.get(f"/v1/events/{fields['event_id']}", headers=admin())
    assert response.status_code == 200, response.get_data(as_text=True)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(st.characters(codec=None), max_size=40),
    hostile=st.sampled_from(["", "\x00", "\x1f", "\x7f", "\x80", "\x85", "\x9f", "\ud800", "\udfff", "¢", "\xa0"]),
    padding=st.sampled_from([0, 300]),
)
def test_long_and_short_text_are_checked_alike(text: str, hostile: str, padding: int) -> None:
    """`has_unstorable` reads long text through its UTF-8 bytes; it must agree with the plain rule."""
    value = "é" * padding + text + hostile
    expected = any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in value)
    assert has_unstorable(value) is expected


def test_a_dry_run_portal_label_must_fit_its_column() -> None:
    from b24scribe.parsing import resolve_portal
    from b24scribe.settings import Settings

    dry_run = Settings()
    assert not dry_run.portal_urls()
    longest = "p" * _column_length(Call.__table__.c.portal)
    assert resolve_portal(dry_run, {"portal": longest}) == longest
    for label in (longest + "p", "a\x00b", "\ud800"):
        with pytest.raises(ValidationError) as caught:
            resolve_portal(dry_run, {"portal": label})
        assert "portal" in caught.value.messages


def test_every_source_name_fits_the_columns_it_is_stored_in() -> None:
    for name in STT_VENDORS:
        assert len(name) <= _column_length(TranscriptPart.__table__.c.vendor)
        assert len(name) <= _column_length(InboundEvent.__table__.c.provider)
    for name in PBX_PARSERS:
        assert len(name) <= _column_length(Call.__table__.c.pbx)


@pytest.mark.parametrize("pbx", ["no-such-pbx", "a b", "../x", "777777777"])
def test_a_transcript_naming_a_pbx_no_hook_serves_is_a_422_naming_pbx(
    client: FlaskClient, database: Database, pbx: str
) -> None:
    response = client.post(
        f"/hooks/stt/generic?{urlencode({'pbx': pbx, 'call': 'x1'})}", json=TRANSCRIPT, headers=auth()
    )

    # accepted, it would wait for ever for a call no hook can report
    assert response.status_code == 422
    assert "asterisk" in response.get_json()["error"]["fields"]["pbx"][0]


def test_a_transcript_for_an_asterisk_call_id_with_spaces_meets_the_stripped_call(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    finished = {
        "event": "call.finished",
        "call_id": " 1700000000.9 ",
        "direction": "inbound",
        "from": "+15551234567",
        "extension": "101",
        "started_at": "1700000000",
        "duration": "30",
        "status": "ANSWER",
    }
    assert client.post("/hooks/pbx/asterisk", data=finished, headers=auth()).status_code == 202
    transcript = client.post("/hooks/stt/generic?pbx=asterisk&call=+1700000000.9+", json=TRANSCRIPT, headers=auth())
    assert transcript.status_code == 202
    worker.drain()

    # the Asterisk hook strips its values: the transcript names the same call and is attached to it
    assert len(fake_bitrix24.calls_to("telephony.call.attachTranscription")) == 1

"""How the hooks read a body: exactly its declared Content-Length, or (chunked, no length) to its
end; a body over the limit or cut short of its length is refused and nothing is stored."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import pytest
import requests
from flask.testing import FlaskClient
from gunicorn.http.errors import InvalidChunkSize, NoMoreData
from sqlalchemy import select

from app import create_app
from b24scribe.db import Database
from b24scribe.models import InboundEvent
from b24scribe.settings import Settings
from handlers import hooks
from handlers.errors import bounded_fields, safe_text
from tests.conftest import INBOUND_TOKEN, auth
from tests.operations import running_stack
from tests.test_metrics import Delta

URL = "/hooks/pbx/generic"


def event(call_id: str, padding: int = 0) -> bytes:
    body = {"event": "call.finished", "call_id": call_id, "status": "answered", "line": "+1" + "5" * padding}
    return json.dumps(body).encode()


def stored(db: Database) -> list[bytes]:
    with db.read() as session:
        return [bytes(body) for body in session.scalars(select(InboundEvent.body).order_by(InboundEvent.id))]


def test_the_stored_body_is_exactly_the_declared_length(client: FlaskClient, db: Database) -> None:
    body = event("sized-1")
    response = client.post(URL, data=body, headers={**auth(), "Content-Type": "application/json"})
    assert response.status_code == 202, response.get_data(as_text=True)
    assert stored(db) == [body]


def test_a_body_declared_over_the_limit_is_413_and_not_stored(settings: Settings, db: Database) -> None:
    client = create_app(settings.with_overrides(max_body_bytes=100)).test_client()
    headers = {**auth(), "Content-Type": "application/json"}
    response = client.post(URL, data=event("big-1", padding=200), headers=headers)
    assert response.status_code == 413
    assert response.json is not None and response.json["error"]["code"] == "body_too_large"
    assert stored(db) == []


def test_a_body_cut_short_of_its_content_length_is_400_and_not_stored(client: FlaskClient, db: Database) -> None:
    body = event("short-1")
    response = client.post(
        URL,
        input_stream=io.BytesIO(body),
        headers={**auth(), "Content-Type": "application/json"},
        environ_overrides={"CONTENT_LENGTH": str(len(body) + 40)},  # the sender went away mid-body
    )
    assert response.status_code == 400
    assert stored(db) == []


def chunked(body: bytes) -> dict[str, Any]:
    """A request without Content-Length, as a WSGI server passes a chunked body on."""
    return {
        "input_stream": io.BytesIO(body),
        "headers": {**auth(), "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        "environ_overrides": {"wsgi.input_terminated": True},  # the server ends the stream
    }


def test_a_chunked_body_without_a_length_is_read_whole(client: FlaskClient, db: Database) -> None:
    body = event("chunked-1")
    response = client.post(URL, **chunked(body))
    assert response.status_code == 202, response.get_data(as_text=True)
    assert stored(db) == [body]


def test_a_chunked_body_over_the_limit_is_413(settings: Settings, db: Database) -> None:
    client = create_app(settings.with_overrides(max_body_bytes=100)).test_client()
    response = client.post(URL, **chunked(event("chunked-big", padding=200)))
    assert response.status_code == 413
    assert stored(db) == []


def test_through_gunicorn_sized_and_chunked_events_are_stored_whole(tmp_path: Path, database_url: str) -> None:
    environ = {"B24SCRIBE_DATABASE_URL": database_url, "B24SCRIBE_INBOUND_TOKEN": INBOUND_TOKEN}
    sized, chunks = event("gunicorn-sized"), event("gunicorn-chunked")

    def pieces() -> Iterator[bytes]:  # requests sends a generator with Transfer-Encoding: chunked
        yield chunks[:10]
        yield chunks[10:]

    headers = {**auth(), "Content-Type": "application/json"}
    with running_stack(tmp_path, environ) as stack:
        answers = [
            requests.post(f"{stack.url}{URL}", data=sized, headers=headers, timeout=10),
            requests.post(f"{stack.url}{URL}", data=pieces(), headers=headers, timeout=10),
        ]
    assert [answer.status_code for answer in answers] == [202, 202], [answer.text for answer in answers]
    database = Database(database_url)
    try:
        assert sorted(stored(database)) == sorted([sized, chunks])
    finally:
        database.dispose()


def test_a_pbx_event_over_64_kib_is_413_though_transcripts_may_be_larger(client: FlaskClient, db: Database) -> None:
    headers = {**auth(), "Content-Type": "application/json"}
    big_event = event("pbx-big", padding=66 * 1000)  # under B24SCRIBE_MAX_BODY_BYTES, over the PBX limit
    counted = Delta("b24scribe_rejections_total", source="pbx", provider="generic", reason="body_too_large")
    declared = client.post(URL, data=big_event, headers=headers)
    streamed = client.post(URL, **chunked(big_event))  # read only until it passed the limit
    assert [declared.status_code, streamed.status_code] == [413, 413]
    assert counted.value == 2
    assert declared.json is not None and declared.json["error"] == {
        "code": "body_too_large",
        "message": "the body is larger than the limit of 65536 bytes for PBX events",
        "fields": {},
    }
    long_text = "word " * 14000  # a 70 KB transcript is an ordinary one
    transcript = {"segments": [{"start": 0, "end": 600, "text": long_text, "side": "Client"}]}
    answer = client.post("/hooks/stt/generic?b24_call_id=externalCall.long.1", json=transcript, headers=auth())
    assert answer.status_code == 202, answer.get_data(as_text=True)
    assert len(stored(db)) == 1


def test_a_query_with_more_than_200_fields_is_400_naming_the_problem(client: FlaskClient, db: Database) -> None:
    query = "&".join(f"f{n}=1" for n in range(200))
    assert client.post(f"{URL}?{query}", data=event("query-200"), headers=auth()).status_code == 202
    counted = Delta("b24scribe_rejections_total", source="pbx", provider="generic", reason="too_many_fields")
    refused = client.post(f"{URL}?{query}&one=more", data=event("query-201"), headers=auth())
    assert refused.status_code == 400
    assert counted.value == 1
    assert refused.json is not None and refused.json["error"]["code"] == "too_many_fields"
    assert refused.json["error"]["message"] == "the query has 201 fields; at most 200 are read"
    assert len(stored(db)) == 1


def test_a_form_event_with_more_than_200_fields_is_422_and_kept_as_rejected(client: FlaskClient, db: Database) -> None:
    form = "event=finished&call_id=1733400000.1&" + "&".join(f"x{n}=1" for n in range(199))
    headers = {**auth(), "Content-Type": "application/x-www-form-urlencoded"}
    answer = client.post("/hooks/pbx/asterisk", data=form, headers=headers)
    assert answer.status_code == 422
    assert answer.json is not None and answer.json["error"]["fields"]["_body"] == [
        "the form has 201 fields; at most 200 are read"
    ]
    with db.read() as session:
        assert [event.state for event in session.scalars(select(InboundEvent))] == ["rejected"]


def rejected_error(db: Database) -> dict[str, Any]:
    with db.read() as session:
        error: dict[str, Any] = session.scalars(select(InboundEvent.error)).one()
    return error


def test_thousands_of_unknown_fields_are_answered_and_stored_as_the_first_20_and_a_count(
    client: FlaskClient, db: Database
) -> None:
    body = {"event": "call.finished", "call_id": "unknowns-1", **{f"u{n}": 0 for n in range(3000)}}  # under 64 KiB
    answer = client.post(URL, json=body, headers=auth())
    assert answer.status_code == 422
    assert answer.json is not None
    fields = answer.json["error"]["fields"]
    assert len(fields) == 22  # 20 fields, "…", event_id
    assert fields["…"] == ["and 2980 more"]
    stored_error = rejected_error(db)  # what the status page and /v1/events draw
    assert stored_error["fields"] == {name: value for name, value in fields.items() if name != "event_id"}
    again = client.post(URL, json=body, headers=auth())  # the duplicate's answer: the stored rejection
    assert again.status_code == 422 and again.json is not None
    assert {name: value for name, value in again.json["error"]["fields"].items() if name != "event_id"} == (
        stored_error["fields"]
    )


def test_hostile_field_names_come_back_bounded_and_safe_to_store_as_json(client: FlaskClient, db: Database) -> None:
    body = b'{"event": "call.finished", "call_id": "names-1", "\\ud800lone": 1, "nul\\u0000": 2, "%s": 3}' % (
        b"k" * 10000
    )
    answer = client.post(URL, data=body, headers={**auth(), "Content-Type": "application/json"})
    assert answer.status_code == 422, answer.get_data(as_text=True)
    assert answer.json is not None
    names = [name for name in answer.json["error"]["fields"] if name != "event_id"]
    assert names and all(len(name) <= 100 and "\x00" not in name for name in names)
    for text in (json.dumps(answer.json, ensure_ascii=False), json.dumps(rejected_error(db), ensure_ascii=False)):
        text.encode("utf-8")  # no lone surrogate: PostgreSQL's jsonb and every strict JSON reader take it
        assert "\\u0000" not in text and "\x00" not in text


def test_error_fields_are_bounded_at_every_level_and_bounding_twice_changes_nothing() -> None:
    nested = {"segments": {n: {"text": ["Missing data for required field."]} for n in range(100)}}
    bounded = bounded_fields(nested)
    assert list(bounded["segments"])[:2] == ["0", "1"] and len(bounded["segments"]) == 21
    assert bounded["segments"]["…"] == ["and 80 more"]
    assert bounded_fields(bounded) == bounded
    assert bounded_fields({"a": ["x" * 5000]})["a"][0].endswith("…")
    assert len(bounded_fields({"a": ["x" * 5000]})["a"][0]) == 500
    assert bounded_fields(["m"] * 21) == ["m"] * 21  # one more is shown rather than "and 1 more"
    assert bounded_fields(["m"] * 22)[-1] == "and 2 more"
    assert safe_text("a\udc80\x00b", 100) == "a\\udc80\\x00b"


class BrokenChunks:
    """A server's `wsgi.input` whose chunked framing turns out broken when it is read."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def read(self, size: int = -1) -> bytes:
        raise self.error


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (InvalidChunkSize(b"zz"), "the request body is malformed (InvalidChunkSize): check its chunked encoding"),
        (NoMoreData(b""), "the request body ended before it was complete (the sender closed the connection)"),
    ],
)
def test_a_body_the_server_cannot_frame_is_400_on_every_route_not_only_the_hooks(
    settings: Settings, db: Database, error: Exception, message: str
) -> None:
    app = create_app(settings)

    @app.post("/reads-its-body")
    def reads_its_body() -> str:  # any view that reads the body, as the hooks' Flask views do
        return flask.request.get_data(as_text=True)

    client = app.test_client()
    for path in ("/reads-its-body", URL, "/hooks/stt/generic?b24_call_id=7"):
        broken = {"wsgi.input_terminated": True, "wsgi.input": BrokenChunks(error)}
        response = client.post(path, headers={**auth(), "Transfer-Encoding": "chunked"}, environ_overrides=broken)
        assert response.status_code == 400, path
        assert response.json == {"error": {"code": "unreadable_body", "message": message, "fields": {}}}
    assert stored(db) == []


def test_a_query_with_nul_or_undecodable_bytes_is_stored_as_sent_never_a_5xx(client: FlaskClient, db: Database) -> None:
    for n, query in enumerate(["x=%00", "x=%ED%A0%80", "x=%FF%FE", "%00=1", "x=\u00e9"]):
        answer = client.post(f"{URL}?{query}", data=event(f"query-bytes-{n}"), headers=auth())
        assert answer.status_code == 202, (query, answer.get_data(as_text=True))  # kept as sent


def test_the_threaded_workers_watchdog_ends_an_overdue_read_and_leaves_released_sockets_alone() -> None:
    watchdog = hooks._Watchdog()
    overdue, sender = socket.socketpair()
    kept, kept_sender = socket.socketpair()
    with overdue, sender, kept, kept_sender:
        released = watchdog.watch(kept, 0.2)
        assert watchdog.release(released) is False  # read in time: never shut
        key = watchdog.watch(overdue, 0.2)
        started = time.monotonic()
        assert overdue.recv(10) == b""  # blocked until the watchdog shut its reading side
        assert 0.2 <= time.monotonic() - started < 1.0
        assert watchdog.release(key) is True
        time.sleep(0.3)
        kept_sender.sendall(b"next request")  # the connection that was released still reads
        assert kept.recv(20) == b"next request"

"""How the hooks read a body: exactly its declared Content-Length, or (chunked, no length) to its
end; a body over the limit or cut short of its length is refused and nothing is stored."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from flask.testing import FlaskClient
from sqlalchemy import select

from app import create_app
from b24scribe.db import Database
from b24scribe.models import InboundEvent
from b24scribe.settings import Settings
from tests.conftest import INBOUND_TOKEN, auth
from tests.operations import running_stack

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

"""The hooks' own WSGI application (`handlers.hooks.HookApp`) serves every path under /hooks, from
the registry of sources, and nothing else serves them: no route is served twice.

What users send (accepted, repeated, refused, invalid, unknown, too big, wrong method or path) gets
the answer and the stored rows it should, in the service's one error shape, with a request id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import flask
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import Client, TestResponse

from app import create_app
from b24scribe.db import Database
from b24scribe.models import Base, InboundEvent, Job
from schemas.registry import SOURCES
from tests.conftest import INBOUND_TOKEN, auth, make_settings, sign_standard_webhook
from tests.fake_bitrix24 import FakeBitrix24

CALL = {"event": "call.started", "call_id": "1733400000.7", "direction": "inbound", "from": "+15551234567"}
TRANSCRIPT = {"segments": [{"start": 0.4, "end": 2.9, "text": "Good afternoon", "channel": 0}]}
JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@dataclass
class Request:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] | None = None


def pbx(event: dict[str, Any], path: str = "/hooks/pbx/generic", headers: dict[str, str] | None = None) -> Request:
    return Request("POST", path, json.dumps(event).encode(), {**JSON, **auth()} if headers is None else headers)


SIGNED_BODY = json.dumps(TRANSCRIPT).encode()
ASTERISK_QUERY = urlencode({"event": "finished", "call_id": "1733400000.9", "direction": "inbound", "status": "ANSWER"})


def conversation() -> list[Request]:
    """What users send: accepted, repeated, refused, invalid, unknown, too big, wrong method or path."""
    signed = sign_standard_webhook(SIGNED_BODY, msg_id="msg_lane_1")  # signed now: it is valid for 5 minutes
    return [
        pbx(CALL),
        pbx(CALL),  # the same event again: 200 duplicate
        pbx({**CALL, "call_id": "1733400000.8"}, path=f"/hooks/pbx/generic?token={INBOUND_TOKEN}", headers=JSON),
        pbx(CALL, headers={**JSON, **auth("not-the-token")}),
        pbx(CALL, headers=JSON),
        pbx({**CALL, "direction": "sideways"}),  # 422 naming the field, stored as rejected
        pbx({**CALL, "direction": "sideways"}),  # and the same answer again
        pbx({"event": "call.started"}),
        pbx(CALL, path="/hooks/pbx/generic?portal=nowhere"),
        Request("POST", "/hooks/pbx/generic", b"{not json", {**JSON, **auth()}),
        Request("POST", "/hooks/pbx/generic", b"x" * 5000, {**JSON, **auth()}),  # over the limit: 413
        Request("POST", f"/hooks/pbx/asterisk?{ASTERISK_QUERY}", b"", {**FORM, **auth()}),
        pbx(CALL, path="/hooks/pbx/nosuchpbx"),  # 404 naming the known PBXs
        pbx(CALL, path="/hooks/pbx/generic/"),  # 404
        Request("GET", "/hooks/pbx/generic", headers=auth()),  # 405
        Request("PUT", "/hooks/stt/generic", SIGNED_BODY, {**JSON, **auth()}),  # 405
        Request("POST", "/hooks/stt/generic?b24_call_id=externalCall.abc.1", SIGNED_BODY, {**JSON, **auth()}),
        Request("POST", "/hooks/stt/generic?b24_call_id=externalCall.abc.1", SIGNED_BODY, {**JSON, **auth()}),
        Request("POST", "/hooks/stt/generic?b24_call_id=externalCall.abc.2", SIGNED_BODY, {**JSON, **signed}),
        Request("POST", "/hooks/stt/generic?b24_call_id=externalCall.abc.2", SIGNED_BODY + b" ", {**JSON, **signed}),
        Request("POST", "/hooks/stt/generic?b24_call_id=externalCall.abc.3", b'{"segments": []}', {**JSON, **auth()}),
        Request("POST", "/hooks/stt/generic", SIGNED_BODY, {**JSON, **auth()}),  # no call named
        Request("POST", "/hooks/stt/deepgram?b24_call_id=externalCall.abc.4", b"{}", {**JSON, **auth()}),
        Request("POST", "/hooks/stt/nosuchvendor", SIGNED_BODY, {**JSON, **auth()}),
        pbx(CALL, path="/hooks/pbx/generic?" + "&".join(f"f{n}=1" for n in range(201))),  # 400: too many fields
        pbx({**CALL, **{f"u{n}": 0 for n in range(300)}}),  # 422 naming the first 20 and "and 280 more"
    ]


def build_app(directory: Path, webhook_url: str) -> Flask:
    """The app on a fresh SQLite database (the router is the same code on both backends)."""
    url = f"sqlite:///{directory}/b24scribe.sqlite3"
    directory.mkdir()
    database = Database(url)
    Base.metadata.create_all(database.write_engine)
    database.dispose()
    return create_app(make_settings(url, webhook_url).with_overrides(max_body_bytes=4096))


def send(client: Client, request: Request) -> TestResponse:
    return client.open(request.path, method=request.method, data=request.body, headers=request.headers or {})


def stored(app: Flask) -> list[tuple[Any, ...]]:
    with app.extensions["b24scribe.db"].read() as session:
        events = session.scalars(select(InboundEvent).order_by(InboundEvent.id))
        rows = [(e.id, e.source, e.provider, e.dedupe_key, e.query, e.body, e.state, e.error) for e in events]
        jobs = session.execute(select(Job.kind, Job.event_id, Job.state).order_by(Job.id)).all()
    return rows + [tuple(job) for job in jobs]


@pytest.fixture
def hook_app(fake_bitrix24: FakeBitrix24, tmp_path: Path) -> Iterator[Flask]:
    app = build_app(tmp_path / "app", fake_bitrix24.webhook_url)
    yield app
    app.extensions["b24scribe.db"].dispose()


def test_what_users_send_gets_its_answer_in_the_one_error_shape(hook_app: Flask) -> None:
    client = hook_app.test_client()
    answers = []
    for request in conversation():
        answer = send(client, request)
        assert answer.headers.get("X-Request-Id"), request
        assert answer.content_type == "application/json", request
        body = answer.get_json()
        answers.append((answer.status_code, body["error"]["code"] if answer.status_code >= 400 else body["duplicate"]))
    assert answers[:16] == [
        (202, False),
        (200, True),
        (202, False),
        (401, "bad_credentials"),
        (401, "unauthenticated"),
        (422, "invalid_payload"),
        (422, "invalid_payload"),
        (422, "invalid_payload"),
        (422, "invalid_payload"),
        (422, "invalid_payload"),
        (413, "body_too_large"),
        (202, False),
        (404, "unknown_pbx"),
        (404, "not_found"),
        (405, "method_not_allowed"),
        (405, "method_not_allowed"),
    ]
    assert answers[16:] == [
        (202, False),
        (200, True),
        (202, False),
        (401, "bad_signature"),
        (422, "invalid_payload"),
        (422, "invalid_payload"),
        (422, "invalid_payload"),
        (404, "unknown_vendor"),
        (400, "too_many_fields"),
        (422, "invalid_payload"),
    ]
    rows = stored(hook_app)
    assert [row[6] for row in rows if len(row) == 8].count("rejected") == 8  # each 422 kept, but the repeat
    assert len(rows) > 10


def test_unknown_names_are_404s_naming_the_known_ones_and_other_methods_405s(client: FlaskClient) -> None:
    answer = client.post("/hooks/pbx/nosuchpbx", json=CALL, headers=auth())
    assert answer.status_code == 404
    assert answer.get_json()["error"]["message"] == f"no PBX 'nosuchpbx'; known: {', '.join(sorted(SOURCES.pbx))}"
    answer = client.post("/hooks/stt/nosuchvendor", json=TRANSCRIPT, headers=auth())
    assert answer.get_json()["error"]["code"] == "unknown_vendor"
    assert "deepgram" in answer.get_json()["error"]["message"]
    answer = client.get("/hooks/pbx/generic", headers=auth())
    assert (answer.status_code, answer.headers["Allow"]) == (405, "POST")
    for path in ("/hooks", "/hooks/", "/hooks/pbx", "/hooks/pbx/", "/hooks/fax/generic", "/hooks/pbx/generic/x"):
        answer = client.post(path, json=CALL, headers=auth())
        assert (answer.status_code, answer.get_json()["error"]["code"]) == (404, "not_found"), path


def test_no_route_is_served_twice(app: Flask) -> None:
    """Flask has no rule under /hooks (the hooks' application serves them all), and the hooks'
    application takes nothing outside it: Flask's own requests never reach it."""
    assert [rule.rule for rule in app.url_map.iter_rules() if rule.rule.startswith("/hooks")] == []
    dispatched: list[str] = []

    def on_request_started(sender: Flask, **_: Any) -> None:
        dispatched.append(flask.request.path)

    client = app.test_client()
    with flask.request_started.connected_to(on_request_started, app):
        assert client.post("/hooks/pbx/generic", json=CALL, headers=auth()).status_code == 202
        assert client.post("/hooks/stt/generic?pbx=generic&call=1", json=TRANSCRIPT, headers=auth()).status_code == 202
        assert client.post("/hooks/pbx/nosuchpbx", json=CALL, headers=auth()).status_code == 404
        assert client.post("/hooksx/pbx/generic", json=CALL, headers=auth()).status_code == 404
        assert client.get("/livez").status_code == 200
    assert dispatched == ["/hooksx/pbx/generic", "/livez"]


def test_a_bug_in_a_parser_is_logged_and_the_event_kept_as_rejected_never_a_500(
    hook_app: Flask, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: Any) -> None:
        raise RecursionError("a bug")

    monkeypatch.setattr("handlers.hooks.parse_call_event", broken)
    with caplog.at_level(logging.ERROR):
        answer = hook_app.test_client().post("/hooks/pbx/generic", json=CALL, headers=auth())

    assert answer.status_code == 422  # the sender's body may be fine: it is kept, to replay after the fix
    assert answer.get_json()["error"]["fields"]["_body"] == [
        "this version cannot read the call event; it is kept and can be replayed after a fix"
    ]
    logged = [record for record in caplog.records if "a hook's parser failed" in str(record.msg)]
    assert logged and logged[0].exc_info is not None
    assert [row[6] for row in stored(hook_app)] == ["rejected"]


def test_a_bug_while_storing_is_a_logged_500_in_the_one_error_shape(
    hook_app: Flask, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("handlers.hooks.store_event", broken)
    with caplog.at_level(logging.ERROR):
        answer = hook_app.test_client().post("/hooks/pbx/generic", json=CALL, headers=auth())

    assert answer.status_code == 500  # nothing is stored: the sender retries
    assert answer.get_json()["error"]["code"] == "http_error"
    assert answer.headers.get("X-Request-Id")
    logged = [record for record in caplog.records if "unhandled error in a hook" in str(record.msg)]
    assert logged and logged[0].exc_info is not None
    assert stored(hook_app) == []

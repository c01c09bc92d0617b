"""The hooks' lane (`handlers.hooks.HookLane`) answers exactly as the blueprint's Flask views do.

The lane serves `POST /hooks/pbx/<known PBX>` and `POST /hooks/stt/<known vendor>` without Flask's
dispatch (the hot path); everything else goes on to Flask. Each request below is sent to two apps
built alike on two fresh databases: one as served (the lane takes the hooks), one served by Flask
alone. Their answers and what they stored must be the same.
"""

from __future__ import annotations

import functools
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
from sqlalchemy import select
from werkzeug.test import Client, TestResponse

from app import RequestId, create_app
from b24scribe.db import Database
from b24scribe.models import Base, InboundEvent, Job
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
        pbx(CALL, path="/hooks/pbx/nosuchpbx"),  # 404, from Flask in both
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
    """The app on a fresh SQLite database (the lane is the same code on both backends)."""
    url = f"sqlite:///{directory}/b24scribe.sqlite3"
    directory.mkdir()
    database = Database(url)
    Base.metadata.create_all(database.write_engine)
    database.dispose()
    return create_app(make_settings(url, webhook_url).with_overrides(max_body_bytes=4096))


def flask_only(app: Flask) -> Client:
    """The app served by Flask alone: its own wsgi_app, inside the same request-id middleware."""
    return Client(RequestId(functools.partial(Flask.wsgi_app, app)), TestResponse)


def send(client: Client, request: Request) -> TestResponse:
    return client.open(request.path, method=request.method, data=request.body, headers=request.headers or {})


def headers(response: TestResponse) -> list[tuple[str, str]]:
    """The answer's headers but its request id (a new one each time)."""
    return sorted((name, value) for name, value in response.headers.items() if name != "X-Request-Id")


def stored(app: Flask) -> list[tuple[Any, ...]]:
    with app.extensions["b24scribe.db"].read() as session:
        events = session.scalars(select(InboundEvent).order_by(InboundEvent.id))
        rows = [(e.id, e.source, e.provider, e.dedupe_key, e.query, e.body, e.state, e.error) for e in events]
        jobs = session.execute(select(Job.kind, Job.event_id, Job.state).order_by(Job.id)).all()
    return rows + [tuple(job) for job in jobs]


@pytest.fixture
def two_apps(fake_bitrix24: FakeBitrix24, tmp_path: Path) -> Iterator[tuple[Flask, Flask]]:
    lane = build_app(tmp_path / "lane", fake_bitrix24.webhook_url)
    plain = build_app(tmp_path / "flask", fake_bitrix24.webhook_url)
    yield lane, plain
    for app in (lane, plain):
        app.extensions["b24scribe.db"].dispose()


def test_the_lane_answers_and_stores_exactly_as_the_flask_views(two_apps: tuple[Flask, Flask]) -> None:
    lane_app, flask_app = two_apps
    lane, plain = lane_app.test_client(), flask_only(flask_app)
    statuses = []
    for request in conversation():
        via_lane, via_flask = send(lane, request), send(plain, request)
        statuses.append(via_lane.status_code)
        assert (via_lane.status_code, via_lane.get_data()) == (via_flask.status_code, via_flask.get_data()), request
        assert via_lane.status == via_flask.status, request  # the status line too
        assert headers(via_lane) == headers(via_flask), request
        assert via_lane.headers.get("X-Request-Id") and via_flask.headers.get("X-Request-Id"), request
    # the conversation covers what it says it does
    assert statuses[:16] == [202, 200, 202, 401, 401, 422, 422, 422, 422, 422, 413, 202, 404, 404, 405, 405]
    assert statuses[16:] == [202, 200, 202, 401, 422, 422, 422, 404, 400, 422]
    assert stored(lane_app) == stored(flask_app)
    assert len(stored(lane_app)) > 10


def test_the_lane_takes_the_known_hooks_and_flask_everything_else(app: Flask) -> None:
    dispatched: list[str] = []

    def on_request_started(sender: Flask, **_: Any) -> None:
        dispatched.append(flask.request.path)

    client = app.test_client()
    with flask.request_started.connected_to(on_request_started, app):
        assert client.post("/hooks/pbx/generic", json=CALL, headers=auth()).status_code == 202
        assert client.post("/hooks/stt/generic?pbx=generic&call=1", json=TRANSCRIPT, headers=auth()).status_code == 202
        assert client.post("/hooks/pbx/nosuchpbx", json=CALL, headers=auth()).status_code == 404
        assert client.get("/livez").status_code == 200

    assert dispatched == ["/hooks/pbx/nosuchpbx", "/livez"]


def test_a_bug_in_a_parser_is_logged_and_the_event_kept_as_rejected_never_a_500(
    two_apps: tuple[Flask, Flask], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: Any) -> None:
        raise RecursionError("a bug")

    monkeypatch.setattr("handlers.hooks.parse_call_event", broken)
    lane_app, flask_app = two_apps
    with caplog.at_level(logging.ERROR):
        via_lane = lane_app.test_client().post("/hooks/pbx/generic", json=CALL, headers=auth())
    via_flask = send(flask_only(flask_app), pbx(CALL))

    assert via_lane.status_code == 422  # the sender's body may be fine: it is kept, to replay after the fix
    assert via_lane.get_json()["error"]["fields"]["_body"] == [
        "this version cannot read the call event; it is kept and can be replayed after a fix"
    ]
    assert (via_lane.status_code, via_lane.get_data()) == (via_flask.status_code, via_flask.get_data())
    logged = [record for record in caplog.records if "a hook's parser failed" in str(record.msg)]
    assert logged and logged[0].exc_info is not None
    assert [row[6] for row in stored(lane_app)] == ["rejected"]


def test_a_bug_while_storing_is_a_logged_500_in_the_one_error_shape(
    two_apps: tuple[Flask, Flask], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("handlers.hooks.store_event", broken)
    lane_app, flask_app = two_apps
    with caplog.at_level(logging.ERROR):
        via_lane = lane_app.test_client().post("/hooks/pbx/generic", json=CALL, headers=auth())
    via_flask = send(flask_only(flask_app), pbx(CALL))

    assert via_lane.status_code == 500  # nothing is stored: the sender retries
    assert via_lane.get_json()["error"]["code"] == "http_error"
    assert (via_lane.status_code, via_lane.get_data()) == (via_flask.status_code, via_flask.get_data())
    logged = [record for record in caplog.records if "unhandled error in a hook" in str(record.msg)]
    assert logged and logged[0].exc_info is not None
    assert stored(lane_app) == []

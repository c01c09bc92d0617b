"""A PBX may report a call's recording on `call.finished` or later as its own event (contract §9): the
recording's URL is kept on the call, and a recording event alone neither registers nor finishes a call."""

from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from b24scribe.models import Call
from b24scribe.worker import Worker
from tests.conftest import auth
from tests.fake_bitrix24 import FakeBitrix24

URL = "https://pbx.example.com/monitor/1733400000.9.wav"


def test_a_recording_event_keeps_the_url_on_its_call_and_registers_nothing(
    app: Flask, client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    event = {"event": "recording.ready", "call_id": "1733400000.9", "recording_url": URL, "channels": 2}
    assert client.post("/hooks/pbx/generic", json=event, headers=auth()).status_code == 202
    worker.drain()
    assert fake_bitrix24.calls_to("telephony.externalCall.register") == []

    started = {"event": "call.started", "call_id": "1733400000.9", "direction": "inbound", "from": "+15550001"}
    assert client.post("/hooks/pbx/generic", json={**started, "user_id": 1}, headers=auth()).status_code == 202
    worker.drain()
    assert recording_of(app, "generic", "1733400000.9") == (URL, "registered")
    assert len(fake_bitrix24.calls_to("telephony.externalCall.register")) == 1


def test_asterisk_reports_a_recording_as_its_own_form_event(app: Flask, client: FlaskClient, worker: Worker) -> None:
    form = {"event": "recording", "call_id": "1733400000.10", "recording_url": URL}
    assert client.post("/hooks/pbx/asterisk", data=form, headers=auth()).status_code == 202
    worker.drain()
    assert recording_of(app, "asterisk", "1733400000.10") == (URL, "new")


def test_a_recording_event_names_its_channels_as_1_or_2_only(client: FlaskClient) -> None:
    event = {"event": "recording.ready", "call_id": "c-3", "recording_url": URL, "channels": 3}
    answer = client.post("/hooks/pbx/generic", json=event, headers=auth())
    assert answer.status_code == 422
    assert "channels" in answer.get_json()["error"]["fields"]


def recording_of(app: Flask, pbx: str, pbx_call_id: str) -> tuple[str | None, str]:
    with app.extensions["b24scribe.db"].read() as session:
        call = session.scalars(select(Call).where(Call.pbx == pbx, Call.pbx_call_id == pbx_call_id)).one()
        return call.recording_url, call.stage


def test_an_answered_call_is_never_finished_as_missed(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    base = {"call_id": "1733400000.11", "direction": "inbound", "from": "+15550002", "user_id": 1}
    for event in ({"event": "call.started"}, {"event": "call.answered"}):
        assert client.post("/hooks/pbx/generic", json={**base, **event}, headers=auth()).status_code == 202
    # the queue's last leg reports no-answer after another agent took the call
    finished = {"event": "call.finished", "status": "no-answer", "duration": 41}
    assert client.post("/hooks/pbx/generic", json={**base, **finished}, headers=auth()).status_code == 202
    worker.drain()
    [finish] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert (finish.params["STATUS_CODE"], int(finish.params["DURATION"])) == ("200", 41)

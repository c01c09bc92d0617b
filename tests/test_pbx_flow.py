"""Call life cycle: PBX events register and finish calls, and transcripts find their call."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient

from app import create_app
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import admin, auth
from tests.fake_bitrix24 import FakeBitrix24

README = Path(__file__).resolve().parent.parent / "README.md"

FINISHED = {
    "event": "call.finished",
    "call_id": "1700000000.123",
    "direction": "inbound",
    "from": "+15551234567",
    "to": "+15550000000",
    "extension": "101",
    "started_at": "2026-11-25T10:20:30+01:00",
    "duration": 73,
    "status": "answered",
    "recording_url": "https://pbx.example/rec/1700000000.123.wav",
    "line": "+15550000000",
}
STARTED = {k: v for k, v in FINISHED.items() if k not in ("duration", "status", "recording_url")} | {
    "event": "call.started"
}
TRANSCRIPT = {
    "segments": [
        {"start": 0.5, "end": 2.2, "text": "Acme, good morning", "speaker": "A"},
        {"start": 2.5, "end": 4.9, "text": "Hi, it's about my order", "speaker": "B"},
    ]
}


def post_event(client: FlaskClient, event: dict[str, Any], pbx: str = "generic") -> int:
    response = client.post(f"/hooks/pbx/{pbx}", json=event, headers=auth())
    assert response.status_code in (200, 202), response.get_data(as_text=True)
    return response.status_code


def post_transcript(client: FlaskClient, call_id: str = "1700000000.123", pbx: str = "generic") -> None:
    url = f"/hooks/stt/generic?pbx={pbx}&call={quote(call_id)}"
    response = client.post(url, json=TRANSCRIPT, headers=auth())
    assert response.status_code == 202, response.get_data(as_text=True)


def call_state(client: FlaskClient, call_id: str = "1700000000.123", pbx: str = "generic") -> dict[str, Any]:
    response = client.get(f"/v1/calls/{pbx}/{quote(call_id)}", headers=admin())
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json is not None
    return response.json


def methods(fake: FakeBitrix24) -> list[str]:
    return [r.method for r in fake.requests]


def test_a_finished_call_then_its_transcript_reach_bitrix24_in_order(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    post_event(client, FINISHED)
    post_transcript(client)
    worker.drain()

    assert methods(fake_bitrix24) == [
        "telephony.externalcall.register",
        "telephony.externalcall.finish",
        "telephony.externalcall.attachrecord",
        "telephony.call.attachtranscription",
    ]
    register, finish, record, attach = fake_bitrix24.requests
    assert register.params == {
        "USER_PHONE_INNER": "101",
        "PHONE_NUMBER": "+15551234567",
        "TYPE": 2,
        "EXTERNAL_CALL_ID": "1700000000.123",
        "CRM_CREATE": 0,
        "SHOW": 0,
        "CALL_START_DATE": "2026-11-25T10:20:30+01:00",
        "LINE_NUMBER": "+15550000000",
    }
    call_id = register.response["result"]["CALL_ID"]
    assert finish.params == {
        "CALL_ID": call_id,
        "USER_PHONE_INNER": "101",
        "DURATION": 73,
        "STATUS_CODE": "200",
    }  # no RECORD_URL: the recording goes with attachRecord, after finish and before the transcript
    assert record.params == {"CALL_ID": call_id, "RECORD_URL": "https://pbx.example/rec/1700000000.123.wav"}
    # Inbound, mono diarized: the first speaker is the callee (the employee who answered).
    assert attach.params == {
        "CALL_ID": call_id,
        "MESSAGES": [
            {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Acme, good morning"},
            {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 5, "MESSAGE": "Hi, it's about my order"},
        ],
    }
    state = call_state(client)
    assert state["b24_call_id"] == call_id
    assert state["registered"] and state["finished"]
    assert state["transcripts"][0]["state"] == "delivered"
    assert state["transcripts"][0]["transcript_id"] == attach.response["result"]["TRANSCRIPT_ID"]
    assert state["recording"]["state"] == "attached"


def test_a_transcript_first_waits_then_started_registers_then_finished_delivers(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    post_transcript(client)
    worker.drain()
    assert fake_bitrix24.requests == []
    state = call_state(client)
    assert state["transcripts"][0]["state"] == "waiting"
    assert "waiting for the PBX" in state["transcripts"][0]["reason"]

    post_event(client, STARTED)
    worker.drain()
    assert methods(fake_bitrix24) == ["telephony.externalcall.register"]
    assert fake_bitrix24.requests[0].params["SHOW"] == 1  # a live call pops the card
    assert call_state(client)["transcripts"][0]["state"] == "waiting"

    post_event(client, FINISHED)
    worker.drain()
    assert methods(fake_bitrix24) == [
        "telephony.externalcall.register",
        "telephony.externalcall.finish",
        "telephony.externalcall.attachrecord",
        "telephony.call.attachtranscription",
    ]
    assert call_state(client)["transcripts"][0]["state"] == "delivered"


def test_duplicated_and_late_events_change_nothing(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    assert post_event(client, FINISHED) == 202
    assert post_event(client, FINISHED) == 200  # the PBX retried
    worker.drain()
    assert post_event(client, STARTED) == 202  # arrived late
    assert post_event(client, {**FINISHED, "duration": 74}) == 202  # a second, different finish
    worker.drain()
    assert methods(fake_bitrix24) == [
        "telephony.externalcall.register",
        "telephony.externalcall.finish",
        "telephony.externalcall.attachrecord",  # once: the same recording reported again is not sent again
    ]


def test_two_overlapping_calls_from_the_same_number_each_get_their_own_call_id(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    post_event(client, {**STARTED, "call_id": "A.1"})
    post_event(client, {**STARTED, "call_id": "B.2"})
    post_event(client, {**FINISHED, "call_id": "A.1"})
    post_event(client, {**FINISHED, "call_id": "B.2"})
    post_transcript(client, "A.1")
    post_transcript(client, "B.2")
    worker.drain()

    first, second = call_state(client, "A.1"), call_state(client, "B.2")
    assert first["b24_call_id"] != second["b24_call_id"]
    attachments = fake_bitrix24.attachments_by_call()
    assert len(attachments[first["b24_call_id"]]) == 1
    assert len(attachments[second["b24_call_id"]]) == 1
    assert len(fake_bitrix24.calls_to("telephony.externalCall.finish")) == 2


def test_an_extension_no_bitrix24_user_has_falls_back_to_the_default_user(
    settings: Settings, db: object, fake_bitrix24: FakeBitrix24
) -> None:
    app = create_app(settings.with_overrides(default_user_id=1))
    client = app.test_client()
    post_event(client, {**FINISHED, "extension": "999"})
    Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES).drain()

    registers = fake_bitrix24.calls_to("telephony.externalCall.register")
    assert [r.status for r in registers] == [400, 200]
    assert registers[0].params["USER_PHONE_INNER"] == "999"
    assert registers[1].params["USER_ID"] == 1
    finish = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert finish[0].params["USER_ID"] == 1 and finish[0].status == 200
    assert "999" in call_state(client)["note"]


def test_without_a_default_user_an_unknown_extension_is_a_dead_job_with_the_reason(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    post_event(client, {**FINISHED, "extension": "999"})
    worker.drain()
    state = call_state(client)
    register = state["jobs"][0]
    assert register["state"] == "dead"
    assert "USER_ID or USER_PHONE_INNER should be set" in register["last_error"]


@pytest.mark.parametrize(
    ("status", "code"),
    [("answered", "200"), ("busy", "486"), ("no-answer", "304"), ("cancelled", "603-S"), ("failed", "OTHER")],
)
def test_each_pbx_status_maps_to_its_bitrix24_status_code(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, status: str, code: str
) -> None:
    post_event(client, {**FINISHED, "status": status, "duration": 73 if status == "answered" else 0})
    worker.drain()
    finish = fake_bitrix24.calls_to("telephony.externalCall.finish")[0]
    assert finish.params["STATUS_CODE"] == code
    assert fake_bitrix24.statistics[finish.params["CALL_ID"]]["CALL_FAILED_CODE"] == code


def test_an_outbound_call_registers_the_dialled_number_as_type_1(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    post_event(client, {**FINISHED, "direction": "outbound", "from": "101", "to": "+15557654321"})
    worker.drain()
    register = fake_bitrix24.calls_to("telephony.externalCall.register")[0]
    assert register.params["TYPE"] == 1
    assert register.params["PHONE_NUMBER"] == "+15557654321"


def test_an_anonymous_caller_is_registered_as_0_without_a_lead(
    settings: Settings, db: object, fake_bitrix24: FakeBitrix24
) -> None:
    app = create_app(settings.with_overrides(crm_create=True))
    client = app.test_client()
    post_event(client, {**FINISHED, "from": "anonymous"})
    Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES).drain()
    register = fake_bitrix24.calls_to("telephony.externalCall.register")[0]
    assert register.status == 200
    assert register.params["PHONE_NUMBER"] == "0"
    assert register.params["CRM_CREATE"] == 0


def test_a_finish_whose_answer_was_lost_is_not_sent_twice_and_the_transcript_still_lands(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, settings: Settings
) -> None:
    post_event(client, FINISHED)
    post_transcript(client)
    # finish is applied, but the answer comes after our client's timeout (2 s in the tests)
    fake_bitrix24.inject_slow("telephony.externalCall.finish", seconds=3.0)
    worker.drain()
    state = call_state(client)
    finish_job = next(j for j in state["jobs"] if j["kind"] == "finish")
    assert finish_job["state"] == "pending" and "no answer" in finish_job["last_error"]

    _make_due_now(worker)
    worker.drain()
    finishes = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert [f.status for f in finishes] == [200, 400]  # the retry met "Call is not found (…"
    assert len(fake_bitrix24.statistics) == 1
    state = call_state(client)
    assert state["finished"] is True
    assert state["transcripts"][0]["state"] == "delivered"


def test_a_transcript_whose_call_never_appears_is_reported_and_delivered_if_it_turns_up(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    post_transcript(client, "lost.1")
    worker.drain()
    worker.housekeeping(now=time.time() + 25 * 3600)
    attach = call_state(client, "lost.1")["jobs"][0]
    assert attach["state"] == "dead"
    assert attach["last_error"].startswith("orphan: the PBX did not report this call")
    assert attach["dead_reason"] == "orphan"

    post_event(client, {**FINISHED, "call_id": "lost.1"})
    worker.drain()
    state = call_state(client, "lost.1")
    assert state["transcripts"][0]["state"] == "delivered"
    attach = next(job for job in state["jobs"] if job["kind"] == "attach")
    assert attach["state"] == "done" and attach["dead_reason"] is None


def test_events_with_unknown_values_are_422_naming_the_allowed_ones(client: FlaskClient) -> None:
    response = client.post(
        "/hooks/pbx/generic",
        json={**FINISHED, "event": "call.ringing", "direction": "sideways", "status": "lost"},
        headers=auth(),
    )
    assert response.status_code == 422
    assert response.json is not None
    fields = response.json["error"]["fields"]
    assert "call.finished" in fields["event"][0]
    assert "inbound" in fields["direction"][0]
    assert "no-answer" in fields["status"][0]


def test_an_unknown_pbx_call_is_404_in_the_admin_api(client: FlaskClient) -> None:
    assert client.get("/v1/calls/generic/nope", headers=admin()).status_code == 404


# --- Asterisk -----------------------------------------------------------------------------------

CHANNEL_VARIABLES = {
    "CDR(linkedid)": "1732530030.42",
    "B24_DIRECTION": "inbound",
    "CALLERID(num)": "+15551234567",
    "CDR(dst)": "5550000000",
    "B24_EXT": "PJSIP/101",
    "CDR(start,u)": "1732530030.123456",
    "ANSWEREDTIME": "73",
    "DIALSTATUS": "ANSWER",
    "B24_RECORDING_URL": "",
}


def asterisk_body_from_readme(variables: dict[str, str]) -> str:
    """Expand the README snippet's CURL() post-data as Asterisk would."""
    match = re.search(r"\$\{CURL\(\$\{B24SCRIBE_URL\},(.*)\)\}\)\n", README.read_text())
    assert match, "the README's Asterisk snippet has no CURL(${B24SCRIBE_URL},…) line"
    template = match.group(1)
    body = re.sub(r"\$\{URIENCODE\(\$\{([^}]*)\}\)\}", lambda m: quote(variables[m.group(1)], safe=""), template)
    return re.sub(r"\$\{([^}]*)\}", lambda m: variables[m.group(1)], body)


def test_the_readme_asterisk_snippet_body_is_accepted_as_is(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    body = asterisk_body_from_readme(CHANNEL_VARIABLES)
    response = client.post(
        "/hooks/pbx/asterisk",
        data=body,
        headers={**auth(), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    post_transcript(client, "1732530030.42", pbx="asterisk")
    worker.drain()

    register = fake_bitrix24.calls_to("telephony.externalCall.register")[0]
    assert register.params["EXTERNAL_CALL_ID"] == "1732530030.42"
    assert register.params["USER_PHONE_INNER"] == "101"
    assert register.params["CALL_START_DATE"] == "2024-11-25T10:20:30+00:00"
    finish = fake_bitrix24.calls_to("telephony.externalCall.finish")[0]
    assert finish.params["DURATION"] == 73 and finish.params["STATUS_CODE"] == "200"
    assert len(fake_bitrix24.calls_to("telephony.call.attachTranscription")) == 1


def test_an_unanswered_asterisk_call_leaves_empty_variables_out(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    variables = {**CHANNEL_VARIABLES, "ANSWEREDTIME": "", "DIALSTATUS": "NOANSWER"}
    response = client.post(
        "/hooks/pbx/asterisk",
        data=asterisk_body_from_readme(variables),
        headers={**auth(), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 202
    worker.drain()
    finish = fake_bitrix24.calls_to("telephony.externalCall.finish")[0]
    assert finish.params["STATUS_CODE"] == "304" and finish.params["DURATION"] == 0


def _make_due_now(worker: Worker) -> None:
    from sqlalchemy import update

    from b24scribe.models import Job

    with worker.db.write() as session:
        session.execute(update(Job).where(Job.state == "pending").values(next_attempt_at=0))

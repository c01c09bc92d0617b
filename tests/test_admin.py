"""The admin API: an integrator finds a call by either id, sees the outbox, and replays dead jobs."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient

from app import create_app
from b24scribe.db import Database
from b24scribe.models import InboundEvent, Job
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from tests.conftest import ADMIN_TOKEN, INBOUND_TOKEN, admin, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.operations import CALL_ID, FINISHED, SENTENCE, make_dead_attach, post_call, post_transcript


def test_the_admin_api_is_disabled_without_an_admin_token(settings: Settings, db: Database) -> None:
    client = create_app(settings.with_overrides(admin_token=None)).test_client()

    response = client.get("/v1/jobs", headers=admin())

    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "admin_disabled"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {INBOUND_TOKEN}"},
        {"X-Token": ADMIN_TOKEN},
    ],
)
def test_the_admin_api_wants_the_admin_bearer_token(client: FlaskClient, headers: dict[str, str]) -> None:
    response = client.get("/v1/jobs", headers=headers)

    assert response.status_code == 401
    error = response.get_json()["error"]
    assert error["code"] == "unauthenticated"
    assert ADMIN_TOKEN not in response.get_data(as_text=True)


def test_the_admin_token_in_the_query_string_is_not_accepted(client: FlaskClient) -> None:
    assert client.get(f"/v1/jobs?token={ADMIN_TOKEN}").status_code == 401


def test_a_call_is_found_by_its_pbx_id_and_by_its_bitrix24_call_id(client: FlaskClient, worker: Worker) -> None:
    post_call(client)
    post_transcript(client)
    worker.drain()

    by_pbx = client.get(f"/v1/calls/generic/{quote(CALL_ID)}", headers=admin())
    assert by_pbx.status_code == 200
    call = by_pbx.get_json()
    assert call["finished"] is True and call["registered"] is True
    assert call["b24_call_id"]
    assert [t["state"] for t in call["transcripts"]] == ["delivered"]
    assert [job["kind"] for job in call["jobs"]] == ["register", "finish", "attach"]
    assert {job["state"] for job in call["jobs"]} == {"done"}

    by_b24 = client.get(f"/v1/calls/by-b24/{call['b24_call_id']}", headers=admin())
    assert by_b24.status_code == 200
    assert by_b24.get_json()["id"] == call["id"]


def test_an_unknown_call_is_a_404_in_the_error_shape(client: FlaskClient) -> None:
    for url in ("/v1/calls/generic/nope", "/v1/calls/by-b24/externalCall.nope"):
        response = client.get(url, headers=admin())
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "unknown_call"


def test_the_outbox_lists_counts_and_jobs_by_state(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    make_dead_attach(client, worker, fake_bitrix24)

    everything = client.get("/v1/jobs", headers=admin()).get_json()
    assert everything["counts"] == {"done": 4, "dead": 1}  # 2 events folded, register, finish
    assert len(everything["jobs"]) == 5

    dead = client.get("/v1/jobs?state=dead", headers=admin()).get_json()
    assert [job["kind"] for job in dead["jobs"]] == ["attach"]
    job = dead["jobs"][0]
    assert set(job) == {
        "id",
        "kind",
        "state",
        "attempts",
        "next_attempt_at",
        "last_error",
        "dead_reason",
        "call",
        "result",
    }
    assert "Transcription is too long" in job["last_error"] and job["dead_reason"] == "permanent"

    assert len(client.get("/v1/jobs?limit=1", headers=admin()).get_json()["jobs"]) == 1


@pytest.mark.parametrize(("query", "field"), [("state=lost", "state"), ("limit=many", "limit")])
def test_a_bad_outbox_query_is_a_422_naming_the_field(client: FlaskClient, query: str, field: str) -> None:
    response = client.get(f"/v1/jobs?{query}", headers=admin())

    assert response.status_code == 422
    assert field in response.get_json()["error"]["fields"]


def test_a_dead_job_is_replayed_and_delivered(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, db: Database
) -> None:
    make_dead_attach(client, worker, fake_bitrix24)
    dead_id = client.get("/v1/jobs?state=dead", headers=admin()).get_json()["jobs"][0]["id"]

    response = client.post(f"/v1/jobs/{dead_id}/retry", headers=admin())

    assert response.status_code == 202
    assert response.get_json()["state"] == "pending"
    assert response.get_json()["attempts"] == 0
    worker.drain()
    with db.read() as session:
        assert session.get_one(Job, dead_id).state == "done"
    sent = [request.params for request in fake_bitrix24.calls_to("telephony.call.attachTranscription")]
    assert any(SENTENCE in str(params) for params in sent)


def test_only_dead_jobs_are_replayed(client: FlaskClient, worker: Worker) -> None:
    post_call(client)
    worker.drain()
    done_id = client.get("/v1/jobs?state=done", headers=admin()).get_json()["jobs"][0]["id"]

    conflict = client.post(f"/v1/jobs/{done_id}/retry", headers=admin())
    missing = client.post("/v1/jobs/999999/retry", headers=admin())

    assert conflict.status_code == 409
    assert conflict.get_json()["error"]["code"] == "not_dead"
    assert missing.status_code == 404


@pytest.mark.parametrize("bad_id", [str(2**63), str(2**64), "9" * 40, "-1", "abc", "1e3", "%00"])
def test_an_id_no_row_can_have_is_a_404_in_the_error_shape(client: FlaskClient, bad_id: str) -> None:
    for response in (
        client.post(f"/v1/jobs/{bad_id}/retry", headers=admin()),
        client.get(f"/v1/events/{bad_id}", headers=admin()),
    ):
        assert response.status_code == 404, bad_id
        assert "error" in response.get_json()
    largest = client.post(f"/v1/jobs/{2**63 - 1}/retry", headers=admin())
    assert (largest.status_code, largest.get_json()["error"]["code"]) == (404, "unknown_job")


def test_an_event_tells_what_it_became(client: FlaskClient, worker: Worker) -> None:
    call_event = post_call(client)["event_id"]
    transcript_event = post_transcript(client)["event_id"]

    waiting = client.get(f"/v1/events/{transcript_event}", headers=admin())
    worker.drain()
    call_shown = client.get(f"/v1/events/{call_event}", headers=admin()).get_json()
    shown = client.get(f"/v1/events/{transcript_event}", headers=admin()).get_json()

    assert waiting.status_code == 200 and waiting.get_json()["outcome"] == "accepted"  # stored, not folded yet
    assert call_shown["source"] == "pbx" and call_shown["provider"] == "generic"
    assert call_shown["outcome"] == "folded" and call_shown["reason"] is None
    assert call_shown["call"]["pbx_call_id"] == CALL_ID and call_shown["call"]["b24_call_id"]
    assert [job["kind"] for job in call_shown["jobs"]] == ["apply", "register", "finish"]
    assert shown["source"] == "stt" and shown["outcome"] == "folded" and shown["received_at"]
    assert [t["state"] for t in shown["transcripts"]] == ["delivered"]
    assert {job["kind"] for job in shown["jobs"]} == {"apply", "attach"}
    assert shown["body_bytes"] > 0 and shown["purged_at"] is None
    assert SENTENCE not in str(shown)  # the transcript's text is not part of the answer


def test_a_rejected_event_tells_why(client: FlaskClient) -> None:
    rejected = client.post("/hooks/pbx/generic", json={**FINISHED, "status": "voicemail"}, headers=auth())
    event_id = rejected.get_json()["error"]["fields"]["event_id"]

    shown = client.get(f"/v1/events/{event_id}", headers=admin()).get_json()

    assert shown["state"] == "rejected" and shown["outcome"] == "rejected"
    assert shown["reason"].startswith("status: Must be one of")
    assert "status" in shown["fields"]
    assert shown["call"] is None and shown["jobs"] == [] and shown["transcripts"] == []


def test_an_unknown_event_is_a_404_and_the_api_wants_the_admin_token(client: FlaskClient) -> None:
    missing = client.get("/v1/events/424242", headers=admin())

    assert (missing.status_code, missing.get_json()["error"]["code"]) == (404, "unknown_event")
    assert client.get("/v1/events/1").status_code == 401


def test_any_stored_content_is_answered_as_json_every_parser_reads(client: FlaskClient, db: Database) -> None:
    hostile = "lone \ud800 surrogate \x00 and \x1b[31m" if db.is_sqlite else "escape \x1b[31m"
    with db.write() as session:
        event = InboundEvent(
            source="stt",
            provider="generic",
            dedupe_key="hostile",
            received_at=time.time(),
            content_type="application/json",
            query={"call": hostile},
            body=b"\xff\xfe\xed\xa0\x80",
            state="rejected",
            error={"message": hostile, "fields": {hostile: [hostile]}},
        )
        session.add(event)
        session.flush()
        event_id = event.id

    response = client.get(f"/v1/events/{event_id}", headers=admin())

    assert response.status_code == 200
    text = response.get_data().decode("utf-8")  # strict: valid UTF-8
    assert "\\ud800" not in text and "\\u0000" not in text and "\\u001b" not in text
    shown = json.loads(text)
    assert shown["query"]["call"].startswith(("lone \ufffd surrogate \ufffd", "escape \ufffd"))
    assert shown["body_bytes"] == 5


@pytest.mark.parametrize(
    "path",
    ["/v1/calls/generic/%00x", "/v1/calls/%00x/~", "/v1/calls/generic/" + "7" * 129, "/v1/calls/by-b24/x%01y"],
)
def test_a_call_id_no_row_can_have_is_a_404_on_every_backend(client: FlaskClient, path: str) -> None:
    response = client.get(path, headers=admin())  # NUL reached PostgreSQL as a 503 before

    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "unknown_call"


@pytest.mark.parametrize("limit", ["0", "-1", "1001", str(2**64), "many"])
def test_a_job_list_limit_outside_1_to_1000_is_a_422_naming_it(client: FlaskClient, limit: str) -> None:
    response = client.get(f"/v1/jobs?limit={limit}", headers=admin())

    assert response.status_code == 422
    assert "1 to 1000" in response.get_json()["error"]["fields"]["limit"][0]
    assert client.get("/v1/jobs?limit=1000", headers=admin()).status_code == 200

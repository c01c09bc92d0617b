"""The transcript hook's contract (contract §4, 5): who gets in, what is stored, what each status means."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, text

from app import create_app
from b24scribe import folding
from b24scribe.db import Database
from b24scribe.models import InboundEvent, Job, TranscriptPart
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import INBOUND_TOKEN, auth, sign_standard_webhook

TRANSCRIPT = {
    "segments": [
        {"start": 0.4, "end": 2.9, "text": "Good afternoon, Acme support", "channel": 0},
        {"start": 3.2, "end": 6.0, "text": "Hello, I have a question", "channel": 1},
    ],
    "cost": 0.12,
    "cost_currency": "USD",
}
URL = "/hooks/stt/generic?b24_call_id=externalCall.abc.1"


def count(db: Database, model: Any) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


@pytest.fixture
def database(app: Flask) -> Database:
    db: Database = app.extensions["b24scribe.db"]
    return db


class TestAuthentication:
    def test_a_request_without_credentials_is_refused_and_nothing_is_stored(
        self, client: FlaskClient, database: Database
    ) -> None:
        response = client.post(URL, json=TRANSCRIPT)
        assert response.status_code == 401
        assert response.json is not None
        assert response.json["error"]["code"] == "unauthenticated"
        assert count(database, InboundEvent) == 0

    def test_a_wrong_token_is_refused(self, client: FlaskClient, database: Database) -> None:
        response = client.post(URL, json=TRANSCRIPT, headers=auth("not-the-token"))
        assert response.status_code == 401
        assert INBOUND_TOKEN not in response.get_data(as_text=True)
        assert count(database, InboundEvent) == 0

    @pytest.mark.parametrize(
        "how",
        ["bearer", "query", "basic"],
    )
    def test_the_inbound_token_is_accepted_as_bearer_query_or_basic_password(
        self, client: FlaskClient, how: str
    ) -> None:
        headers: dict[str, str] = {}
        url = URL
        if how == "bearer":
            headers = auth()
        elif how == "query":
            url += f"&token={INBOUND_TOKEN}"
        else:
            headers = {"Authorization": "Basic " + base64.b64encode(f"deepgram:{INBOUND_TOKEN}".encode()).decode()}
        assert client.post(url, json=TRANSCRIPT, headers=headers).status_code == 202

    def test_the_token_is_not_kept_with_the_stored_query(self, client: FlaskClient, database: Database) -> None:
        client.post(URL + f"&token={INBOUND_TOKEN}", json=TRANSCRIPT)
        with database.read() as session:
            event = session.scalars(select(InboundEvent)).one()
            assert event.query == {"b24_call_id": "externalCall.abc.1"}

    def test_hooks_are_disabled_with_a_clear_503_when_no_token_is_configured(
        self, settings: Settings, db: Database
    ) -> None:
        client = create_app(settings.with_overrides(inbound_token=None, webhook_secret=None)).test_client()
        response = client.post(URL, json=TRANSCRIPT, headers=auth())
        assert response.status_code == 503
        assert response.json is not None
        assert "B24SCRIBE_INBOUND_TOKEN" in response.json["error"]["message"]
        assert count(db, InboundEvent) == 0

    def test_a_standard_webhooks_signature_authenticates(self, client: FlaskClient) -> None:
        body = json.dumps(TRANSCRIPT).encode()
        headers = {"Content-Type": "application/json", **sign_standard_webhook(body)}
        assert client.post(URL, data=body, headers=headers).status_code == 202

    def test_a_signature_over_other_bytes_is_refused(self, client: FlaskClient, database: Database) -> None:
        body = json.dumps(TRANSCRIPT).encode()
        headers = {"Content-Type": "application/json", **sign_standard_webhook(body)}
        tampered = body.replace(b"Hello", b"Howdy")
        response = client.post(URL, data=tampered, headers=headers)
        assert response.status_code == 401
        assert response.json is not None
        assert response.json["error"]["code"] == "bad_signature"
        assert count(database, InboundEvent) == 0

    def test_a_signature_older_than_five_minutes_is_refused(self, client: FlaskClient) -> None:
        body = json.dumps(TRANSCRIPT).encode()
        headers = {"Content-Type": "application/json", **sign_standard_webhook(body, timestamp=time.time() - 400)}
        assert client.post(URL, data=body, headers=headers).status_code == 401

    @pytest.mark.parametrize("value", ["Basic a\u00e90(:r_s", "Basic \u00ff\u00ff", "Basic ====", "Bearer", "\u00e9"])
    def test_a_malformed_authorization_header_is_a_401_never_a_500(
        self, client: FlaskClient, database: Database, value: str
    ) -> None:
        response = client.post(URL, json=TRANSCRIPT, headers={"Authorization": value})
        assert response.status_code == 401, response.get_data(as_text=True)
        assert response.json is not None and response.json["error"]["code"] == "bad_credentials"
        assert count(database, InboundEvent) == 0

    @pytest.mark.parametrize(
        ("header", "value"),
        [
            ("webhook-timestamp", "1e400"),
            ("webhook-timestamp", "9" * 5000),
            ("webhook-timestamp", "-99999999999999999999"),
            ("webhook-signature", "v1"),
            ("webhook-signature", "v1,%%%not-base64"),
            ("webhook-signature", "v2,abc v1,"),
            ("webhook-id", "\u00e9\u00e9"),
        ],
    )
    def test_a_malformed_signature_header_is_a_401_never_a_500(
        self, client: FlaskClient, database: Database, header: str, value: str
    ) -> None:
        body = json.dumps(TRANSCRIPT).encode()
        headers = {"Content-Type": "application/json", **sign_standard_webhook(body), header: value}
        response = client.post(URL, data=body, headers=headers)
        assert response.status_code == 401, response.get_data(as_text=True)
        assert response.json is not None and response.json["error"]["code"] == "bad_signature"
        assert count(database, InboundEvent) == 0


class TestStorage:
    def test_an_accepted_transcript_is_stored_with_its_raw_body_and_its_job_in_one_commit(
        self, client: FlaskClient, database: Database, worker: Worker
    ) -> None:
        body = json.dumps(TRANSCRIPT).encode()
        response = client.post(URL, data=body, headers={**auth(), "Content-Type": "application/json"})
        assert response.status_code == 202
        assert response.json is not None
        assert response.json["duplicate"] is False
        with database.read() as session:
            event = session.get_one(InboundEvent, response.json["event_id"])
            assert event.body == body
            assert event.state == "accepted"
            jobs = list(session.scalars(select(Job)))
            assert [(job.kind, job.state, job.event_id) for job in jobs] == [("apply", "pending", event.id)]

        folding.apply_pending(database, worker.settings, SOURCES)  # the worker folds it into its call

        with database.read() as session:
            jobs = list(session.scalars(select(Job).order_by(Job.id)))
            assert [(job.kind, job.state) for job in jobs] == [("apply", "done"), ("attach", "pending")]
            assert count(database, TranscriptPart) == 1

    def test_the_same_body_for_the_same_call_is_a_duplicate_with_no_second_job(
        self, client: FlaskClient, database: Database, worker: Worker
    ) -> None:
        first = client.post(URL, json=TRANSCRIPT, headers=auth())
        second = client.post(URL, json=TRANSCRIPT, headers=auth())
        assert first.status_code == 202
        assert second.status_code == 200
        assert second.json == {"event_id": first.json["event_id"], "duplicate": True}  # type: ignore[index]
        folding.apply_pending(database, worker.settings, SOURCES)
        assert count(database, Job) == 2  # one apply, one attach
        assert count(database, TranscriptPart) == 1

    def test_the_same_body_for_another_call_is_not_a_duplicate(self, client: FlaskClient, database: Database) -> None:
        client.post(URL, json=TRANSCRIPT, headers=auth())
        other = client.post("/hooks/stt/generic?b24_call_id=externalCall.other.2", json=TRANSCRIPT, headers=auth())
        assert other.status_code == 202
        assert count(database, Job) == 2

    def test_a_redelivery_with_the_same_standard_webhooks_id_is_a_duplicate(
        self, client: FlaskClient, database: Database
    ) -> None:
        body = json.dumps(TRANSCRIPT).encode()
        headers = {"Content-Type": "application/json", **sign_standard_webhook(body, msg_id="msg_1")}
        assert client.post(URL, data=body, headers=headers).status_code == 202
        again = {"Content-Type": "application/json", **sign_standard_webhook(body, msg_id="msg_1")}
        assert client.post(URL, data=body, headers=again).status_code == 200
        assert count(database, Job) == 1

    def test_a_body_over_the_limit_is_413(self, settings: Settings, db: Database) -> None:
        client = create_app(settings.with_overrides(max_body_bytes=2048)).test_client()
        big = {"segments": [{"start": 0, "end": 1, "text": "x" * 4000, "side": "User"}]}
        response = client.post(URL, json=big, headers=auth())
        assert response.status_code == 413
        assert response.json is not None
        assert response.json["error"]["code"] == "body_too_large"
        assert count(db, InboundEvent) == 0

    def test_a_database_that_cannot_store_answers_503_so_the_sender_retries(
        self, client: FlaskClient, database: Database
    ) -> None:
        with database.write() as session:
            session.execute(text("DROP TABLE job"))
        response = client.post(URL, json=TRANSCRIPT, headers=auth())
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"  # the contract for "could not store" (contract §5)
        assert response.json is not None
        assert response.json["error"]["code"] == "storage_unavailable"


def post_invalid(client: FlaskClient, body: Any, url: str = URL) -> dict[str, Any]:
    response = client.post(url, json=body, headers=auth())
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.json is not None
    error: dict[str, Any] = response.json["error"]
    assert error["code"] == "invalid_payload"
    return error


class TestValidation:
    def test_an_empty_segments_list_names_the_field(self, client: FlaskClient) -> None:
        error = post_invalid(client, {"segments": []})
        assert "segments" in error["fields"]

    def test_a_segment_ending_before_it_starts_names_the_field(self, client: FlaskClient) -> None:
        error = post_invalid(client, {"segments": [{"start": 5, "end": 2, "text": "hi", "channel": 0}]})
        assert "end" in error["fields"]["segments"]["0"]

    def test_an_unknown_side_names_the_allowed_values(self, client: FlaskClient) -> None:
        error = post_invalid(client, {"segments": [{"start": 0, "end": 2, "text": "hi", "side": "agent"}]})
        message = " ".join(error["fields"]["segments"]["0"]["side"])
        assert "User" in message and "Client" in message

    def test_a_mono_transcript_without_speakers_is_refused_with_advice(self, client: FlaskClient) -> None:
        error = post_invalid(client, {"segments": [{"start": 0, "end": 2, "text": "hi"}]})
        message = " ".join(error["fields"]["segments"])
        assert "channel" in message and "diariz" in message

    def test_a_body_that_is_not_json_is_422(self, client: FlaskClient) -> None:
        response = client.post(URL, data=b"{nope", headers={**auth(), "Content-Type": "application/json"})
        assert response.status_code == 422

    def test_a_transcript_that_names_no_call_is_422(self, client: FlaskClient) -> None:
        error = post_invalid(client, TRANSCRIPT, url="/hooks/stt/generic")
        assert "call" in error["fields"]

    def test_url_and_payload_naming_different_calls_is_422(self, client: FlaskClient) -> None:
        error = post_invalid(client, {**TRANSCRIPT, "b24_call_id": "externalCall.other.9"})
        assert "b24_call_id" in error["fields"]

    def test_a_bad_per_url_option_names_the_allowed_values(self, client: FlaskClient) -> None:
        error = post_invalid(client, TRANSCRIPT, url=URL + "&channel0=agent")
        assert "caller" in " ".join(error["fields"]["channel0"])

    def test_an_unprocessable_payload_is_kept_as_a_rejected_event_for_replay(
        self, client: FlaskClient, database: Database
    ) -> None:
        error = post_invalid(client, {"segments": []})
        with database.read() as session:
            event = session.get_one(InboundEvent, error["fields"]["event_id"])
            assert event.state == "rejected"
            assert event.body == json.dumps({"segments": []}).encode()
        assert count(database, Job) == 0

    def test_an_unknown_vendor_is_404(self, client: FlaskClient) -> None:
        assert client.post("/hooks/stt/nosuchvendor", json=TRANSCRIPT, headers=auth()).status_code == 404


def test_an_event_the_worker_fails_to_fold_is_retried_later_and_does_not_block_the_others(
    client: FlaskClient, database: Database, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = client.post(URL, json=TRANSCRIPT, headers=auth()).json["event_id"]  # type: ignore[index]
    client.post("/hooks/stt/generic?b24_call_id=externalCall.next.2", json=TRANSCRIPT, headers=auth())
    real_fold = folding.fold_batch
    broken = {"now": True}

    def fail_on_the_first(session: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        if broken["now"] and any(folding.event_id == first for folding in batch):
            raise RuntimeError("a bug in the fold")
        return real_fold(session, batch, *args, **kwargs)

    monkeypatch.setattr("b24scribe.folding.fold_batch", fail_on_the_first)
    assert folding.apply_pending(database, worker.settings, SOURCES) == 2
    with database.read() as session:
        applies = list(session.scalars(select(Job).where(Job.kind == "apply").order_by(Job.id)))
        assert [(job.state, job.attempts) for job in applies] == [("pending", 1), ("done", 0)]
        assert applies[0].last_error == "folding the event failed: RuntimeError"
        assert applies[0].next_attempt_at > time.time()  # backs off instead of spinning
        retried = applies[0].id
    with database.write() as session:
        session.get_one(Job, retried).next_attempt_at = 0
    broken["now"] = False  # the bug is fixed
    assert folding.apply_pending(database, worker.settings, SOURCES) == 1
    assert count(database, TranscriptPart) == 2


def test_a_stored_event_that_can_no_longer_be_read_is_a_dead_apply_job_with_the_reason(
    client: FlaskClient, database: Database, worker: Worker
) -> None:
    event_id = client.post(URL, json=TRANSCRIPT, headers=auth()).json["event_id"]  # type: ignore[index]
    with database.write() as session:  # as if the parser changed since the event was accepted
        session.get_one(InboundEvent, event_id).body = b'{"segments": []}'
    assert folding.apply_pending(database, worker.settings, SOURCES) == 1
    with database.read() as session:
        job = session.scalars(select(Job).where(Job.kind == "apply")).one()
        assert job.state == "dead"
        assert job.last_error is not None and job.last_error.startswith("the stored event can no longer be read")
        assert "segments" in job.last_error
    assert count(database, TranscriptPart) == 0

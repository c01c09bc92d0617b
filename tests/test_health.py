"""/livez answers without dependencies; /readyz says whether the service can do its job, and why not."""

from __future__ import annotations

import time

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.exc import OperationalError

from b24scribe import outbox
from b24scribe.db import Database
from b24scribe.worker import Worker


def test_livez_answers_without_authentication(client: FlaskClient) -> None:
    response = client.get("/livez")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_is_ready_with_a_fresh_worker_heartbeat(client: FlaskClient, worker: Worker) -> None:
    worker.housekeeping()

    response = client.get("/readyz")

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == {"ok": True}
    assert body["checks"]["worker"]["ok"] is True
    assert body["checks"]["worker"]["heartbeat_age_seconds"] < 5
    assert body["checks"]["queue"] == {"ok": True, "oldest_due_job_age_seconds": 0.0}


def test_readyz_is_unavailable_when_no_worker_ever_ran(client: FlaskClient) -> None:
    response = client.get("/readyz")

    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["checks"]["worker"] == {"ok": False, "heartbeat_age_seconds": None}
    assert body["checks"]["database"]["ok"] is True


def test_readyz_is_unavailable_when_the_worker_heartbeat_is_older_than_30_seconds(
    client: FlaskClient, worker: Worker
) -> None:
    worker.housekeeping(now=time.time() - 45)

    body = client.get("/readyz").get_json()

    assert body["status"] == "unavailable"
    assert body["checks"]["worker"]["ok"] is False
    assert body["checks"]["worker"]["heartbeat_age_seconds"] >= 45


def test_readyz_is_unavailable_when_a_due_job_waits_too_long(client: FlaskClient, worker: Worker, db: Database) -> None:
    worker.housekeeping()
    with db.write() as session:
        outbox.enqueue(session, "register", portal="p", now=time.time() - 900)

    response = client.get("/readyz")

    assert response.status_code == 503
    queue = response.get_json()["checks"]["queue"]
    assert queue["ok"] is False
    assert queue["oldest_due_job_age_seconds"] >= 900


def test_a_job_due_in_the_future_does_not_make_readyz_fail(client: FlaskClient, worker: Worker, db: Database) -> None:
    worker.housekeeping()
    with db.write() as session:
        job = outbox.enqueue(session, "register", portal="p")
        job.next_attempt_at = time.time() + 3600

    assert client.get("/readyz").status_code == 200


def test_readyz_reports_an_unwritable_database_by_error_class_only(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    db: Database = app.extensions["b24scribe.db"]

    def broken() -> None:
        raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked: /secret/path"))

    monkeypatch.setattr(db, "write", broken)

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json()["checks"]["database"] == {"ok": False, "error": "OperationalError"}
    assert "/secret/path" not in response.get_data(as_text=True)

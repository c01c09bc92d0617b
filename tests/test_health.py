"""/livez answers without dependencies; /readyz says whether the service can do its job, and why not."""

from __future__ import annotations

import threading
import time

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app import create_app
from b24scribe import outbox
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker

METRICS_TOKEN = "test-metrics-token-2b7d"


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

    monkeypatch.setattr(db, "read", broken)

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json()["checks"]["database"] == {"ok": False, "error": "OperationalError"}
    assert "/secret/path" not in response.get_data(as_text=True)


def test_readyz_does_not_wait_for_a_writer(client: FlaskClient, worker: Worker, db: Database) -> None:
    worker.housekeeping()
    holding, release = threading.Event(), threading.Event()

    def long_write() -> None:
        with db.write() as session:
            session.execute(text("UPDATE worker_heartbeat SET seen_at = seen_at"))
            holding.set()
            release.wait(10)

    writer = threading.Thread(target=long_write)
    writer.start()
    try:
        assert holding.wait(5)
        started = time.monotonic()
        response = client.get("/readyz")
        took = time.monotonic() - started
    finally:
        release.set()
        writer.join()

    assert response.status_code == 200, response.get_json()
    assert took < 1.0  # the write lock is someone else's: readiness only reads


def test_readyz_reports_a_database_that_would_refuse_writes(
    settings: Settings, db: Database, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker.housekeeping()
    if db.is_sqlite:
        app = create_app(settings)
        monkeypatch.setattr("handlers.health.os.access", lambda _path, _mode: False)
    else:  # the server itself says so, as a hot standby would
        separator = "&" if "?" in settings.database_url else "?"
        read_only = f"{settings.database_url}{separator}options=-cdefault_transaction_read_only%3Don"
        if "options=" in settings.database_url:  # keep the test's search_path
            read_only = settings.database_url.replace("options=", "options=-cdefault_transaction_read_only%3Don%20")
        app = create_app(settings.with_overrides(database_url=read_only))

    response = app.test_client().get("/readyz")

    assert response.status_code == 503
    assert response.get_json()["checks"]["database"] == {"ok": False, "error": "PermissionError"}


@pytest.fixture
def guarded(settings: Settings, db: Database) -> FlaskClient:
    """The app with B24SCRIBE_METRICS_TOKEN set."""
    return create_app(settings.with_overrides(metrics_token=METRICS_TOKEN)).test_client()


def test_with_a_metrics_token_readyz_answers_only_its_status_to_strangers(guarded: FlaskClient, worker: Worker) -> None:
    bare = guarded.get("/readyz")
    assert (bare.status_code, bare.get_json()) == (503, {"status": "unavailable"})
    worker.housekeeping()

    bare = guarded.get("/readyz")
    detailed = guarded.get("/readyz", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    wrong = guarded.get("/readyz", headers={"Authorization": "Bearer not-the-token"})

    assert (bare.status_code, bare.get_json()) == (200, {"status": "ok"})
    assert detailed.status_code == 200 and detailed.get_json()["checks"]["worker"]["ok"] is True
    assert wrong.status_code == 401 and wrong.get_json()["error"]["code"] == "unauthenticated"
    assert METRICS_TOKEN not in wrong.get_data(as_text=True)


def test_with_a_metrics_token_metrics_need_it(guarded: FlaskClient) -> None:
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": f"Basic {METRICS_TOKEN}"}).status_code == 401
    scraped = guarded.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200 and b"b24scribe_jobs" in scraped.data


def test_without_a_metrics_token_both_stay_open(client: FlaskClient) -> None:
    assert client.get("/metrics").status_code == 200
    assert "checks" in client.get("/readyz").get_json()

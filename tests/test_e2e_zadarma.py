"""Zadarma end to end: its signed notifications, as Zadarma posts them, through HTTP, the worker and
the fake Bitrix24. Each scenario (answered, busy, no answer, transfer, queue, outbound) is one
registered and finished call with the right user, status code and talk time; the URL check is echoed;
a forged signature stores nothing; a retried or replayed delivery is a 200 duplicate."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas import zadarma
from schemas.registry import SOURCES
from tests.conftest import INBOUND_TOKEN
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_new_sources import events

FIXTURES = Path(__file__).parent / "fixtures" / "zadarma"
SECRET = "zadarma-e2e-secret-4b7d"
HOOK = f"/hooks/pbx/zadarma?token={INBOUND_TOKEN}&tz=Europe/Moscow"  # the URL pasted at Zadarma
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def zadarma_app(settings: Settings, db: Database, fake_bitrix24: FakeBitrix24) -> Iterator[tuple[Flask, Worker]]:
    fake_bitrix24.add_user(3, "100")
    fake_bitrix24.add_user(2, "102", active=True)  # 101 is user 1
    configured = settings.with_overrides(vendor={"ZADARMA_API_SECRET": SECRET})
    app = create_app(configured)
    yield app, Worker(app.extensions["b24scribe.db"], configured, SOURCES)


def notifications(scenario: str) -> list[dict[str, str]]:
    """The scenario's notifications as Zadarma sends them now (call_start is signed and checked)."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    sent = []
    for path in sorted((FIXTURES / scenario).glob("*.form")):
        fields = dict(parse_qsl(path.read_text(), keep_blank_values=True))
        if "call_start" in fields:
            fields["call_start"] = now
        sent.append(fields)
    return sent


def post(client: FlaskClient, fields: dict[str, str], secret: str = SECRET, url: str = HOOK) -> Any:
    return client.post(
        url, data=urlencode(fields), content_type=FORM, headers={"Signature": zadarma.sign(secret, fields)}
    )


@pytest.mark.parametrize(
    ("scenario", "user", "status_code", "duration", "phone", "call_type"),
    [
        ("answered", {"USER_PHONE_INNER": "100"}, "200", 73, "+79161234567", 2),
        ("busy", {"USER_PHONE_INNER": "101"}, "486", 0, "+79161234567", 2),
        ("no_answer", {"USER_PHONE_INNER": "101"}, "304", 0, "+79161234567", 2),
        ("transfer", {"USER_PHONE_INNER": "102"}, "200", 95, "+79161234567", 2),
        ("queue", {"USER_PHONE_INNER": "101"}, "200", 48, "+79161234567", 2),
        ("outbound", {"USER_PHONE_INNER": "100"}, "200", 120, "+79169876543", 1),
    ],
)
def test_each_scenario_is_one_registered_and_finished_call(
    zadarma_app: tuple[Flask, Worker],
    fake_bitrix24: FakeBitrix24,
    scenario: str,
    user: dict[str, str],
    status_code: str,
    duration: int,
    phone: str,
    call_type: int,
) -> None:
    app, worker = zadarma_app
    client = app.test_client()
    sent = notifications(scenario)
    for fields in sent:
        answer = post(client, fields)
        if fields["event"] == "NOTIFY_RECORD":  # no B24SCRIBE_ZADARMA_API_KEY to ask Zadarma's API for it
            assert (answer.status_code, answer.get_json()) == (200, {"ignored": True})
        else:
            assert answer.status_code == 202, answer.get_json()
    worker.drain()

    [registered] = fake_bitrix24.calls_to("telephony.externalCall.register")
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert registered.params["EXTERNAL_CALL_ID"] == sent[0]["pbx_call_id"]
    assert (registered.params["PHONE_NUMBER"], int(registered.params["TYPE"])) == (phone, call_type)
    assert registered.params["CALL_START_DATE"].endswith("+03:00")  # ?tz=Europe/Moscow
    assert {key: finished.params.get(key) for key in user} == user
    assert (finished.params["STATUS_CODE"], int(finished.params["DURATION"])) == (status_code, duration)


def test_the_url_check_is_echoed_with_the_token_of_the_url_and_stores_nothing(
    zadarma_app: tuple[Flask, Worker], db: Database
) -> None:
    client = zadarma_app[0].test_client()
    echoed = client.get(HOOK + "&zd_echo=9f8e7d6c")
    assert (echoed.status_code, echoed.get_data()) == (200, b"9f8e7d6c")
    assert client.get("/hooks/pbx/zadarma?zd_echo=9f8e7d6c").status_code == 401  # no credential
    assert client.get(HOOK).status_code == 400  # a GET that is no URL check
    assert events(db) == 0


def test_a_forged_signature_is_refused_and_nothing_is_stored(
    zadarma_app: tuple[Flask, Worker], db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    app, worker = zadarma_app
    client = app.test_client()
    end = notifications("answered")[3]
    forged = post(client, end, secret="not-the-secret")
    assert (forged.status_code, forged.get_json()["error"]["code"]) == (401, "bad_signature")
    tampered = client.post(
        HOOK,
        data=urlencode(end | {"caller_id": "+70000000000"}),
        content_type=FORM,
        headers={"Signature": zadarma.sign(SECRET, end)},
    )
    assert tampered.status_code == 401
    stale = end | {"call_start": "2020-01-01 00:00:00"}
    assert post(client, stale).status_code == 401
    unsigned = client.post("/hooks/pbx/zadarma", data=urlencode(end), content_type=FORM)
    assert unsigned.status_code == 401
    worker.drain()
    assert events(db) == 0
    assert fake_bitrix24.calls_to("telephony.externalCall.register") == []


def test_a_retried_or_replayed_delivery_is_a_duplicate(
    zadarma_app: tuple[Flask, Worker], fake_bitrix24: FakeBitrix24
) -> None:
    app, worker = zadarma_app
    client = app.test_client()
    start, _, _, end = notifications("no_answer")
    assert post(client, start).status_code == 202
    first = post(client, end)
    retried = post(client, end)
    assert (first.status_code, retried.status_code) == (202, 200)
    assert retried.get_json() == {"event_id": first.get_json()["event_id"], "duplicate": True}
    # the same signature on other unsigned values (a "no answer" made answered): the same delivery
    replayed = client.post(
        HOOK,
        data=urlencode(end | {"disposition": "answered", "duration": "600"}),
        content_type=FORM,
        headers={"Signature": zadarma.sign(SECRET, end)},
    )
    assert (replayed.status_code, replayed.get_json()["duplicate"]) == (200, True)
    worker.drain()
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert (finished.params["STATUS_CODE"], int(finished.params["DURATION"])) == ("304", 0)


def test_without_the_secret_the_token_in_the_url_carries_the_notifications(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    app = create_app(settings)
    client = app.test_client()
    for fields in notifications("busy"):
        assert client.post(HOOK, data=urlencode(fields), content_type=FORM).status_code == 202
    Worker(app.extensions["b24scribe.db"], settings, SOURCES).drain()
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert finished.params["STATUS_CODE"] == "486"


@pytest.mark.parametrize(("scenario", "inner", "status_code"), [("transfer", "102", "200"), ("queue", "101", "200")])
def test_a_worker_that_runs_between_notifications_gives_the_same_call(
    zadarma_app: tuple[Flask, Worker], fake_bitrix24: FakeBitrix24, scenario: str, inner: str, status_code: str
) -> None:
    app, worker = zadarma_app
    client = app.test_client()
    for fields in notifications(scenario):
        assert post(client, fields).status_code == 202
        worker.drain()
    [_registered] = fake_bitrix24.calls_to("telephony.externalCall.register")  # once
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert (finished.params["USER_PHONE_INNER"], finished.params["STATUS_CODE"]) == (inner, status_code)

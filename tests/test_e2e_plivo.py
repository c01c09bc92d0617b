"""Plivo end to end: each scenario's callbacks (tests/fixtures/plivo/), signed with X-Plivo-Signature-V3
over the URL Plivo was given (B24SCRIBE_PUBLIC_URL + path + query), go through HTTP, the worker and the
fake Bitrix24 and become ONE registered and finished call with the right user, status and duration.
A forged signature is a 401 with nothing stored; a retried delivery is a 200 duplicate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import admin, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_new_sources import events
from tests.test_schemas_plivo import AUTH_TOKEN, PATH, PUBLIC_URL, SCENARIOS, fixture, plivo_sign

CALL_SCENARIOS = [name for name in SCENARIOS if name != "recording"]


@pytest.fixture
def plivo_app(settings: Settings, db: Database, fake_bitrix24: FakeBitrix24) -> Iterator[tuple[Flask, Worker]]:
    fake_bitrix24.add_user(3, "103")  # the agent a call is transferred to, or a queue member
    configured = settings.with_overrides(
        vendor={"PLIVO_AUTH_TOKEN": AUTH_TOKEN}, public_url=PUBLIC_URL, default_user_id=1
    )
    app = create_app(configured)
    yield app, Worker(app.extensions["b24scribe.db"], configured, SOURCES)


def post(
    client: FlaskClient,
    fields: dict[str, str],
    query: dict[str, str] | None = None,
    nonce: str = "31415926535897932384",
    token: str = AUTH_TOKEN,
    signed_url: str | None = None,
) -> Any:
    """POST a callback as Plivo does: form-encoded, signed over the public URL with a fresh nonce."""
    query_string = urlencode(query or {})
    path = PATH + (f"?{query_string}" if query_string else "")
    signature = plivo_sign(token, signed_url or PUBLIC_URL + path, fields, nonce)
    return client.post(
        path,
        data=urlencode(fields),
        content_type="application/x-www-form-urlencoded",
        headers={"X-Plivo-Signature-V3": signature, "X-Plivo-Signature-V3-Nonce": nonce},
    )


@pytest.mark.parametrize("name", CALL_SCENARIOS)
def test_each_scenario_is_one_call_with_the_right_user_status_and_duration(
    name: str, plivo_app: tuple[Flask, Worker], fake_bitrix24: FakeBitrix24
) -> None:
    app, worker = plivo_app
    client = app.test_client()
    scenario = fixture(name)
    for number, callback in enumerate(scenario["callbacks"]):
        answer = post(client, callback["fields"], scenario.get("query"), nonce=f"{number:020d}")
        assert answer.status_code == 202, (callback["callback"], answer.get_json())
        worker.drain()  # as they come: each callback folds before the next arrives

    [registered] = fake_bitrix24.calls_to("telephony.externalCall.register")
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    expected = scenario["bitrix24"]
    assert {key: registered.params[key] for key in expected["register"]} == expected["register"]
    assert {key: finished.params.get(key) for key in expected["finish"]} == expected["finish"]
    user_keys = {"USER_ID", "USER_PHONE_INNER"}
    assert set(finished.params) & user_keys == set(expected["finish"]) & user_keys


def test_a_scenario_delivered_at_once_and_out_of_order_ends_the_same(
    plivo_app: tuple[Flask, Worker], fake_bitrix24: FakeBitrix24
) -> None:
    app, worker = plivo_app
    client = app.test_client()
    callbacks = fixture("queue")["callbacks"]
    # the answered leg's hangup first, the legs that lost the race after it, all folded in one batch
    for number, callback in enumerate([callbacks[5], callbacks[0], callbacks[4], callbacks[1], *callbacks[6:]]):
        assert post(client, callback["fields"], nonce=f"{number:020d}").status_code == 202
    worker.drain()
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert (finished.params["USER_PHONE_INNER"], finished.params["STATUS_CODE"], finished.params["DURATION"]) == (
        "103",
        "200",
        130,
    )


def test_a_recording_callback_lands_on_its_call(plivo_app: tuple[Flask, Worker], fake_bitrix24: FakeBitrix24) -> None:
    app, worker = plivo_app
    client = app.test_client()
    for number, callback in enumerate(fixture("inbound_answered")["callbacks"]):
        assert post(client, callback["fields"], nonce=f"{number:020d}").status_code == 202
    recording = fixture("recording")["callbacks"][0]
    assert post(client, recording["fields"], nonce="7" * 20).status_code == 202
    worker.drain()
    call = client.get(f"/v1/calls/plivo/{recording['fields']['CallUUID']}", headers=admin())
    assert call.status_code == 200
    assert recording["fields"]["RecordUrl"] in str(call.get_json())
    assert len(fake_bitrix24.calls_to("telephony.externalCall.finish")) == 1


def test_a_forged_signature_is_a_401_and_nothing_is_stored(plivo_app: tuple[Flask, Worker], db: Database) -> None:
    client = plivo_app[0].test_client()
    hangup = fixture("inbound_answered")["callbacks"][-1]["fields"]
    forged = post(client, hangup, token="guessed-auth-token")
    assert (forged.status_code, forged.get_json()["error"]["code"]) == (401, "bad_signature")
    # signed for the request's own host instead of the public URL Plivo was given
    elsewhere = post(client, hangup, signed_url="http://localhost" + PATH)
    assert elsewhere.status_code == 401
    # signed without ?portal=…, sent with it
    moved = post(client, hangup, query={"portal": "other"}, signed_url=PUBLIC_URL + PATH)
    assert moved.status_code == 401
    unsigned = client.post(PATH, data=urlencode(hangup), content_type="application/x-www-form-urlencoded")
    assert unsigned.status_code == 401
    assert events(db) == 0


def test_the_inbound_token_still_works_beside_the_signature(plivo_app: tuple[Flask, Worker], db: Database) -> None:
    client = plivo_app[0].test_client()
    hangup = fixture("inbound_answered")["callbacks"][-1]["fields"]
    answer = client.post(PATH, data=urlencode(hangup), content_type="application/x-www-form-urlencoded", headers=auth())
    assert answer.status_code == 202
    assert events(db) == 1


def test_without_the_auth_token_the_bearer_token_authenticates(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    client = create_app(settings).test_client()
    hangup = fixture("inbound_answered")["callbacks"][-1]["fields"]
    signed_only = post(client, hangup)  # nobody can check it: not accepted on its own
    assert signed_only.status_code == 401
    with_token = client.post(
        PATH, data=urlencode(hangup), content_type="application/x-www-form-urlencoded", headers=auth()
    )
    assert with_token.status_code == 202


def test_a_retried_delivery_is_a_200_duplicate(plivo_app: tuple[Flask, Worker], db: Database) -> None:
    client = plivo_app[0].test_client()
    hangup = fixture("inbound_answered")["callbacks"][-1]["fields"]
    first = post(client, hangup, nonce="11111111111111111111")
    again = post(client, hangup, nonce="11111111111111111111")  # the same request, replayed
    retried = post(client, hangup, nonce="22222222222222222222")  # Plivo's retry, signed anew
    assert (first.status_code, again.status_code, retried.status_code) == (202, 200, 200)
    assert first.get_json()["event_id"] == again.get_json()["event_id"] == retried.get_json()["event_id"]
    assert again.get_json()["duplicate"] is True
    assert events(db) == 1

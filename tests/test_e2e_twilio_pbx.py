"""Twilio Programmable Voice end to end: each scenario's callbacks, signed as Twilio signs them, go
through the hook, the worker and the fake Bitrix24, and each call is registered and finished once
with the right user, status code and duration. A forged signature is a 401 and nothing is stored; a
retried delivery is a duplicate."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient
from twilio.request_validator import RequestValidator

from app import create_app
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_new_sources import events
from tests.test_schemas_twilio_pbx import AUTH_TOKEN, CUSTOMER, CUSTOMER2, FIXTURES, call, fixture

PUBLIC_URL = "https://b24scribe.example.com"  # the URL Twilio was given: its signatures cover it
PATH = "/hooks/pbx/twilio"


@pytest.fixture
def twilio_app(settings: Settings, db: Database, fake_bitrix24: FakeBitrix24) -> Flask:
    fake_bitrix24.add_user(3, "103")
    return create_app(settings.with_overrides(vendor={"TWILIO_AUTH_TOKEN": AUTH_TOKEN}, public_url=PUBLIC_URL))


@pytest.fixture
def drain(twilio_app: Flask) -> Any:
    app = twilio_app
    return Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES).drain


def signature(url: str, body: bytes, token: str = AUTH_TOKEN) -> str:
    params = dict(parse_qsl(body.decode(), keep_blank_values=True))
    return str(RequestValidator(token).compute_signature(url, params))


def post(
    client: FlaskClient,
    body: bytes,
    query: str = "",
    token: str = AUTH_TOKEN,
    signed_url: str | None = None,
    delivery: str | None = None,
) -> Any:
    """POST a callback as Twilio does: form fields, X-Twilio-Signature over the URL and the fields."""
    path = f"{PATH}?{query}" if query else PATH
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": signature(signed_url or PUBLIC_URL + path, body, token),
    }
    if delivery:
        headers["I-Twilio-Idempotency-Token"] = delivery
    return client.post(path, data=body, headers=headers)


SCENARIOS = {
    # scenario: the (USER_PHONE_INNER, STATUS_CODE, DURATION) Bitrix24 is finished with
    "answered": ("101", "200", 42),
    "busy": ("101", "486", 0),
    "no_answer": ("101", "304", 0),
    "transfer": ("103", "200", 60),
    "queue": ("103", "200", 75),
}


def post_scenario(client: FlaskClient, scenario: str, query: str = "", drain: Any = None) -> None:
    """Post a scenario's callbacks in order; with `drain`, the worker runs after each (as in real time)."""
    for path in sorted(FIXTURES.glob(f"{scenario}_*.txt")):
        answer = post(client, path.read_bytes().strip(), query if "_customer_" in path.stem else "")
        assert answer.status_code == 202, (path.stem, answer.get_json())
        if drain is not None:
            drain()


@pytest.mark.parametrize("real_time", [False, True], ids=["batch", "real-time"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_each_scenario_is_one_call_with_its_user_status_and_duration(
    scenario: str, real_time: bool, twilio_app: Flask, drain: Any, fake_bitrix24: FakeBitrix24
) -> None:
    post_scenario(twilio_app.test_client(), scenario, drain=drain if real_time else None)
    drain()

    [registered] = fake_bitrix24.calls_to("telephony.externalCall.register")
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert {name: registered.params.get(name) for name in ("EXTERNAL_CALL_ID", "PHONE_NUMBER", "TYPE")} == {
        "EXTERNAL_CALL_ID": call({"answered": 1, "busy": 2, "no_answer": 3, "transfer": 4, "queue": 5}[scenario]),
        "PHONE_NUMBER": CUSTOMER,
        "TYPE": 2,  # inbound
    }
    user, status_code, duration = SCENARIOS[scenario]
    assert finished.params["CALL_ID"] == registered.response["result"]["CALL_ID"]  # type: ignore[index]
    assert (finished.params["USER_PHONE_INNER"], finished.params["STATUS_CODE"], finished.params["DURATION"]) == (
        user,
        status_code,
        duration,
    )
    if scenario == "answered":  # the recording is attached after finish, whenever its callback came
        [record] = fake_bitrix24.calls_to("telephony.externalCall.attachRecord")  # url mode in the tests
        assert record.params["RECORD_URL"].endswith(f"/Recordings/RE{1:032x}.mp3")


def test_an_agent_calling_a_customer_is_an_outbound_call(
    twilio_app: Flask, drain: Any, fake_bitrix24: FakeBitrix24
) -> None:
    post_scenario(twilio_app.test_client(), "outbound", query="direction=outbound")
    drain()

    [registered] = fake_bitrix24.calls_to("telephony.externalCall.register")
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    assert (registered.params["TYPE"], registered.params["PHONE_NUMBER"]) == (1, CUSTOMER2)
    assert (finished.params["USER_PHONE_INNER"], finished.params["STATUS_CODE"], finished.params["DURATION"]) == (
        "101",
        "200",
        33,
    )


def test_a_forged_signature_is_refused_and_nothing_is_stored(
    twilio_app: Flask, db: Database, fake_bitrix24: FakeBitrix24, drain: Any
) -> None:
    client = twilio_app.test_client()
    body = fixture("answered_05_completed")
    for answer in [
        post(client, body, token="guessed-token"),
        client.post(  # a field changed after signing
            PATH,
            data=body.replace(b"CallStatus=completed", b"CallStatus=busy"),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": signature(PUBLIC_URL + PATH, body),
            },
        ),
        post(client, body, query="portal=other", signed_url=PUBLIC_URL + PATH),  # signed for another URL
        client.post(PATH, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}),  # unsigned
    ]:
        assert answer.status_code == 401, answer.get_json()
    assert events(db) == 0
    drain()
    assert fake_bitrix24.requests == []


def test_a_retried_delivery_is_a_duplicate(twilio_app: Flask, db: Database) -> None:
    client = twilio_app.test_client()
    body = fixture("answered_04_agent_completed")
    token = "a1b2c3d4-idempotency-token"
    first = post(client, body, delivery=token)
    again = post(client, body, delivery=token)
    # Twilio's retry carries the same idempotency token: a duplicate even were its bytes to differ
    other = post(client, body.replace(b"SequenceNumber=3", b"SequenceNumber=4"), delivery=token)
    replayed = post(client, fixture("answered_05_completed"))
    replayed_again = post(client, fixture("answered_05_completed"))  # no token: the call id and the bytes
    assert [a.status_code for a in (first, again, other, replayed, replayed_again)] == [202, 200, 200, 202, 200]
    assert again.get_json() == {"event_id": first.get_json()["event_id"], "duplicate": True}
    assert replayed_again.get_json()["duplicate"] is True
    assert events(db) == 2


def test_a_get_callback_is_signed_over_its_url(twilio_app: Flask, db: Database) -> None:
    client = twilio_app.test_client()
    query = fixture("answered_01_agent_initiated").decode()
    url = f"{PUBLIC_URL}{PATH}?{query}"
    good = client.get(f"{PATH}?{query}", headers={"X-Twilio-Signature": signature(url, b"")})
    forged = client.get(f"{PATH}?{query}", headers={"X-Twilio-Signature": signature(url, b"", "guess")})
    assert (good.status_code, forged.status_code) == (202, 401)
    assert events(db) == 1


def test_the_inbound_token_works_when_no_auth_token_is_set(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    client = create_app(settings).test_client()
    body = fixture("answered_05_completed")
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    assert client.post(PATH, data=body, headers={**headers, **auth()}).status_code == 202
    assert client.post(f"{PATH}?token=wrong", data=body, headers=headers).status_code == 401
    unsigned = urlencode({"CallSid": call(1), "CallStatus": "ringing"}).encode()
    assert client.post(PATH, data=unsigned, headers=headers).status_code == 401
    assert events(db) == 1

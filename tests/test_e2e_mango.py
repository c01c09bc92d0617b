"""Mango Office through HTTP, the worker and the fake Bitrix24: every scenario's events, signed as
Mango signs them and folded as they arrive, make one registered and one finished call with the right
employee, status and duration. A forged sign stores nothing; a repeated delivery is a duplicate."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from app import create_app
from b24scribe.db import Database
from b24scribe.models import Call
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_new_sources import events
from tests.test_schemas_mango import API_KEY, API_SALT, LINK, entry, form, scenario

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
# Bitrix24 users by inner phone (the fake seeds 101 → user 1, and 102 as an inactive user 2)
USERS = {"102": 12, "103": 13, "104": 14}


@pytest.fixture
def mango_app(settings: Settings, db: Database, fake_bitrix24: FakeBitrix24) -> Flask:
    for inner_phone, user_id in USERS.items():
        fake_bitrix24.add_user(user_id, inner_phone)
    return create_app(settings.with_overrides(vendor={"MANGO_API_KEY": API_KEY, "MANGO_API_SALT": API_SALT}))


@pytest.fixture
def drain(mango_app: Flask) -> Callable[[], object]:
    app = mango_app
    worker = Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES)
    return worker.drain


@pytest.fixture
def post(mango_app: Flask) -> Callable[..., Any]:
    client = mango_app.test_client()

    def post(body: bytes, headers: dict[str, str] | None = None) -> Any:
        return client.post("/hooks/pbx/mango", data=body, headers={**FORM, **(headers or {})})

    return post


@pytest.mark.parametrize(
    ("name", "user", "status_code", "duration", "call_type"),
    [
        ("answered", {"USER_PHONE_INNER": "101"}, "200", 73, 2),
        ("busy", {"USER_PHONE_INNER": "102"}, "486", 0, 2),
        ("no_answer", {"USER_PHONE_INNER": "103"}, "304", 0, 2),
        ("transfer", {"USER_PHONE_INNER": "102"}, "200", 120, 2),  # the agent it was transferred to
        ("queue", {"USER_PHONE_INNER": "102"}, "200", 180, 2),  # the agent who answered, not the IVR
        ("outbound", {"USER_PHONE_INNER": "104"}, "200", 43, 1),
    ],
)
@pytest.mark.parametrize("arrival", ["as-they-happen", "all-at-once"])
def test_each_scenario_is_one_call_with_the_right_user_status_and_duration(
    post: Callable[..., Any],
    drain: Callable[[], object],
    fake_bitrix24: FakeBitrix24,
    name: str,
    user: dict[str, str],
    status_code: str,
    duration: int,
    call_type: int,
    arrival: str,
) -> None:
    for event in scenario(name):
        assert post(form(event)).status_code == 202
        if arrival == "as-they-happen":
            drain()  # the worker folds and delivers between Mango's events, as it does live
    drain()

    [registered] = fake_bitrix24.calls_to("telephony.externalCall.register")
    assert registered.params["EXTERNAL_CALL_ID"] == entry(name)
    assert registered.params["TYPE"] == call_type
    [finished] = fake_bitrix24.calls_to("telephony.externalCall.finish")
    params = finished.params
    assert {key: params[key] for key in user} == user
    assert "USER_ID" not in params
    assert (params["STATUS_CODE"], params["DURATION"]) == (status_code, duration)
    number = registered.params["PHONE_NUMBER"]
    assert number == ("74959876543" if name == "outbound" else "79161234567")


def test_a_recording_after_the_call_keeps_its_mango_link(
    post: Callable[..., Any], drain: Callable[[], object], fake_bitrix24: FakeBitrix24, db: Database
) -> None:
    for event in scenario("answered") + scenario("recording"):
        assert post(form(event)).status_code == 202
    drain()
    assert len(fake_bitrix24.calls_to("telephony.externalCall.register")) == 1
    assert len(fake_bitrix24.calls_to("telephony.externalCall.finish")) == 1
    with db.read() as session:
        [call] = session.scalars(select(Call).where(Call.pbx == "mango")).all()
    assert (call.pbx_call_id, call.status, call.duration) == (entry("answered"), "answered", 73)
    assert call.recording_url == LINK.format("MToxMDAxNjMyMToxMjM0NTY3ODk6MA%3D%3D")


def test_a_forged_sign_is_a_401_and_nothing_is_stored(post: Callable[..., Any], db: Database) -> None:
    event = scenario("answered")[0]
    for body in (
        form(event, salt="guessed"),
        form(event, key="another-vpbx"),
        form(event, sign="0" * 64),
        form(json.dumps(event)).replace(b"79161234567", b"79160000000"),  # the json changed after signing
        b"json=" + json.dumps(event).encode(),  # unsigned, no token
    ):
        refused = post(body)
        assert (refused.status_code, refused.get_json()["error"]["code"]) == (401, "bad_signature")
    wrong_token = post(form(event, salt="guessed"), headers={"Authorization": "Bearer nope"})
    assert wrong_token.status_code == 401
    assert events(db) == 0


def test_a_retried_delivery_is_a_duplicate(
    post: Callable[..., Any], drain: Callable[[], object], db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    bodies = [form(event) for event in scenario("answered")]
    first, again = post(bodies[0]), post(bodies[0])
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json() == {"event_id": first.get_json()["event_id"], "duplicate": True}
    for body in bodies[1:]:
        assert post(body).status_code == 202
    drain()
    for body in bodies:  # Mango retries each, after the call was delivered: nothing happens again
        assert post(body).status_code == 200
    drain()
    assert events(db) == len(bodies)
    assert len(fake_bitrix24.calls_to("telephony.externalCall.register")) == 1
    assert len(fake_bitrix24.calls_to("telephony.externalCall.finish")) == 1


def test_the_inbound_token_still_works_and_a_check_without_an_event_stores_nothing(
    post: Callable[..., Any], db: Database
) -> None:
    unsigned = b"json=" + json.dumps(scenario("busy")[0]).encode()
    assert post(unsigned, headers=auth()).status_code == 202
    ping = post(b"", headers=auth())
    assert ping.status_code == 200
    dtmf = form({"entry_id": "e-dtmf", "call_id": "c1", "dtmf": "5", "seq": 3, "timestamp": 1765090810})
    assert post(dtmf).status_code == 200
    assert events(db) == 1


def test_an_unreadable_event_is_kept_as_rejected_with_its_field(post: Callable[..., Any], db: Database) -> None:
    rejected = post(form({"entry_id": "e-bad", "call_state": "Ringing"}))
    assert rejected.status_code == 422
    assert "call_state" in rejected.get_json()["error"]["fields"]["json"]
    assert events(db) == 1


def test_mango_posting_below_its_url_reaches_the_same_hook(
    mango_app: Flask, drain: Callable[[], object], fake_bitrix24: FakeBitrix24
) -> None:
    client = mango_app.test_client()
    for index, event in enumerate(scenario("answered")):
        path = "/hooks/pbx/mango/events/" + ("summary" if index == len(scenario("answered")) - 1 else "call")
        assert client.post(path, data=form(event), headers=FORM).status_code == 202, path
    drain()
    assert len(fake_bitrix24.calls_to("telephony.externalCall.finish")) == 1
    # only a source that posts below its URL takes such paths
    assert client.post("/hooks/pbx/generic/events/call", json={}, headers=auth()).status_code == 404
    assert client.post("/hooks/pbx/mango/", data=form(scenario("answered")[0]), headers=FORM).status_code == 404

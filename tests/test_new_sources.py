"""A new signed PBX and a new STT vendor, each added as one module plus one registry line
(tests/sources/), are served, verified, documented, counted, checked and delivered end to end with
no other change to the service."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app import create_app
from b24scribe.checks import check_sources
from b24scribe.db import Database
from b24scribe.models import InboundEvent
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from tests.conftest import auth, finished_call
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_vendor_api import FakeVendorApi
from tests.sources import SOURCES, acme_pbx

SECRET = "acme-test-secret-5e1f"
URL = "http://localhost/hooks/pbx/acmepbx"  # what the test client's requests are addressed to


@pytest.fixture
def acme(settings: Settings, db: Database) -> Iterator[tuple[Flask, Worker]]:
    configured = settings.with_overrides(vendor={"ACMEPBX_WEBHOOK_SECRET": SECRET})
    app = create_app(configured, sources=SOURCES)
    yield app, Worker(app.extensions["b24scribe.db"], configured, SOURCES)


def signed(event: dict[str, Any], url: str = URL, secret: str = SECRET, delivery: str | None = None) -> dict[str, Any]:
    body = json.dumps(event).encode()
    headers = {"Content-Type": "application/json", "X-Acme-Signature": acme_pbx.sign(secret, url, body)}
    if delivery:
        headers["X-Acme-Delivery"] = delivery
    return {"data": body, "headers": headers}


def events(db: Database) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.count()).select_from(InboundEvent)) or 0)


def test_a_signed_pbx_is_verified_on_its_url_and_body_before_anything_is_stored(
    acme: tuple[Flask, Worker], db: Database
) -> None:
    client = acme[0].test_client()
    ringing = {"id": "acme-1", "type": "ringing", "caller": "+15551234567", "agent": "101"}

    assert client.post("/hooks/pbx/acmepbx", **signed(ringing)).status_code == 202
    wrong_key = client.post("/hooks/pbx/acmepbx", **signed({**ringing, "id": "acme-2"}, secret="guess"))
    assert (wrong_key.status_code, wrong_key.get_json()["error"]["code"]) == (401, "bad_signature")
    # signed for another URL (a body replayed against another hook): refused
    elsewhere = client.post("/hooks/pbx/acmepbx", **signed({**ringing, "id": "acme-3"}, url=URL + "?portal=x"))
    assert elsewhere.status_code == 401
    unsigned = client.post("/hooks/pbx/acmepbx", json={**ringing, "id": "acme-4"})
    assert unsigned.status_code == 401
    # the token every hook takes still works for it
    assert client.post("/hooks/pbx/acmepbx", json={**ringing, "id": "acme-5"}, headers=auth()).status_code == 202
    assert events(db) == 2


def test_a_source_may_take_a_get_to_check_its_url_and_others_still_refuse_it(
    acme: tuple[Flask, Worker], db: Database
) -> None:
    client = acme[0].test_client()
    echoed = client.get("/hooks/pbx/acmepbx?echo=zd-42", headers=auth())
    assert (echoed.status_code, echoed.get_data()) == (200, b"zd-42")
    assert client.get("/hooks/pbx/acmepbx?echo=zd-42").status_code == 401  # authenticated like events
    refused = client.get("/hooks/pbx/generic", headers=auth())
    assert (refused.status_code, refused.headers["Allow"]) == (405, "POST")
    assert events(db) == 0


def test_its_delivery_id_makes_a_retry_a_duplicate_even_with_other_bytes(acme: tuple[Flask, Worker]) -> None:
    client = acme[0].test_client()
    first = client.post("/hooks/pbx/acmepbx", **signed({"id": "acme-7", "type": "ringing"}, delivery="d-1"))
    again = client.post("/hooks/pbx/acmepbx", **signed({"type": "ringing", "id": "acme-7"}, delivery="d-1"))
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.get_json()["event_id"] == again.get_json()["event_id"]


def test_a_call_from_the_new_pbx_with_a_transcript_from_the_new_vendor_lands_in_bitrix24(
    acme: tuple[Flask, Worker], fake_bitrix24: FakeBitrix24
) -> None:
    app, worker = acme
    client = app.test_client()
    for kind in ("ringing", "answered"):
        event = {"id": "acme-9", "type": kind, "caller": "+15551234567", "agent": "101"}
        assert client.post("/hooks/pbx/acmepbx", **signed(event)).status_code == 202
    hangup = {"id": "acme-9", "type": "hangup", "caller": "+15551234567", "agent": "101", "duration": 31}
    assert client.post("/hooks/pbx/acmepbx", **signed(hangup)).status_code == 202
    transcript = {
        "job": "echo-1",
        "call": "acme-9",
        "lines": [
            {"who": "customer", "start": 0.0, "end": 2.5, "text": "Hello, is this the shop?"},
            {"who": "agent", "start": 2.5, "end": 4.0, "text": "Yes, how can I help?"},
        ],
    }
    assert client.post("/hooks/stt/echo", json=transcript, headers=auth()).status_code == 202
    worker.drain()

    [registered] = fake_bitrix24.calls_to("telephony.externalCall.register")
    assert registered.params["USER_PHONE_INNER"] == "101" or registered.params.get("USER_ID") == 1
    assert len(fake_bitrix24.calls_to("telephony.externalCall.finish")) == 1
    [attached] = fake_bitrix24.transcripts.values()
    assert [(m["SIDE"], m["MESSAGE"]) for m in attached["messages"]] == [
        ("Client", "Hello, is this the shop?"),
        ("User", "Yes, how can I help?"),
    ]


def test_a_vendor_with_its_own_fetch_and_challenge_needs_nothing_else(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    configured = settings.with_overrides(vendor={"ECHO_API_URL": fake_vendor_api.url, "ECHO_API_KEY": "echo-key"})
    app = create_app(configured, sources=SOURCES)
    worker = Worker(app.extensions["b24scribe.db"], configured, SOURCES)
    client = app.test_client()

    challenge = client.post("/hooks/stt/echo?validationToken=abc123", headers=auth())
    assert (challenge.status_code, challenge.get_data(), challenge.content_type) == (
        200,
        b"abc123",
        "text/plain; charset=utf-8",
    )
    assert events(db) == 0  # a challenge is no event

    call_id = finished_call(fake_bitrix24.webhook_url)
    lines = [{"who": "customer", "start": 0.0, "end": 1.5, "text": "Is it ready?"}]
    fake_vendor_api.serve("/jobs/job-42", json.dumps({"status": "done", "result_path": "/files/job-42.json"}).encode())
    fake_vendor_api.serve("/files/job-42.json", json.dumps({"job": "job-42", "lines": lines}).encode())
    posted = client.post(
        f"/hooks/stt/echo?b24_call_id={call_id}", json={"job": "job-42", "ready": True}, headers=auth()
    )
    assert posted.status_code == 202
    worker.drain()

    assert [served.path for served in fake_vendor_api.requests] == ["/jobs/job-42", "/files/job-42.json"]
    assert fake_vendor_api.requests[0].headers["authorization"] == "Token echo-key"
    [attached] = fake_bitrix24.transcripts.values()
    assert [(m["SIDE"], m["MESSAGE"]) for m in attached["messages"]] == [("Client", "Is it ready?")]


def test_openapi_metrics_and_check_read_the_registry(acme: tuple[Flask, Worker], client: FlaskClient) -> None:
    app = acme[0]
    document = app.test_client().get("/openapi.json").get_json()
    pbx = document["paths"]["/hooks/pbx/{pbx}"]["post"]
    assert pbx["parameters"][0]["schema"]["enum"] == sorted(SOURCES.pbx)  # the registry's PBXs and acmepbx
    assert {"acmepbx", "asterisk", "generic"} <= set(SOURCES.pbx)
    assert {"acmeSignature": []} in pbx["security"]
    assert document["components"]["securitySchemes"]["acmeSignature"]["name"] == "X-Acme-Signature"
    assert "echo" in document["paths"]["/hooks/stt/{vendor}"]["post"]["parameters"][0]["schema"]["enum"]
    # the service without the test sources does not serve or document them
    assert client.post("/hooks/pbx/acmepbx", json={}, headers=auth()).get_json()["error"]["code"] == "unknown_pbx"

    exposition = app.test_client().get("/metrics").get_data(as_text=True)
    # every source's series exists from the start (other tests in this process may have counted)
    assert 'b24scribe_events_received_total{outcome="rejected",provider="echo",source="stt"}' in exposition

    settings = app.extensions["b24scribe.settings"]
    lines = [finding.message for finding in check_sources(settings, SOURCES)]
    assert "/hooks/pbx/acmepbx verifies acme-signature signatures" in lines
    assert "/hooks/stt/echo" in lines[0]

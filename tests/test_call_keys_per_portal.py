"""Calls are keyed by (portal, PBX, PBX call id): two portals' PBXs may use the same call ids (two
tenants' Asterisk linkedids) and never meet; one tenant's transcript never lands on another's call."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from sqlalchemy import create_engine, inspect

from app import create_app
from b24scribe.db import Database
from b24scribe.migrate import upgrade
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import admin, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_deepgram import build_result

LINKEDID = "1733400000.42"  # the same Asterisk linkedid on both tenants' PBXs
ATTACH = "telephony.call.attachTranscription"
SOUTH_CALL = [(1, 0.0, 2.0, "South office, hello."), (0, 2.5, 4.0, "Hi, south speaking.")]


@pytest.fixture
def two_portals(settings: Settings, db: Database, fake_bitrix24: FakeBitrix24) -> Iterator[tuple[Flask, Worker]]:
    portals = {"north": fake_bitrix24.add_webhook(portal="north"), "south": fake_bitrix24.add_webhook(portal="south")}
    configured = settings.with_overrides(bitrix24_webhook_url=None, bitrix24_portals=portals)
    app = create_app(configured)
    yield app, Worker(app.extensions["b24scribe.db"], configured, SOURCES)
    app.extensions["b24scribe.db"].dispose()


def call_event(app: Flask, portal: str, event: str, **fields: object) -> None:
    body = {"event": event, "call_id": LINKEDID, "direction": "inbound", "from": "+15550001111", "user_id": 1}
    answer = app.test_client().post(f"/hooks/pbx/generic?portal={portal}", json={**body, **fields}, headers=auth())
    assert answer.status_code == 202, answer.get_data(as_text=True)


def transcript(app: Flask, portal: str, text: str) -> None:
    body = {"segments": [{"start": 0.0, "end": 2.0, "text": text, "channel": 0}]}
    path = f"/hooks/stt/generic?pbx=generic&call={LINKEDID}&portal={portal}"
    answer = app.test_client().post(path, json=body, headers=auth())
    assert answer.status_code == 202, answer.get_data(as_text=True)


def test_two_portals_with_the_same_pbx_call_id_get_two_calls_and_their_own_transcripts(
    two_portals: tuple[Flask, Worker], fake_bitrix24: FakeBitrix24
) -> None:
    app, worker = two_portals
    for portal, words in (("north", "north speaking"), ("south", "south speaking")):
        call_event(app, portal, "call.started")
        call_event(app, portal, "call.finished", duration=30, status="answered")
        transcript(app, portal, words)
    worker.drain()

    by_portal = {
        portal: app.test_client().get(f"/v1/calls/generic/{LINKEDID}?portal={portal}", headers=admin()).get_json()
        for portal in ("north", "south")
    }
    assert {portal: call["portal"] for portal, call in by_portal.items()} == {"north": "north", "south": "south"}
    assert by_portal["north"]["id"] != by_portal["south"]["id"]
    registered = fake_bitrix24.calls_to("telephony.externalCall.register")
    assert sorted(request.portal for request in registered) == ["north", "south"]
    attached = {request.portal: request.params for request in fake_bitrix24.calls_to(ATTACH)}
    assert attached["north"]["CALL_ID"] == by_portal["north"]["b24_call_id"]
    assert [m["MESSAGE"] for m in attached["north"]["MESSAGES"]] == ["north speaking"]
    assert [m["MESSAGE"] for m in attached["south"]["MESSAGES"]] == ["south speaking"]

    ambiguous = app.test_client().get(f"/v1/calls/generic/{LINKEDID}", headers=admin())
    assert ambiguous.status_code == 409
    assert ambiguous.get_json()["error"]["fields"]["portal"] == [
        "must be one of: north, south (each has a call with this id)"
    ]


def test_the_migration_keys_calls_per_portal_and_back(database_url: str) -> None:
    upgrade(database_url, "0004")
    engine = create_engine(database_url)
    try:

        def unique_keys() -> list[list[str]]:
            return [list(c["column_names"]) for c in inspect(engine).get_unique_constraints("call")]

        assert ["pbx", "pbx_call_id"] in unique_keys()
        upgrade(database_url, "0005")
        assert ["portal", "pbx", "pbx_call_id"] in unique_keys()
        assert ["pbx", "pbx_call_id"] not in unique_keys()
    finally:
        engine.dispose()


def test_a_callback_whose_metadata_names_the_portal_reaches_that_portals_call_without_a_query(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    """One webhook for the vendor's whole workspace (ElevenLabs, Azure) cannot say `?portal=`: the
    portal comes from the metadata b24scribe put on the job (`b24scribe_portal`). A portal's own token
    never opens another portal's call that way."""
    portals = {"north": fake_bitrix24.add_webhook(portal="north"), "south": fake_bitrix24.add_webhook(portal="south")}
    tokens = {"north": "north-portal-token-0123"}
    configured = settings.with_overrides(bitrix24_webhook_url=None, bitrix24_portals=portals, portal_tokens=tokens)
    app = create_app(configured)
    try:
        for portal in ("north", "south"):
            call_event(app, portal, "call.finished", duration=30, status="answered")
        extra = {"b24scribe_pbx": "generic", "b24scribe_call": LINKEDID, "b24scribe_portal": "south"}
        body = build_result(SOUTH_CALL, {"utterances": "true", "multichannel": "true"}, extra, "req-1", "")
        as_north = {"Authorization": f"Bearer {tokens['north']}"}
        refused = app.test_client().post("/hooks/stt/deepgram", json=body, headers=as_north)
        assert refused.status_code == 403 and refused.json is not None
        assert refused.json["error"]["code"] == "wrong_portal"
        unknown = build_result(SOUTH_CALL, {"multichannel": "true"}, extra | {"b24scribe_portal": "west"}, "req-2", "")
        answer = app.test_client().post("/hooks/stt/deepgram", json=unknown, headers=auth())
        assert answer.status_code == 422 and "portal" in answer.get_data(as_text=True)

        answer = app.test_client().post("/hooks/stt/deepgram", json=body, headers=auth())
        assert answer.status_code == 202, answer.get_data(as_text=True)
        Worker(app.extensions["b24scribe.db"], configured, SOURCES).drain()

        attached = {r.portal for r in fake_bitrix24.requests if r.method == ATTACH.lower() and r.status == 200}
        assert attached == {"south"}
    finally:
        app.extensions["b24scribe.db"].dispose()

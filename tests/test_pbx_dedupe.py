"""Which PBX deliveries are the same event: the same delivery id, or the same bytes (body and
query) for the same call. A form PBX may send its event in the query with no body at all, so the
query counts as much as the body does."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app import create_app
from b24scribe.db import Database
from b24scribe.events import RawEvent, call_event_key
from b24scribe.models import InboundEvent, Job
from b24scribe.settings import Settings
from tests.conftest import auth

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def asterisk_query(call_id: str, **extra: str) -> str:
    return urlencode({"event": "finished", "call_id": call_id, "direction": "inbound", "status": "ANSWER", **extra})


def post_query_only(client: FlaskClient, query: str) -> tuple[int, dict[str, Any]]:
    response = client.post(f"/hooks/pbx/asterisk?{query}", data=b"", headers={**auth(), **FORM})
    return response.status_code, response.get_json()


def stored(app: Flask) -> list[InboundEvent]:
    with app.extensions["b24scribe.db"].read() as session:
        return list(session.scalars(select(InboundEvent).order_by(InboundEvent.id)))


def apply_jobs(app: Flask) -> int:
    with app.extensions["b24scribe.db"].read() as session:
        return len(list(session.scalars(select(Job).where(Job.kind == "apply"))))


def test_events_sent_in_the_query_are_each_their_own_event(app: Flask, client: FlaskClient) -> None:
    first = post_query_only(client, asterisk_query("1733400000.1"))
    second = post_query_only(client, asterisk_query("1733400000.2"))

    assert first[0] == 202 and second[0] == 202, (first, second)
    assert first[1]["event_id"] != second[1]["event_id"]
    assert [event.query["call_id"] for event in stored(app)] == ["1733400000.1", "1733400000.2"]
    assert apply_jobs(app) == 2


def test_the_same_query_only_event_again_is_a_duplicate(app: Flask, client: FlaskClient) -> None:
    first = post_query_only(client, asterisk_query("1733400000.1"))
    again = post_query_only(client, asterisk_query("1733400000.1"))

    assert first[0] == 202
    assert again == (200, {"event_id": first[1]["event_id"], "duplicate": True})
    assert len(stored(app)) == 1 and apply_jobs(app) == 1


def test_different_bad_query_only_events_are_kept_each_with_its_own_errors(app: Flask, client: FlaskClient) -> None:
    bad_direction = post_query_only(client, asterisk_query("1733400000.1", direction="sideways"))
    bad_event = post_query_only(client, asterisk_query("1733400000.2", event="exploded"))

    assert bad_direction[0] == 422 and bad_event[0] == 422
    direction_fields, event_fields = bad_direction[1]["error"]["fields"], bad_event[1]["error"]["fields"]
    assert "direction" in direction_fields and "event" not in direction_fields
    assert "event" in event_fields and "direction" not in event_fields
    assert direction_fields["event_id"] != event_fields["event_id"]
    assert [event.state for event in stored(app)] == ["rejected", "rejected"]


def test_the_same_body_for_another_portal_is_another_event(settings: Settings, db: Database) -> None:
    portals = {"a": "https://a.bitrix24.com/rest/1/code-a/", "b": "https://b.bitrix24.com/rest/1/code-b/"}
    client = create_app(replace(settings, bitrix24_webhook_url=None, bitrix24_portals=portals)).test_client()
    body = {"event": "call.started", "call_id": "1733400000.7", "direction": "inbound"}
    to_a = client.post("/hooks/pbx/generic?portal=a", json=body, headers=auth())
    to_b = client.post("/hooks/pbx/generic?portal=b", json=body, headers=auth())
    again_a = client.post("/hooks/pbx/generic?portal=a", json=body, headers=auth())

    assert (to_a.status_code, to_b.status_code, again_a.status_code) == (202, 202, 200)
    assert to_a.get_json()["event_id"] != to_b.get_json()["event_id"]
    assert again_a.get_json()["event_id"] == to_a.get_json()["event_id"]


def test_the_token_in_the_query_is_not_part_of_what_makes_an_event_the_same(app: Flask, client: FlaskClient) -> None:
    body = {"event": "call.started", "call_id": "1733400000.8"}
    by_header = client.post("/hooks/pbx/generic", json=body, headers=auth())
    token = auth()["Authorization"].removeprefix("Bearer ")
    by_query = client.post(f"/hooks/pbx/generic?token={token}", json=body)

    assert (by_header.status_code, by_query.status_code) == (202, 200)
    assert by_query.get_json()["event_id"] == by_header.get_json()["event_id"]


def test_keys_lead_with_the_call_id_so_a_growing_pbx_id_sorts_in_arrival_order() -> None:
    # Asterisk's uniqueid is epoch.sequence: its events append to the dedupe index instead of
    # landing on a random page each (fewer pages written per commit).
    ids = [f"1733400000.{n}" for n in range(100, 130)]
    keys = [call_event_key(RawEvent("pbx", "asterisk", f"call_id={i}".encode(), {}, None), i) for i in ids]

    assert keys == sorted(keys)
    assert all(key.startswith(f"call:{i}:") for key, i in zip(keys, ids, strict=True))
    assert len(set(keys)) == len(keys)


def test_a_signed_delivery_is_deduplicated_by_its_id_alone() -> None:
    one = RawEvent("pbx", "generic", b'{"call_id": "a"}', {}, None, delivery_id="msg_1")
    same_id_other_bytes = RawEvent("pbx", "generic", b'{"call_id": "b"}', {}, None, delivery_id="msg_1")

    assert call_event_key(one, "a") == call_event_key(same_id_other_bytes, "b") == "delivery:msg_1"

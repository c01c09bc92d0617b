"""Gladia's own callback, as Gladia sends it, lands as the right MESSAGES on the right call."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask

from app import create_app
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import auth, finished_call
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_new_sources import events
from tests.test_vendors_end_to_end import STEREO_SUPPORT_CALL, attached_messages, fixture, state

CALL_IN_FIXTURES = b"externalCall.716f1cb73def9700a23842adf9c4c568.1773130779"


@pytest.fixture
def gladia_app(settings: Settings, db: Database) -> Flask:
    return create_app(settings)


@pytest.fixture
def post(gladia_app: Flask) -> Any:
    client = gladia_app.test_client()

    def post(body: bytes, query: str = "", headers: dict[str, str] | None = None) -> Any:
        return client.post(
            f"/hooks/stt/gladia?{query}",
            data=body,
            headers={"Content-Type": "application/json", **(auth() if headers is None else headers)},
        )

    return post


@pytest.fixture
def drain(gladia_app: Flask) -> Any:
    return Worker(gladia_app.extensions["b24scribe.db"], gladia_app.extensions["b24scribe.settings"], SOURCES).drain


def test_a_stereo_callback_named_by_custom_metadata(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = fixture("gladia/stereo_callback.json").replace(CALL_IN_FIXTURES, call_id.encode())

    assert post(body).status_code == 202  # the call is named by custom_metadata only
    drain()
    assert attached_messages(fake_bitrix24, call_id) == STEREO_SUPPORT_CALL


def test_a_diarized_mono_callback_named_by_the_url(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = json.loads(fixture("gladia/diarized_mono_callback.json"))
    del body["custom_metadata"]

    assert post(json.dumps(body).encode(), f"b24_call_id={call_id}").status_code == 202
    drain()
    assert attached_messages(fake_bitrix24, call_id) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
        {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
        {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
        {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
    ]


def test_a_retry_of_the_same_job_is_a_duplicate(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = fixture("gladia/stereo_callback.json").replace(CALL_IN_FIXTURES, call_id.encode())

    first = post(body)
    again = post(body, "token=test-inbound-token-7f3a", headers={})  # the token in the URL, as Gladia is set up
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json["duplicate"] is True and again.json["event_id"] == first.json["event_id"]
    drain()
    attached_messages(fake_bitrix24, call_id)  # exactly one


def test_metadata_naming_another_call_than_the_url_is_422(post: Any) -> None:
    response = post(fixture("gladia/stereo_callback.json"), "b24_call_id=externalCall.other.1")

    assert response.status_code == 422
    assert "b24_call_id" in response.json["error"]["fields"]


def test_a_failed_job_is_recorded_with_gladias_reason_and_nothing_is_sent(
    post: Any, drain: Any, gladia_app: Flask, fake_bitrix24: FakeBitrix24
) -> None:
    assert post(fixture("gladia/error_callback.json")).status_code == 202  # 2xx: Gladia stops retrying
    drain()
    assert fake_bitrix24.requests == []
    transcript = state(gladia_app, "externalCall.f.1")["transcripts"][0]
    assert transcript["state"] == "failed"
    assert transcript["reason"] == "The audio file could not be decoded: unsupported codec."


def test_an_unauthenticated_callback_is_refused_and_not_stored(post: Any, db: Database) -> None:
    response = post(fixture("gladia/stereo_callback.json"), "token=guess", headers={})

    assert response.status_code == 401
    assert events(db) == 0


def test_a_webhook_with_only_the_id_is_422_saying_to_use_the_callback(post: Any) -> None:
    body = {"event": "transcription.success", "payload": {"id": "45463597-20b7-4af7-b3b3-f5fb778203ab"}}
    response = post(json.dumps(body).encode(), "b24_call_id=externalCall.w.1")

    assert response.status_code == 422
    assert "callback" in json.dumps(response.json["error"]["fields"])

"""ElevenLabs' signed webhook, as ElevenLabs sends it, lands as the right MESSAGES on the right call;
a forged or stale signature is refused before anything is stored."""

from __future__ import annotations

import json
import time
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
from tests.test_schemas_elevenlabs import SECRET, sdk_signature
from tests.test_vendors_end_to_end import STEREO_SUPPORT_CALL, attached_messages, fixture, state

CALL_IN_FIXTURES = b"externalCall.716f1cb73def9700a23842adf9c4c568.1773130779"
DIARIZED_CALL = [
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
    {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
    {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
    {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
]


@pytest.fixture
def elevenlabs_app(settings: Settings, db: Database) -> Flask:
    return create_app(settings.with_overrides(vendor={"ELEVENLABS_WEBHOOK_SECRET": SECRET}))


@pytest.fixture
def post(elevenlabs_app: Flask) -> Any:
    client = elevenlabs_app.test_client()

    def post(body: bytes, query: str = "", signed_at: int | None = None, secret: str = SECRET) -> Any:
        """POST as ElevenLabs does: signed with the workspace webhook's secret, no other credential."""
        timestamp = int(time.time()) if signed_at is None else signed_at
        headers = {"Content-Type": "application/json", "ElevenLabs-Signature": sdk_signature(secret, body, timestamp)}
        return client.post(f"/hooks/stt/elevenlabs?{query}", data=body, headers=headers)

    return post


@pytest.fixture
def drain(elevenlabs_app: Flask) -> Any:
    app = elevenlabs_app
    return Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES).drain


def test_a_signed_diarized_webhook_named_by_its_metadata(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = fixture("elevenlabs/diarized_webhook.json").replace(CALL_IN_FIXTURES, call_id.encode())

    assert post(body).status_code == 202  # the call is named by webhook_metadata only
    drain()
    assert attached_messages(fake_bitrix24, call_id) == DIARIZED_CALL


def test_a_signed_multichannel_webhook_for_an_asterisk_call(
    elevenlabs_app: Flask, post: Any, drain: Any, fake_bitrix24: FakeBitrix24
) -> None:
    event = "event=call.finished&call_id=1700000000.123&direction=inbound&from=%2B15551234567&extension=101&duration=12"
    pbx = elevenlabs_app.test_client().post(
        "/hooks/pbx/asterisk", data=event, headers={**auth(), "Content-Type": "application/x-www-form-urlencoded"}
    )
    assert pbx.status_code == 202
    # webhook_metadata (JSON text) names pbx=asterisk, call=1700000000.123
    assert post(fixture("elevenlabs/multichannel_webhook.json")).status_code == 202
    drain()
    b24_call_id = fake_bitrix24.calls_to("telephony.externalCall.register")[0].response["result"]["CALL_ID"]
    assert attached_messages(fake_bitrix24, b24_call_id) == STEREO_SUPPORT_CALL


def test_a_redelivery_is_a_duplicate_even_signed_anew(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = fixture("elevenlabs/diarized_webhook.json").replace(CALL_IN_FIXTURES, call_id.encode())

    first = post(body, signed_at=int(time.time()) - 60)
    again = post(body)  # a retry carries a new timestamp and signature; the request id is the same
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json["duplicate"] is True
    drain()
    attached_messages(fake_bitrix24, call_id)  # exactly one


def test_forged_and_stale_signatures_are_401_and_nothing_is_stored(post: Any, db: Database) -> None:
    body = fixture("elevenlabs/diarized_webhook.json")

    forged = post(body, secret="not-the-secret")
    stale = post(body, signed_at=int(time.time()) - 31 * 60)  # ElevenLabs' tolerance is 30 minutes
    assert (forged.status_code, forged.json["error"]["code"]) == (401, "bad_signature")
    assert (stale.status_code, stale.json["error"]["code"]) == (401, "bad_signature")
    assert events(db) == 0


def test_a_body_changed_after_signing_is_refused(elevenlabs_app: Flask, db: Database) -> None:
    body = fixture("elevenlabs/diarized_webhook.json")
    header = sdk_signature(SECRET, body, int(time.time()))
    tampered = body.replace(b"Anna", b"Eve!")
    response = elevenlabs_app.test_client().post(
        "/hooks/stt/elevenlabs",
        data=tampered,
        headers={"Content-Type": "application/json", "ElevenLabs-Signature": header},
    )

    assert response.status_code == 401
    assert events(db) == 0


def test_a_failed_job_is_recorded_with_the_vendors_reason_and_nothing_is_sent(
    post: Any, drain: Any, elevenlabs_app: Flask, fake_bitrix24: FakeBitrix24
) -> None:
    assert post(fixture("elevenlabs/failed_webhook.json")).status_code == 202  # 2xx: no retry
    drain()
    assert fake_bitrix24.requests == []
    transcript = state(elevenlabs_app, "externalCall.f.1")["transcripts"][0]
    assert transcript["state"] == "failed"
    assert transcript["reason"] == "Audio file is corrupted or in an unsupported format."


def test_a_signed_but_unprocessable_body_is_422_and_kept(post: Any, db: Database) -> None:
    response = post(json.dumps({"type": "speech_to_text_transcription", "data": {"request_id": "rq_x"}}).encode())

    assert response.status_code == 422
    assert "transcription" in json.dumps(response.json["error"]["fields"])
    assert events(db) == 1  # kept as a rejected event, to replay after a fix


def test_the_inbound_token_still_works(elevenlabs_app: Flask, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = fixture("elevenlabs/diarized_webhook.json")
    response = elevenlabs_app.test_client().post(
        f"/hooks/stt/elevenlabs?b24_call_id={call_id}",
        data=body.replace(CALL_IN_FIXTURES, call_id.encode()),
        headers={"Content-Type": "application/json", **auth()},
    )

    assert response.status_code == 202
    drain()
    assert attached_messages(fake_bitrix24, call_id) == DIARIZED_CALL

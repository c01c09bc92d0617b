"""Google Speech-to-Text results posted to `/hooks/stt/google` land as the right MESSAGES on the right call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import func, select

from b24scribe.db import Database
from b24scribe.models import InboundEvent
from tests import test_vendors_end_to_end as vendors_e2e
from tests.conftest import finished_call
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_vendors_end_to_end import STEREO_SUPPORT_CALL, attached_messages, state

# The vendor end-to-end fixtures: the app with vendor settings, posting to a hook, draining the worker.
vendor_app = vendors_e2e.vendor_app
post = vendors_e2e.post
drain = vendors_e2e.drain

FIXTURES = Path(__file__).parent / "fixtures" / "google"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def events(db: Database) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.count()).select_from(InboundEvent)) or 0)


def test_a_stereo_operation_lands_on_the_call_the_url_names(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    response = post("google", fixture("operation_stereo.json"), f"b24_call_id={call_id}")
    assert response.status_code == 202
    drain()
    assert attached_messages(fake_bitrix24, call_id) == STEREO_SUPPORT_CALL


def test_a_diarized_mono_response_by_first_speaker(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    assert post("google", fixture("response_diarized_mono.json"), f"b24_call_id={call_id}").status_code == 202
    drain()
    assert attached_messages(fake_bitrix24, call_id) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
        {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
        {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 6, "MESSAGE": "For how many?"},
        {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
    ]


def test_two_v2_files_one_per_channel_make_one_transcript(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    query = f"b24_call_id={call_id}&channel="
    assert post("google", fixture("v2_batch_inline_channel0.json"), query + "0").status_code == 202
    assert post("google", fixture("v2_batch_inline_channel1.json"), query + "1").status_code == 202
    drain()
    assert attached_messages(fake_bitrix24, call_id) == STEREO_SUPPORT_CALL


def test_a_retry_of_the_same_operation_is_a_duplicate_even_with_other_bytes(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = fixture("operation_stereo.json")
    first = post("google", body, f"b24_call_id={call_id}")
    again = post("google", json.dumps(json.loads(body)).encode(), f"b24_call_id={call_id}")  # re-serialised
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json["duplicate"] is True and again.json["event_id"] == first.json["event_id"]
    drain()
    attached_messages(fake_bitrix24, call_id)  # exactly one


def test_a_failed_operation_is_recorded_with_googles_reason_and_nothing_is_sent(
    post: Any, drain: Any, vendor_app: Flask, fake_bitrix24: FakeBitrix24
) -> None:
    assert post("google", fixture("operation_failed.json"), "b24_call_id=externalCall.g.1").status_code == 202
    drain()
    assert fake_bitrix24.requests == []
    transcript = state(vendor_app, "externalCall.g.1")["transcripts"][0]
    assert transcript["state"] == "failed"
    assert transcript["reason"] == "Must use single channel (mono) audio, but WAV header indicates 2 channels."


def test_an_unfinished_operation_is_422_naming_done(post: Any) -> None:
    response = post("google", json.dumps({"name": "1", "done": False}).encode(), "b24_call_id=externalCall.g.2")
    assert response.status_code == 422
    assert "done" in response.json["error"]["fields"]


def test_a_mono_result_without_speakers_is_422_saying_what_to_change(post: Any) -> None:
    body = json.loads(fixture("operation_stereo.json"))
    for result in body["response"]["results"]:
        result.pop("channelTag")
    response = post("google", json.dumps(body).encode(), "b24_call_id=externalCall.g.3")
    assert response.status_code == 422
    assert "?channel=0" in json.dumps(response.json["error"]["fields"])


def test_google_signs_nothing_so_the_token_is_required(post: Any, db: Database) -> None:
    response = post("google", fixture("operation_stereo.json"), "b24_call_id=externalCall.g.4", {"X-None": "1"})
    assert response.status_code == 401
    assert events(db) == 0

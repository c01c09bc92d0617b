"""Yandex SpeechKit operations posted to `/hooks/stt/yandex` land as the right MESSAGES on the right call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Flask

from tests import test_vendors_end_to_end as vendors_e2e
from tests.conftest import finished_call
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_e2e_google import events
from tests.test_vendors_end_to_end import attached_messages, state

# The vendor end-to-end fixtures: the app with vendor settings, posting to a hook, draining the worker.
vendor_app = vendors_e2e.vendor_app
post = vendors_e2e.post
drain = vendors_e2e.drain

FIXTURES = Path(__file__).parent / "fixtures" / "yandex"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_a_stereo_operation_lands_on_the_asterisk_call_the_url_names(
    vendor_app: Flask, post: Any, drain: Any, fake_bitrix24: FakeBitrix24
) -> None:
    event = "event=call.finished&call_id=1700000000.123&direction=inbound&from=%2B15551234567&extension=101&duration=12"
    pbx = vendor_app.test_client().post(
        "/hooks/pbx/asterisk",
        data=event,
        headers={**vendors_e2e.auth(), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert pbx.status_code == 202
    assert post("yandex", fixture("operation_stereo.json"), "pbx=asterisk&call=1700000000.123").status_code == 202
    drain()
    b24_call_id = fake_bitrix24.calls_to("telephony.externalCall.register")[0].response["result"]["CALL_ID"]
    assert attached_messages(fake_bitrix24, b24_call_id) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "добрый день компания акме"},
        {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "здравствуйте я звоню по поводу заказа"},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "назовите номер заказа"},
        {"SIDE": "Client", "START_TIME": 6, "STOP_TIME": 9, "MESSAGE": "номер 12345"},
    ]


def test_a_mono_result_for_one_channel(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    assert post("yandex", fixture("response_mono.json"), f"b24_call_id={call_id}&channel=1").status_code == 202
    drain()
    assert attached_messages(fake_bitrix24, call_id) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "добрый день компания акме"},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "назовите номер заказа"},
    ]


def test_a_mono_result_without_the_channel_is_422_saying_what_to_change(post: Any) -> None:
    response = post("yandex", fixture("response_mono.json"), "b24_call_id=externalCall.y.1")
    assert response.status_code == 422
    assert "?channel=0" in json.dumps(response.json["error"]["fields"])


def test_a_retry_of_the_same_operation_is_a_duplicate_even_with_other_bytes(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = fixture("operation_stereo.json")
    first = post("yandex", body, f"b24_call_id={call_id}")
    again = post("yandex", json.dumps(json.loads(body)).encode(), f"b24_call_id={call_id}")  # \\u-escaped now
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json["duplicate"] is True and again.json["event_id"] == first.json["event_id"]
    drain()
    attached_messages(fake_bitrix24, call_id)  # exactly one


def test_a_failed_operation_is_recorded_with_its_reason_and_nothing_is_sent(
    post: Any, drain: Any, vendor_app: Flask, fake_bitrix24: FakeBitrix24
) -> None:
    assert post("yandex", fixture("operation_failed.json"), "b24_call_id=externalCall.y.2").status_code == 202
    drain()
    assert fake_bitrix24.requests == []
    transcript = state(vendor_app, "externalCall.y.2")["transcripts"][0]
    assert transcript["state"] == "failed"
    assert transcript["reason"] == "Invalid audio: the file is not in OGG_OPUS format"


def test_yandex_signs_nothing_so_the_token_is_required(post: Any, db: Any) -> None:
    response = post("yandex", fixture("operation_stereo.json"), "b24_call_id=externalCall.y.3", {"X-None": "1"})
    assert response.status_code == 401
    assert events(db) == 0

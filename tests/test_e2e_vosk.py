"""Vosk result lists, one per channel, posted to `/hooks/stt/vosk` land as one transcript on the right call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests import test_vendors_end_to_end as vendors_e2e
from tests.conftest import finished_call
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_e2e_google import events
from tests.test_vendors_end_to_end import attached_messages

# The vendor end-to-end fixtures: the app with vendor settings, posting to a hook, draining the worker.
vendor_app = vendors_e2e.vendor_app
post = vendors_e2e.post
drain = vendors_e2e.drain

FIXTURES = Path(__file__).parent / "fixtures" / "vosk"
WHOLE_CALL = [  # channel 0 the caller (the client), channel 1 the employee
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "good afternoon acme support"},
    {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "hi i'm calling about my order"},
    {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "what's the order number"},
]


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_both_channels_lists_make_one_transcript(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    assert post("vosk", fixture("channel0.json"), f"b24_call_id={call_id}&channel=0").status_code == 202
    assert post("vosk", fixture("channel1.json"), f"b24_call_id={call_id}&channel=1").status_code == 202
    drain()
    assert attached_messages(fake_bitrix24, call_id) == WHOLE_CALL


def test_a_second_channel_after_delivery_replaces_the_transcript_with_both(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    assert post("vosk", fixture("channel1.json"), f"b24_call_id={call_id}&channel=1").status_code == 202
    drain()
    assert post("vosk", fixture("channel0.json"), f"b24_call_id={call_id}&channel=0").status_code == 202
    drain()
    attached = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert [r.params["MESSAGES"] for r in attached] == [[WHOLE_CALL[0], WHOLE_CALL[2]], WHOLE_CALL]


def test_a_retried_list_is_a_duplicate(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    query = f"b24_call_id={call_id}&channel=1"
    first = post("vosk", fixture("channel1.json"), query)
    again = post("vosk", fixture("channel1.json"), query)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json["duplicate"] is True and again.json["event_id"] == first.json["event_id"]
    drain()
    assert len(attached_messages(fake_bitrix24, call_id)) == 2


def test_a_list_without_its_channel_is_422_saying_what_to_add(post: Any) -> None:
    response = post("vosk", fixture("channel1.json"), "b24_call_id=externalCall.v.1")
    assert response.status_code == 422
    assert "?channel=0" in json.dumps(response.json["error"]["fields"]["channel"])


def test_vosk_signs_nothing_so_the_token_is_required(post: Any, db: Any) -> None:
    response = post("vosk", fixture("channel1.json"), "b24_call_id=externalCall.v.2&channel=1", {"X-None": "1"})
    assert response.status_code == 401
    assert events(db) == 0

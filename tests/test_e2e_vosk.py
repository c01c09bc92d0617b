"""Vosk result lists, one per channel, posted to `/hooks/stt/vosk` land as one transcript on the right call."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from b24scribe.db import Database
from b24scribe.events import PARTS_WAIT_SECONDS, WAITING_FOR_PARTS
from b24scribe.models import Job, TranscriptPart
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


def test_with_parts_2_the_first_channel_waits_for_the_second_and_the_card_gets_both_at_once(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24, db: Database
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    assert post("vosk", fixture("channel1.json"), f"b24_call_id={call_id}&channel=1&parts=2").status_code == 202
    drain()
    assert fake_bitrix24.calls_to("telephony.call.attachTranscription") == []  # half a transcript never goes
    with db.read() as session:
        (job,) = session.scalars(select(Job).where(Job.kind == "attach"))
        assert (job.state, job.last_error, job.attempts) == ("pending", WAITING_FOR_PARTS, 0)
        assert job.next_attempt_at > time.time() + PARTS_WAIT_SECONDS - 60

    assert post("vosk", fixture("channel0.json"), f"b24_call_id={call_id}&channel=0&parts=2").status_code == 202
    drain()  # the second part makes the put-off job due at once: no ten-minute wait
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == WHOLE_CALL


def test_with_parts_2_a_lone_channel_goes_alone_once_the_wait_is_over(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24, db: Database
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    assert post("vosk", fixture("channel1.json"), f"b24_call_id={call_id}&channel=1&parts=2").status_code == 202
    drain()
    with db.write() as session:  # ten minutes pass without the other channel
        session.execute(update(TranscriptPart).values(received_at=time.time() - PARTS_WAIT_SECONDS - 1))
        session.execute(update(Job).where(Job.kind == "attach").values(next_attempt_at=time.time()))
    drain()
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == [WHOLE_CALL[0], WHOLE_CALL[2]]


def test_parts_other_than_1_or_2_is_422_naming_it(post: Any) -> None:
    response = post("vosk", fixture("channel1.json"), "b24_call_id=externalCall.v.3&channel=1&parts=3")
    assert response.status_code == 422
    assert "Must be 1 or 2" in json.dumps(response.json["error"]["fields"]["parts"])

"""Each vendor's own callback, exactly as the vendor sends it, lands as the right MESSAGES on the right call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from flask import Flask

from app import create_app
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import admin, auth, finished_call
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_vendor_api import FakeVendorApi

FIXTURES = Path(__file__).parent / "fixtures"
STEREO_SUPPORT_CALL = [  # channel 0 the caller (the client), channel 1 the employee
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
    {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
    {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
]


def fixture(path: str) -> bytes:
    return (FIXTURES / path).read_bytes()


def attached_messages(fake: FakeBitrix24, call_id: str) -> list[dict[str, Any]]:
    attached = [r for r in fake.calls_to("telephony.call.attachTranscription") if r.params["CALL_ID"] == call_id]
    assert len(attached) == 1, f"expected one attachTranscription for {call_id}, got {len(attached)}"
    messages: list[dict[str, Any]] = attached[0].params["MESSAGES"]
    return messages


@pytest.fixture
def vendor_app(settings: Settings, db: object, fake_vendor_api: FakeVendorApi) -> Flask:
    vendors = {
        "ASSEMBLYAI_API_KEY": "aai-test-key",
        "ASSEMBLYAI_API_URL": fake_vendor_api.url,
        "REVAI_API_KEY": "rev-test-key",
        "REVAI_API_URL": fake_vendor_api.url,
    }
    return create_app(settings.with_overrides(vendor=vendors))


@pytest.fixture
def post(vendor_app: Flask) -> Any:
    client = vendor_app.test_client()

    def post(vendor: str, body: bytes, query: str, headers: dict[str, str] | None = None) -> Any:
        return client.post(
            f"/hooks/stt/{vendor}?{query}",
            data=body,
            headers={"Content-Type": "application/json", **(headers or auth())},
        )

    return post


@pytest.fixture
def drain(vendor_app: Flask) -> Any:
    worker = Worker(vendor_app.extensions["b24scribe.db"], vendor_app.extensions["b24scribe.settings"], SOURCES)
    return worker.drain


def state(vendor_app: Flask, call_id: str) -> dict[str, Any]:
    response = vendor_app.test_client().get(f"/v1/calls/by-b24/{call_id}", headers=admin())
    assert response.status_code == 200
    assert response.json is not None
    return response.json


def test_deepgram_stereo_callback(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    response = post("deepgram", fixture("deepgram/multichannel_utterances.json"), f"b24_call_id={call_id}")
    assert response.status_code == 202
    drain()
    assert attached_messages(fake_bitrix24, call_id) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "Client", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "User", "START_TIME": 2, "STOP_TIME": 6, "MESSAGE": "Sorry to hear that. What's the order number?"},
        {"SIDE": "Client", "START_TIME": 6, "STOP_TIME": 8, "MESSAGE": "It hasn't arrived."},
    ]


def test_deepgram_retries_are_deduplicated_by_request_id(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = fixture("deepgram/multichannel_utterances.json")
    assert post("deepgram", body, f"b24_call_id={call_id}").status_code == 202
    again = post("deepgram", body, f"b24_call_id={call_id}")
    assert again.status_code == 200 and again.json["duplicate"] is True
    drain()
    attached_messages(fake_bitrix24, call_id)  # exactly one


def test_deepgram_words_with_the_call_in_metadata_extra(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = fixture("deepgram/diarized_mono_words.json").replace(
        b"externalCall.716f1cb73def9700a23842adf9c4c568.1773130779", call_id.encode()
    )
    assert post("deepgram", body, "").status_code == 202  # the call is named by metadata.extra only
    drain()
    assert attached_messages(fake_bitrix24, call_id) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
        {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
        {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 7, "MESSAGE": "For how many?"},
        {"SIDE": "Client", "START_TIME": 7, "STOP_TIME": 9, "MESSAGE": "Two people, please."},
    ]


def test_metadata_naming_another_call_than_the_url_is_422(post: Any) -> None:
    response = post("deepgram", fixture("deepgram/diarized_mono_words.json"), "b24_call_id=externalCall.other.1")
    assert response.status_code == 422
    assert "b24_call_id" in response.json["error"]["fields"]


def test_a_failed_deepgram_job_is_recorded_never_sent_and_acknowledged(
    post: Any, drain: Any, vendor_app: Flask, fake_bitrix24: FakeBitrix24
) -> None:
    response = post("deepgram", fixture("deepgram/failed.json"), "b24_call_id=externalCall.f.1")
    assert response.status_code == 202  # 2xx, so Deepgram stops retrying
    drain()
    assert fake_bitrix24.requests == []
    transcript = state(vendor_app, "externalCall.f.1")["transcripts"][0]
    assert transcript["state"] == "failed"
    assert "corrupt or unsupported data" in transcript["reason"]


def test_a_mono_deepgram_transcript_without_speakers_is_422_saying_what_to_change(post: Any) -> None:
    response = post("deepgram", fixture("deepgram/mono_no_speakers.json"), "b24_call_id=externalCall.m.1")
    assert response.status_code == 422
    assert "diariz" in json.dumps(response.json["error"]["fields"])


def test_assemblyai_webhook_fetches_the_transcript_from_the_configured_api(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    transcript_id = "5552493-16d8-42d8-8feb-c2a16b56f6e8"
    fake_vendor_api.serve(f"/v2/transcript/{transcript_id}", fixture("assemblyai/transcript_multichannel.json"))
    # AssemblyAI's custom auth header carries the inbound token
    headers = {"X-B24scribe-Token": "test-inbound-token-7f3a"}
    response = post("assemblyai", fixture("assemblyai/webhook_completed.json"), f"b24_call_id={call_id}", headers)
    assert response.status_code == 202
    drain()
    assert [r.path for r in fake_vendor_api.requests] == [f"/v2/transcript/{transcript_id}"]
    assert fake_vendor_api.requests[0].headers["authorization"] == "aai-test-key"
    assert attached_messages(fake_bitrix24, call_id) == STEREO_SUPPORT_CALL


def test_assemblyai_error_is_recorded_with_the_vendors_reason(
    post: Any, drain: Any, vendor_app: Flask, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    body = json.loads(fixture("assemblyai/webhook_error.json"))
    fake_vendor_api.serve(f"/v2/transcript/{body['transcript_id']}", fixture("assemblyai/transcript_error.json"))
    assert (
        post("assemblyai", fixture("assemblyai/webhook_error.json"), "b24_call_id=externalCall.e.1").status_code == 202
    )
    drain()
    transcript = state(vendor_app, "externalCall.e.1")["transcripts"][0]
    assert transcript["state"] == "failed"
    assert transcript["reason"] == json.loads(fixture("assemblyai/transcript_error.json"))["error"]
    assert fake_bitrix24.requests == []


def test_a_vendor_id_is_fetched_only_as_one_path_segment_of_the_configured_host(
    post: Any, drain: Any, fake_vendor_api: FakeVendorApi
) -> None:
    body = json.dumps({"transcript_id": "../../admin?x=1", "status": "completed"}).encode()
    assert post("assemblyai", body, "b24_call_id=externalCall.p.1").status_code == 202
    drain()
    assert [r.path for r in fake_vendor_api.requests] == ["/v2/transcript/..%2F..%2Fadmin%3Fx%3D1"]


def test_revai_stereo_job_for_an_asterisk_call(
    vendor_app: Flask, post: Any, drain: Any, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    client = vendor_app.test_client()
    event = "event=call.finished&call_id=1700000000.123&direction=inbound&from=%2B15551234567&extension=101&duration=12"
    assert (
        client.post(
            "/hooks/pbx/asterisk", data=event, headers={**auth(), "Content-Type": "application/x-www-form-urlencoded"}
        ).status_code
        == 202
    )
    fake_vendor_api.serve("/speechtotext/v1/jobs/Umx5c6F7pH7r/transcript", fixture("revai/transcript_stereo.json"))
    # the call is named by the job's metadata (pbx=asterisk&call=…); the URL adds the channel count
    response = post("revai", fixture("revai/callback_transcribed.json"), "speaker_channels_count=2")
    assert response.status_code == 202
    drain()
    assert fake_vendor_api.requests[0].headers["authorization"] == "Bearer rev-test-key"
    b24_call_id = fake_bitrix24.calls_to("telephony.externalCall.register")[0].response["result"]["CALL_ID"]
    assert attached_messages(fake_bitrix24, b24_call_id) == STEREO_SUPPORT_CALL


def test_speechmatics_channel_labels(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = fixture("speechmatics/channel_labels.json").replace(
        b"externalCall.716f1cb73def9700a23842adf9c4c568.1773130779", call_id.encode()
    )
    assert post("speechmatics", body, "id=a1b2c3d4e5&status=success").status_code == 202
    drain()
    assert attached_messages(fake_bitrix24, call_id) == [
        {"SIDE": "Client", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Hello world."},
        {"SIDE": "User", "START_TIME": 2, "STOP_TIME": 3, "MESSAGE": "Hi there!"},
    ]


def test_openai_one_file_per_channel_is_attached_as_one_transcript(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    assert (
        post("openai", fixture("openai/verbose_json_channel0.json"), f"b24_call_id={call_id}&channel=0").status_code
        == 202
    )
    assert (
        post("openai", fixture("openai/verbose_json_channel1.json"), f"b24_call_id={call_id}&channel=1").status_code
        == 202
    )
    drain()
    assert attached_messages(fake_bitrix24, call_id) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "Client", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "User", "START_TIME": 2, "STOP_TIME": 6, "MESSAGE": "Sorry to hear that. What's the order number?"},
        {"SIDE": "Client", "START_TIME": 6, "STOP_TIME": 8, "MESSAGE": "It hasn't arrived."},
    ]


def test_a_second_channel_arriving_after_delivery_replaces_the_transcript_with_both(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    post("openai", fixture("openai/verbose_json_channel0.json"), f"b24_call_id={call_id}&channel=0")
    drain()
    post("openai", fixture("openai/verbose_json_channel1.json"), f"b24_call_id={call_id}&channel=1")
    drain()
    attached = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert [len(r.params["MESSAGES"]) for r in attached] == [2, 4]  # the second is the whole call


def test_whispercpp_stereo_diarize(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    assert (
        post("whispercpp", fixture("whispercpp/stereo_diarize.json"), f"b24_call_id={quote(call_id)}").status_code
        == 202
    )
    drain()
    assert attached_messages(fake_bitrix24, call_id) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
        {"SIDE": "User", "START_TIME": 3, "STOP_TIME": 4, "MESSAGE": "Mm-hmm."},
        {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
    ]


def test_fasterwhisper_segments_for_one_channel(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    assert (
        post(
            "fasterwhisper", fixture("fasterwhisper/segments_list.json"), f"b24_call_id={call_id}&channel=1"
        ).status_code
        == 202
    )
    drain()
    assert attached_messages(fake_bitrix24, call_id) == [
        {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good afternoon, Acme support."},
        {"SIDE": "User", "START_TIME": 2, "STOP_TIME": 6, "MESSAGE": "Sorry to hear that. What's the order number?"},
    ]


def test_a_per_url_override_swaps_the_channels(post: Any, drain: Any, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = fixture("deepgram/multichannel_utterances.json")
    assert post("deepgram", body, f"b24_call_id={call_id}&channel0=user").status_code == 202
    drain()
    sides = [m["SIDE"] for m in attached_messages(fake_bitrix24, call_id)]
    assert sides == ["Client", "User", "Client", "User"]


def test_the_live_http_path_works_for_a_vendor(live_url: str, worker: Worker, fake_bitrix24: FakeBitrix24) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    response = requests.post(
        f"{live_url}/hooks/stt/deepgram?b24_call_id={call_id}",
        data=fixture("deepgram/multichannel_utterances.json"),
        headers={**auth(), "Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 202
    worker.drain()
    assert len(attached_messages(fake_bitrix24, call_id)) == 4

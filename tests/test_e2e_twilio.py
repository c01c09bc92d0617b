"""Twilio's signed Intelligence webhook, as Twilio sends it, is verified against the URL Twilio used;
the worker fetches the transcript and every page of its sentences from the (fake) Twilio API, and the
right MESSAGES land on the right call. Forged signatures are refused before anything is stored."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import pytest
from flask import Flask
from twilio.request_validator import HMAC_SHA256

from app import create_app
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas import twilio
from schemas.registry import SOURCES
from tests.conftest import auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_vendor_api import FakeVendorApi
from tests.test_new_sources import events
from tests.test_schemas_twilio import ACCOUNT, AUTH_TOKEN, CALL_ID, SHARED_KEY, SID
from tests.test_vendors_end_to_end import STEREO_SUPPORT_CALL, attached_messages, fixture, state

PUBLIC_URL = "https://b24scribe.example.com"  # what Twilio was given: the signatures cover it
TRANSCRIPT = f"/v2/Transcripts/{SID}"
FIRST_PAGE = f"{TRANSCRIPT}/Sentences?PageSize=1000"
SECOND_PAGE = f"{TRANSCRIPT}/Sentences?PageSize=2&Page=1&PageToken=PAGE1TOKEN"  # from meta.next_page_url
BASIC = "Basic QUNhMWIyYzNkNGU1ZjYwNzE4MjkzYTRiNWM2ZDdlOGY5MDp0d2lsaW8tYXV0aC10b2tlbi03ZjNl"


@pytest.fixture
def twilio_app(settings: Settings, db: Database, fake_vendor_api: FakeVendorApi) -> Flask:
    vendor = {
        "TWILIO_ACCOUNT_SID": ACCOUNT,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_WEBHOOK_SECRET": SHARED_KEY,
        "TWILIO_API_URL": fake_vendor_api.url,
    }
    return create_app(settings.with_overrides(vendor=vendor, public_url=PUBLIC_URL))


@pytest.fixture
def drain(twilio_app: Flask) -> Any:
    app = twilio_app
    return Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES).drain


@pytest.fixture
def post(twilio_app: Flask) -> Any:
    client = twilio_app.test_client()

    def post(body: bytes, query: str = "", form: bool = True, secret: str = AUTH_TOKEN, signed_url: str = "") -> Any:
        """POST as Twilio does: form fields signed with the URL, or JSON signed through bodySHA256."""
        if not form:
            query = "&".join(filter(None, [query, f"bodySHA256={twilio.body_sha256(body)}"]))
        path = f"/hooks/stt/twilio?{query}" if query else "/hooks/stt/twilio"
        params = dict(parse_qsl(body.decode(), keep_blank_values=True)) if form else {}
        signature = twilio.sign(secret, signed_url or PUBLIC_URL + path, params)
        content_type = "application/x-www-form-urlencoded" if form else "application/json"
        return client.post(path, data=body, headers={"Content-Type": content_type, "X-Twilio-Signature": signature})

    return post


def serve_transcript(api: FakeVendorApi, status: str = "completed") -> None:
    api.serve(TRANSCRIPT, fixture(f"twilio/transcript_{status}.json"))
    api.serve(FIRST_PAGE, fixture("twilio/sentences_page1.json"))
    api.serve(SECOND_PAGE, fixture("twilio/sentences_page2.json"))


def finished_inbound_asterisk_call(app: Flask) -> None:
    event = "event=call.finished&call_id=1700000000.123&direction=inbound&from=%2B15551234567&extension=101&duration=12"
    pbx = app.test_client().post(
        "/hooks/pbx/asterisk", data=event, headers={**auth(), "Content-Type": "application/x-www-form-urlencoded"}
    )
    assert pbx.status_code == 202


def test_a_signed_form_webhook_fetches_every_page_and_lands_on_the_call_in_customer_key(
    twilio_app: Flask, post: Any, drain: Any, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    finished_inbound_asterisk_call(twilio_app)
    serve_transcript(fake_vendor_api)
    body = fixture("twilio/webhook_form.txt").replace(CALL_ID.encode(), b"asterisk%3A1700000000.123")

    assert post(body).status_code == 202
    drain()

    assert [(r.path, r.headers["authorization"]) for r in fake_vendor_api.requests] == [
        (TRANSCRIPT, BASIC),
        (FIRST_PAGE, BASIC),
        (SECOND_PAGE, BASIC),  # Twilio's next_page_url, fetched from the configured API host
    ]
    b24_call_id = fake_bitrix24.calls_to("telephony.externalCall.register")[0].response["result"]["CALL_ID"]
    assert attached_messages(fake_bitrix24, b24_call_id) == STEREO_SUPPORT_CALL


def test_a_signed_json_webhook_names_a_bitrix24_call(
    twilio_app: Flask, post: Any, drain: Any, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    finished_inbound_asterisk_call(twilio_app)
    serve_transcript(fake_vendor_api)

    assert post(fixture("twilio/webhook.json"), form=False).status_code == 202  # customer_key asterisk:…
    drain()
    b24_call_id = fake_bitrix24.calls_to("telephony.externalCall.register")[0].response["result"]["CALL_ID"]
    assert attached_messages(fake_bitrix24, b24_call_id) == STEREO_SUPPORT_CALL


def test_a_redelivery_is_a_duplicate_and_the_transcript_is_fetched_once(
    twilio_app: Flask, post: Any, drain: Any, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    finished_inbound_asterisk_call(twilio_app)
    serve_transcript(fake_vendor_api)
    body = fixture("twilio/webhook.json")

    first, again = post(body, form=False), post(body, form=False)
    other_event = post(body.replace(b"voice_intelligence_transcript_available", b"another_event"), form=False)
    assert (first.status_code, again.status_code, other_event.status_code) == (202, 200, 200)
    assert again.json["duplicate"] is True and again.json["event_id"] == first.json["event_id"]
    drain()
    assert [r.path for r in fake_vendor_api.requests].count(TRANSCRIPT) == 1
    b24_call_id = fake_bitrix24.calls_to("telephony.externalCall.register")[0].response["result"]["CALL_ID"]
    attached_messages(fake_bitrix24, b24_call_id)  # exactly one


def test_a_failed_transcript_is_recorded_with_twilios_reason_and_nothing_is_sent(
    twilio_app: Flask, post: Any, drain: Any, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    serve_transcript(fake_vendor_api, status="failed")

    assert post(fixture("twilio/webhook_form.txt").replace(CALL_ID.encode(), b"externalCall.f.1")).status_code == 202
    drain()

    assert [r.path for r in fake_vendor_api.requests] == [TRANSCRIPT]  # no sentences of a failed transcript
    assert fake_bitrix24.requests == []
    transcript = state(twilio_app, "externalCall.f.1")["transcripts"][0]
    assert (transcript["state"], transcript["reason"]) == ("failed", "Twilio transcript failed")


def test_forged_or_replayed_elsewhere_signatures_are_401_and_nothing_is_stored(
    twilio_app: Flask, post: Any, db: Database
) -> None:
    form = fixture("twilio/webhook_form.txt")
    as_json = fixture("twilio/webhook.json")
    client = twilio_app.test_client()

    refused = [
        post(form, secret="not-the-auth-token"),
        post(as_json, form=False, secret="not-the-auth-token"),
        # signed for the URL Twilio was given, replayed to another one (another call named in the URL)
        post(form, query="b24_call_id=externalCall.x.1", signed_url=PUBLIC_URL + "/hooks/stt/twilio"),
        # signed for the host the proxy saw, not B24SCRIBE_PUBLIC_URL
        post(form, signed_url="http://localhost/hooks/stt/twilio"),
    ]
    signature = twilio.sign(AUTH_TOKEN, f"{PUBLIC_URL}/hooks/stt/twilio?bodySHA256={twilio.body_sha256(as_json)}")
    tampered = client.post(
        f"/hooks/stt/twilio?bodySHA256={twilio.body_sha256(as_json)}",
        data=as_json.replace(b"asterisk", b"generic!"),
        headers={"Content-Type": "application/json", "X-Twilio-Signature": signature},
    )
    for response in [*refused, tampered]:
        assert (response.status_code, response.json["error"]["code"]) == (401, "bad_signature")
    # Twilio's signature has no timestamp to be stale: an old delivery replayed is the same event
    assert events(db) == 0


def test_a_webhook_rule_signature_with_the_shared_key_is_accepted(
    twilio_app: Flask, db: Database, fake_vendor_api: FakeVendorApi
) -> None:
    body = fixture("twilio/webhook_form.txt")
    url = PUBLIC_URL + "/hooks/stt/twilio"
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": twilio.sign(SHARED_KEY, url, dict(parse_qsl(body.decode())), HMAC_SHA256),
        "X-Twilio-Webhooks-Signature-Settings": "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256",
    }
    client = twilio_app.test_client()

    assert client.post("/hooks/stt/twilio", data=body, headers=headers).status_code == 202
    forged = {**headers, "X-Twilio-Signature": twilio.sign(AUTH_TOKEN, url, dict(parse_qsl(body.decode())))}
    assert client.post("/hooks/stt/twilio", data=body, headers=forged).status_code == 401
    assert events(db) == 1


def test_a_signed_but_unprocessable_webhook_is_422_and_kept(post: Any, db: Database) -> None:
    response = post(json.dumps({"customer_key": CALL_ID}).encode(), form=False)

    assert response.status_code == 422
    assert "transcript_sid" in response.json["error"]["fields"]
    assert events(db) == 1


def test_the_inbound_token_still_works_with_the_call_in_the_url(
    twilio_app: Flask, drain: Any, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    finished_inbound_asterisk_call(twilio_app)
    serve_transcript(fake_vendor_api)
    body = fixture("twilio/webhook_form.txt").replace(b"&customer_key=" + CALL_ID.encode(), b"")
    response = twilio_app.test_client().post(
        "/hooks/stt/twilio?pbx=asterisk&call=1700000000.123",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded", **auth()},
    )

    assert response.status_code == 202
    drain()
    b24_call_id = fake_bitrix24.calls_to("telephony.externalCall.register")[0].response["result"]["CALL_ID"]
    assert attached_messages(fake_bitrix24, b24_call_id) == STEREO_SUPPORT_CALL

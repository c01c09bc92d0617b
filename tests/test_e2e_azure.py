"""Azure's signed web hook, as Azure sends it, is fetched from the configured API (files list with the
key, the result file without it) and lands as the right MESSAGES on the right call; the challenge is
answered; forged and rotated-out signatures are refused before anything is stored."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask

from app import create_app
from b24scribe.db import Database
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas import azure
from schemas.registry import SOURCES
from tests.conftest import auth, finished_call
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_vendor_api import FakeVendorApi
from tests.test_new_sources import events
from tests.test_schemas_azure import (
    CALL_ID,
    DIARIZED_MESSAGES,
    SECRET,
    STEREO_MESSAGES,
    TRANSCRIPTION_ID,
    fixture,
    microsoft_signature,
)
from tests.test_vendors_end_to_end import attached_messages, state

REAL_API = "https://westeurope.api.cognitive.microsoft.com"
FILES_PATH = f"/speechtotext/v3.2/transcriptions/{TRANSCRIPTION_ID}/files"
RESULT_PATH = "/TranscriptionData/5cff1d03_0_0.json?skoid=1&sig=TESTSIG"
API_KEY = "azure-subscription-key"


@pytest.fixture
def azure_app(settings: Settings, db: Database, fake_vendor_api: FakeVendorApi) -> Flask:
    vendor = {"AZURE_WEBHOOK_SECRET": SECRET, "AZURE_API_URL": fake_vendor_api.url, "AZURE_API_KEY": API_KEY}
    return create_app(settings.with_overrides(vendor=vendor))


@pytest.fixture
def post(azure_app: Flask) -> Any:
    client = azure_app.test_client()

    def post(
        body: bytes, query: str = "", secret: str = SECRET, event: str = "TranscriptionCompletion", signed: bool = True
    ) -> Any:
        """POST as Azure does: the event header and the signature of the raw body, no other credential."""
        headers = {"Content-Type": "application/json", azure.EVENT_HEADER: event}
        if signed:
            headers[azure.SIGNATURE_HEADER] = microsoft_signature(secret, body)
        return client.post(f"/hooks/stt/azure{query}", data=body, headers=headers)

    return post


@pytest.fixture
def drain(azure_app: Flask) -> Any:
    app = azure_app
    return Worker(app.extensions["b24scribe.db"], app.extensions["b24scribe.settings"], SOURCES).drain


def on_fake_api(api: FakeVendorApi, body: bytes) -> bytes:
    """A body naming the fake API where Azure names its regional host."""
    return body.replace(REAL_API.encode(), api.url.encode())


def serve_files(api: FakeVendorApi, result: str) -> None:
    files = json.loads(fixture("files.json"))
    for file in files["values"]:
        if file["kind"] == "Transcription":
            file["links"]["contentUrl"] = api.url + RESULT_PATH  # the API host may serve it too
    api.serve(FILES_PATH, json.dumps(files).encode())
    api.serve(RESULT_PATH, fixture(result))


def test_a_signed_web_hook_named_by_custom_properties_is_fetched_and_attached(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = on_fake_api(fake_vendor_api, fixture("webhook_succeeded.json")).replace(CALL_ID.encode(), call_id.encode())
    serve_files(fake_vendor_api, "result_stereo.json")

    assert post(body).status_code == 202  # the call is named by customProperties only
    drain()

    assert attached_messages(fake_bitrix24, call_id) == STEREO_MESSAGES
    files, result = fake_vendor_api.requests
    assert (files.path, files.headers["ocp-apim-subscription-key"]) == (FILES_PATH, API_KEY)
    assert result.path == RESULT_PATH and "ocp-apim-subscription-key" not in result.headers


def test_a_reference_only_web_hook_fetches_the_transcription_first(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    reference = on_fake_api(fake_vendor_api, fixture("webhook_reference.json"))
    self_path = json.loads(reference)["self"].removeprefix(fake_vendor_api.url)
    fake_vendor_api.serve(self_path, on_fake_api(fake_vendor_api, fixture("webhook_succeeded.json")))
    serve_files(fake_vendor_api, "result_diarized.json")

    assert post(reference, f"?b24_call_id={call_id}").status_code == 202
    drain()

    assert attached_messages(fake_bitrix24, call_id) == DIARIZED_MESSAGES
    assert [served.path for served in fake_vendor_api.requests] == [self_path, FILES_PATH, RESULT_PATH]


def test_a_reference_only_web_hook_is_placed_on_the_call_its_transcription_names(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    # one web hook serves the whole Speech resource: the URL names no call, customProperties do
    call_id = finished_call(fake_bitrix24.webhook_url)
    reference = on_fake_api(fake_vendor_api, fixture("webhook_reference.json"))
    self_path = json.loads(reference)["self"].removeprefix(fake_vendor_api.url)
    transcription = on_fake_api(fake_vendor_api, fixture("webhook_succeeded.json"))
    fake_vendor_api.serve(self_path, transcription.replace(CALL_ID.encode(), call_id.encode()))
    serve_files(fake_vendor_api, "result_diarized.json")

    assert post(reference).status_code == 202
    drain()

    assert attached_messages(fake_bitrix24, call_id) == DIARIZED_MESSAGES


def test_a_failed_transcription_is_recorded_with_azures_reason_and_nothing_is_sent(
    post: Any, drain: Any, azure_app: Flask, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    assert post(fixture("webhook_failed.json")).status_code == 202  # 2xx: Azure does not retry
    drain()

    assert fake_bitrix24.requests == [] and fake_vendor_api.requests == []
    transcript = state(azure_app, "externalCall.f.1")["transcripts"][0]
    assert (transcript["state"], transcript["reason"]) == ("failed", "The recordings URI contains invalid data.")


def test_a_files_link_off_the_configured_host_kills_the_job_and_contacts_nothing(
    post: Any, drain: Any, azure_app: Flask, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    body = fixture("webhook_succeeded.json").replace(CALL_ID.encode(), b"externalCall.h.1")
    assert post(body).status_code == 202  # links.files names Azure's own host, not the configured one
    drain()

    assert fake_vendor_api.requests == [] and fake_bitrix24.calls_to("telephony.call.attachTranscription") == []
    [fetch] = [job for job in state(azure_app, "externalCall.h.1")["jobs"] if job["kind"] == "fetch"]
    assert (fetch["state"], fetch["dead_reason"]) == ("dead", "permanent")
    assert fetch["last_error"] == f"azure links.files is not on the configured API host {fake_vendor_api.url}"


def test_a_redelivery_is_a_duplicate(
    post: Any, drain: Any, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    body = on_fake_api(fake_vendor_api, fixture("webhook_succeeded.json")).replace(CALL_ID.encode(), call_id.encode())
    serve_files(fake_vendor_api, "result_stereo.json")

    first, again = post(body), post(body)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json["duplicate"] is True and again.json["event_id"] == first.json["event_id"]
    drain()
    attached_messages(fake_bitrix24, call_id)  # exactly one
    assert len(fake_vendor_api.requests) == 2  # fetched once


def test_forged_and_stale_signatures_are_401_and_nothing_is_stored(post: Any, db: Database) -> None:
    body = fixture("webhook_succeeded.json")

    forged = post(body, secret="not-the-secret")
    stale = post(body, secret="azure-webhook-secret-before-rotation")  # Azure's HMAC has no timestamp
    tampered = post(body.replace(b"Succeeded", b"Failed\x20\x20\x20"), signed=False)
    assert (forged.status_code, forged.json["error"]["code"]) == (401, "bad_signature")
    assert (stale.status_code, stale.json["error"]["code"]) == (401, "bad_signature")
    assert tampered.status_code == 401
    assert events(db) == 0


def test_the_challenge_and_a_ping_are_answered_and_nothing_is_stored(azure_app: Flask, db: Database) -> None:
    client = azure_app.test_client()
    token = "b7e2f1c0-9d8a-4f6e-8c5b-3a2d1e0f9c8b"
    challenge = client.post(
        f"/hooks/stt/azure?validationToken={token}",
        headers={azure.EVENT_HEADER: "Challenge", azure.SIGNATURE_HEADER: microsoft_signature(SECRET, token.encode())},
    )
    assert (challenge.status_code, challenge.get_data(), challenge.content_type) == (
        200,
        token.encode(),
        "text/plain; charset=utf-8",
    )
    ping_body = b'{"self": "https://westeurope.api.cognitive.microsoft.com/speechtotext/v3.2/webhooks/1"}'
    ping = client.post(
        "/hooks/stt/azure",
        data=ping_body,
        headers={azure.EVENT_HEADER: "Ping", azure.SIGNATURE_HEADER: microsoft_signature(SECRET, ping_body)},
    )
    assert ping.status_code == 200
    unsigned = client.post(f"/hooks/stt/azure?validationToken={token}", headers={azure.EVENT_HEADER: "Challenge"})
    assert unsigned.status_code == 401  # with a secret set, Azure signs its challenge; the token works too
    with_token = client.post(
        f"/hooks/stt/azure?validationToken={token}", headers={**auth(), azure.EVENT_HEADER: "challenge"}
    )
    assert (with_token.status_code, with_token.get_data()) == (200, token.encode())
    assert events(db) == 0


def test_a_result_file_posted_as_is_with_the_call_in_the_url(
    azure_app: Flask, drain: Any, fake_bitrix24: FakeBitrix24
) -> None:
    call_id = finished_call(fake_bitrix24.webhook_url)
    response = azure_app.test_client().post(
        f"/hooks/stt/azure?b24_call_id={call_id}",
        data=fixture("result_diarized.json"),
        headers={"Content-Type": "application/json", **auth()},
    )

    assert response.status_code == 202
    drain()
    assert attached_messages(fake_bitrix24, call_id) == DIARIZED_MESSAGES


def test_a_signed_but_unprocessable_body_is_422_and_kept(post: Any, db: Database) -> None:
    body = json.dumps({**json.loads(fixture("webhook_succeeded.json")), "status": "Running"}).encode()
    response = post(body)

    assert response.status_code == 422
    assert "status" in response.json["error"]["fields"]
    assert events(db) == 1


def test_a_transcription_naming_its_portal_is_placed_on_that_portals_call(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24, fake_vendor_api: FakeVendorApi
) -> None:
    """With several portals, the resource's one web hook names no portal; the transcription's
    customProperties do (`b24scribe_portal`, as b24scribe's own submissions set it)."""
    portals = {"north": fake_bitrix24.add_webhook(portal="north"), "south": fake_bitrix24.add_webhook(portal="south")}
    vendor = {"AZURE_WEBHOOK_SECRET": SECRET, "AZURE_API_URL": fake_vendor_api.url, "AZURE_API_KEY": API_KEY}
    configured = settings.with_overrides(bitrix24_webhook_url=None, bitrix24_portals=portals, vendor=vendor)
    app = create_app(configured)
    try:
        call_id = finished_call(portals["south"])
        reference = on_fake_api(fake_vendor_api, fixture("webhook_reference.json"))
        self_path = json.loads(reference)["self"].removeprefix(fake_vendor_api.url)
        transcription = json.loads(on_fake_api(fake_vendor_api, fixture("webhook_succeeded.json")))
        transcription["customProperties"] = {"b24scribe_b24_call_id": call_id, "b24scribe_portal": "south"}
        fake_vendor_api.serve(self_path, json.dumps(transcription).encode())
        serve_files(fake_vendor_api, "result_diarized.json")

        headers = {
            "Content-Type": "application/json",
            azure.EVENT_HEADER: "TranscriptionCompletion",
            azure.SIGNATURE_HEADER: microsoft_signature(SECRET, reference),
        }
        assert app.test_client().post("/hooks/stt/azure", data=reference, headers=headers).status_code == 202
        Worker(app.extensions["b24scribe.db"], configured, SOURCES).drain()

        attached = [r for r in fake_bitrix24.requests if r.method == "telephony.call.attachtranscription"]
        assert [(r.portal, r.status) for r in attached] == [("south", 200)]
        assert attached_messages(fake_bitrix24, call_id) == DIARIZED_MESSAGES
    finally:
        app.extensions["b24scribe.db"].dispose()

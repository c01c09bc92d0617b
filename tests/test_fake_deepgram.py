"""The fake Deepgram behaves as the transcription-request tests need: Deepgram's answers, callbacks
that b24scribe's own Deepgram parser reads, retries, lost answers, and the request log."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode

import pytest
import requests

from b24scribe.transcript import CallReference, Segment
from schemas import deepgram
from tests.fake_deepgram import FakeDeepgram
from tests.fake_vendor_api import FakeVendorApi

AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 8
STEREO = "utterances=true&punctuate=true&multichannel=true"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class CallbackReceiver:
    """b24scribe's side of a callback: records what arrives, answers `statuses` in turn, then 200."""

    statuses: deque[int] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    def url(self, userinfo: str = "", path: str = "/hooks/stt/deepgram") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}{path}"

    def start(self) -> CallbackReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.received.append(Received(self.command, self.path, headers, body))
                self.send_response(receiver.statuses.popleft() if receiver.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    started = CallbackReceiver().start()
    yield started
    started.stop()


def listen(
    fake: FakeDeepgram,
    query: str,
    *,
    url: str | None = None,
    audio: bytes | None = None,
    key: str | None = "dg-test-key",
) -> requests.Response:
    """Submit as b24scribe does: a JSON `{"url"}` body, or raw audio bytes."""
    headers = {"Authorization": f"Token {key}"} if key is not None else {}
    if url is not None:
        return requests.post(f"{fake.url}/v1/listen?{query}", json={"url": url}, headers=headers, timeout=5)
    headers["Content-Type"] = "audio/wav"
    return requests.post(f"{fake.url}/v1/listen?{query}", data=audio, headers=headers, timeout=5)


def manage(fake: FakeDeepgram, path: str, key: str = "dg-test-key", **params: str) -> requests.Response:
    return requests.get(f"{fake.url}{path}", params=params, headers={"Authorization": f"Token {key}"}, timeout=5)


def test_a_wrong_or_missing_key_gets_deepgrams_401_and_no_callback(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    query = f"callback={receiver.url()}&{STEREO}"
    for key in ("wrong-key", None):
        answer = listen(fake_deepgram, query, audio=AUDIO, key=key)

        assert answer.status_code == 401
        body = answer.json()
        assert body["err_code"] == "INVALID_AUTH"
        assert body["err_msg"] == "Invalid credentials."
        assert body["request_id"]
    assert manage(fake_deepgram, "/v1/projects", key="wrong-key").status_code == 401

    time.sleep(fake_deepgram.callback_delay * 3)
    assert fake_deepgram.callbacks == [] and receiver.received == []
    assert [s.authorization for s in fake_deepgram.submissions] == ["Token wrong-key", None]
    assert [s.answered for s in fake_deepgram.submissions] == [401, 401]


def test_a_url_body_is_fetched_by_the_fake_and_its_sha256_recorded(
    fake_deepgram: FakeDeepgram,
    fake_vendor_api: FakeVendorApi,
    receiver: CallbackReceiver,
) -> None:
    fake_vendor_api.serve("/recordings/call-1.wav", AUDIO)

    answer = listen(
        fake_deepgram, f"callback={receiver.url()}&{STEREO}", url=f"{fake_vendor_api.url}/recordings/call-1.wav"
    )

    assert answer.status_code == 200
    request_id = answer.json()["request_id"]
    assert answer.headers["dg-request-id"] == request_id
    result = fake_deepgram.wait_for_callbacks()[0].json()
    [submission] = fake_deepgram.submissions
    assert submission.body_kind == "url"
    assert submission.request_id == request_id
    assert submission.audio_size == len(AUDIO)
    assert submission.audio_sha256 == hashlib.sha256(AUDIO).hexdigest()
    assert result["metadata"]["sha256"] == submission.audio_sha256
    assert [served.path for served in fake_vendor_api.requests] == ["/recordings/call-1.wav"]


def test_raw_audio_bytes_are_recorded_with_their_size_and_sha256(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    answer = listen(fake_deepgram, f"callback={receiver.url()}&{STEREO}", audio=AUDIO)

    assert answer.status_code == 200
    [submission] = fake_deepgram.submissions
    assert (submission.body_kind, submission.audio_size) == ("bytes", len(AUDIO))
    assert submission.audio_sha256 == hashlib.sha256(AUDIO).hexdigest()
    assert fake_deepgram.wait_for_callbacks()[0].json()["metadata"]["request_id"] == answer.json()["request_id"]


def test_audio_that_cannot_be_fetched_calls_back_with_deepgrams_error_body(
    fake_deepgram: FakeDeepgram,
    fake_vendor_api: FakeVendorApi,
    receiver: CallbackReceiver,
) -> None:
    answer = listen(fake_deepgram, f"callback={receiver.url()}&{STEREO}", url=f"{fake_vendor_api.url}/gone.wav")
    request_id = answer.json()["request_id"]

    body = fake_deepgram.wait_for_callbacks()[0].json()

    assert body == {
        "err_code": "REMOTE_CONTENT_ERROR",
        "err_msg": "Could not fetch the audio at the submitted url (HTTP 404).",
        "request_id": request_id,
    }
    result = deepgram.parse(fake_deepgram.callbacks[0].body, {})
    assert (result.status, result.vendor_job_id) == ("failed", request_id)
    [failed] = manage(fake_deepgram, f"/v1/projects/{fake_deepgram.project_id}/requests", status="failed").json()[
        "requests"
    ]
    assert (failed["request_id"], failed["code"]) == (request_id, 400)


def test_the_callback_carries_the_urls_userinfo_as_basic_auth_and_not_in_the_url(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    callback = receiver.url("b24scribe:t%40ken@", "/hooks/stt/deepgram?pbx=asterisk")

    listen(fake_deepgram, f"{urlencode({'callback': callback})}&{STEREO}", audio=AUDIO)

    [attempt] = fake_deepgram.wait_for_callbacks()
    [delivered] = receiver.received
    assert delivered.method == "POST"
    assert delivered.path == "/hooks/stt/deepgram?pbx=asterisk"
    assert delivered.headers["authorization"] == "Basic " + base64.b64encode(b"b24scribe:t@ken").decode()
    assert delivered.headers["content-type"] == "application/json"
    assert attempt.url == receiver.url(path="/hooks/stt/deepgram?pbx=asterisk")
    assert attempt.status == 200


def test_callback_method_put_is_honoured(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    listen(fake_deepgram, f"callback={receiver.url()}&callback_method=put&{STEREO}", audio=AUDIO)

    assert fake_deepgram.wait_for_callbacks()[0].method == "PUT"
    assert receiver.received[0].method == "PUT"


def test_a_callback_is_retried_until_it_is_answered_2xx(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    receiver.statuses.extend([500, 302, 503])

    listen(fake_deepgram, f"callback={receiver.url()}&{STEREO}", audio=AUDIO)

    attempts = fake_deepgram.wait_for_callbacks(4)
    assert [attempt.status for attempt in attempts] == [500, 302, 503, 200]
    assert all(later.time - earlier.time >= 0.15 for earlier, later in zip(attempts, attempts[1:], strict=False))
    assert len({received.body for received in receiver.received}) == 1  # the same result every time
    time.sleep(0.5)
    assert len(fake_deepgram.callbacks) == 4


def test_a_callback_gives_up_after_callback_retries(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    fake_deepgram.callback_retries = 1
    receiver.statuses.extend([500] * 5)

    listen(fake_deepgram, f"callback={receiver.url()}&{STEREO}", audio=AUDIO)

    assert [attempt.status for attempt in fake_deepgram.wait_for_callbacks(2)] == [500, 500]
    time.sleep(0.6)
    assert len(receiver.received) == 2


def test_fail_next_answers_429_with_retry_after_once_and_calls_nothing_back(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    fake_deepgram.fail_next(429, retry_after=7)
    query = f"callback={receiver.url()}&{STEREO}"

    refused = listen(fake_deepgram, query, audio=AUDIO)
    accepted = listen(fake_deepgram, query, audio=AUDIO)

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "7"
    assert refused.json()["err_code"] == "TOO_MANY_REQUESTS"
    assert accepted.status_code == 200
    [attempt] = fake_deepgram.wait_for_callbacks()
    assert attempt.request_id == accepted.json()["request_id"]
    assert [s.answered for s in fake_deepgram.submissions] == [429, 200]
    time.sleep(0.4)
    assert len(fake_deepgram.callbacks) == 1


def test_a_dropped_answer_still_records_the_submission_and_calls_back(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    fake_deepgram.drop_after_accept()
    query = f"callback={receiver.url()}&{STEREO}&extra=b24scribe_call:42"

    with pytest.raises(requests.ConnectionError):
        listen(fake_deepgram, query, audio=AUDIO)

    [submission] = fake_deepgram.submissions
    assert (submission.accepted, submission.answered, submission.extra) == (True, None, {"b24scribe_call": "42"})
    [attempt] = fake_deepgram.wait_for_callbacks()
    assert attempt.request_id == submission.request_id
    assert listen(fake_deepgram, query, audio=AUDIO).status_code == 200  # only once


def test_held_callbacks_wait_for_release(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    fake_deepgram.hold_callbacks()

    listen(fake_deepgram, f"callback={receiver.url()}&{STEREO}", audio=AUDIO)
    time.sleep(fake_deepgram.callback_delay * 3)
    assert receiver.received == []

    fake_deepgram.release_callbacks()
    assert fake_deepgram.wait_for_callbacks()[0].status == 200


def test_the_request_log_lists_submissions_newest_first_with_the_path_as_sent(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    callback = receiver.url("b24scribe:secret@")
    before = datetime.now(UTC) - timedelta(seconds=5)
    first_query = urlencode([("callback", callback), ("utterances", "true"), ("extra", "b24scribe_call:first")])
    second_query = urlencode([("callback", callback), ("diarize", "true"), ("extra", "b24scribe_call:second")])
    first = listen(fake_deepgram, first_query, audio=AUDIO).json()["request_id"]
    second = listen(fake_deepgram, second_query, audio=AUDIO).json()["request_id"]

    assert manage(fake_deepgram, "/v1/projects").json() == {
        "projects": [{"project_id": fake_deepgram.project_id, "name": "b24scribe-test"}]
    }
    requests_path = f"/v1/projects/{fake_deepgram.project_id}/requests"
    since = before.strftime("%Y-%m-%dT%H:%M:%SZ")
    listed = manage(fake_deepgram, requests_path, start=since, limit="1000").json()
    assert (listed["page"], listed["limit"]) == (0, 1000)
    newest, oldest = listed["requests"]
    assert (newest["request_id"], oldest["request_id"]) == (second, first)
    assert "extra=b24scribe_call%3Afirst" in oldest["path"] and oldest["path"].startswith("/v1/listen?callback=")
    assert oldest["callback"] == receiver.url()
    assert {key: oldest[key] for key in ("project_uuid", "api_key_id", "code", "deployment")} == {
        "project_uuid": fake_deepgram.project_id,
        "api_key_id": fake_deepgram.api_key_id,
        "code": 200,
        "deployment": "hosted",
    }
    assert datetime.fromisoformat(oldest["created"]) >= before

    assert [r["request_id"] for r in manage(fake_deepgram, requests_path, limit="1").json()["requests"]] == [second]
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert manage(fake_deepgram, requests_path, start=later).json()["requests"] == []
    assert manage(fake_deepgram, requests_path, start="yesterday").status_code == 400
    assert manage(fake_deepgram, "/v1/projects/not-ours/requests").json()["err_code"] == "PROJECT_NOT_FOUND"


def test_a_stereo_callback_parses_to_the_scripted_segments_and_the_extra_reference(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    fake_deepgram.script = [
        (1, 0.08, 1.44, "Good afternoon, Acme support."),
        (0, 1.6, 3.2, "Hi, I'm calling about my order."),
        (1, 3.5, 5.12, "What's the order number?"),
    ]
    query = f"callback={receiver.url()}&{STEREO}&extra=pbx:asterisk&extra=call:1700000000.123&extra=attempt:2"

    listen(fake_deepgram, query, audio=AUDIO)

    body = fake_deepgram.wait_for_callbacks()[0].body
    result = deepgram.parse(body, {})
    assert result.status == "completed"
    assert result.reference == CallReference(pbx="asterisk", pbx_call_id="1700000000.123")
    assert result.transcript is not None
    assert result.transcript.segments == [  # Deepgram's order: channel 0, then channel 1
        Segment(1.6, 3.2, "Hi, I'm calling about my order.", channel=0),
        Segment(0.08, 1.44, "Good afternoon, Acme support.", channel=1),
        Segment(3.5, 5.12, "What's the order number?", channel=1),
    ]
    assert receiver.received[0].body == body  # what b24scribe receives is what the fake recorded
    parsed: Any = fake_deepgram.callbacks[0].json()
    assert parsed["metadata"]["extra"] == {"pbx": "asterisk", "call": "1700000000.123", "attempt": "2"}
    assert parsed["metadata"]["channels"] == 2
    assert parsed["results"]["channels"][1]["alternatives"][0]["transcript"] == (
        "Good afternoon, Acme support. What's the order number?"
    )


def test_a_diarized_mono_callback_parses_to_speakers_on_one_channel(
    fake_deepgram: FakeDeepgram,
    receiver: CallbackReceiver,
) -> None:
    fake_deepgram.script = [(0, 0.24, 1.6, "Good morning, this is Anna."), (1, 2.0, 3.5, "Hello, a table for two.")]

    listen(fake_deepgram, f"callback={receiver.url()}&utterances=true&punctuate=true&diarize=true", audio=AUDIO)

    result = deepgram.parse(fake_deepgram.wait_for_callbacks()[0].body, {})
    assert result.transcript is not None
    assert result.transcript.segments == [
        Segment(0.24, 1.6, "Good morning, this is Anna.", speaker="0"),
        Segment(2.0, 3.5, "Hello, a table for two.", speaker="1"),
    ]
    words = fake_deepgram.callbacks[0].json()["results"]["channels"][0]["alternatives"][0]["words"]
    assert words[0] == {
        "word": "good",
        "start": 0.24,
        "end": 0.512,
        "confidence": 0.98,
        "punctuated_word": "Good",
        "speaker": 0,
        "speaker_confidence": 0.9,
    }

"""b24scribe asks OpenAI itself (contract §10), end to end against a fake that answers as OpenAI does:
with the transcript, there and then, since OpenAI has no callbacks. One generic PBX event in; a
stereo WAV split into its two channels, each sent as a mono WAV of that channel's own samples and
transcribed on its own; a mono recording (or a stereo one that cannot be split) sent whole to the
diarizing model; the answers stored as parts of the call's transcript, and the call registered,
finished, its recording and its transcript attached with exact MESSAGES. A 429 backs off, a refusal
is shown on the call, a file over OpenAI's 25 MiB is refused before anything is sent, and a lost
answer is transcribed again (OpenAI keeps nothing to look up)."""

from __future__ import annotations

import hashlib
import random
import struct
import threading
import time
import wave
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from typing import Any

import pytest
import requests
from flask import Flask

from b24scribe.checks import check_transcription_vendor
from b24scribe.db import Database
from b24scribe.delivery import submit_openai
from b24scribe.delivery.submit import SUBMITTERS, Submission, VendorRejected
from b24scribe.models import InboundEvent, Job
from b24scribe.settings import Settings, load_settings
from bench.recording import RecordingServer
from tests.fake_bitrix24 import FakeBitrix24
from tests.fake_openai_stt import DIARIZE, WHISPER, FakeOpenAI, Line, fake_openai  # noqa: F401 (the fixture)
from tests.transcribe_support import ORDER, call_row, drain_until, finished, methods, post_event

RATE = 8000
FRAMES = 6 * RATE  # 6 s: more than two of the submitter's blocks, so the split crosses block edges
# what each channel of the stereo test recording says: channel 0 the caller (the client of an inbound
# call), channel 1 the employee, who greets first
CLIENT = [Line(1.02, 3.96, " Hi, I'm calling about my order.")]
EMPLOYEE = [Line(0.0, 2.1, " Good afternoon, Acme support."), Line(4.2, 6.0, " What's the order number?")]
STEREO_SUPPORT_CALL = [  # whole seconds: a start rounds down, a stop up
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 3, "MESSAGE": "Good afternoon, Acme support."},
    {"SIDE": "Client", "START_TIME": 1, "STOP_TIME": 4, "MESSAGE": "Hi, I'm calling about my order."},
    {"SIDE": "User", "START_TIME": 4, "STOP_TIME": 6, "MESSAGE": "What's the order number?"},
]
# what the mono test recording says, as the diarizing model labels it: the first speaker answers
# the inbound call (the employee)
BOOKING = [
    Line(0.0, 2.0, " Good morning, this is Anna.", "A"),
    Line(2.0, 4.0, " Hello, I'd like to book a table.", "B"),
    Line(5.0, 6.0, " For how many?", "A"),
]
DIARIZED_BOOKING = [
    {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Good morning, this is Anna."},
    {"SIDE": "Client", "START_TIME": 2, "STOP_TIME": 4, "MESSAGE": "Hello, I'd like to book a table."},
    {"SIDE": "User", "START_TIME": 5, "STOP_TIME": 6, "MESSAGE": "For how many?"},
]


def samples(seed: int) -> bytes:
    """FRAMES 16-bit samples of noise, different for each seed: a channel recognisable by its samples."""
    return random.Random(seed).randbytes(FRAMES * 2)


def wav_file(frames: bytes, channels: int) -> bytes:
    out = BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(RATE)
        writer.writeframes(frames)
    return out.getvalue()


def stereo(left: bytes, right: bytes) -> bytes:
    """A stereo WAV whose left channel holds `left` and right channel `right` (16-bit samples)."""
    pairs = zip(struct.iter_unpack("<h", left), struct.iter_unpack("<h", right), strict=True)
    return wav_file(b"".join(struct.pack("<hh", a[0], b[0]) for a, b in pairs), 2)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Recordings:
    """A PBX's recording server on 127.0.0.1 serving given bytes (RecordingServer serves only mono noise)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                data, kind = files.get(self.path, (b"", ""))
                self.send_response(200 if kind else 404)
                self.send_header("Content-Type", kind or "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def add(self, name: str, data: bytes, kind: str = "audio/wav") -> str:
        self.files[f"/rec/{name}"] = (data, kind)
        return f"http://127.0.0.1:{self.server.server_address[1]}/rec/{name}"


@pytest.fixture
def served() -> Iterator[Recordings]:
    server = Recordings()
    yield server
    server.server.shutdown()
    server.server.server_close()


def keys(fake: FakeOpenAI) -> dict[str, str]:
    return {"OPENAI_API_KEY": fake.api_key, "OPENAI_API_URL": fake.url}


@pytest.fixture
def service(public_app: Callable[..., tuple[Flask, str]], fake_openai: FakeOpenAI) -> Callable[..., tuple[Flask, str]]:  # noqa: F811
    """Start the app with transcription requests to (the fake) OpenAI."""
    return lambda **overrides: public_app(**({"transcribe_with": "openai", "vendor": keys(fake_openai)} | overrides))


def attached(fake_bitrix24: FakeBitrix24) -> Callable[[], bool]:
    return lambda: "telephony.call.attachtranscription" in methods(fake_bitrix24)


def test_each_channel_of_a_stereo_recording_is_transcribed_on_its_own_and_the_call_gets_both(
    service: Callable[..., tuple[Flask, str]],
    fake_openai: FakeOpenAI,  # noqa: F811
    fake_bitrix24: FakeBitrix24,
    served: Recordings,
    db: Database,
) -> None:
    app, _ = service()
    left, right = samples(1), samples(2)
    fake_openai.says("client", sha256(left), CLIENT)
    fake_openai.says("employee", sha256(right), EMPLOYEE)
    recording = stereo(left, right)
    post_event(app, finished("1700000000.1", served.add("call-1.wav", recording)))
    drain_until(app, attached(fake_bitrix24))

    assert methods(fake_bitrix24) == ORDER
    (record,) = fake_bitrix24.calls_to("telephony.externalCall.attachRecord")  # the recording itself, unsplit
    first, second = fake_openai.requests
    for request, heard in ((first, "client"), (second, "employee")):
        # a mono WAV holding exactly that channel's samples, at the recording's rate and width
        assert request.wav is not None and (request.wav.channels, request.wav.rate, request.wav.width) == (1, RATE, 2)
        assert request.wav.frames == FRAMES and request.heard == heard
        assert request.authorization == f"Bearer {fake_openai.api_key}"
        assert request.fields == {
            "model": [WHISPER],
            "response_format": ["verbose_json"],
            "timestamp_granularities[]": ["segment"],
        }
        assert request.filename is not None and request.filename.endswith(".wav")
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == STEREO_SUPPORT_CALL
    with db.read() as session:  # stored as the two posts a script would make, one per channel
        events = session.query(InboundEvent).filter(InboundEvent.source == "stt").order_by(InboundEvent.id).all()
        assert [(e.provider, e.query) for e in events] == [
            ("openai", {"pbx": "generic", "call": "1700000000.1", "channel": "0", "parts": "2"}),
            ("openai", {"pbx": "generic", "call": "1700000000.1", "channel": "1", "parts": "2"}),
        ]
    row = call_row(db, "1700000000.1")
    assert (row.transcription_state, row.transcription_job_id, row.transcription_error) == ("transcribed", None, None)


def test_a_mono_recording_goes_whole_to_the_diarizing_model(
    service: Callable[..., tuple[Flask, str]],
    fake_openai: FakeOpenAI,  # noqa: F811
    fake_bitrix24: FakeBitrix24,
    served: Recordings,
) -> None:
    app, _ = service()
    frames = samples(3)
    fake_openai.says("booking", sha256(frames), BOOKING)
    recording = wav_file(frames, 1)
    post_event(app, finished("1700000000.2", served.add("call-2.wav", recording), recording_channels=1))
    drain_until(app, attached(fake_bitrix24))

    (request,) = fake_openai.requests
    assert request.sha256 == sha256(recording) and request.heard == "booking"  # the file as downloaded
    assert request.fields == {"model": [DIARIZE], "response_format": ["diarized_json"], "chunking_strategy": ["auto"]}
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == DIARIZED_BOOKING


def test_a_stereo_recording_that_is_not_a_pcm_wav_goes_whole_to_the_diarizing_model(
    service: Callable[..., tuple[Flask, str]],
    fake_openai: FakeOpenAI,  # noqa: F811
    fake_bitrix24: FakeBitrix24,
    served: Recordings,
) -> None:
    app, _ = service(vendor=keys(fake_openai) | {"OPENAI_LANGUAGE": "en"})
    mp3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + random.Random(4).randbytes(20_000)  # Python cannot split it
    fake_openai.says("booking", sha256(mp3), BOOKING)
    post_event(app, finished("1700000000.3", served.add("call-3.mp3", mp3, "audio/mpeg")))
    drain_until(app, attached(fake_bitrix24))

    (request,) = fake_openai.requests
    assert request.sha256 == sha256(mp3) and (request.filename, request.file_content_type) == (
        "recording.mp3",
        "audio/mpeg",
    )
    assert request.field("model") == DIARIZE and request.field("language") == "en"
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == DIARIZED_BOOKING


def test_a_429_backs_off_for_its_retry_after_without_spending_an_attempt(
    service: Callable[..., tuple[Flask, str]],
    fake_openai: FakeOpenAI,  # noqa: F811
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_openai.fail_next(429, retry_after=120)
    post_event(app, finished("1700000000.4", recordings.add("rec-4", 100_000), recording_channels=1))
    before = time.time()
    drain_until(app, lambda: bool(fake_openai.requests))
    drain_until(app, lambda: True)

    assert [r.answered for r in fake_openai.requests] == [429]  # nothing more within the back-off
    with db.read() as session:
        job = session.query(Job).filter(Job.kind == "transcribe").one()
        assert job.state == "pending" and job.attempts == 0
        assert 100 <= job.next_attempt_at - before <= 130
        assert "openai answered HTTP 429: Rate limit reached for whisper-1" in (job.last_error or "")


@pytest.mark.parametrize(
    ("status", "body", "shown"),
    [
        (
            400,
            {
                "error": {
                    "message": "Audio file might be corrupted or unsupported",
                    "type": "invalid_request_error",
                    "param": "file",
                    "code": "invalid_value",
                }
            },
            "openai answered HTTP 400: Audio file might be corrupted or unsupported",
        ),
        (  # a 429 that waiting does not cure
            429,
            {
                "error": {
                    "message": "You exceeded your current quota, please check your plan and billing details.",
                    "type": "insufficient_quota",
                    "param": None,
                    "code": "insufficient_quota",
                }
            },
            "openai answered HTTP 429: You exceeded your current quota, please check your plan and billing details.",
        ),
    ],
)
def test_a_refusal_is_shown_on_the_call_with_openais_reason_and_not_retried(
    status: int,
    body: dict[str, Any],
    shown: str,
    service: Callable[..., tuple[Flask, str]],
    fake_openai: FakeOpenAI,  # noqa: F811
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    fake_openai.fail_next(status, body)
    post_event(app, finished("1700000000.5", recordings.add("rec-5", 100_000)))
    drain_until(app, lambda: call_row(db, "1700000000.5").transcription_state == "failed")
    assert call_row(db, "1700000000.5").transcription_error == shown
    assert len(fake_openai.requests) == 1


def test_a_recording_over_openais_25_mib_is_refused_before_anything_is_sent(
    service: Callable[..., tuple[Flask, str]],
    fake_openai: FakeOpenAI,  # noqa: F811
    recordings: RecordingServer,
    db: Database,
) -> None:
    app, _ = service()
    post_event(app, finished("1700000000.6", recordings.add("rec-6", 27_000_000), recording_channels=1))
    drain_until(app, lambda: call_row(db, "1700000000.6").transcription_state == "failed")
    assert call_row(db, "1700000000.6").transcription_error == (
        "the recording is 25.7 MiB: OpenAI takes at most 25 MiB per file"
    )
    assert fake_openai.requests == []


def test_a_stereo_wav_too_large_to_send_whole_goes_as_two_channels_each_under_the_limit(
    settings: Settings,
    fake_openai: FakeOpenAI,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com", transcribe_with="openai", vendor=keys(fake_openai)
    )
    path = tmp_path / "call.wav"
    path.write_bytes(stereo(samples(1), samples(2)))  # 192 KB; each channel 96 KB
    submission = Submission((), "https://b24scribe.example.com/hooks/stt/openai", 2, path=path)
    monkeypatch.setattr(submit_openai, "MAX_REQUEST_BYTES", 100_000)
    with requests.Session() as http:
        parts = SUBMITTERS["openai"].transcribe_now(http, configured, submission)  # type: ignore[attr-defined]
        assert [(p.state, p.query) for p in parts] == [
            ("done", (("channel", "0"), ("parts", "2"))),
            ("done", (("channel", "1"), ("parts", "2"))),
        ]
        assert [r.size < 100_000 for r in fake_openai.requests] == [True, True]

        monkeypatch.setattr(submit_openai, "MAX_REQUEST_BYTES", 50_000)
        with pytest.raises(VendorRejected, match=r"^each channel is 0\.1 MiB: OpenAI takes at most"):
            SUBMITTERS["openai"].transcribe_now(http, configured, submission)  # type: ignore[attr-defined]
    assert len(fake_openai.requests) == 2  # nothing more was sent


@pytest.mark.parametrize("trouble", ["lost answer", "503"])
def test_a_lost_answer_or_a_5xx_is_transcribed_again_on_the_next_attempt(
    trouble: str,
    service: Callable[..., tuple[Flask, str]],
    fake_openai: FakeOpenAI,  # noqa: F811
    fake_bitrix24: FakeBitrix24,
    served: Recordings,
    db: Database,
) -> None:
    app, _ = service()
    frames = samples(3)
    fake_openai.says("booking", sha256(frames), BOOKING)
    if trouble == "503":
        fake_openai.fail_next(503)
    else:
        fake_openai.drop_next()  # OpenAI transcribed it, the answer never came back
    post_event(app, finished("1700000000.7", served.add("call-7.wav", wav_file(frames, 1)), recording_channels=1))
    drain_until(app, attached(fake_bitrix24))

    # no vendor job exists to look up: the recording was simply transcribed (and billed) twice
    assert [r.answered for r in fake_openai.requests] == [None if trouble == "lost answer" else 503, 200]
    (attach,) = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert attach.params["MESSAGES"] == DIARIZED_BOOKING
    row = call_row(db, "1700000000.7")
    assert (row.transcription_state, row.transcription_error) == ("transcribed", None)


def test_submit_and_find_say_there_is_no_vendor_job(settings: Settings, fake_openai: FakeOpenAI) -> None:  # noqa: F811
    openai = SUBMITTERS["openai"]
    configured = settings.with_overrides(transcribe_with="openai", vendor=keys(fake_openai))
    with requests.Session() as http:
        with pytest.raises(VendorRejected, match="answers with the transcript at once"):
            openai.submit(http, configured, Submission((), "https://b24scribe.example.com/hooks/stt/openai", 1))
        assert openai.find(http, configured, (("b24scribe_pbx", "generic"),), time.time()) is None
    assert fake_openai.requests == [] and fake_openai.reads == []


def test_check_tries_the_key_with_the_model_list(settings: Settings, fake_openai: FakeOpenAI) -> None:  # noqa: F811
    configured = settings.with_overrides(
        public_url="https://b24scribe.example.com", transcribe_with="openai", vendor=keys(fake_openai)
    )
    (good,) = check_transcription_vendor(configured)
    assert good.level == "ok"
    wrong = configured.with_overrides(vendor=keys(fake_openai) | {"OPENAI_API_KEY": "sk-wrong-key-0000"})
    (bad,) = check_transcription_vendor(wrong)
    assert bad.level == "problem"
    assert bad.message.endswith("openai answered HTTP 401: Incorrect API key provided")  # not the key it quotes
    assert fake_openai.reads == ["/v1/models", "/v1/models"] and fake_openai.requests == []


def test_transcribe_with_accepts_openai() -> None:
    environ = {
        "B24SCRIBE_PUBLIC_URL": "https://b24scribe.example.com",
        "B24SCRIBE_INBOUND_TOKEN": "t" * 20,
        "B24SCRIBE_TRANSCRIBE_WITH": "OpenAI",
    }
    assert load_settings(environ, dotenv=False).transcribe_with == "openai"

"""A stand-in for OpenAI's transcription API on 127.0.0.1, for the tests of transcription requests.

- `POST /v1/audio/transcriptions` (`Authorization: Bearer <key>`), multipart/form-data: `file` (its
  name's extension must be a format OpenAI reads), `model`, `response_format`,
  `timestamp_granularities[]`, `chunking_strategy`, `language`. Checked as OpenAI documents them:
  `verbose_json` and `timestamp_granularities[]` only with `whisper-1`, `diarized_json` only with
  `gpt-4o-transcribe-diarize`, which needs `chunking_strategy` above 30 s of audio; a body above
  26214400 bytes is a 413. The answer is the transcript itself, made from what the test said the
  audio holds (`says`): keyed by the SHA-256 of a WAV's sample frames (so a channel cut out of a
  stereo file is recognised by its samples alone, whatever its header) or of the whole file
  otherwise. Audio nobody registered is transcribed as silence (no segments).
- `GET /v1/models`: the models, for the key check.

Shapes follow openai-python's `TranscriptionVerbose`/`TranscriptionSegment`,
`TranscriptionDiarized`/`TranscriptionDiarizedSegment` and OpenAI's error body `{"error": {"message",
"type", "param", "code"}}`. The fake's own wording: the 400 messages for a model that does not take a
format, and its 413's type.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import wave
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.fake_vendor_callbacks import QuietHandler, Reply

MAX_BODY_BYTES = 26_214_400
FORMATS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
WHISPER, DIARIZE = "whisper-1", "gpt-4o-transcribe-diarize"
MODELS = (WHISPER, DIARIZE, "gpt-4o-transcribe", "gpt-4o-mini-transcribe")


@dataclass(frozen=True)
class Line:
    """What a test says a piece of audio holds: one segment."""

    start: float
    end: float
    text: str
    speaker: str = "A"  # what a diarizing model labels it


@dataclass(frozen=True)
class Wav:
    """A WAV file as the fake read it."""

    channels: int
    rate: int
    width: int
    frames: int
    frames_sha256: str


@dataclass
class Request:
    """One `POST /v1/audio/transcriptions` as the fake saw it, whatever it answered."""

    authorization: str | None
    fields: dict[str, list[str]]  # the form's text fields, each name with its values in order
    filename: str | None = None
    file_content_type: str | None = None
    size: int = 0  # of the file
    sha256: str | None = None  # of the file
    wav: Wav | None = None  # when the file is a PCM WAV
    heard: str | None = None  # the registered audio it was recognised as (None: not registered)
    answered: int | None = None  # the status sent; None when the answer was dropped
    time: float = field(default_factory=time.time)

    def field(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else None


def _error(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> Any:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_ERRORS = {
    400: _error("Invalid request."),
    429: _error(
        "Rate limit reached for whisper-1 on requests per min (RPM): Limit 50.", "requests", None, "rate_limit_exceeded"
    ),
    500: _error("The server had an error while processing your request. Sorry about that!", "server_error"),
    503: _error("The engine is currently overloaded, please try again later.", "server_error"),
}


@dataclass
class FakeOpenAI:
    """OpenAI's transcription and model-list endpoints; records what it was sent."""

    api_key: str = "sk-test-openai-0123456789"
    requests: list[Request] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._heard: dict[str, tuple[str, list[Line]]] = {}
        self._failures: list[Reply] = []
        self._drops = 0

    @property
    def url(self) -> str:
        assert self.server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    # --- what the test steers -------------------------------------------------------------------

    def says(self, name: str, audio_sha256: str, lines: list[Line]) -> None:
        """Audio whose frames (a WAV) or bytes (anything else) hash to `audio_sha256` holds `lines`."""
        self._heard[audio_sha256] = (name, lines)

    def fail_next(self, status: int, body: Any = None, retry_after: int | None = None) -> None:
        """Answer the next authenticated transcription with `status` and OpenAI's error body."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        with self._lock:
            self._failures.append(Reply(status, body or _ERRORS.get(status, _error(f"HTTP {status}")), headers))

    def drop_next(self) -> None:
        """Transcribe the next request but close the connection without the answer."""
        with self._lock:
            self._drops += 1

    # --- the server -----------------------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                headers = {k.lower(): v for k, v in self.headers.items()}
                if urlsplit(self.path).path != "/v1/audio/transcriptions":
                    return self.send_reply(Reply(404, _error(f"Invalid URL (POST {self.path})")))
                if length > MAX_BODY_BYTES:
                    message = f"Maximum content size limit ({MAX_BODY_BYTES}) exceeded ({length} bytes read)"
                    return self.send_reply(Reply(413, _error(message, "server_error")))
                reply = fake.transcribe(headers, self.rfile.read(length))
                if reply is not None:
                    self.send_reply(reply)  # else: drop the connection; the client sees no answer

            def do_GET(self) -> None:  # noqa: N802
                self.send_reply(fake.read(self.path, {k.lower(): v for k, v in self.headers.items()}))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # --- transcriptions -------------------------------------------------------------------------

    def transcribe(self, headers: Mapping[str, str], body: bytes) -> Reply | None:
        """Record a transcription request and answer it (None: close the connection unanswered)."""
        form, upload = _form(headers.get("content-type", ""), body)
        request = Request(authorization=headers.get("authorization"), fields=form)
        if upload is not None:
            request.filename, request.file_content_type, audio = upload
            request.size, request.sha256 = len(audio), hashlib.sha256(audio).hexdigest()
            request.wav = _read_wav(audio)
        with self._lock:
            self.requests.append(request)
        reply = self._refusal(request)
        if reply is None:
            reply = self._transcript(request)
            with self._lock:
                dropped, self._drops = self._drops > 0, max(self._drops - 1, 0)
            if dropped:
                return None
        request.answered = reply.status
        return reply

    def _refusal(self, request: Request) -> Reply | None:
        """Why OpenAI would not transcribe this request; None to transcribe it."""
        authorization = request.authorization or ""
        if not authorization.startswith("Bearer "):
            return Reply(
                401,
                _error(
                    "You didn't provide an API key. You need to provide your API key in an Authorization "
                    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                ),
            )
        if authorization != f"Bearer {self.api_key}":
            given = authorization.removeprefix("Bearer ")
            masked = f"{given[:3]}{'*' * max(len(given) - 7, 0)}{given[-4:]}"
            return Reply(
                401,
                _error(
                    f"Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys.",
                    code="invalid_api_key",
                ),
            )
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            return failure
        model, response_format = request.field("model"), request.field("response_format") or "json"
        if request.filename is None:
            return Reply(400, _error("You must provide a file.", param="file"))
        extension = request.filename.rsplit(".", 1)[-1].lower() if "." in request.filename else ""
        if extension not in FORMATS:
            return Reply(400, _error(f"Invalid file format. Supported formats: {list(FORMATS)}", param="file"))
        if not model:
            return Reply(400, _error("you must provide a model parameter", param="model"))
        if model not in MODELS:
            return Reply(
                400,
                _error(
                    f"The model `{model}` does not exist or you do not have access to it.",
                    param="model",
                    code="model_not_found",
                ),
            )
        if response_format == "verbose_json" and model != WHISPER:
            return Reply(
                400,
                _error(
                    f"response_format 'verbose_json' is not compatible with model '{model}'.", param="response_format"
                ),
            )
        if response_format == "diarized_json" and model != DIARIZE:
            return Reply(
                400,
                _error(
                    f"response_format 'diarized_json' is not compatible with model '{model}'.", param="response_format"
                ),
            )
        if "timestamp_granularities[]" in request.fields and response_format != "verbose_json":
            return Reply(
                400,
                _error(
                    "timestamp_granularities requires response_format=verbose_json.", param="timestamp_granularities"
                ),
            )
        chunking = request.field("chunking_strategy")
        if chunking is not None and chunking != "auto" and not _is_vad_config(chunking):
            return Reply(400, _error("Invalid chunking_strategy.", param="chunking_strategy"))
        wav = request.wav
        if model == DIARIZE and chunking is None and wav is not None and wav.frames > 30 * wav.rate:
            return Reply(
                400,
                _error(
                    "chunking_strategy is required for audio longer than 30 seconds with this model.",
                    param="chunking_strategy",
                ),
            )
        return None

    def _transcript(self, request: Request) -> Reply:
        """The transcript of what the audio was registered as holding, in the requested format."""
        key = request.wav.frames_sha256 if request.wav is not None else request.sha256
        name, lines = self._heard.get(key or "", (None, []))
        request.heard = name
        wav = request.wav
        duration = wav.frames / wav.rate if wav is not None else max((line.end for line in lines), default=0.0)
        text = "".join(line.text for line in lines)
        if request.field("response_format") == "diarized_json":
            segments = [
                {
                    "type": "transcript.text.segment",
                    "id": f"seg_{i}",
                    "start": line.start,
                    "end": line.end,
                    "text": line.text.strip(),
                    "speaker": line.speaker,
                }
                for i, line in enumerate(lines)
            ]
            usage = {"type": "tokens", "input_tokens": 120, "output_tokens": 40, "total_tokens": 160}
            return Reply(
                200,
                {
                    "task": "transcribe",
                    "duration": duration,
                    "text": text.strip(),
                    "segments": segments,
                    "usage": usage,
                },
            )
        verbose_segments = [
            {
                "id": i,
                "seek": 0,
                "start": line.start,
                "end": line.end,
                "text": line.text,  # Whisper's segment texts start with a space
                "tokens": [50364, 2205, 50464],
                "temperature": 0.0,
                "avg_logprob": -0.21,
                "compression_ratio": 1.1,
                "no_speech_prob": 0.01,
            }
            for i, line in enumerate(lines)
        ]
        verbose = {
            "task": "transcribe",
            "language": "english",
            "duration": duration,
            "text": text.strip(),
            "segments": verbose_segments,
            "usage": {"type": "duration", "seconds": round(duration + 0.5)},
        }
        return Reply(200, verbose)

    # --- reading --------------------------------------------------------------------------------

    def read(self, path: str, headers: Mapping[str, str]) -> Reply:
        with self._lock:
            self.reads.append(urlsplit(path).path)
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return Reply(
                401,
                _error(
                    "Incorrect API key provided: nope. You can find your API key at https://platform.openai.com/account/api-keys.",
                    code="invalid_api_key",
                ),
            )
        if urlsplit(path).path == "/v1/models":
            listed = [{"id": model, "object": "model", "created": 1677610602, "owned_by": "openai"} for model in MODELS]
            return Reply(200, {"object": "list", "data": listed})
        return Reply(404, _error(f"Invalid URL (GET {path})"))


def frames_sha256(frames: bytes) -> str:
    return hashlib.sha256(frames).hexdigest()


def _read_wav(audio: bytes) -> Wav | None:
    try:
        with wave.open(io.BytesIO(audio), "rb") as reader:
            frames = reader.readframes(reader.getnframes())
            return Wav(
                reader.getnchannels(),
                reader.getframerate(),
                reader.getsampwidth(),
                reader.getnframes(),
                frames_sha256(frames),
            )
    except (wave.Error, EOFError):
        return None


def _is_vad_config(text: str) -> bool:
    try:
        config = json.loads(text)
    except ValueError:
        return False
    return isinstance(config, dict) and config.get("type") == "server_vad"


def _form(content_type: str, body: bytes) -> tuple[dict[str, list[str]], tuple[str | None, str, bytes] | None]:
    """A multipart body's text fields and its `file` (name, content type, bytes)."""
    fields: dict[str, list[str]] = {}
    upload = None
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        return fields, None
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    for part in message.iter_parts() if message.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            continue
        if name == "file":
            upload = (part.get_filename(), part.get_content_type(), payload)
        else:
            fields.setdefault(name, []).append(payload.decode("utf-8", "replace"))
    return fields, upload


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A running fake OpenAI; `fake_openai.url` is its API base URL, `api_key` the key it accepts."""
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()

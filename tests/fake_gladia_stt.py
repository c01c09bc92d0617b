"""A stand-in for Gladia's v2 pre-recorded API on 127.0.0.1, for the tests of transcription requests.

- `POST /v2/upload` (`x-gladia-key: <key>`), multipart/form-data with the file in `audio`: answers
  `{"audio_url", "audio_metadata"}`, a URL on this fake that only the fake reads back (Gladia's point
  at its own storage, readable with the key only).
- `POST /v2/pre-recorded` (JSON `audio_url`, `callback`, `callback_config` {`url`, `method`},
  `custom_metadata`, `diarization`, `language_config`, …): answers 201 `{"id", "result_url"}` at
  once, fetches `audio_url` itself (unless it is one of its uploads), then sends the callback to
  `callback_config.url`, query and all, with no header of its own: `{"id", "event":
  "transcription.success", "payload": <result>, "custom_metadata"}`, or `transcription.error` with
  `error` {`code`, `message`} when the audio could not be read or `fail_jobs()` says so.
- `GET /v2/pre-recorded/{id}`: the job (`queued`, `processing`, `done` with `result`, or `error` with
  `error_code`).
- `GET /v2/pre-recorded?offset=&limit=&after_date=&before_date=&status=&custom_metadata=`: the job
  list, newest first, for b24scribe's lookup after a lost answer and its key check.

Shapes follow Gladia's OpenAPI description (InitTranscriptionRequest, AudioUploadResponse,
InitPreRecordedTranscriptionResponse, PreRecordedResponse, ListPreRecordedResponse,
CallbackTranscriptionSuccessPayload/ErrorPayload, and the error bodies `{"timestamp", "path",
"request_id", "statusCode", "message"}`) and its pre-recorded guides (custom metadata: at most 2000
characters, filtered in the list by a JSON object in the query; multiple channels: each distinct
channel transcribed by itself, every utterance saying its `channel`).

The fake's own choices where Gladia documents nothing: it decodes no audio, so a job with
`diarization` gets tests/fixtures/gladia/diarized_mono_callback.json's result and one without it
stereo_callback.json's (two distinct channels); properties Gladia does not know are refused with a
400 listing them; a callback is sent again, `callback_retries` times 0.2 s apart, until a 2xx; the
messages of its 401, 429 and 5xx, and `Retry-After` only when asked for. Only accepted jobs are listed.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.fake_vendor_callbacks import AUDIO_OPENER, FakeVendorWithCallbacks, QuietHandler, Reply

FIXTURES = Path(__file__).parent / "fixtures" / "gladia"
MAX_METADATA = 2000
# the properties of InitTranscriptionRequest (Gladia's OpenAPI description); anything else is refused
KNOWN_PROPERTIES = frozenset(
    (
        "context_prompt",
        "custom_vocabulary",
        "custom_vocabulary_config",
        "detect_language",
        "enable_code_switching",
        "code_switching_config",
        "language",
        "callback_url",
        "callback",
        "callback_config",
        "subtitles",
        "subtitles_config",
        "diarization",
        "diarization_config",
        "translation",
        "translation_config",
        "summarization",
        "summarization_config",
        "moderation",
        "named_entity_recognition",
        "chapterization",
        "name_consistency",
        "custom_spelling",
        "custom_spelling_config",
        "structured_data_extraction",
        "structured_data_extraction_config",
        "sentiment_analysis",
        "audio_to_llm",
        "audio_to_llm_config",
        "custom_metadata",
        "sentences",
        "display_mode",
        "punctuation_enhanced",
        "language_config",
        "audio_url",
    )
)
BOOLEANS = ("callback", "diarization", "subtitles", "translation", "summarization", "sentences")
_MESSAGES = {
    400: "Bad Request",
    401: "gladia key not found",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class Upload:
    """One `POST /v2/upload` the fake took."""

    audio_url: str
    filename: str | None
    content_type: str | None
    size: int
    sha256: str


@dataclass
class Submission:
    """One `POST /v2/pre-recorded` as the fake saw it, whatever it answered."""

    body: dict[str, Any]  # the JSON as sent ({} when it was not JSON)
    key: str | None  # the x-gladia-key it came with
    job_id: str
    time: float
    audio_size: int | None = None  # once the audio was fetched (or found among the uploads)
    audio_sha256: str | None = None
    from_upload: bool = False  # `audio_url` is one of the fake's uploads
    fetch_error: str | None = None
    answered: int | None = None  # the status sent; None when the answer was dropped
    accepted: bool = False  # it will call back (also true for a dropped answer)
    status: str = "queued"  # queued, processing, done, error
    completed: float | None = None
    error_code: int | None = None  # once it ended in error
    error: str | None = None  # why (the audio could not be read, or fail_jobs())

    @property
    def callback_config(self) -> dict[str, Any]:
        config = self.body.get("callback_config")
        return config if isinstance(config, dict) else {}

    @property
    def custom_metadata(self) -> dict[str, Any] | None:
        metadata = self.body.get("custom_metadata")
        return metadata if isinstance(metadata, dict) else None


@dataclass
class CallbackAttempt:
    """One callback delivery attempt."""

    job_id: str
    url: str
    method: str
    headers: dict[str, str]
    body: bytes
    status: int | None  # None when the connection failed
    time: float

    def json(self) -> Any:
        return json.loads(self.body)


def _time(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _moment(text: str) -> float | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@dataclass
class FakeGladia(FakeVendorWithCallbacks[Submission, CallbackAttempt]):
    """Gladia's upload, pre-recorded job and list endpoints with callbacks; records what it was sent and did."""

    api_key: str = "gladia-test-key"
    uploads: list[Upload] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)  # the path of every GET, in order
    list_queries: list[dict[str, list[str]]] = field(default_factory=list)  # the query of every list read

    def __post_init__(self) -> None:
        super().__post_init__()
        self._uploaded: dict[str, bytes] = {}

    def start(self) -> FakeGladia:
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                path = urlsplit(self.path).path
                if path == "/v2/upload":
                    reply: Reply | None = fake.upload(path, headers, body)
                elif path == "/v2/pre-recorded":
                    reply = fake.create(path, headers, body)
                else:
                    reply = Reply(404, fake.error(404, path))
                if reply is not None:
                    self.send_reply(reply)  # else: drop the connection; the client sees no answer

            def do_GET(self) -> None:  # noqa: N802
                self.send_reply(fake.read(self.path, self.headers.get("x-gladia-key")))

        return self._serve(Handler)

    def error(self, status: int, path: str, message: str | None = None, **more: Any) -> dict[str, Any]:
        """Gladia's error body."""
        return {
            "timestamp": _time(time.time()),
            "path": path,
            "request_id": f"G-{uuid.uuid4().hex[:8]}",
            "statusCode": status,
            "message": message or _MESSAGES.get(status, f"HTTP {status}"),
            **more,
        }

    def _invalid(self, path: str, *problems: str) -> Reply:
        return Reply(400, self.error(400, path, "Invalid parameters", validation_errors=list(problems)))

    # --- uploads and submissions ------------------------------------------------------------------

    def upload(self, path: str, headers: Mapping[str, str], body: bytes) -> Reply:
        if headers.get("x-gladia-key") != self.api_key:
            return Reply(401, self.error(401, path))
        content_type = headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "multipart/form-data" or "boundary=" not in content_type:
            return Reply(400, self.error(400, path, "Content-Type is missing Multipart Boundary."))
        audio, filename, media_type = _multipart_audio(content_type, body)
        if not audio:
            return self._invalid(path, 'Field "audio" is required')
        file_id = str(uuid.uuid4())
        audio_url = f"{self.url}/file/{file_id}"
        with self._lock:
            self._uploaded[audio_url] = audio
            self.uploads.append(Upload(audio_url, filename, media_type, len(audio), hashlib.sha256(audio).hexdigest()))
        name = filename or "audio"
        metadata = {
            "id": file_id,
            "filename": name,
            "extension": name.rpartition(".")[2] if "." in name else "",
            "size": len(audio),
            "audio_duration": 6.4,
            "number_of_channels": 2,
        }
        return Reply(200, {"audio_url": audio_url, "audio_metadata": metadata})

    def create(self, path: str, headers: Mapping[str, str], body: bytes) -> Reply | None:
        """Record a submission and answer it (None: close the connection without an answer)."""
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        submission = Submission(
            body=parsed if isinstance(parsed, dict) else {},
            key=headers.get("x-gladia-key"),
            job_id=str(uuid.uuid4()),
            time=time.time(),
        )
        with self._lock:
            self.submissions.append(submission)
        reply = self._refusal(path, submission, parsed)
        if reply is not None:
            submission.answered = reply.status
            return reply
        dropped = self._accept(submission)
        if dropped:
            return None
        submission.answered = 201
        return Reply(201, {"id": submission.job_id, "result_url": f"{self.url}/v2/pre-recorded/{submission.job_id}"})

    def _refusal(self, path: str, submission: Submission, parsed: Any) -> Reply | None:
        """Why this submission is not taken, as Gladia would answer it; None to take it."""
        if submission.key != self.api_key:
            return Reply(401, self.error(401, path))
        failure = self._queued_failure(lambda status: self.error(status, path))
        if failure is not None:
            return failure
        if not isinstance(parsed, dict):
            return Reply(400, self.error(400, path, "The body is not a JSON object"))
        problems = [f"property {name} should not exist" for name in sorted(set(parsed) - KNOWN_PROPERTIES)]
        if not isinstance(parsed.get("audio_url"), str) or not parsed["audio_url"]:
            problems.append('Field "audio_url" must be a URL')
        problems += [
            f'Field "{name}" must be a boolean'
            for name in BOOLEANS
            if name in parsed and not isinstance(parsed[name], bool)
        ]
        metadata = parsed.get("custom_metadata")
        if metadata is not None and not isinstance(metadata, dict):
            problems.append('Field "custom_metadata" must be an object')
        elif metadata is not None and len(json.dumps(metadata)) > MAX_METADATA:
            problems.append(f"custom_metadata cannot be longer than {MAX_METADATA} characters when stringified")
        language = parsed.get("language_config")
        if language is not None:
            languages = language.get("languages") if isinstance(language, dict) else None
            if not isinstance(languages, list) or not all(isinstance(code, str) and code for code in languages):
                problems.append('Field "language_config.languages" must be a list of language codes')
        config = parsed.get("callback_config")
        if config is not None:
            if not isinstance(config, dict) or not isinstance(config.get("url"), str) or not config["url"]:
                problems.append('Field "callback_config.url" must be a URL')
            elif config.get("method", "POST") not in ("POST", "PUT"):
                problems.append('Field "callback_config.method" must be one of: POST, PUT')
        if problems:
            return self._invalid(path, *problems)
        if parsed.get("callback") is not True or not submission.callback_config:
            return self._invalid(path, "This fake only transcribes with callback and callback_config")
        return None

    def _process(self, submission: Submission) -> None:
        """Read the audio, wait, then call back, sending again while the answer is not a 2xx."""
        self._read_audio(submission)
        submission.status = "processing"
        if self._stopping.wait(self.callback_delay) or not self._processing_ends():
            return
        if submission.fetch_error:
            submission.error_code, submission.error = 400, submission.fetch_error
        elif self.job_failure:
            submission.error_code, submission.error = 500, self.job_failure
        submission.status = "error" if submission.error else "done"
        submission.completed = time.time()
        config = submission.callback_config
        url, method = config["url"], config.get("method", "POST")
        callback: dict[str, Any] = {"id": submission.job_id}
        if submission.status == "done":
            callback |= {"event": "transcription.success", "payload": self.result(submission)}
        else:
            callback |= {
                "event": "transcription.error",
                "error": {"code": submission.error_code, "message": submission.error},
            }
        callback["custom_metadata"] = submission.custom_metadata
        data = json.dumps(callback).encode()
        headers = {"Content-Type": "application/json"}

        def attempt(status: int | None, moment: float) -> CallbackAttempt:
            return CallbackAttempt(submission.job_id, url, method, dict(headers), data, status, moment)

        self._deliver(url, data, headers, attempt, method=method)

    def _read_audio(self, submission: Submission) -> None:
        audio_url = submission.body["audio_url"]
        with self._lock:
            audio = self._uploaded.get(audio_url)
        submission.from_upload = audio is not None
        if audio is None:
            try:
                with AUDIO_OPENER.open(audio_url, timeout=5) as response:
                    audio = response.read()
            except (OSError, ValueError) as error:
                reason = f"HTTP {error.code}" if isinstance(error, urllib.error.HTTPError) else type(error).__name__
                submission.fetch_error = f"Could not download the audio file at {audio_url} ({reason})"
                return
        submission.audio_size, submission.audio_sha256 = len(audio), hashlib.sha256(audio).hexdigest()

    def result(self, submission: Submission) -> dict[str, Any]:
        """A done job's result: a fixture's callback payload (see the module's docstring)."""
        name = "diarized_mono_callback.json" if submission.body.get("diarization") is True else "stereo_callback.json"
        payload: dict[str, Any] = json.loads((FIXTURES / name).read_text())["payload"]
        return payload

    # --- reading jobs -----------------------------------------------------------------------------

    def read(self, path: str, key: str | None) -> Reply:
        """`GET /v2/pre-recorded/{id}` and `GET /v2/pre-recorded` (the list)."""
        parts = urlsplit(path)
        if key != self.api_key:
            return Reply(401, self.error(401, parts.path))
        with self._lock:
            self.reads.append(parts.path)
        if parts.path == "/v2/pre-recorded":
            query = parse_qs(parts.query)
            with self._lock:
                self.list_queries.append(query)
            return self._list(parts.path, query)
        job_id = parts.path.removeprefix("/v2/pre-recorded/")
        if job_id != parts.path and "/" not in job_id:
            with self._lock:
                found = [s for s in self.submissions if s.accepted and s.job_id == job_id]
            if found:
                return Reply(200, self.job(found[0]))
            return Reply(404, self.error(404, parts.path, "Job not found"))
        return Reply(404, self.error(404, parts.path))

    def job(self, submission: Submission) -> dict[str, Any]:
        """The job as `GET /v2/pre-recorded/{id}` shows it now."""
        done, failed = submission.status == "done", submission.status == "error"
        params = {k: v for k, v in submission.body.items() if k != "custom_metadata"}
        return {
            "id": submission.job_id,
            "request_id": f"G-{submission.job_id[:8]}",
            "version": 2,
            "status": submission.status,
            "created_at": _time(submission.time),
            "completed_at": _time(submission.completed) if submission.completed else None,
            "custom_metadata": submission.custom_metadata,
            "error_code": submission.error_code if failed else None,
            "post_session_metadata": {},
            "kind": "pre-recorded",
            "file": None if failed else {"id": submission.job_id, "filename": None, "source": None},
            "request_params": None if failed else params,
            "result": self.result(submission) if done else None,
        }

    def _list(self, path: str, query: dict[str, list[str]]) -> Reply:
        first = {name: values[0] for name, values in query.items()}
        try:
            offset, limit = int(first.get("offset", "0")), int(first.get("limit", "20"))
        except ValueError:
            return self._invalid(path, "offset and limit must be integers")
        if offset < 0 or limit < 1:
            return self._invalid(path, "offset must be at least 0 and limit at least 1")
        after, before = _moment(first.get("after_date", "")), _moment(first.get("before_date", ""))
        if ("after_date" in first and after is None) or ("before_date" in first and before is None):
            return self._invalid(path, "after_date and before_date must be ISO dates")
        wanted: Any = {}
        if "custom_metadata" in first:
            try:
                wanted = json.loads(first["custom_metadata"])
            except ValueError:
                wanted = None
            if not isinstance(wanted, dict):
                return self._invalid(path, "custom_metadata must be a JSON object")
        statuses = query.get("status") or []
        with self._lock:
            newest_first = [s for s in reversed(self.submissions) if s.accepted]
        matching = [
            s
            for s in newest_first
            if (after is None or s.time > after)
            and (before is None or s.time < before)
            and (not statuses or s.status in statuses)
            and all((s.custom_metadata or {}).get(k) == v for k, v in wanted.items())
        ]
        page = matching[offset : offset + limit]

        def at(start: int) -> str:
            return f"{self.url}{path}?offset={start}&limit={limit}"

        more = offset + limit < len(matching)
        return Reply(
            200,
            {
                "first": at(0),
                "current": at(offset),
                "next": at(offset + limit) if more else None,
                "items": [self.job(s) for s in page],
            },
        )


def _multipart_audio(content_type: str, body: bytes) -> tuple[bytes | None, str | None, str | None]:
    """The `audio` part of a multipart body: its bytes, filename and content type."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if message.is_multipart():
        for part in message.iter_parts():
            payload = part.get_payload(decode=True)
            if part.get_param("name", header="content-disposition") == "audio" and isinstance(payload, bytes):
                return payload, part.get_filename(), part.get_content_type()
    return None, None, None


@pytest.fixture
def fake_gladia() -> Iterator[FakeGladia]:
    """A running fake Gladia; `fake_gladia.url` is its API base URL, `api_key` the key it accepts."""
    fake = FakeGladia().start()
    yield fake
    fake.stop()

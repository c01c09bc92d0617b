"""A stand-in for AssemblyAI's pre-recorded API on 127.0.0.1, for the tests of transcription requests.

- `POST /v2/upload` (`authorization: <key>`), the raw bytes: answers `{"upload_url"}`, a URL on this
  fake that only the fake reads back (AssemblyAI's point at its CDN, readable by AssemblyAI alone).
- `POST /v2/transcript` (JSON `audio_url`, `speech_models`, `webhook_url`, `webhook_auth_header_name`
  and `_value`, `multichannel`, `speaker_labels`, …): answers the queued transcript at once, fetches
  `audio_url` itself (unless it is one of its uploads), then POSTs `{"transcript_id", "status"}` to
  `webhook_url`, query and all, with the auth header, as AssemblyAI does.
- `GET /v2/transcript/{id}`: the transcript. A completed one is what tests/test_vendors_end_to_end.py
  serves, tests/fixtures/assemblyai/transcript_multichannel.json (multichannel) or
  transcript_diarized.json (speaker labels), carrying this transcript's id, audio and webhook.
- `GET /v2/transcript?limit=&before_id=`: the list, newest first, for b24scribe's lookup after a
  lost answer (its items carry no webhook_url: the lookup reads each transcript).

Shapes follow AssemblyAI's OpenAPI description (assemblyai-api-spec `openapi.yml`: TranscriptParams,
Transcript, TranscriptList, Error) and its pre-recorded webhooks page: a 2xx ends the delivery, a 4xx
ends it as failed, anything else is retried (AssemblyAI: 10 attempts, 10 s apart; the fake:
`callback_retries`, 0.2 s apart). The fake's own choices where AssemblyAI documents nothing: the
messages of its 400s, a `created` time in UTC without a zone (as the spec's examples show it), and
`Retry-After` only when asked for. Only accepted submissions are listed.
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
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from tests.fake_vendor_callbacks import AUDIO_OPENER, FakeVendorWithCallbacks, QuietHandler, Reply

FIXTURES = Path(__file__).parent / "fixtures" / "assemblyai"
_ERRORS = {  # AssemblyAI's Error bodies ({"error": …}) for the statuses a test is likely to ask for
    400: "Bad request",
    401: "Authentication error, API token missing/invalid",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class Upload:
    """One `POST /v2/upload` the fake took."""

    upload_url: str
    size: int
    sha256: str


@dataclass
class Submission:
    """One `POST /v2/transcript` as the fake saw it, whatever it answered."""

    body: dict[str, Any]  # the JSON as sent ({} when it was not JSON)
    authorization: str | None
    transcript_id: str
    time: float
    audio_size: int | None = None  # once the audio was fetched (or found among the uploads)
    audio_sha256: str | None = None
    from_upload: bool = False  # `audio_url` is one of the fake's uploads
    fetch_error: str | None = None
    answered: int | None = None  # the status sent; None when the answer was dropped
    accepted: bool = False  # it will call back (also true for a dropped answer)
    status: str = "queued"  # queued, processing, completed, error
    completed: float | None = None
    error: str | None = None  # why it ended in error (the audio could not be read, or fail_jobs())

    @property
    def webhook_url(self) -> str | None:
        url = self.body.get("webhook_url")
        return url if isinstance(url, str) else None


@dataclass
class CallbackAttempt:
    """One webhook delivery attempt."""

    transcript_id: str
    url: str
    headers: dict[str, str]
    body: bytes
    status: int | None  # None when the connection failed
    time: float

    def json(self) -> Any:
        return json.loads(self.body)


def _error(status: int, message: str | None = None) -> dict[str, Any]:
    return {"error": message or _ERRORS.get(status, f"HTTP {status}"), "status": "error"}


def _created(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


@dataclass
class FakeAssemblyAI(FakeVendorWithCallbacks[Submission, CallbackAttempt]):
    """AssemblyAI's upload, transcript and list endpoints with webhooks; records what it was sent and did."""

    api_key: str = "aai-test-key"
    uploads: list[Upload] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)  # the path of every GET, in order

    def __post_init__(self) -> None:
        super().__post_init__()
        self._uploaded: dict[str, bytes] = {}

    def start(self) -> FakeAssemblyAI:
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                path = urlsplit(self.path).path
                if path == "/v2/upload":
                    reply: Reply | None = fake.upload(headers, body)
                elif path == "/v2/transcript":
                    reply = fake.create(headers, body)
                else:
                    reply = Reply(404, _error(404, "Not found"))
                if reply is not None:
                    self.send_reply(reply)  # else: drop the connection; the client sees no answer

            def do_GET(self) -> None:  # noqa: N802
                self.send_reply(fake.read(self.path, self.headers.get("authorization")))

        return self._serve(Handler)

    # --- uploads and submissions ------------------------------------------------------------------

    def upload(self, headers: Mapping[str, str], body: bytes) -> Reply:
        if headers.get("authorization") != self.api_key:
            return Reply(401, _error(401))
        if not body:
            return Reply(400, _error(400, "Upload failed: the request has no file content"))
        upload_url = f"{self.url}/upload/{uuid.uuid4()}"
        with self._lock:
            self._uploaded[upload_url] = body
            self.uploads.append(Upload(upload_url, len(body), hashlib.sha256(body).hexdigest()))
        return Reply(200, {"upload_url": upload_url})

    def create(self, headers: Mapping[str, str], body: bytes) -> Reply | None:
        """Record a submission and answer it (None: close the connection without an answer)."""
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        submission = Submission(
            body=parsed if isinstance(parsed, dict) else {},
            authorization=headers.get("authorization"),
            transcript_id=str(uuid.uuid4()),
            time=time.time(),
        )
        with self._lock:
            self.submissions.append(submission)
        reply = self._refusal(submission, parsed)
        if reply is not None:
            submission.answered = reply.status
            return reply
        dropped = self._accept(submission)
        return None if dropped else Reply(200, self.transcript(submission))

    def _refusal(self, submission: Submission, parsed: Any) -> Reply | None:
        """Why this submission is not taken, as AssemblyAI would answer it; None to take it."""
        if submission.authorization != self.api_key:
            return Reply(401, _error(401))
        failure = self._queued_failure(_error)
        if failure is not None:
            return failure
        if not isinstance(parsed, dict):
            return Reply(400, _error(400, "Invalid JSON body"))
        if not isinstance(parsed.get("audio_url"), str) or not parsed["audio_url"]:
            return Reply(400, _error(400, "audio_url is required"))
        models = parsed.get("speech_models")
        if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
            return Reply(400, _error(400, "speech_models must be a non-empty list of model names"))
        for name in ("multichannel", "speaker_labels", "language_detection"):
            if name in parsed and not isinstance(parsed[name], bool):
                return Reply(400, _error(400, f"{name} must be a Boolean"))
        if ("webhook_auth_header_name" in parsed) != ("webhook_auth_header_value" in parsed):
            return Reply(400, _error(400, "webhook_auth_header_name and webhook_auth_header_value go together"))
        if not isinstance(parsed.get("webhook_url"), str):
            return Reply(400, _error(400, "This fake only transcribes with a webhook_url."))
        return None

    def _process(self, submission: Submission) -> None:
        """Read the audio, wait, then deliver the webhook, retrying while the answer is neither 2xx nor 4xx."""
        self._read_audio(submission)
        submission.status = "processing"
        if self._stopping.wait(self.callback_delay) or not self._processing_ends():
            return
        submission.error = submission.fetch_error or self.job_failure
        submission.status = "error" if submission.error else "completed"
        submission.completed = time.time()
        url = submission.webhook_url or ""
        data = json.dumps({"transcript_id": submission.transcript_id, "status": submission.status}).encode()
        headers = {"Content-Type": "application/json"}
        name, value = submission.body.get("webhook_auth_header_name"), submission.body.get("webhook_auth_header_value")
        if isinstance(name, str) and isinstance(value, str):
            headers[name] = value

        def attempt(status: int | None, moment: float) -> CallbackAttempt:
            return CallbackAttempt(submission.transcript_id, url, dict(headers), data, status, moment)

        self._deliver(url, data, headers, attempt)

    def _ends_delivery(self, status: int) -> bool:
        """A 2xx delivers the webhook and a 4xx fails it for good: AssemblyAI retries neither."""
        return 200 <= status < 500

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
                submission.fetch_error = (
                    f"Download error, unable to download {audio_url} ({reason}). "
                    "Please make sure the file exists and is accessible from the internet."
                )
                return
        submission.audio_size, submission.audio_sha256 = len(audio), hashlib.sha256(audio).hexdigest()

    # --- reading transcripts ----------------------------------------------------------------------

    def read(self, path: str, authorization: str | None) -> Reply:
        """`GET /v2/transcript/{id}` and `GET /v2/transcript` (the list)."""
        if authorization != self.api_key:
            return Reply(401, _error(401))
        parts = urlsplit(path)
        with self._lock:
            self.reads.append(parts.path)
        if parts.path == "/v2/transcript":
            return self._list(dict(parse_qsl(parts.query)))
        transcript_id = parts.path.removeprefix("/v2/transcript/")
        if transcript_id != parts.path and "/" not in transcript_id:
            with self._lock:
                found = [s for s in self.submissions if s.accepted and s.transcript_id == transcript_id]
            if found:
                return Reply(200, self.transcript(found[0]))
            return Reply(404, _error(404, "Transcript not found"))
        return Reply(404, _error(404, "Not found"))

    def transcript(self, submission: Submission) -> dict[str, Any]:
        """The transcript as `GET /v2/transcript/{id}` shows it now."""
        body = submission.body
        multichannel = body.get("multichannel") is True
        shown: dict[str, Any] = {"text": None, "words": None, "utterances": None, "audio_duration": None}
        if submission.status == "completed":
            name = "transcript_multichannel.json" if multichannel else "transcript_diarized.json"
            shown = json.loads((FIXTURES / name).read_text())
        name, value = body.get("webhook_auth_header_name"), body.get("webhook_auth_header_value")
        shown |= {
            "id": submission.transcript_id,
            "status": submission.status,
            "audio_url": body.get("audio_url"),
            "speech_models": body.get("speech_models"),
            "language_detection": body.get("language_detection", False),
            "multichannel": multichannel or None,
            "audio_channels": 2 if multichannel and submission.status == "completed" else None,
            "speaker_labels": body.get("speaker_labels", False),
            "webhook_url": body.get("webhook_url"),
            "webhook_auth": isinstance(name, str) and isinstance(value, str),
            "webhook_auth_header_name": name,
            "webhook_status_code": None,
            "error": submission.error if submission.status == "error" else None,
        }
        if submission.status == "error":
            shown |= {"text": None, "words": None, "utterances": None}
        with self._lock:
            delivered = [a.status for a in self.callbacks if a.transcript_id == submission.transcript_id]
        if delivered:
            shown["webhook_status_code"] = delivered[-1]
        return shown

    def _list(self, query: dict[str, str]) -> Reply:
        try:
            limit = int(query.get("limit", "10"))
        except ValueError:
            return Reply(400, _error(400, "limit must be an integer"))
        if not 1 <= limit <= 200:
            return Reply(400, _error(400, "limit must be between 1 and 200"))
        with self._lock:
            newest_first = [s for s in reversed(self.submissions) if s.accepted]
        before = query.get("before_id")
        if before is not None:
            ids = [s.transcript_id for s in newest_first]
            if before not in ids:
                return Reply(400, _error(400, "before_id is not a transcript of this account"))
            newest_first = newest_first[ids.index(before) + 1 :]
        page = newest_first[:limit]
        base = f"{self.url}/v2/transcript?limit={limit}"
        items = [
            {
                "id": s.transcript_id,
                "resource_url": f"{self.url}/v2/transcript/{s.transcript_id}",
                "status": s.status,
                "created": _created(s.time),
                "completed": _created(s.completed) if s.completed else None,
                "audio_url": s.body.get("audio_url"),
                "error": s.error if s.status == "error" else None,
            }
            for s in page
        ]
        details = {
            "limit": limit,
            "result_count": len(items),
            "current_url": base + (f"&before_id={before}" if before else ""),
            "prev_url": f"{base}&before_id={page[-1].transcript_id}" if page else None,
            "next_url": f"{base}&after_id={page[0].transcript_id}" if page else None,
        }
        return Reply(200, {"page_details": details, "transcripts": items})


@pytest.fixture
def fake_assemblyai() -> Iterator[FakeAssemblyAI]:
    """A running fake AssemblyAI; `fake_assemblyai.url` is its base URL, `api_key` the key it accepts."""
    fake = FakeAssemblyAI().start()
    yield fake
    fake.stop()

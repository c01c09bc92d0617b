"""A stand-in for ElevenLabs' Speech-to-Text (Scribe) API on 127.0.0.1, for the tests of transcription
requests.

- `POST /v1/speech-to-text` (`xi-api-key: <key>`), a multipart form: `model_id` (scribe_v1 or
  scribe_v2), exactly one of `file` (the bytes), `source_url` or the deprecated `cloud_storage_url`
  (https only), which the fake GETs itself; `diarize`, `use_multi_channel`, `detect_speaker_roles`
  (not with use_multi_channel), `timestamps_granularity` (none, word, character), `language_code`,
  `webhook`, `webhook_id` (only with webhook=true, and one of the workspace's) and `webhook_metadata`
  (JSON text of an object, at most 16 KB and two levels deep). This fake only transcribes
  asynchronously (`webhook=true`): it answers `{"message", "request_id", "transcription_id"}` at once,
  then POSTs the workspace webhook's event to `webhook_url` (the URL configured once in the
  workspace, not per request), signed `ElevenLabs-Signature: t=<unix seconds>,v0=<hex HMAC-SHA256 of
  "<t>.<raw body>">` with `webhook_secret`: `{"type": "speech_to_text_transcription",
  "event_timestamp", "data": {"request_id", "webhook_metadata", "transcription"}}`. The transcription
  is what tests/test_e2e_elevenlabs.py's fixtures carry: tests/fixtures/elevenlabs/
  multichannel_webhook.json's (`transcripts[]`, one per channel) for use_multi_channel, else
  diarized_webhook.json's (words with speaker_0/speaker_1), with this job's `transcription_id`.
- `GET /v1/speech-to-text/transcripts/{transcription_id}`: the finished transcription (404 while it
  is processing, when it failed, or for an unknown id). ElevenLabs lists no transcription jobs.

Shapes follow ElevenLabs' Python SDK (`speech_to_text.convert`, `speech_to_text.transcripts.get`,
`webhooks.construct_event`) and its webhooks guide: a 2xx ends a delivery, a 4xx ends it as failed,
a 5xx is retried (the fake: `callback_retries` times, 0.2 s apart). The fake's own choices where
ElevenLabs documents nothing: a failed job's webhook (`"transcription": null` and
`"error": {"message"}`), the messages of its errors (`{"detail": {"status", "message"}}`, validation
errors as `{"detail": [{"loc", "msg", "type"}]}`), and `Retry-After` only when asked for.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest

from tests.fake_vendor_callbacks import AUDIO_OPENER, FakeVendorWithCallbacks, QuietHandler, Reply

FIXTURES = Path(__file__).parent / "fixtures" / "elevenlabs"
MODELS = ("scribe_v1", "scribe_v2")
GRANULARITIES = ("none", "word", "character")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
MAX_METADATA_BYTES = 16 * 1024
TRANSCRIPTS = "/v1/speech-to-text/transcripts/"
_STATUSES = {
    400: ("invalid_request", "The request is invalid."),
    401: ("invalid_api_key", "Invalid API key"),
    404: ("transcript_not_found", "Transcript not found."),
    429: ("too_many_concurrent_requests", "Too many concurrent requests for your subscription."),
    500: ("internal_server_error", "An internal error occurred."),
    503: ("system_busy", "The system is experiencing heavy traffic, please try again later."),
}


def _error(status: int) -> dict[str, Any]:
    """ElevenLabs' error body: `{"detail": {"status", "message"}}`."""
    code, message = _STATUSES.get(status, (f"http_{status}", f"HTTP {status}"))
    return {"detail": {"status": code, "message": message}}


def _invalid(field_name: str, message: str) -> Reply:
    """A validation error, as ElevenLabs' API (FastAPI) answers one."""
    return Reply(422, {"detail": [{"loc": ["body", field_name], "msg": message, "type": "value_error"}]})


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `ElevenLabs-Signature` header ElevenLabs sends with a webhook."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v0={digest}"


@dataclass
class Submission:
    """One `POST /v1/speech-to-text` as the fake saw it, whatever it answered."""

    fields: dict[str, str]  # the form's text fields
    api_key: str | None
    request_id: str
    transcription_id: str
    time: float
    file_name: str | None = None
    file_content_type: str | None = None
    audio_size: int | None = None  # for a URL: once the fake has fetched it
    audio_sha256: str | None = None
    fetch_error: str | None = None
    answered: int | None = None  # the status sent; None when the answer was dropped
    accepted: bool = False  # it will call back (also true for a dropped answer)
    status: str = "processing"  # processing, completed, failed
    transcription: dict[str, Any] | None = None  # once completed

    @property
    def url(self) -> str | None:
        return self.fields.get("source_url") or self.fields.get("cloud_storage_url")

    @property
    def metadata(self) -> Any:
        text = self.fields.get("webhook_metadata")
        return json.loads(text) if text is not None else None

    def flag(self, name: str) -> bool:
        return self.fields.get(name, "false").lower() in TRUE


@dataclass
class CallbackAttempt:
    """One webhook delivery attempt."""

    request_id: str
    url: str
    headers: dict[str, str]
    body: bytes
    status: int | None  # None when the connection failed
    time: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeElevenLabs(FakeVendorWithCallbacks[Submission, CallbackAttempt]):
    """ElevenLabs' speech-to-text and transcript endpoints, with the workspace's speech-to-text webhook;
    records what it was sent and did."""

    api_key: str = "xi-test-key"
    # the workspace's speech-to-text webhook, configured once (None: no webhook, nothing is posted)
    webhook_url: str | None = None
    webhook_secret: str = "wsec_test_elevenlabs_webhook_secret"
    webhook_id: str = "wh_b24scribe"
    reads: list[str] = field(default_factory=list)  # the path of every GET, in order

    def start(self) -> FakeElevenLabs:
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if urlsplit(self.path).path != "/v1/speech-to-text":
                    return self.send_reply(Reply(404, {"detail": "Not Found"}))
                reply = fake.submit({k.lower(): v for k, v in self.headers.items()}, body)
                if reply is not None:
                    self.send_reply(reply)  # else: drop the connection; the client sees no answer

            def do_GET(self) -> None:  # noqa: N802
                self.send_reply(fake.read(self.path, self.headers.get("xi-api-key")))

        return self._serve(Handler)

    # --- submissions ------------------------------------------------------------------------------

    def submit(self, headers: Mapping[str, str], body: bytes) -> Reply | None:
        """Record a submission and answer it (None: close the connection without an answer)."""
        fields, file = _multipart(headers.get("content-type", ""), body)
        submission = Submission(
            fields=fields,
            api_key=headers.get("xi-api-key"),
            request_id=uuid.uuid4().hex[:20],
            transcription_id=uuid.uuid4().hex[:20],
            time=time.time(),
        )
        if file is not None:
            audio, submission.file_name, submission.file_content_type = file
            submission.audio_size, submission.audio_sha256 = len(audio), hashlib.sha256(audio).hexdigest()
        with self._lock:
            self.submissions.append(submission)
        reply = self._refusal(submission, headers, file is not None)
        if reply is not None:
            submission.answered = reply.status
            return reply
        dropped = self._accept(submission)
        answer = {
            "message": "Request processed successfully",
            "request_id": submission.request_id,
            "transcription_id": submission.transcription_id,
        }
        return None if dropped else Reply(200, answer)

    def _refusal(self, submission: Submission, headers: Mapping[str, str], has_file: bool) -> Reply | None:
        """Why this submission is not taken, as ElevenLabs would answer it; None to take it."""
        if submission.api_key != self.api_key:
            return Reply(401, _error(401))
        failure = self._queued_failure(_error)
        if failure is not None:
            return failure
        fields = submission.fields
        if not headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return _invalid("model_id", "field required (the request must be a multipart form)")
        if fields.get("model_id") not in MODELS:
            return _invalid("model_id", f"must be one of {', '.join(MODELS)}")
        sources = [has_file, "source_url" in fields, "cloud_storage_url" in fields]
        if sum(sources) != 1:
            return _invalid("file", "exactly one of file, source_url or cloud_storage_url must be provided")
        if "cloud_storage_url" in fields and not fields["cloud_storage_url"].startswith("https://"):
            return _invalid("cloud_storage_url", "must be an https URL")
        for name in ("diarize", "use_multi_channel", "detect_speaker_roles", "webhook", "tag_audio_events"):
            if name in fields and fields[name].lower() not in TRUE + FALSE:
                return _invalid(name, "value could not be parsed to a boolean")
        if submission.flag("detect_speaker_roles") and submission.flag("use_multi_channel"):
            return _invalid("detect_speaker_roles", "cannot be used with use_multi_channel")
        if fields.get("timestamps_granularity", "word") not in GRANULARITIES:
            return _invalid("timestamps_granularity", f"must be one of {', '.join(GRANULARITIES)}")
        if not submission.flag("webhook"):
            return _invalid("webhook", "this fake only transcribes asynchronously: send webhook=true")
        if "webhook_id" in fields and fields["webhook_id"] != self.webhook_id:
            return Reply(400, {"detail": {"status": "webhook_not_found", "message": "Webhook not found."}})
        if "webhook_metadata" in fields:
            problem = _metadata_problem(fields["webhook_metadata"])
            if problem:
                return _invalid("webhook_metadata", problem)
        return None

    def _process(self, submission: Submission) -> None:
        """Fetch a URL's audio, wait, finish the job, then post the workspace webhook's event."""
        if submission.url is not None:
            self._fetch(submission)
        if self._stopping.wait(self.callback_delay) or not self._processing_ends():
            return
        data: dict[str, Any] = {"request_id": submission.request_id, "webhook_metadata": submission.metadata}
        if submission.fetch_error or self.job_failure:
            submission.status = "failed"
            data |= {"transcription": None, "error": {"message": submission.fetch_error or self.job_failure}}
        else:
            submission.transcription = self.transcription(submission)
            submission.status = "completed"
            data["transcription"] = submission.transcription
        url = self.webhook_url
        if url is None:
            return  # no webhook in the workspace: the transcript can only be read back
        event = {"type": "speech_to_text_transcription", "event_timestamp": int(time.time()), "data": data}
        body = json.dumps(event).encode()
        headers = {
            "Content-Type": "application/json",
            "ElevenLabs-Signature": sign(self.webhook_secret, int(time.time()), body),
        }

        def attempt(status: int | None, moment: float) -> CallbackAttempt:
            return CallbackAttempt(submission.request_id, url, dict(headers), body, status, moment)

        self._deliver(url, body, headers, attempt)

    def _ends_delivery(self, status: int) -> bool:
        """A 2xx delivers the event, a 4xx fails it for good; only a 5xx is retried."""
        return status < 500

    def _fetch(self, submission: Submission) -> None:
        try:
            with AUDIO_OPENER.open(submission.url or "", timeout=5) as response:
                audio = response.read()
        except (OSError, ValueError) as error:
            reason = f"HTTP {error.code}" if isinstance(error, urllib.error.HTTPError) else type(error).__name__
            submission.fetch_error = f"The file at the given URL could not be downloaded ({reason})."
            return
        submission.audio_size, submission.audio_sha256 = len(audio), hashlib.sha256(audio).hexdigest()

    def transcription(self, submission: Submission) -> dict[str, Any]:
        """The finished transcription: one transcript per channel for use_multi_channel, else diarized words."""
        name = "multichannel_webhook.json" if submission.flag("use_multi_channel") else "diarized_webhook.json"
        transcription: dict[str, Any] = json.loads((FIXTURES / name).read_text())["data"]["transcription"]
        return transcription | {"transcription_id": submission.transcription_id}

    # --- reading ----------------------------------------------------------------------------------

    def read(self, path: str, api_key: str | None) -> Reply:
        """A finished transcript by its transcription id."""
        if api_key != self.api_key:
            return Reply(401, _error(401))
        route = urlsplit(path).path
        with self._lock:
            self.reads.append(route)
        if not route.startswith(TRANSCRIPTS):
            return Reply(404, {"detail": "Not Found"})
        wanted = unquote(route.removeprefix(TRANSCRIPTS))
        with self._lock:
            found = [s for s in self.submissions if s.accepted and s.transcription_id == wanted]
        if not found or found[0].transcription is None:
            return Reply(404, _error(404))
        return Reply(200, found[0].transcription)

    def transcript_path(self, submission: Submission) -> str:
        return TRANSCRIPTS + quote(submission.transcription_id, safe="")


def _metadata_problem(text: str) -> str | None:
    """What is wrong with `webhook_metadata` (JSON text of an object, ≤16 KB, two levels deep)."""
    if len(text.encode()) > MAX_METADATA_BYTES:
        return "must be at most 16KB"
    try:
        value = json.loads(text)
    except ValueError:
        return "must be a JSON object"
    if not isinstance(value, dict):
        return "must be a JSON object"
    for inner in value.values():
        if isinstance(inner, dict | list) and any(isinstance(v, dict | list) for v in _values(inner)):
            return "must be at most 2 levels deep"
    return None


def _values(value: dict[str, Any] | list[Any]) -> list[Any]:
    return list(value.values()) if isinstance(value, dict) else value


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, str], tuple[bytes, str | None, str] | None]:
    """The text fields of a multipart body, and its `file` part (bytes, filename, content type)."""
    fields: dict[str, str] = {}
    file = None
    if not content_type.lower().startswith("multipart/form-data"):
        return fields, file
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    for part in message.iter_parts() if message.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            continue
        if name == "file":
            file = (payload, part.get_filename(), part.get_content_type())
        else:
            fields[name] = payload.decode("utf-8", "replace")
    return fields, file


@pytest.fixture
def fake_elevenlabs() -> Iterator[FakeElevenLabs]:
    """A running fake ElevenLabs; `url` is its API base URL, `api_key` the key it accepts, and its
    workspace webhook posts to `webhook_url` (set it) signed with `webhook_secret`."""
    fake = FakeElevenLabs().start()
    yield fake
    fake.stop()

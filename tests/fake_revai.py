"""A stand-in for Rev.ai's asynchronous speech-to-text API on 127.0.0.1, for the tests of transcription
requests.

- `POST /speechtotext/v1/jobs` (`Authorization: Bearer <key>`): JSON options with `source_config.url`
  (or the older `media_url`), which the fake GETs itself, or multipart/form-data with the file in
  `media` and the JSON in `options`. Options read: `metadata` (at most 512 characters),
  `notification_config` {`url`, `auth_headers`: only `Authorization`}, `speaker_channels_count`
  (1-8), `skip_diarization`. Answers the job (`in_progress`) at once, then POSTs `{"job": {…}}`
  (`transcribed`, or `failed` with `download_failure` when the URL cannot be fetched) to the
  notification URL, query and all, with its auth headers.
- `GET /speechtotext/v1/jobs/{id}/transcript` (`Accept: application/vnd.rev.transcript.v1.0+json`):
  what tests/test_vendors_end_to_end.py serves, tests/fixtures/revai/transcript_stereo.json for a
  job with `speaker_channels_count` (the speaker is the channel), else transcript_diarized.json.
- `GET /speechtotext/v1/jobs/{id}`, `GET /speechtotext/v1/jobs?limit=&starting_after=` (newest first,
  for b24scribe's lookup after a lost answer) and `GET /speechtotext/v1/account`.

Shapes follow Rev.ai's API reference (the async OpenAPI description: Job, SubmitJobOptions, problem
details errors) and its Python SDK (`CustomerUrlData`, `submit_job_local_file`). Rev.ai retries a
notification every 30 minutes for 24 hours until it gets a 200; the fake `callback_retries` times,
0.2 s apart. The fake's own choices where Rev.ai documents nothing: the titles of its 429 and 5xx
problem details, and `Retry-After` only when asked for. Only accepted jobs are listed.
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
from urllib.parse import parse_qsl, urlsplit

import pytest

from tests.fake_vendor_callbacks import AUDIO_OPENER, FakeVendorWithCallbacks, QuietHandler, Reply

FIXTURES = Path(__file__).parent / "fixtures" / "revai"
TRANSCRIPT_MEDIA_TYPE = "application/vnd.rev.transcript.v1.0+json"
API = "/speechtotext/v1"
_TITLES = {
    400: "Your request parameters didn't validate",
    401: "Authorization has been denied for this request",
    404: "could not find job",
    406: "Output format is not supported",
    409: "Job is in invalid state",
    429: "Too Many Requests",
}


@dataclass
class Submission:
    """One `POST /speechtotext/v1/jobs` as the fake saw it, whatever it answered."""

    body_kind: str  # "url" (JSON) or "multipart"
    options: dict[str, Any]  # the JSON options as sent ({} when they were not JSON)
    authorization: str | None
    job_id: str
    time: float
    media_filename: str | None = None
    media_content_type: str | None = None
    audio_size: int | None = None  # for a URL: once the fake has fetched it
    audio_sha256: str | None = None
    fetch_error: str | None = None
    answered: int | None = None  # the status sent; None when the answer was dropped
    accepted: bool = False  # it will notify (also true for a dropped answer)
    status: str = "in_progress"  # in_progress, transcribed, failed
    completed: float | None = None
    failure: str | None = None  # Rev.ai's failure kind, with failure_detail, once the job failed
    failure_detail: str | None = None

    @property
    def media_url(self) -> str | None:
        source = self.options.get("source_config")
        url = source.get("url") if isinstance(source, dict) else self.options.get("media_url")
        return url if isinstance(url, str) else None

    @property
    def notification(self) -> dict[str, Any]:
        config = self.options.get("notification_config")
        return config if isinstance(config, dict) else {}


@dataclass
class CallbackAttempt:
    """One notification delivery attempt."""

    job_id: str
    url: str
    headers: dict[str, str]
    body: bytes
    status: int | None  # None when the connection failed
    time: float

    def json(self) -> Any:
        return json.loads(self.body)


def _problem(status: int, **more: Any) -> dict[str, Any]:
    """Rev.ai's problem details (RFC 7807) body."""
    return {"title": _TITLES.get(status, f"HTTP {status}"), "status": status, **more}


def _invalid(parameter: str, reason: str) -> Reply:
    return Reply(
        400,
        _problem(400, parameter={parameter: [reason]}, type="https://www.rev.ai/api/v1/errors/invalid-parameters"),
    )


def _time(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-4] + "Z"


@dataclass
class FakeRevAI(FakeVendorWithCallbacks[Submission, CallbackAttempt]):
    """Rev.ai's job, transcript, list and account endpoints with notifications; records what it was sent and did."""

    api_key: str = "rev-test-key"
    reads: list[str] = field(default_factory=list)  # the path of every GET, in order

    def start(self) -> FakeRevAI:
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if urlsplit(self.path).path != f"{API}/jobs":
                    return self._send(Reply(404, _problem(404)))
                reply = fake.submit({k.lower(): v for k, v in self.headers.items()}, body)
                if reply is not None:
                    self._send(reply)  # else: drop the connection; the client sees no answer

            def do_GET(self) -> None:  # noqa: N802
                self._send(fake.read(self.path, {k.lower(): v for k, v in self.headers.items()}))

            def _send(self, reply: Reply) -> None:
                kind = "application/json" if reply.status < 400 else "application/problem+json"
                if reply.status == 200 and isinstance(reply.body, dict) and "monologues" in reply.body:
                    kind = TRANSCRIPT_MEDIA_TYPE
                self.send_reply(reply, kind)

        return self._serve(Handler)

    # --- submissions ------------------------------------------------------------------------------

    def submit(self, headers: Mapping[str, str], body: bytes) -> Reply | None:
        """Record a submission and answer it (None: close the connection without an answer)."""
        content_type = headers.get("content-type", "")
        media: bytes | None = None
        if content_type.split(";")[0].strip().lower() == "multipart/form-data":
            options_text, media, filename, media_type = _multipart(content_type, body)
            kind = "multipart"
        else:
            options_text, filename, media_type, kind = body.decode("utf-8", "replace"), None, None, "url"
        try:
            options = json.loads(options_text) if options_text is not None else None
        except ValueError:
            options = None
        submission = Submission(
            body_kind=kind,
            options=options if isinstance(options, dict) else {},
            authorization=headers.get("authorization"),
            job_id=uuid.uuid4().hex[:12],
            time=time.time(),
            media_filename=filename,
            media_content_type=media_type,
        )
        with self._lock:
            self.submissions.append(submission)
        reply = self._refusal(submission, options, media)
        if reply is not None:
            submission.answered = reply.status
            return reply
        if media is not None:
            submission.audio_size, submission.audio_sha256 = len(media), hashlib.sha256(media).hexdigest()
        dropped = self._accept(submission)
        return None if dropped else Reply(200, self.job(submission))

    def _refusal(self, submission: Submission, options: Any, media: bytes | None) -> Reply | None:
        """Why this submission is not taken, as Rev.ai would answer it; None to take it."""
        if submission.authorization != f"Bearer {self.api_key}":
            return Reply(401, _problem(401))
        failure = self._queued_failure(_problem)
        if failure is not None:
            return failure
        if not isinstance(options, dict):
            return _invalid("options", "The options are not a JSON object")
        if submission.body_kind == "multipart" and not media:
            return _invalid("media", "The media field is required")
        if submission.body_kind == "url" and not submission.media_url:
            return _invalid("source_config", "The source_config field is required")
        metadata = options.get("metadata")
        if metadata is not None and (not isinstance(metadata, str) or len(metadata) > 512):
            return _invalid("metadata", "The metadata field must be a string of at most 512 characters")
        count = options.get("speaker_channels_count")
        if count is not None and (type(count) is not int or not 1 <= count <= 8):
            return _invalid("speaker_channels_count", "The speaker_channels_count must be between 1 and 8")
        notification = submission.notification
        if not isinstance(notification.get("url"), str):
            return _invalid("notification_config", "This fake only transcribes with a notification_config url")
        auth_headers = notification.get("auth_headers") or {}
        if not isinstance(auth_headers, dict) or set(auth_headers) - {"Authorization"}:
            return _invalid("notification_config", "Only the Authorization header is supported in auth_headers")
        return None

    def _process(self, submission: Submission) -> None:
        """Fetch a URL's media, wait, then notify, retrying while the answer is not 200."""
        if submission.body_kind == "url":
            self._fetch(submission)
        if self._stopping.wait(self.callback_delay) or not self._processing_ends():
            return
        if submission.fetch_error:
            submission.failure, submission.failure_detail = "download_failure", submission.fetch_error
        elif self.job_failure:
            submission.failure, submission.failure_detail = "internal_processing", self.job_failure
        submission.status = "failed" if submission.failure else "transcribed"
        submission.completed = time.time()
        notification = submission.notification
        url = notification["url"]
        headers = {"Content-Type": "application/json", **(notification.get("auth_headers") or {})}
        data = json.dumps({"job": self.job(submission)}).encode()

        def attempt(status: int | None, moment: float) -> CallbackAttempt:
            return CallbackAttempt(submission.job_id, url, dict(headers), data, status, moment)

        self._deliver(url, data, headers, attempt)

    def _ends_delivery(self, status: int) -> bool:
        """Only a 200 delivers a notification: Rev.ai retries any other answer."""
        return status == 200

    def _fetch(self, submission: Submission) -> None:
        try:
            with AUDIO_OPENER.open(submission.media_url or "", timeout=5) as response:
                audio = response.read()
        except (OSError, ValueError) as error:
            reason = f"HTTP {error.code}" if isinstance(error, urllib.error.HTTPError) else type(error).__name__
            submission.fetch_error = f"Failed to download media file ({reason}). Please check your url and file type"
            return
        submission.audio_size, submission.audio_sha256 = len(audio), hashlib.sha256(audio).hexdigest()

    def job(self, submission: Submission) -> dict[str, Any]:
        """The job object as Rev.ai shows it (null properties left out)."""
        options = submission.options
        shown: dict[str, Any] = {
            "id": submission.job_id,
            "created_on": _time(submission.time),
            "completed_on": _time(submission.completed) if submission.completed else None,
            "name": submission.media_filename,
            "metadata": options.get("metadata"),
            "status": submission.status,
            "type": "async",
            "language": "en",
            "media_url": submission.media_url,
            "speaker_channels_count": options.get("speaker_channels_count"),
            "skip_diarization": options.get("skip_diarization"),
            "duration_seconds": 6.0 if submission.status == "transcribed" else None,
        }
        if submission.status == "failed":
            shown |= {"failure": submission.failure, "failure_detail": submission.failure_detail}
        return {key: value for key, value in shown.items() if value is not None}

    # --- reading ----------------------------------------------------------------------------------

    def read(self, path: str, headers: Mapping[str, str]) -> Reply:
        """Jobs, transcripts, the job list and the account."""
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return Reply(401, _problem(401))
        parts = urlsplit(path)
        with self._lock:
            self.reads.append(parts.path)
        segments = parts.path.removeprefix(API).strip("/").split("/")
        if segments == ["account"]:
            return Reply(200, {"email": "b24scribe-test@example.com", "balance_seconds": 36000})
        if segments == ["jobs"]:
            return self._list(dict(parse_qsl(parts.query)))
        if len(segments) in (2, 3) and segments[0] == "jobs":
            with self._lock:
                found = [s for s in self.submissions if s.accepted and s.job_id == segments[1]]
            if not found:
                return Reply(404, _problem(404, type="https://www.rev.ai/api/v1/errors/job-not-found"))
            if len(segments) == 2:
                return Reply(200, self.job(found[0]))
            if segments[2] == "transcript":
                return self._transcript(found[0], headers.get("accept", ""))
        return Reply(404, _problem(404))

    def _transcript(self, submission: Submission, accept: str) -> Reply:
        if accept != TRANSCRIPT_MEDIA_TYPE:
            return Reply(406, _problem(406, allowed_values=["text/plain", TRANSCRIPT_MEDIA_TYPE], current_value=accept))
        if submission.status != "transcribed":
            return Reply(409, _problem(409, allowed_values=["transcribed"], current_value=submission.status))
        stereo = submission.options.get("speaker_channels_count") == 2
        name = "transcript_stereo.json" if stereo else "transcript_diarized.json"
        return Reply(200, json.loads((FIXTURES / name).read_text()))

    def _list(self, query: dict[str, str]) -> Reply:
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            return _invalid("limit", "The limit must be an integer")
        if not 1 <= limit <= 1000:
            return _invalid("limit", "The max value for limit is 1000")
        with self._lock:
            newest_first = [s for s in reversed(self.submissions) if s.accepted]
        after = query.get("starting_after")
        if after is not None:
            ids = [s.job_id for s in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        return Reply(200, [self.job(s) for s in newest_first[:limit]])


def _multipart(content_type: str, body: bytes) -> tuple[str | None, bytes | None, str | None, str | None]:
    """The `options` text, the `media` bytes, its filename and its content type of a multipart body."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    options = media = filename = media_type = None
    if message.is_multipart():
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if name == "options" and isinstance(payload, bytes):
                options = payload.decode("utf-8", "replace")
            elif name == "media" and isinstance(payload, bytes):
                media, filename, media_type = payload, part.get_filename(), part.get_content_type()
    return options, media, filename, media_type


@pytest.fixture
def fake_revai() -> Iterator[FakeRevAI]:
    """A running fake Rev.ai; `fake_revai.url` is its API base URL, `api_key` the key it accepts."""
    fake = FakeRevAI().start()
    yield fake
    fake.stop()

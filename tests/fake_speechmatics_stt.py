"""A stand-in for Speechmatics' batch API (v2) on 127.0.0.1, for the tests of transcription requests.

- `POST /v2/jobs` (`Authorization: Bearer <key>`), multipart/form-data only: the `config` JSON
  (a JobConfig) and the recording as `data_file`, or `config.fetch_data.url`, which the fake GETs
  itself (one of the two, not both). Config read and checked: `type` "transcription",
  `transcription_config.language` (required), `diarization` none|speaker|channel,
  `channel_diarization_labels` (`^[A-Za-z0-9._]+$`), `notification_config` (at most 3, each a `url`,
  `contents` from Speechmatics' list, `method` post|put, `auth_headers` as "Name: value" lines) and
  `tracking`. Answers 201 `{"id"}` at once, then, per notification, sends to its URL with
  `id=<job>&status=success|error|fetch_error` added to the query, the auth headers, User-Agent
  `Speechmatics-API/2.0` and the body `contents` asks for: one item as the body (the json-v2
  transcript for `transcript`/`transcript.json-v2`, `{"job": …}` for `jobinfo`), none as an empty
  body, several as named multipart attachments. A failed job sends its job info only.
- `GET /v2/jobs/{id}` (`{"job": …}`: `running`, `done` or `rejected` with `errors[]`),
  `GET /v2/jobs/{id}/transcript?format=json-v2` and `GET /v2/jobs?created_before=&limit=` (newest
  first; `limit` 1-100, for b24scribe's lookup after a lost answer).

The json-v2 transcript is the support call tests/test_transcribe_vendors.py expects: the employee
greets, the customer answers, the employee asks. With channel diarization each word carries the
channel's label (`channel_diarization_labels[i]`, else the documented default `Channel <i+1>`), the
employee on the second channel (channel 1, as b24scribe reads an inbound call by default); with
speaker diarization the employee is `S1`, the customer `S2`; without diarization neither.

Shapes follow Speechmatics' batch OpenAPI description (`spec/batch.yaml`: JobConfig, JobDetails,
RetrieveTranscriptResponse, ErrorResponse `{"code", "error", "detail"}`) and its notifications page
(a non-2xx answer is retried; the fake: `callback_retries` times, 0.2 s apart). The fake's own
choices where Speechmatics documents nothing: the body of a 429 (`"error": "Rate Limited"`), a 404
"Transcription not ready" for a job still running, and `Retry-After` only when asked for. Only
accepted jobs are listed.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.error
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from requests_toolbelt import MultipartEncoder

from tests.fake_vendor_callbacks import AUDIO_OPENER, FakeVendorWithCallbacks, QuietHandler, Reply

API = "/v2"
CONTENTS = {
    "jobinfo",
    "transcript",
    "transcript.json-v2",
    "transcript.txt",
    "transcript.srt",
    "alignment",
    "alignment.word_start_and_end",
    "alignment.one_per_line",
    "data",
    "text",
}
_LABEL = re.compile(r"^[A-Za-z0-9._]+$")
_ERRORS = {
    400: "Job rejected",
    401: "Permission Denied",
    403: "Forbidden",
    404: "Job not found",
    422: "Unprocessable Entity",
    429: "Rate Limited",
    500: "Internal Server Error",
    503: "Internal Server Error",
}
# the call, as (0-based channel, speaker, start, end, text) per word; punctuation glues to the word before
CONVERSATION = [
    (1, "S1", 0.08, 0.32, "Good"),
    (1, "S1", 0.32, 0.72, "afternoon"),
    (1, "S1", 0.72, 0.72, ","),
    (1, "S1", 0.8, 1.04, "Acme"),
    (1, "S1", 1.04, 1.44, "support"),
    (1, "S1", 1.44, 1.44, "."),
    (0, "S2", 1.64, 1.88, "Hi"),
    (0, "S2", 1.88, 1.88, ","),
    (0, "S2", 1.96, 2.2, "I'm"),
    (0, "S2", 2.2, 2.6, "calling"),
    (0, "S2", 2.6, 2.84, "about"),
    (0, "S2", 2.84, 3.0, "my"),
    (0, "S2", 3.0, 3.4, "order"),
    (0, "S2", 3.4, 3.4, "."),
    (1, "S1", 4.16, 4.4, "What's"),
    (1, "S1", 4.4, 4.48, "the"),
    (1, "S1", 4.48, 4.72, "order"),
    (1, "S1", 4.72, 5.12, "number"),
    (1, "S1", 5.12, 5.12, "?"),
]


@dataclass
class Submission:
    """One `POST /v2/jobs` as the fake saw it, whatever it answered."""

    config: dict[str, Any]  # the `config` JSON as sent ({} when it was not a JSON object)
    authorization: str | None
    job_id: str
    time: float
    content_type: str  # of the whole request
    fields: list[str] = field(default_factory=list)  # the form's field names, in order
    data_filename: str | None = None
    data_content_type: str | None = None
    audio_size: int | None = None  # the uploaded bytes, or once the fake has fetched the URL
    audio_sha256: str | None = None
    answered: int | None = None  # the status sent; None when the answer was dropped
    accepted: bool = False  # it will notify (also true for a dropped answer)
    status: str = "running"  # running, done, rejected
    notification_status: str = "success"  # what the notification's `status` says: success, error, fetch_error
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def transcription(self) -> dict[str, Any]:
        config = self.config.get("transcription_config")
        return config if isinstance(config, dict) else {}

    @property
    def notifications(self) -> list[dict[str, Any]]:
        config = self.config.get("notification_config")
        return [n for n in config if isinstance(n, dict)] if isinstance(config, list) else []

    @property
    def fetch_url(self) -> str | None:
        fetch = self.config.get("fetch_data")
        url = fetch.get("url") if isinstance(fetch, dict) else None
        return url if isinstance(url, str) else None


@dataclass
class CallbackAttempt:
    """One notification delivery attempt."""

    job_id: str
    url: str
    method: str
    headers: dict[str, str]
    body: bytes
    status: int | None  # None when the connection failed
    time: float

    def json(self) -> Any:
        return json.loads(self.body)


def _error(status: int, detail: str | None = None) -> dict[str, Any]:
    """Speechmatics' ErrorResponse body."""
    body: dict[str, Any] = {"code": status, "error": _ERRORS.get(status, f"HTTP {status}")}
    return body | ({"detail": detail} if detail else {})


def _time(moment: float) -> str:
    """A time as Speechmatics shows it: UTC, to the millisecond."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _moment(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass
class FakeSpeechmatics(FakeVendorWithCallbacks[Submission, CallbackAttempt]):
    """Speechmatics' job, transcript and job-list endpoints with notifications; records what it was sent and did."""

    api_key: str = "sm-test-key"
    reads: list[str] = field(default_factory=list)  # the path of every GET, in order

    def start(self) -> FakeSpeechmatics:
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if urlsplit(self.path).path.rstrip("/") != f"{API}/jobs":
                    return self.send_reply(Reply(404, _error(404)))
                reply = fake.submit({k.lower(): v for k, v in self.headers.items()}, body)
                if reply is not None:
                    self.send_reply(reply)  # else: drop the connection; the client sees no answer

            def do_GET(self) -> None:  # noqa: N802
                self.send_reply(fake.read(self.path, {k.lower(): v for k, v in self.headers.items()}))

        return self._serve(Handler)

    # --- submissions ------------------------------------------------------------------------------

    def submit(self, headers: Mapping[str, str], body: bytes) -> Reply | None:
        """Record a submission and answer it (None: close the connection without an answer)."""
        content_type = headers.get("content-type", "")
        form = _form(content_type, body)
        try:
            config = json.loads(form["config"][0]) if "config" in form else None
        except ValueError:
            config = None
        submission = Submission(
            config=config if isinstance(config, dict) else {},
            authorization=headers.get("authorization"),
            job_id=uuid.uuid4().hex[:10],
            time=time.time(),
            content_type=content_type,
            fields=list(form),
        )
        data = form.get("data_file")
        if data is not None:
            submission.data_filename, submission.data_content_type = data[1], data[2]
        with self._lock:
            self.submissions.append(submission)
        reply = self._refusal(submission, config, content_type, data)
        if reply is not None:
            submission.answered = reply.status
            return reply
        if data is not None:
            audio = data[0].encode("latin-1") if isinstance(data[0], str) else data[0]
            submission.audio_size, submission.audio_sha256 = len(audio), hashlib.sha256(audio).hexdigest()
        dropped = self._accept(submission)
        return None if dropped else Reply(201, {"id": submission.job_id})

    def _refusal(self, submission: Submission, config: Any, content_type: str, data: Any) -> Reply | None:
        """Why this submission is not taken, as Speechmatics would answer it; None to take it."""
        if submission.authorization != f"Bearer {self.api_key}":
            return Reply(401, _error(401))
        failure = self._queued_failure(_error)
        if failure is not None:
            return failure
        if content_type.split(";")[0].strip().lower() != "multipart/form-data":
            return Reply(400, _error(400, "the request must be multipart/form-data"))
        if not isinstance(config, dict):
            return Reply(400, _error(400, "Job config JSON is invalid"))
        if config.get("type") != "transcription":
            return Reply(400, _error(400, "this fake only runs transcription jobs"))
        if (data is None) == (submission.fetch_url is None):
            return Reply(400, {"code": 400, "error": "Missing data_file", "detail": "send data_file or fetch_data"})
        problem = _transcription_problem(submission.transcription) or _notification_problem(config)
        if problem:
            return Reply(400, _error(400, problem))
        if "tracking" in config and not isinstance(config["tracking"], dict):
            return Reply(400, _error(400, "tracking must be an object"))
        return None

    def _process(self, submission: Submission) -> None:
        """Fetch a URL's audio, wait, then notify (every notification, retried while not 2xx)."""
        if submission.fetch_url is not None:
            self._fetch(submission)
        if self._stopping.wait(self.callback_delay) or not self._processing_ends():
            return
        if not submission.errors and self.job_failure:
            submission.errors.append({"timestamp": _time(time.time()), "message": self.job_failure})
            submission.notification_status = "error"
        submission.status = "rejected" if submission.errors else "done"
        for notification in submission.notifications:
            self._notify(submission, notification)

    def _fetch(self, submission: Submission) -> None:
        url = submission.fetch_url or ""
        try:
            with AUDIO_OPENER.open(url, timeout=5) as response:
                audio = response.read()
        except (OSError, ValueError) as error:
            reason = f"response status {error.code}" if isinstance(error, urllib.error.HTTPError) else str(error)
            message = f'unable to fetch audio: Get "{url}": {reason}'
            submission.errors.append({"timestamp": _time(time.time()), "message": message})
            submission.notification_status = "fetch_error"
            return
        submission.audio_size, submission.audio_sha256 = len(audio), hashlib.sha256(audio).hexdigest()

    def _notify(self, submission: Submission, notification: dict[str, Any]) -> None:
        parts = urlsplit(str(notification["url"]))
        query = [*parse_qsl(parts.query, keep_blank_values=True)]
        query += [("id", submission.job_id), ("status", submission.notification_status)]
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
        headers = {"User-Agent": "Speechmatics-API/2.0"}
        for line in notification.get("auth_headers") or []:
            name, _, value = str(line).partition(":")
            headers[name.strip()] = value.strip()
        data, headers["Content-Type"] = self._notification_body(submission, notification.get("contents"))
        method = str(notification.get("method") or "post").upper()

        def attempt(status: int | None, moment: float) -> CallbackAttempt:
            return CallbackAttempt(submission.job_id, url, method, dict(headers), data, status, moment)

        self._deliver(url, data, headers, attempt, method=method)

    def _notification_body(self, submission: Submission, contents: Any) -> tuple[bytes, str]:
        """The body `contents` asks for (a failed job's: its job info only)."""
        items = [str(item) for item in contents] if isinstance(contents, list) else ["transcript"]
        if submission.status != "done":
            items = [item for item in items if item == "jobinfo"] or (["jobinfo"] if items else [])
        if not items:
            return b"", "application/octet-stream"
        rendered = {item: self._item(submission, item) for item in items}
        if len(items) == 1 and contents is not None:
            return rendered[items[0]]
        encoder = MultipartEncoder(
            fields=[
                ("data_file" if contents is None else item, (item, data, kind))
                for item, (data, kind) in rendered.items()
            ]
        )
        return encoder.to_string(), encoder.content_type

    def _item(self, submission: Submission, item: str) -> tuple[bytes, str]:
        if item == "jobinfo":
            return json.dumps({"job": self.job(submission)}).encode(), "application/json"
        if item in ("transcript", "transcript.json-v2"):
            return json.dumps(self.transcript(submission)).encode(), "application/json"
        if item == "transcript.txt":
            return _plain_text(self.transcript(submission)).encode(), "text/plain"
        return b"", "application/octet-stream"  # the fake keeps no srt, alignment or audio to attach

    # --- what it shows ----------------------------------------------------------------------------

    def job(self, submission: Submission) -> dict[str, Any]:
        """The job as Speechmatics shows it (its config without the notification's auth headers)."""
        config = json.loads(json.dumps(submission.config))
        for notification in config.get("notification_config") or []:
            if isinstance(notification, dict):
                notification.pop("auth_headers", None)
        shown: dict[str, Any] = {
            "id": submission.job_id,
            "created_at": _time(submission.time),
            "data_name": submission.data_filename or "",
            "status": submission.status,
            "config": config,
        }
        if submission.audio_size is not None and submission.status == "done":
            shown["duration"] = 6
        if isinstance(config.get("tracking"), dict):
            shown["tracking"] = config["tracking"]
        if submission.errors:
            shown["errors"] = submission.errors
        return shown

    def transcript(self, submission: Submission) -> dict[str, Any]:
        """The json-v2 transcript of the support call, as the job's diarization labels it."""
        transcription = submission.transcription
        diarization = transcription.get("diarization", "none")
        labels = transcription.get("channel_diarization_labels") or ["Channel 1", "Channel 2"]
        results = []
        for channel, speaker, start, end, text in CONVERSATION:
            punctuation = text in ",.?"
            alternative: dict[str, Any] = {"content": text, "confidence": 0.97, "language": "en"}
            if diarization == "speaker":
                alternative["speaker"] = speaker
            result: dict[str, Any] = {
                "alternatives": [alternative],
                "start_time": start,
                "end_time": end,
                "type": "punctuation" if punctuation else "word",
            }
            if punctuation:
                result |= {"attaches_to": "previous", "is_eos": text != ","}
            if diarization == "channel":
                result["channel"] = labels[channel]
            results.append(result)
        job = {"id": submission.job_id, "created_at": _time(submission.time), "duration": 6}
        job["data_name"] = submission.data_filename or ""
        if isinstance(submission.config.get("tracking"), dict):
            job["tracking"] = submission.config["tracking"]
        metadata = {"created_at": _time(time.time()), "type": "transcription", "transcription_config": transcription}
        return {"format": "2.9", "job": job, "metadata": metadata, "results": results}

    def read(self, path: str, headers: Mapping[str, str]) -> Reply:
        """Jobs, transcripts and the job list."""
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return Reply(401, _error(401))
        parts = urlsplit(path)
        with self._lock:
            self.reads.append(parts.path)
        query = dict(parse_qsl(parts.query))
        segments = parts.path.removeprefix(API).strip("/").split("/")
        if segments == ["jobs"]:
            return self._list(query)
        if len(segments) in (2, 3) and segments[0] == "jobs":
            with self._lock:
                found = [s for s in self.submissions if s.accepted and s.job_id == segments[1]]
            if not found:
                return Reply(404, _error(404))
            if len(segments) == 2:
                return Reply(200, {"job": self.job(found[0])})
            if segments[2] == "transcript":
                if query.get("format", "json-v2") != "json-v2":
                    return Reply(400, {"code": 400, "error": "Format Not Supported"})
                if found[0].status != "done":
                    return Reply(404, {"code": 404, "error": "Transcription not ready"})
                return Reply(200, self.transcript(found[0]))
        return Reply(404, _error(404))

    def _list(self, query: dict[str, str]) -> Reply:
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            return Reply(422, {"code": 422, "error": "limit in query must be of type int64"})
        if not 1 <= limit <= 100:
            return Reply(422, {"code": 422, "error": "limit in query should be between 1 and 100"})
        with self._lock:
            newest_first = [s for s in reversed(self.submissions) if s.accepted]
        before = query.get("created_before")
        if before is not None:
            cursor = _moment(before)
            newest_first = [s for s in newest_first if _moment(_time(s.time)) < cursor]
        return Reply(200, {"jobs": [self.job(s) for s in newest_first[:limit]]})


def _form(content_type: str, body: bytes) -> dict[str, tuple[Any, str | None, str | None]]:
    """A multipart body's fields by name: (value, filename, content type); {} when it is not multipart."""
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        return {}
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields: dict[str, tuple[Any, str | None, str | None]] = {}
    if message.is_multipart():
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                value: Any = payload if part.get_filename() else payload.decode("utf-8", "replace")
                fields[name] = (value, part.get_filename(), part.get_content_type())
    return fields


def _transcription_problem(config: dict[str, Any]) -> str | None:
    if not isinstance(config.get("language"), str) or not config["language"]:
        return "No language selected"
    if config.get("diarization", "none") not in ("none", "speaker", "channel"):
        return "diarization must be one of none, speaker, channel"
    labels = config.get("channel_diarization_labels")
    if labels is not None and (
        not isinstance(labels, list) or not all(isinstance(label, str) and _LABEL.match(label) for label in labels)
    ):
        return "channel_diarization_labels must match ^[A-Za-z0-9._]+$"
    return None


def _notification_problem(config: dict[str, Any]) -> str | None:
    notifications = config.get("notification_config")
    if notifications is None:
        return None
    if not isinstance(notifications, list) or len(notifications) > 3:
        return "notification_config must be a list of at most 3 items"
    for notification in notifications:
        if not isinstance(notification, dict) or not isinstance(notification.get("url"), str):
            return "each notification_config needs a url"
        contents = notification.get("contents", [])
        if not isinstance(contents, list) or not set(contents) <= CONTENTS:
            return f"notification_config contents must be from {sorted(CONTENTS)}"
        if notification.get("method", "post") not in ("post", "put"):
            return "notification_config method must be post or put"
        auth_headers = notification.get("auth_headers", [])
        if not isinstance(auth_headers, list) or not all(
            isinstance(line, str) and re.match(r"^[A-Za-z0-9-]+: ?\S", line) for line in auth_headers
        ):
            return 'notification_config auth_headers must be header lines, "Name: value"'
    return None


def _plain_text(transcript: dict[str, Any]) -> str:
    words: list[str] = []
    for result in transcript["results"]:
        content = result["alternatives"][0]["content"]
        if result["type"] == "punctuation" and words:
            words[-1] += content
        else:
            words.append(content)
    return " ".join(words) + "\n"

"""A stand-in for Deepgram's pre-recorded API on 127.0.0.1, for the tests of transcription requests.

- `POST /v1/listen?callback=URL&…` (`Authorization: Token <key>`), body JSON `{"url": …}` (the fake
  GETs it itself, as Deepgram fetches remote audio) or raw audio: answers `{"request_id"}` at once,
  then POSTs (PUTs with `callback_method=put`) a /v1/listen response built from `script` to the
  callback URL, its userinfo sent as `Authorization: Basic` and stripped from the URL, as Deepgram does.
- `GET /v1/projects`, `GET /v1/projects/{id}/requests`: the request log, for b24scribe's lookup
  after a lost answer.

Shapes follow developers.deepgram.com (callback, errors, manage/requests/list). The fake's own choices
where Deepgram documents nothing: an audio URL that cannot be fetched calls back with
`{"err_code": "REMOTE_CONTENT_ERROR", "err_msg", "request_id"}` (the code Deepgram clients meet; our
message) and logs code 400; only accepted submissions are logged; `Retry-After` only when asked for.
Deepgram retries a callback 10 times 30 s apart; the fake `callback_retries` times, 0.2 s apart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import string
import time
import urllib.error
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import pytest

from tests.fake_vendor_callbacks import AUDIO_OPENER, FakeVendorWithCallbacks, QuietHandler, Reply

Line = tuple[int, float, float, str]  # (channel or speaker index, start, end, text)

MODEL_ID = "3b3aabe4-608a-46ac-9585-7960a25daf1a"
DEFAULT_SCRIPT: list[Line] = [
    (1, 0.08, 1.44, "Good afternoon, Acme support."),
    (0, 1.8, 3.6, "Hi, I'm calling about my order."),
    (1, 4.0, 5.5, "What's the order number?"),
]
_ERRORS = {  # Deepgram's documented bodies for the statuses a test is likely to ask for
    400: ("Bad Request", "Bad Request: failed to process audio: corrupt or unsupported data"),
    401: ("INVALID_AUTH", "Invalid credentials."),
    402: (
        "ASR_PAYMENT_REQUIRED",
        "Project does not have enough credits for an ASR request and does not have an overage agreement.",
    ),
    429: ("TOO_MANY_REQUESTS", "Too many requests. Please try again later"),
}
_PUNCTUATION = string.punctuation.replace("'", "")


@dataclass
class Submission:
    """One `POST /v1/listen` as the fake saw it, whatever it answered."""

    path: str  # with its query string, as received
    query: dict[str, str]  # the last value of each parameter
    extra: dict[str, str]  # the `extra=key:value` pairs
    authorization: str | None
    body_kind: str  # "url" or "bytes"
    request_id: str
    time: float
    audio_url: str | None = None
    audio_size: int | None = None  # for a URL: once the fake has fetched it
    audio_sha256: str | None = None
    fetch_error: str | None = None
    answered: int | None = None  # the status sent; None when the answer was dropped
    accepted: bool = False  # it will call back (also true for a dropped answer)


@dataclass
class CallbackAttempt:
    """One delivery attempt of a result to a callback URL."""

    request_id: str
    url: str  # without userinfo
    method: str
    authorization: str | None
    body: bytes
    status: int | None  # None when the connection failed
    time: float

    def json(self) -> Any:
        return json.loads(self.body)


def _error(status: int, request_id: str | None, message: str | None = None) -> dict[str, Any]:
    phrase = HTTPStatus(status).phrase
    code, default_message = _ERRORS.get(status, (phrase.upper().replace(" ", "_"), f"{phrase}."))
    body: dict[str, Any] = {"err_code": code, "err_msg": message or default_message}
    if request_id:
        body["request_id"] = request_id
    return body


def _timestamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_time(value: str | None) -> datetime | None:
    moment = datetime.fromisoformat(value) if value is not None else None  # ValueError: a 400
    return moment.replace(tzinfo=moment.tzinfo or UTC) if moment else None


def strip_userinfo(url: str) -> tuple[str, str | None]:
    """The callback URL without `user:password@`, and the Basic header those credentials make."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return urlunsplit(parts._replace(netloc=netloc)), "Basic " + base64.b64encode(credentials).decode()


def _words(start: float, end: float, text: str, punctuate: bool, speaker: int | None) -> list[dict[str, Any]]:
    """The text's words spread evenly over [start, end], the last one ending at `end`."""
    tokens = text.split()
    step = (end - start) / max(len(tokens), 1)
    words = []
    for index, token in enumerate(tokens):
        word: dict[str, Any] = {
            "word": token.strip(_PUNCTUATION).lower() or token,
            "start": round(start + index * step, 3),
            "end": end if index == len(tokens) - 1 else round(start + (index + 1) * step, 3),
            "confidence": 0.98,
        }
        if punctuate:
            word["punctuated_word"] = token
        if speaker is not None:
            word.update(speaker=speaker, speaker_confidence=0.9)
        words.append(word)
    return words


def build_result(
    script: list[Line], query: Mapping[str, str], extra: Mapping[str, str], request_id: str, sha256: str
) -> dict[str, Any]:
    """The /v1/listen response Deepgram would give for `script` with these query parameters."""
    multichannel = query.get("multichannel") == "true"
    diarize = query.get("diarize") == "true"
    punctuate = query.get("punctuate") == "true"
    channel_count = max((line[0] for line in script), default=0) + 1 if multichannel else 1
    # Deepgram orders multichannel utterances by channel, then time (its utterances docs)
    lines = sorted(script, key=lambda line: (line[0], line[1]) if multichannel else (line[1], line[0]))
    utterances: list[dict[str, Any]] = []
    for index, start, end, text in lines:
        channel = index if multichannel else 0
        speaker = (0 if multichannel else index) if diarize else None
        words = _words(start, end, text, punctuate, speaker)
        utterance: dict[str, Any] = {
            "start": start,
            "end": end,
            "confidence": 0.98,
            "channel": channel,
            "transcript": " ".join(word.get("punctuated_word", word["word"]) for word in words),
            "words": words,
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{request_id}/{channel}/{start}")),
        }
        if speaker is not None:
            utterance["speaker"] = speaker
        utterances.append(utterance)
    channels = []
    for channel in range(channel_count):
        own = sorted((u for u in utterances if u["channel"] == channel), key=lambda u: u["start"])
        alternative = {
            "transcript": " ".join(u["transcript"] for u in own),
            "confidence": 0.98,
            "words": [word for u in own for word in u["words"]],
        }
        channels.append({"alternatives": [alternative]})
    metadata: dict[str, Any] = {
        "transaction_key": "deprecated",
        "request_id": request_id,
        "sha256": sha256,
        "created": _timestamp(time.time()),
        "duration": max((line[2] for line in script), default=0.0),
        "channels": channel_count,
        "models": [MODEL_ID],
        "model_info": {MODEL_ID: {"name": "general-nova-3", "version": "2024-12-20.0", "arch": "nova-3"}},
    }
    if extra:
        metadata["extra"] = dict(extra)
    results: dict[str, Any] = {"channels": channels}
    if query.get("utterances") == "true":
        results["utterances"] = utterances
    return {"metadata": metadata, "results": results}


@dataclass
class FakeDeepgram(FakeVendorWithCallbacks[Submission, CallbackAttempt]):
    """Deepgram's /v1/listen with callbacks and its request log; records what it was sent and did."""

    api_key: str = "dg-test-key"
    project_id: str = "5e7b3c1a-2f4d-4b6e-9a8c-1d0f2e3b4a5c"
    api_key_id: str = "c0ffee00-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
    usd_per_minute: float = 0.0043  # what the request log reports a request cost (nova-3, pre-recorded)
    usage_read: bool = True  # False: the key lacks `usage:read`, so the request log answers 403
    reads: list[str] = field(default_factory=list)  # the management API's paths, as asked
    script: list[Line] = field(default_factory=lambda: list(DEFAULT_SCRIPT))
    answer_delay: float = 0.0  # seconds before /v1/listen answers a submission it took

    def start(self) -> FakeDeepgram:
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if urlsplit(self.path).path != "/v1/listen":
                    return self._send(Reply(404, _error(404, None)))
                reply = fake.listen(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                if reply is not None:
                    self._send(reply)  # else: drop the connection; the client sees no answer

            def do_GET(self) -> None:  # noqa: N802
                self._send(fake.manage(self.path, self.headers.get("Authorization")))

            def _send(self, reply: Reply) -> None:
                if "request_id" in reply.body:
                    reply.headers = {"dg-request-id": reply.body["request_id"], **reply.headers}
                self.send_reply(reply)

        return self._serve(Handler)

    # --- /v1/listen -------------------------------------------------------------------------------

    def listen(self, path: str, headers: Mapping[str, str], body: bytes) -> Reply | None:
        """Record a submission and answer it (None: close the connection without an answer)."""
        pairs = parse_qsl(urlsplit(path).query, keep_blank_values=True)
        extra = dict(value.partition(":")[::2] for key, value in pairs if key == "extra" and ":" in value)
        json_body = headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
        submission = Submission(
            path=path,
            query=dict(pairs),
            extra=extra,
            authorization=headers.get("authorization"),
            body_kind="url" if json_body else "bytes",
            request_id=str(uuid.uuid4()),
            time=time.time(),
        )
        with self._lock:
            self.submissions.append(submission)
        reply = self._refusal(submission, body)
        if reply is not None:
            submission.answered = reply.status
            return reply
        dropped = self._accept(submission)
        if self.answer_delay:  # the submission is taken (it will call back); the answer is slow
            self._stopping.wait(self.answer_delay)
        return None if dropped else Reply(200, {"request_id": submission.request_id})

    def _refusal(self, submission: Submission, body: bytes) -> Reply | None:
        """Why this submission is not accepted, as Deepgram would answer it; None to accept it."""
        request_id = submission.request_id
        if submission.authorization != f"Token {self.api_key}":
            return Reply(401, _error(401, request_id))
        failure = self._queued_failure(lambda status: _error(status, request_id))
        if failure is not None:
            return failure
        if submission.body_kind == "url":
            try:
                url = json.loads(body)["url"]
            except (ValueError, TypeError, KeyError):
                url = None
            if not isinstance(url, str) or not url:
                message = "Content-type was application/json, but we could not process the JSON payload."
                return Reply(400, _error(400, request_id, message))
            submission.audio_url = url
        elif not body:
            return Reply(400, _error(400, request_id))
        else:
            submission.audio_size, submission.audio_sha256 = len(body), hashlib.sha256(body).hexdigest()
        if not submission.query.get("callback"):
            return Reply(400, _error(400, request_id, "This fake only transcribes with callback=URL."))
        return None

    def _process(self, submission: Submission) -> None:
        """Fetch remote audio, wait, then deliver the result, retrying while the answer is not 2xx."""
        result = self._transcribe(submission)
        if self._stopping.wait(self.callback_delay):
            return
        url, authorization = strip_userinfo(submission.query["callback"])
        method = "PUT" if submission.query.get("callback_method", "").lower() == "put" else "POST"
        data = json.dumps(result).encode()
        headers = {"Content-Type": "application/json"}
        if authorization:
            headers["Authorization"] = authorization

        def attempt(status: int | None, moment: float) -> CallbackAttempt:
            return CallbackAttempt(submission.request_id, url, method, authorization, data, status, moment)

        self._deliver(url, data, headers, attempt, method)

    def _transcribe(self, submission: Submission) -> dict[str, Any]:
        """The scripted result, or Deepgram's error body when the remote audio cannot be fetched."""
        if submission.audio_url is not None:
            try:
                with AUDIO_OPENER.open(submission.audio_url, timeout=5) as response:
                    audio = response.read()
            except (OSError, ValueError) as error:
                reason = f"HTTP {error.code}" if isinstance(error, urllib.error.HTTPError) else type(error).__name__
                submission.fetch_error = f"Could not fetch the audio at the submitted url ({reason})."
                return {
                    "err_code": "REMOTE_CONTENT_ERROR",
                    "err_msg": submission.fetch_error,
                    "request_id": submission.request_id,
                }
            submission.audio_size, submission.audio_sha256 = len(audio), hashlib.sha256(audio).hexdigest()
        return build_result(
            self.script, submission.query, submission.extra, submission.request_id, submission.audio_sha256 or ""
        )

    # --- management API ---------------------------------------------------------------------------

    def manage(self, path: str, authorization: str | None) -> Reply:
        """`GET /v1/projects`, `GET /v1/projects/{id}/requests` and `…/requests/{request_id}`."""
        parts = urlsplit(path)
        self.reads.append(parts.path)
        segments = parts.path.strip("/").split("/")
        if authorization != f"Token {self.api_key}":
            return Reply(401, _error(401, str(uuid.uuid4())))
        if segments == ["v1", "projects"]:
            return Reply(200, {"projects": [{"project_id": self.project_id, "name": "b24scribe-test"}]})
        if segments[:2] == ["v1", "projects"] and len(segments) > 3 and not self.usage_read:
            return Reply(403, _error(403, str(uuid.uuid4()), "Your API key lacks the usage:read scope."))
        if len(segments) == 5 and segments[:2] == ["v1", "projects"] and segments[3] == "requests":
            with self._lock:
                found = [s for s in self.submissions if s.accepted and s.request_id == segments[4]]
            if segments[2] != self.project_id or not found:
                return Reply(404, _error(404, str(uuid.uuid4()), "Request not found."))
            return Reply(200, {"request": self._log_entry(found[0], 400 if found[0].fetch_error else 200)})
        if len(segments) == 4 and segments[:2] == ["v1", "projects"] and segments[3] == "requests":
            if segments[2] != self.project_id:
                return Reply(404, {"err_code": "PROJECT_NOT_FOUND", "err_msg": "Project not found."})
            try:
                return self._request_log(dict(parse_qsl(parts.query)))
            except ValueError as error:  # `start`/`end` not ISO 8601, `limit`/`page` not numbers or out of range
                return Reply(400, _error(400, str(uuid.uuid4()), f"Invalid query: {error}"))
        return Reply(404, _error(404, None))

    def _request_log(self, query: dict[str, str]) -> Reply:
        start, end = _parse_time(query.get("start")), _parse_time(query.get("end"))
        limit, page = int(float(query.get("limit", "10"))), int(float(query.get("page", "0")))
        if not 1 <= limit <= 1000 or page < 0:
            raise ValueError("`limit` must be within [1, 1000] and `page` at least 0")
        with self._lock:
            newest_first = [submission for submission in reversed(self.submissions) if submission.accepted]
        entries = []
        for submission in newest_first:
            created = datetime.fromtimestamp(submission.time, UTC)
            code = 400 if submission.fetch_error else 200
            status = "failed" if code >= 400 else "succeeded"
            if (start and created < start) or (end and created > end) or query.get("status", status) != status:
                continue
            if query.get("request_id", submission.request_id) == submission.request_id:
                entries.append(self._log_entry(submission, code))
        page_entries = entries[page * limit : (page + 1) * limit]
        return Reply(200, {"page": page, "limit": limit, "requests": page_entries})

    def _log_entry(self, submission: Submission, code: int) -> dict[str, Any]:
        duration = max((line[2] for line in self.script), default=0.0)
        usd = round(duration / 60 * self.usd_per_minute, 6)
        details = {"usd": usd, "duration": duration, "method": "async", "models": [MODEL_ID]}
        return {
            "request_id": submission.request_id,
            "project_uuid": self.project_id,
            "created": _timestamp(submission.time),
            "path": submission.path,
            "api_key_id": self.api_key_id,
            "response": {"details": details, "code": code, "completed": _timestamp(submission.time)},
            "code": code,
            "deployment": "hosted",
            "callback": strip_userinfo(submission.query["callback"])[0],
        }


@pytest.fixture
def fake_deepgram() -> Iterator[FakeDeepgram]:
    """A running fake Deepgram; `fake_deepgram.url` is its base URL, `api_key` the key it accepts."""
    fake = FakeDeepgram().start()
    yield fake
    fake.stop()

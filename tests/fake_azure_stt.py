"""A stand-in for Azure AI Speech's speech to text API (version 2024-11-15) on 127.0.0.1, for the tests
of transcription requests.

- `POST /speechtotext/transcriptions:submit` (batch, `Ocp-Apim-Subscription-Key`): JSON with
  `displayName`, `locale`, `contentUrls` (which the fake GETs itself), `properties` (required
  `timeToLiveHours` 6-744; `channels`, `diarization` {`enabled`, `maxSpeakers` 2-35},
  `languageIdentification` {`candidateLocales`: 2-10}) and `customProperties` (at most 10, keys up
  to 64 and values up to 256 characters). Answers 201 with the transcription (`NotStarted`) and its
  `Location`, then runs it (`Running`, then `Succeeded`, or `Failed` with `properties.error` when the
  audio cannot be fetched). When a web hook is registered (`register_web_hook`: Azure's web hooks
  belong to the Speech resource, not to a transcription), POSTs the transcription there with
  `X-MicrosoftSpeechServices-Event: TranscriptionCompletion` and `X-MicrosoftSpeechServices-Signature`
  = base64(HMAC-SHA256(secret, body)), again while the answer is not a 2xx.
- `GET /speechtotext/transcriptions/{id}`, `…/{id}/files` (a report and the `Transcription` file,
  whose `contentUrl` is a SAS-style URL on this fake) and that content URL: tests/fixtures/azure
  result_stereo.json for `channels: [0, 1]`, result_diarized.json for diarization (the fixtures
  tests/test_schemas_azure.py reads).
- `GET /speechtotext/transcriptions?filter=createdDateTime ge …&top=&skip=` (paged by `@nextLink`),
  `GET /speechtotext/transcriptions/locales`.
- `POST /speechtotext/transcriptions:transcribe` (fast transcription): multipart `audio` and
  `definition` (`locales`, `channels` up to two, `diarization`; not both channels and diarization).
  Answers the same fixtures as fast transcription writes them: milliseconds, speakers from 0.

Every request must say `api-version=2024-11-15`. Error bodies: the gateway's `{"error": {"code",
"message"}}` for a wrong key and a 429 (with the message Azure sends for a wrong key), the service's
`{"code", "message"}` for a request it refuses. The fake's own choices where Azure documents
nothing: the 429's message, the failed download's error message, the SAS parameters, and the list's
order (newest first).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.error
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from schemas.azure import iso_seconds
from tests.fake_vendor_callbacks import AUDIO_OPENER, FakeVendorWithCallbacks, QuietHandler, Reply

FIXTURES = Path(__file__).parent / "fixtures" / "azure"
API_VERSION = "2024-11-15"
API = "/speechtotext"
KEY_HEADER = "ocp-apim-subscription-key"
WRONG_KEY = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
    "for an active subscription and use a correct regional API endpoint for your resource."
)
SUBMIT_LOCALES = ["de-DE", "en-GB", "en-US", "es-ES", "fr-FR", "ja-JP", "ru-RU", "zh-CN"]
FAST_LOCALES = ["de-DE", "en-IN", "en-US", "es-ES", "es-MX", "fr-FR", "hi-IN", "it-IT", "ja-JP", "ko-KR", "pt-BR"]


@dataclass
class Submission:
    """One `POST /speechtotext/transcriptions:submit` as the fake saw it, whatever it answered."""

    body: dict[str, Any]  # the JSON as sent ({} when it was not JSON)
    key: str | None
    transcription_id: str
    time: float
    audio_size: int | None = None  # once the fake fetched contentUrls[0]
    audio_sha256: str | None = None
    fetch_error: str | None = None
    answered: int | None = None  # the status sent; None when the answer was dropped
    accepted: bool = False  # it runs (also true for a dropped answer)
    status: str = "NotStarted"  # NotStarted, Running, Succeeded, Failed
    completed: float | None = None
    error: str | None = None  # properties.error.message once it failed

    @property
    def properties(self) -> dict[str, Any]:
        properties = self.body.get("properties")
        return properties if isinstance(properties, dict) else {}

    @property
    def diarized(self) -> bool:
        diarization = self.properties.get("diarization")
        return isinstance(diarization, dict) and diarization.get("enabled") is True


@dataclass
class FastTranscription:
    """One `POST /speechtotext/transcriptions:transcribe` as the fake saw it."""

    definition: dict[str, Any]  # the `definition` JSON ({} when it was not JSON)
    key: str | None
    audio_filename: str | None = None
    audio_content_type: str | None = None
    audio_size: int | None = None
    audio_sha256: str | None = None
    answered: int | None = None


@dataclass
class CallbackAttempt:
    """One web hook delivery attempt."""

    transcription_id: str
    url: str
    headers: dict[str, str]
    body: bytes
    status: int | None  # None when the connection failed
    time: float

    def json(self) -> Any:
        return json.loads(self.body)


def _gateway_error(status: int, message: str | None = None) -> dict[str, Any]:
    """What Azure's gateway answers (a wrong key, a quota): the error nested under `error`."""
    text = message or {401: WRONG_KEY, 404: "Resource not found"}.get(status, "Too many requests: try again later")
    return {"error": {"code": str(status), "message": text}}


def _invalid(message: str, code: str = "InvalidPayload") -> Reply:
    """What the speech service answers a request it refuses."""
    return Reply(400, {"code": "InvalidRequest", "message": message, "innerError": {"code": code, "message": message}})


def _time(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _moment(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def fast_result(name: str) -> dict[str, Any]:
    """A result fixture as fast transcription answers it: phrases in milliseconds, speakers from 0,
    combined phrases per channel only when channels were asked for."""
    result = json.loads((FIXTURES / name).read_text())
    phrases = []
    for item in result["recognizedPhrases"]:
        if item["recognitionStatus"] != "Success":
            continue  # fast transcription lists only what it recognized
        if "offsetInTicks" in item:
            offset, duration = item["offsetInTicks"] / 10_000, item["durationInTicks"] / 10_000
        else:
            offset, duration = iso_seconds(item["offset"])[0] * 1000, iso_seconds(item["duration"])[0] * 1000
        phrase: dict[str, Any] = {
            "offsetMilliseconds": round(offset),
            "durationMilliseconds": round(duration),
            "text": item["nBest"][0]["display"],
            "locale": "en-US",
            "confidence": item["nBest"][0]["confidence"],
        }
        if "speaker" in item:
            phrase |= {"channel": 0, "speaker": item["speaker"] - 1}
        elif name == "result_stereo.json":
            phrase["channel"] = item["channel"]
        phrases.append(phrase)
    combined = [
        {"channel": c["channel"], "text": c["display"]} if name == "result_stereo.json" else {"text": c["display"]}
        for c in result["combinedRecognizedPhrases"]
    ]
    return {"durationMilliseconds": result["durationMilliseconds"], "combinedPhrases": combined, "phrases": phrases}


@dataclass
class FakeAzureSpeech(FakeVendorWithCallbacks[Submission, CallbackAttempt]):
    """Azure's batch and fast transcription, transcription list, files and locales; records what it
    was sent and did."""

    api_key: str = "azure-speech-test-key"
    fast: list[FastTranscription] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)  # the path of every API GET, in order
    content_reads: list[tuple[str, bool]] = field(default_factory=list)  # result file GETs: (path, sent the key)
    web_hook: tuple[str, str] | None = None  # the Speech resource's registered web hook: (URL, secret)
    page_size: int = 100  # the most a list page holds, whatever `top` asks for

    def register_web_hook(self, url: str, secret: str) -> None:
        """What `POST /webhooks` does once per Speech resource: every transcription's completion goes there."""
        self.web_hook = (url, secret)

    def start(self) -> FakeAzureSpeech:
        fake = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                parts = urlsplit(self.path)
                reply: Reply | None
                if dict(parse_qsl(parts.query)).get("api-version") != API_VERSION:
                    reply = Reply(404, _gateway_error(404))
                elif parts.path == f"{API}/transcriptions:submit":
                    reply = fake.submit(headers, body)
                elif parts.path == f"{API}/transcriptions:transcribe":
                    reply = fake.transcribe(headers, body)
                else:
                    reply = Reply(404, _gateway_error(404))
                if reply is not None:
                    self.send_reply(reply)  # else: drop the connection; the client sees no answer

            def do_GET(self) -> None:  # noqa: N802
                headers = {k.lower(): v for k, v in self.headers.items()}
                self.send_reply(fake.read(self.path, headers))

        return self._serve(Handler)

    # --- batch transcription ----------------------------------------------------------------------

    def submit(self, headers: Mapping[str, str], body: bytes) -> Reply | None:
        """Record a submission and answer it (None: close the connection without an answer)."""
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        submission = Submission(
            body=parsed if isinstance(parsed, dict) else {},
            key=headers.get(KEY_HEADER),
            transcription_id=str(uuid.uuid4()),
            time=time.time(),
        )
        with self._lock:
            self.submissions.append(submission)
        reply = self._refusal(submission, parsed)
        if reply is not None:
            submission.answered = reply.status
            return reply
        dropped = self._accept(submission)
        entity = self.entity(submission)
        return None if dropped else Reply(201, entity, {"Location": entity["self"]})

    def _refusal(self, submission: Submission, parsed: Any) -> Reply | None:
        """Why this submission is not taken, as Azure would answer it; None to take it."""
        if submission.key != self.api_key:
            return Reply(401, _gateway_error(401))
        failure = self._queued_failure(_gateway_error)
        if failure is not None:
            return failure
        if not isinstance(parsed, dict):
            return _invalid("The request body is not a transcription.")
        for name in ("displayName", "locale"):
            if not isinstance(parsed.get(name), str) or not parsed[name]:
                return _invalid(f"The {name} property is required.")
        urls = parsed.get("contentUrls")
        if not isinstance(urls, list) or not 1 <= len(urls) <= 1000 or not all(isinstance(u, str) for u in urls):
            return _invalid("Either contentUrls (1 to 1000 URLs) or contentContainerUrl is required.")
        problem = _properties_problem(parsed.get("properties"), parsed["locale"])
        if problem is None:
            problem = _custom_properties_problem(parsed.get("customProperties"))
        return None if problem is None else _invalid(problem)

    def _process(self, submission: Submission) -> None:
        """Fetch the audio, run, end; then post the web hook, if the resource has one."""
        self._fetch(submission)
        submission.status = "Running"
        if self._stopping.wait(self.callback_delay) or not self._processing_ends():
            return
        submission.error = submission.fetch_error or self.job_failure
        submission.status = "Failed" if submission.error else "Succeeded"
        submission.completed = time.time()
        if self.web_hook is None:
            return  # nobody to tell: the transcription shows it
        url, secret = self.web_hook
        data = json.dumps(self.entity(submission)).encode()
        signature = base64.b64encode(hmac.new(secret.encode(), data, hashlib.sha256).digest()).decode()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "X-MicrosoftSpeechServices-Event": "TranscriptionCompletion",
            "X-MicrosoftSpeechServices-Signature": signature,
        }

        def attempt(status: int | None, moment: float) -> CallbackAttempt:
            return CallbackAttempt(submission.transcription_id, url, dict(headers), data, status, moment)

        self._deliver(url, data, headers, attempt)

    def _fetch(self, submission: Submission) -> None:
        url = submission.body["contentUrls"][0]
        try:
            with AUDIO_OPENER.open(url, timeout=5) as response:
                audio = response.read()
        except (OSError, ValueError) as error:
            reason = f"HTTP {error.code}" if isinstance(error, urllib.error.HTTPError) else type(error).__name__
            submission.fetch_error = f"The audio could not be downloaded from the content URL ({reason})."
            return
        submission.audio_size, submission.audio_sha256 = len(audio), hashlib.sha256(audio).hexdigest()

    def entity(self, submission: Submission) -> dict[str, Any]:
        """The transcription as `GET /transcriptions/{id}` shows it now (contentUrls are never shown)."""
        base = f"{self.url}{API}/transcriptions/{submission.transcription_id}"
        properties = dict(submission.properties)
        if submission.status == "Succeeded":
            properties["durationMilliseconds"] = 6300
        if submission.status == "Failed":
            properties["error"] = {"code": "InvalidData", "message": submission.error}
        body = submission.body
        return {
            "self": f"{base}?api-version={API_VERSION}",
            "model": {
                "self": f"{self.url}{API}/models/base/aaa321e9-5a4e-4db1-88a2-f251bbe7b555?api-version={API_VERSION}"
            },
            "links": {"files": f"{base}/files?api-version={API_VERSION}"},
            "properties": properties,
            "lastActionDateTime": _time(submission.completed or submission.time),
            "status": submission.status,
            "createdDateTime": _time(submission.time),
            "locale": body.get("locale"),
            "displayName": body.get("displayName"),
            "customProperties": body.get("customProperties") or {},
        }

    # --- fast transcription -----------------------------------------------------------------------

    def transcribe(self, headers: Mapping[str, str], body: bytes) -> Reply | None:
        definition_text, audio, filename, media_type = _multipart(headers.get("content-type", ""), body)
        try:
            definition = json.loads(definition_text) if definition_text is not None else None
        except ValueError:
            definition = None
        fast = FastTranscription(
            definition=definition if isinstance(definition, dict) else {},
            key=headers.get(KEY_HEADER),
            audio_filename=filename,
            audio_content_type=media_type,
        )
        if audio:
            fast.audio_size, fast.audio_sha256 = len(audio), hashlib.sha256(audio).hexdigest()
        with self._lock:
            self.fast.append(fast)
            dropped = self._drops > 0
            self._drops -= 1 if dropped else 0
        reply = self._fast_refusal(fast, definition, audio)
        if reply is None:
            stereo = fast.definition.get("channels") == [0, 1]
            reply = Reply(200, fast_result("result_stereo.json" if stereo else "result_diarized.json"))
        fast.answered = None if dropped and reply.status == 200 else reply.status
        return None if fast.answered is None else reply

    def _fast_refusal(self, fast: FastTranscription, definition: Any, audio: bytes | None) -> Reply | None:
        if fast.key != self.api_key:
            return Reply(401, _gateway_error(401))
        failure = self._queued_failure(_gateway_error)
        if failure is not None:
            return failure
        if not audio:
            return _invalid("The audio part is required.", "MissingAudio")
        if not isinstance(definition, dict):
            return _invalid("The definition part is not a JSON object.")
        locales = definition.get("locales", [])
        if not isinstance(locales, list) or any(locale not in FAST_LOCALES for locale in locales):
            return _invalid(f"Unsupported locales {locales!r} for fast transcription.", "UnsupportedLanguageCode")
        channels = definition.get("channels")
        if channels is not None and (
            not isinstance(channels, list) or not 1 <= len(channels) <= 2 or not set(channels) <= {0, 1}
        ):
            return _invalid("Up to two channels, 0 and 1, can be transcribed separately.")
        diarization = definition.get("diarization")
        if diarization is not None:
            problem = _diarization_problem(diarization)
            if problem is not None:
                return _invalid(problem)
            if diarization.get("enabled") and channels is not None and len(channels) > 1:
                return _invalid("Diarization of multiple channels is not supported.")
        return None

    # --- reading ----------------------------------------------------------------------------------

    def read(self, path: str, headers: Mapping[str, str]) -> Reply:
        """Transcriptions, their files, the result files, the list and the locales."""
        parts = urlsplit(path)
        query = dict(parse_qsl(parts.query))
        if parts.path.startswith("/results/"):  # a SAS URL: no key asked for
            return self._result(parts.path, KEY_HEADER in headers)
        if query.get("api-version") != API_VERSION:
            return Reply(404, _gateway_error(404))
        if headers.get(KEY_HEADER) != self.api_key:
            return Reply(401, _gateway_error(401))
        with self._lock:
            self.reads.append(parts.path)
        segments = parts.path.removeprefix(API).strip("/").split("/")
        if segments == ["transcriptions", "locales"]:
            return Reply(200, {"Submit": SUBMIT_LOCALES, "Transcribe": FAST_LOCALES})
        if segments == ["transcriptions"]:
            return self._list(query)
        if len(segments) in (2, 3) and segments[0] == "transcriptions":
            found = self._accepted(segments[1])
            if found is None:
                return Reply(404, {"code": "NotFound", "message": "The specified entity cannot be found."})
            if len(segments) == 2:
                return Reply(200, self.entity(found))
            if segments[2] == "files":
                return Reply(200, self._files(found))
        return Reply(404, _gateway_error(404))

    def _accepted(self, transcription_id: str) -> Submission | None:
        with self._lock:
            found = [s for s in self.submissions if s.accepted and s.transcription_id == transcription_id]
        return found[0] if found else None

    def _files(self, submission: Submission) -> dict[str, Any]:
        if submission.status != "Succeeded":
            return {"values": []}
        base = f"{self.url}{API}/transcriptions/{submission.transcription_id}/files"
        sas = "?sv=2023-11-03&sr=b&sp=rl&sig=TESTSIG"

        def file(name: str, kind: str, content: str) -> dict[str, Any]:
            return {
                "self": f"{base}/{uuid.uuid5(uuid.NAMESPACE_URL, content)}?api-version={API_VERSION}",
                "name": name,
                "kind": kind,
                "properties": {"size": 3407},
                "createdDateTime": _time(submission.completed or submission.time),
                "links": {"contentUrl": f"{self.url}{content}{sas}"},
            }

        return {
            "values": [
                file("report.json", "TranscriptionReport", f"/results/{submission.transcription_id}_report.json"),
                file("contenturl_0.json", "Transcription", f"/results/{submission.transcription_id}_0_0.json"),
            ]
        }

    def _result(self, path: str, sent_key: bool) -> Reply:
        with self._lock:
            self.content_reads.append((path, sent_key))
        name = path.removeprefix("/results/")
        found = self._accepted(name.split("_")[0])
        if found is None or found.status != "Succeeded":
            return Reply(404, b"<Error><Code>BlobNotFound</Code></Error>")
        if name.endswith("_report.json"):
            return Reply(200, {"successfulTranscriptionsCount": 1, "failedTranscriptionsCount": 0, "details": []})
        result = json.loads(
            (FIXTURES / ("result_diarized.json" if found.diarized else "result_stereo.json")).read_text()
        )
        result["source"] = found.body["contentUrls"][0]
        return Reply(200, result)

    def _list(self, query: dict[str, str]) -> Reply:
        try:
            top, skip = int(query.get("top", "100")), int(query.get("skip", "0"))
        except ValueError:
            return _invalid("skip and top must be integers.", "InvalidParameterValue")
        if not 1 <= top <= 100 or skip < 0:
            return _invalid("top must be from 1 to 100 and skip at least 0.", "InvalidParameterValue")
        since = None
        if "filter" in query:
            field_name, _, rest = query["filter"].partition(" ge ")
            since = _moment(rest.strip()) if field_name.strip() == "createdDateTime" else None
            if since is None:
                return _invalid(f"This fake filters by 'createdDateTime ge <time>' only, not {query['filter']!r}.")
        with self._lock:
            listed = [s for s in reversed(self.submissions) if s.accepted and (since is None or s.time >= since - 1)]
        size = min(top, self.page_size)
        page = listed[skip : skip + size]
        body: dict[str, Any] = {"values": [self.entity(s) for s in page]}
        if skip + size < len(listed):
            following = {k: v for k, v in query.items() if k not in ("skip", "top")}
            following |= {"skip": str(skip + size), "top": str(size)}
            body["@nextLink"] = f"{self.url}{API}/transcriptions?{urlencode(following)}"
        return Reply(200, body)


def _properties_problem(properties: Any, locale: str) -> str | None:
    if not isinstance(properties, dict):
        return "The properties property is required."
    hours = properties.get("timeToLiveHours")
    if type(hours) is not int or not 6 <= hours <= 744:
        return "properties.timeToLiveHours is required: from 6 hours to 31 days."
    channels = properties.get("channels")
    if channels is not None and (not isinstance(channels, list) or not all(type(c) is int for c in channels)):
        return "properties.channels must be a list of channel numbers."
    if "diarization" in properties:
        problem = _diarization_problem(properties["diarization"])
        if problem is not None:
            return problem
    identification = properties.get("languageIdentification")
    if identification is not None:
        candidates = identification.get("candidateLocales") if isinstance(identification, dict) else None
        if not isinstance(candidates, list) or not 2 <= len(candidates) <= 10 or locale not in candidates:
            return (
                "languageIdentification.candidateLocales takes 2 to 10 locales, the transcription's locale among them."
            )
    return None


def _diarization_problem(diarization: Any) -> str | None:
    if not isinstance(diarization, dict) or not isinstance(diarization.get("enabled", False), bool):
        return "diarization must be an object with enabled (a boolean) and maxSpeakers."
    speakers = diarization.get("maxSpeakers")
    if speakers is not None and (type(speakers) is not int or not 2 <= speakers <= 35):
        return "diarization.maxSpeakers must be greater than 1 and less than 36."
    return None


def _custom_properties_problem(custom: Any) -> str | None:
    if custom is None:
        return None
    if not isinstance(custom, dict) or len(custom) > 10:
        return "customProperties takes at most 10 entries."
    for key, value in custom.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 256:
            return "customProperties keys take up to 64 characters, values are strings of up to 256."
    return None


def _multipart(content_type: str, body: bytes) -> tuple[str | None, bytes | None, str | None, str | None]:
    """The `definition` text, the `audio` bytes, its filename and its content type of a multipart body."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    definition = audio = filename = media_type = None
    if message.is_multipart():
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if name == "definition" and isinstance(payload, bytes):
                definition = payload.decode("utf-8", "replace")
            elif name == "audio" and isinstance(payload, bytes):
                audio, filename, media_type = payload, part.get_filename(), part.get_content_type()
    return definition, audio, filename, media_type

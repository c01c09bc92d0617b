"""Azure AI Speech (contract §10): batch transcription for a recording Azure can fetch, fast
transcription for one it cannot.

Batch transcription (`POST /speechtotext/transcriptions:submit`, GA API version 2024-11-15, the
first with fast transcription) takes recordings by URL only. Azure calls no URL per job: its web
hooks are registered once per Speech resource and signed with the web hook's secret
(X-MicrosoftSpeechServices-Signature, B24SCRIBE_AZURE_WEBHOOK_SECRET), which /hooks/stt/azure
verifies. So the call travels in the transcription's `customProperties` (b24scribe_pbx,
b24scribe_call, b24scribe_portal), which the web hook body carries back and which `find` matches in
the transcription list. Without a web hook the job still ends: when the callback wait is over,
`status` reads the transcription and hands the hook the entity the web hook would have carried.

Fast transcription (`POST /speechtotext/transcriptions:transcribe`) takes the bytes and answers with
the transcript itself (`TranscribesAtOnce`); its phrases are handed to the hook in the shape of a
batch result file, which /hooks/stt/azure reads as is. It makes no job: a lost answer is asked again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import requests
from requests_toolbelt import MultipartEncoder

from b24scribe.callbacks import CredentialPlace
from b24scribe.delivery.submit import (
    AnswerLost,
    JobStatus,
    Submission,
    VendorError,
    VendorRejected,
    VendorUnavailable,
    _get,
    _key_and_api,
    _media_filename,
    _post,
    classify,
)
from b24scribe.settings import Settings

API_VERSION = "2024-11-15"
KEY_HEADER = "Ocp-Apim-Subscription-Key"
_REGION = re.compile(r"[a-z0-9]{2,40}")
TICKS_PER_MILLISECOND = 10_000  # the result file's unit is 100 ns
MAX_LOCALES = 10  # Azure's language identification takes 2 to 10 candidate locales
MAX_PROPERTY_VALUE = 256  # characters of a customProperties value
MAX_LIST_PAGES = 100  # `@nextLink` pages of the transcription list followed at most


class Azure:
    """Azure AI Speech: batch transcription of a URL (the call in `customProperties`, the result by
    the resource's web hook or by `status`), fast transcription of bytes (the transcript at once).
    Stereo recordings are transcribed channel by channel (`channels: [0, 1]`), mono ones diarized.
    B24SCRIBE_AZURE_LOCALE names the language (default en-US); several, comma-separated, let Azure
    identify which one each call is in (the first is the main one)."""

    name = "azure"
    # Azure calls no per-call URL back (its web hook is the resource's, signed with its own secret):
    # the URL b24scribe makes for the call carries no credential and is never sent
    credential: CredentialPlace = "header"
    # the web hook belongs to the Speech resource and may not be registered: the job is asked how it
    # stands a minute after the submission, then after as long again as it has taken so far
    poll_seconds = 60.0
    # long enough for the callback wait, a status check and a fetch retried over hours; short enough
    # not to keep call transcripts at Azure for weeks (Azure takes 6 to 744, recommends 48)
    time_to_live_hours = 48
    max_speakers = 2  # a phone call
    # fast transcription answers only once the whole recording is transcribed (faster than real time)
    fast_timeout_seconds = 300.0

    def _api(self, settings: Settings) -> tuple[str, dict[str, str]]:
        """`…/speechtotext` on B24SCRIBE_AZURE_API_URL, else the region's host (as /hooks/stt/azure
        fetches from), and the key's header."""
        region = (settings.vendor_setting(self.name, "region") or "").strip().lower()
        default = f"https://{region}.api.cognitive.microsoft.com" if _REGION.fullmatch(region) else ""
        api, key = _key_and_api(settings, self.name, default)
        if not api:
            raise VendorRejected(
                "set B24SCRIBE_AZURE_API_URL (https://<region>.api.cognitive.microsoft.com) or B24SCRIBE_AZURE_REGION"
            )
        return f"{api}/speechtotext", {KEY_HEADER: key}

    def _locales(self, settings: Settings) -> list[str]:
        raw = (settings.vendor_setting(self.name, "locale") or "en-US").replace(",", " ").split()
        locales = list(dict.fromkeys(raw)) or ["en-US"]
        if len(locales) > MAX_LOCALES:
            raise VendorRejected(f"B24SCRIBE_AZURE_LOCALE names more than {MAX_LOCALES} locales")
        return locales

    # --- batch transcription ----------------------------------------------------------------------

    def submit(self, http: requests.Session, settings: Settings, submission: Submission) -> str:
        if submission.url is None:  # bytes go to `transcribe_now`
            raise VendorRejected("azure batch transcription takes a recording by URL only")
        api, headers = self._api(settings)
        locales = self._locales(settings)
        properties: dict[str, Any] = {"timeToLiveHours": self.time_to_live_hours, "wordLevelTimestampsEnabled": False}
        if submission.channels == 2:
            properties["channels"] = [0, 1]
        else:
            properties["diarization"] = {"enabled": True, "maxSpeakers": self.max_speakers}
        if len(locales) > 1:
            properties["languageIdentification"] = {"candidateLocales": locales}
        custom = self._custom_properties(submission.metadata)
        body = {
            "displayName": f"b24scribe {custom.get('b24scribe_pbx', '')} {custom.get('b24scribe_call', '')}",
            "locale": locales[0],
            "contentUrls": [submission.url],
            "properties": properties,
            "customProperties": custom,
        }
        url = f"{api}/transcriptions:submit?{urlencode({'api-version': API_VERSION})}"
        answer = _post(http, self.name, url, settings.vendor_timeout_seconds, headers=headers, json=body)
        if answer.status_code not in (200, 201):
            raise self._refusal(answer)
        try:
            entity = answer.json()
        except ValueError:
            entity = None
        job_id = _transcription_id(entity.get("self") if isinstance(entity, dict) else None)
        if job_id is None:  # Azure took it: as good as lost, look it up before sending it again
            raise AnswerLost(f"azure answered HTTP {answer.status_code} without the transcription's self")
        return job_id

    def _custom_properties(self, metadata: tuple[tuple[str, str], ...]) -> dict[str, str]:
        """The call as the transcription's customProperties (what /hooks/stt/azure reads back)."""
        if any(len(value) > MAX_PROPERTY_VALUE for _, value in metadata):
            raise VendorRejected(f"the call's reference is longer than Azure's {MAX_PROPERTY_VALUE}-character property")
        return dict(metadata)

    def find(
        self, http: requests.Session, settings: Settings, metadata: tuple[tuple[str, str], ...], since: float
    ) -> str | None:
        wanted = self._custom_properties(metadata)
        for entity in self._listed_since(http, settings, since - 60):
            custom = entity.get("customProperties")
            if not isinstance(custom, dict):
                continue
            ours = {key: value for key, value in custom.items() if str(key).startswith("b24scribe_")}
            job_id = _transcription_id(entity.get("self"))
            if ours == wanted and job_id is not None:
                return job_id
        return None

    def _listed_since(self, http: requests.Session, settings: Settings, since: float) -> Iterator[dict[str, Any]]:
        """The transcriptions created since `since`, page by page; a next page is asked only of the
        configured API (the key goes with it)."""
        api, headers = self._api(settings)
        start = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        query = {"api-version": API_VERSION, "filter": f"createdDateTime ge {start}", "top": "100"}
        url = f"{api}/transcriptions?{urlencode(query, quote_via=quote)}"
        for _ in range(MAX_LIST_PAGES):
            page = self._read(http, settings, url, headers, "transcription list")
            values = page.get("values") if isinstance(page, dict) else None
            if not isinstance(values, list):
                raise VendorUnavailable("azure's transcription list answered unexpected JSON")
            yield from (entity for entity in values if isinstance(entity, dict))
            next_link = page.get("@nextLink")
            if not isinstance(next_link, str) or not next_link:
                return
            url = _on_api(next_link, api)
        raise VendorUnavailable(f"azure's transcription list goes on for more than {MAX_LIST_PAGES} pages")

    def status(self, http: requests.Session, settings: Settings, job_id: str) -> JobStatus:
        """`GET /transcriptions/{id}`: `NotStarted` and `Running` are still processing, `Succeeded` is
        done (the web hook's body: the transcription itself, whose files the hook then fetches),
        `Failed` failed with `properties.error.message` (else its `code`)."""
        api, headers = self._api(settings)
        url = f"{api}/transcriptions/{quote(job_id, safe='')}?{urlencode({'api-version': API_VERSION})}"
        entity = self._read(http, settings, url, headers, "transcription")
        state = entity.get("status") if isinstance(entity, dict) else None
        if state == "Succeeded":
            return JobStatus("done", callback=json.dumps(entity).encode())
        if state in ("NotStarted", "Running"):
            return JobStatus("processing")
        if state == "Failed":
            return JobStatus("failed", _failure_reason(entity))
        raise VendorUnavailable(f"azure's transcription answered an unknown status {str(state)[:50]!r}")

    def check(self, http: requests.Session, settings: Settings) -> None:
        """The locales batch and fast transcription take: read-only, and only a working key reads them."""
        api, headers = self._api(settings)
        self._read(http, settings, f"{api}/transcriptions/locales?api-version={API_VERSION}", headers, "locales")

    # --- fast transcription -----------------------------------------------------------------------

    def transcribe_now(self, http: requests.Session, settings: Settings, submission: Submission) -> list[JobStatus]:
        """A recording Azure cannot fetch: its bytes to fast transcription, streamed from the file,
        and the transcript as the result file /hooks/stt/azure reads. A URL goes to `submit`."""
        if submission.path is None:
            return []
        api, headers = self._api(settings)
        stereo = submission.channels == 2
        definition: dict[str, Any] = {"locales": self._locales(settings)}
        if stereo:
            definition["channels"] = [0, 1]
        else:
            definition["diarization"] = {"enabled": True, "maxSpeakers": self.max_speakers}
        url = f"{api}/transcriptions:transcribe?{urlencode({'api-version': API_VERSION})}"
        timeout = max(settings.vendor_timeout_seconds, self.fast_timeout_seconds)
        with submission.path.open("rb") as file:
            media_type = submission.content_type or "audio/wav"
            audio = (_media_filename(media_type), file, media_type)
            encoder = MultipartEncoder(fields=[("audio", audio), ("definition", json.dumps(definition))])
            upload = {**headers, "Content-Type": encoder.content_type, "Content-Length": str(encoder.len)}
            try:
                answer = _post(http, self.name, url, timeout, headers=upload, data=encoder)
            except AnswerLost as error:
                raise VendorUnavailable(f"{error} (fast transcription keeps no job: it is asked again)") from None
        if answer.status_code != 200:
            raise self._refusal(answer)
        try:
            result = answer.json()
        except ValueError:
            raise VendorUnavailable("azure's fast transcription answered something that is not JSON") from None
        if not isinstance(result, dict):
            raise VendorUnavailable("azure's fast transcription answered unexpected JSON")
        return [JobStatus("done", callback=json.dumps(as_result_file(result, stereo)).encode())]

    # --- answers ----------------------------------------------------------------------------------

    def _read(self, http: requests.Session, settings: Settings, url: str, headers: dict[str, str], what: str) -> Any:
        """A read-only GET's JSON (a VendorError otherwise, with Azure's own message)."""
        return _get(http, self.name, url, headers, settings.vendor_timeout_seconds, what, refuse=self._refusal)

    def _refusal(self, answer: requests.Response) -> VendorError:
        """`classify`, with the message of Azure's nested error body (`{"error": {"code", "message"}}`,
        as its gateway answers a wrong key or an exhausted quota), which `classify` does not read."""
        try:
            body = answer.json()
        except ValueError:
            body = None
        nested = body.get("error") if isinstance(body, dict) else None
        message = nested.get("message") if isinstance(nested, dict) else None
        return classify(self.name, answer, message if isinstance(message, str) else None)


def as_result_file(result: dict[str, Any], stereo: bool) -> dict[str, Any]:
    """A fast transcription's answer as a batch transcription result file: each phrase one
    `recognizedPhrases` item (milliseconds as ticks of 100 ns, speakers counted from 1 as the batch
    file counts them; fast transcription counts from 0), and for a stereo recording both channels
    in `combinedRecognizedPhrases`, so a channel that said nothing still makes the call stereo.
    Values of the wrong type are kept as they are: the hook's parse names them."""
    phrases = []
    for phrase in result.get("phrases") or []:
        if not isinstance(phrase, dict):
            phrases.append(phrase)
            continue
        item: dict[str, Any] = {
            "recognitionStatus": "Success",
            "channel": phrase.get("channel", 0),
            "offsetInTicks": _ticks(phrase.get("offsetMilliseconds")),
            "durationInTicks": _ticks(phrase.get("durationMilliseconds")),
            "nBest": [{"display": phrase.get("text"), "confidence": phrase.get("confidence")}],
        }
        speaker = phrase.get("speaker")
        if speaker is not None:
            item["speaker"] = speaker + 1 if type(speaker) is int else speaker
        phrases.append(item)
    combined = [item for item in result.get("combinedPhrases") or [] if isinstance(item, dict)]
    texts = {item.get("channel", 0): item.get("text") for item in combined}
    channels = [0, 1] if stereo else sorted(channel for channel in texts if type(channel) is int)[:1] or [0]
    return {
        "durationMilliseconds": result.get("durationMilliseconds"),
        "combinedRecognizedPhrases": [
            {"channel": channel, "display": texts.get(channel) or ""} for channel in channels
        ],
        "recognizedPhrases": phrases,
    }


def _ticks(milliseconds: Any) -> Any:
    if type(milliseconds) in (int, float):
        return milliseconds * TICKS_PER_MILLISECOND
    return milliseconds


def _transcription_id(url: Any) -> str | None:
    """The transcription id: the last path segment of its `self`, `…/transcriptions/<id>`."""
    if not isinstance(url, str):
        return None
    try:
        segments = urlsplit(url).path.rstrip("/").split("/")
    except ValueError:
        return None
    if len(segments) < 2 or segments[-2] != "transcriptions" or not segments[-1]:
        return None
    return segments[-1]


def _failure_reason(entity: dict[str, Any]) -> str:
    properties = entity.get("properties")
    error = properties.get("error") if isinstance(properties, dict) else None
    if isinstance(error, dict):
        message, code = error.get("message"), error.get("code")
        if isinstance(message, str) and message.strip():
            return message.strip()
        if isinstance(code, str) and code.strip():
            return f"error code {code.strip()}"
    return "no reason given"


def _on_api(url: str, api: str) -> str:
    """`url` when it is on the configured API (scheme, host, port and path prefix): the key goes there."""
    allowed = urlsplit(api)
    try:
        given = urlsplit(url)
        same = (
            given.scheme.lower() == allowed.scheme.lower()
            and given.netloc.lower() == allowed.netloc.lower()
            and given.path.startswith(allowed.path.rstrip("/") + "/")
        )
    except ValueError:
        same = False
    if not same:
        raise VendorUnavailable("azure's transcription list named a next page outside the configured API")
    return url

"""Submitting a call's recording to an STT vendor (contract §10): what a submission is, how a vendor's
answer is classified, and each vendor's request.

A submitter sends one recording (by URL when the vendor can fetch it, else the downloaded bytes) with
a callback URL that names the call and carries its credential (`b24scribe.callbacks`), and returns
the vendor's job id. When an earlier attempt's answer was lost, `find` asks the vendor whether that
submission arrived (by the marker it carried), so a retry never makes a second vendor job. A vendor
that can say how a job stands (`AsksStatus`: AssemblyAI, Rev.ai) is asked when its callback does
not come in time, and answers with the callback it would have sent.

Failure policy, the same for every vendor: a 429 waits for its Retry-After (no attempt spent), a 5xx
or no connection is retried on the schedule, another 4xx is shown on the call and not retried, and
an answer lost after the request went out is looked up with `find` before anything is sent again.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import mimetypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit, urlunsplit

import requests
from requests_toolbelt import MultipartEncoder

from b24scribe.callbacks import CredentialPlace, callback_url, header_credential
from b24scribe.settings import Settings

DEFAULT_RETRY_AFTER_SECONDS = 30.0
MAX_RETRY_AFTER_SECONDS = 3600.0


class VendorError(Exception):
    """The vendor did not take the submission; `str()` is one line for the call's page."""


class VendorBusy(VendorError):
    """429: try again after `retry_after` seconds (no attempt spent)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class VendorRejected(VendorError):
    """A 4xx: the vendor will not take this submission as it is (the key, the file): shown on the call."""


class VendorUnavailable(VendorError):
    """A 5xx or no connection: nothing was taken; retried on the schedule."""


class AnswerLost(VendorError):
    """The submission went out and no answer came back: it may have made a vendor job (look it up first)."""


@dataclass(frozen=True, slots=True)
class Submission:
    """One call's recording as a vendor gets it."""

    # the call, as the vendor's metadata carries it back (b24scribe_pbx, b24scribe_call, b24scribe_portal):
    # the callback names its call even without its query, and `find` looks for it in the vendor's log
    metadata: tuple[tuple[str, str], ...]
    callback_url: str
    channels: int  # 2: one speaker per channel (stereo); 1: diarize
    url: str | None = None  # the vendor fetches it
    path: Path | None = None  # else the bytes, from the downloaded file
    content_type: str | None = None


class Submitter(Protocol):
    name: str
    # where the callback's credential travels: in the URL's userinfo (Deepgram sends it back as Basic
    # credentials), or in a header of the vendor's own ("header": the URL then carries none)
    credential: CredentialPlace

    def submit(self, http: requests.Session, settings: Settings, submission: Submission) -> str:
        """Send the submission; the vendor's job id (a VendorError otherwise)."""
        ...

    def find(
        self, http: requests.Session, settings: Settings, metadata: tuple[tuple[str, str], ...], since: float
    ) -> str | None:
        """The job id of a submission carrying `metadata` made since `since`, if the vendor has one."""
        ...

    def check(self, http: requests.Session, settings: Settings) -> None:
        """A harmless request that proves the key works (a VendorError otherwise)."""
        ...


@dataclass(frozen=True, slots=True)
class JobStatus:
    """How a submitted job stands, by the vendor's own word (its callback did not come in time)."""

    state: Literal["done", "processing", "failed"]
    reason: str = ""  # failed: the vendor's reason, for the call's page
    # done: the body the vendor's callback carries for this job, in the vendor's own shape (stored as
    # if posted, so the transcript comes the way a callback's does) ...
    callback: bytes = b""
    # ... and what the vendor's callback URL adds to the query naming the call (Rev.ai's stereo
    # `speaker_channels_count=2`)
    query: tuple[tuple[str, str], ...] = ()


@runtime_checkable
class AsksStatus(Protocol):
    """A submitter whose vendor tells how a job stands (Deepgram cannot, for a callback request)."""

    def status(self, http: requests.Session, settings: Settings, job_id: str) -> JobStatus:
        """The job's state (a VendorError when the vendor could not say)."""
        ...


@runtime_checkable
class TranscribesAtOnce(Protocol):
    """A vendor that answers with the transcript itself instead of calling back (OpenAI, which has no
    callbacks; Azure's fast transcription for a recording it cannot fetch). The worker waits for it,
    and each part it returns is stored as if the vendor had posted it to its hook."""

    def transcribe_now(self, http: requests.Session, settings: Settings, submission: Submission) -> list[JobStatus]:
        """The transcript as the callbacks the vendor would have posted ("done" parts: one per
        channel for a vendor transcribed channel by channel, with `?channel=`/`&parts=` in their
        query), or [] when this submission goes through `submit` and a callback instead.
        VendorError as for `submit`."""
        ...


@runtime_checkable
class ReportsCost(Protocol):
    """A vendor that says what a finished job cost (Deepgram's request log), passed to Bitrix24 as
    the transcript's COST/COST_CURRENCY."""

    def cost(self, http: requests.Session, settings: Settings, job_id: str) -> tuple[float, str] | None:
        """The job's cost and its currency code; None when the vendor does not say (yet). A
        VendorError when it could not be asked: the transcript goes without a cost then."""
        ...


def takes_urls(submitter: Submitter) -> bool:
    """Whether the vendor can be sent a URL to fetch (else it always gets the bytes)."""
    return bool(getattr(submitter, "fetches_urls", True))


def fetchable(url: str) -> bool:
    """Whether a vendor on the internet can fetch this URL itself: a public host name or address
    (not this machine, not a private network, not a single-label intranet name)."""
    host = (urlsplit(url).hostname or "").lower()
    if not host or host == "localhost" or host.endswith((".local", ".internal", ".lan")):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "." in host
    return address.is_global


def _retry_after(answer: requests.Response) -> float:
    try:
        seconds = float(answer.headers.get("Retry-After", ""))
    except ValueError:
        return DEFAULT_RETRY_AFTER_SECONDS
    return min(max(seconds, 1.0), MAX_RETRY_AFTER_SECONDS) if seconds == seconds else DEFAULT_RETRY_AFTER_SECONDS


def _key_and_api(settings: Settings, vendor: str, default_api: str) -> tuple[str, str]:
    """The vendor's API base (B24SCRIBE_<VENDOR>_API_URL, else its public one) and key (VendorRejected
    naming B24SCRIBE_<VENDOR>_API_KEY when it is not set)."""
    key = settings.vendor_setting(vendor, "api_key")
    if not key:
        raise VendorRejected(f"B24SCRIBE_{vendor.upper()}_API_KEY is not set")
    return (settings.vendor_setting(vendor, "api_url") or default_api).rstrip("/"), key


def classify(vendor: str, answer: requests.Response, message: str | None = None) -> VendorError:
    """A vendor's error answer as what to do about it. `message`: the vendor's own words, for an
    error body shaped otherwise than the flat keys read here (Azure's and OpenAI's nested `error`)."""
    detail = ""
    try:
        body = answer.json()
        if isinstance(body, dict):
            parts = [body.get(k) for k in ("err_code", "err_msg", "error", "message", "title", "detail")]
            detail = ": " + " ".join(str(p) for p in parts if isinstance(p, str | int))[:300]
    except ValueError:
        pass
    if message and message.strip():
        detail = ": " + message.strip()[:300]
    message = f"{vendor} answered HTTP {answer.status_code}{detail}"
    if answer.status_code == 429:
        return VendorBusy(message, _retry_after(answer))
    if answer.status_code >= 500 or answer.status_code == 408:
        return VendorUnavailable(message)
    return VendorRejected(message)


def _post(http: requests.Session, vendor: str, url: str, timeout: float, **kwargs: object) -> requests.Response:
    """POST, telling a refused connection (nothing sent) from a lost answer (maybe taken)."""
    try:
        return http.post(url, timeout=(min(timeout, 10.0), timeout), allow_redirects=False, **kwargs)  # type: ignore[arg-type]
    except requests.ConnectTimeout:
        raise VendorUnavailable(f"{vendor} could not be reached") from None
    except requests.ConnectionError as error:
        text = repr(error)
        if "NewConnectionError" in text or "Connection refused" in text or "NameResolutionError" in text:
            raise VendorUnavailable(f"{vendor} could not be reached") from None
        raise AnswerLost(f"{vendor}'s answer was lost ({type(error).__name__})") from None
    except requests.Timeout:
        raise AnswerLost(f"no answer from {vendor} within {timeout:g} s") from None


class Deepgram:
    """Deepgram pre-recorded `/v1/listen` with `callback` (Deepgram posts the whole result there, with
    the Basic credentials of the callback URL), `utterances`, `punctuate`, and `multichannel` for a
    stereo recording or `diarize` for a mono one; `extra=b24scribe_pbx:…&extra=b24scribe_call:…` is
    echoed back in `metadata.extra` (the call, even without the callback's query) and shows in the
    project's request log, where `find` looks for it."""

    name = "deepgram"
    credential: CredentialPlace = "userinfo"
    default_api = "https://api.deepgram.com"

    def _api(self, settings: Settings) -> tuple[str, dict[str, str]]:
        api, key = _key_and_api(settings, self.name, self.default_api)
        return api, {"Authorization": f"Token {key}"}

    def submit(self, http: requests.Session, settings: Settings, submission: Submission) -> str:
        api, headers = self._api(settings)
        params = [
            ("callback", submission.callback_url),
            ("utterances", "true"),
            ("punctuate", "true"),
            ("multichannel" if submission.channels == 2 else "diarize", "true"),
            *(("extra", f"{key}:{value}") for key, value in submission.metadata),
        ]
        timeout = settings.vendor_timeout_seconds
        if submission.url is not None:
            answer = _post(
                http,
                self.name,
                f"{api}/v1/listen",
                timeout,
                params=params,
                headers=headers,
                json={"url": submission.url},
            )
        else:
            assert submission.path is not None
            headers = {**headers, "Content-Type": submission.content_type or "audio/wav"}
            with submission.path.open("rb") as body:
                answer = _post(http, self.name, f"{api}/v1/listen", timeout, params=params, headers=headers, data=body)
        if answer.status_code != 200:
            raise classify(self.name, answer)
        try:
            request_id = answer.json()["request_id"]
        except (ValueError, KeyError, TypeError):
            raise VendorUnavailable("deepgram answered without a request_id") from None
        if not isinstance(request_id, str) or not request_id:
            raise VendorUnavailable("deepgram answered without a request_id")
        return request_id

    def find(
        self, http: requests.Session, settings: Settings, metadata: tuple[tuple[str, str], ...], since: float
    ) -> str | None:
        api, headers = self._api(settings)
        timeout = (10.0, settings.vendor_timeout_seconds)
        try:
            projects = http.get(f"{api}/v1/projects", headers=headers, timeout=timeout)
            if projects.status_code != 200:
                raise classify(self.name, projects)
            start = datetime.fromtimestamp(since - 60, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            # each pair as the log shows the query: raw, percent-encoded, or form-encoded
            wanted = [
                {f"extra={pair}", f"extra={quote(pair, safe='')}", f"extra={quote_plus(pair)}"}
                for pair in (f"{key}:{value}" for key, value in metadata)
            ]
            for project in projects.json().get("projects", []):
                listed = http.get(
                    f"{api}/v1/projects/{quote(str(project.get('project_id', '')), safe='')}/requests",
                    params={"start": start, "limit": "1000"},
                    headers=headers,
                    timeout=timeout,
                )
                if listed.status_code != 200:
                    raise classify(self.name, listed)
                for request in listed.json().get("requests", []):
                    path = str(request.get("path") or "")
                    if all(any(form in path for form in forms) for forms in wanted) and request.get("request_id"):
                        return str(request["request_id"])
        except requests.RequestException as error:
            raise VendorUnavailable(f"deepgram's request log could not be read ({type(error).__name__})") from None
        except (ValueError, AttributeError):
            raise VendorUnavailable("deepgram's request log answered unexpected JSON") from None
        return None

    def cost(self, http: requests.Session, settings: Settings, job_id: str) -> tuple[float, str] | None:
        """`response.details.usd` of the request in the project's request log (the key needs the
        `usage:read` scope; without it Deepgram answers 403 and the transcript goes without a cost)."""
        api, headers = self._api(settings)
        timeout = settings.vendor_timeout_seconds
        listed = _get(http, self.name, f"{api}/v1/projects", headers, timeout, "project list")
        projects = listed.get("projects") if isinstance(listed, dict) else None
        for project in projects if isinstance(projects, list) else []:
            project_id = str(project.get("project_id", "")) if isinstance(project, dict) else ""
            url = f"{api}/v1/projects/{quote(project_id, safe='')}/requests/{quote(job_id, safe='')}"
            found = _get(http, self.name, url, headers, timeout, "request log", missing_ok=True)
            if not isinstance(found, dict):
                continue
            request = found.get("request", found)  # the entry, wrapped in `request` or not
            response = request.get("response") if isinstance(request, dict) else None
            details = response.get("details") if isinstance(response, dict) else None
            usd = details.get("usd") if isinstance(details, dict) else None
            if isinstance(usd, int | float) and not isinstance(usd, bool) and 0 < usd < 1e7:
                return float(usd), "USD"
            return None
        return None

    def check(self, http: requests.Session, settings: Settings) -> None:
        api, headers = self._api(settings)
        try:
            answer = http.get(f"{api}/v1/projects", headers=headers, timeout=(10.0, settings.vendor_timeout_seconds))
        except requests.RequestException as error:
            raise VendorUnavailable(f"deepgram could not be reached ({type(error).__name__})") from None
        if answer.status_code != 200:
            raise classify(self.name, answer)


def _get(
    http: requests.Session,
    vendor: str,
    url: str,
    headers: dict[str, str],
    timeout: float,
    what: str,
    params: dict[str, str] | None = None,
    missing_ok: bool = False,
    refuse: Callable[[requests.Response], VendorError] | None = None,
) -> Any:
    """A read-only GET's JSON (a VendorError otherwise: `what` names what could not be read; with
    `missing_ok`, a 404 is None: a transcript deleted since it was listed; `refuse` reads a vendor's
    own error body, else `classify`). Redirects are not followed: the key's header would go along."""
    try:
        answer = http.get(
            url, params=params, headers=headers, timeout=(min(timeout, 10.0), timeout), allow_redirects=False
        )
    except requests.RequestException as error:
        raise VendorUnavailable(f"{vendor}'s {what} could not be read ({type(error).__name__})") from None
    if answer.status_code == 404 and missing_ok:
        return None
    if answer.status_code != 200:
        raise (refuse or functools.partial(classify, vendor))(answer)
    try:
        return answer.json()
    except ValueError:
        raise VendorUnavailable(f"{vendor}'s {what} answered something that is not JSON") from None


def _moment(text: object) -> float | None:
    """A vendor's ISO 8601 time as a timestamp (one without a zone is UTC); None when unreadable."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _the_call(settings: Settings, metadata: tuple[tuple[str, str], ...]) -> tuple[str, str, str]:
    """The portal, PBX and PBX call id that a submission's metadata names."""
    pairs = dict(metadata)
    return (
        pairs.get("b24scribe_portal") or settings.portal,
        pairs.get("b24scribe_pbx", ""),
        pairs.get("b24scribe_call", ""),
    )


def _credential(settings: Settings, vendor: str, url: str) -> tuple[str, str]:
    """The callback URL without its credential, and the credential for the vendor's header."""
    bare, secret = header_credential(settings, vendor, url)
    if not secret:
        raise VendorRejected(
            "the callback has no credential: set B24SCRIBE_INBOUND_TOKEN (each call's credential is derived from it)"
        )
    return bare, secret


class AssemblyAI:
    """AssemblyAI `POST /v2/transcript` with `webhook_url` (AssemblyAI posts only the transcript id and
    status there, with the header `webhook_auth_header_name: webhook_auth_header_value`; b24scribe then
    fetches the transcript), `multichannel` for a stereo recording or `speaker_labels` for a mono one,
    and `language_detection` (calls are in any language). Bytes go first to `POST /v2/upload`, whose
    `upload_url` becomes the `audio_url`. AssemblyAI keeps no metadata: the webhook URL's query names
    the call, and `find` looks for that URL among the transcripts made since the lost answer."""

    name = "assemblyai"
    credential: CredentialPlace = "header"
    default_api = "https://api.assemblyai.com"
    # the header the callback's credential comes back in: the one /hooks/stt/assemblyai reads
    # (its source's auth_header), so the per-call credential opens the door before the body is read
    auth_header = "X-B24scribe-Token"
    # AssemblyAI requires `speech_models` (in order of preference; it has no default model and drops
    # retired ones, e.g. universal-3-pro late in 2026); B24SCRIBE_ASSEMBLYAI_SPEECH_MODELS overrides
    default_speech_models = ("assemblyai-stt-3-7", "universal-2")

    def _api(self, settings: Settings) -> tuple[str, dict[str, str]]:
        api, key = _key_and_api(settings, self.name, self.default_api)
        return api, {"authorization": key}

    def submit(self, http: requests.Session, settings: Settings, submission: Submission) -> str:
        api, headers = self._api(settings)
        webhook_url, secret = _credential(settings, self.name, submission.callback_url)
        models = (settings.vendor_setting(self.name, "speech_models") or "").replace(",", " ").split()
        audio_url = (
            submission.url if submission.url is not None else self._upload(http, settings, api, headers, submission)
        )
        body: dict[str, Any] = {
            "audio_url": audio_url,
            "speech_models": models or list(self.default_speech_models),
            "language_detection": True,
            ("multichannel" if submission.channels == 2 else "speaker_labels"): True,
            "webhook_url": webhook_url,
            "webhook_auth_header_name": self.auth_header,
            "webhook_auth_header_value": secret,
        }
        timeout = settings.vendor_timeout_seconds
        answer = _post(http, self.name, f"{api}/v2/transcript", timeout, headers=headers, json=body)
        if answer.status_code != 200:
            raise classify(self.name, answer)
        return _job_id(self.name, answer, "id")

    def _upload(
        self, http: requests.Session, settings: Settings, api: str, headers: dict[str, str], submission: Submission
    ) -> str:
        """Upload the recording, streamed from the file; its `upload_url`. A lost answer made no
        transcript (only an upload nobody uses): the next attempt uploads again, without a look-up."""
        assert submission.path is not None
        timeout = settings.vendor_timeout_seconds
        with submission.path.open("rb") as file:
            try:
                answer = _post(
                    http,
                    self.name,
                    f"{api}/v2/upload",
                    timeout,
                    headers={**headers, "Content-Type": "application/octet-stream"},
                    data=file,
                )
            except AnswerLost as error:
                raise VendorUnavailable(f"{error} (the upload; nothing was submitted)") from None
        if answer.status_code != 200:
            raise classify(self.name, answer)
        return _job_id(self.name, answer, "upload_url", VendorUnavailable)

    def find(
        self, http: requests.Session, settings: Settings, metadata: tuple[tuple[str, str], ...], since: float
    ) -> str | None:
        api, headers = self._api(settings)
        timeout = settings.vendor_timeout_seconds
        wanted = callback_url(settings, self.name, *_the_call(settings, metadata), "header")
        for transcript_id in self._listed_since(http, api, headers, timeout, since - 60):
            url = f"{api}/v2/transcript/{quote(transcript_id, safe='')}"
            transcript = _get(http, self.name, url, headers, timeout, "transcript", missing_ok=True)
            webhook_url = transcript.get("webhook_url") if isinstance(transcript, dict) else None
            if isinstance(webhook_url, str) and _names_the_same_call(webhook_url, wanted):
                return transcript_id
        return None

    def _listed_since(
        self, http: requests.Session, api: str, headers: dict[str, str], timeout: float, since: float
    ) -> Iterator[str]:
        """The ids of the transcripts made since `since`, newest first, page by page (`before_id`:
        the next page is asked of the configured API, never of a URL the answer names)."""
        params = {"limit": "200"}
        while True:
            page = _get(http, self.name, f"{api}/v2/transcript", headers, timeout, "transcript list", params)
            listed = page.get("transcripts") if isinstance(page, dict) else None
            if not isinstance(listed, list):
                raise VendorUnavailable("assemblyai's transcript list answered unexpected JSON")
            last = None
            for item in listed:
                if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                    continue
                created = _moment(item.get("created"))
                if created is not None and created < since:
                    return  # newest first: the rest are older still
                last = str(item["id"])
                yield last
            if last is None or len(listed) < int(params["limit"]):
                return
            params = {"limit": params["limit"], "before_id": last}

    def status(self, http: requests.Session, settings: Settings, job_id: str) -> JobStatus:
        """`GET /v2/transcript/{id}`: `queued` and `processing` are still processing, `completed` is
        done (its webhook body: the id and the status), `error` failed with its `error`."""
        api, headers = self._api(settings)
        url = f"{api}/v2/transcript/{quote(job_id, safe='')}"
        transcript = _get(http, self.name, url, headers, settings.vendor_timeout_seconds, "transcript")
        state = transcript.get("status") if isinstance(transcript, dict) else None
        if state == "completed":
            return JobStatus("done", callback=json.dumps({"transcript_id": job_id, "status": state}).encode())
        if state in ("queued", "processing"):
            return JobStatus("processing")
        if state == "error":
            error = transcript.get("error")
            return JobStatus("failed", error if isinstance(error, str) and error else "no reason given")
        raise VendorUnavailable(f"assemblyai's transcript answered an unknown status {str(state)[:50]!r}")

    def check(self, http: requests.Session, settings: Settings) -> None:
        api, headers = self._api(settings)
        timeout = settings.vendor_timeout_seconds
        _get(http, self.name, f"{api}/v2/transcript", headers, timeout, "transcript list", {"limit": "1"})


class RevAI:
    """Rev.ai `POST /speechtotext/v1/jobs` with `notification_config` (Rev.ai posts the job there, with
    `auth_headers` {"Authorization": "Bearer <credential>"}; b24scribe then fetches the transcript),
    `speaker_channels_count=2` for a stereo recording (also put on the callback URL, so the fetched
    monologues' speakers read as channels) and Rev.ai's own diarization for a mono one. A URL goes as
    `source_config.url`, bytes as the multipart `media` field beside the `options` JSON. The call goes
    in `metadata` as `pbx=…&call=…` (what /hooks/stt/revai reads back), which `find` matches in the
    job list."""

    name = "revai"
    credential: CredentialPlace = "header"
    default_api = "https://api.rev.ai"
    max_metadata = 512  # characters, Rev.ai's limit

    def _api(self, settings: Settings) -> tuple[str, dict[str, str]]:
        api, key = _key_and_api(settings, self.name, self.default_api)
        return f"{api}/speechtotext/v1", {"Authorization": f"Bearer {key}"}

    def submit(self, http: requests.Session, settings: Settings, submission: Submission) -> str:
        api, headers = self._api(settings)
        notify_url, secret = _credential(settings, self.name, submission.callback_url)
        options: dict[str, Any] = {"metadata": self._metadata(submission.metadata)}
        if submission.channels == 2:
            options["speaker_channels_count"] = 2
            notify_url = _with_query(notify_url, speaker_channels_count="2")
        options["notification_config"] = {"url": notify_url, "auth_headers": {"Authorization": f"Bearer {secret}"}}
        timeout = settings.vendor_timeout_seconds
        if submission.url is not None:
            body = {**options, "source_config": {"url": submission.url}}
            answer = _post(http, self.name, f"{api}/jobs", timeout, headers=headers, json=body)
        else:
            assert submission.path is not None
            with submission.path.open("rb") as file:
                media_type = submission.content_type or "audio/wav"
                media = (_media_filename(media_type), file, media_type)
                encoder = MultipartEncoder(fields=[("media", media), ("options", json.dumps(options))])
                upload = {**headers, "Content-Type": encoder.content_type, "Content-Length": str(encoder.len)}
                answer = _post(http, self.name, f"{api}/jobs", timeout, headers=upload, data=encoder)
        if answer.status_code != 200:
            raise classify(self.name, answer)
        return _job_id(self.name, answer, "id")

    def _metadata(self, metadata: tuple[tuple[str, str], ...]) -> str:
        """The call as the job's metadata: `pbx=…&call=…` (and `portal=…`), the keys /hooks/stt/revai reads."""
        text = urlencode([(key.removeprefix("b24scribe_"), value) for key, value in metadata])
        if len(text) > self.max_metadata:
            raise VendorRejected(f"the call's reference is longer than Rev.ai's {self.max_metadata}-character metadata")
        return text

    def find(
        self, http: requests.Session, settings: Settings, metadata: tuple[tuple[str, str], ...], since: float
    ) -> str | None:
        api, headers = self._api(settings)
        timeout = settings.vendor_timeout_seconds
        wanted = dict(parse_qsl(self._metadata(metadata)))
        params = {"limit": "1000"}
        while True:
            jobs = _get(http, self.name, f"{api}/jobs", headers, timeout, "job list", params)
            if not isinstance(jobs, list):
                raise VendorUnavailable("revai's job list answered unexpected JSON")
            last = None
            for job in jobs:
                if not isinstance(job, dict) or not isinstance(job.get("id"), str):
                    continue
                created = _moment(job.get("created_on"))
                if created is not None and created < since - 60:
                    return None  # newest first: the rest are older still
                last = str(job["id"])
                found = job.get("metadata")
                if isinstance(found, str) and dict(parse_qsl(found)) == wanted:
                    return last
            if last is None or len(jobs) < int(params["limit"]):
                return None
            params = {"limit": params["limit"], "starting_after": last}

    def status(self, http: requests.Session, settings: Settings, job_id: str) -> JobStatus:
        """`GET /jobs/{id}`: `in_progress` is still processing, `transcribed` is done (the
        notification body is the job itself, `{"job": …}`), `failed` failed with its
        `failure_detail` (else `failure`)."""
        api, headers = self._api(settings)
        url = f"{api}/jobs/{quote(job_id, safe='')}"
        job = _get(http, self.name, url, headers, settings.vendor_timeout_seconds, "job")
        state = job.get("status") if isinstance(job, dict) else None
        if state == "transcribed":
            # a stereo job's callback URL carried the channel count (see `submit`); the job shows it
            stereo = job.get("speaker_channels_count") == 2
            query = (("speaker_channels_count", "2"),) if stereo else ()
            return JobStatus("done", callback=json.dumps({"job": job}).encode(), query=query)
        if state == "in_progress":
            return JobStatus("processing")
        if state == "failed":
            detail = job.get("failure_detail") or job.get("failure")
            return JobStatus("failed", detail if isinstance(detail, str) and detail else "no reason given")
        raise VendorUnavailable(f"revai's job answered an unknown status {str(state)[:50]!r}")

    def check(self, http: requests.Session, settings: Settings) -> None:
        api, headers = self._api(settings)
        _get(http, self.name, f"{api}/account", headers, settings.vendor_timeout_seconds, "account")


def _job_id(vendor: str, answer: requests.Response, key: str, missing: type[VendorError] = AnswerLost) -> str:
    """The id (or URL) a vendor's 200 answer names under `key`. Without it, `missing`: by default the
    answer is as good as lost (the vendor took the submission: look it up before sending it again)."""
    try:
        value = answer.json()[key]
    except (ValueError, KeyError, TypeError):
        value = None
    if not isinstance(value, str) or not value:
        raise missing(f"{vendor} answered HTTP {answer.status_code} without {key}")
    return value


def _media_filename(media_type: str) -> str:
    """A name for the uploaded file by its type (the downloaded file's own name is a temporary `….part`)."""
    known = {"audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav", "audio/mpeg": ".mp3"}
    extension = known.get(media_type.lower()) or mimetypes.guess_extension(media_type) or ""
    return "recording" + ("" if extension == ".bin" else extension)


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def _names_the_same_call(url: str, wanted: str) -> bool:
    """Whether a vendor-kept callback URL is this service's callback for the call `wanted` names:
    the same host and path, and the same pbx, call and portal in its query."""
    given, expected = urlsplit(url), urlsplit(wanted)
    if (given.hostname, given.port, given.path) != (expected.hostname, expected.port, expected.path):
        return False
    given_query, expected_query = dict(parse_qsl(given.query)), dict(parse_qsl(expected.query))
    return all(given_query.get(name) == expected_query.get(name) for name in ("pbx", "call", "portal"))


# The other vendors live in modules of their own; each imports the helpers above, so their imports
# come last. A vendor is one module, one import and one entry here (and its name in
# settings.TRANSCRIBE_VENDORS, which the settings check reads without importing this module).
from b24scribe.delivery.submit_azure import Azure  # noqa: E402
from b24scribe.delivery.submit_elevenlabs import ElevenLabs  # noqa: E402
from b24scribe.delivery.submit_gladia import Gladia  # noqa: E402
from b24scribe.delivery.submit_openai import OpenAI  # noqa: E402
from b24scribe.delivery.submit_speechmatics import Speechmatics  # noqa: E402

SUBMITTERS: dict[str, Submitter] = {
    submitter.name: submitter
    for submitter in (
        Deepgram(),
        AssemblyAI(),
        RevAI(),
        Azure(),
        ElevenLabs(),
        Gladia(),
        OpenAI(),
        Speechmatics(),
    )
}

"""Submitting a call's recording to an STT vendor (contract §10): what a submission is, how a vendor's
answer is classified, and each vendor's request.

A submitter sends one recording (by URL when the vendor can fetch it, else the downloaded bytes) with
a callback URL that names the call and carries its credential (`b24scribe.callbacks`), and returns
the vendor's job id. When an earlier attempt's answer was lost, `find` asks the vendor whether that
submission arrived (by the marker it carried), so a retry never makes a second vendor job.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, quote_plus, urlsplit

import requests

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
    userinfo: bool  # the callback's credential goes in the URL's userinfo (else `?token=`)

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


def classify(vendor: str, answer: requests.Response) -> VendorError:
    """A vendor's error answer as what to do about it."""
    detail = ""
    try:
        body = answer.json()
        if isinstance(body, dict):
            parts = [body.get(k) for k in ("err_code", "err_msg", "error", "message", "detail")]
            detail = ": " + " ".join(str(p) for p in parts if isinstance(p, str | int))[:300]
    except ValueError:
        pass
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
    userinfo = True
    default_api = "https://api.deepgram.com"

    def _api(self, settings: Settings) -> tuple[str, dict[str, str]]:
        key = settings.vendor_setting(self.name, "api_key")
        if not key:
            raise VendorRejected("B24SCRIBE_DEEPGRAM_API_KEY is not set")
        api = (settings.vendor_setting(self.name, "api_url") or self.default_api).rstrip("/")
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

    def check(self, http: requests.Session, settings: Settings) -> None:
        api, headers = self._api(settings)
        try:
            answer = http.get(f"{api}/v1/projects", headers=headers, timeout=(10.0, settings.vendor_timeout_seconds))
        except requests.RequestException as error:
            raise VendorUnavailable(f"deepgram could not be reached ({type(error).__name__})") from None
        if answer.status_code != 200:
            raise classify(self.name, answer)


SUBMITTERS: dict[str, Submitter] = {submitter.name: submitter for submitter in (Deepgram(),)}

"""Submitting a recording to Speechmatics' batch API (contract §10).

`POST /v2/jobs` takes a multipart form: the job's `config` JSON, and the recording as `data_file`
unless `config.fetch_data.url` names it for Speechmatics to fetch. The config asks for channel
diarization on a stereo recording (labels `channel_1`, `channel_2`: one speaker per channel) and
speaker diarization on a mono one, in the language B24SCRIBE_SPEECHMATICS_LANGUAGE names, else
`auto` (Speechmatics identifies it). Its `notification_config` posts the json-v2 transcript itself
(`"contents": ["transcript"]`, what /hooks/stt/speechmatics parses) to the call's callback URL,
with the call's own credential in the `Authorization: Bearer` header it sends along; Speechmatics
adds `?id=<job>&status=…` to that URL. `tracking.details` carries the call (b24scribe_pbx,
b24scribe_call, b24scribe_portal): the transcript names its call even without the URL's query,
and `find` matches it in the job list after a lost answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import requests
from requests_toolbelt import MultipartEncoder

from b24scribe.callbacks import CredentialPlace
from b24scribe.delivery.submit import (
    JobStatus,
    Submission,
    VendorUnavailable,
    _credential,
    _get,
    _job_id,
    _key_and_api,
    _media_filename,
    _moment,
    _post,
    classify,
)
from b24scribe.settings import Settings

# the channel labels asked for: the hook reads label i as channel i (and `channel_<n>` even without them)
CHANNEL_LABELS = ("channel_1", "channel_2")
FAILED = {"rejected": "", "deleted": "the job was deleted", "expired": "the job expired"}


class Speechmatics:
    """Speechmatics batch jobs with a notification carrying the transcript (see the module's docstring)."""

    name = "speechmatics"
    credential: CredentialPlace = "header"
    default_api = "https://asr.api.speechmatics.com"
    default_language = "auto"  # language identification
    page_size = 100  # the job list's largest page

    def _api(self, settings: Settings) -> tuple[str, dict[str, str]]:
        api, key = _key_and_api(settings, self.name, self.default_api)
        return f"{api}/v2", {"Authorization": f"Bearer {key}"}

    def submit(self, http: requests.Session, settings: Settings, submission: Submission) -> str:
        api, headers = self._api(settings)
        config = self._config(settings, submission)
        timeout = settings.vendor_timeout_seconds
        if submission.url is not None:
            config["fetch_data"] = {"url": submission.url}
            answer = self._post_form(http, api, headers, timeout, [("config", json.dumps(config))])
        else:
            assert submission.path is not None
            with submission.path.open("rb") as file:
                media_type = submission.content_type or "audio/wav"
                data_file = (_media_filename(media_type), file, media_type)
                fields = [("config", json.dumps(config)), ("data_file", data_file)]
                answer = self._post_form(http, api, headers, timeout, fields)
        if answer.status_code not in (200, 201):
            raise classify(self.name, answer)
        return _job_id(self.name, answer, "id")

    def _post_form(
        self, http: requests.Session, api: str, headers: dict[str, str], timeout: float, fields: list[tuple[str, Any]]
    ) -> requests.Response:
        """`POST /v2/jobs` as multipart/form-data (the only body it takes), the file streamed."""
        encoder = MultipartEncoder(fields=fields)
        form = {**headers, "Content-Type": encoder.content_type, "Content-Length": str(encoder.len)}
        return _post(http, self.name, f"{api}/jobs", timeout, headers=form, data=encoder)

    def _config(self, settings: Settings, submission: Submission) -> dict[str, Any]:
        """The job's config, without the recording."""
        notify_url, secret = _credential(settings, self.name, submission.callback_url)
        transcription: dict[str, Any] = {
            "language": settings.vendor_setting(self.name, "language") or self.default_language
        }
        if submission.channels == 2:
            transcription |= {"diarization": "channel", "channel_diarization_labels": list(CHANNEL_LABELS)}
        else:
            transcription["diarization"] = "speaker"
        return {
            "type": "transcription",
            "transcription_config": transcription,
            "notification_config": [
                {"url": notify_url, "contents": ["transcript"], "auth_headers": [f"Authorization: Bearer {secret}"]}
            ],
            "tracking": {"details": dict(submission.metadata)},
        }

    def find(
        self, http: requests.Session, settings: Settings, metadata: tuple[tuple[str, str], ...], since: float
    ) -> str | None:
        api, headers = self._api(settings)
        wanted = dict(metadata)
        for job in self._listed_since(http, api, headers, settings.vendor_timeout_seconds, since - 60):
            if _tracked_call(job) == wanted:
                return str(job["id"])
        return None

    def _listed_since(
        self, http: requests.Session, api: str, headers: dict[str, str], timeout: float, since: float
    ) -> Iterator[dict[str, Any]]:
        """The jobs made since `since`, newest first, page by page (`created_before`: the oldest
        job's creation time on the page before)."""
        params = {"limit": str(self.page_size)}
        while True:
            page = _get(http, self.name, f"{api}/jobs", headers, timeout, "job list", params)
            listed = page.get("jobs") if isinstance(page, dict) else None
            if not isinstance(listed, list):
                raise VendorUnavailable("speechmatics' job list answered unexpected JSON")
            oldest = None
            for job in listed:
                if not isinstance(job, dict) or not isinstance(job.get("id"), str):
                    continue
                created = _moment(job.get("created_at"))
                if created is not None and created < since:
                    return  # newest first: the rest are older still
                oldest = job.get("created_at")
                yield job
            if not isinstance(oldest, str) or len(listed) < self.page_size:
                return
            params = {"limit": str(self.page_size), "created_before": oldest}

    def status(self, http: requests.Session, settings: Settings, job_id: str) -> JobStatus:
        """`GET /v2/jobs/{id}`: `running` is still processing; `done` is done, its callback the json-v2
        transcript (`GET /v2/jobs/{id}/transcript?format=json-v2`) with the `id` and `status` query
        Speechmatics adds to the URL; `rejected` failed with its last error, `deleted` and `expired`
        failed as such."""
        api, headers = self._api(settings)
        timeout = settings.vendor_timeout_seconds
        url = f"{api}/jobs/{quote(job_id, safe='')}"
        answer = _get(http, self.name, url, headers, timeout, "job")
        job = answer.get("job") if isinstance(answer, dict) else None
        state = job.get("status") if isinstance(job, dict) else None
        if state == "running":
            return JobStatus("processing")
        if state == "done":
            params = {"format": "json-v2"}
            transcript = _get(http, self.name, f"{url}/transcript", headers, timeout, "transcript", params)
            query = (("id", job_id), ("status", "success"))
            return JobStatus("done", callback=json.dumps(transcript).encode(), query=query)
        if isinstance(job, dict) and isinstance(state, str) and state in FAILED:
            return JobStatus("failed", _last_error(job) or FAILED[state] or "the job was rejected")
        raise VendorUnavailable(f"speechmatics' job answered an unknown status {str(state)[:50]!r}")

    def check(self, http: requests.Session, settings: Settings) -> None:
        api, headers = self._api(settings)
        _get(http, self.name, f"{api}/jobs", headers, settings.vendor_timeout_seconds, "job list", {"limit": "1"})


def _tracked_call(job: dict[str, Any]) -> dict[str, Any] | None:
    """The b24scribe keys of a listed job's `tracking.details` (the job's own, or its config's)."""
    config = job.get("config")
    for tracking in (job.get("tracking"), config.get("tracking") if isinstance(config, dict) else None):
        details = tracking.get("details") if isinstance(tracking, dict) else None
        if isinstance(details, dict):
            return {key: value for key, value in details.items() if str(key).startswith("b24scribe_")}
    return None


def _last_error(job: dict[str, Any]) -> str:
    """The message of a job's last error (`errors[]`: a fetch that failed, audio it could not read)."""
    errors = job.get("errors")
    last = errors[-1] if isinstance(errors, list) and errors else None
    message = last.get("message") if isinstance(last, dict) else None
    return message if isinstance(message, str) else ""

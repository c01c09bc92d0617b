"""Submitting a call's recording to Gladia (contract §10): v2 pre-recorded with a callback.

Gladia's callback carries the whole result (`transcription.success` with `payload`, or
`transcription.error`) and the job's `custom_metadata`, which /hooks/stt/gladia reads as the call. It
sends no header of its own and signs nothing, so the call's credential travels in the callback URL as
`?token=` (the credential opens that one call's callback only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import requests
from requests_toolbelt import MultipartEncoder

from b24scribe.callbacks import CredentialPlace
from b24scribe.delivery.submit import (
    AnswerLost,
    JobStatus,
    Submission,
    VendorRejected,
    VendorUnavailable,
    _get,
    _job_id,
    _key_and_api,
    _media_filename,
    _moment,
    _post,
    classify,
)
from b24scribe.settings import Settings


class Gladia:
    """Gladia `POST /v2/pre-recorded` with `callback` and `callback_config` (Gladia posts the whole
    result there), `custom_metadata` holding the call (b24scribe_pbx, b24scribe_call, b24scribe_portal),
    and `diarization` for a mono recording. A stereo one needs no option: Gladia transcribes each
    distinct channel by itself and says which channel every utterance came from. The language is
    detected unless B24SCRIBE_GLADIA_LANGUAGE names one. Bytes go first to `POST /v2/upload` (the
    multipart field `audio`), whose `audio_url` becomes the job's. `find` asks the job list for the
    call's `custom_metadata` since the lost answer."""

    name = "gladia"
    credential: CredentialPlace = "query"
    default_api = "https://api.gladia.io"
    max_metadata = 2000  # characters of the JSON custom_metadata, Gladia's limit
    page_size = 100  # jobs per page of the list

    def _api(self, settings: Settings) -> tuple[str, dict[str, str]]:
        api, key = _key_and_api(settings, self.name, self.default_api)
        return api, {"x-gladia-key": key}

    def submit(self, http: requests.Session, settings: Settings, submission: Submission) -> str:
        api, headers = self._api(settings)
        metadata = self._metadata(submission.metadata)
        audio_url = (
            submission.url if submission.url is not None else self._upload(http, settings, api, headers, submission)
        )
        body: dict[str, Any] = {
            "audio_url": audio_url,
            "callback": True,
            "callback_config": {"url": submission.callback_url, "method": "POST"},
            "custom_metadata": metadata,
        }
        if submission.channels != 2:
            body["diarization"] = True
        language = (settings.vendor_setting(self.name, "language") or "").strip()
        if language:
            body["language_config"] = {"languages": [language]}
        timeout = settings.vendor_timeout_seconds
        answer = _post(http, self.name, f"{api}/v2/pre-recorded", timeout, headers=headers, json=body)
        if answer.status_code not in (200, 201):  # Gladia answers 201 Created
            raise classify(self.name, answer)
        return _job_id(self.name, answer, "id")

    def _metadata(self, metadata: tuple[tuple[str, str], ...]) -> dict[str, str]:
        """The call as the job's `custom_metadata`, the keys /hooks/stt/gladia reads back."""
        pairs = dict(metadata)
        if len(json.dumps(pairs)) > self.max_metadata:
            raise VendorRejected(f"the call's reference is longer than Gladia's {self.max_metadata}-character metadata")
        return pairs

    def _upload(
        self, http: requests.Session, settings: Settings, api: str, headers: dict[str, str], submission: Submission
    ) -> str:
        """Upload the recording, streamed from the file; its `audio_url`. A lost answer made no job
        (only an upload nobody uses): the next attempt uploads again, without a look-up."""
        assert submission.path is not None
        timeout = settings.vendor_timeout_seconds
        with submission.path.open("rb") as file:
            media_type = submission.content_type or "audio/wav"
            encoder = MultipartEncoder(fields=[("audio", (_media_filename(media_type), file, media_type))])
            upload = {**headers, "Content-Type": encoder.content_type, "Content-Length": str(encoder.len)}
            try:
                answer = _post(http, self.name, f"{api}/v2/upload", timeout, headers=upload, data=encoder)
            except AnswerLost as error:
                raise VendorUnavailable(f"{error} (the upload; nothing was submitted)") from None
        if answer.status_code not in (200, 201):
            raise classify(self.name, answer)
        return _job_id(self.name, answer, "audio_url", VendorUnavailable)

    def find(
        self, http: requests.Session, settings: Settings, metadata: tuple[tuple[str, str], ...], since: float
    ) -> str | None:
        api, headers = self._api(settings)
        wanted = self._metadata(metadata)
        for job in self._listed_since(http, settings, api, headers, wanted, since - 60):
            found = job.get("custom_metadata")
            # exactly the call's keys: a job for the same PBX call on another portal carries b24scribe_portal
            if isinstance(found, dict) and {k: v for k, v in found.items() if k.startswith("b24scribe_")} == wanted:
                return str(job["id"])
        return None

    def _listed_since(
        self,
        http: requests.Session,
        settings: Settings,
        api: str,
        headers: dict[str, str],
        metadata: dict[str, str],
        since: float,
    ) -> Iterator[dict[str, Any]]:
        """The jobs carrying `metadata` made since `since`, page by page (`offset`: the next page is
        asked of the configured API, never of the `next` URL the answer names). The list is filtered
        by Gladia; each job is still checked here, whatever the filter let through."""
        after = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        params = {
            "limit": str(self.page_size),
            "after_date": after,
            "custom_metadata": json.dumps(metadata, separators=(",", ":")),
        }
        offset = 0
        while True:
            page = _get(
                http,
                self.name,
                f"{api}/v2/pre-recorded",
                headers,
                settings.vendor_timeout_seconds,
                "job list",
                params | {"offset": str(offset)},
            )
            items = page.get("items") if isinstance(page, dict) else None
            if not isinstance(items, list):
                raise VendorUnavailable("gladia's job list answered unexpected JSON")
            for item in items:
                if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                    continue
                created = _moment(item.get("created_at"))
                if created is None or created >= since:
                    yield item
            if len(items) < self.page_size or not page.get("next"):
                return
            offset += len(items)

    def status(self, http: requests.Session, settings: Settings, job_id: str) -> JobStatus:
        """`GET /v2/pre-recorded/{id}`: `queued` and `processing` are still processing, `done` is done
        (its callback body: the job's `result` as `payload`, with its `custom_metadata`), `error`
        failed with its HTTP `error_code` (the job shows no message; its callback would have)."""
        api, headers = self._api(settings)
        url = f"{api}/v2/pre-recorded/{quote(job_id, safe='')}"
        job = _get(http, self.name, url, headers, settings.vendor_timeout_seconds, "job")
        state = job.get("status") if isinstance(job, dict) else None
        if state == "done":
            callback = {
                "id": job.get("id") or job_id,
                "event": "transcription.success",
                "payload": job.get("result"),
                "custom_metadata": job.get("custom_metadata"),
            }
            return JobStatus("done", callback=json.dumps(callback).encode())
        if state in ("queued", "processing"):
            return JobStatus("processing")
        if state == "error":
            code = job.get("error_code")
            return JobStatus("failed", f"the job ended in error (code {code})" if code else "no reason given")
        raise VendorUnavailable(f"gladia's job answered an unknown status {str(state)[:50]!r}")

    def check(self, http: requests.Session, settings: Settings) -> None:
        api, headers = self._api(settings)
        _get(
            http,
            self.name,
            f"{api}/v2/pre-recorded",
            headers,
            settings.vendor_timeout_seconds,
            "job list",
            {"limit": "1"},
        )

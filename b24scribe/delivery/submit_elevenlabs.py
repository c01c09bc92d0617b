"""ElevenLabs Speech-to-Text (Scribe) as a vendor b24scribe submits recordings to (contract §10).

`POST /v1/speech-to-text` (multipart form, `xi-api-key`) with `webhook=true`: ElevenLabs answers at
once with a `request_id` and a `transcription_id`, and later posts the whole transcript to the
workspace's speech-to-text webhooks. Those are configured once in the ElevenLabs workspace, not per
request, and signed with `ElevenLabs-Signature` under the webhook's secret
(B24SCRIBE_ELEVENLABS_WEBHOOK_SECRET, which /hooks/stt/elevenlabs verifies): so the call is named by
`webhook_metadata` (b24scribe_pbx, b24scribe_call, b24scribe_portal), and the per-call callback URL is
never sent. The workspace webhook points at <B24SCRIBE_PUBLIC_URL>/hooks/stt/elevenlabs;
B24SCRIBE_ELEVENLABS_WEBHOOK_ID picks that one when the workspace has several.

A stereo recording asks for `use_multi_channel` (one speaker per channel, one transcript each), a
mono one for `diarize`; words come with their times (`timestamps_granularity=word`), and the
language is detected unless B24SCRIBE_ELEVENLABS_LANGUAGE names it. The model is
B24SCRIBE_ELEVENLABS_MODEL (default scribe_v2). A recording the vendor can fetch goes as
`source_url`, else its bytes as the `file` part, streamed from the downloaded file.

ElevenLabs keeps no list of transcription jobs to look a submission up in, so a lost answer is never
followed by a second submission (a second paid job, and a second transcript): the call waits for the
webhook, which finds its call by the metadata whatever b24scribe knows of the job. If none comes
within B24SCRIBE_TRANSCRIBE_TIMEOUT_MINUTES, the call is shown failed with that reason, and a retry
of the call submits it again.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import requests
from requests_toolbelt import MultipartEncoder

from b24scribe.callbacks import CredentialPlace
from b24scribe.delivery.submit import (
    AnswerLost,
    JobStatus,
    Submission,
    VendorError,
    VendorUnavailable,
    _key_and_api,
    _media_filename,
    _post,
    classify,
)
from b24scribe.settings import Settings

# what the webhook's body says it is (the envelope /hooks/stt/elevenlabs reads)
EVENT_TYPE = "speech_to_text_transcription"
# the job id b24scribe keeps when the submission's answer was lost: no real job has it, and asking its
# status says why no transcript came
ANSWER_LOST = "unknown (the answer to the submission was lost)"
MAX_JOB_ID = 128  # characters b24scribe keeps of a vendor job id


class ElevenLabs:
    """ElevenLabs `POST /v1/speech-to-text` with `webhook=true` and `webhook_metadata` naming the call.

    The job id kept is `<transcription_id>/<request_id>`: the first is what the transcript is read by
    (`GET /v1/speech-to-text/transcripts/{transcription_id}`), the second what the webhook names its
    job by, so a transcript read after the webhook did not come is stored under the webhook's own
    key, and a late webhook is a duplicate."""

    name = "elevenlabs"
    # No callback URL or per-call credential goes to ElevenLabs: its webhook is the workspace's, and
    # proves itself with ElevenLabs-Signature, a header of its own. "header" keeps the (unsent)
    # callback URL free of any credential.
    credential: CredentialPlace = "header"
    default_api = "https://api.elevenlabs.io"
    default_model = "scribe_v2"
    # the transcript that `check` asks for: none has this id, so a working key is answered 404
    probe_id = "b24scribe-key-check"

    def _api(self, settings: Settings) -> tuple[str, dict[str, str]]:
        api, key = _key_and_api(settings, self.name, self.default_api)
        return api, {"xi-api-key": key}

    def submit(self, http: requests.Session, settings: Settings, submission: Submission) -> str:
        api, headers = self._api(settings)
        fields: list[tuple[str, Any]] = [
            ("model_id", settings.vendor_setting(self.name, "model") or self.default_model),
            ("timestamps_granularity", "word"),
            ("use_multi_channel" if submission.channels == 2 else "diarize", "true"),
            ("webhook", "true"),
            ("webhook_metadata", json.dumps(dict(submission.metadata))),
        ]
        if language := settings.vendor_setting(self.name, "language"):
            fields.append(("language_code", language))
        if webhook_id := settings.vendor_setting(self.name, "webhook_id"):
            fields.append(("webhook_id", webhook_id))
        timeout = settings.vendor_timeout_seconds
        if submission.url is not None:
            answer = self._send(http, api, headers, timeout, [*fields, ("source_url", submission.url)])
        else:
            assert submission.path is not None
            with submission.path.open("rb") as file:
                media_type = submission.content_type or "audio/wav"
                upload = ("file", (_media_filename(media_type), file, media_type))
                answer = self._send(http, api, headers, timeout, [*fields, upload])
        if answer.status_code != 200:
            raise _refusal(answer)
        return self._job_id(answer)

    def _send(
        self, http: requests.Session, api: str, headers: dict[str, str], timeout: float, fields: list[tuple[str, Any]]
    ) -> requests.Response:
        """The multipart form, streamed (a file part is read as it is sent)."""
        encoder = MultipartEncoder(fields=fields)
        form = {**headers, "Content-Type": encoder.content_type, "Content-Length": str(encoder.len)}
        return _post(http, self.name, f"{api}/v1/speech-to-text", timeout, headers=form, data=encoder)

    def _job_id(self, answer: requests.Response) -> str:
        """`<transcription_id>/<request_id>` (see the class), or the one of them the answer gave. An
        answer naming neither is as good as lost: ElevenLabs took the recording."""
        try:
            body = answer.json()
        except ValueError:
            body = None
        ids = [body.get(key) if isinstance(body, dict) else None for key in ("transcription_id", "request_id")]
        given = [value for value in ids if isinstance(value, str) and value and "/" not in value]
        if not given:
            raise AnswerLost("elevenlabs answered HTTP 200 without a request_id")
        job_id = "/".join(given)
        return job_id if len(job_id) <= MAX_JOB_ID else given[0]

    def find(
        self, http: requests.Session, settings: Settings, metadata: tuple[tuple[str, str], ...], since: float
    ) -> str | None:
        """ElevenLabs lists no transcription jobs, so a submission whose answer was lost cannot be
        looked up: rather than submit it again (a second paid job), the call waits for the webhook,
        which names it by its metadata, under ANSWER_LOST (`status` then says why none came)."""
        return ANSWER_LOST

    def status(self, http: requests.Session, settings: Settings, job_id: str) -> JobStatus:
        """`GET /v1/speech-to-text/transcripts/{transcription_id}`: a transcript is done (stored as
        the webhook event that would have carried it); none (404), once the webhook's wait is over,
        is a job that failed or was never kept, shown with that reason."""
        if job_id == ANSWER_LOST:
            return JobStatus(
                "failed",
                "its answer to the submission was lost and no webhook came; ElevenLabs lists no jobs to look "
                "it up in, so it was not submitted again: retry the call to submit it again",
            )
        transcription_id, _, request_id = job_id.partition("/")
        api, headers = self._api(settings)
        url = f"{api}/v1/speech-to-text/transcripts/{quote(transcription_id, safe='')}"
        answer = _read(http, url, headers, settings.vendor_timeout_seconds)
        if answer.status_code == 404:
            return JobStatus(
                "failed",
                f"ElevenLabs has no transcript {transcription_id} and its webhook did not come: the job failed, "
                "or the workspace webhook does not point at /hooks/stt/elevenlabs",
            )
        if answer.status_code != 200:
            raise _refusal(answer)
        try:
            transcription = answer.json()
        except ValueError:
            transcription = None
        if not isinstance(transcription, dict) or not ("words" in transcription or "transcripts" in transcription):
            raise VendorUnavailable("elevenlabs answered a transcript without words")
        # the webhook's own envelope, under the webhook's own job id; the stored event's query names the call
        data = {"request_id": request_id or transcription_id, "transcription": transcription}
        return JobStatus("done", callback=json.dumps({"type": EVENT_TYPE, "data": data}).encode())

    def check(self, http: requests.Session, settings: Settings) -> None:
        """Ask for a transcript no one has: a 404 proves the key, and that it may use speech-to-text
        (a key restricted to other endpoints is refused here, as its submissions would be)."""
        api, headers = self._api(settings)
        url = f"{api}/v1/speech-to-text/transcripts/{self.probe_id}"
        answer = _read(http, url, headers, settings.vendor_timeout_seconds)
        if answer.status_code not in (200, 404):
            raise _refusal(answer)


def _read(http: requests.Session, url: str, headers: dict[str, str], timeout: float) -> requests.Response:
    try:
        return http.get(url, headers=headers, timeout=(min(timeout, 10.0), timeout), allow_redirects=False)
    except requests.RequestException as error:
        raise VendorUnavailable(f"elevenlabs could not be reached ({type(error).__name__})") from None


def _refusal(answer: requests.Response) -> VendorError:
    """An error answer as what to do about it (`classify`), with ElevenLabs' own message: its errors
    are `{"detail": {"status", "message"}}`, or a validation error's `{"detail": [{"loc", "msg"}]}`."""
    try:
        detail = answer.json().get("detail")
    except (ValueError, AttributeError):
        return classify("elevenlabs", answer)
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        where = ".".join(str(part) for part in first.get("loc") or [] if part != "body")
        text = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    elif isinstance(detail, dict):
        text = str(detail.get("message") or detail.get("status") or "")
    else:
        text = detail if isinstance(detail, str) else ""
    return classify("elevenlabs", answer, text)

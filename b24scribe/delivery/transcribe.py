"""The transcribe step (contract §10): submit an answered call's recording to the STT vendor once.

Idempotent across retries and crashes: a call whose vendor job id is stored is never submitted again,
and an attempt that follows a lost answer (or a worker that died mid-submission: the claim is then
ambiguous) first asks the vendor whether that submission arrived, by the marker it carried. The
vendor job id is recorded in the same batch as the answer, before anything else is sent.

After the submission the job waits for the vendor's callback, at most
B24SCRIBE_TRANSCRIBE_TIMEOUT_MINUTES. Then, with no transcript for the call, a vendor that can say
how its job stands (AssemblyAI, Rev.ai) is asked: a finished job's callback is stored as if the
vendor had posted it (the hook's own parse and dedupe key, so the transcript comes the way a
callback's does, and a late real callback is a duplicate); a job still processing is waited for
another period, up to MAX_WAIT_PERIODS in all; a failed one is shown on the call with the vendor's
reason. The status request follows the submission's failure policy (a 429 waits, a 5xx or no
connection is retried on the schedule, another 4xx is shown on the call). A vendor that cannot be
asked (Deepgram) is marked failed, with the reason on the call. A failed call's job is dead and can
be retried, which submits again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import requests
import structlog
from marshmallow import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from b24scribe import outbox
from b24scribe.callbacks import callback_query, callback_url
from b24scribe.db import Database
from b24scribe.delivery.download import DownloadFailed, NotReady, Refused, download
from b24scribe.delivery.recording import Apply, OnLost, Recorder
from b24scribe.delivery.steps import resolve_recording
from b24scribe.delivery.submit import (
    SUBMITTERS,
    AnswerLost,
    AsksStatus,
    JobStatus,
    Submission,
    Submitter,
    TranscribesAtOnce,
    VendorBusy,
    VendorError,
    VendorRejected,
    fetchable,
    takes_urls,
)
from b24scribe.events import RawEvent, store_event_in, transcript_key
from b24scribe.models import Call, Job, TranscriptPart
from b24scribe.outbox import Claim
from b24scribe.parsing import parse_transcript
from b24scribe.settings import Settings
from b24scribe.sources import Sources

log = structlog.get_logger(__name__)

WAITING_FOR_CALLBACK = "submitted: waiting for the vendor's callback"
SENDING = "sending"  # the call's transcription state while its submission is on its way to the vendor
TRANSCRIBED_AT_ONCE = "transcribed at once"  # a vendor that answers with the transcript (TranscribesAtOnce)
MAX_ERROR = 500
# how many B24SCRIBE_TRANSCRIBE_TIMEOUT_MINUTES periods a job the vendor says is still processing is
# waited for in all, the first one included
MAX_WAIT_PERIODS = 3


@dataclass(frozen=True, slots=True)
class _Submitted:
    call_id: int
    vendor: str
    job_id: str
    until: float  # when to look whether the transcript came


class Transcriptions:
    """Runs transcribe jobs: submit, then check that the transcript came."""

    def __init__(
        self, db: Database, settings: Settings, sources: Sources, http: requests.Session, recorder: Recorder
    ) -> None:
        self.db, self.settings, self.sources, self.http, self.recorder = db, settings, sources, http, recorder

    def transcribe(self, claim: Claim, call: Call) -> None:
        vendor = call.transcription_vendor or self.settings.transcribe_with or ""
        submitter = SUBMITTERS.get(vendor)
        if submitter is None:
            self._give_up(claim, call.id, f"b24scribe cannot submit recordings to {vendor!r}")
            return
        if call.transcription_job_id and call.transcription_state == "submitted":
            self._check_arrived(claim, call, vendor)
            return
        metadata: tuple[tuple[str, str], ...] = (
            ("b24scribe_pbx", call.pbx or ""),
            ("b24scribe_call", call.pbx_call_id or ""),
        )
        if call.portal != self.settings.portal:
            metadata += (("b24scribe_portal", call.portal),)
        try:
            # an earlier attempt may have sent it (its request went out, see `_send`): the vendor's log
            # since the call was stored holds it; an attempt that died before sending sent nothing
            maybe_sent = claim.ambiguous and call.transcription_state == SENDING
            found = submitter.find(self.http, self.settings, metadata, call.created_at) if maybe_sent else None
            answer = found or self._submit(submitter, call, metadata)
        except VendorBusy as busy:
            self._back_off(claim, busy, "retried")
            return
        except VendorRejected as error:
            self._give_up(claim, call.id, str(error))
            return
        except AnswerLost as error:
            self._retry(claim, call.id, str(error), ambiguous=True)
            return
        except VendorError as error:
            self._retry(claim, call.id, str(error))
            return
        except NotReady as error:
            self._retry(claim, call.id, f"the recording is not ready yet: {error}")
            return
        except DownloadFailed as error:
            self._retry(claim, call.id, f"the recording could not be downloaded: {error}")
            return
        except Refused as error:
            self._give_up(claim, call.id, f"the recording was refused: {error}")
            return
        if isinstance(answer, list):  # the vendor answered with the transcript itself
            log.info("recording transcribed at once", vendor=vendor, parts=len(answer))
            self._store_callbacks(claim, call, vendor, answer, TRANSCRIBED_AT_ONCE)
            return
        job_id = answer
        log.info("recording submitted for transcription", vendor=vendor, found_after_lost_answer=found is not None)
        until = time.time() + _first_wait(submitter, self.settings.transcribe_timeout_minutes * 60)
        submitted = _Submitted(call.id, vendor, job_id, until)
        self._record(claim, lambda s, j: _record_submitted(s, j, submitted), on_lost=lambda s: _keep(s, submitted))

    def _submit(self, submitter: Submitter, call: Call, metadata: tuple[tuple[str, str], ...]) -> str | list[JobStatus]:
        """The vendor's job id, or the transcript's parts from a vendor that answers with it."""
        settings = self.settings
        url = call.recording_url or ""
        target = (
            callback_url(
                settings, submitter.name, call.portal, call.pbx or "", call.pbx_call_id or "", submitter.credential
            )
            if settings.public_url
            else ""  # a vendor that answers at once (B24SCRIBE_PUBLIC_URL is not needed for it)
        )
        channels = 2 if call.recording_channels == 2 else 1
        source = self.sources.pbx.get(call.pbx or "")
        url = resolve_recording(source, url, settings)  # what the PBX's API says for it, if it must be asked
        auth = source.recording_auth(url, settings) if source and source.recording_auth else None
        if auth is None and fetchable(url) and takes_urls(submitter):
            return self._send(call.id, submitter, Submission(metadata, target, channels, url=url))
        hosts = (*settings.recording_hosts, *(source.recording_hosts if source else ()))
        with download(
            url,
            hosts=hosts,
            max_bytes=settings.max_recording_bytes,
            timeout=settings.vendor_timeout_seconds,
            call_ref=str(call.pbx_call_id or call.id),
            auth=auth,
        ) as file:
            submission = Submission(metadata, target, channels, path=file.path, content_type=file.content_type)
            return self._send(call.id, submitter, submission)

    def _send(self, call_id: int, submitter: Submitter, submission: Submission) -> str | list[JobStatus]:
        # durable before the request goes out: an attempt that dies from here on may have made a
        # vendor job (look it up), one that died before (downloading, say) made none (send again)
        with self.db.write() as session:
            session.execute(update(Call).where(Call.id == call_id).values(transcription_state=SENDING))
        if isinstance(submitter, TranscribesAtOnce):
            parts = submitter.transcribe_now(self.http, self.settings, submission)
            if parts:
                return parts
        return submitter.submit(self.http, self.settings, submission)

    def _check_arrived(self, claim: Claim, call: Call, vendor: str) -> None:
        """The submission's wait is over: done if a transcript came, else ask the vendor, if it can say."""
        with self.db.read() as session:
            arrived = session.scalar(select(TranscriptPart.id).where(TranscriptPart.call_id == call.id).limit(1))
        if arrived is not None:
            self._record(claim, lambda s, j: outbox.complete(s, j, {"transcript": "received"}, time.time()))
            return
        minutes = self.settings.transcribe_timeout_minutes
        submitter = SUBMITTERS[vendor]
        if not isinstance(submitter, AsksStatus):
            self._give_up(claim, call.id, f"{vendor} did not call back within {minutes:g} minutes")
            return
        try:
            status = submitter.status(self.http, self.settings, call.transcription_job_id or "")
        except VendorBusy as busy:
            self._back_off(claim, busy, "asked again")
            return
        except VendorRejected as error:
            self._give_up(claim, call.id, f"{vendor} did not call back and its job could not be read: {error}")
            return
        except VendorError as error:
            self._retry(claim, call.id, f"{vendor} did not call back; asking for its job's status: {error}")
            return
        if status.state == "failed":
            self._give_up(claim, call.id, f"{vendor} could not transcribe the recording: {status.reason}")
        elif status.state == "processing":
            self._wait_longer(claim, call, vendor, submitter)
        else:
            log.info("vendor asked after its callback did not come: the job is done", vendor=vendor)
            self._store_callbacks(claim, call, vendor, [status], "asked of the vendor")

    def _store_callbacks(self, claim: Claim, call: Call, vendor: str, parts: list[JobStatus], how: str) -> None:
        """Store the callbacks the vendor would have sent, as its hook would have stored them, and end
        the job: each event's fold places the transcript (and fetches it) as for any callback."""
        query = callback_query(self.settings, call.portal, call.pbx or "", call.pbx_call_id or "")
        stored_parts: list[tuple[RawEvent, str]] = []
        for part in parts:
            raw = RawEvent("stt", vendor, part.callback, query | dict(part.query), "application/json")
            try:
                parsed = parse_transcript(self.sources, vendor, raw.body, raw.query)
            except (ValidationError, KeyError) as error:  # the vendor's answer reads differently from its callback
                self._give_up(claim, call.id, f"{vendor}'s transcript could not be read as its callback: {error}")
                return
            # the hook's key: a late real callback is a duplicate
            stored_parts.append((raw, transcript_key(raw, parsed.result, parsed.options)))

        def apply(session: Session, job: Job) -> None:
            events = [store_event_in(session.connection(), raw, key) for raw, key in stored_parts]
            result = {
                "transcript": how,
                "event_ids": [stored.event_id for stored in events],
                "duplicate": all(stored.duplicate for stored in events),
            }
            outbox.complete(session, job, result, time.time())
            if how == TRANSCRIBED_AT_ONCE:
                row = session.get_one(Call, call.id)
                row.transcription_state, row.transcription_error = "transcribed", None
                row.transcription_submitted_at = time.time()

        self._record(claim, apply)

    def _wait_longer(self, claim: Claim, call: Call, vendor: str, submitter: Submitter) -> None:
        """The vendor is still at it: ask again later (no attempt spent), for MAX_WAIT_PERIODS periods
        of B24SCRIBE_TRANSCRIBE_TIMEOUT_MINUTES in all. A vendor asked early (`poll_seconds`) is asked
        again after as long as it has taken so far (doubling), within that same bound."""
        minutes = self.settings.transcribe_timeout_minutes
        poll = getattr(submitter, "poll_seconds", None)
        submitted_at = call.transcription_submitted_at or time.time()

        def apply(session: Session, job: Job) -> None:
            now = time.time()
            periods = int((job.result or {}).get("still_processing", 0)) + 1
            ends = submitted_at + MAX_WAIT_PERIODS * minutes * 60
            if poll is not None and now < ends:
                wait = min(max(float(poll), now - submitted_at), minutes * 60, ends - now)
            elif poll is None and periods < MAX_WAIT_PERIODS:
                wait = minutes * 60
            else:
                waited = round((now - submitted_at) / 60, 1) if poll is not None else periods * minutes
                reason = f"{vendor} was still processing the recording after {waited:g} minutes"
                outbox.kill(session, job, reason, now)
                row = session.get_one(Call, call.id)
                row.transcription_state, row.transcription_error = "failed", reason
                return
            job.result = {**(job.result or {}), "still_processing": periods}
            reason = f"{WAITING_FOR_CALLBACK} ({vendor} says the job is still processing)"
            outbox.defer(session, job, now + wait, reason, now)

        self._record(claim, apply)

    def _back_off(self, claim: Claim, busy: VendorBusy, then: str) -> None:
        """The vendor's 429: wait its Retry-After, without spending an attempt."""
        until, reason = time.time() + busy.retry_after, f"{busy} ({then} after {busy.retry_after:g} s)"
        self._record(claim, lambda s, j: outbox.defer(s, j, until, reason[:MAX_ERROR], time.time()))

    def _give_up(self, claim: Claim, call_id: int, reason: str) -> None:
        reason = reason[:MAX_ERROR]

        def apply(session: Session, job: Job) -> None:
            outbox.kill(session, job, reason, time.time())
            row = session.get_one(Call, call_id)
            row.transcription_state, row.transcription_error = "failed", reason

        self._record(claim, apply)

    def _retry(self, claim: Claim, call_id: int, reason: str, ambiguous: bool = False) -> None:
        reason, schedule = reason[:MAX_ERROR], self.recorder.retry_schedule

        def apply(session: Session, job: Job) -> None:
            outbox.retry_later(session, job, reason, time.time(), ambiguous=ambiguous, schedule=schedule)
            row = session.get_one(Call, call_id)
            row.transcription_error = reason
            if job.state == "dead":
                row.transcription_state = "failed"

        self._record(claim, apply)

    def _record(self, claim: Claim, apply: Apply, on_lost: OnLost | None = None) -> None:
        self.recorder.record(claim, apply, on_lost=on_lost)


def _first_wait(submitter: Submitter, timeout_seconds: float) -> float:
    """How long after the submission its transcript is first looked for: the timeout, or sooner for
    a vendor whose result may come to no callback of the job's own (`poll_seconds`: Azure, whose web
    hook belongs to the Speech resource and may not be registered)."""
    poll = getattr(submitter, "poll_seconds", None)
    return min(float(poll), timeout_seconds) if poll is not None else timeout_seconds


def _keep(session: Session, submitted: _Submitted) -> None:
    """The lease was lost but the vendor took the recording: keep its job id (a re-run finds it)."""
    row = session.get_one(Call, submitted.call_id)
    if not row.transcription_job_id:
        row.transcription_job_id, row.transcription_vendor = submitted.job_id, submitted.vendor
        row.transcription_state, row.transcription_submitted_at = "submitted", time.time()


def _record_submitted(session: Session, job: Job, submitted: _Submitted) -> None:
    now = time.time()
    row = session.get_one(Call, submitted.call_id)
    row.transcription_job_id, row.transcription_vendor = submitted.job_id, submitted.vendor
    row.transcription_state, row.transcription_submitted_at, row.transcription_error = "submitted", now, None
    job.result = {"vendor": submitted.vendor, "vendor_job_id": submitted.job_id}
    # not done yet: the job comes back when the wait is over, to see that the transcript came
    outbox.defer(session, job, submitted.until, WAITING_FOR_CALLBACK, now)

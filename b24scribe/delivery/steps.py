"""The Bitrix24 steps of a call: register → finish → attachRecord → attachTranscription.

Each step reads what it needs, asks whether it is already done, sends at most one request (plus the
look-up before a resend) through the portal sender, and records a typed outcome: a small frozen
dataclass saying what happened (`Registered`, `Finished`, `Attached`, …; `b24scribe.delivery.outcomes`
has them and what each writes). The vendor fetch step lives in `b24scribe.delivery.fetches`.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import requests
import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from b24scribe.bitrix24 import (
    Bitrix24Error,
    OperationLimitError,
    PermanentError,
    ThrottledError,
    is_finish_call_not_found,
    is_unknown_user,
)
from b24scribe.db import Database
from b24scribe.delivery import outcomes
from b24scribe.delivery.download import Downloaded, DownloadFailed, NotReady, RecordingError, Refused, download
from b24scribe.delivery.outcomes import (
    Attached,
    DefaultUser,
    Finished,
    GivenUp,
    Outcome,
    RecordAttached,
    RecordNotAttached,
    RegisterAgain,
    Registered,
    Skipped,
    WaitForParts,
    WaitForRecording,
    Waiting,
    recording_on_its_way,
)
from b24scribe.delivery.params import (
    ATTACH,
    ATTACH_RECORD,
    FINISH,
    REGISTER,
    STATISTICS,
    build_attach,
    current_parts,
    finish_params,
    register_params,
    transcript_digest,
)
from b24scribe.delivery.recording import Recorder
from b24scribe.delivery.sender import PortalSender
from b24scribe.delivery.submit import SUBMITTERS, ReportsCost, VendorError
from b24scribe.events import PARTS_WAIT_SECONDS
from b24scribe.models import AttachLedger, Call, InboundEvent, TranscriptPart
from b24scribe.outbox import Claim
from b24scribe.settings import Settings
from b24scribe.sources import PbxSource, Sources

log = structlog.get_logger(__name__)

# A recording up to this size goes inline (FILENAME + FILE_CONTENT, base64 in the JSON body); a
# larger one through the portal's upload URL, streamed from disk (contract §9).
INLINE_RECORDING_BYTES = 4 * 1024 * 1024
NOT_FINISHED_IN_STATISTICS = "Looks like it is not finished yet"


class Steps:
    """register, finish and attach for claimed jobs; `record` writes what each step found."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        sender: PortalSender,
        recorder: Recorder,
        sources: Sources,
        vendor_http: requests.Session,
    ) -> None:
        self.vendor_http = vendor_http  # for what the STT vendors are asked (a job's cost)
        self.db = db
        self.settings = settings
        self.sender = sender
        self.recorder = recorder
        self.sources = sources

    # -- register ---------------------------------------------------------------------------

    def register(self, claim: Claim, call: Call) -> None:
        if call.stage != "new":
            self.record(claim, Skipped("already registered"))
            return
        params = register_params(call, self.settings)
        if "USER_ID" not in params and "USER_PHONE_INNER" not in params:
            self.record(
                claim,
                GivenUp("no Bitrix24 user for this call: the PBX sent no extension; set B24SCRIBE_DEFAULT_USER_ID"),
            )
            return
        try:
            response = self.sender.send(claim, REGISTER, params)
        except Bitrix24Error as error:
            if is_unknown_user(error) and "USER_PHONE_INNER" in params and self.settings.default_user_id:
                self.record(claim, DefaultUser(call.id, self.settings.default_user_id, error.description))
                return
            self.sender.fail(claim, error)
            return
        b24_call_id = f"dry-run.{call.id}" if response is None else str(response.result["CALL_ID"])
        self.record(claim, Registered(call.id, b24_call_id, params, response is None))

    # -- finish -----------------------------------------------------------------------------

    def finish(self, claim: Claim, call: Call) -> None:
        if call.stage == "finished":
            self.record(claim, Skipped("already finished"))
            return
        if call.stage != "registered":
            self.record(claim, Waiting("waiting for register"))
            return
        params = finish_params(call, self.settings)
        try:
            response = self.sender.send(claim, FINISH, params)
        except Bitrix24Error as error:
            if is_finish_call_not_found(error) and call.b24_call_id:
                self._finish_not_found(claim, call, error)
                return
            self.sender.fail(claim, error)
            return
        self.record(claim, Finished(call.id, params, None if response is None else response.result))

    def _finish_not_found(self, claim: Claim, call: Call, error: Bitrix24Error) -> None:
        """finish is not idempotent: after "Call is not found" look whether it was finished already."""
        try:
            rows = self._statistics(claim, call.b24_call_id or "")
        except PermanentError:
            rows = None  # the portal denies voximplant.statistic.get
        except Bitrix24Error as lookup_error:
            self.sender.fail(claim, lookup_error, " (while checking whether the call was already finished)")
            return
        if rows or (rows is None and claim.ambiguous):
            # Our earlier attempt landed (or, unverifiable, most likely did after a lost answer).
            self.record(claim, Finished(call.id, finish_params(call, self.settings), rows[0] if rows else {}))
            return
        # The registration is gone (finished by someone else's 30-day cleanup, or never made):
        # register again and finish that, rather than lose the call.
        self.record(claim, RegisterAgain(call.id, call.portal, f"{error.description}: registering the call again"))

    def _statistics(self, claim: Claim, b24_call_id: str) -> list[dict[str, Any]]:
        response = self.sender.send(claim, STATISTICS, {"FILTER": {"CALL_ID": b24_call_id}})
        result = response.result if response else []
        return [row for row in result if isinstance(row, dict)] if isinstance(result, list) else []

    # -- attach -----------------------------------------------------------------------------

    def attach(self, claim: Claim, call: Call) -> None:
        if call.stage != "finished":
            self.record(claim, Waiting("waiting for the call to finish"))
            return
        if call.recording_url and self._recording_on_its_way(call):
            # the recording goes first (contract §7), for B24SCRIBE_RECORDING_WAIT_MINUTES at most
            until = (call.finished_at or time.time()) + self.settings.recording_wait_minutes * 60
            if time.time() < until:
                self.record(claim, WaitForRecording(call.id, until))
                return
        with self.db.read() as session:
            parts = list(session.scalars(_PARTS, {"b_call": call.id}))
            session.expunge_all()
            chosen = current_parts(parts)
            if (other_until := _other_part_expected_until(session, chosen)) is not None and time.time() < other_until:
                self.record(claim, WaitForParts(other_until))
                return
            params = build_attach(call, parts, self.settings)
            attached = _attached_ids(session, call)
        if any(part.segments is None for part in chosen):
            # A part's text went with retention: sending the rest would replace the whole
            # transcript on the card with a partial one. Fails closed; the card keeps what it has.
            reason = (
                "a part of this call's transcript was purged after B24SCRIBE_RETENTION_DAYS; "
                "sending the rest would replace the transcript in Bitrix24 with a partial one"
            )
            self.record(claim, GivenUp(reason))
            return
        if params is None:
            self.record(claim, Skipped("no completed transcript"))
            return
        digest = transcript_digest(params)
        request: dict[str, Any] = params  # what goes, and what the outcome records (a cost is added below)
        part_ids = tuple(p.id for p in chosen)

        def attached_as(
            transcript_id: int | None, possible_duplicate: bool = False, dry_run: bool = False, note: str | None = None
        ) -> Attached:
            at = time.time()
            return Attached(
                call.portal,
                call.b24_call_id,
                part_ids,
                request,
                digest,
                transcript_id,
                at,
                possible_duplicate,
                dry_run,
                note,
            )

        if digest in attached:
            self.record(claim, attached_as(attached[digest]))
            return
        if not request["MESSAGES"]:
            self.record(claim, attached_as(None, note="no speech: nothing to attach"))
            return
        possible_duplicate = False
        if claim.ambiguous and not self.sender.dry_run:
            try:
                rows = self._statistics(claim, call.b24_call_id or "")
                landed = next((r.get("TRANSCRIPT_ID") for r in rows if r.get("TRANSCRIPT_ID")), None)
                if landed and int(landed) not in set(attached.values()):
                    self.record(claim, attached_as(int(landed)))
                    return
            except PermanentError:
                possible_duplicate = True  # the portal denies the lookup: resend and say so
            except Bitrix24Error as error:
                self.sender.fail(claim, error, " (while checking whether the transcript already landed)")
                return
        # asked only now that the transcript goes; the ledger's key (taken above) is the transcript
        # alone, so a cost the vendor reports on one attempt and not the next never makes it look new
        if "COST" not in request and (cost := self._vendor_cost(call)) is not None:
            request = {**request, "COST": cost[0], "COST_CURRENCY": cost[1]}
        try:
            response = self.sender.send(claim, ATTACH, request)
        except Bitrix24Error as error:
            self.sender.fail(claim, error)
            return
        transcript_id = None if response is None else int(response.result["TRANSCRIPT_ID"])
        self.record(claim, attached_as(transcript_id, possible_duplicate=possible_duplicate, dry_run=response is None))

    def _vendor_cost(self, call: Call) -> tuple[float, str] | None:
        """What the vendor b24scribe submitted the call to says its transcription cost (contract
        §10), where it says (`ReportsCost`). Best effort: the transcript never waits for it."""
        submitter = SUBMITTERS.get(call.transcription_vendor or "")
        if not call.transcription_job_id or not isinstance(submitter, ReportsCost):
            return None
        try:
            return submitter.cost(self.vendor_http, self.settings, call.transcription_job_id)
        except VendorError as error:
            log.info("the vendor's cost could not be read", vendor=submitter.name, error=str(error)[:200])
            return None

    def _recording_on_its_way(self, call: Call) -> bool:
        with self.db.read() as session:
            return recording_on_its_way(session, call.id)

    # -- attachRecord -----------------------------------------------------------------------

    def attach_record(self, claim: Claim, call: Call) -> None:
        """Attach the call's latest recording: by URL (`url` mode), or downloaded from the allowed
        hosts and uploaded (`upload` mode). Never the same file twice; a new file replaces the old."""
        if call.stage != "finished":
            self.record(claim, Waiting("waiting for the call to finish"))
            return
        url = call.recording_url
        if not url:
            self.record(claim, Skipped("no recording reported"))
            return
        if self.sender.dry_run:
            self.record(
                claim, RecordAttached(call.id, url, "dry-run", {"CALL_ID": call.b24_call_id, "RECORD_URL": url})
            )
            return
        if self.settings.recording_mode == "url":
            if call.recording_state == "attached" and call.recording_attached_url == url:
                params = {"CALL_ID": call.b24_call_id, "RECORD_URL": url}
                self.record(claim, RecordAttached(call.id, url, "attached", params, note="attached already"))
                return
            try:
                record_url = resolve_recording(self.sources.pbx.get(call.pbx or ""), url, self.settings)
            except RecordingError as error:
                retry = not isinstance(error, Refused)
                self.record(
                    claim, RecordNotAttached(call.id, url, f"the recording's URL was not given: {error}", retry)
                )
                return
            params = {"CALL_ID": call.b24_call_id, "RECORD_URL": record_url}
            if self._send_record(claim, call, url, params):
                self.record(claim, RecordAttached(call.id, url, "attached", params))
            return
        source = self.sources.pbx.get(call.pbx or "")
        hosts = (*self.settings.recording_hosts, *(source.recording_hosts if source else ()))
        try:
            file_url = resolve_recording(source, url, self.settings)  # `url` stays the call's own
            auth = source.recording_auth(file_url, self.settings) if source and source.recording_auth else None
            with download(
                file_url,
                hosts=hosts,
                max_bytes=self.settings.max_recording_bytes,
                timeout=self.settings.vendor_timeout_seconds,
                call_ref=_file_stem(call),
                auth=auth,
            ) as file:
                self._upload(claim, call, url, file)
        except NotReady as error:
            self.record(claim, RecordNotAttached(call.id, url, f"the recording is not ready yet: {error}", retry=True))
        except DownloadFailed as error:
            self.record(claim, RecordNotAttached(call.id, url, f"the recording could not be downloaded: {error}", True))
        except Refused as error:
            self.record(claim, RecordNotAttached(call.id, url, f"the recording was refused: {error}", retry=False))

    def _upload(self, claim: Claim, call: Call, url: str, file: Downloaded) -> None:
        if call.recording_state == "attached" and call.recording_sha256 == file.sha256:
            note = "the same file is attached already"
            params = {"CALL_ID": call.b24_call_id, "FILENAME": file.filename}
            self.record(claim, RecordAttached(call.id, url, "attached", params, file.sha256, file.filename, note))
            return
        # Bitrix24 compares the extension case-sensitively ("REC.WAV" is a "wrong file extension")
        stem, dot, extension = file.filename.rpartition(".")
        filename = f"{stem}{dot}{extension.lower()}"
        base: dict[str, Any] = {"CALL_ID": call.b24_call_id, "FILENAME": filename}
        if file.size <= INLINE_RECORDING_BYTES:
            content = base64.b64encode(file.path.read_bytes()).decode("ascii")
            if not self._send_record(claim, call, url, {**base, "FILE_CONTENT": content}):
                return
            sent = {**base, "FILE_CONTENT": f"<{file.size} bytes, base64>"}
        else:
            answer = self._send_record(claim, call, url, base)
            if not answer:
                return
            result = answer.result if answer is not True else None
            upload_url = result.get("uploadUrl") if isinstance(result, dict) else None
            if not isinstance(upload_url, str) or not isinstance(result, dict):
                reason = "attachRecord gave no uploadUrl for a file sent without FILE_CONTENT"
                self.record(claim, RecordNotAttached(call.id, url, reason, retry=True))
                return
            field = result.get("fieldName") if isinstance(result.get("fieldName"), str) else "file"
            content_type = "audio/mpeg" if filename.endswith(".mp3") else "audio/wav"
            try:
                self.sender.upload(claim, upload_url, str(field), file.path, filename, content_type)
            except Bitrix24Error as error:
                self._record_failed(claim, call, url, error, " (uploading the file)")
                return
            sent = {**base, "upload": f"{file.size} bytes to the portal's upload URL"}
        self.record(claim, RecordAttached(call.id, url, "attached", sent, file.sha256, filename))

    def _send_record(self, claim: Claim, call: Call, url: str, params: dict[str, Any]) -> Any:
        """Send attachRecord: its response (True in dry-run), or False once the failure is recorded."""
        try:
            response = self.sender.send(claim, ATTACH_RECORD, params)
        except Bitrix24Error as error:
            self._record_failed(claim, call, url, error)
            return False
        return True if response is None else response

    def _record_failed(self, claim: Claim, call: Call, url: str, error: Bitrix24Error, note: str = "") -> None:
        if isinstance(error, ThrottledError | OperationLimitError):
            self.sender.fail(claim, error)  # the portal's pause, no attempt spent
            return
        retry = error.retryable or NOT_FINISHED_IN_STATISTICS in error.description
        reason = f"attachRecord: {error.code + ': ' if error.code else ''}{error.description}{note}"
        self.record(claim, RecordNotAttached(call.id, url, reason, retry))

    def record(self, claim: Claim, outcome: Outcome) -> None:
        """Queue what the outcome changes, for the batch's next flush."""
        outcomes.record(self.recorder, claim, outcome)


def resolve_recording(source: PbxSource | None, url: str, settings: Settings) -> str:
    """The file's own URL: the call's, or what its PBX's API says for it (Zadarma names a recording
    by an API request); NotReady, Refused or DownloadFailed when the PBX cannot say yet."""
    if source is None or source.resolve_recording is None:
        return url
    with requests.Session() as http:
        return source.resolve_recording(url, settings, http)


def _other_part_expected_until(session: Session, chosen: list[TranscriptPart]) -> float | None:
    """When the wait for the transcript's other channel ends, if its callbacks said `&parts=2` and
    only one channel's file has come (contract §11); None: nothing to wait for."""
    slots = {part.channel_slot for part in chosen if part.channel_slot is not None}
    if not slots or len(slots) >= 2:
        return None
    queries = session.scalars(select(InboundEvent.query).where(InboundEvent.id.in_([p.event_id for p in chosen])))
    if not any(isinstance(query, dict) and str(query.get("parts", "")).strip() == "2" for query in queries):
        return None
    return min(part.received_at for part in chosen) + PARTS_WAIT_SECONDS


# The attach step's reads, built once (one of each per transcript that goes).
_PARTS = select(TranscriptPart).where(TranscriptPart.call_id == bindparam("b_call"))
_LEDGER_IDS = select(AttachLedger.sha256, AttachLedger.b24_transcript_id).where(
    AttachLedger.portal == bindparam("b_portal"), AttachLedger.b24_call_id == bindparam("b_b24_call")
)


def _attached_ids(session: Session, call: Call) -> dict[str, int | None]:
    rows = session.connection().execute(_LEDGER_IDS, {"b_portal": call.portal, "b_b24_call": call.b24_call_id})
    return {sha: transcript_id for sha, transcript_id in rows}


def _file_stem(call: Call) -> str:
    """The file name's stem when the URL names none: the PBX's call id (Bitrix24's id otherwise)."""
    return str(call.pbx_call_id or call.b24_call_id or call.id)

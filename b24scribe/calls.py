"""What the admin API and the status page show about a call, its transcripts and jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from b24scribe.models import OPEN_JOB_STATES, QUEUED_JOB_STATES, Call, Job, JobKind, JobState, Portal, TranscriptPart


def iso(timestamp: float | None) -> str | None:
    """Unix seconds as ISO-8601 UTC."""
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


class AmbiguousCall(Exception):
    """Several portals have a call with this PBX call id: name the portal."""

    def __init__(self, portals: list[str]) -> None:
        super().__init__(f"portals {', '.join(portals)} each have a call with this id: name the portal")
        self.portals = portals


def submitted_call(session: Session, vendor: str, job_id: str, own_portal: str) -> dict[str, str] | None:
    """The query naming the call b24scribe submitted to `vendor` as its job `job_id` (contract §10:
    a callback that lost its query still finds its call); None when no call has that job."""
    row = session.execute(
        select(Call.portal, Call.pbx, Call.pbx_call_id)
        .where(Call.transcription_job_id == job_id[:128], Call.transcription_vendor == vendor)
        .limit(1)
    ).first()
    if row is None or not row.pbx or not row.pbx_call_id:
        return None
    naming = {"pbx": row.pbx, "call": row.pbx_call_id}
    if row.portal != own_portal:
        naming["portal"] = row.portal
    return naming


def find_by_pbx(session: Session, pbx: str, pbx_call_id: str, portal: str | None = None) -> Call | None:
    """The call a PBX reported under this id, on `portal` (calls are keyed per portal); without a
    portal, the one call with this id, or AmbiguousCall when several portals have one."""
    query = select(Call).where(Call.pbx == pbx, Call.pbx_call_id == pbx_call_id)
    if portal is not None:
        # a portal's name (domain), or an installed portal's member_id
        by_member = select(Portal.name).where(Portal.member_id == portal).scalar_subquery()
        query = query.where(or_(Call.portal == portal, Call.portal == by_member))
    found = list(session.scalars(query.order_by(Call.id).limit(10)))
    if len(found) > 1:
        raise AmbiguousCall(sorted(call.portal for call in found))
    return found[0] if found else None


def find_by_b24(session: Session, b24_call_id: str) -> Call | None:
    """The call Bitrix24 knows under this CALL_ID."""
    return session.scalars(select(Call).where(Call.b24_call_id == b24_call_id).order_by(Call.id).limit(1)).first()


def describe_job(job: Job, with_request: bool = False) -> dict[str, Any]:
    """A job as the admin API shows it."""
    shown: dict[str, Any] = {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "attempts": job.attempts,
        "next_attempt_at": iso(job.next_attempt_at) if job.state in QUEUED_JOB_STATES else None,
        "last_error": job.last_error,
        "dead_reason": job.dead_reason,
        "call": job.call_id,
        "result": job.result,
    }
    if with_request:
        shown["request"] = job.request
    return shown


def _transcript_state(part: TranscriptPart, call: Call, open_attach: Job | None) -> tuple[str, str | None]:
    if part.status == "failed":
        return "failed", part.failure_reason
    if part.status == "fetching":
        return "fetching", None
    if part.delivery_state in ("delivered", "empty", "dry-run"):
        return part.delivery_state, None
    if call.stage != "finished":
        needed = "registered and finished" if call.stage == "new" else "finished"
        return "waiting", f"waiting for the PBX to report the call so it can be {needed} in Bitrix24"
    if open_attach is not None and open_attach.state == JobState.DEAD:
        return "failed", open_attach.last_error  # given up: replay the job once the cause is fixed
    return "pending", open_attach.last_error if open_attach else None


def describe_call(session: Session, call: Call) -> dict[str, Any]:
    """A call's whole state: Bitrix24 CALL_ID, stage, transcripts and their delivery, jobs."""
    jobs = list(session.scalars(select(Job).where(Job.call_id == call.id).order_by(Job.id)))
    parts = list(
        session.scalars(select(TranscriptPart).where(TranscriptPart.call_id == call.id).order_by(TranscriptPart.id))
    )
    open_attach = next((j for j in reversed(jobs) if j.kind == JobKind.ATTACH and j.state != JobState.DONE), None)
    transcripts = []
    for part in parts:
        state, reason = _transcript_state(part, call, open_attach)
        transcripts.append(
            {
                "id": part.id,
                "vendor": part.vendor,
                "vendor_job_id": part.vendor_job_id,
                "channel": part.channel_slot,
                "received_at": iso(part.received_at),
                "segments": len(part.segments or []),
                "state": state,
                "reason": reason,
                "transcript_id": part.b24_transcript_id,
                "delivered_at": iso(part.delivered_at),
            }
        )
    return {
        "id": call.id,
        "pbx": call.pbx,
        "pbx_call_id": call.pbx_call_id,
        "b24_call_id": call.b24_call_id,
        "portal": call.portal,
        "external": call.external,
        "stage": call.stage,
        "registered": call.stage in ("registered", "finished"),
        "finished": call.stage == "finished",
        "direction": call.direction,
        "from": call.from_number,
        "to": call.to_number,
        "extension": call.extension,
        "user_id": call.user_id,
        "started_at": call.started_at,
        "duration": call.duration,
        "status": call.status,
        "last_error": call.last_error,
        "note": call.note,
        "recording": _recording(call, jobs),
        "transcription": _transcription(call),
        "transcripts": transcripts,
        "jobs": [describe_job(job, with_request=True) for job in jobs],
    }


def shown_url(url: str) -> str:
    """A recording URL without what may be a credential (userinfo, a presigned query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _recording(call: Call, jobs: list[Job]) -> dict[str, Any] | None:
    """The call's recording: attached, pending (its job is open), refused or failed, and why."""
    if not call.recording_url:
        return None
    open_job = next((j for j in reversed(jobs) if j.kind == JobKind.RECORD and j.state in OPEN_JOB_STATES), None)
    state = "pending" if open_job is not None or call.recording_state is None else call.recording_state
    return {
        "state": state,
        "reason": call.recording_error if state != "attached" else None,
        "url": shown_url(call.recording_url),
        "channels": call.recording_channels,
        "file": call.recording_file,
        "sha256": call.recording_sha256,
        "attached_at": iso(call.recording_attached_at),
    }


def _transcription(call: Call) -> dict[str, Any] | None:
    """What became of asking the vendor to transcribe the call (contract §10); None: never asked."""
    if call.transcription_state is None:
        return None
    return {
        "state": call.transcription_state,
        "vendor": call.transcription_vendor,
        "vendor_job_id": call.transcription_job_id,
        "submitted_at": iso(call.transcription_submitted_at),
        "reason": call.transcription_error,
    }

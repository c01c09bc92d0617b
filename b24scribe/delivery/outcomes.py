"""The typed outcomes of the Bitrix24 steps, and what each one writes when it is recorded.

A step (`b24scribe.delivery.steps`) ends in one of these small frozen dataclasses, saying what
happened; `record` queues the rows it changes (the job, its call, the transcript parts, the ledger)
for the batch's next group commit (`b24scribe.delivery.recording`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from b24scribe import outbox
from b24scribe.db import upsert_insert
from b24scribe.delivery.params import ATTACH, ATTACH_RECORD, FINISH, REGISTER
from b24scribe.delivery.recording import Recorder
from b24scribe.events import WAITING_FOR_PARTS
from b24scribe.models import OPEN_JOB_STATES, AttachLedger, Call, Job, JobKind, JobState, TranscriptPart
from b24scribe.outbox import Claim


@dataclass(frozen=True, slots=True)
class Skipped:
    """Nothing to send: the job is done as it is."""

    reason: str


@dataclass(frozen=True, slots=True)
class Waiting:
    """The call has not reached the stage the job needs: park it until it does."""

    reason: str


@dataclass(frozen=True, slots=True)
class WaitForRecording:
    """The call's recording is on its way: the transcript goes after it, at `until` at the latest
    (no attempt spent; `hurry` makes it due as soon as the recording's job ends)."""

    call_id: int
    until: float


@dataclass(frozen=True, slots=True)
class WaitForParts:
    """The transcript comes one file per channel and the other channel's has not come: wait for it
    until `until` at most (no attempt spent; the other part's fold makes the job due at once)."""

    until: float


@dataclass(frozen=True, slots=True)
class GivenUp:
    """No retry can mend this: the job is dead, with the reason."""

    reason: str


@dataclass(frozen=True, slots=True)
class Registered:
    """Bitrix24 registered the call (or, in dry-run, would have)."""

    call_id: int
    b24_call_id: str
    params: dict[str, Any]
    dry_run: bool


@dataclass(frozen=True, slots=True)
class DefaultUser:
    """The extension matches no Bitrix24 user: register again as the default user."""

    call_id: int
    user_id: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The call is finished in Bitrix24; `result` is what it answered (None: dry-run)."""

    call_id: int
    params: dict[str, Any]
    result: Any


@dataclass(frozen=True, slots=True)
class RegisterAgain:
    """Bitrix24 no longer knows the call: register it again, and finish that."""

    call_id: int
    portal: str
    reason: str


@dataclass(frozen=True, slots=True)
class Attached:
    """The call's transcript is on its card (or was already, or has no speech: `note`)."""

    portal: str
    b24_call_id: str | None
    part_ids: tuple[int, ...]
    params: dict[str, Any]
    digest: str
    transcript_id: int | None
    attached_at: float
    possible_duplicate: bool = False
    dry_run: bool = False
    note: str | None = None


@dataclass(frozen=True, slots=True)
class RecordAttached:
    """The call's recording is on its card (or, in dry-run, would have been; or was already)."""

    call_id: int
    url: str
    state: str  # attached | dry-run
    params: dict[str, Any]  # what was sent, FILE_CONTENT left out
    sha256: str | None = None
    filename: str | None = None
    note: str | None = None  # e.g. "the same file is attached already"


@dataclass(frozen=True, slots=True)
class RecordNotAttached:
    """The recording could not be attached: `retry` on the schedule (not ready yet, a transient
    failure), or never (refused: a host outside the allow-list, too large, not wav or mp3). Either
    way the call is finished and keeps its transcript; the reason shows on the call."""

    call_id: int
    url: str
    reason: str
    retry: bool


Outcome = (
    Skipped
    | Waiting
    | WaitForRecording
    | WaitForParts
    | GivenUp
    | Registered
    | DefaultUser
    | Finished
    | RegisterAgain
    | Attached
    | RecordAttached
    | RecordNotAttached
)

# The reason a transcript's attach job is put off while the call's recording is on its way
# (`outbox.hurry` makes it due as soon as the recording's job ends).
WAITING_FOR_RECORDING = "waiting for the call's recording to be attached first"


def record(recorder: Recorder, claim: Claim, outcome: Outcome) -> None:
    """Queue what the outcome changes, for the batch's next flush."""
    match outcome:
        case Skipped(reason):
            recorder.record(claim, lambda s, j: outbox.complete(s, j, {"skipped": reason}, time.time()))
        case Waiting(reason):
            recorder.record(claim, lambda s, j: outbox.wait_for_call(s, j, reason, time.time()))
        case WaitForRecording():
            recorder.record(claim, lambda s, j: _wait_for_recording(s, j, outcome))
        case WaitForParts(until):
            recorder.record(claim, lambda s, j: outbox.defer(s, j, until, WAITING_FOR_PARTS, time.time()))
        case GivenUp(reason):
            recorder.record(claim, lambda s, j: outbox.kill(s, j, reason, time.time()))
        case Registered():
            recorder.record(claim, lambda s, j: _registered(s, j, outcome))
        case DefaultUser():
            recorder.record(claim, lambda s, j: _default_user(s, j, outcome))
        case Finished():
            recorder.record(claim, lambda s, j: _finished(s, j, outcome))
        case RegisterAgain():
            recorder.record(claim, lambda s, j: _register_again(s, j, outcome))
        case Attached():
            recorder.record(claim, lambda s, j: _attached(s, j, outcome), on_lost=lambda s: _keep_the_fact(s, outcome))
        case RecordAttached():
            recorder.record(
                claim, lambda s, j: _record_attached(s, j, outcome), on_lost=lambda s: _keep_the_recording(s, outcome)
            )
        case RecordNotAttached():
            recorder.record(claim, lambda s, j: _record_not_attached(s, j, outcome, recorder.retry_schedule))


def _registered(session: Session, job: Job, outcome: Registered) -> None:
    now = time.time()
    row = session.get_one(Call, outcome.call_id)
    row.b24_call_id, row.stage, row.registered_at, row.last_error = outcome.b24_call_id, "registered", now, None
    job.request = {"method": REGISTER, "params": outcome.params}
    outbox.complete(session, job, {"CALL_ID": outcome.b24_call_id, "dry_run": outcome.dry_run}, now)
    outbox.release_waiting(session, outcome.call_id, JobKind.FINISH, now)


def _default_user(session: Session, job: Job, outcome: DefaultUser) -> None:
    now = time.time()
    row = session.get_one(Call, outcome.call_id)
    row.user_id = outcome.user_id
    row.note = f"extension {row.extension!r} matches no Bitrix24 user; used B24SCRIBE_DEFAULT_USER_ID"
    outbox.defer(session, job, now, outcome.reason, now)


def _finished(session: Session, job: Job, outcome: Finished) -> None:
    now = time.time()
    row = session.get_one(Call, outcome.call_id)
    row.stage, row.finished_at, row.last_error = "finished", now, None
    job.request = {"method": FINISH, "params": outcome.params}
    result = outcome.result
    summary: dict[str, object] = {"ID": result.get("ID")} if isinstance(result, dict) else {"dry_run": result is None}
    outbox.complete(session, job, summary, now)
    outbox.release_waiting(session, outcome.call_id, JobKind.ATTACH, now)
    outbox.release_waiting(session, outcome.call_id, JobKind.RECORD, now)
    outbox.revive_orphans(session, outcome.call_id)


def _register_again(session: Session, job: Job, outcome: RegisterAgain) -> None:
    now = time.time()
    row = session.get_one(Call, outcome.call_id)
    row.stage, row.b24_call_id = "new", None
    row.last_error = outcome.reason
    outbox.enqueue(session, JobKind.REGISTER, call_id=outcome.call_id, portal=outcome.portal, now=now)
    outbox.wait_for_call(session, job, "waiting for register", now)


def _attached(session: Session, job: Job, outcome: Attached) -> None:
    now = time.time()
    if not outcome.dry_run and outcome.note is None:
        _insert_ledger(session, outcome)
    session.connection().execute(
        _PARTS_DELIVERED,
        {
            "b_parts": list(outcome.part_ids),
            "b_state": "empty" if outcome.note else "dry-run" if outcome.dry_run else "delivered",
            "b_transcript": outcome.transcript_id,
            "b_now": now,
        },
    )
    job.request = {"method": ATTACH, "params": outcome.params}
    result: dict[str, Any] = {"TRANSCRIPT_ID": outcome.transcript_id, "dry_run": outcome.dry_run}
    if outcome.possible_duplicate:
        result["possible_duplicate"] = True
    if outcome.note:
        result["note"] = outcome.note
    outbox.complete(session, job, result, now)


# The attach outcome's statements, built once (one per transcript that goes).
_PARTS_DELIVERED = (
    update(TranscriptPart)
    .where(TranscriptPart.id.in_(bindparam("b_parts", expanding=True)))
    .values(
        delivery_state=bindparam("b_state"),
        b24_transcript_id=bindparam("b_transcript"),
        delivered_at=bindparam("b_now"),
    )
)
_LEDGER_KEY = ["portal", "b24_call_id", "sha256"]
_LEDGER = {
    dialect: upsert_insert(dialect)(AttachLedger).on_conflict_do_nothing(index_elements=_LEDGER_KEY)
    for dialect in ("sqlite", "postgresql")
}


def _keep_the_fact(session: Session, outcome: Attached) -> None:
    # the lease is lost but the transcript landed: keep the fact, or a re-run would attach again
    if outcome.transcript_id is not None and not outcome.dry_run:
        _insert_ledger(session, outcome)


def _insert_ledger(session: Session, outcome: Attached) -> None:
    values = {
        "portal": outcome.portal,
        "b24_call_id": outcome.b24_call_id,
        "sha256": outcome.digest,
        "b24_transcript_id": outcome.transcript_id,
        "possible_duplicate": outcome.possible_duplicate,
        "attached_at": outcome.attached_at,
    }
    connection = session.connection()
    connection.execute(_LEDGER[connection.dialect.name], values)


def recording_on_its_way(session: Session, call_id: int) -> bool:
    """The call has a record job not yet over."""
    return session.scalar(_RECORD_OPEN, {"b_call": call_id}) is not None


_RECORD_OPEN = (
    select(Job.id)
    .where(Job.call_id == bindparam("b_call"), Job.kind == JobKind.RECORD, Job.state.in_(OPEN_JOB_STATES))
    .limit(1)
)


def _wait_for_recording(session: Session, job: Job, outcome: WaitForRecording) -> None:
    # Asked again in the outcome's transaction (which holds the call: its row lock on PostgreSQL,
    # the one writer on SQLite): a record job that ended since the step looked has hurried nobody
    # yet, so this one goes at once instead of waiting out the whole time.
    now = time.time()
    until = outcome.until if recording_on_its_way(session, outcome.call_id) else now
    outbox.defer(session, job, until, WAITING_FOR_RECORDING, now)


def _keep_the_recording(session: Session, outcome: RecordAttached) -> None:
    # the lease is lost but the file landed: keep the fact, or a re-run would attach it again
    if outcome.state == "attached":
        _recording_on_call(session, outcome)


def _recording_on_call(session: Session, outcome: RecordAttached) -> Call:
    """Write on the call what was attached (kept even when the lease was lost: it landed)."""
    row = session.get_one(Call, outcome.call_id)
    row.recording_state, row.recording_error = outcome.state, None
    row.recording_attached_url, row.recording_attached_at = outcome.url, time.time()
    if outcome.sha256 is not None:
        row.recording_sha256 = outcome.sha256
    if outcome.filename is not None:
        row.recording_file = outcome.filename
    return row


def _record_attached(session: Session, job: Job, outcome: RecordAttached) -> None:
    now = time.time()
    row = _recording_on_call(session, outcome)
    job.request = {"method": ATTACH_RECORD, "params": outcome.params}
    result: dict[str, Any] = {"state": outcome.state}
    if outcome.note:
        result["note"] = outcome.note
    outbox.complete(session, job, result, now)
    _recording_settled(session, row, outcome.url, now)


def _record_not_attached(session: Session, job: Job, outcome: RecordNotAttached, schedule: Any) -> None:
    now = time.time()
    row = session.get_one(Call, outcome.call_id)
    row.recording_error = outcome.reason
    if outcome.retry:
        outbox.retry_later(session, job, outcome.reason, now, schedule=schedule)
    else:
        outbox.kill(session, job, outcome.reason, now)
    if job.state == JobState.DEAD:
        row.recording_state = "failed" if outcome.retry else "refused"
        _recording_settled(session, row, outcome.url, now)


def _recording_settled(session: Session, row: Call, url: str, now: float) -> None:
    """The recording's job is over: a transcript put off for it goes now; a URL reported while the
    job ran (a newer recording) gets a job of its own (folding adds none while one is open)."""
    outbox.hurry(session, row.id, JobKind.ATTACH, WAITING_FOR_RECORDING)
    if row.recording_url and row.recording_url != url:
        outbox.enqueue(session, JobKind.RECORD, call_id=row.id, portal=row.portal, now=now)

"""The typed outcomes of the Bitrix24 steps, and what each one writes when it is recorded.

A step (`b24scribe.delivery.steps`) ends in one of these small frozen dataclasses, saying what
happened; `record` queues the rows it changes (the job, its call, the transcript parts, the ledger)
for the batch's next group commit (`b24scribe.delivery.recording`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from b24scribe import outbox
from b24scribe.db import upsert_insert
from b24scribe.delivery.params import ATTACH, FINISH, REGISTER
from b24scribe.delivery.recording import Recorder
from b24scribe.models import AttachLedger, Call, Job, JobKind, TranscriptPart
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


Outcome = Skipped | Waiting | GivenUp | Registered | DefaultUser | Finished | RegisterAgain | Attached


def record(recorder: Recorder, claim: Claim, outcome: Outcome) -> None:
    """Queue what the outcome changes, for the batch's next flush."""
    match outcome:
        case Skipped(reason):
            recorder.record(claim, lambda s, j: outbox.complete(s, j, {"skipped": reason}, time.time()))
        case Waiting(reason):
            recorder.record(claim, lambda s, j: outbox.wait_for_call(s, j, reason, time.time()))
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
    session.execute(
        update(TranscriptPart)
        .where(TranscriptPart.id.in_(outcome.part_ids))
        .values(
            delivery_state="empty" if outcome.note else "dry-run" if outcome.dry_run else "delivered",
            b24_transcript_id=outcome.transcript_id,
            delivered_at=now,
        )
    )
    job.request = {"method": ATTACH, "params": outcome.params}
    result: dict[str, Any] = {"TRANSCRIPT_ID": outcome.transcript_id, "dry_run": outcome.dry_run}
    if outcome.possible_duplicate:
        result["possible_duplicate"] = True
    if outcome.note:
        result["note"] = outcome.note
    outbox.complete(session, job, result, now)


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
    insert = upsert_insert(session)
    session.execute(
        insert(AttachLedger).values(**values).on_conflict_do_nothing(index_elements=["portal", "b24_call_id", "sha256"])
    )

"""Folding a batch of stored events into calls, transcripts and jobs with a few set-based statements.

The batch is planned in Python: its calls are looked up in one query (created when missing), their
open register, finish and attach jobs in another; then each event is folded in event-id order into
those rows held in memory, exactly as one event at a time would (later non-empty values win, a
register and a finish are queued once, a transcript's attach waits for its call to finish). What
changed is written with one executemany statement per table. Events of one call in one batch fold
in order; an event that arrives late erases nothing already known and queues no job twice.

On PostgreSQL several workers fold at once: a batch first takes an advisory lock per call key (in
one order for every worker), then locks its calls' rows, so two workers folding events of the same
call take turns instead of deadlocking. On SQLite the write lock makes each batch the only writer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Connection, Table, and_, bindparam, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from b24scribe.events import PART_DEFAULTS, WAITING_FOR_PARTS, CallEvent, part_values
from b24scribe.models import QUEUED_JOB_STATES, Call, InboundEvent, Job, JobKind, JobState, TranscriptPart
from b24scribe.outbox import OPEN_STATES
from b24scribe.parsing import ParsedTranscript
from b24scribe.transcript import Direction

# What an event can change on its call (CallState.merge), written back for every call that changed.
MERGED = (
    "direction",
    "from_number",
    "to_number",
    "extension",
    "user_id",
    "started_at",
    "line",
    "recording_url",
    "recording_channels",
    "answered",
    "finish_reported",
    "duration",
    "status",
    "transcribe",
    "transcription_state",
    "transcription_vendor",
    "updated_at",
)
_CALL = cast(Table, Call.__table__)
_JOB = cast(Table, Job.__table__)
_EVENT = cast(Table, InboundEvent.__table__)
_PART = cast(Table, TranscriptPart.__table__)
_CALL_COLUMNS = [_CALL.c[name] for name in ("id", "portal", "pbx", "pbx_call_id", "b24_call_id", "stage", *MERGED)]
_UPDATE_CALL = (
    update(_CALL).where(_CALL.c.id == bindparam("b_id")).values({name: bindparam(f"b_{name}") for name in MERGED})
)
_UPDATE_EVENT_CALL = update(_EVENT).where(_EVENT.c.id == bindparam("b_id")).values(call_id=bindparam("b_call"))
_JOB_VALUES = ("kind", "call_id", "event_id", "transcript_id", "portal", "state")
_INSERT_JOB = insert(_JOB).values(
    {name: bindparam(name) for name in _JOB_VALUES}
    | {
        "attempts": 0,
        "ambiguous": False,
        "next_attempt_at": bindparam("now"),
        "created_at": bindparam("now"),
        "updated_at": bindparam("now"),
    }
)
_INSERT_CALL = insert(_CALL).returning(_CALL.c.id, sort_by_parameter_order=True)
_INSERT_PART = insert(_PART).returning(_PART.c.id, sort_by_parameter_order=True)


@dataclass(frozen=True, slots=True)
class Readable:
    """A stored event, parsed again: what to fold into which portal's call."""

    portal: str
    content: CallEvent | ParsedTranscript


@dataclass(frozen=True, slots=True)
class Folding:
    """One stored event to fold: its id, its provider (PBX or vendor) and what it says."""

    event_id: int
    provider: str
    readable: Readable


@dataclass(slots=True)
class CallState:
    """A call's row as folding sees and changes it."""

    id: int
    portal: str
    stage: str
    direction: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    extension: str | None = None
    user_id: int | None = None
    started_at: str | None = None
    line: str | None = None
    recording_url: str | None = None
    recording_channels: int | None = None
    answered: bool = False
    finish_reported: bool = False
    duration: int | None = None
    status: str | None = None
    transcribe: bool = True
    transcription_state: str | None = None
    transcription_vendor: str | None = None
    updated_at: float = 0.0
    changed: bool = False
    open_kinds: set[str] = field(default_factory=set)  # kinds with a job not done or dead
    attach_queued: bool = False  # an attach job not yet started (waiting or pending)

    def merge(self, event: CallEvent, now: float) -> None:
        """Fold an event into the call: later non-empty values win, nothing known is erased.

        Status and duration come from `finished` events and from any event that carries a status
        (a multi-leg PBX reports each agent leg's outcome and talk time before the call ends). A call
        answered on any leg stays answered: an event with another status (a leg that was busy or
        not answered) changes neither its status, its duration nor its user; nor does a leg that is
        only starting (`started`) change its user.
        """
        # once answered, a started event is another leg ringing (a transfer): not yet the call's user
        other_leg = self.status == "answered" and (
            event.status not in (None, "", "answered") or (event.event == "started" and not event.status)
        )
        for attribute, value in (
            ("direction", event.direction.value if event.direction else None),
            ("from_number", event.from_number),
            ("to_number", event.to_number),
            ("extension", event.extension),
            ("user_id", event.user_id),
            ("started_at", event.started_at),
            ("line", event.line),
            ("recording_url", event.recording_url),
            ("recording_channels", event.recording_channels),
        ):
            if value not in (None, "") and not (other_leg and attribute in ("extension", "user_id")):
                setattr(self, attribute, value)
        if event.transcribe is False:
            self.transcribe = False  # the PBX said no for this call: it stays no
        if event.event == "answered":
            self.answered = True
        if event.event == "finished":
            self.finish_reported = True
        if (event.event == "finished" or event.status) and not other_leg:
            if event.duration is not None:
                self.duration = event.duration
            if event.status:
                self.status = event.status
                self.answered = self.answered or event.status == "answered"
        if self.answered and self.status not in (None, "answered"):
            # an answered call is never shown as missed: another leg's hangup (a queue member that
            # did not pick up, an IVR leg) does not undo an answer, in whichever order they arrive
            self.status = "answered"
        self.updated_at = now
        self.changed = True


@dataclass(frozen=True, slots=True)
class TranscribePolicy:
    """Which calls b24scribe submits to the STT vendor itself (contract §10)."""

    vendor: str
    min_seconds: float
    off_portals: frozenset[str] = frozenset()

    def wants(self, call: CallState) -> bool:
        """An answered call with a recording and enough talk, allowed by its PBX and its portal,
        not submitted yet (one request per call, ever)."""
        return (
            call.transcribe
            and call.transcription_state is None
            and call.finish_reported
            and call.status == "answered"
            and (call.duration or 0) >= self.min_seconds
            and bool(call.recording_url)
            and call.portal not in self.off_portals
        )


@dataclass(slots=True)
class _Plan:
    transcribe: TranscribePolicy | None = None
    calls_by_key: dict[tuple[str, ...], CallState] = field(default_factory=dict)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    parts: list[dict[str, Any]] = field(default_factory=list)
    fetches: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (index in parts, its fetch job)
    event_calls: list[dict[str, int]] = field(default_factory=list)
    # calls that got a completed part while their attach job may be put off for it (`&parts=2`)
    parts_came: set[int] = field(default_factory=set)


def _pbx_key(portal: str, pbx: str, pbx_call_id: str) -> tuple[str, ...]:
    return ("pbx", portal, pbx, pbx_call_id)  # per portal: two portals' PBXs never meet (contract §8)


def _b24_key(portal: str, b24_call_id: str) -> tuple[str, ...]:
    return ("b24", portal, b24_call_id)


def _unplaced(folding: Folding) -> bool:
    """A transcript whose callback names no call: its vendor's fetch will (`fetch_names_call`)."""
    content = folding.readable.content
    return not isinstance(content, CallEvent) and content.reference.is_empty()


def _call_key(folding: Folding) -> tuple[tuple[str, ...], str, Direction | None]:
    """Which call an event folds into: its key, the portal it would be created on, and a direction."""
    content = folding.readable.content
    if isinstance(content, CallEvent):
        return _pbx_key(folding.readable.portal, folding.provider, content.call_id), folding.readable.portal, None
    reference = content.reference
    if reference.b24_call_id:
        return (
            _b24_key(folding.readable.portal, reference.b24_call_id),
            folding.readable.portal,
            content.options.direction,
        )
    assert reference.pbx and reference.pbx_call_id  # parsing.call_reference checked it
    return _pbx_key(folding.readable.portal, reference.pbx, reference.pbx_call_id), folding.readable.portal, None


def _select_calls(
    connection: Connection, pbx_keys: Sequence[tuple[str, ...]], b24_keys: Sequence[tuple[str, ...]], lock: bool
) -> list[Any]:
    by_pbx: dict[tuple[str, str], list[str]] = {}
    for portal, pbx, pbx_call_id in pbx_keys:
        by_pbx.setdefault((portal, pbx), []).append(pbx_call_id)
    by_portal: dict[str, list[str]] = {}
    for portal, b24_call_id in b24_keys:
        by_portal.setdefault(portal, []).append(b24_call_id)
    conditions = [
        and_(_CALL.c.portal == portal, _CALL.c.pbx == pbx, _CALL.c.pbx_call_id.in_(ids))
        for (portal, pbx), ids in by_pbx.items()
    ]
    conditions += [and_(_CALL.c.portal == p, _CALL.c.b24_call_id.in_(ids)) for p, ids in by_portal.items()]
    if not conditions:
        return []
    query = select(*_CALL_COLUMNS).where(or_(*conditions)).order_by(_CALL.c.id)
    if lock:
        query = query.with_for_update()  # in id order: two workers never wait on each other in a circle
    return list(connection.execute(query))


def _state(row: Any) -> CallState:
    return CallState(
        id=row.id,
        portal=row.portal,
        stage=row.stage,
        **{name: getattr(row, name) for name in MERGED},
    )


def _index(plan: _Plan, rows: Sequence[Any], b24_keys: set[tuple[str, ...]]) -> dict[int, CallState]:
    states: dict[int, CallState] = {}
    for row in rows:  # in id order: the first call with a b24 CALL_ID is the one a transcript goes to
        state = states.setdefault(row.id, _state(row))
        if row.pbx is not None and row.pbx_call_id is not None:
            plan.calls_by_key.setdefault(_pbx_key(row.portal, row.pbx, row.pbx_call_id), state)
        if row.b24_call_id is not None and _b24_key(row.portal, row.b24_call_id) in b24_keys:
            plan.calls_by_key.setdefault(_b24_key(row.portal, row.b24_call_id), state)
    return states


# Locks every call key of a batch, in one order for all workers (PostgreSQL advisory locks, released
# at commit): row locks alone are taken in two rounds (existing calls, then new ones), and two
# workers could each hold a call of the first round while waiting for the other's new call.
_LOCK_KEYS = text(
    "SELECT count(pg_advisory_xact_lock(key))"
    " FROM (SELECT unnest(CAST(:keys AS bigint[])) AS key ORDER BY 1) AS ordered"
)


def _lock_keys(connection: Connection, keys: Iterable[tuple[str, ...]]) -> None:
    hashed = {
        int.from_bytes(hashlib.blake2b("\x1f".join(key).encode(), digest_size=8).digest(), "big", signed=True)
        for key in keys
    }
    connection.execute(_LOCK_KEYS, {"keys": sorted(hashed)})


def _resolve_calls(connection: Connection, batch: Sequence[Folding], now: float, lock: bool) -> _Plan:
    """Every call the batch folds into, found or created: one query, plus inserts for the new ones."""
    plan = _Plan()
    wanted: dict[tuple[str, ...], tuple[str, Direction | None]] = {}
    for folding in batch:
        if _unplaced(folding):
            continue
        key, portal, direction = _call_key(folding)
        wanted.setdefault(key, (portal, direction))
    if lock:
        _lock_keys(connection, wanted)
    pbx_keys = [k[1:] for k in wanted if k[0] == "pbx"]
    b24_keys = {k for k in wanted if k[0] == "b24"}
    states = _index(plan, _select_calls(connection, pbx_keys, [(k[1], k[2]) for k in b24_keys], lock), b24_keys)
    missing = sorted(k for k in wanted if k not in plan.calls_by_key)
    existing = dict(states)
    new_pbx = [k for k in missing if k[0] == "pbx"]
    rows = [
        {
            "portal": key[1],
            "pbx": key[2],
            "pbx_call_id": key[3],
            "stage": "new",
            "external": False,
            "answered": False,
            "finish_reported": False,
            "created_at": now,
            "updated_at": now,
        }
        for key in new_pbx
    ]
    if rows and lock:
        # the unique (portal, pbx, pbx_call_id) decides between two workers creating the same call
        connection.execute(
            postgresql.insert(_CALL).on_conflict_do_nothing(index_elements=["portal", "pbx", "pbx_call_id"]), rows
        )
        created = _index(plan, _select_calls(connection, [k[1:] for k in new_pbx], [], lock), set())
        states |= created
        existing |= created  # some may have been created (with jobs) by another worker meanwhile
    elif rows:  # SQLite: this transaction is the only writer, so what was missing is still missing
        new_ids = connection.execute(_INSERT_CALL, rows).scalars().all()
        for key, call_id, row in zip(new_pbx, new_ids, rows, strict=True):
            states[call_id] = plan.calls_by_key[key] = CallState(call_id, str(row["portal"]), "new", updated_at=now)
    for key in missing:
        if key[0] != "b24":
            continue
        # Registered by something else: we assume it is (or will be) finished there, and let
        # "Is it finished?" answers retry until it is.
        portal, direction = wanted[key]
        values = {
            "portal": portal,
            "b24_call_id": key[2],
            "external": True,
            "stage": "finished",
            "direction": (direction or Direction.INBOUND).value,
            "answered": False,
            "finish_reported": True,
            "created_at": now,
            "updated_at": now,
        }
        call_id = connection.execute(insert(_CALL).values(values).returning(_CALL.c.id)).scalar_one()
        state = CallState(call_id, portal, "finished", direction=str(values["direction"]), finish_reported=True)
        state.updated_at = now
        states[call_id] = plan.calls_by_key[key] = state
    _load_open_jobs(connection, existing)  # a call created just now has no jobs yet
    return plan


def _load_open_jobs(connection: Connection, states: dict[int, CallState]) -> None:
    if not states:
        return
    rows = connection.execute(
        select(_JOB.c.call_id, _JOB.c.kind, _JOB.c.state).where(
            _JOB.c.call_id.in_(list(states)),
            _JOB.c.kind.in_((JobKind.REGISTER, JobKind.FINISH, JobKind.ATTACH)),
            _JOB.c.state.in_(OPEN_STATES),
        )
    )
    for call_id, kind, state in rows:
        states[call_id].open_kinds.add(kind)
        if kind == JobKind.ATTACH and state in QUEUED_JOB_STATES:
            states[call_id].attach_queued = True


def _enqueue(plan: _Plan, kind: str, call: CallState, event_id: int, waiting: bool = False, paced: bool = True) -> None:
    plan.jobs.append(
        {
            "kind": kind,
            "call_id": call.id,
            "event_id": event_id,
            "transcript_id": None,
            "portal": call.portal if paced else None,  # unpaced: it talks to a vendor, not to the portal
            "state": JobState.WAITING if waiting else JobState.PENDING,
        }
    )
    call.open_kinds.add(kind)


def _fold_call_event(plan: _Plan, call: CallState, event_id: int, event: CallEvent, now: float) -> None:
    known_recording = call.recording_url
    call.merge(event, now)
    if event.event != "recording":  # a recording event: the call itself is reported by its own events
        if call.stage == "new" and JobKind.REGISTER not in call.open_kinds:
            _enqueue(plan, JobKind.REGISTER, call, event_id)
        if call.finish_reported and call.stage != "finished" and JobKind.FINISH not in call.open_kinds:
            _enqueue(plan, JobKind.FINISH, call, event_id, waiting=call.stage != "registered")
    if call.recording_url != known_recording and JobKind.RECORD not in call.open_kinds:
        # a new recording (or a new URL for it): one record job attaches the call's latest URL
        # after finish; one already running sees the new URL when it records its outcome
        _enqueue(plan, JobKind.RECORD, call, event_id, waiting=call.stage != "finished")
    if plan.transcribe is not None and plan.transcribe.wants(call):
        # submitted as soon as the recording is known: the vendor works while Bitrix24 is being told
        call.transcription_state, call.transcription_vendor = "queued", plan.transcribe.vendor
        _enqueue(plan, JobKind.TRANSCRIBE, call, event_id, paced=False)


def _fold_transcript(
    plan: _Plan, call: CallState, event_id: int, vendor: str, parsed: ParsedTranscript, now: float
) -> None:
    result, options = parsed.result, parsed.options
    plan.parts.append(
        {
            "call_id": call.id,
            "event_id": event_id,
            "vendor": vendor,
            "vendor_job_id": result.vendor_job_id,
            **PART_DEFAULTS,
            **part_values(result),
            "channel_slot": options.channel_slot,
            "side_overrides": dict(options.side_overrides),
            "received_at": now,
            "b24_transcript_id": None,
            "delivered_at": None,
        }
    )
    if result.status == "fetch":
        fetch = {
            "kind": JobKind.FETCH,
            "call_id": call.id,
            "event_id": event_id,
            "portal": None,
            "state": JobState.PENDING,
        }
        plan.fetches.append((len(plan.parts) - 1, fetch))
    elif result.status == "completed" and not call.attach_queued:
        # one attach sends the call's whole transcript (it reads every part); a leased one may
        # already have read the parts, so only a job not yet started can take this one too
        _enqueue(plan, JobKind.ATTACH, call, event_id, waiting=call.stage != "finished")
        call.attach_queued = True
    elif result.status == "completed":
        plan.parts_came.add(call.id)  # an attach put off for this part goes now


def fold_batch(
    session: Session,
    batch: Sequence[Folding],
    now: float,
    lock_calls: bool,
    transcribe: TranscribePolicy | None = None,
) -> None:
    """Fold `batch` in the session's transaction: register, finish and attach planned as per event.

    `lock_calls` (PostgreSQL): lock the batch's calls so concurrent workers take turns on a call.
    `transcribe`: which calls get a transcribe job (None: b24scribe submits nothing itself).
    """
    connection = session.connection()
    ordered = sorted(batch, key=lambda folding: folding.event_id)
    plan = _resolve_calls(connection, ordered, now, lock_calls)
    plan.transcribe = transcribe
    for folding in ordered:
        if _unplaced(folding):
            # its call is named by what the vendor's fetch returns: fetch first, then place it
            fetch = {"kind": JobKind.FETCH, "call_id": None, "event_id": folding.event_id, "portal": None}
            plan.jobs.append({**fetch, "transcript_id": None, "state": JobState.PENDING})
            continue
        call = plan.calls_by_key[_call_key(folding)[0]]
        plan.event_calls.append({"b_id": folding.event_id, "b_call": call.id})
        content = folding.readable.content
        if isinstance(content, CallEvent):
            _fold_call_event(plan, call, folding.event_id, content, now)
        else:
            _fold_transcript(plan, call, folding.event_id, folding.provider, content, now)
    _write(connection, plan, now)


def _write(connection: Connection, plan: _Plan, now: float) -> None:
    changed = {id(call): call for call in plan.calls_by_key.values() if call.changed}.values()
    if changed:
        connection.execute(
            _UPDATE_CALL,
            [{"b_id": call.id} | {f"b_{name}": getattr(call, name) for name in MERGED} for call in changed],
        )
    jobs = list(plan.jobs)
    if plan.parts:
        part_ids = connection.execute(_INSERT_PART, plan.parts).scalars().all()
        jobs += [fetch | {"transcript_id": part_ids[index]} for index, fetch in plan.fetches]
    if jobs:
        connection.execute(_INSERT_JOB, [job | {"now": now} for job in jobs])
    if plan.event_calls:
        connection.execute(_UPDATE_EVENT_CALL, plan.event_calls)
    if plan.parts_came:
        connection.execute(
            update(_JOB)
            .where(
                _JOB.c.call_id.in_(sorted(plan.parts_came)),
                _JOB.c.kind == JobKind.ATTACH,
                _JOB.c.state == JobState.PENDING,
                _JOB.c.last_error == WAITING_FOR_PARTS,
            )
            .values(next_attempt_at=now, updated_at=now)
        )

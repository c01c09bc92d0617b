"""Replaying stored inbound events after a fix (`flask events replay`).

A rejected event is parsed again by the functions the hooks use (b24scribe.parsing) and, if it now
passes, stored exactly as the hook would have stored it (events.store_event): it gets a new event id,
and the old row is kept as `replayed` pointing at it. An accepted transcript is translated again in
place and its call's attach is queued again; the attach ledger keeps an unchanged transcript from
being sent twice, a changed one replaces the first in Bitrix24.

Failure policy: fails safe — a raw event is never deleted; a replay that stops halfway leaves the
event `replaying`, and the next `--rejected` run picks it up again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError
from sqlalchemy import select

from b24scribe import outbox
from b24scribe.db import Database
from b24scribe.events import (
    CallEvent,
    Outcome,
    RawEvent,
    call_event_key,
    part_values,
    queue_attach,
    rejection_message,
    store_event,
    transcript_key,
)
from b24scribe.folding import read_event
from b24scribe.models import Call, InboundEvent, TranscriptPart
from b24scribe.parsing import ParsedTranscript
from b24scribe.settings import Settings
from b24scribe.sources import Sources

REPLAYABLE_STATES = ("rejected", "replaying")


@dataclass(frozen=True, slots=True)
class Replayed:
    """What replaying one event did: accepted, duplicate, rejected, retranslated, skipped or missing."""

    event_id: int
    outcome: str
    detail: str
    new_event_id: int | None = None

    def line(self) -> str:
        """How the CLI prints it."""
        return f"{self.event_id}: {self.outcome}: {self.detail}"


def raw_event(event: InboundEvent) -> RawEvent:
    """The stored request as the hook saw it (its token was never stored)."""
    key = event.dedupe_key
    if event.error and isinstance(event.error.get("dedupe_key"), str):
        key = event.error["dedupe_key"]  # moved aside by a replay that did not finish
    delivery_id = key.removeprefix("delivery:") if key.startswith("delivery:") else None
    return RawEvent(event.source, event.provider, event.body, dict(event.query or {}), event.content_type, delivery_id)


def field_summary(fields: dict[str, Any]) -> str:
    """`field: first message; …` for one line of output."""
    parts = []
    for name, messages in fields.items():
        first = messages[0] if isinstance(messages, list) and messages else messages
        parts.append(f"{name}: {first if not isinstance(first, dict) else field_summary(first)}")
    return "; ".join(parts)


def _messages(error: ValidationError) -> dict[str, Any]:
    return error.messages if isinstance(error.messages, dict) else {"_body": error.messages}


def _parse(settings: Settings, sources: Sources, raw: RawEvent) -> tuple[str, CallEvent | ParsedTranscript]:
    readable = read_event(settings, sources, raw.source, raw.provider, raw.body, raw.query)
    return readable.portal, readable.content


def _store(db: Database, raw: RawEvent, parsed: CallEvent | ParsedTranscript) -> Outcome:
    if isinstance(parsed, CallEvent):
        return store_event(db, raw, call_event_key(raw, parsed.call_id))
    return store_event(db, raw, transcript_key(raw, parsed.result, parsed.options))


def replay_event(db: Database, settings: Settings, sources: Sources, event_id: int) -> Replayed:
    """Replay one stored event (see the module's docstring for what that means per state)."""
    with db.read() as session:
        event = session.get(InboundEvent, event_id)
        if event is None:
            return Replayed(event_id, "missing", "no such event")
        if event.purged_at is not None:  # its body is gone: parsing the empty rest would only mislead
            return Replayed(event_id, "skipped", "purged by retention: its body is no longer stored")
        raw, state, error = raw_event(event), event.state, dict(event.error or {})
    if state in REPLAYABLE_STATES:
        return _replay_rejected(db, settings, sources, event_id, raw)
    if state == "replayed":
        return Replayed(event_id, "skipped", f"already replayed as event {error.get('replayed_as')}")
    if raw.source == "stt":
        return _retranslate(db, settings, sources, event_id, raw)
    return Replayed(event_id, "skipped", "accepted call events were folded into their call; nothing to re-translate")


def _replay_rejected(db: Database, settings: Settings, sources: Sources, event_id: int, raw: RawEvent) -> Replayed:
    try:
        _portal, parsed = _parse(settings, sources, raw)  # an unknown ?portal= is still a rejection
    except (KeyError, ValidationError) as error:
        fields = _messages(error) if isinstance(error, ValidationError) else {"_source": [f"unknown {raw.provider!r}"]}
        with db.write() as session:
            row = session.get_one(InboundEvent, event_id)
            row.error = {**(row.error or {}), "message": rejection_message(raw.source), "fields": fields}
        return Replayed(event_id, "rejected", f"still rejected: {field_summary(fields)}")
    with db.write() as session:
        # Free the event's dedupe key so the hook's own store can take it; remember it in case we stop.
        row = session.get_one(InboundEvent, event_id)
        if row.state not in REPLAYABLE_STATES:
            return Replayed(event_id, "skipped", f"the event is {row.state} now")
        original_key = (row.error or {}).get("dedupe_key", row.dedupe_key)
        row.state, row.dedupe_key = "replaying", f"replaying:{event_id}"
        row.error = {**(row.error or {}), "dedupe_key": original_key}
    try:
        outcome = _store(db, raw, parsed)
    except Exception:
        with db.write() as session:
            row = session.get_one(InboundEvent, event_id)
            row.state, row.dedupe_key = "rejected", original_key
        raise
    with db.write() as session:
        row = session.get_one(InboundEvent, event_id)
        row.state = "replayed"
        row.error = {**(row.error or {}), "replayed_as": outcome.event_id}
    if outcome.duplicate:
        return Replayed(event_id, "duplicate", f"already stored as event {outcome.event_id}", outcome.event_id)
    return Replayed(event_id, "accepted", f"stored as event {outcome.event_id}", outcome.event_id)


def _retranslate(db: Database, settings: Settings, sources: Sources, event_id: int, raw: RawEvent) -> Replayed:
    try:
        _portal, parsed = _parse(settings, sources, raw)
    except (KeyError, ValidationError) as error:
        fields = _messages(error) if isinstance(error, ValidationError) else {"_source": [f"unknown {raw.provider!r}"]}
        return Replayed(
            event_id, "rejected", f"would now be rejected ({field_summary(fields)}); the stored transcript is kept"
        )
    assert isinstance(parsed, ParsedTranscript)
    result, now = parsed.result, time.time()
    with db.write() as session:
        part = session.scalars(select(TranscriptPart).where(TranscriptPart.event_id == event_id)).first()
        if part is None or part.call_id is None:
            return Replayed(event_id, "skipped", "no transcript was stored for this event")
        # the same lock the fold and the worker's releases take, so a finish cannot slip between
        # reading the call's stage here and queueing the attach (a job left waiting for ever)
        call = session.get_one(Call, part.call_id, with_for_update=not db.is_sqlite)
        part.vendor_job_id = result.vendor_job_id
        part.channel_slot = parsed.options.channel_slot
        part.side_overrides = dict(parsed.options.side_overrides)
        for column, value in part_values(result).items():
            setattr(part, column, value)
        if part.status == "completed":
            queue_attach(session, call, event_id, now)
            detail = f"translated again ({len(part.segments or [])} segments); attach queued"
        elif part.status == "failed":
            detail = "the vendor reports the transcript failed"
        else:
            outbox.enqueue(session, "fetch", call_id=call.id, event_id=event_id, transcript_id=part.id, now=now)
            detail = "fetch from the vendor queued"
    return Replayed(event_id, "retranslated", detail)


def rejected_event_ids(db: Database, source: str | None = None, provider: str | None = None) -> list[int]:
    """Every rejected (or half-replayed) event, oldest first."""
    query = (
        select(InboundEvent.id)
        .where(InboundEvent.state.in_(REPLAYABLE_STATES), InboundEvent.purged_at.is_(None))
        .order_by(InboundEvent.id)
    )
    if source:
        query = query.where(InboundEvent.source == source)
    if provider:
        query = query.where(InboundEvent.provider == provider)
    with db.read() as session:
        return list(session.scalars(query))

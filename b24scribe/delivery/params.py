"""The Bitrix24 request parameters of a call's jobs: register, finish, attachTranscription.

Pure functions of a call, its transcript parts and the settings: no database, no network. What each
Bitrix24 field must look like (phone numbers, EXTERNAL_CALL_ID's length, status codes, the user) is
decided here and nowhere else, so the steps (`b24scribe.delivery.steps`) only choose when to send.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from b24scribe.messages import SideRules, attach_params
from b24scribe.models import Call, TranscriptPart
from b24scribe.settings import Settings
from b24scribe.transcript import Direction, Role, Segment, Side, Transcript

STATUS_CODES = {
    "answered": "200",
    "busy": "486",
    "no-answer": "304",
    "cancelled": "603-S",
    "declined": "603",
    "unavailable": "480",
    "congestion": "503",
    "failed": "OTHER",
}
TYPE_OUTBOUND, TYPE_INBOUND = 1, 2
UNKNOWN_NUMBER = "0"  # what Bitrix24 gets for anonymous/withheld numbers (it rejects an empty one)
PHONE_CHARACTERS = set("0123456789#*+,;")

REGISTER = "telephony.externalCall.register"
FINISH = "telephony.externalCall.finish"
ATTACH = "telephony.call.attachTranscription"
ATTACH_RECORD = "telephony.externalCall.attachRecord"
STATISTICS = "voximplant.statistic.get"


def phone_for_bitrix24(number: str | None) -> str:
    """The number as Bitrix24 keeps it: only [0-9#*+,;], at most 20 characters, never empty."""
    kept = "".join(ch for ch in (number or "") if ch in PHONE_CHARACTERS)
    return kept[:20] if any(ch.isdigit() for ch in kept) else UNKNOWN_NUMBER


def external_call_id(pbx_call_id: str) -> str:
    """EXTERNAL_CALL_ID is varchar(64) in Bitrix24: longer ids are hashed, not cut (no collisions)."""
    if len(pbx_call_id) <= 64:
        return pbx_call_id
    return "sha1:" + hashlib.sha1(pbx_call_id.encode(), usedforsecurity=False).hexdigest()


def user_params(call: Call, settings: Settings) -> dict[str, Any]:
    """USER_ID when known, else the extension as USER_PHONE_INNER, else the default user."""
    if call.user_id:
        return {"USER_ID": call.user_id}
    if call.extension:
        return {"USER_PHONE_INNER": call.extension}
    if settings.default_user_id:
        return {"USER_ID": settings.default_user_id}
    return {}


def register_params(call: Call, settings: Settings) -> dict[str, Any]:
    """telephony.externalCall.register parameters for a call the PBX reported."""
    outbound = call.direction == Direction.OUTBOUND.value
    number = call.to_number if outbound else call.from_number
    phone = phone_for_bitrix24(number)
    params: dict[str, Any] = {
        **user_params(call, settings),
        "PHONE_NUMBER": phone,
        "TYPE": TYPE_OUTBOUND if outbound else TYPE_INBOUND,
        "EXTERNAL_CALL_ID": external_call_id(call.pbx_call_id or ""),
        # no lead for a withheld number: it would be a lead nobody can call back
        "CRM_CREATE": 1 if settings.crm_create and phone != UNKNOWN_NUMBER else 0,
        # a call that already ended gets no pop-up card
        "SHOW": 0 if call.finish_reported else 1,
    }
    if call.started_at:
        params["CALL_START_DATE"] = call.started_at
    if call.line:
        params["LINE_NUMBER"] = call.line[:50]
    return params


def finish_params(call: Call, settings: Settings) -> dict[str, Any]:
    """telephony.externalCall.finish parameters."""
    # An answered call is never shown as missed: a PBX's last word (the last leg's busy or no-answer,
    # a queue's give-up) does not undo an answer already reported for the call.
    status = "answered" if call.answered else call.status or ("answered" if (call.duration or 0) > 0 else "no-answer")
    params: dict[str, Any] = {
        "CALL_ID": call.b24_call_id,
        **user_params(call, settings),
        "DURATION": max(0, int(call.duration or 0)),
        "STATUS_CODE": STATUS_CODES.get(status, "OTHER"),
    }
    if status in ("failed", "unavailable", "congestion"):
        params["FAILED_REASON"] = status
    # No RECORD_URL: the recording goes with attachRecord after finish, in either mode (contract §9)
    return params


def side_rules(call: Call, settings: Settings, overrides: dict[str, Any]) -> SideRules:
    """How channels and speakers map to sides for this call (settings, then the callback URL)."""
    return SideRules(
        direction=Direction(call.direction or Direction.INBOUND.value),
        channel0=Role(overrides.get("channel0", settings.channel0.value)),
        first_speaker=Role(overrides.get("first_speaker", settings.first_speaker.value)),
    )


def _segments(rows: list[Any]) -> list[Segment]:
    return [
        Segment(start, end, text, channel, speaker, Side(side) if side else None, bool(glue))
        for start, end, text, channel, speaker, side, glue in rows
    ]


def current_parts(parts: list[TranscriptPart]) -> list[TranscriptPart]:
    """The parts that make up the call's transcript now: the newest whole transcript, or the newest
    part per channel received after it (one file per channel, `?channel=0|1`)."""
    slots: dict[int | None, TranscriptPart] = {}
    for part in sorted(parts, key=lambda p: p.id):
        if part.status != "completed":
            continue
        if part.channel_slot is None:
            slots = {}
        slots[part.channel_slot] = part
    return list(slots.values())


def build_attach(call: Call, parts: list[TranscriptPart], settings: Settings) -> dict[str, Any] | None:
    """The attachTranscription params for the call's whole transcript, or None if there is none."""
    chosen = current_parts(parts)
    if not chosen or call.b24_call_id is None:
        return None
    granularity = "word" if all(p.granularity == "word" for p in chosen) else "segment"
    segments: list[Segment] = []
    for part in chosen:
        segments.extend(_segments(part.segments or []))
    cost = sum(p.cost or 0.0 for p in chosen) or None
    currency = next((p.cost_currency for p in chosen if p.cost_currency), None)
    transcript = Transcript(segments=segments, granularity=granularity, cost=cost, cost_currency=currency)  # type: ignore[arg-type]
    return attach_params(call.b24_call_id, transcript, side_rules(call, settings, chosen[-1].side_overrides or {}))


def transcript_digest(params: dict[str, Any]) -> str:
    """The ledger key: sha256 of the exact request (a byte-identical transcript is never resent)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

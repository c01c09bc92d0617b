"""Our own generic transcript format (`POST /hooks/stt/generic`, contract §3.2).

The marshmallow schemas are the contract. msgspec takes the common valid body in one C pass (the
PBX generic event does the same, schemas/pbx_events.py); whatever it declines is loaded by the
schemas, which accept it or name the bad fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema

from b24scribe.inbound_auth import STANDARD_WEBHOOKS
from b24scribe.limits import (
    MAX_B24_CALL_ID_LENGTH,
    MAX_CHANNEL,
    MAX_CURRENCY_LENGTH,
    MAX_ID_LENGTH,
    MAX_JOB_ID_LENGTH,
    MAX_PBX_LENGTH,
    MAX_SECONDS,
    StoredText,
    has_unstorable,
)
from b24scribe.sources import SttVendor
from b24scribe.transcript import CallReference, Segment, Side, Transcript, VendorResult
from schemas._vendor_payload import channel_from_query, new_segment
from schemas.source import load_json


class GenericSegmentSchema(Schema):
    """One utterance: times in seconds, and who speaks (side, channel or speaker)."""

    class Meta:
        unknown = RAISE

    start = fields.Float(required=True, validate=validate.Range(min=0, max=MAX_SECONDS), allow_nan=False)
    end = fields.Float(required=True, validate=validate.Range(min=0, max=MAX_SECONDS), allow_nan=False)
    text = fields.String(required=True)  # control characters become spaces after parsing (b24scribe.limits)
    side = fields.String(validate=validate.OneOf([s.value for s in Side]))
    channel = fields.Integer(validate=validate.Range(min=0, max=MAX_CHANNEL))
    speaker = fields.Raw(validate=lambda v: isinstance(v, str | int) and not isinstance(v, bool))

    @validates_schema
    def end_not_before_start(self, data: dict[str, Any], **_: Any) -> None:
        if "start" in data and "end" in data and data["end"] < data["start"]:
            raise ValidationError(f"end ({data['end']}) is before start ({data['start']})", "end")

    @post_load
    def make_segment(self, data: dict[str, Any], **_: Any) -> Segment:
        speaker = data.get("speaker")
        return Segment(
            start=data["start"],
            end=data["end"],
            text=data["text"],
            channel=data.get("channel"),
            speaker=None if speaker is None else str(speaker),
            side=Side(data["side"]) if "side" in data else None,
        )


class GenericTranscriptSchema(Schema):
    """The whole callback: segments, optional cost, optional call reference."""

    class Meta:
        unknown = RAISE

    segments = fields.List(fields.Nested(GenericSegmentSchema), required=True, validate=validate.Length(min=1))
    cost = fields.Float(validate=validate.Range(min=0), allow_nan=False)
    cost_currency = fields.String(validate=StoredText(MAX_CURRENCY_LENGTH))
    job_id = fields.String(validate=StoredText(MAX_JOB_ID_LENGTH, identifier=True, min_length=1))
    pbx = fields.String(validate=StoredText(MAX_PBX_LENGTH, identifier=True, min_length=1))
    call = fields.String(validate=StoredText(MAX_ID_LENGTH, identifier=True, min_length=1))
    b24_call_id = fields.String(validate=StoredText(MAX_B24_CALL_ID_LENGTH, identifier=True, min_length=1))


GENERIC_TRANSCRIPT = GenericTranscriptSchema()

SideName = Literal["User", "Client"]
_Unset = msgspec.UnsetType
_UNSET = msgspec.UNSET


class _SegmentFast(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """GenericSegmentSchema's rules for msgspec: narrower than the schema or equal, never wider.

    No field admits null; numbers are strict (the schema also takes "1.5", and 3.0 as a channel:
    via the fallback); NaN and out-of-range floats are not JSON msgspec reads.
    """

    start: Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]
    end: Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]
    text: str
    side: SideName | _Unset = _UNSET
    channel: Annotated[int, msgspec.Meta(ge=0, le=MAX_CHANNEL)] | _Unset = _UNSET
    speaker: str | int | _Unset = _UNSET  # bool and float are neither, as in the schema


class _GenericTranscriptFast(msgspec.Struct, forbid_unknown_fields=True):
    """GenericTranscriptSchema's rules for msgspec (tests/test_generic_transcript_fast_path.py)."""

    segments: Annotated[list[_SegmentFast], msgspec.Meta(min_length=1)]
    cost: Annotated[float, msgspec.Meta(ge=0)] | _Unset = _UNSET
    cost_currency: Annotated[str, msgspec.Meta(max_length=MAX_CURRENCY_LENGTH)] | _Unset = _UNSET
    job_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_JOB_ID_LENGTH)] | _Unset = _UNSET
    pbx: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PBX_LENGTH)] | _Unset = _UNSET
    call: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)] | _Unset = _UNSET
    b24_call_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_B24_CALL_ID_LENGTH)] | _Unset = _UNSET


_FAST_DECODER = msgspec.json.Decoder(_GenericTranscriptFast)
_OPTIONAL = tuple(name for name in _GenericTranscriptFast.__struct_fields__ if name != "segments")
_IDS = ("job_id", "pbx", "call", "b24_call_id")


def _load_fast(raw_body: bytes) -> dict[str, Any] | None:
    """What the schema would load, if msgspec's pass and the end-after-start check accept the body."""
    try:
        fast = _FAST_DECODER.decode(raw_body)
    except (msgspec.DecodeError, UnicodeDecodeError):  # also its ValidationError: the schema says what is wrong
        return None
    segments: list[Segment] = []
    append = segments.append
    for item in fast.segments:
        if item.end < item.start:
            return None
        channel, speaker, side = item.channel, item.speaker, item.side
        segment = new_segment(
            item.start,
            item.end,
            item.text,
            None if channel is _UNSET else channel,
            None if speaker is _UNSET else str(speaker),
        )
        if side is not _UNSET:
            object.__setattr__(segment, "side", Side(side))  # Segment is frozen; this one is ours, still unshared
        append(segment)
    data: dict[str, Any] = {"segments": segments}
    for name in _OPTIONAL:
        if (value := getattr(fast, name)) is not _UNSET:
            data[name] = value
    # An id or currency with a control character (msgspec reads "\u0000" as it is), or an id that is
    # not printable: the schema names the field. Segment text and speakers are cleaned after parsing.
    if len(data) > 1 and _unstorable_optional(data):
        return None
    return data


def _unstorable_optional(data: dict[str, Any]) -> bool:
    for name in _IDS:
        if (value := data.get(name)) is not None and not value.isprintable():  # control characters, surrogates
            return True
    currency = data.get("cost_currency")
    return currency is not None and has_unstorable(currency)


def load(raw_body: bytes) -> dict[str, Any]:
    """The loaded callback (segments as Segments): msgspec's pass, else the schema."""
    data = _load_fast(raw_body)
    if data is not None:
        return data
    loaded: dict[str, Any] = GENERIC_TRANSCRIPT.load(load_json(raw_body))
    return loaded


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """Read a generic transcript callback."""
    data = load(raw_body)
    channel = channel_from_query(query)
    segments: list[Segment] = data["segments"]
    if channel is not None:
        segments = [
            s if s.channel is not None or s.side is not None else Segment(s.start, s.end, s.text, channel, s.speaker)
            for s in segments
        ]
    return VendorResult(
        status="completed",
        transcript=Transcript(segments=segments, cost=data.get("cost"), cost_currency=data.get("cost_currency")),
        vendor_job_id=data.get("job_id"),
        reference=CallReference(pbx=data.get("pbx"), pbx_call_id=data.get("call"), b24_call_id=data.get("b24_call_id")),
    )


VENDOR = SttVendor(
    name="generic",
    parse=parse,
    signatures=(STANDARD_WEBHOOKS,),
    summary="our own transcript format (any script or vendor that can send it)",
    openapi_schema=GenericTranscriptSchema,
)

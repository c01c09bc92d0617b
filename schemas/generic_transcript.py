"""Our own generic transcript format (`POST /hooks/stt/generic`, SPEC 3.2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema

from b24scribe.transcript import CallReference, Segment, Side, Transcript, VendorResult
from schemas.source import SttVendor, load_json


class GenericSegmentSchema(Schema):
    """One utterance: times in seconds, and who speaks (side, channel or speaker)."""

    class Meta:
        unknown = RAISE

    start = fields.Float(required=True, validate=validate.Range(min=0), allow_nan=False)
    end = fields.Float(required=True, validate=validate.Range(min=0), allow_nan=False)
    text = fields.String(required=True)
    side = fields.String(validate=validate.OneOf([s.value for s in Side]))
    channel = fields.Integer(validate=validate.Range(min=0, max=31))
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
    cost_currency = fields.String(validate=validate.Length(max=50))
    job_id = fields.String(validate=validate.Length(min=1, max=200))
    pbx = fields.String(validate=validate.Length(min=1, max=32))
    call = fields.String(validate=validate.Length(min=1, max=128))
    b24_call_id = fields.String(validate=validate.Length(min=1, max=128))


GENERIC_TRANSCRIPT = GenericTranscriptSchema()


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """Read a generic transcript callback."""
    data = GENERIC_TRANSCRIPT.load(load_json(raw_body))
    channel = query.get("channel")
    segments: list[Segment] = data["segments"]
    if channel is not None and channel.isdigit():
        segments = [
            s
            if s.channel is not None or s.side is not None
            else Segment(s.start, s.end, s.text, int(channel), s.speaker)
            for s in segments
        ]
    return VendorResult(
        status="completed",
        transcript=Transcript(segments=segments, cost=data.get("cost"), cost_currency=data.get("cost_currency")),
        vendor_job_id=data.get("job_id"),
        reference=CallReference(pbx=data.get("pbx"), pbx_call_id=data.get("call"), b24_call_id=data.get("b24_call_id")),
    )


VENDOR = SttVendor(name="generic", parse=parse)

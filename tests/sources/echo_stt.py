"""An STT vendor that posts its transcript lines as they are (`POST /hooks/stt/echo`): one module and
its registry line make it a vendor the service reads, translates and delivers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate

from b24scribe.sources import SttVendor
from b24scribe.transcript import CallReference, Segment, Side, Transcript, VendorResult
from schemas.source import load_json

ROLES = {"agent": Side.USER, "customer": Side.CLIENT}  # the vendor names the sides itself


class _Line(Schema):
    who = fields.String(required=True, validate=validate.OneOf(sorted(ROLES)))
    start = fields.Float(required=True, validate=validate.Range(min=0, max=604800))
    end = fields.Float(required=True, validate=validate.Range(min=0, max=604800))
    text = fields.String(required=True)


class EchoSchema(Schema):
    job = fields.String(required=True, validate=validate.Length(min=1, max=128))
    call = fields.String(load_default=None)
    lines = fields.List(fields.Nested(_Line), required=True)


_SCHEMA = EchoSchema()


def parse(body: bytes, query: Mapping[str, str]) -> VendorResult:
    payload: Any = load_json(body)
    if not isinstance(payload, dict):
        raise ValidationError({"_body": ["expected a JSON object"]})
    data = _SCHEMA.load(payload)
    segments = [Segment(line["start"], line["end"], line["text"], side=ROLES[line["who"]]) for line in data["lines"]]
    return VendorResult(
        "completed",
        Transcript(segments),
        vendor_job_id=data["job"],
        reference=CallReference(pbx="acmepbx" if data["call"] else None, pbx_call_id=data["call"]),
    )


VENDOR = SttVendor(name="echo", parse=parse, summary="Echo transcripts (a test source)")

"""An STT vendor that posts its transcript lines as they are (`POST /hooks/stt/echo`): one module and
its registry line make it a vendor the service reads, translates and delivers.

Like Azure and AWS it may instead post only a job id (`{"job": …, "ready": true}`): the worker then
fetches the job from the vendor's API (`GET <api>/jobs/<id>`), which names the result file to fetch
next (`result_path`). And like Azure's web hooks it answers a registration challenge
(`?validationToken=…`) with the token, storing nothing."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from marshmallow import Schema, ValidationError, fields, validate

from b24scribe.inbound_auth import HookRequest
from b24scribe.settings import Settings
from b24scribe.sources import FetchContext, FetchError, FetchSpec, HookAnswer, SttVendor
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
    ready = fields.Boolean(load_default=False)  # only the id: the transcript is to be fetched
    lines = fields.List(fields.Nested(_Line), load_default=list)


_SCHEMA = EchoSchema()


def parse(body: bytes, query: Mapping[str, str]) -> VendorResult:
    payload: Any = load_json(body)
    if not isinstance(payload, dict):
        raise ValidationError({"_body": ["expected a JSON object"]})
    data = _SCHEMA.load(payload)
    reference = CallReference(pbx="acmepbx" if data["call"] else None, pbx_call_id=data["call"])
    if data["ready"]:
        return VendorResult("fetch", fetch_id=data["job"], vendor_job_id=data["job"], reference=reference)
    segments = [Segment(line["start"], line["end"], line["text"], side=ROLES[line["who"]]) for line in data["lines"]]
    return VendorResult(
        "completed",
        Transcript(segments),
        vendor_job_id=data["job"],
        reference=reference,
    )


def fetch(context: FetchContext) -> VendorResult:
    """Two GETs on the configured API: the job, then the result file it names."""
    headers = {"Authorization": f"Token {context.api_key}"}
    job = json.loads(context.get(f"{context.api_url}/jobs/{quote(context.fetch_id, safe='')}", headers).content)
    if job.get("status") == "failed":
        return VendorResult("failed", failure_reason=str(job.get("reason")), vendor_job_id=context.fetch_id)
    path = str(job["result_path"])
    if not path.startswith("/files/"):
        raise FetchError(f"echo named a result outside its files: {path!r}", retry=False)
    result = context.get(context.api_url + path, headers, what="result file")
    return parse(result.content, context.callback_query)


def answer(request: HookRequest, body: bytes, settings: Settings) -> HookAnswer | None:
    """The registration challenge: the token back, as text."""
    token = request.query.get("validationToken")
    return HookAnswer(200, token.encode()) if token else None


VENDOR = SttVendor(
    name="echo",
    parse=parse,
    fetch=FetchSpec(default_api_url="https://api.echo.invalid", run=fetch),
    answer=answer,
    summary="Echo transcripts (a test source)",
)

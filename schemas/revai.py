"""Rev.ai asynchronous jobs (`POST /hooks/stt/revai`).

The callback (`notification_config.url`, or the deprecated `callback_url`) carries the job only,
`{"job": {"id", "status", "metadata", "failure", "failure_detail", …}}`: `failed` is a failed
job (reason `failure_detail`, else `failure`); `transcribed` (or `completed`) becomes a fetch of
`GET <api>/speechtotext/v1/jobs/{id}/transcript` with `Authorization: Bearer <key>` and
`Accept: application/vnd.rev.transcript.v1.0+json`, translated by `parse_transcript`.

One segment per monologue (`speaker` int): its text is its elements' values joined — `text`
words, `punct` elements carrying punctuation and the spaces between words (a space is put
between two adjacent `text` elements, for transcripts that carry no space elements) — from the
first word's `ts` to the last word's `end_ts` (float seconds); `unknown` elements (tags such as
"<inaudible>") are left out. Speakers are diarized voices mapped by the first-speaker rule. With
`speaker_channels_count` set on the job, Rev.ai transcribes each channel separately and the
monologue `speaker` is the channel: add `?speaker_channels_count=2` to the callback URL too, and
the speaker number becomes our 0-based channel. `?channel=0|1`: the file held that channel only.
Rev.ai names a speaker even without diarization (`skip_diarization`), so a transcript whose
monologues all name one speaker counts as mono without speakers (unattributable, contract §6.3).

Job id: `job.id`. Call reference: `job.metadata` written as a query string,
`pbx=asterisk&call=1700000000.123` or `b24_call_id=<CALL_ID>` (other metadata is ignored).
Authentication: `notification_config.auth_headers` supports only `Authorization`:
`{"Authorization": "Bearer <inbound token>"}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError, fields, post_load, validate

from b24scribe.sources import FetchSpec, SttVendor
from b24scribe.transcript import Segment, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_SECONDS,
    NUMBER_TYPES,
    ItemShape,
    PayloadErrors,
    RawList,
    VendorSchema,
    channel_from_query,
    kind_problem,
    load_json_object,
    new_segment,
    reference_from_query_string,
)

TRANSCRIPT_MEDIA_TYPE = "application/vnd.rev.transcript.v1.0+json"


@dataclass(frozen=True, slots=True)
class RevJob:
    """The job object of a Rev.ai callback."""

    id: str
    status: str
    metadata: str | None
    failure: str | None
    failure_detail: str | None


class RevJobSchema(VendorSchema):
    """The `job` object of the callback body."""

    id = fields.String(required=True, validate=validate.Length(min=1))
    status = fields.String(
        required=True,
        validate=validate.OneOf(
            ["transcribed", "completed", "failed"],
            error="Must be transcribed or failed: the job is {input}.",
        ),
    )
    metadata = fields.String(load_default=None, allow_none=True)
    failure = fields.String(load_default=None, allow_none=True)
    failure_detail = fields.String(load_default=None, allow_none=True)

    @post_load
    def _to_job(self, data: dict[str, Any], **kwargs: Any) -> RevJob:
        return RevJob(**data)


class RevCallbackSchema(VendorSchema):
    """The callback body: `{"job": {…}}`."""

    job = fields.Nested(RevJobSchema, required=True)

    @post_load
    def _to_job(self, data: dict[str, Any], **kwargs: Any) -> RevJob:
        job: RevJob = data["job"]
        return job


class RevTranscriptSchema(VendorSchema):
    """The fetched transcript's envelope, without walking its monologues."""

    monologues = RawList(required=True)

    @post_load
    def _to_monologues(self, data: dict[str, Any], **kwargs: Any) -> list[Any]:
        monologues: list[Any] = data["monologues"]
        return monologues


CALLBACK_SCHEMA = RevCallbackSchema()
TRANSCRIPT_SCHEMA = RevTranscriptSchema()

_TEXT_ELEMENT = ItemShape(
    required=(("value", "text"), ("ts", "seconds"), ("end_ts", "seconds")),
    start="ts",
    end="end_ts",
)
_OTHER_ELEMENT = ItemShape(required=(("value", "text"),))


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """The job callback: a failed job, or a fetch of the finished transcript."""
    channel_from_query(query)  # bad URL options are refused now, not after the fetch
    _speaker_channels(query)
    job: RevJob = CALLBACK_SCHEMA.load(load_json_object(raw_body))
    reference = reference_from_query_string(job.metadata)
    if job.status == "failed":
        return VendorResult(
            status="failed",
            failure_reason=job.failure_detail or job.failure or "Rev.ai gave no failure detail.",
            vendor_job_id=job.id,
            reference=reference,
        )
    return VendorResult(status="fetch", fetch_id=job.id, vendor_job_id=job.id, reference=reference)


def parse_transcript(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """The fetched transcript (it names no job: the callback's job id stays the job id)."""
    forced_channel = channel_from_query(query)
    speaker_is_channel = _speaker_channels(query) > 1
    monologues: list[Any] = TRANSCRIPT_SCHEMA.load(load_json_object(raw_body))
    errors = PayloadErrors()
    segments: list[Segment] = []
    labels: dict[int, str] = {}
    for index, monologue in enumerate(monologues):
        try:
            speaker = monologue.get("speaker")
            elements = monologue["elements"]
            valid = (speaker is None or (type(speaker) is int and speaker >= 0)) and type(elements) is list
        except (KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            _report_monologue(errors, index, monologue)
            continue
        span = _join_elements(elements, index, errors)
        if span is None:
            continue
        start, end, text = span
        channel = forced_channel
        label = None
        if speaker is not None:
            if speaker_is_channel and forced_channel is None:
                channel = speaker
            label = labels.get(speaker)
            if label is None:
                label = labels[speaker] = str(speaker)
        segments.append(new_segment(start, end, text, channel, label))
    errors.raise_if_any()
    if len(labels) == 1 and not speaker_is_channel:
        # Rev.ai names a speaker even when it did not diarize (skip_diarization): one label for
        # the whole file tells nobody apart, so the transcript is as unattributable as mono.
        segments = [dataclasses.replace(segment, speaker=None) for segment in segments]
    return VendorResult(status="completed", transcript=Transcript(segments=segments))


def _join_elements(elements: list[Any], monologue_index: int, errors: PayloadErrors) -> tuple[float, float, str] | None:
    """A monologue's time span and text; None when it holds no word (or a broken element)."""
    parts: list[str] = []
    append = parts.append
    start = end = -1.0
    previous_was_text = False
    broken = False
    for index, element in enumerate(elements):
        kind = None
        try:
            kind = element["type"]
            value = element["value"]
            if kind == "text":
                ts = element["ts"]
                end_ts = element["end_ts"]
                valid = (
                    type(value) is str
                    and type(ts) in NUMBER_TYPES
                    and type(end_ts) in NUMBER_TYPES
                    and 0 <= ts <= end_ts <= MAX_SECONDS
                )
            else:
                valid = type(value) is str
        except (KeyError, TypeError):
            valid = False
        if not valid:
            path = ("monologues", monologue_index, "elements", index)
            shape = _TEXT_ELEMENT if kind == "text" else _OTHER_ELEMENT
            if type(element) is dict and "type" not in element:
                errors.add((*path, "type"), "Missing data for required field.")
            else:
                shape.report(errors, path, element)
            broken = True
            continue
        if kind == "text":
            if previous_was_text:
                append(" ")
            append(value)
            if start < 0:
                start = ts
            if end_ts > end:
                end = end_ts
            previous_was_text = True
        elif kind == "punct":
            append(value)
            previous_was_text = False
    if broken or start < 0:
        return None
    return start, end, "".join(parts).strip()


def _report_monologue(errors: PayloadErrors, index: int, monologue: Any) -> None:
    path = ("monologues", index)
    if type(monologue) is not dict:
        errors.add(path, "Not a valid object.")
        return
    speaker = monologue.get("speaker")
    if speaker is not None:
        problem = kind_problem("index", speaker)
        if problem:
            errors.add((*path, "speaker"), problem)
    if "elements" not in monologue:
        errors.add((*path, "elements"), "Missing data for required field.")
    elif type(monologue["elements"]) is not list:
        errors.add((*path, "elements"), "Not a valid list.")


def _speaker_channels(query: Mapping[str, str]) -> int:
    """`?speaker_channels_count=N`: the job's own option, copied so monologues map to channels."""
    value = query.get("speaker_channels_count")
    if value is None or value == "":
        return 0
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 2 and 1 <= int(value) <= 8):
        raise ValidationError({"speaker_channels_count": ["Must be an integer from 1 to 8, as given to Rev.ai."]})
    return int(value)


def _api_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "Accept": TRANSCRIPT_MEDIA_TYPE}


VENDOR = SttVendor(
    name="revai",
    summary="Rev.ai job notifications (the transcript is fetched by its id)",
    parse=parse,
    fetch=FetchSpec(
        default_api_url="https://api.rev.ai",
        path="/speechtotext/v1/jobs/{id}/transcript",
        headers=_api_headers,
        parse=parse_transcript,
    ),
)

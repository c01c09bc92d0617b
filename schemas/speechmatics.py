"""Speechmatics batch jobs (`POST /hooks/stt/speechmatics`, `notification_config`).

Accepted body: the json-v2 transcript, sent as the body when the notification asks for exactly
`"contents": ["transcript"]` (or `["transcript.json-v2"]`). Speechmatics appends `?id=<job>` and
`&status=success|error|fetch_error|trim_error` to the URL; any status but `success` is a failed job
whose body is the job info only (reason: its last `errors[].message`, else the status itself).

json-v2 has words only: every `results[]` item of type `word`, `entity` (its written form) or
`punctuation` becomes one word-level segment (others are ignored, as the spec asks), grouped by
side later (contract §6.4). Punctuation `attaches_to` rebuilds the text: `previous` (the default, and
what "." and "," say) glues to the word before, `next` makes the following word of the same
channel glue to it (an opening quote), `both` does both, `none` stands alone.

Who speaks: channel diarization (`"diarization": "channel"`) labels each item's `channel` with
`channel_diarization_labels[i]` if given, else `Channel 1`/`channel_1`…; it becomes the 0-based
channel i. Speaker diarization labels `alternatives[0].speaker` `S1`, `S2`…; `UU` (unknown) takes
the speaker of the nearest known word before it on the same channel (or after it, at the start).
All-`UU` mono transcripts are unattributable (contract §6.3).

Job id: `job.id` (else `?id=`). Call reference: `tracking.reference` as a query string,
`pbx=asterisk&call=1700000000.123` or `b24_call_id=<CALL_ID>`, or `tracking.details` keyed as
contract §11 says (`b24scribe_pbx` + `b24scribe_call`, what b24scribe's own submissions carry) or
with the same short keys. Authentication: `"auth_headers": ["Authorization: Bearer <inbound token>"]`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError, fields, post_load, validate

from b24scribe.limits import MAX_CHANNEL
from b24scribe.sources import SttVendor
from b24scribe.transcript import CallReference, Segment, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_SECONDS,
    NUMBER_TYPES,
    FieldPath,
    PayloadErrors,
    RawList,
    VendorSchema,
    channel_from_query,
    kind_problem,
    load_json_object,
    new_segment,
    reference_from_metadata,
    reference_from_query_string,
)
from schemas.source import load_json

FAILED_STATUSES = frozenset({"error", "fetch_error", "trim_error"})
UNKNOWN_SPEAKER = "UU"
_UNSEEN = object()  # no channel label seen yet
# at most 2 digits: channels are counted 1 to 32 here (0 to 31 in contract §12), and int() of 5,000 digits raises
_DEFAULT_CHANNEL_LABEL = re.compile(r"channel[ _]?([0-9]{1,2})", re.IGNORECASE)
_RESULTS_REQUIRED = (
    'Missing data for required field: the notification must send the json-v2 transcript, "contents": ["transcript"].'
)


@dataclass(frozen=True, slots=True)
class SpeechmaticsTranscript:
    """The envelope of a json-v2 transcript; its results are still raw JSON."""

    job_id: str | None
    reference: CallReference
    channel_labels: list[str]
    results: list[Any]


class _TrackingSchema(VendorSchema):
    reference = fields.String(load_default=None, allow_none=True)
    details = fields.Dict(load_default=None, allow_none=True)

    @post_load
    def _to_reference(self, data: dict[str, Any], **kwargs: Any) -> CallReference:
        reference = reference_from_query_string(data["reference"])
        if reference.is_empty() and data["details"]:
            reference = reference_from_metadata(data["details"])
        return reference


class _JobSchema(VendorSchema):
    id = fields.String(load_default=None, allow_none=True)
    tracking = fields.Nested(_TrackingSchema, load_default=None, allow_none=True)


class _TranscriptionConfigSchema(VendorSchema):
    channel_diarization_labels = fields.List(
        fields.String(), load_default=list, validate=validate.Length(max=MAX_CHANNEL + 1)
    )


class _MetadataSchema(VendorSchema):
    transcription_config = fields.Nested(_TranscriptionConfigSchema, load_default=None, allow_none=True)


class SpeechmaticsTranscriptSchema(VendorSchema):
    """The json-v2 envelope: job, metadata and results, without walking the results."""

    job = fields.Nested(_JobSchema, load_default=None, allow_none=True)
    metadata = fields.Nested(_MetadataSchema, load_default=None, allow_none=True)
    results = RawList(required=True, error_messages={"required": _RESULTS_REQUIRED})

    @post_load
    def _to_transcript(self, data: dict[str, Any], **kwargs: Any) -> SpeechmaticsTranscript:
        job = data["job"] or {}
        config = (data["metadata"] or {}).get("transcription_config") or {}
        return SpeechmaticsTranscript(
            job_id=job.get("id") or None,
            reference=job.get("tracking") or CallReference(),
            channel_labels=config.get("channel_diarization_labels", []),
            results=data["results"],
        )


TRANSCRIPT_SCHEMA = SpeechmaticsTranscriptSchema()


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """Translate a Speechmatics notification (json-v2 transcript, or a failed job's info)."""
    forced_channel = channel_from_query(query)
    status = query.get("status", "success")
    if status in FAILED_STATUSES:
        return _failed(raw_body, status, query.get("id"))
    transcript: SpeechmaticsTranscript = TRANSCRIPT_SCHEMA.load(load_json_object(raw_body))
    errors = PayloadErrors()
    segments = _word_segments(transcript, forced_channel, errors)
    errors.raise_if_any()
    return VendorResult(
        status="completed",
        transcript=Transcript(segments=segments, granularity="word"),
        vendor_job_id=transcript.job_id or query.get("id") or None,
        reference=transcript.reference,
    )


def _failed(raw_body: bytes, status: str, query_id: str | None) -> VendorResult:
    """A failed job: the body is job info (`{"job": {…}}` or the job itself), if JSON at all."""
    try:
        body = load_json(raw_body)
    except ValidationError:  # the status already says it failed: the body is a bonus
        body = None
    job = body.get("job", body) if isinstance(body, dict) else None
    job = job if isinstance(job, dict) else {}
    reason = f"Speechmatics notification status {status}."
    job_errors = job.get("errors")
    if isinstance(job_errors, list) and job_errors:
        last = job_errors[-1]
        message = last.get("message") if isinstance(last, dict) else None
        if isinstance(message, str) and message:
            reason = message
    tracking = job.get("tracking")
    reference = CallReference()
    if isinstance(tracking, dict):
        reference = reference_from_query_string(_string_or_none(tracking.get("reference")))
        details = tracking.get("details")
        if reference.is_empty() and isinstance(details, dict):
            reference = reference_from_metadata(details)
    return VendorResult(
        status="failed",
        failure_reason=reason,
        vendor_job_id=_string_or_none(job.get("id")) or query_id or None,
        reference=reference,
    )


def _string_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _word_segments(
    transcript: SpeechmaticsTranscript, forced_channel: int | None, errors: PayloadErrors
) -> list[Segment]:
    """One word-level segment per word, entity and punctuation item, in payload order."""
    segments: list[Segment] = []
    append = segments.append
    make, numbers, max_seconds = new_segment, NUMBER_TYPES, MAX_SECONDS
    # Channel label -> 0-based channel; None (no channel diarization) stays None.
    channels: dict[Any, int | None] = {None: None}
    for position, channel_label in enumerate(transcript.channel_labels):
        channels.setdefault(channel_label, position)
    previous_label: Any = _UNSEEN
    channel = forced_channel
    glue_next: set[int | None] = set()  # channels whose next word glues to an opening mark
    last_speaker: dict[int | None, str] = {}
    leading_unknown: dict[int | None, list[int]] = {}  # UU words before a channel's first speaker
    for index, item in enumerate(transcript.results):
        try:
            kind = item["type"]
            if kind == "word" or kind == "entity":
                glue = opens = False
            elif kind == "punctuation":
                attaches_to = item.get("attaches_to", "previous")
                glue = attaches_to == "previous" or attaches_to == "both"
                opens = attaches_to == "next" or attaches_to == "both"
            else:
                continue  # new item types may appear; the spec says to ignore them
            start = item["start_time"]
            end = item["end_time"]
            alternative = item["alternatives"][0]
            text = alternative["content"]
            speaker = alternative.get("speaker")
            label = item.get("channel")
            valid = (
                type(start) in numbers
                and type(end) in numbers
                and 0 <= start <= end <= max_seconds
                and type(text) is str
                and (speaker is None or type(speaker) is str)
            )
        except (KeyError, TypeError, IndexError, AttributeError):
            valid = False
        if not valid:
            _report_result(errors, ("results", index), item)
            continue
        if forced_channel is None and label != previous_label:  # labels come in runs
            resolved = channels.get(label, -1) if label is None or type(label) is str else -1
            if resolved == -1:
                resolved = _channel_index(label)
                if resolved is None:
                    _report_channel(errors, ("results", index, "channel"), label)
                    previous_label = _UNSEEN
                    continue
                channels[label] = resolved
            channel = resolved
            previous_label = label
        if glue_next and channel in glue_next:
            glue = True
            glue_next.discard(channel)
        if opens:
            glue_next.add(channel)
        if speaker is not None:
            if speaker == UNKNOWN_SPEAKER:
                speaker = last_speaker.get(channel)
                if speaker is None:
                    leading_unknown.setdefault(channel, []).append(len(segments))
            else:
                if leading_unknown and channel in leading_unknown:
                    for earlier in leading_unknown.pop(channel):
                        segments[earlier] = dataclasses.replace(segments[earlier], speaker=speaker)
                last_speaker[channel] = speaker
        append(make(start, end, text, channel, speaker, glue))
    return segments


def _channel_index(label: Any) -> int | None:
    """The 0-based channel of a default label, `Channel 1`/`channel_1` → 0; None otherwise."""
    if type(label) is not str:
        return None
    match = _DEFAULT_CHANNEL_LABEL.fullmatch(label.strip())
    if match is None or not 1 <= int(match.group(1)) <= MAX_CHANNEL + 1:
        return None
    return int(match.group(1)) - 1


def _report_channel(errors: PayloadErrors, path: FieldPath, label: Any) -> None:
    if type(label) is not str:
        errors.add(path, "Not a valid string.")
    else:
        errors.add(path, "Not one of channel_diarization_labels, nor a default label like channel_1.")


def _report_result(errors: PayloadErrors, path: FieldPath, item: Any) -> None:
    """Every problem of one `results[]` item (its fast path failed)."""
    if type(item) is not dict:
        errors.add(path, "Not a valid object.")
        return
    found = False
    for key in ("type", "start_time", "end_time", "alternatives"):
        if key not in item:
            errors.add((*path, key), "Missing data for required field.")
            found = True
    for key in ("start_time", "end_time"):
        problem = kind_problem("seconds", item[key]) if key in item else None
        if problem:
            errors.add((*path, key), problem)
            found = True
    label = item.get("channel")
    if label is not None and type(label) is not str:
        errors.add((*path, "channel"), "Not a valid string.")
        found = True
    alternatives = item.get("alternatives")
    if "alternatives" in item:
        if type(alternatives) is not list or not alternatives:
            errors.add((*path, "alternatives"), "Must be a non-empty list.")
            found = True
        elif type(alternatives[0]) is not dict:
            errors.add((*path, "alternatives", 0), "Not a valid object.")
            found = True
        else:
            alternative = alternatives[0]
            if "content" not in alternative:
                errors.add((*path, "alternatives", 0, "content"), "Missing data for required field.")
                found = True
            elif type(alternative["content"]) is not str:
                errors.add((*path, "alternatives", 0, "content"), "Not a valid string.")
                found = True
            speaker = alternative.get("speaker")
            if speaker is not None and type(speaker) is not str:
                errors.add((*path, "alternatives", 0, "speaker"), "Not a valid string.")
                found = True
    if not found:
        start: Any = item.get("start_time")
        end: Any = item.get("end_time")
        if type(start) in NUMBER_TYPES and type(end) in NUMBER_TYPES and end < start:
            errors.add((*path, "end_time"), "Must not be before start_time.")
        else:
            errors.add(path, "Not a valid item.")


VENDOR = SttVendor(
    name="speechmatics", parse=parse, summary="Speechmatics batch notifications with the transcript attached"
)

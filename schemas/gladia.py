"""Gladia v2 pre-recorded transcription delivered to `callback_config.url` (`POST /hooks/stt/gladia`).

Accepted body: what Gladia POSTs to the callback URL of a `/v2/pre-recorded` job with `"callback": true`:
`{"id", "event": "transcription.success", "payload": {"metadata", "transcription", …}, "custom_metadata"}`,
or `{"id", "event": "transcription.error", "error": {"status_code", "exception", "message"},
"custom_metadata"}` for a failed job (reason: `error.message`, else `error.exception`). Account
webhooks (dashboard) carry only the job id; they are refused with a 422 that says to use the callback.

Segments are `payload.transcription.utterances[]`: `text`, `start`/`end` (float seconds), `channel`
(0-based), `speaker` (an integer, with `"diarization": true`). Who speaks: when
`payload.metadata.number_of_distinct_channels` is above 1 (a stereo file whose channels differ) every
utterance keeps its channel; otherwise the file is mono and only diarization tells the sides apart,
and a mono transcript without it is rejected later (contract §6.3). `?channel=0|1` on the callback URL
says the file held that one channel.

Job id: `id` (a retry is a duplicate). Call reference: `custom_metadata` with the keys of contract §11
(`b24scribe_b24_call_id`, or `b24scribe_pbx` + `b24scribe_call`; the short `b24_call_id`, `pbx` +
`call` are read too). Authentication: Gladia signs nothing; the callback URL carries the inbound token
as `?token=`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from b24scribe.sources import SttVendor
from b24scribe.transcript import Segment, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_SECONDS,
    NUMBER_TYPES,
    ItemShape,
    PayloadErrors,
    channel_from_query,
    field_error,
    load_json_object,
    new_segment,
    reference_from_metadata,
)

SUCCESS = "transcription.success"
ERROR = "transcription.error"
_WEBHOOK_ONLY = (
    "Missing data for required field: this looks like an account webhook, which carries only the job id; "
    'request the job with "callback": true and callback_config.url instead.'
)

_UTTERANCE = ItemShape(
    required=(("start", "seconds"), ("end", "seconds"), ("text", "text")),
    optional=(("channel", "index"), ("speaker", "index")),
    start="start",
    end="end",
)


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """Translate a Gladia v2 pre-recorded callback body into our VendorResult."""
    body = load_json_object(raw_body)
    forced_channel = channel_from_query(query)
    job_id = _job_id(body)
    reference = reference_from_metadata(body.get("custom_metadata"))
    event = body.get("event")
    if event == ERROR:
        return VendorResult(status="failed", failure_reason=_reason(body), vendor_job_id=job_id, reference=reference)
    if event != SUCCESS:
        raise field_error(("event",), f"Must be one of: {SUCCESS}, {ERROR}.")
    payload = body.get("payload")
    if type(payload) is not dict:
        raise field_error(
            ("payload",), "Missing data for required field." if payload is None else "Not a valid object."
        )
    transcription = payload.get("transcription")
    if type(transcription) is not dict:
        message = _WEBHOOK_ONLY if transcription is None else "Not a valid object."
        raise field_error(("payload", "transcription"), message)
    utterances = transcription.get("utterances")
    if type(utterances) is not list:
        message = "Missing data for required field." if utterances is None else "Not a valid list."
        raise field_error(("payload", "transcription", "utterances"), message)
    errors = PayloadErrors()
    segments = _segments(utterances, _distinct_channels(payload, errors), forced_channel, errors)
    errors.raise_if_any()
    return VendorResult(
        status="completed",
        transcript=Transcript(segments=segments),
        vendor_job_id=job_id,
        reference=reference,
    )


def _job_id(body: dict[str, Any]) -> str | None:
    job_id = body.get("id")
    if job_id is None:
        return None
    if type(job_id) is not str:
        raise field_error(("id",), "Not a valid string.")
    return job_id.strip() or None


def _reason(body: dict[str, Any]) -> str:
    """A failed job's reason: the error's message, else its exception, else its status code."""
    error = body.get("error")
    if isinstance(error, dict):
        for key in ("message", "exception"):
            value = error.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
        status_code = error.get("status_code")
        if type(status_code) is int:
            return f"Gladia reported transcription.error (status code {status_code})."
    elif isinstance(error, str) and error.strip():
        return error.strip()
    return "Gladia reported transcription.error without a message."


def _distinct_channels(payload: dict[str, Any], errors: PayloadErrors) -> int | None:
    """`payload.metadata.number_of_distinct_channels`, or None when Gladia did not say."""
    metadata = payload.get("metadata")
    if metadata is None:
        return None
    if type(metadata) is not dict:
        errors.add(("payload", "metadata"), "Not a valid object.")
        return None
    count = metadata.get("number_of_distinct_channels")
    if count is None:
        return None
    if type(count) is not int or count < 0:
        errors.add(("payload", "metadata", "number_of_distinct_channels"), "Not a valid integer.")
        return None
    return count


def _segments(
    utterances: list[Any], distinct_channels: int | None, forced_channel: int | None, errors: PayloadErrors
) -> list[Segment]:
    """One segment per utterance; channels count only on a file of distinct channels."""
    segments: list[Segment] = []
    append = segments.append
    labels: dict[int, str] = {}
    channels_seen: set[int] = set()
    for index, item in enumerate(utterances):
        try:
            start = item["start"]
            end = item["end"]
            text = item["text"]
            channel = item.get("channel")
            speaker = item.get("speaker")
            valid = (
                type(start) in NUMBER_TYPES
                and type(end) in NUMBER_TYPES
                and 0 <= start <= end <= MAX_SECONDS
                and type(text) is str
                and (channel is None or (type(channel) is int and channel >= 0))
                and (speaker is None or (type(speaker) is int and speaker >= 0))
            )
        except (KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            _UTTERANCE.report(errors, ("payload", "transcription", "utterances", index), item)
            continue
        label = None
        if speaker is not None:
            label = labels.get(speaker)
            if label is None:
                label = labels[speaker] = str(speaker)
        if channel is not None:
            channels_seen.add(channel)
        append(new_segment(start, end, text, channel, label))
    multichannel = distinct_channels > 1 if distinct_channels is not None else len(channels_seen) > 1
    if forced_channel is not None or not multichannel:
        for position, segment in enumerate(segments):
            if segment.channel != forced_channel:
                segments[position] = new_segment(
                    segment.start, segment.end, segment.text, forced_channel, segment.speaker
                )
    return segments


VENDOR = SttVendor(
    name="gladia",
    parse=parse,
    summary="Gladia v2 pre-recorded results posted to `callback_config.url`",
)

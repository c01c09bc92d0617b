"""AssemblyAI asynchronous transcripts (`POST /hooks/stt/assemblyai`).

The webhook carries only `{"transcript_id": …, "status": "completed"|"error"}`. Both become a
fetch of `GET <api>/v2/transcript/{id}` (header `authorization: <B24SCRIBE_ASSEMBLYAI_API_KEY>`):
the webhook of a failed job has no reason, the fetched transcript has it in `error`, and that
text is what we record (EU accounts: `B24SCRIBE_ASSEMBLYAI_API_URL=https://api.eu.assemblyai.com`).
`parse_transcript` reads the fetched transcript: `utterances` (present with `speaker_labels` or
`multichannel`) else `words`, times in integer MILLISECONDS, `speaker` "A", "B", … and, with
`multichannel=true`, `channel` "1", "2", … (left is "1"), which becomes our 0-based channel.
Without speaker labels or channels the transcript is mono and unattributable (contract §6.3).

Job id: `transcript_id` (webhook) / `id` (transcript). Call reference: AssemblyAI has no metadata
field; the `webhook_url` carries `?pbx=…&call=…` or `?b24_call_id=…` (contract §3.3).
Authentication: AssemblyAI sends a custom header of the user's choosing; configure
`webhook_auth_header_name: "X-B24scribe-Token"` and `webhook_auth_header_value: <inbound token>`
(`Authorization` / `Bearer <token>` works too, as on every hook).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import fields, post_load, validate

from b24scribe.sources import FetchSpec, SttVendor
from b24scribe.transcript import Segment, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_MILLISECONDS,
    NUMBER_TYPES,
    FieldPath,
    ItemShape,
    PayloadErrors,
    RawList,
    VendorSchema,
    channel_from_query,
    field_error,
    load_json_object,
    new_segment,
)

AUTH_HEADER = "X-B24scribe-Token"


@dataclass(frozen=True, slots=True)
class AssemblyAIWebhook:
    """The webhook: which transcript reached which final status."""

    transcript_id: str
    status: str


@dataclass(frozen=True, slots=True)
class AssemblyAITranscript:
    """The envelope of a fetched transcript; utterances and words are still raw JSON."""

    id: str
    status: str
    error: str | None
    utterances: list[Any] | None
    words: list[Any] | None


class AssemblyAIWebhookSchema(VendorSchema):
    """The webhook body."""

    transcript_id = fields.String(required=True, validate=validate.Length(min=1))
    status = fields.String(required=True, validate=validate.OneOf(["completed", "error"]))

    @post_load
    def _to_webhook(self, data: dict[str, Any], **kwargs: Any) -> AssemblyAIWebhook:
        return AssemblyAIWebhook(**data)


class AssemblyAITranscriptSchema(VendorSchema):
    """The fetched transcript's envelope, without walking its word lists."""

    id = fields.String(required=True, validate=validate.Length(min=1))
    status = fields.String(
        required=True,
        validate=validate.OneOf(["completed", "error"], error="Must be completed or error: the transcript is {input}."),
    )
    error = fields.String(load_default=None, allow_none=True)
    utterances = RawList(load_default=None, allow_none=True)
    words = RawList(load_default=None, allow_none=True)

    @post_load
    def _to_transcript(self, data: dict[str, Any], **kwargs: Any) -> AssemblyAITranscript:
        return AssemblyAITranscript(**data)


WEBHOOK_SCHEMA = AssemblyAIWebhookSchema()
TRANSCRIPT_SCHEMA = AssemblyAITranscriptSchema()

_ITEM_FIELDS: tuple[tuple[str, Any], ...] = (("start", "milliseconds"), ("end", "milliseconds"))
_UTTERANCE = ItemShape(
    required=(*_ITEM_FIELDS, ("text", "text")),
    optional=(("speaker", "text"), ("channel", "label")),
    start="start",
    end="end",
)
_CHANNEL_MESSAGE = 'Not a valid channel number ("1", "2", …).'


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """The webhook: always a fetch of the transcript, which holds the text or the reason."""
    channel_from_query(query)  # a bad ?channel= is refused now, not after the fetch
    webhook: AssemblyAIWebhook = WEBHOOK_SCHEMA.load(load_json_object(raw_body))
    return VendorResult(status="fetch", fetch_id=webhook.transcript_id, vendor_job_id=webhook.transcript_id)


def parse_transcript(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """The fetched `GET /v2/transcript/{id}` body (with the callback's query parameters)."""
    forced_channel = channel_from_query(query)
    fetched: AssemblyAITranscript = TRANSCRIPT_SCHEMA.load(load_json_object(raw_body))
    if fetched.status == "error":
        return VendorResult(
            status="failed",
            failure_reason=fetched.error or "AssemblyAI reported an error without a message.",
            vendor_job_id=fetched.id,
        )
    errors = PayloadErrors()
    if fetched.utterances:
        segments = _segments(fetched.utterances, "utterances", forced_channel, errors)
        transcript = Transcript(segments=segments)
    elif fetched.words is not None:
        segments = _segments(fetched.words, "words", forced_channel, errors)
        transcript = Transcript(segments=segments, granularity="word")
    else:
        raise field_error(("words",), "Missing data for required field.")
    errors.raise_if_any()
    return VendorResult(status="completed", transcript=transcript, vendor_job_id=fetched.id)


def _segments(items: list[Any], list_name: str, forced_channel: int | None, errors: PayloadErrors) -> list[Segment]:
    """Utterances or words alike: `text`, `start`/`end` in ms, `speaker`, `channel` "1"-based."""
    segments: list[Segment] = []
    append = segments.append
    channels: dict[Any, int] = {}
    for index, item in enumerate(items):
        try:
            start = item["start"]
            end = item["end"]
            text = item["text"]
            speaker = item.get("speaker")
            label = item.get("channel")
            valid = (
                type(start) in NUMBER_TYPES
                and type(end) in NUMBER_TYPES
                and 0 <= start <= end <= MAX_MILLISECONDS
                and type(text) is str
                and (speaker is None or type(speaker) is str)
                and (label is None or type(label) is str or type(label) is int)
            )
        except (KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            _UTTERANCE.report(errors, (list_name, index), item)
            continue
        channel = forced_channel
        if label is not None and forced_channel is None:
            channel = channels.get(label)
            if channel is None:
                channel = _channel_index(label, (list_name, index, "channel"), errors)
                if channel is None:
                    continue
                channels[label] = channel
        append(new_segment(start / 1000, end / 1000, text, channel, speaker))
    return segments


def _channel_index(label: Any, path: FieldPath, errors: PayloadErrors) -> int | None:
    """AssemblyAI's 1-based channel label ("1", "2"; left is "1") as our 0-based index."""
    if type(label) is str and label.isascii() and label.isdigit() and len(label) <= 9:  # no 5,000-digit int()
        number = int(label)
    elif type(label) is int:
        number = label
    else:
        errors.add(path, _CHANNEL_MESSAGE)
        return None
    if number < 1:
        errors.add(path, _CHANNEL_MESSAGE)
        return None
    return number - 1


def _api_headers(api_key: str) -> dict[str, str]:
    return {"authorization": api_key, "accept": "application/json"}


VENDOR = SttVendor(
    name="assemblyai",
    summary="AssemblyAI webhooks (the transcript is fetched by its id)",
    parse=parse,
    fetch=FetchSpec(
        default_api_url="https://api.assemblyai.com",
        path="/v2/transcript/{id}",
        headers=_api_headers,
        parse=parse_transcript,
    ),
    auth_header=AUTH_HEADER,
)

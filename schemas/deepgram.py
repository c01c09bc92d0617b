"""Deepgram pre-recorded transcription delivered to `callback=` (`POST /hooks/stt/deepgram`).

Accepted body: what Deepgram POSTs (or PUTs, `callback_method=put`) to the callback URL — the
/v1/listen response, `metadata` + `results`. Segments are `results.utterances` (`utterances=true`)
when present and non-empty, else the words of each `results.channels[i].alternatives[0]`
(`punctuated_word`, falling back to `word`), grouped by side later (contract §6.4).

Who speaks: with more than one entry in `results.channels` (`multichannel=true` on a stereo file)
every segment keeps its 0-based channel. A single channel is mono even though Deepgram labels
utterances `channel: 0`: then only diarization (`diarize=true`: `speaker` 0, 1, …) tells the sides
apart, and a mono transcript without it is rejected later (contract §6.3). `?channel=0|1` on the
callback URL says the file held that one channel.

A body with `err_code`/`err_msg` and no `results` is a failed job (reason: `err_msg`).
Job id: `metadata.request_id`. Call reference: `extra=pbx:<pbx>&extra=call:<pbx call id>` or
`extra=b24_call_id:<CALL_ID>` on the /v1/listen request, echoed in `metadata.extra`.
Authentication: Deepgram signs nothing; the callback URL carries the inbound token as Basic auth
password (`https://b24scribe:<token>@host/hooks/stt/deepgram?pbx=…&call=…`) or as `?token=`.
An `extra=callback_secret:…` is not checked: bodies are read only after authentication.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from marshmallow import fields, post_load, validate

from b24scribe.sources import SttVendor
from b24scribe.transcript import Segment, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_SECONDS,
    NUMBER_TYPES,
    ItemShape,
    PayloadErrors,
    RawList,
    VendorSchema,
    channel_from_query,
    load_json_object,
    new_segment,
    reference_from_metadata,
)


@dataclass(frozen=True, slots=True)
class DeepgramCallback:
    """The envelope of a Deepgram callback; utterances and words are still raw JSON."""

    request_id: str
    channel_words: list[list[Any]]  # per channel: alternatives[0].words
    utterances: list[Any] | None
    extra: dict[str, str] = field(default_factory=dict)


class _AlternativeSchema(VendorSchema):
    words = RawList(load_default=list)


class _ChannelSchema(VendorSchema):
    alternatives = fields.List(fields.Nested(_AlternativeSchema), required=True, validate=validate.Length(min=1))

    @post_load
    def _first_alternative_words(self, data: dict[str, Any], **kwargs: Any) -> list[Any]:
        words: list[Any] = data["alternatives"][0]["words"]
        return words


class _ResultsSchema(VendorSchema):
    channels = fields.List(fields.Nested(_ChannelSchema), required=True)
    utterances = RawList(load_default=None, allow_none=True)


class _MetadataSchema(VendorSchema):
    request_id = fields.String(required=True, validate=validate.Length(min=1))
    extra = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)


class DeepgramCallbackSchema(VendorSchema):
    """The callback body's envelope: metadata and results, without walking the word lists."""

    metadata = fields.Nested(_MetadataSchema, required=True)
    results = fields.Nested(_ResultsSchema, required=True)

    @post_load
    def _to_callback(self, data: dict[str, Any], **kwargs: Any) -> DeepgramCallback:
        return DeepgramCallback(
            request_id=data["metadata"]["request_id"],
            channel_words=data["results"]["channels"],
            utterances=data["results"]["utterances"],
            extra=data["metadata"]["extra"],
        )


CALLBACK_SCHEMA = DeepgramCallbackSchema()

_UTTERANCE = ItemShape(
    required=(("start", "seconds"), ("end", "seconds"), ("transcript", "text")),
    optional=(("channel", "index"), ("speaker", "index")),
    start="start",
    end="end",
)
_WORD = ItemShape(
    required=(("start", "seconds"), ("end", "seconds"), ("word", "text")),
    optional=(("punctuated_word", "text"), ("speaker", "index")),
    start="start",
    end="end",
)


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """Translate a Deepgram callback body into our VendorResult."""
    body = load_json_object(raw_body)
    forced_channel = channel_from_query(query)
    if "results" not in body and ("err_code" in body or "err_msg" in body):
        return _failed(body)
    callback: DeepgramCallback = CALLBACK_SCHEMA.load(body)
    errors = PayloadErrors()
    if callback.utterances:
        multichannel = len(callback.channel_words) > 1
        segments = _utterance_segments(callback.utterances, multichannel, forced_channel, errors)
        transcript = Transcript(segments=segments)
    else:
        segments = _word_segments(callback.channel_words, forced_channel, errors)
        transcript = Transcript(segments=segments, granularity="word")
    errors.raise_if_any()
    return VendorResult(
        status="completed",
        transcript=transcript,
        vendor_job_id=callback.request_id,
        reference=reference_from_metadata(callback.extra),
    )


def _failed(body: dict[str, Any]) -> VendorResult:
    """A body that reports an error instead of results (the shape of Deepgram's API errors)."""
    metadata = body.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    reason = body.get("err_msg") or body.get("err_code")
    request_id = body.get("request_id") or metadata.get("request_id")
    extra = metadata.get("extra")
    return VendorResult(
        status="failed",
        failure_reason=str(reason) if reason else "Deepgram reported an error without a message.",
        vendor_job_id=request_id if isinstance(request_id, str) and request_id else None,
        reference=reference_from_metadata(extra),
    )


def _utterance_segments(
    utterances: list[Any], multichannel: bool, forced_channel: int | None, errors: PayloadErrors
) -> list[Segment]:
    """One segment per utterance (float seconds; `channel` only counts on multichannel files)."""
    segments: list[Segment] = []
    append = segments.append
    use_item_channel = multichannel and forced_channel is None
    labels: dict[int, str] = {}
    for index, item in enumerate(utterances):
        try:
            start = item["start"]
            end = item["end"]
            text = item["transcript"]
            channel = item.get("channel", 0)
            speaker = item.get("speaker")
            valid = (
                type(start) in NUMBER_TYPES
                and type(end) in NUMBER_TYPES
                and 0 <= start <= end <= MAX_SECONDS
                and type(text) is str
                and type(channel) is int
                and channel >= 0
                and (speaker is None or (type(speaker) is int and speaker >= 0))
            )
        except (KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            _UTTERANCE.report(errors, ("results", "utterances", index), item)
            continue
        label = None
        if speaker is not None:
            label = labels.get(speaker)
            if label is None:
                label = labels[speaker] = str(speaker)
        append(new_segment(start, end, text, channel if use_item_channel else forced_channel, label))
    return segments


def _word_segments(channel_words: list[list[Any]], forced_channel: int | None, errors: PayloadErrors) -> list[Segment]:
    """One word-level segment per word of every channel's first alternative."""
    segments: list[Segment] = []
    append = segments.append
    multichannel = len(channel_words) > 1
    labels: dict[int, str] = {}
    for channel_index, words in enumerate(channel_words):
        if forced_channel is not None:
            channel: int | None = forced_channel
        else:
            channel = channel_index if multichannel else None
        for index, item in enumerate(words):
            try:
                text = item.get("punctuated_word") or item["word"]
                start = item["start"]
                end = item["end"]
                speaker = item.get("speaker")
                valid = (
                    type(start) in NUMBER_TYPES
                    and type(end) in NUMBER_TYPES
                    and 0 <= start <= end <= MAX_SECONDS
                    and type(text) is str
                    and (speaker is None or (type(speaker) is int and speaker >= 0))
                )
            except (KeyError, TypeError, AttributeError):
                valid = False
            if not valid:
                path = ("results", "channels", channel_index, "alternatives", 0, "words", index)
                _WORD.report(errors, path, item)
                continue
            label = None
            if speaker is not None:
                label = labels.get(speaker)
                if label is None:
                    label = labels[speaker] = str(speaker)
            append(new_segment(start, end, text, channel, label))
    return segments


VENDOR = SttVendor(name="deepgram", parse=parse, summary="Deepgram pre-recorded results posted to `callback=`")

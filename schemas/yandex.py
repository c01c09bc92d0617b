"""Yandex SpeechKit asynchronous recognition, v2 (`POST /hooks/stt/yandex`).

SpeechKit calls nobody back: the user's script polls the operation
(`GET https://operation.api.cloud.yandex.net/operations/<id>`) and posts what it got, as is:

- the finished Operation: `id`, `done`, and `response` (`…LongRunningRecognitionResponse`:
  `chunks[]`) or `error` (google.rpc.Status: `code`, `message`);
- the response alone (`{"chunks": [...]}`), or its bare `chunks[]` list.

Segments: one per chunk, its text the first alternative's `text` (numbers in figures, as SpeechKit
normalises them). A chunk has no time of its own: it runs from its first word's `startTime` to its
last word's `endTime` (Duration strings with float noise, `"0.879999999s"`; SpeechKit warns they may
be 1-2 s off); a chunk without words sits where the previous chunk of its channel ended.

Who speaks (contract §6.3): `channelTag` is a STRING counted from 1 (`"1"`, `"2"`), and becomes the
0-based channel when the chunks carry more than one tag (a stereo LPCM file with
`audioChannelCount: 2`, or a stereo OggOpus/MP3 file). v2 has no speaker diarization, so a
transcript whose chunks all carry one tag is mono and cannot be attributed: transcribe each channel
as its own file and post each result with `?channel=0` or `?channel=1`.

A finished operation with `error` is a failed job (reason: its `message`). Job id: the operation `id`.
The operation carries no metadata of ours, so the URL names the call (`?pbx=…&call=…` or
`?b24_call_id=…`); authentication is the inbound token (bearer or `?token=`): nothing is signed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError

from b24scribe.limits import MAX_CHANNEL
from b24scribe.sources import SttVendor
from b24scribe.transcript import Segment, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_SECONDS,
    FieldPath,
    PayloadErrors,
    channel_from_query,
    duration_seconds,
    field_error,
    new_segment,
    unwrap_operation,
)
from schemas.source import load_json

_ACCEPTED_SHAPES = (
    "Missing data for required field: expected a finished longRunningRecognize Operation "
    "(done, response.chunks), its response (chunks), or the chunks list."
)
_NOT_DONE = "The operation has not finished: post it once done is true."
_CHANNEL_TAG = f"Not a valid channel tag: expected a string from 1 to {MAX_CHANNEL + 1}."
_TAGS_BY_TEXT = {str(tag): tag for tag in range(1, MAX_CHANNEL + 2)}


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """Translate a SpeechKit v2 operation, response or chunks list into our VendorResult."""
    forced_channel = channel_from_query(query)
    located = _locate(load_json(raw_body))
    if isinstance(located, VendorResult):
        return located
    chunks, base, job_id = located
    errors = PayloadErrors()
    segments = _chunk_segments(chunks, base, forced_channel, errors)
    errors.raise_if_any()
    return VendorResult(status="completed", transcript=Transcript(segments=segments), vendor_job_id=job_id)


def _locate(body: Any) -> VendorResult | tuple[list[Any], FieldPath, str | None]:
    """The chunks and their path, or the failed job the body reports."""
    if type(body) is list:
        return body, (), None
    if type(body) is not dict:
        raise ValidationError({"_schema": ["The body must be a JSON object or list."]})
    job_id = body.get("id")
    job_id = job_id if type(job_id) is str and job_id else None
    unwrapped = unwrap_operation(body, "chunks", _ACCEPTED_SHAPES, _NOT_DONE, job_id, "Yandex SpeechKit")
    if isinstance(unwrapped, VendorResult):
        return unwrapped
    response, base = unwrapped
    chunks = response.get("chunks", [])  # nothing recognised: no chunks
    if type(chunks) is not list:
        raise field_error((*base, "chunks"), "Not a valid list.")
    return chunks, (*base, "chunks"), job_id


def _channel_tag(value: Any) -> int | None:
    """`"1"` → 1 (an integer is accepted too); None when it is no channel tag."""
    if type(value) is str and 0 < len(value) <= 2 and value.isascii() and value.isdigit():
        value = int(value)
    if type(value) is int and 1 <= value <= MAX_CHANNEL + 1:
        return value
    return None


def _chunk_segments(
    chunks: list[Any], base: FieldPath, forced_channel: int | None, errors: PayloadErrors
) -> list[Segment]:
    """One segment per chunk with a first alternative."""
    tags: set[int | None] = set()
    if forced_channel is None:
        for chunk in chunks:
            if type(chunk) is dict:
                tags.add(_channel_tag(chunk.get("channelTag", "1")))
    tags.discard(None)
    multichannel = len(tags) > 1
    segments: list[Segment] = []
    append = segments.append
    previous_end: dict[int, float] = {}
    tags_by_text = _TAGS_BY_TEXT
    for index, chunk in enumerate(chunks):
        path = (*base, index)
        try:
            tag_value = chunk.get("channelTag", "1")
            alternative = chunk["alternatives"][0]
            text = alternative["text"]
            words = alternative.get("words")
            first = words[0]
            last = words[-1]
            start_text = first["startTime"]
            end_text = last["endTime"]
            if start_text[-1] != "s" or end_text[-1] != "s":
                raise ValueError
            start = float(start_text[:-1])
            end = float(end_text[:-1])
            tag = tags_by_text[tag_value]  # KeyError (or TypeError) for anything else: the slow path decides
            valid = 0 <= start <= end <= MAX_SECONDS and type(text) is str
        except (KeyError, TypeError, AttributeError, IndexError, ValueError):
            valid = False
        if not valid:
            checked = _checked_chunk(chunk, path, previous_end, errors)
            if checked is None:
                continue
            start, end, text, tag = checked
        previous_end[tag] = end
        channel = tag - 1 if multichannel else forced_channel
        append(new_segment(start, end, text, channel))
    return segments


def _checked_chunk(
    chunk: Any, path: FieldPath, previous_end: dict[int, float], errors: PayloadErrors
) -> tuple[float, float, str, int] | None:
    """A chunk the fast path refused: read the slow way (no words, other time forms), or reported."""
    if type(chunk) is not dict:
        errors.add(path, "Not a valid object.")
        return None
    tag = _channel_tag(chunk.get("channelTag", "1"))
    if tag is None:
        errors.add((*path, "channelTag"), _CHANNEL_TAG)
        return None
    alternatives = chunk.get("alternatives")
    if alternatives is None or alternatives == []:
        return None  # nothing recognised in this chunk
    if type(alternatives) is not list:
        errors.add((*path, "alternatives"), "Not a valid list.")
        return None
    alternative = alternatives[0]
    if type(alternative) is not dict:
        errors.add((*path, "alternatives", 0), "Not a valid object.")
        return None
    text = alternative.get("text", "")
    if type(text) is not str:
        errors.add((*path, "alternatives", 0, "text"), "Not a valid string.")
        return None
    words = alternative.get("words")
    if not words:
        start = end = previous_end.get(tag, 0.0)
        return start, end, text, tag
    words_path = (*path, "alternatives", 0, "words")
    if type(words) is not list:
        errors.add(words_path, "Not a valid list.")
        return None
    times: list[float] = []
    for position, key in ((0, "startTime"), (len(words) - 1, "endTime")):
        word = words[position]
        if type(word) is not dict:
            errors.add((*words_path, position), "Not a valid object.")
            return None
        seconds, problem = duration_seconds(word.get(key, "0s"))
        if problem is not None:
            errors.add((*words_path, position, key), problem)
            return None
        times.append(seconds)
    start, end = times
    if end < start:
        errors.add((*words_path, len(words) - 1, "endTime"), "Must not be before the first word's startTime.")
        return None
    return start, end, text, tag


VENDOR = SttVendor(
    name="yandex",
    parse=parse,
    summary="Yandex SpeechKit asynchronous recognition (v2): the finished operation, posted by your script",
)

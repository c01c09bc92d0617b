"""Vosk offline recognition, posted by the user's script (`POST /hooks/stt/vosk?channel=0|1`).

Vosk runs locally and calls nobody back. Its examples take mono audio only, so a stereo call is
split into its two channels, each run through its own `KaldiRecognizer` with `SetWords(True)`, and
each channel's results are posted as one JSON list: every `Result()` in order, then `FinalResult()`
(often the empty `{"text": ""}`), e.g. `[{"result": [{"conf": 1.0, "start": 0.51, "end": 1.02,
"word": "hello"}, …], "text": "hello …"}, …, {"text": ""}]`. A single result object is read as a
list of one.

Segments: one per result (an utterance), its text the result's `text` (lowercase, no punctuation:
that is what Vosk gives), from its first word's `start` to its last word's `end` (float seconds).
Empty results are dropped, `partial` results (a live recogniser's) ignored; with
`SetMaxAlternatives` the first of `alternatives` is read. Results with text but no words are
refused: times come only with `SetWords(True)`. Speaker vectors (`spk`) are no labels and ignored.

Who speaks (contract §6.3): Vosk has no channels nor speakers, so the URL says which channel of the
call the list holds: `?channel=0` or `?channel=1` (required once the list has any words). The two
lists of one call are two parts of the same transcript (contract §11, one file per channel): each
part that arrives attaches everything known so far for the call.

No job id: the body's hash deduplicates a retry. The URL names the call (`?pbx=…&call=…` or
`?b24_call_id=…`); authentication is the inbound token (bearer or `?token=`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError

from b24scribe.sources import SttVendor
from b24scribe.transcript import Segment, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_SECONDS,
    NUMBER_TYPES,
    FieldPath,
    PayloadErrors,
    channel_from_query,
    kind_problem,
    new_segment,
)
from schemas.source import load_json

CHANNEL_REQUIRED = (
    "Missing data for required field: Vosk results have no channels nor speakers; post each "
    "channel's results with ?channel=0 or ?channel=1."
)
_WORDS_REQUIRED = "Missing data for required field: call SetWords(True) so that results carry word times."


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """Translate one channel's list of Vosk results into our VendorResult."""
    forced_channel = channel_from_query(query)
    body = load_json(raw_body)
    if type(body) is dict:
        results: list[Any] = [body]
        base: FieldPath = ()
        single = True
    elif type(body) is list:
        results, base, single = body, (), False
    else:
        raise ValidationError({"_schema": ["The body must be a JSON list of Vosk results (or one result)."]})
    errors = PayloadErrors()
    segments = _result_segments(results, base, single, forced_channel, errors)
    errors.raise_if_any()
    if forced_channel is None and segments:
        raise ValidationError({"channel": [CHANNEL_REQUIRED]})
    return VendorResult(status="completed", transcript=Transcript(segments=segments))


def _result_segments(
    results: list[Any], base: FieldPath, single: bool, forced_channel: int | None, errors: PayloadErrors
) -> list[Segment]:
    """One segment per non-empty result."""
    segments: list[Segment] = []
    append = segments.append
    make, numbers, max_seconds = new_segment, NUMBER_TYPES, MAX_SECONDS
    for index, item in enumerate(results):
        try:
            text = item["text"]
            words = item["result"]
            start = words[0]["start"]
            end = words[-1]["end"]
            valid = (
                type(start) in numbers
                and type(end) in numbers
                and 0 <= start <= end <= max_seconds
                and type(text) is str
                and type(words) is list
            )
        except (KeyError, TypeError, IndexError):
            valid = False
        if not valid:
            path = base if single else (*base, index)
            checked = _checked_result(item, path, errors)
            if checked is None:
                continue
            start, end, text = checked
        append(make(start, end, text, forced_channel))
    return segments


def _checked_result(item: Any, path: FieldPath, errors: PayloadErrors) -> tuple[float, float, str] | None:
    """A result the fast path refused: empty or partial (None), another shape, or its problems reported."""
    if type(item) is not dict:
        errors.add(path, "Not a valid object.")
        return None
    alternatives = item.get("alternatives")
    if "text" not in item and "result" not in item and type(alternatives) is list:
        if not alternatives:
            return None
        item, path = alternatives[0], (*path, "alternatives", 0)
        if type(item) is not dict:
            errors.add(path, "Not a valid object.")
            return None
    elif "text" not in item and "result" not in item:
        return None  # a partial result, or nothing recognised
    text = item.get("text")
    words = item.get("result")
    if text is not None and type(text) is not str:
        errors.add((*path, "text"), "Not a valid string.")
        return None
    if words is None or words == []:
        if text and text.strip():
            errors.add((*path, "result"), _WORDS_REQUIRED)
        return None
    if type(words) is not list:
        errors.add((*path, "result"), "Not a valid list.")
        return None
    times: list[float] = []
    for position, key in ((0, "start"), (len(words) - 1, "end")):
        word = words[position]
        word_path = (*path, "result", position)
        if type(word) is not dict:
            errors.add(word_path, "Not a valid object.")
            return None
        problem = kind_problem("seconds", word[key]) if key in word else "Missing data for required field."
        if problem:
            errors.add((*word_path, key), problem)
            return None
        times.append(word[key])
    start, end = times
    if end < start:
        errors.add((*path, "result", len(words) - 1, "end"), "Must not be before the first word's start.")
        return None
    if text is None:
        parts = [word.get("word") for word in words if type(word) is dict]
        text = " ".join(part for part in parts if type(part) is str)
    return start, end, text


VENDOR = SttVendor(name="vosk", parse=parse, summary="Vosk results, one list per channel, posted by your script")

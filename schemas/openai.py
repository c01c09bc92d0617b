"""The Whisper family, posted by the user's own script (no vendor callbacks exist):
`POST /hooks/stt/openai` takes any of the shapes below and tells them apart; `whispercpp` and
`fasterwhisper` (their own modules) take their tool's output only.

- OpenAI `/v1/audio/transcriptions` `verbose_json`: `segments[]` with `start`/`end` (float
  seconds) and `text`; with only `timestamp_granularities[]=word` it has `words[]` (`word`), which
  become word-level segments. The API has no channels: transcribe each channel of a stereo call
  on its own and post each result with `?channel=0` or `?channel=1`.
- OpenAI `diarized_json` (a diarizing model): `segments[]` with `speaker` ("A", "B", … or a
  known speaker name); speakers map by the first-speaker rule. WhisperX-style `segments[]` with a
  `speaker` ("SPEAKER_00") are read the same way.
- whisper.cpp CLI `-oj`: `transcription[]` with `offsets.from`/`offsets.to` in MILLISECONDS and
  `text`; with `--diarize` on a stereo file, `speaker` "0" (left channel louder) or "1" (right)
  become channel 0 or 1, and "?" (undecided) takes the side opposite to the previous message
  (contract §6.3); with `--tinydiarize`, `speaker_turn_next` alternates speakers "A"/"B" from the
  first segment. The whisper.cpp server's `verbose_json` is the OpenAI shape above.
- faster-whisper: the segments as a JSON list (or `{"segments": [...]}`) of `_asdict()` dicts
  (`start`, `end`, `text`); a NamedTuple dumped as a JSON array (`[id, seek, start, end, text,
  …]`) is read by position.

None of these has a job id: the body's hash deduplicates (vendor_job_id stays None); the call is
named by the URL (`?pbx=…&call=…` or `?b24_call_id=…`), authenticated by `?token=` or a bearer
token like every hook.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError, post_load

from b24scribe.sources import SttVendor
from b24scribe.transcript import Segment, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_MILLISECONDS,
    MAX_SECONDS,
    NUMBER_TYPES,
    FieldPath,
    ItemShape,
    Kind,
    PayloadErrors,
    RawList,
    VendorSchema,
    channel_from_query,
    kind_problem,
    new_segment,
)
from schemas.source import load_json

# whisper.cpp --diarize: which stereo channel was louder over the segment.
_WHISPERCPP_CHANNELS = {"0": 0, "1": 1}
_TINYDIARIZE_SPEAKERS = ("A", "B")
_ACCEPTED_SHAPES = (
    "Missing data for required field: expected OpenAI verbose_json or diarized_json "
    "(segments), faster-whisper segments, or whisper.cpp -oj output (transcription)."
)


@dataclass(frozen=True, slots=True)
class WhisperSegments:
    """An OpenAI-style result: segments (seconds) or, failing those, words."""

    segments: list[Any] | None
    words: list[Any] | None


@dataclass(frozen=True, slots=True)
class WhisperCppOutput:
    """whisper.cpp's `-oj` file: its segments are still raw JSON."""

    transcription: list[Any]


class WhisperSegmentsSchema(VendorSchema):
    """OpenAI `verbose_json`/`diarized_json`, faster-whisper `{"segments"}`, WhisperX."""

    segments = RawList(load_default=None, allow_none=True)
    words = RawList(load_default=None, allow_none=True)

    @post_load
    def _to_result(self, data: dict[str, Any], **kwargs: Any) -> WhisperSegments:
        return WhisperSegments(**data)


class WhisperCppOutputSchema(VendorSchema):
    """whisper.cpp `-oj`: `transcription[]`."""

    transcription = RawList(required=True)

    @post_load
    def _to_output(self, data: dict[str, Any], **kwargs: Any) -> WhisperCppOutput:
        return WhisperCppOutput(**data)


SEGMENTS_SCHEMA = WhisperSegmentsSchema()
WHISPERCPP_SCHEMA = WhisperCppOutputSchema()

_SEGMENT = ItemShape(
    required=(("start", "seconds"), ("end", "seconds"), ("text", "text")),
    optional=(("speaker", "label"),),
    start="start",
    end="end",
)
_WORD = ItemShape(
    required=(("start", "seconds"), ("end", "seconds"), ("word", "text")),
    start="start",
    end="end",
)


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """Any Whisper-family result: the shape is recognised by its top-level keys."""
    forced_channel = channel_from_query(query)
    body = load_json(raw_body)
    if type(body) is dict and "transcription" in body:
        return _completed(_whispercpp_transcript(body, forced_channel))
    if type(body) is list or (type(body) is dict and ("segments" in body or "words" in body)):
        return _completed(_segments_transcript(body, forced_channel))
    raise ValidationError({"segments": [_ACCEPTED_SHAPES]})


def parse_whispercpp(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """whisper.cpp: the CLI's `-oj` file, or the server's `verbose_json` (OpenAI's shape)."""
    forced_channel = channel_from_query(query)
    body = load_json(raw_body)
    if type(body) is dict and "transcription" not in body and "segments" in body:
        return _completed(_segments_transcript(body, forced_channel))
    if type(body) is not dict:
        raise ValidationError({"_schema": ["The body must be a JSON object."]})
    return _completed(_whispercpp_transcript(body, forced_channel))


def parse_fasterwhisper(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """faster-whisper: a JSON list of segments, or `{"segments": [...]}`."""
    forced_channel = channel_from_query(query)
    body = load_json(raw_body)
    if type(body) is dict and "segments" not in body:
        raise ValidationError({"segments": ["Missing data for required field."]})
    if type(body) not in (list, dict):
        raise ValidationError({"_schema": ["The body must be a JSON list or object."]})
    return _completed(_segments_transcript(body, forced_channel))


def _completed(transcript: Transcript) -> VendorResult:
    return VendorResult(status="completed", transcript=transcript)


def _segments_transcript(body: list[Any] | dict[str, Any], forced_channel: int | None) -> Transcript:
    """Segments (seconds) from a bare list or an OpenAI-style object; words if no segments."""
    errors = PayloadErrors()
    if type(body) is list:
        segments = _timed_segments(body, (), forced_channel, errors)
        transcript = Transcript(segments=segments)
    else:
        result: WhisperSegments = SEGMENTS_SCHEMA.load(body)
        if result.segments:
            segments = _timed_segments(result.segments, ("segments",), forced_channel, errors)
            transcript = Transcript(segments=segments)
        elif result.words:
            segments = _timed_words(result.words, forced_channel, errors)
            transcript = Transcript(segments=segments, granularity="word")
        else:
            transcript = Transcript(segments=[])
    errors.raise_if_any()
    return transcript


def _timed_segments(
    items: list[Any], base: FieldPath, forced_channel: int | None, errors: PayloadErrors
) -> list[Segment]:
    """Segments with `start`/`end` in seconds, `text` and an optional `speaker` label."""
    segments: list[Segment] = []
    append = segments.append
    for index, item in enumerate(items):
        if type(item) is list:  # a faster-whisper NamedTuple dumped as an array
            segment = _positional_segment(item, (*base, index), forced_channel, errors)
            if segment is not None:
                append(segment)
            continue
        try:
            start = item["start"]
            end = item["end"]
            text = item["text"]
            speaker = item.get("speaker")
            valid = (
                type(start) in NUMBER_TYPES
                and type(end) in NUMBER_TYPES
                and 0 <= start <= end <= MAX_SECONDS
                and type(text) is str
                and (speaker is None or type(speaker) is str or type(speaker) is int)
            )
        except (KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            _SEGMENT.report(errors, (*base, index), item)
            continue
        if speaker is not None and type(speaker) is not str:
            speaker = str(speaker)
        append(new_segment(start, end, text, forced_channel, speaker))
    return segments


def _positional_segment(
    row: list[Any], path: FieldPath, forced_channel: int | None, errors: PayloadErrors
) -> Segment | None:
    """faster-whisper's new_segment(id, seek, start, end, text, …) as a JSON array."""
    if len(row) < 5:
        errors.add(path, "Not a valid segment: expected [id, seek, start, end, text, …].")
        return None
    start, end, text = row[2], row[3], row[4]
    found = False
    checks: tuple[tuple[int, Kind, Any], ...] = ((2, "seconds", start), (3, "seconds", end), (4, "text", text))
    for position, kind, value in checks:
        problem = kind_problem(kind, value)
        if problem:
            errors.add((*path, position), problem)
            found = True
    if found:
        return None
    if end < start:
        errors.add((*path, 3), "Must not be before the start (index 2).")
        return None
    return new_segment(start, end, text, forced_channel)


def _timed_words(items: list[Any], forced_channel: int | None, errors: PayloadErrors) -> list[Segment]:
    """OpenAI `words[]` (`word`, `start`, `end` in seconds) as word-level segments."""
    segments: list[Segment] = []
    append = segments.append
    for index, item in enumerate(items):
        try:
            start = item["start"]
            end = item["end"]
            text = item["word"]
            valid = (
                type(start) in NUMBER_TYPES
                and type(end) in NUMBER_TYPES
                and 0 <= start <= end <= MAX_SECONDS
                and type(text) is str
            )
        except (KeyError, TypeError):
            valid = False
        if not valid:
            _WORD.report(errors, ("words", index), item)
            continue
        append(new_segment(start, end, text, forced_channel))
    return segments


def _whispercpp_transcript(body: dict[str, Any], forced_channel: int | None) -> Transcript:
    """whisper.cpp `-oj`: `offsets` in ms; `--diarize` speakers are stereo channels."""
    output: WhisperCppOutput = WHISPERCPP_SCHEMA.load(body)
    errors = PayloadErrors()
    segments: list[Segment] = []
    append = segments.append
    turns = _tinydiarize_turns(output.transcription)
    for index, item in enumerate(output.transcription):
        try:
            offsets = item["offsets"]
            start = offsets["from"]
            end = offsets["to"]
            text = item["text"]
            speaker = item.get("speaker")
            valid = (
                type(start) in NUMBER_TYPES
                and type(end) in NUMBER_TYPES
                and 0 <= start <= end <= MAX_MILLISECONDS
                and type(text) is str
                and (speaker is None or type(speaker) is str)
            )
        except (KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            _report_whispercpp_segment(errors, ("transcription", index), item)
            continue
        channel = forced_channel
        if turns is not None:
            speaker = turns[index]
        elif not speaker:
            speaker = None
        elif forced_channel is None and speaker in _WHISPERCPP_CHANNELS:
            channel = _WHISPERCPP_CHANNELS[speaker]
            speaker = None  # the channel decides; "?" stays a speaker (turn-taking, contract §6.3)
        append(new_segment(start / 1000, end / 1000, text, channel, speaker))
    errors.raise_if_any()
    return Transcript(segments=segments)


def _tinydiarize_turns(items: list[Any]) -> list[str] | None:
    """Speakers "A"/"B" flipped after each `speaker_turn_next`; None unless tinydiarize ran
    (and --diarize did not: that gives `speaker` itself)."""
    has_turns = False
    for item in items:
        if type(item) is dict:
            if "speaker" in item:
                return None
            if "speaker_turn_next" in item:
                has_turns = True
    if not has_turns:
        return None
    speakers: list[str] = []
    current = 0
    for item in items:
        speakers.append(_TINYDIARIZE_SPEAKERS[current])
        if type(item) is dict and item.get("speaker_turn_next") is True:
            current = 1 - current
    return speakers


def _report_whispercpp_segment(errors: PayloadErrors, path: FieldPath, item: Any) -> None:
    if type(item) is not dict:
        errors.add(path, "Not a valid object.")
        return
    found = False
    offsets = item.get("offsets")
    if "offsets" not in item:
        errors.add((*path, "offsets"), "Missing data for required field.")
        found = True
    elif type(offsets) is not dict:
        errors.add((*path, "offsets"), "Not a valid object.")
        found = True
    else:
        for key in ("from", "to"):
            problem = (
                kind_problem("milliseconds", offsets[key]) if key in offsets else "Missing data for required field."
            )
            if problem:
                errors.add((*path, "offsets", key), problem)
                found = True
        if not found and offsets["to"] < offsets["from"]:
            errors.add((*path, "offsets", "to"), "Must not be before from.")
            found = True
    for key, required in (("text", True), ("speaker", False)):
        if key not in item:
            if required:
                errors.add((*path, key), "Missing data for required field.")
                found = True
        elif type(item[key]) is not str and (required or item[key] is not None):
            errors.add((*path, key), "Not a valid string.")
            found = True
    if not found:
        errors.add(path, "Not a valid item.")


VENDOR = SttVendor(
    name="openai",
    parse=parse,
    summary="OpenAI Whisper API output (verbose_json or diarized_json), posted by your script",
)

"""Google Cloud Speech-to-Text long-running recognition (`POST /hooks/stt/google`).

Google calls nobody back: the user's script (or a Cloud Function) posts what the API gave it, as is:

- the finished Operation of `speech:longrunningrecognize` (`operations.get` once `done` is true):
  `name`, `done`, and `response` (`…LongRunningRecognizeResponse`: `results[]`) or `error`;
- the response alone (`{"results": [...]}`, also what synchronous `speech:recognize` returns), or
  its bare `results[]` list;
- v2: a `BatchRecognize` result file (`results[]` with `resultEndOffset`, words with
  `startOffset`/`endOffset`), or the finished BatchRecognize Operation with the transcript inline
  (`response.results.<audio uri>.inlineResult.transcript`, one audio file per operation).

Times are protobuf Duration strings, `"1.300s"`, `"4s"` (up to 9 fractional digits); a Duration that
is zero may be left out, and is read as 0. A `{"seconds", "nanos"}` object or a plain number of
seconds (what some client libraries dump) is read too, off the fast path.

Reading: msgspec decodes the common v1 body (Duration strings, integer tags) straight into structs in
one pass, skipping what is not read; anything it declines (v2 names, other Duration forms, a failed
job, a bad value) is read from plain JSON by `parse_slow`, the same way, naming each bad field.

Segments: one per result, its text the top alternative's `transcript`. A result has no start time:
it starts at its first word's `startTime` (`enableWordTimeOffsets`), else where the previous result
of the same channel ended; it ends at `resultEndTime`. Results without alternatives are skipped.

Who speaks (contract §6.3): with `enableSeparateRecognitionPerChannel` each result carries its
`channelTag`, counted from 1, which becomes the 0-based channel; a transcript whose results all carry
the same tag is mono. Speaker diarization (`diarizationConfig.enableSpeakerDiarization`) puts the
speaker-tagged words of the whole file into the top alternative of the final result; then those
words (`speakerLabel`, else `speakerTag` 1, 2, …) become word-level segments grouped by side later
(contract §6.4); a word without a tag takes the speaker of the word before it. Words of earlier
tagged results that start before the final one's are kept, for responses that spread the tagged
words over results. `?channel=0|1` on the URL says the file held that one channel of the call.

A finished operation with `error` (google.rpc.Status), a response with only `outputError`, or a v2
file result with `error`, is a failed job (reason: the status `message`). Job id: the operation
`name`, else the response's `requestId`. Google's requests carry no metadata of ours, so the URL names
the call (`?pbx=…&call=…` or `?b24_call_id=…`); authentication is the inbound token (bearer or
`?token=`): nothing is signed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
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
    status_failure,
    unwrap_operation,
)
from schemas.source import load_json

_ACCEPTED_SHAPES = (
    "Missing data for required field: expected a finished longrunningrecognize Operation "
    "(done, response.results), its response (results), or the results list."
)
_NOT_DONE = "The operation has not finished: post it once done is true."
_V1_KEYS = ("resultEndTime", "startTime", "endTime")
_V2_KEYS = ("resultEndOffset", "startOffset", "endOffset")


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """Translate a Google operation, response or results list into our VendorResult."""
    forced_channel = channel_from_query(query)
    fast = _parse_fast(raw_body, forced_channel)
    if fast is not None:
        return fast
    return parse_slow(raw_body, forced_channel)


def parse_slow(raw_body: bytes, forced_channel: int | None) -> VendorResult:
    """The reference reading, from plain JSON: every shape, every problem named by its path."""
    located = _locate(load_json(raw_body))
    if isinstance(located, VendorResult):
        return located
    results, base, job_id = located
    errors = PayloadErrors()
    transcript = translate_results(results, base, forced_channel, errors)
    errors.raise_if_any()
    return VendorResult(status="completed", transcript=transcript, vendor_job_id=job_id)


# --- the fast path -----------------------------------------------------------------------------
# msgspec decodes the common v1 shape (Duration strings, integer tags) straight into structs,
# skipping what is not read (confidence, languageCode, …), in one C pass. Anything else it declines
# (v2 names, another Duration form, a failed job, a bad value) goes to `parse_slow`, which reads the
# same payload the same way (tests/test_schemas_google.py holds them equal) or names the problem.


class _FastWord(msgspec.Struct, gc=False):
    word: str
    startTime: str = "0s"  # noqa: N815 (Google's names)
    endTime: str = "0s"  # noqa: N815
    speakerTag: int = 0  # noqa: N815
    speakerLabel: str = ""  # noqa: N815
    startOffset: str | None = None  # noqa: N815 (v2: declined)
    endOffset: str | None = None  # noqa: N815


class _FastAlternative(msgspec.Struct, gc=False):
    transcript: str = ""
    words: list[_FastWord] = []


class _FastResult(msgspec.Struct, gc=False):
    alternatives: list[_FastAlternative] = []
    channelTag: int = 0  # noqa: N815
    resultEndTime: str | None = None  # noqa: N815
    resultEndOffset: str | None = None  # noqa: N815 (v2: declined)


class _FastResponse(msgspec.Struct, gc=False):
    results: list[_FastResult] | None = None
    requestId: str | None = None  # noqa: N815
    outputError: msgspec.Raw | None = None  # noqa: N815


class _FastOperation(msgspec.Struct, gc=False):
    name: str | None = None
    done: bool | None = None
    response: _FastResponse | None = None
    error: msgspec.Raw | None = None
    results: list[_FastResult] | None = None  # the response posted alone
    requestId: str | None = None  # noqa: N815
    outputError: msgspec.Raw | None = None  # noqa: N815


_FAST_DECODER = msgspec.json.Decoder(_FastOperation | list[_FastResult])


class _Declined(Exception):
    """The fast path leaves this body to the slow one."""


def _parse_fast(raw_body: bytes, forced_channel: int | None) -> VendorResult | None:
    """The completed result of a common body, or None to let `parse_slow` decide."""
    try:
        body = _FAST_DECODER.decode(raw_body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # nesting too deep: the slow path says so
        return None
    results: list[_FastResult] | None
    job_id: str | None
    if type(body) is list:
        results, job_id = body, None
    else:
        operation: _FastOperation = body
        if operation.error is not None:
            return None
        if operation.response is not None:
            if operation.done is not True or operation.results is not None:
                return None
            response = operation.response
            results, job_id = response.results, operation.name or response.requestId
            output_error = response.outputError
        elif operation.results is not None and operation.done is None:
            results, job_id = operation.results, operation.name or operation.requestId
            output_error = operation.outputError
        else:
            return None
        if results is None:
            if output_error is not None:
                return None
            results = []
    try:
        transcript = _fast_transcript(results, forced_channel)
    except (_Declined, ValueError, IndexError):
        return None
    return VendorResult(status="completed", transcript=transcript, vendor_job_id=job_id or None)


def _fast_transcript(results: list[_FastResult], forced_channel: int | None) -> Transcript:
    """`translate_results` over structs; raises _Declined (or ValueError) where it would report."""
    max_tag = MAX_CHANNEL + 1
    tags: set[int] = set()
    tagged: list[int] = []
    for index, result in enumerate(results):
        tag = result.channelTag
        if not 0 <= tag <= max_tag or result.resultEndOffset is not None:
            raise _Declined
        if tag:
            tags.add(tag)
        if forced_channel is None and result.alternatives:
            words = result.alternatives[0].words
            if words and (
                words[0].speakerLabel or words[0].speakerTag or words[-1].speakerLabel or words[-1].speakerTag
            ):
                tagged.append(index)
    multichannel = forced_channel is None and len(tags) > 1
    if forced_channel is None and not multichannel and tagged:
        return Transcript(segments=_fast_diarized_words(results, tagged), granularity="word")
    return Transcript(segments=_fast_result_segments(results, multichannel, forced_channel))


def _fast_seconds(text: str) -> float:
    """A Duration string's seconds; ValueError where `duration_seconds` would refuse it."""
    if text[-1] != "s":
        raise ValueError
    seconds = float(text[:-1])
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError
    return seconds


def _fast_result_segments(results: list[_FastResult], multichannel: bool, forced_channel: int | None) -> list[Segment]:
    segments: list[Segment] = []
    append = segments.append
    previous_end: dict[int, float] = {}
    for result in results:
        tag = result.channelTag
        result_end = None if result.resultEndTime is None else _fast_seconds(result.resultEndTime)
        if not result.alternatives:
            if result_end is not None:
                previous_end[tag] = result_end
            continue
        alternative = result.alternatives[0]
        words = alternative.words
        if words:
            first, last = words[0], words[-1]
            if first.startOffset is not None or last.endOffset is not None:
                raise _Declined
            start = _fast_seconds(first.startTime)
            end = _fast_seconds(last.endTime)
            if result_end is not None and result_end > end:
                end = result_end
        else:
            start = previous_end.get(tag, 0.0)
            end = start if result_end is None else result_end
        if end < start:
            end = start
        previous_end[tag] = end
        if multichannel:
            channel: int | None = tag - 1 if tag else None
        else:
            channel = forced_channel
        append(new_segment(start, end, alternative.transcript, channel))
    return segments


def _fast_diarized_words(results: list[_FastResult], tagged: list[int]) -> list[Segment]:
    last = tagged[-1]
    segments, untagged = _fast_tagged_words(results[last])
    if len(tagged) > 1:
        first_start = segments[0].start if segments else MAX_SECONDS
        earlier: list[Segment] = []
        for index in tagged[:-1]:
            words, missing = _fast_tagged_words(results[index])
            earlier.extend(word for word in words if word.start < first_start)
            untagged = untagged or missing
        segments = earlier + segments
    if untagged:
        _fill_speakers(segments)
    return segments


def _fast_tagged_words(result: _FastResult) -> tuple[list[Segment], bool]:
    words = result.alternatives[0].words
    if words[0].startOffset is not None or words[0].endOffset is not None:
        raise _Declined
    segments: list[Segment] = []
    append = segments.append
    make, max_seconds = new_segment, MAX_SECONDS
    labels: dict[int, str] = {}
    untagged = False
    for word in words:
        start_text = word.startTime
        end_text = word.endTime
        if start_text[-1] != "s" or end_text[-1] != "s":
            raise _Declined
        start = float(start_text[:-1])
        end = float(end_text[:-1])
        if not 0 <= start <= end <= max_seconds:
            raise _Declined
        speaker: str | None = word.speakerLabel
        if not speaker:
            tag = word.speakerTag
            if tag > 0:
                speaker = labels.get(tag)
                if speaker is None:
                    speaker = labels[tag] = str(tag)
            else:
                speaker = None
                untagged = True
        append(make(start, end, word.word, None, speaker))
    return segments, untagged


def _locate(body: Any) -> VendorResult | tuple[list[Any], FieldPath, str | None]:
    """The results list and its path, or the failed job the body reports."""
    if type(body) is list:
        return body, (), None
    if type(body) is not dict:
        raise ValidationError({"_schema": ["The body must be a JSON object or list."]})
    job_id = _string(body.get("name"))
    unwrapped = unwrap_operation(body, "results", _ACCEPTED_SHAPES, _NOT_DONE, job_id, "Google Speech-to-Text")
    if isinstance(unwrapped, VendorResult):
        return unwrapped
    response, base = unwrapped
    job_id = job_id or _string(response.get("requestId"))
    results = response.get("results")
    if results is None:
        output_error = response.get("outputError")
        if output_error:
            return _failed(output_error, job_id)
        return [], base, job_id  # no speech at all: Google leaves results out
    base = (*base, "results")
    if type(results) is dict:  # v2 BatchRecognizeResponse: results by audio URI
        return _v2_file(results, base, job_id)
    if type(results) is not list:
        raise field_error(base, "Not a valid list.")
    return results, base, job_id


def _v2_file(
    files: dict[str, Any], base: FieldPath, job_id: str | None
) -> VendorResult | tuple[list[Any], FieldPath, str | None]:
    """The one file of a v2 BatchRecognize operation: its inline transcript, or its error."""
    if len(files) != 1:
        raise field_error(base, "Expected the result of exactly one audio file: one call per operation.")
    uri, file_result = next(iter(files.items()))
    path: FieldPath = (*base, uri)
    if type(file_result) is not dict:
        raise field_error(path, "Not a valid object.")
    error = file_result.get("error")
    if error and (type(error) is not dict or error.get("code") or error.get("message")):
        return _failed(error, job_id)
    inline = file_result.get("inlineResult")
    if type(inline) is dict and "transcript" in inline:
        transcript, path = inline["transcript"], (*path, "inlineResult", "transcript")
    elif "transcript" in file_result:
        transcript, path = file_result["transcript"], (*path, "transcript")
    else:
        message = (
            "Missing data for required field: use inline output, or post the result file written to Cloud Storage."
        )
        raise field_error((*path, "inlineResult"), message)
    if type(transcript) is not dict:
        raise field_error(path, "Not a valid object.")
    results = transcript.get("results", [])
    if type(results) is not list:
        raise field_error((*path, "results"), "Not a valid list.")
    return results, (*path, "results"), job_id


def _failed(error: Any, job_id: str | None) -> VendorResult:
    return status_failure(error, job_id, "Google Speech-to-Text")


def _string(value: Any) -> str | None:
    return value if type(value) is str and value else None


def translate_results(
    results: list[Any], base: FieldPath, forced_channel: int | None, errors: PayloadErrors
) -> Transcript:
    """Segments per result, or the diarized words of a mono transcript (see the module docstring)."""
    tags: set[int] = set()
    tagged: list[int] = []  # results whose top alternative's words carry speakers
    for index, result in enumerate(results):
        if type(result) is not dict:
            continue
        tag = result.get("channelTag")
        if type(tag) is int and 1 <= tag <= MAX_CHANNEL + 1:
            tags.add(tag)
        if forced_channel is None and _has_speakers(result):
            tagged.append(index)
    multichannel = forced_channel is None and len(tags) > 1
    if forced_channel is None and not multichannel and tagged:
        return Transcript(segments=_diarized_words(results, tagged, base, errors), granularity="word")
    return Transcript(segments=_result_segments(results, base, multichannel, forced_channel, errors))


def _has_speakers(result: dict[str, Any]) -> bool:
    alternatives = result.get("alternatives")
    if type(alternatives) is not list or not alternatives or type(alternatives[0]) is not dict:
        return False
    words = alternatives[0].get("words")
    if type(words) is not list or not words:
        return False
    return any(
        type(word) is dict and (word.get("speakerLabel") or word.get("speakerTag")) for word in (words[0], words[-1])
    )


def _result_segments(
    results: list[Any], base: FieldPath, multichannel: bool, forced_channel: int | None, errors: PayloadErrors
) -> list[Segment]:
    """One segment per result with a top alternative."""
    segments: list[Segment] = []
    append = segments.append
    make, max_seconds, max_tag = new_segment, MAX_SECONDS, MAX_CHANNEL + 1
    previous_end: dict[int, float] = {}  # per channel tag: where its last result ended
    for index, result in enumerate(results):
        try:  # the fast path: v1 names, Duration strings, words present
            tag = result.get("channelTag", 0)
            end_text = result["resultEndTime"]
            alternative = result["alternatives"][0]
            text = alternative["transcript"]
            words = alternative["words"]
            start_text = words[0].get("startTime", "0s")
            word_end_text = words[-1].get("endTime", "0s")
            if end_text[-1] != "s" or start_text[-1] != "s" or word_end_text[-1] != "s":
                raise ValueError
            start = float(start_text[:-1])
            end = float(end_text[:-1])
            word_end = float(word_end_text[:-1])
            valid = (
                0 <= start <= word_end <= max_seconds
                and 0 <= end <= max_seconds
                and type(text) is str
                and type(tag) is int
                and 0 <= tag <= max_tag
            )
        except (KeyError, TypeError, AttributeError, IndexError, ValueError):
            valid = False
        if valid:
            if word_end > end:
                end = word_end
        else:
            checked = _checked_result(result, (*base, index), previous_end, errors)
            if checked is None:
                continue
            start, end, text, tag = checked
        previous_end[tag] = end
        if multichannel:
            channel: int | None = tag - 1 if tag else None
        else:
            channel = forced_channel
        append(make(start, end, text, channel))
    return segments


def _checked_result(
    result: Any, path: FieldPath, previous_end: dict[int, float], errors: PayloadErrors
) -> tuple[float, float, str, int] | None:
    """A result the fast path refused: read the slow way (no words, v2 names, other Duration
    forms), skipped when it has no alternatives (None), or its problems reported (None)."""
    if type(result) is not dict:
        errors.add(path, "Not a valid object.")
        return None
    tag = result.get("channelTag", 0)
    if type(tag) is not int or not 0 <= tag <= MAX_CHANNEL + 1:
        errors.add((*path, "channelTag"), f"Must be an integer from 1 to {MAX_CHANNEL + 1}.")
        return None
    if "resultEndOffset" in result:
        end_key, start_key, word_end_key = _V2_KEYS
    else:
        end_key, start_key, word_end_key = _V1_KEYS
    result_end = _seconds_at(result, end_key, path, errors) if end_key in result else None
    alternatives = result.get("alternatives")
    if alternatives is None or alternatives == []:
        if result_end is not None:
            previous_end[tag] = result_end
        return None
    if type(alternatives) is not list:
        errors.add((*path, "alternatives"), "Not a valid list.")
        return None
    alternative = alternatives[0]
    if type(alternative) is not dict:
        errors.add((*path, "alternatives", 0), "Not a valid object.")
        return None
    text = alternative.get("transcript", "")
    if type(text) is not str:
        errors.add((*path, "alternatives", 0, "transcript"), "Not a valid string.")
        return None
    words = alternative.get("words")
    start = end = None
    if words:
        words_path = (*path, "alternatives", 0, "words")
        if type(words) is not list:
            errors.add(words_path, "Not a valid list.")
            return None
        first, last = words[0], words[-1]
        if type(first) is not dict:
            errors.add((*words_path, 0), "Not a valid object.")
            return None
        if type(last) is not dict:
            errors.add((*words_path, len(words) - 1), "Not a valid object.")
            return None
        start = _seconds_at(first, start_key, (*words_path, 0), errors, "0s")
        end = _seconds_at(last, word_end_key, (*words_path, len(words) - 1), errors, "0s")
        if start is None or end is None:
            return None
    if start is None:
        start = previous_end.get(tag, 0.0)
    if result_end is not None:
        end = result_end if end is None else max(end, result_end)
    if end is None or end < start:
        end = start
    return start, end, text, tag


def _diarized_words(results: list[Any], tagged: list[int], base: FieldPath, errors: PayloadErrors) -> list[Segment]:
    """The speaker-tagged words: the final tagged result's, and earlier ones' that start before it."""
    last = tagged[-1]
    segments, untagged = _tagged_words(results[last], (*base, last), errors)
    if len(tagged) > 1:
        first_start = segments[0].start if segments else MAX_SECONDS
        earlier: list[Segment] = []
        for index in tagged[:-1]:
            words, missing = _tagged_words(results[index], (*base, index), errors)
            earlier.extend(word for word in words if word.start < first_start)
            untagged = untagged or missing
        segments = earlier + segments
    if untagged:
        _fill_speakers(segments)
    return segments


def _tagged_words(result: dict[str, Any], path: FieldPath, errors: PayloadErrors) -> tuple[list[Segment], bool]:
    """The word-level segments of one result's top alternative, and whether some have no speaker."""
    words: list[Any] = result["alternatives"][0]["words"]  # _has_speakers checked the shape
    v2 = type(words[0]) is dict and ("startOffset" in words[0] or "endOffset" in words[0])
    start_key, end_key = ("startOffset", "endOffset") if v2 else ("startTime", "endTime")
    segments: list[Segment] = []
    append = segments.append
    make, max_seconds = new_segment, MAX_SECONDS
    labels: dict[Any, str] = {}  # speakerTag → label, for tags whose label is their number
    untagged = False
    for index, item in enumerate(words):
        try:  # the fast path: both times present, a speakerTag already seen (KeyError otherwise)
            start_text = item[start_key]
            end_text = item[end_key]
            text = item["word"]
            speaker: str | None = labels[item["speakerTag"]]
            if start_text[-1] != "s" or end_text[-1] != "s":
                raise ValueError
            start = float(start_text[:-1])
            end = float(end_text[:-1])
            valid = 0 <= start <= end <= max_seconds and type(text) is str
        except (KeyError, TypeError, AttributeError, IndexError, ValueError):
            valid = False
        if not valid:
            checked = _checked_word(item, (*path, "alternatives", 0, "words", index), start_key, end_key, errors)
            if checked is None:
                continue
            start, end, text = checked
            speaker = _speaker(item, labels)
            if speaker is None:
                untagged = True
        append(make(start, end, text, None, speaker))
    return segments, untagged


def _speaker(item: dict[str, Any], labels: dict[Any, str]) -> str | None:
    """The word's `speakerLabel`, else its `speakerTag` as text (cached per tag when they agree)."""
    tag = item.get("speakerTag")
    label = item.get("speakerLabel")
    if type(label) is str and label:
        if type(tag) is int and label == str(tag):
            labels[tag] = label
        return label
    if type(tag) is int and tag > 0:
        label = labels[tag] = str(tag)
        return label
    return None


def _fill_speakers(segments: list[Segment]) -> None:
    """An untagged word takes the speaker of the word before it (the next one's, at the start)."""
    current: str | None = None
    leading: list[int] = []
    for index, segment in enumerate(segments):
        if segment.speaker is None:
            if current is None:
                leading.append(index)
            else:
                segments[index] = new_segment(segment.start, segment.end, segment.text, None, current)
        else:
            current = segment.speaker
            if leading:
                for earlier in leading:
                    word = segments[earlier]
                    segments[earlier] = new_segment(word.start, word.end, word.text, None, current)
                leading = []


def _checked_word(
    item: Any, path: FieldPath, start_key: str, end_key: str, errors: PayloadErrors
) -> tuple[float, float, str] | None:
    """A word the fast path refused: its times in another accepted form, or its problems reported."""
    if type(item) is not dict:
        errors.add(path, "Not a valid object.")
        return None
    start = _seconds_at(item, start_key, path, errors, "0s")
    end = _seconds_at(item, end_key, path, errors, "0s")
    text = item.get("word")
    if "word" not in item:
        errors.add((*path, "word"), "Missing data for required field.")
    elif type(text) is not str:
        errors.add((*path, "word"), "Not a valid string.")
    if start is None or end is None or type(text) is not str:
        return None
    if end < start:
        errors.add((*path, end_key), f"Must not be before {start_key}.")
        return None
    return start, end, text


def _seconds_at(
    item: dict[str, Any], key: str, path: FieldPath, errors: PayloadErrors, default: Any = None
) -> float | None:
    """`item[key]` as seconds (a Duration), or None with the problem reported at its path."""
    value = item.get(key, default)
    seconds, problem = duration_seconds(value)
    if problem is not None:
        errors.add((*path, key), problem)
        return None
    return seconds


VENDOR = SttVendor(
    name="google",
    parse=parse,
    summary="Google Cloud Speech-to-Text: the finished long-running operation or its results, posted by your script",
)

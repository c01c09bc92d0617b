"""What a parsed value must fit before it is stored (contract §12): the ranges, and the columns it lands in.

Every length here is read from the column the value is stored in, so a field's limit and its
column cannot drift apart. Strings stored in a column may not hold control characters (PostgreSQL
text refuses NUL; the others are never meant) nor lone surrogates (UTF-8 cannot encode them:
sqlite3 and psycopg raise, and hashing the transcript raises in the worker). Ids must also be
printable, because they are shown, logged and compared as typed.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from typing import TYPE_CHECKING, Any

from marshmallow import ValidationError, validate
from sqlalchemy import ColumnElement, String

from b24scribe.models import Call, TranscriptPart
from b24scribe.transcript import CallReference, Segment, VendorResult

if TYPE_CHECKING:
    from b24scribe.events import CallEvent


def column_length(column: ColumnElement[Any]) -> int:
    """The declared length of a String column."""
    assert isinstance(column.type, String) and column.type.length is not None, f"{column} has no length"
    return column.type.length


_CALL = Call.__table__.c
_TRANSCRIPT = TranscriptPart.__table__.c

# contract §12 ranges. Call and job ids: at most 128 characters of printable text, the call id column.
MAX_ID_LENGTH = column_length(_CALL.pbx_call_id)
MAX_DURATION = 604_800  # seconds: a week
MAX_USER_ID = 2_147_483_647  # Bitrix24's user ids are 32-bit signed integers (and so is the column)
MAX_CHANNEL = 31
MAX_SECONDS = 604_800.0  # transcript times from the start of the call: a week

# Field (by the name the sender uses) → the longest value its column stores.
MAX_PBX_LENGTH = column_length(_CALL.pbx)
MAX_B24_CALL_ID_LENGTH = min(MAX_ID_LENGTH, column_length(_CALL.b24_call_id))
MAX_JOB_ID_LENGTH = min(MAX_ID_LENGTH, column_length(_TRANSCRIPT.vendor_job_id))
MAX_PORTAL_LENGTH = column_length(_CALL.portal)
MAX_NUMBER_LENGTH = column_length(_CALL.from_number)  # from, to
MAX_EXTENSION_LENGTH = column_length(_CALL.extension)
MAX_LINE_LENGTH = column_length(_CALL.line)
MAX_STARTED_AT_LENGTH = column_length(_CALL.started_at)
MAX_STATUS_LENGTH = column_length(_CALL.status)
# recording_url is a Text column: no column limit. 8 KiB is over five times a presigned S3 URL.
MAX_URL_LENGTH = 8192
MAX_CURRENCY_LENGTH = column_length(_TRANSCRIPT.cost_currency)

# C0 and C1 control characters, DEL, and surrogates (in a str, a surrogate is always a lone one:
# a valid pair is decoded to one character).
_UNSTORABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_C0_AND_DEL = bytes(range(0x20)) + b"\x7f"
_C1 = re.compile("[\x80-\x9f]")


def has_unstorable(text: str) -> bool:
    """True when the string holds a control character or a lone surrogate.

    Long text (a whole transcript's words joined) is checked on its UTF-8 bytes, several times faster
    than the regex: encoding fails on a lone surrogate, C0 and DEL bytes never occur inside a multi-byte
    character, and a C1 character is encoded after a 0xC2 byte, which is rare enough to look at twice."""
    if len(text) < 256:  # printable text (most ids and numbers) holds neither: one fast C pass
        return not text.isprintable() and _UNSTORABLE.search(text) is not None
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        return True
    if len(encoded.translate(None, _C0_AND_DEL)) != len(encoded):
        return True
    return b"\xc2" in encoded and _C1.search(text) is not None


def text_problem(value: str, max_length: int) -> str | None:
    """Why `value` cannot be stored in a column of `max_length` characters, or None."""
    if len(value) > max_length:
        return f"Longer than {max_length} characters."
    if _SURROGATE.search(value):
        return "Contains a lone surrogate (not valid Unicode)."
    if _CONTROL.search(value):
        return "Contains a control character (such as NUL)."
    return None


def id_problem(value: str, max_length: int = MAX_ID_LENGTH) -> str | None:
    """Why `value` is not an id of at most `max_length` printable characters, or None."""
    problem = text_problem(value, max_length)
    if problem is None and not value.isprintable():
        return "Must be printable text (no control or format characters, no line or paragraph separators)."
    return problem


def clean_text(text: str) -> str:
    """Free text (transcript words, speaker labels, a vendor's failure reason) made storable.

    Control characters become spaces: the text's whitespace is collapsed before Bitrix24 sees it,
    so a NUL or tab used between words still separates them and nothing else changes. A lone
    surrogate (half of a broken emoji) becomes U+FFFD, the replacement character, rather than
    refusing an hour of transcript over one character.
    """
    if not _UNSTORABLE.search(text):
        return text
    return _SURROGATE.sub("\ufffd", _CONTROL.sub(" ", text))


class StoredText(validate.Length):
    """marshmallow validator: a string that fits its column and holds no control character (an id:
    printable text only). A Length, so the OpenAPI document shows the limits."""

    def __init__(self, max_length: int, *, identifier: bool = False, min_length: int | None = None) -> None:
        super().__init__(min=min_length, max=max_length)
        self.identifier = identifier

    def __call__(self, value: Any) -> Any:
        if self.min is not None and len(value) < self.min:
            raise ValidationError(f"Shorter than minimum length {self.min}.")
        assert self.max is not None
        problem = id_problem(value, self.max) if self.identifier else text_problem(value, self.max)
        if problem is not None:
            raise ValidationError(problem)
        return value


def _problems_of_reference(reference: CallReference) -> dict[str, list[str]]:
    """The call a transcript names, by the names the URL and vendor metadata give it (contract §3.3)."""
    errors: dict[str, list[str]] = {}
    for attribute, name, max_length in (
        ("pbx", "pbx", MAX_PBX_LENGTH),
        ("pbx_call_id", "call", MAX_ID_LENGTH),
        ("b24_call_id", "b24_call_id", MAX_B24_CALL_ID_LENGTH),
    ):
        value = getattr(reference, attribute)
        if value is not None and (problem := id_problem(value, max_length)) is not None:
            errors[name] = [problem]
    return errors


def check_reference(reference: CallReference) -> None:
    """Raise a ValidationError naming `pbx`, `call` or `b24_call_id` if one cannot be stored."""
    if errors := _problems_of_reference(reference):
        raise ValidationError(errors)


def checked_vendor_result(result: VendorResult) -> VendorResult:
    """A vendor schema's result, made storable: ids, currency and ranges checked (a ValidationError
    naming the field), free text cleaned (`clean_text`). Every STT parser's result passes here."""
    errors: dict[str, Any] = dict(_problems_of_reference(result.reference))
    for attribute, name in (("vendor_job_id", "job_id"), ("fetch_id", "job_id")):
        value = getattr(result, attribute)
        if value is not None and name not in errors and (problem := id_problem(value, MAX_JOB_ID_LENGTH)):
            errors[name] = [problem]
    transcript = result.transcript
    if transcript is not None:
        if transcript.cost is not None and not (transcript.cost >= 0 and math.isfinite(transcript.cost)):
            errors["cost"] = ["Must be a finite number, at least 0."]
        currency = transcript.cost_currency
        if currency is not None and (problem := text_problem(currency, MAX_CURRENCY_LENGTH)):
            errors["cost_currency"] = [problem]
        if segment_errors := _segment_problems(transcript.segments):
            errors["segments"] = segment_errors
    if errors:
        raise ValidationError(errors)
    if transcript is not None:
        transcript.segments = _cleaned_segments(transcript.segments)
    if result.failure_reason is not None:
        result.failure_reason = clean_text(result.failure_reason)
    return result


_STARTS, _ENDS, _TEXTS, _CHANNELS, _SPEAKERS = (
    operator.attrgetter(name) for name in ("start", "end", "text", "channel", "speaker")
)


def _segment_problems(segments: list[Segment]) -> dict[int, dict[str, list[str]]]:
    """The first segment whose times or channel are out of contract §12's ranges (vendors check their own
    fields first, naming them their way, and that no segment ends before it starts; this is every
    vendor's backstop for what the columns and Bitrix24 need).

    The common case is checked with C-level passes (min, max, sum, set over `map`): an hour of words
    costs well under a millisecond; only a transcript that fails is walked segment by segment."""
    if not segments:
        return {}
    starts, ends = list(map(_STARTS, segments)), list(map(_ENDS, segments))
    total = sum(starts) + sum(ends)  # NaN if any time is NaN
    channels = set(map(_CHANNELS, segments))
    channels.discard(None)
    if (
        total == total
        and min(starts) >= 0
        and max(starts) <= MAX_SECONDS
        and max(ends) <= MAX_SECONDS
        and (not channels or (min(channels) >= 0 and max(channels) <= MAX_CHANNEL))
    ):
        return {}
    for index, segment in enumerate(segments):
        if not 0 <= segment.start <= segment.end <= MAX_SECONDS:
            return {index: {"end": [f"Times must be from 0 to {MAX_SECONDS:g} seconds, the end not before the start."]}}
        if segment.channel is not None and not 0 <= segment.channel <= MAX_CHANNEL:
            return {index: {"channel": [f"Must be from 0 to {MAX_CHANNEL}."]}}
    return {}


def _cleaned_segments(segments: list[Segment]) -> list[Segment]:
    """The segments with `clean_text` applied to text and speaker; the same list when nothing needs it.

    One `has_unstorable` pass over all the text at once (and over the distinct speakers): an hour of
    words costs well under a millisecond."""
    speakers = set(map(_SPEAKERS, segments))
    speakers.discard(None)
    if not has_unstorable("".join(map(_TEXTS, segments))) and not has_unstorable("".join(speakers)):
        return segments
    return [
        dataclasses.replace(
            segment,
            text=clean_text(segment.text),
            speaker=None if segment.speaker is None else clean_text(segment.speaker),
        )
        for segment in segments
    ]


def check_call_event(event: CallEvent) -> CallEvent:
    """A PBX parser's event, checked against contract §12 and its columns (a ValidationError naming the
    field by its generic-event name). The PBX schemas check the same; this is every parser's backstop,
    so the common event is let through with a few C-level checks and only a failing one is examined."""
    values = _CALL_EVENT_TEXT_VALUES(event)
    call_id = event.call_id
    texts = [value or "" for value in values]
    if (
        0 < len(call_id) <= MAX_ID_LENGTH
        and call_id.isprintable()
        and "".join(texts).isprintable()
        and all(map(operator.le, map(len, texts), _CALL_EVENT_TEXT_LIMITS))
        and (event.user_id is None or 1 <= event.user_id <= MAX_USER_ID)
        and (event.duration is None or 0 <= event.duration <= MAX_DURATION)
    ):
        return event
    errors: dict[str, list[str]] = {}
    for value, name, max_length in zip(values, _CALL_EVENT_TEXT_NAMES, _CALL_EVENT_TEXT_LIMITS, strict=True):
        if value is not None and (problem := text_problem(value, max_length)):
            errors[name] = [problem]
    if (problem := id_problem(call_id)) is not None or not call_id:
        errors["call_id"] = [problem or "Must not be empty."]
    if event.user_id is not None and not 1 <= event.user_id <= MAX_USER_ID:
        errors["user_id"] = [f"Must be from 1 to {MAX_USER_ID}."]
    if event.duration is not None and not 0 <= event.duration <= MAX_DURATION:
        errors["duration"] = [f"Must be from 0 to {MAX_DURATION}."]
    if errors:
        raise ValidationError(errors)
    return event  # printable is stricter than storable: a non-breaking space in a number is fine


_CALL_EVENT_TEXTS = (
    ("from_number", "from", MAX_NUMBER_LENGTH),
    ("to_number", "to", MAX_NUMBER_LENGTH),
    ("extension", "extension", MAX_EXTENSION_LENGTH),
    ("line", "line", MAX_LINE_LENGTH),
    ("started_at", "started_at", MAX_STARTED_AT_LENGTH),
    ("status", "status", MAX_STATUS_LENGTH),
    ("recording_url", "recording_url", MAX_URL_LENGTH),
)
_CALL_EVENT_TEXT_VALUES = operator.attrgetter(*(attribute for attribute, _, _ in _CALL_EVENT_TEXTS))
_CALL_EVENT_TEXT_NAMES = tuple(name for _, name, _ in _CALL_EVENT_TEXTS)
_CALL_EVENT_TEXT_LIMITS = tuple(limit for _, _, limit in _CALL_EVENT_TEXTS)

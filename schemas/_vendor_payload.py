"""What the STT vendor schemas share besides marshmallow: the JSON body, errors on a field path,
the per-URL channel, call references carried in vendor metadata, and item shapes.

A vendor's envelope is a marshmallow schema; its big lists (an hour of words is ~10,000 items)
pass through `RawList` and are walked by the vendor's own tight loop, which reports problems
through `PayloadErrors` in marshmallow's nested shape, e.g. `{"results": {3: {"start_time": [..]}}}`.
The loops check types and ranges inline and ask `ItemShape.report` for the exact messages only
once an item has failed, so valid payloads pay for nothing else.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast
from urllib.parse import parse_qsl

from marshmallow import EXCLUDE, Schema, ValidationError, fields

from b24scribe.limits import MAX_SECONDS as LIMIT_SECONDS
from b24scribe.parsing import channel_slot
from b24scribe.transcript import CallReference, Segment, VendorResult
from schemas.source import load_json

channel_from_query = channel_slot  # `?channel=`: read where the hooks read it (b24scribe/parsing.py)

FieldPath = tuple[str | int, ...]
Kind = Literal["seconds", "milliseconds", "text", "index", "label"]

NUMBER_TYPES = (float, int)  # `type(x) in NUMBER_TYPES`: bool is not a time
MAX_SECONDS = LIMIT_SECONDS  # a week (contract §12): larger "times" are garbage
MAX_MILLISECONDS = MAX_SECONDS * 1000

MISSING = "Missing data for required field."
_KIND_MESSAGES: dict[Kind, str] = {
    "seconds": "Not a valid number of seconds.",
    "milliseconds": "Not a valid number of milliseconds.",
    "text": "Not a valid string.",
    "index": "Not a valid integer.",
    "label": "Not a valid string or integer.",
}
# Segment's generated frozen __init__ sets each field through object.__setattr__: 0.85 µs a
# segment, a third of the time budget for an hour of words. `new_segment` fills a twin with the
# same slots by plain stores and relabels it a Segment (CPython allows `__class__` assignment
# between classes of identical slot layout): 0.25 µs, and the result is a true Segment.
_SEGMENT_FIELDS = ("start", "end", "text", "channel", "speaker", "side", "glue")
assert tuple(field.name for field in dataclasses.fields(Segment)) == _SEGMENT_FIELDS, "Segment changed"


class _SegmentTwin:
    __slots__ = _SEGMENT_FIELDS

    def __init__(
        self,
        start: float,
        end: float,
        text: str,
        channel: int | None = None,
        speaker: str | None = None,
        glue: bool = False,
    ) -> None:
        self.start = start
        self.end = end
        self.text = text
        self.channel = channel
        self.speaker = speaker
        self.side = None
        self.glue = glue
        self.__class__ = Segment  # type: ignore[assignment]  # same slots: see above


class SegmentFactory(Protocol):
    """`Segment(start, end, text, channel, speaker, glue=glue)`, the positional way."""

    def __call__(
        self,
        start: float,
        end: float,
        text: str,
        channel: int | None = None,
        speaker: str | None = None,
        glue: bool = False,
    ) -> Segment: ...


new_segment = cast(SegmentFactory, _SegmentTwin)  # for the hot loops: a Segment, built faster


class VendorSchema(Schema):
    """Base of vendor envelope schemas: unknown fields are ignored, vendors keep adding them."""

    class Meta:
        unknown = EXCLUDE


class RawList(fields.Field[list[Any]]):
    """A JSON array passed through as is: its items are checked by the vendor's loop."""

    default_error_messages = {"invalid": "Not a valid list."}

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any) -> list[Any]:
        if type(value) is not list:
            raise self.make_error("invalid")
        return value


class PayloadErrors:
    """Problems found while walking a payload, keyed by field path; raised together."""

    LIMIT = 20  # an hour of broken words must not make a megabyte of error body

    __slots__ = ("_count", "_messages")

    def __init__(self) -> None:
        self._messages: dict[str | int, Any] = {}
        self._count = 0

    def add(self, path: FieldPath, message: str) -> None:
        """Record one problem at `path` (only the first LIMIT are kept, all are counted)."""
        self._count += 1
        if self._count > self.LIMIT:
            return
        node = self._messages
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):  # the parent itself was reported: that says enough
                return
            node = child
        leaf = node.setdefault(path[-1], [])
        if isinstance(leaf, list):
            leaf.append(message)

    def raise_if_any(self) -> None:
        """Raise one ValidationError naming every recorded field, if anything was recorded."""
        if not self._count:
            return
        if self._count > self.LIMIT:
            self._messages["_schema"] = [f"{self._count} problems in all; only the first {self.LIMIT} are listed."]
        raise ValidationError(self._messages)


def field_error(path: FieldPath, message: str) -> ValidationError:
    """A ValidationError for one field, nested by its path like marshmallow's own."""
    messages: Any = [message]
    for key in reversed(path):
        messages = {key: messages}
    return ValidationError(messages)


def load_json_object(raw_body: bytes) -> dict[str, Any]:
    """The decoded JSON body, which must be an object."""
    body = load_json(raw_body)
    if type(body) is not dict:
        raise ValidationError({"_schema": ["The body must be a JSON object."]})
    return body


def reference_from_mapping(values: Mapping[str, Any]) -> CallReference:
    """A CallReference from `pbx`, `call`, `b24_call_id` and `portal` keys; other keys are ignored."""
    return CallReference(
        pbx=_non_empty_string(values.get("pbx")),
        pbx_call_id=_non_empty_string(values.get("call")),
        b24_call_id=_non_empty_string(values.get("b24_call_id")),
        portal=_non_empty_string(values.get("portal")),
    )


METADATA_PREFIX = "b24scribe_"  # contract §11: the metadata keys that name a call


def reference_from_metadata(metadata: Any) -> CallReference:
    """A CallReference from vendor metadata keyed as contract §11 says (`b24scribe_b24_call_id`, or
    `b24scribe_pbx` + `b24scribe_call`), or with the short keys `b24_call_id`, `pbx`, `call`."""
    if not isinstance(metadata, dict):
        return CallReference()
    prefixed = {
        key[len(METADATA_PREFIX) :]: value
        for key, value in metadata.items()
        if isinstance(key, str) and key.startswith(METADATA_PREFIX)
    }
    reference = reference_from_mapping(prefixed)
    return reference if not reference.is_empty() else reference_from_mapping(metadata)


def reference_from_query_string(text: str | None) -> CallReference:
    """A CallReference from a vendor metadata string written as a query string,
    `pbx=asterisk&call=1700000000.123` or `b24_call_id=externalCall.…`; free text gives none."""
    if not text or "=" not in text:
        return CallReference()
    return reference_from_mapping(dict(parse_qsl(text.strip().lstrip("?"))))


def _non_empty_string(value: Any) -> str | None:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return None


@dataclass(frozen=True, slots=True)
class ItemShape:
    """The fields of one list item, for the exact messages once the fast path has failed."""

    required: tuple[tuple[str, Kind], ...]
    optional: tuple[tuple[str, Kind], ...] = ()
    start: str | None = None  # the time pair whose order is checked
    end: str | None = None

    def report(self, errors: PayloadErrors, path: FieldPath, item: Any) -> None:
        """Add every problem of `item` at `path` (always at least one)."""
        if type(item) is not dict:
            errors.add(path, "Not a valid object.")
            return
        found = False
        for key, kind in self.required:
            message = MISSING if key not in item else kind_problem(kind, item[key])
            if message:
                errors.add((*path, key), message)
                found = True
        for key, kind in self.optional:
            value = item.get(key)
            message = None if value is None else kind_problem(kind, value)
            if message:
                errors.add((*path, key), message)
                found = True
        if not found and self.start and self.end:
            start: Any = item.get(self.start)
            end: Any = item.get(self.end)
            if type(start) in NUMBER_TYPES and type(end) in NUMBER_TYPES and end < start:
                errors.add((*path, self.end), f"Must not be before {self.start}.")
                found = True
        if not found:
            errors.add(path, "Not a valid item.")


def kind_problem(kind: Kind, value: Any) -> str | None:
    """Why `value` is not a valid `kind`, or None when it is."""
    if kind == "text":
        return None if type(value) is str else _KIND_MESSAGES[kind]
    if kind == "label":
        return None if type(value) in (str, int) else _KIND_MESSAGES[kind]
    if kind == "index":
        if type(value) is not int:
            return _KIND_MESSAGES[kind]
        return None if value >= 0 else "Must be greater than or equal to 0."
    if type(value) not in NUMBER_TYPES:
        return _KIND_MESSAGES[kind]
    if not value >= 0:  # NaN fails this too
        return "Must be greater than or equal to 0." if value < 0 else "Not a finite number."
    limit = MAX_SECONDS if kind == "seconds" else MAX_MILLISECONDS
    if not value <= limit:
        return f"Must be a finite number of at most {limit:g} {kind}."
    return None


# A protobuf Duration as Google and Yandex write it in JSON: seconds with an "s", up to nanoseconds.
_DURATION = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?s")
_DURATION_MESSAGE = 'Not a valid Duration: expected seconds like "1.300s".'


def duration_seconds(value: Any) -> tuple[float, str | None]:
    """A Duration as seconds: `"1.300s"`, `{"seconds": "1", "nanos": 300000000}` or a number.
    Returns (seconds, None), or (0.0, why it is not one)."""
    if type(value) is str:
        if not _DURATION.fullmatch(value):
            return 0.0, _DURATION_MESSAGE
        seconds = float(value[:-1])
    elif type(value) in NUMBER_TYPES:
        seconds = value
    elif type(value) is dict and set(value) <= {"seconds", "nanos"}:
        whole, nanos = value.get("seconds", 0), value.get("nanos", 0)
        if type(whole) is str and whole.isascii() and whole.isdigit() and len(whole) <= 12:
            whole = int(whole)
        if type(whole) is not int or type(nanos) is not int or not 0 <= nanos < 1_000_000_000:
            return 0.0, _DURATION_MESSAGE
        seconds = whole + nanos / 1e9
    else:
        return 0.0, _DURATION_MESSAGE
    if not 0 <= seconds <= MAX_SECONDS:  # NaN fails this too
        return 0.0, f"Must be a Duration from 0s to {MAX_SECONDS:g}s."
    return float(seconds), None


def status_failure(error: Any, job_id: str | None, vendor: str) -> VendorResult:
    """A failed job from a google.rpc.Status-like error (`code`, `message`, as Google and Yandex
    send it), or a bare message: the vendor's reason, else its code."""
    reason = f"{vendor} reported an error without a message."
    if type(error) is dict:
        message, code = error.get("message"), error.get("code")
        if type(message) is str and message.strip():
            reason = message
        elif code is not None and type(code) in (int, str):
            reason = f"{vendor} reported error code {code}."
    elif type(error) is str and error.strip():
        reason = error
    return VendorResult(status="failed", failure_reason=reason, vendor_job_id=job_id)


def unwrap_operation(
    body: dict[str, Any], list_key: str, accepted: str, not_done: str, job_id: str | None, vendor: str
) -> tuple[dict[str, Any], FieldPath] | VendorResult:
    """A long-running Operation as Google and Yandex post it: the response it wraps and its path, or
    the failed job its `error` is. A body that is already the response (it holds `list_key`) is kept."""
    if list_key in body and "response" not in body and "error" not in body:
        return body, ()
    error = body.get("error")
    if error is not None:
        return status_failure(error, job_id, vendor)
    if "response" not in body and "done" not in body:
        raise ValidationError({list_key: [accepted]})
    if body.get("done") is not True:
        raise ValidationError({"done": [not_done]})
    response = body.get("response")
    if response is None:
        raise field_error(("response",), "Missing data for required field.")
    if type(response) is not dict:
        raise field_error(("response",), "Not a valid object.")
    return response, ("response",)

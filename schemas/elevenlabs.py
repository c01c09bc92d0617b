"""ElevenLabs Speech-to-Text (Scribe) results sent to a workspace webhook (`POST /hooks/stt/elevenlabs`).

Accepted body: the webhook event `{"type": "speech_to_text_transcription", "event_timestamp",
"data": {"request_id", "webhook_metadata", "transcription"}}`, where `transcription` is what
`POST /v1/speech-to-text` would have answered; that answer on its own (no envelope) is read too.
A `data` without `transcription` but with an `error` (or `detail`, `message`) is a failed job whose
reason is that text.

ElevenLabs gives words only: `words[]` items of type `word` become word-level segments, grouped by
side later (contract §6.4); `spacing` items are the spaces between them, so a word that follows the
same speaker's previous word with no `spacing` in between is glued to it (languages written without
spaces, split tokens); `audio_event` items ("(laughter)") and unknown types are not speech and are
skipped. `start`/`end` are float seconds and optional: a word without them takes the end of the word
before it.

Who speaks: with `use_multi_channel=true` the answer is `transcripts[]`, one per channel, each with its
`channel_index` (0-based; else its position), or one word list whose words carry `channel_index`
(`multichannel_output_style=combined`); every word keeps its channel when more than one channel is
present. Otherwise the file is mono: `diarize=true` labels words `speaker_0`, `speaker_1`… (sides by
B24SCRIBE_FIRST_SPEAKER), and `detect_speaker_roles=true` labels them `agent` (the employee, User)
and `customer` (Client) directly. A mono transcript without speakers is rejected later (contract
§6.3); `?channel=0|1` on the URL says the file held that one channel.

Job id: `data.request_id` (else `transcription_id`): a redelivery is a duplicate. Call reference:
`webhook_metadata` (an object, or its JSON text) with the keys of contract §11
(`b24scribe_b24_call_id`, or `b24scribe_pbx` + `b24scribe_call`), or a query string
`pbx=…&call=…`. Authentication: the `ElevenLabs-Signature: t=<unix seconds>,v0=<hex HMAC-SHA256 of
"<t>.<raw body>">` header, keyed with B24SCRIBE_ELEVENLABS_WEBHOOK_SECRET (the workspace webhook's
HMAC secret), at most 30 minutes old (contract §11); the inbound token works too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from b24scribe.inbound_auth import Authenticated, AuthFailure, HookRequest
from b24scribe.limits import MAX_CHANNEL
from b24scribe.settings import Settings
from b24scribe.sources import SttVendor
from b24scribe.transcript import CallReference, Segment, Side, Transcript, VendorResult
from schemas._vendor_payload import (
    MAX_SECONDS,
    MISSING,
    NUMBER_TYPES,
    FieldPath,
    PayloadErrors,
    channel_from_query,
    field_error,
    kind_problem,
    load_json_object,
    new_segment,
    reference_from_metadata,
    reference_from_query_string,
)

EVENT_TYPE = "speech_to_text_transcription"
SIGNATURE_HEADER = "ElevenLabs-Signature"
TOLERANCE_SECONDS = 30 * 60  # the SDK's (and contract §11's) 30 minutes
# `detect_speaker_roles=true` names the sides itself.
ROLE_SIDES = {"agent": Side.USER, "customer": Side.CLIENT}
_MISSING_TRANSCRIPTION = (
    "Missing data for required field: the speech_to_text_transcription event must carry the transcription."
)


class ElevenLabsSignature:
    """`ElevenLabs-Signature: t=<unix seconds>,v0=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.

    The algorithm of ElevenLabs' own SDKs (`webhooks.construct_event`), over the raw bytes and
    compared in constant time; timestamps more than 30 minutes away are refused before the body is read.
    """

    name = "elevenlabs-signature"
    signature_header = SIGNATURE_HEADER
    description = (
        "ElevenLabs webhook HMAC: t=<unix seconds>,v0=<hex HMAC-SHA256 of '<t>.<body>'> made with "
        "B24SCRIBE_ELEVENLABS_WEBHOOK_SECRET, at most 30 minutes old"
    )

    def configured(self, settings: Settings, source: str) -> bool:
        return bool(settings.vendor_setting(source, "WEBHOOK_SECRET"))

    def present(self, request: HookRequest) -> bool:
        return request.header(SIGNATURE_HEADER) is not None

    def before_body(self, request: HookRequest, settings: Settings, source: str) -> None:
        timestamp, _signatures = _parse_header(request.header(SIGNATURE_HEADER) or "")
        if abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
            raise AuthFailure(401, "bad_signature", f"{SIGNATURE_HEADER} timestamp is not within 30 minutes")

    def verify(self, request: HookRequest, body: bytes, settings: Settings, source: str) -> Authenticated:
        secret = settings.vendor_setting(source, "WEBHOOK_SECRET")
        if not secret:
            raise AuthFailure(401, "unauthenticated", f"the request carries no {SIGNATURE_HEADER}")
        timestamp, signatures = _parse_header(request.header(SIGNATURE_HEADER) or "")
        if abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
            raise AuthFailure(401, "bad_signature", f"{SIGNATURE_HEADER} timestamp is not within 30 minutes")
        expected = sign(secret, timestamp, body).encode()
        matched = False
        for given in signatures:  # every v0 is compared: no early exit on the first match
            matched |= hmac.compare_digest(given.encode(), expected)
        if not matched:
            raise AuthFailure(401, "bad_signature", f"{SIGNATURE_HEADER} does not match the body")
        return Authenticated(self.name)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `v0=` value ElevenLabs sends: hex HMAC-SHA256 of `<timestamp>.<raw body>`."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v0={digest}"


def _parse_header(value: str) -> tuple[str, list[str]]:
    """The timestamp and the `v0=` signatures of the header; AuthFailure when it is malformed."""
    timestamp = None
    signatures: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if part.startswith("t="):
            timestamp = part[2:]
        elif part.startswith("v0="):
            signatures.append(part)
    if timestamp is None or not signatures:
        raise AuthFailure(401, "bad_signature", f"{SIGNATURE_HEADER} needs t= and v0=")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise AuthFailure(401, "bad_signature", f"{SIGNATURE_HEADER} timestamp is not a number")
    return timestamp, signatures


SIGNATURE = ElevenLabsSignature()


def parse(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
    """Translate an ElevenLabs speech-to-text webhook body (or a bare transcription) into our VendorResult."""
    body = load_json_object(raw_body)
    forced_channel = channel_from_query(query)
    if "data" in body or "type" in body:  # the webhook event envelope
        kind = body.get("type")
        if kind is not None and kind != EVENT_TYPE:
            raise field_error(("type",), f"Must be {EVENT_TYPE}.")
        data = body.get("data")
        if type(data) is not dict:
            raise field_error(("data",), MISSING if data is None else "Not a valid object.")
        prefix: FieldPath = ("data",)
        request_id = _string(data, "request_id", prefix)
        reference = _metadata_reference(data.get("webhook_metadata"))
        transcription = data.get("transcription")
        if transcription is None:
            reason = _failure_reason(data)
            if reason is None:
                raise field_error((*prefix, "transcription"), _MISSING_TRANSCRIPTION)
            return VendorResult(status="failed", failure_reason=reason, vendor_job_id=request_id, reference=reference)
        path: FieldPath = (*prefix, "transcription")
    else:  # the synchronous answer's shape, sent as is
        transcription, path = body, ()
        request_id = None
        reference = _metadata_reference(body.get("webhook_metadata"))
    if type(transcription) is not dict:
        raise field_error(path, "Not a valid object.")
    job_id = request_id or _string(transcription, "transcription_id", path)
    errors = PayloadErrors()
    segments = _segments(transcription, path, forced_channel, errors)
    errors.raise_if_any()
    return VendorResult(
        status="completed",
        transcript=Transcript(segments=segments, granularity="word"),
        vendor_job_id=job_id,
        reference=reference,
    )


def _string(mapping: dict[str, Any], key: str, path: FieldPath) -> str | None:
    value = mapping.get(key)
    if value is None:
        return None
    if type(value) is not str:
        raise field_error((*path, key), "Not a valid string.")
    return value.strip() or None


def _metadata_reference(metadata: Any) -> CallReference:
    """`webhook_metadata` as an object, as JSON text of one, or as a query string."""
    if isinstance(metadata, str):
        text = metadata.strip()
        if text.startswith("{"):
            try:
                metadata = json.loads(text)
            except ValueError:
                return CallReference()
        else:
            return reference_from_query_string(text)
    return reference_from_metadata(metadata)


def _failure_reason(data: dict[str, Any]) -> str | None:
    """The reason of a failed job (the error payload is not documented: any of the usual keys)."""
    for key in ("error", "detail", "message"):
        value = data.get(key)
        if isinstance(value, dict):
            value = value.get("message") or value.get("detail") or value.get("status")
        if isinstance(value, str) and value.strip():
            return value.strip()
    if "error" in data or data.get("status") in ("failed", "error"):
        return "ElevenLabs reported a failed transcription without a message."
    return None


def _chunks(transcription: dict[str, Any], path: FieldPath) -> list[tuple[list[Any], int | None, FieldPath]]:
    """(words, channel of the chunk, path of its words) of each transcript in the answer."""
    transcripts = transcription.get("transcripts")
    if transcripts is None:
        words = transcription.get("words")
        if type(words) is not list:
            raise field_error((*path, "words"), MISSING if words is None else "Not a valid list.")
        return [(words, None, (*path, "words"))]
    if type(transcripts) is not list:
        raise field_error((*path, "transcripts"), "Not a valid list.")
    chunks: list[tuple[list[Any], int | None, FieldPath]] = []
    errors = PayloadErrors()
    for position, chunk in enumerate(transcripts):
        chunk_path: FieldPath = (*path, "transcripts", position)
        if type(chunk) is not dict:
            errors.add(chunk_path, "Not a valid object.")
            continue
        words = chunk.get("words")
        channel = chunk.get("channel_index", position)
        if channel is None:
            channel = position
        if type(words) is not list:
            errors.add((*chunk_path, "words"), MISSING if words is None else "Not a valid list.")
        elif type(channel) is not int or not 0 <= channel <= MAX_CHANNEL:
            errors.add((*chunk_path, "channel_index"), f"Must be an integer from 0 to {MAX_CHANNEL}.")
        else:
            chunks.append((words, channel, (*chunk_path, "words")))
    errors.raise_if_any()
    return chunks


def _segments(
    transcription: dict[str, Any], path: FieldPath, forced_channel: int | None, errors: PayloadErrors
) -> list[Segment]:
    """One word-level segment per `word` item of every transcript, in payload order."""
    segments: list[Segment] = []
    append = segments.append
    make, numbers, max_seconds, max_channel = new_segment, NUMBER_TYPES, MAX_SECONDS, MAX_CHANNEL
    channels_seen: set[int] = set()
    for words, chunk_channel, words_path in _chunks(transcription, path):
        clock = 0.0  # the end of the word before: the time of a word ElevenLabs gave none
        spaced = True
        previous_key: Any = None
        for index, item in enumerate(words):
            try:
                kind = item.get("type", "word")
                if kind == "spacing":
                    spaced = True
                    continue
                if kind != "word":
                    continue  # audio_event, and types ElevenLabs may add: not speech
                text = item["text"]
                start = item.get("start")
                end = item.get("end")
                speaker = item.get("speaker_id")
                channel = item.get("channel_index", chunk_channel)
                if channel is None:
                    channel = chunk_channel
                valid = type(text) is str and (speaker is None or type(speaker) is str)
                if valid and not (type(start) in numbers and type(end) in numbers and 0 <= start <= end <= max_seconds):
                    start, end, valid = _missing_times(start, end, clock)
                valid = valid and (channel is None or (type(channel) is int and 0 <= channel <= max_channel))
            except (KeyError, TypeError, AttributeError):
                valid = False
            if not valid:
                _report_word(errors, (*words_path, index), item)
                continue
            key = (channel, speaker)
            glue = not spaced and key == previous_key
            spaced = False
            previous_key = key
            clock = end
            if channel is not None:
                channels_seen.add(channel)
            if speaker in ROLE_SIDES:
                append(Segment(start, end, text, channel, speaker, ROLE_SIDES[speaker], glue))
            else:
                append(make(start, end, text, channel, speaker, glue))
    if forced_channel is not None or len(channels_seen) == 1:  # one channel: a mono file (or the URL's)
        for position, segment in enumerate(segments):
            segments[position] = Segment(
                segment.start, segment.end, segment.text, forced_channel, segment.speaker, segment.side, segment.glue
            )
    return segments


def _missing_times(start: Any, end: Any, clock: float) -> tuple[float, float, bool]:
    """Times for a word whose `start`/`end` are absent (optional in ElevenLabs' model); invalid ones fail."""
    if start is not None and not (type(start) in NUMBER_TYPES and 0 <= start <= MAX_SECONDS):
        return 0.0, 0.0, False
    if end is not None and not (type(end) in NUMBER_TYPES and 0 <= end <= MAX_SECONDS):
        return 0.0, 0.0, False
    if start is not None and end is not None:  # both present: they are out of order
        return 0.0, 0.0, False
    if start is None:
        start = clock if end is None else min(clock, end)
    if end is None:
        end = start
    return start, end, True


def _report_word(errors: PayloadErrors, path: FieldPath, item: Any) -> None:
    """Every problem of one `words[]` item (its fast path failed)."""
    if type(item) is not dict:
        errors.add(path, "Not a valid object.")
        return
    found = False
    kind = item.get("type", "word")
    if type(kind) is not str:
        errors.add((*path, "type"), "Not a valid string.")
        found = True
    if "text" not in item:
        errors.add((*path, "text"), MISSING)
        found = True
    elif type(item["text"]) is not str:
        errors.add((*path, "text"), "Not a valid string.")
        found = True
    for key in ("start", "end"):
        value = item.get(key)
        problem = None if value is None else kind_problem("seconds", value)
        if problem:
            errors.add((*path, key), problem)
            found = True
    speaker = item.get("speaker_id")
    if speaker is not None and type(speaker) is not str:
        errors.add((*path, "speaker_id"), "Not a valid string.")
        found = True
    channel = item.get("channel_index")
    if channel is not None and (type(channel) is not int or not 0 <= channel <= MAX_CHANNEL):
        errors.add((*path, "channel_index"), f"Must be an integer from 0 to {MAX_CHANNEL}.")
        found = True
    if not found:
        start: Any = item.get("start")
        end: Any = item.get("end")
        if type(start) in NUMBER_TYPES and type(end) in NUMBER_TYPES and end < start:
            errors.add((*path, "end"), "Must not be before start.")
        else:
            errors.add(path, "Not a valid item.")


VENDOR = SttVendor(
    name="elevenlabs",
    parse=parse,
    signatures=(SIGNATURE,),
    summary="ElevenLabs Speech-to-Text results sent to a workspace webhook (signed: ElevenLabs-Signature)",
)

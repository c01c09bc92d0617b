"""Canonical Transcript → Bitrix24 `telephony.call.attachTranscription` MESSAGES (contract §6).

`build_messages` is a plain loop over dataclass attributes, no marshmallow per message: a one-hour
call is ~10,000 words and the translation must cost a fraction of parsing the vendor's payload.
`MessageSchema` describes one message for the OpenAPI document and for tests, off the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from b24scribe.transcript import UNDECIDED_SPEAKER, Direction, Role, Segment, Side, Transcript

MAX_MESSAGE_BYTES = 60_000  # MESSAGE is a MySQL TEXT column (~64 KB); stay clear of it
WORD_GAP_SECONDS = 1.0  # a side's word-level message ends when its next word starts later than this

# Any character is at most 4 UTF-8 bytes, so shorter texts never need encoding to be measured.
_ALWAYS_SHORT_CHARS = MAX_MESSAGE_BYTES // 4

_SIDE_TEXT: dict[Side, str] = {side: side.value for side in Side}
_by_start = attrgetter("start")

Message = dict[str, str | int]
_Draft = tuple[float, float, Side, str]  # unrounded start, end, side, collapsed text


@dataclass(frozen=True, slots=True)
class SideRules:
    """Who is who on a call: its direction, who speaks on channel 0, who the first speaker is."""

    direction: Direction = Direction.INBOUND
    channel0: Role = Role.CALLER  # B24SCRIBE_CHANNEL0 / ?channel0=
    first_speaker: Role = Role.CALLEE  # B24SCRIBE_FIRST_SPEAKER / ?first_speaker=


def check_attributable(transcript: Transcript) -> None:
    """Raise ValidationError on `segments` if some segment names no side, channel nor speaker."""
    unattributed = _unattributed_indexes(transcript)
    if unattributed:
        raise _unattributable_error(unattributed, len(transcript.segments))


def build_messages(transcript: Transcript, rules: SideRules) -> list[Message]:
    """The MESSAGES list: each item exactly {"SIDE", "START_TIME", "STOP_TIME", "MESSAGE"}."""
    return _render(_drafts(transcript, rules))


def attach_params(call_id: str, transcript: Transcript, rules: SideRules) -> dict[str, object]:
    """Params for telephony.call.attachTranscription; COST only when truthy (Bitrix ignores 0)."""
    params: dict[str, object] = {
        "CALL_ID": call_id,
        "MESSAGES": build_messages(transcript, rules),
    }
    if transcript.cost:
        params["COST"] = transcript.cost
        if transcript.cost_currency:
            params["COST_CURRENCY"] = transcript.cost_currency
    return params


def _drafts(transcript: Transcript, rules: SideRules) -> list[_Draft]:
    """The messages before rounding, sorted by their exact start (contract §6.4, 6.5)."""
    if transcript.granularity == "word":
        drafts = _group_words(transcript, rules)
    else:
        drafts = _collect_segments(transcript, rules)
    return _split_oversized_drafts(drafts)


class _SideResolver:
    """Decides each segment's side, fed in time order (contract §6.3); speaker sides are decided once."""

    __slots__ = (
        "_channel_sides",
        "_first_side",
        "_previous",
        "_previous_undecided",
        "_speaker_sides",
        "_transcript",
        "_undecided_runs",
    )

    def __init__(self, transcript: Transcript, rules: SideRules) -> None:
        channel0 = rules.channel0.side(rules.direction)
        # Channel n maps like n % 2: vendor schemas give 0-based channels, and a recording with
        # more than two channels (rare conference legs) alternates rather than failing.
        self._channel_sides = (channel0, channel0.other())
        self._first_side = rules.first_speaker.side(rules.direction)
        self._speaker_sides: dict[str, Side] = {}
        self._previous: Side | None = None
        self._previous_undecided = False
        # Word-level: consecutive "?" words are one undecided turn, not a side flip per word.
        self._undecided_runs = transcript.granularity == "word"
        self._transcript = transcript

    def side_of(self, segment: Segment) -> Side:
        """The side of the next non-empty segment in time order."""
        undecided = False
        side = segment.side
        if side is None:
            channel = segment.channel
            if channel is not None:
                side = self._channel_sides[channel % 2]
            else:
                speaker = segment.speaker
                if speaker is None:
                    transcript = self._transcript
                    unattributed = _unattributed_indexes(transcript)
                    raise _unattributable_error(unattributed, len(transcript.segments))
                if speaker == UNDECIDED_SPEAKER:
                    undecided = True
                    previous = self._previous
                    if previous is None:
                        side = self._first_side
                    elif self._previous_undecided and self._undecided_runs:
                        side = previous
                    else:
                        side = previous.other()
                else:
                    side = self._speaker_sides.get(speaker)
                    if side is None:
                        # The first speaker heard (earliest start, ties in payload order) is
                        # FIRST_SPEAKER; every other label is the other side.
                        side = self._first_side.other() if self._speaker_sides else self._first_side
                        self._speaker_sides[speaker] = side
        self._previous = side
        self._previous_undecided = undecided
        return side


def _collect_segments(transcript: Transcript, rules: SideRules) -> list[_Draft]:
    """One draft per non-empty utterance, in time order (a stable sort: ties keep payload order)."""
    side_of = _SideResolver(transcript, rules).side_of
    drafts: list[_Draft] = []
    append = drafts.append
    for segment in sorted(transcript.segments, key=_by_start):
        text = segment.text.strip()
        if "  " in text or not text.isprintable():  # inlined _collapse_whitespace: hot loop
            text = " ".join(text.split())
        if text:
            append((segment.start, segment.end, side_of(segment), text))
    return drafts


def _group_words(transcript: Transcript, rules: SideRules) -> list[_Draft]:
    """Group words per side independently (contract §6.4), each side's message broken only by its own
    pause of more than WORD_GAP_SECONDS; drafts come out in order of their first word."""
    side_of = _SideResolver(transcript, rules).side_of
    # An open message is [start, end, side, parts]. `opened` keeps them in creation order, which
    # is time order (of first words) because words are visited sorted by start.
    opened: list[list[Any]] = []
    open_by_side: dict[Side, list[Any]] = {}
    for word in sorted(transcript.segments, key=_by_start):
        text = word.text
        if not text or text.isspace():
            continue
        side = side_of(word)
        current = open_by_side.get(side)
        glue = word.glue
        # Punctuation (glue) belongs to the word before it, however late the vendor stamped it.
        if current is not None and (glue or word.start - current[1] <= WORD_GAP_SECONDS):
            parts = current[3]
            if glue:
                parts.append(text.lstrip())
            else:
                parts.append(" ")
                parts.append(text)
            if word.end > current[1]:
                current[1] = word.end
        else:
            current = [word.start, word.end, side, [text]]
            open_by_side[side] = current
            opened.append(current)
    return [(start, end, side, _collapse_whitespace("".join(parts))) for start, end, side, parts in opened]


def _collapse_whitespace(text: str) -> str:
    """Strip, and collapse inner runs of any Unicode whitespace to one space."""
    text = text.strip()
    # Every whitespace character but " " is unprintable, so this skips the split for clean text.
    if "  " in text or not text.isprintable():
        text = " ".join(text.split())
    return text


def _split_oversized_drafts(drafts: list[_Draft]) -> list[_Draft]:
    """Split every text over MAX_MESSAGE_BYTES (contract §6.5), keeping drafts sorted by start."""
    if all(len(draft[3]) <= _ALWAYS_SHORT_CHARS for draft in drafts):
        return drafts
    result: list[_Draft] = []
    for draft in drafts:
        start, end, side, text = draft
        encoded = text.encode() if len(text) > _ALWAYS_SHORT_CHARS else b""
        if len(encoded) <= MAX_MESSAGE_BYTES:
            result.append(draft)
            continue
        for piece_start, piece_end, piece in _split_text(start, end, encoded):
            result.append((piece_start, piece_end, side, piece))
    # Later pieces of a split message may start after the next message: restore time order.
    result.sort(key=itemgetter(0))
    return result


def _split_text(start: float, end: float, encoded: bytes) -> list[tuple[float, float, str]]:
    """Cut text at spaces (inside one huge word: at a UTF-8 character boundary) into pieces of at
    most MAX_MESSAGE_BYTES; each piece's times are its byte-offset share of the span."""
    total = len(encoded)
    end = max(end, start)
    cuts: list[tuple[int, int, int]] = []  # byte offsets: piece start, piece stop, next start
    offset = 0
    while total - offset > MAX_MESSAGE_BYTES:
        limit = offset + MAX_MESSAGE_BYTES
        space = encoded.rfind(b" ", offset, limit + 1)
        if space > offset:
            cuts.append((offset, space, space + 1))
            offset = space + 1
        else:
            cut = limit
            while encoded[cut] & 0xC0 == 0x80:  # a continuation byte: back up to the lead byte
                cut -= 1
            cuts.append((offset, cut, cut))
            offset = cut
    cuts.append((offset, total, total))

    def at(byte_offset: int) -> float:
        share = byte_offset / total
        # Not start + (end - start) * share, which overflows for huge times; clamped against
        # rounding past either end.
        return min(max(start * (1.0 - share) + end * share, start), end)

    return [
        (at(piece_start), at(next_start), encoded[piece_start:piece_stop].decode())
        for piece_start, piece_stop, next_start in cuts
    ]


def _render(drafts: list[_Draft]) -> list[Message]:
    """The exact four-key dicts, times rounded per contract §6.2."""
    messages: list[Message] = []
    append = messages.append
    floor, ceil, side_text = math.floor, math.ceil, _SIDE_TEXT
    for start, end, side, text in drafts:
        # Negative starts (a vendor clock running slightly ahead of the recording) clamp to 0:
        # Bitrix24 rejects START_TIME < 0. STOP_TIME is rounded up and always after START_TIME.
        start_time = floor(start) if start > 0 else 0
        stop_time = ceil(end)
        if stop_time <= start_time:
            stop_time = start_time + 1
        append(
            {
                "SIDE": side_text[side],
                "START_TIME": start_time,
                "STOP_TIME": stop_time,
                "MESSAGE": text,
            }
        )
    return messages


def _unattributed_indexes(transcript: Transcript) -> list[int]:
    """Non-empty segments naming no side, channel or speaker (empty ones are dropped anyway)."""
    return [
        index
        for index, segment in enumerate(transcript.segments)
        if segment.side is None
        and segment.channel is None
        and segment.speaker is None
        and segment.text
        and not segment.text.isspace()
    ]


def _unattributable_error(indexes: list[int], total: int) -> ValidationError:
    """The 422 for a mono transcript without speakers (contract §6.3): it says what to change."""
    if len(indexes) == 1:
        which = f"segment {indexes[0]} names"
    else:
        which = f"{len(indexes)} of {total} segments (the first is segment {indexes[0]}) name"
    return ValidationError(
        {
            "segments": [
                f"{which} no side, channel or speaker, so employee and client cannot be told "
                "apart (a mono transcript without speakers is not guessed). Enable speaker "
                "diarization or multichannel transcription at the vendor, pass ?channel=0 or "
                '?channel=1 if the recording holds one channel only, or set "side" '
                "(User or Client) on each segment."
            ]
        }
    )


def _check_message_text(text: str) -> None:
    """Our promise beyond Bitrix24's "not empty": collapsed whitespace, at most 60,000 bytes."""
    if len(text.encode()) > MAX_MESSAGE_BYTES:
        raise ValidationError(f"Longer than {MAX_MESSAGE_BYTES} UTF-8 bytes.")
    if text != " ".join(text.split()):
        raise ValidationError("Must have no leading, trailing or repeated whitespace.")


class MessageSchema(Schema):
    """One item of `MESSAGES` in `telephony.call.attachTranscription`."""

    SIDE = fields.String(
        required=True,
        validate=validate.OneOf([side.value for side in Side]),
        metadata={"description": "User (the portal employee) or Client, case-sensitive."},
    )
    START_TIME = fields.Integer(
        required=True,
        strict=True,
        validate=validate.Range(min=0),
        metadata={"description": "Whole seconds from the start of the call, rounded down."},
    )
    STOP_TIME = fields.Integer(
        required=True,
        strict=True,
        validate=validate.Range(min=1),
        metadata={"description": "Whole seconds from the start of the call, rounded up; > START_TIME."},
    )
    MESSAGE = fields.String(
        required=True,
        validate=[validate.Length(min=1), _check_message_text],
        metadata={"description": f"Whitespace-collapsed text, at most {MAX_MESSAGE_BYTES} bytes."},
    )

    @validates_schema
    def _stop_after_start(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        # Bitrix24 does not check this; we promise it (contract §6.2: STOP_TIME >= START_TIME + 1).
        if data["STOP_TIME"] <= data["START_TIME"]:
            raise ValidationError("Must be greater than START_TIME.", "STOP_TIME")


class AttachTranscriptionSchema(Schema):
    """The params of `telephony.call.attachTranscription` as b24scribe sends them."""

    CALL_ID = fields.String(required=True, validate=validate.Length(min=1))
    MESSAGES = fields.List(fields.Nested(MessageSchema), required=True)
    COST = fields.Float(metadata={"description": "Sent only when non-zero: Bitrix24 ignores 0."})
    COST_CURRENCY = fields.String(validate=validate.Length(max=50))


MESSAGE_SCHEMA = MessageSchema()
MESSAGES_SCHEMA = MessageSchema(many=True)
ATTACH_TRANSCRIPTION_SCHEMA = AttachTranscriptionSchema()

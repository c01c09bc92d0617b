"""Whatever a vendor sends within its documented format, Bitrix24 gets MESSAGES it accepts; and
whatever it sends outside it, the parser answers with field-named errors, never a crash."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe.messages import MESSAGES_SCHEMA, SideRules, build_messages, check_attributable
from b24scribe.transcript import Direction, Role, VendorResult
from schemas import assemblyai, deepgram, fasterwhisper, openai, revai, speechmatics, whispercpp

Parser = Callable[[bytes, Mapping[str, str]], VendorResult]
Payload = tuple[Any, dict[str, str]]  # JSON body, callback URL query

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Words as vendors send them: any Unicode (no lone surrogates: JSON cannot carry them), empty,
# or whitespace only.
word_text = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
    st.sampled_from(["", " ", "\u2003", "\t\n", "  "]),
)
seconds = st.floats(min_value=0, max_value=7200, allow_nan=False, allow_infinity=False) | st.integers(0, 7200)
durations = st.floats(min_value=0, max_value=30, allow_nan=False, allow_infinity=False)
milliseconds = st.integers(min_value=0, max_value=7_200_000)
side_rules = st.builds(
    SideRules, direction=st.sampled_from(Direction), channel0=st.sampled_from(Role), first_speaker=st.sampled_from(Role)
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@st.composite
def timed(draw: st.DrawFn) -> tuple[float, float]:
    start = draw(seconds)
    return start, start + draw(durations)


@st.composite
def timed_ms(draw: st.DrawFn) -> tuple[int, int]:
    start = draw(milliseconds)
    return start, start + draw(st.integers(0, 30_000))


# --- valid payloads, one strategy per vendor -------------------------------------------------


@st.composite
def deepgram_payloads(draw: st.DrawFn) -> Payload:
    metadata = {"request_id": "a3c51d2e", "extra": {"pbx": "asterisk", "call": "1.2"}}
    if draw(st.booleans()):  # multichannel with utterances
        utterances = []
        for _ in range(draw(st.integers(0, 30))):
            start, end = draw(timed())
            utterance: dict[str, Any] = {"start": start, "end": end, "transcript": draw(word_text)}
            utterance["channel"] = draw(st.integers(0, 1))
            if draw(st.booleans()):
                utterance["speaker"] = draw(st.integers(0, 3))
            utterances.append(utterance)
        channels = [{"alternatives": [{"transcript": "", "words": []}]} for _ in range(2)]
        return {"metadata": metadata, "results": {"channels": channels, "utterances": utterances}}, {}
    words = []  # mono, diarized words only
    for _ in range(draw(st.integers(0, 60))):
        start, end = draw(timed())
        word: dict[str, Any] = {"word": draw(word_text), "start": start, "end": end, "speaker": draw(st.integers(0, 2))}
        if draw(st.booleans()):
            word["punctuated_word"] = draw(word_text)
        words.append(word)
    return {"metadata": metadata, "results": {"channels": [{"alternatives": [{"words": words}]}]}}, {}


@st.composite
def assemblyai_payloads(draw: st.DrawFn) -> Payload:
    multichannel = draw(st.booleans())
    items = []
    for _ in range(draw(st.integers(0, 40))):
        start, end = draw(timed_ms())
        channel = draw(st.sampled_from(["1", "2"]))
        items.append(
            {
                "text": draw(word_text),
                "start": start,
                "end": end,
                "speaker": channel if multichannel else draw(st.sampled_from(["A", "B", "C"])),
                "channel": channel if multichannel else None,
            }
        )
    key = draw(st.sampled_from(["utterances", "words"]))
    return {"id": "5552493", "status": "completed", key: items, "words": items}, {}


@st.composite
def revai_payloads(draw: st.DrawFn) -> Payload:
    monologues = []
    for _ in range(draw(st.integers(0, 12))):
        elements: list[dict[str, Any]] = []
        for _ in range(draw(st.integers(0, 12))):
            kind = draw(st.sampled_from(["text", "text", "punct", "unknown"]))
            if kind == "text":
                start, end = draw(timed())
                elements.append({"type": "text", "value": draw(word_text), "ts": start, "end_ts": end})
            else:
                elements.append({"type": kind, "value": draw(st.sampled_from([" ", ".", ",", "?", "<laugh>"]))})
        monologues.append({"speaker": draw(st.integers(0, 1)), "elements": elements})
    return {"monologues": monologues}, {"speaker_channels_count": "2"}


@st.composite
def speechmatics_payloads(draw: st.DrawFn) -> Payload:
    by_channel = draw(st.booleans())
    results = []
    for _ in range(draw(st.integers(0, 60))):
        start, end = draw(timed())
        kind = draw(st.sampled_from(["word", "word", "punctuation", "entity", "speaker_change"]))
        alternative: dict[str, Any] = {"content": draw(word_text), "confidence": 0.9, "language": "en"}
        item: dict[str, Any] = {"type": kind, "start_time": start, "end_time": end, "alternatives": [alternative]}
        if kind == "punctuation":
            item["attaches_to"] = draw(st.sampled_from(["previous", "next", "both", "none"]))
        if by_channel:
            item["channel"] = draw(st.sampled_from(["channel_1", "channel_2", "Channel 2"]))
        else:
            alternative["speaker"] = draw(st.sampled_from(["S1", "S2", "UU"]))
        results.append(item)
    if not by_channel:  # at least one known speaker, or nothing can be attributed
        results.append(
            {"type": "word", "start_time": 0, "end_time": 1, "alternatives": [{"content": "ok", "speaker": "S1"}]}
        )
    body = {"format": "2.9", "job": {"id": "r6sr3jlzjj"}, "results": results}
    return body, {"id": "r6sr3jlzjj", "status": "success"}


@st.composite
def openai_payloads(draw: st.DrawFn) -> Payload:
    diarized = draw(st.booleans())
    segments = []
    for index in range(draw(st.integers(0, 30))):
        start, end = draw(timed())
        segment: dict[str, Any] = {"id": index, "start": start, "end": end, "text": draw(word_text)}
        if diarized:
            segment["speaker"] = draw(st.sampled_from(["A", "B", "Anna"]))
        segments.append(segment)
    return {"task": "transcribe", "segments": segments}, ({} if diarized else {"channel": draw(st.sampled_from("01"))})


@st.composite
def whispercpp_payloads(draw: st.DrawFn) -> Payload:
    transcription = []
    for _ in range(draw(st.integers(0, 30))):
        start, end = draw(timed_ms())
        transcription.append(
            {"offsets": {"from": start, "to": end}, "text": draw(word_text), "speaker": draw(st.sampled_from("01?"))}
        )
    return {"result": {"language": "en"}, "transcription": transcription}, {}


@st.composite
def fasterwhisper_payloads(draw: st.DrawFn) -> Payload:
    segments: list[Any] = []
    for index in range(draw(st.integers(0, 30))):
        start, end = draw(timed())
        text = draw(word_text)
        if draw(st.booleans()):
            segments.append({"id": index, "seek": 0, "start": start, "end": end, "text": text, "words": None})
        else:
            segments.append([index, 0, start, end, text, [], -0.2, 1.2, 0.01, None, 0.0])
    body: Any = segments if draw(st.booleans()) else {"segments": segments}
    return body, {"channel": draw(st.sampled_from("01"))}


VENDORS: list[tuple[str, Parser, Any]] = [
    ("deepgram", deepgram.parse, deepgram_payloads()),
    ("assemblyai", assemblyai.parse_transcript, assemblyai_payloads()),
    ("revai", revai.parse_transcript, revai_payloads()),
    ("speechmatics", speechmatics.parse, speechmatics_payloads()),
    ("openai", openai.parse, openai_payloads()),
    ("whispercpp", whispercpp.VENDOR.parse, whispercpp_payloads()),
    ("fasterwhisper", fasterwhisper.VENDOR.parse, fasterwhisper_payloads()),
]
VENDOR_IDS = [name for name, _parse, _payloads in VENDORS]


def assert_bitrix24_accepts(messages: list[dict[str, str | int]]) -> None:
    """Exactly four keys, User/Client, START ≥ 0, STOP ≥ 1 and after START, text, in time order."""
    MESSAGES_SCHEMA.load(messages)  # raises on anything Bitrix24 (or our promise) would refuse
    for message in messages:
        assert set(message) == {"SIDE", "START_TIME", "STOP_TIME", "MESSAGE"}
        assert message["SIDE"] in ("User", "Client")
        start, stop, text = message["START_TIME"], message["STOP_TIME"], message["MESSAGE"]
        assert isinstance(start, int) and isinstance(stop, int) and isinstance(text, str)
        assert start >= 0 and stop >= 1 and stop > start
        assert text and text == " ".join(text.split())
    starts = [message["START_TIME"] for message in messages]
    assert starts == sorted(starts)


@pytest.mark.parametrize(("name", "parse", "payloads"), VENDORS, ids=VENDOR_IDS)
def test_valid_payloads_become_messages_bitrix24_accepts(name: str, parse: Parser, payloads: Any) -> None:
    @PROPERTY_SETTINGS
    @given(payload=payloads, rules=side_rules)
    def check(payload: Payload, rules: SideRules) -> None:
        body, query = payload
        result = parse(json.dumps(body).encode(), query)
        assert result.status == "completed" and result.transcript is not None
        check_attributable(result.transcript)
        assert_bitrix24_accepts(build_messages(result.transcript, rules))

    check()


@st.composite
def mutated(draw: st.DrawFn, payloads: Any) -> Payload:
    """A valid payload with one to three of its values (at any depth) replaced by random JSON."""
    body, query = draw(payloads)
    for _ in range(draw(st.integers(1, 3))):
        body = _replace_somewhere(draw, body)
    return body, query


def _replace_somewhere(draw: st.DrawFn, value: Any) -> Any:
    children: list[Any] = (
        list(value) if isinstance(value, dict) else list(range(len(value))) if isinstance(value, list) else []
    )
    if not children or draw(st.integers(0, 3)) == 0:
        return draw(json_values)
    key = draw(st.sampled_from(children))
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    copy[key] = _replace_somewhere(draw, value[key])
    return copy


@pytest.mark.parametrize(("name", "parse", "payloads"), VENDORS, ids=VENDOR_IDS)
def test_broken_payloads_give_field_named_errors_never_a_crash(name: str, parse: Parser, payloads: Any) -> None:
    @PROPERTY_SETTINGS
    @given(payload=mutated(payloads))
    def check(payload: Payload) -> None:
        body, query = payload
        try:
            result = parse(json.dumps(body).encode(), query)
        except ValidationError as error:
            assert isinstance(error.messages, dict) and error.messages
            return
        if result.transcript is None:
            return
        try:
            check_attributable(result.transcript)
        except ValidationError:
            return
        assert_bitrix24_accepts(build_messages(result.transcript, SideRules()))

    check()


@pytest.mark.parametrize(("name", "parse", "payloads"), VENDORS, ids=VENDOR_IDS)
def test_arbitrary_json_is_refused_by_field_not_by_crash(name: str, parse: Parser, payloads: Any) -> None:
    @PROPERTY_SETTINGS
    @given(body=json_values)
    def check(body: Any) -> None:
        try:
            parse(json.dumps(body).encode(), {})
        except ValidationError as error:
            assert isinstance(error.messages, dict) and error.messages

    check()

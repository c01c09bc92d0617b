"""A canonical transcript becomes exactly valid Bitrix24 MESSAGES (contract §6)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from b24scribe import messages
from b24scribe.messages import (
    ATTACH_TRANSCRIPTION_SCHEMA,
    MAX_MESSAGE_BYTES,
    MESSAGE_SCHEMA,
    MESSAGES_SCHEMA,
    SideRules,
    attach_params,
    build_messages,
    check_attributable,
)
from b24scribe.transcript import UNDECIDED_SPEAKER, Direction, Role, Segment, Side, Transcript

KEYS = {"SIDE", "START_TIME", "STOP_TIME", "MESSAGE"}
INBOUND = SideRules()
OUTBOUND = SideRules(direction=Direction.OUTBOUND)


def seg(start: float, end: float, text: str, **label: object) -> Segment:
    return Segment(start=start, end=end, text=text, **label)  # type: ignore[arg-type]


def word(start: float, end: float, text: str, **label: object) -> Segment:
    return seg(start, end, text, **label)


def translate(*segments: Segment, rules: SideRules = INBOUND) -> list[dict[str, str | int]]:
    return build_messages(Transcript(list(segments)), rules)


def translate_words(*words: Segment, rules: SideRules = INBOUND) -> list[dict[str, str | int]]:
    return build_messages(Transcript(list(words), granularity="word"), rules)


def said(messages: list[dict[str, str | int]]) -> list[tuple[str | int, str | int]]:
    """Who said what, in order."""
    return [(message["SIDE"], message["MESSAGE"]) for message in messages]


def times(messages: list[dict[str, str | int]]) -> list[tuple[str | int, str | int]]:
    return [(message["START_TIME"], message["STOP_TIME"]) for message in messages]


# --- Rule 1: exactly the four keys -------------------------------------------------------------


def test_every_message_carries_exactly_the_four_keys_bitrix_stores() -> None:
    messages = translate(
        seg(0.4, 2.9, "Good afternoon", channel=0),
        seg(3.2, 6.0, "Hello", channel=1),
    )

    assert [set(message) for message in messages] == [KEYS, KEYS]
    assert messages[0] == {
        "SIDE": "Client",
        "START_TIME": 0,
        "STOP_TIME": 3,
        "MESSAGE": "Good afternoon",
    }
    assert type(messages[0]["SIDE"]) is str  # a plain str, not the Side enum
    assert MESSAGES_SCHEMA.validate(messages) == {}


# --- Rule 2: whole seconds ----------------------------------------------------------------------


def test_start_rounds_down_and_stop_rounds_up() -> None:
    messages = translate(seg(1.2, 3.4, "one", channel=0), seg(5.0, 9.0, "two", channel=0))

    assert times(messages) == [(1, 4), (5, 9)]


def test_a_sub_second_backchannel_still_lasts_at_least_one_second() -> None:
    messages = translate(
        seg(0.2, 0.8, "Mm", channel=1),  # Bitrix24 would truncate a STOP_TIME of 0.8 to 0
        seg(7.1, 7.3, "Yes", channel=1),
        seg(12.0, 12.0, "Ok", channel=1),
    )

    assert times(messages) == [(0, 1), (7, 8), (12, 13)]


def test_a_segment_starting_before_the_recording_clamps_to_zero() -> None:
    messages = translate(seg(-0.4, 1.5, "early", channel=0), seg(-3.0, -1.0, "earlier", channel=0))

    assert said(messages) == [("Client", "earlier"), ("Client", "early")]
    assert times(messages) == [(0, 1), (0, 2)]


def test_an_end_before_the_start_still_stops_after_the_start() -> None:
    assert times(translate(seg(5.5, 2.0, "backwards", channel=0))) == [(5, 6)]


# --- Rule 3: sides ------------------------------------------------------------------------------


def test_an_explicit_side_wins_over_channel_and_speaker() -> None:
    messages = translate(seg(0, 1, "hi", side=Side.USER, channel=0, speaker="A"))

    assert said(messages) == [("User", "hi")]


@pytest.mark.parametrize(
    ("channel0", "direction", "channel0_side"),
    [
        (Role.CALLER, Direction.INBOUND, "Client"),  # the customer called us
        (Role.CALLER, Direction.OUTBOUND, "User"),  # the employee called out
        (Role.CALLEE, Direction.INBOUND, "User"),
        (Role.CALLEE, Direction.OUTBOUND, "Client"),
        (Role.USER, Direction.INBOUND, "User"),
        (Role.USER, Direction.OUTBOUND, "User"),
        (Role.CLIENT, Direction.INBOUND, "Client"),
        (Role.CLIENT, Direction.OUTBOUND, "Client"),
    ],
)
def test_stereo_channels_map_through_channel0_and_the_call_direction(
    channel0: Role, direction: Direction, channel0_side: str
) -> None:
    rules = SideRules(direction=direction, channel0=channel0)
    other_side = "User" if channel0_side == "Client" else "Client"

    messages = translate(seg(0, 1, "zero", channel=0), seg(2, 3, "one", channel=1), rules=rules)

    assert said(messages) == [(channel0_side, "zero"), (other_side, "one")]


def test_by_default_channel0_is_the_caller_the_client_of_an_inbound_call() -> None:
    assert said(translate(seg(0, 1, "I have a question", channel=0))) == [("Client", "I have a question")]
    assert said(translate(seg(0, 1, "Calling about", channel=0), rules=OUTBOUND)) == [("User", "Calling about")]


def test_channels_beyond_one_map_like_channel_modulo_two() -> None:
    messages = translate(
        seg(0, 1, "two", channel=2),
        seg(1, 2, "three", channel=3),
        seg(2, 3, "four", channel=4),
    )

    assert said(messages) == [("Client", "two"), ("User", "three"), ("Client", "four")]


def test_a_channel_wins_over_a_speaker_label() -> None:
    messages = translate(seg(0, 1, "hello", channel=1, speaker="A"), seg(1, 2, "hi", speaker="B"))

    # The channel decides the first segment; "B" is then the first *speaker* heard.
    assert said(messages) == [("User", "hello"), ("User", "hi")]


def test_the_first_speaker_heard_is_the_callee_who_answers_an_inbound_call() -> None:
    messages = translate(
        seg(4.0, 6.0, "I need help with my order", speaker="A"),  # first in the payload ...
        seg(0.5, 3.0, "Acme support, good morning", speaker="B"),  # ... but B spoke first
    )

    assert said(messages) == [
        ("User", "Acme support, good morning"),
        ("Client", "I need help with my order"),
    ]


def test_on_an_outbound_call_the_first_speaker_is_the_client_who_answers() -> None:
    messages = translate(seg(0, 2, "Hello?", speaker="0"), seg(2, 4, "Hi, Acme here", speaker="1"), rules=OUTBOUND)

    assert said(messages) == [("Client", "Hello?"), ("User", "Hi, Acme here")]


@pytest.mark.parametrize(
    ("first_speaker", "first_side"),
    [(Role.USER, "User"), (Role.CLIENT, "Client"), (Role.CALLER, "Client")],
)
def test_first_speaker_can_be_overridden(first_speaker: Role, first_side: str) -> None:
    rules = SideRules(first_speaker=first_speaker)
    other_side = "User" if first_side == "Client" else "Client"

    messages = translate(seg(0, 1, "first", speaker="S1"), seg(1, 2, "second", speaker="S2"), rules=rules)

    assert said(messages) == [(first_side, "first"), (other_side, "second")]


def test_speakers_starting_together_go_first_in_payload_order() -> None:
    messages = translate(seg(1.0, 2.0, "Hello", speaker="B"), seg(1.0, 1.5, "Hi", speaker="A"))

    assert said(messages) == [("User", "Hello"), ("Client", "Hi")]


def test_every_speaker_but_the_first_is_on_the_other_side() -> None:
    messages = translate(
        seg(0, 1, "support", speaker="A"),
        seg(1, 2, "customer", speaker="B"),
        seg(2, 3, "customer's colleague", speaker="C"),
        seg(3, 4, "support again", speaker="A"),
    )

    assert [side for side, _ in said(messages)] == ["User", "Client", "Client", "User"]


def test_a_speaker_who_only_produced_silence_is_not_the_first_speaker() -> None:
    messages = translate(seg(0, 1, "  \n", speaker="X"), seg(1, 2, "Hello", speaker="A"))

    assert said(messages) == [("User", "Hello")]


def test_the_undecided_speaker_takes_the_side_opposite_to_the_previous_message() -> None:
    messages = translate(
        seg(0, 2, "Acme, how can I help?", speaker="0"),
        seg(9, 10, "And the delivery?", speaker=UNDECIDED_SPEAKER),  # payload order is not time
        seg(2, 4, "My parcel is late", speaker=UNDECIDED_SPEAKER),
        seg(4, 6, "Let me check", speaker="0"),
    )

    assert said(messages) == [
        ("User", "Acme, how can I help?"),
        ("Client", "My parcel is late"),
        ("User", "Let me check"),
        ("Client", "And the delivery?"),
    ]


def test_undecided_segments_in_a_row_take_turns() -> None:
    messages = translate(
        seg(0, 1, "one", speaker="0"),
        seg(1, 2, "two", speaker=UNDECIDED_SPEAKER),
        seg(2, 3, "three", speaker=UNDECIDED_SPEAKER),
    )

    assert [side for side, _ in said(messages)] == ["User", "Client", "User"]


def test_an_undecided_speaker_opening_the_call_is_on_the_first_speakers_side() -> None:
    messages = translate(seg(0, 1, "Hello?", speaker=UNDECIDED_SPEAKER), seg(1, 2, "Hi", speaker="1"), rules=OUTBOUND)

    assert said(messages) == [("Client", "Hello?"), ("Client", "Hi")]


def test_a_mono_transcript_without_speakers_is_refused_with_what_to_change() -> None:
    transcript = Transcript([seg(0, 1, "secret words"), seg(1, 2, "more words")])

    with pytest.raises(ValidationError) as refused:
        check_attributable(transcript)

    assert set(refused.value.messages) == {"segments"}
    (message,) = refused.value.messages["segments"]  # type: ignore[call-overload]
    assert "2 of 2 segments" in message
    for advice in ("diarization", "multichannel", "?channel=0", '"side"'):
        assert advice in message
    assert "secret" not in message  # transcript text never reaches error bodies


def test_one_unlabelled_segment_among_labelled_ones_is_named() -> None:
    transcript = Transcript([seg(0, 1, "a", channel=0), seg(1, 2, "b")])

    with pytest.raises(ValidationError, match="segment 1 names no side, channel or speaker"):
        check_attributable(transcript)


def test_building_messages_for_an_unattributable_transcript_refuses_the_same_way() -> None:
    with pytest.raises(ValidationError) as refused:
        translate(seg(0, 1, "a", speaker="A"), seg(1, 2, "b"))

    assert "segment 1 names" in refused.value.messages["segments"][0]  # type: ignore[call-overload]


def test_attributable_transcripts_and_unlabelled_silence_pass_the_check() -> None:
    check_attributable(
        Transcript(
            [
                seg(0, 1, "a", side=Side.CLIENT),
                seg(1, 2, "b", channel=1),
                seg(2, 3, "c", speaker="?"),
                seg(3, 4, "   "),  # dropped anyway
            ]
        )
    )


# --- Rule 4: word-level transcripts ------------------------------------------------------------


def test_a_clients_mm_hmm_does_not_cut_the_employees_sentence_in_two() -> None:
    messages = translate_words(
        word(0.0, 0.4, "I'll", channel=1),
        word(0.5, 0.9, "check", channel=1),
        word(1.0, 1.4, "your", channel=1),
        word(1.2, 1.6, "Mm-hmm", channel=0),
        word(1.5, 2.0, "order", channel=1),
        word(2.1, 2.6, "now", channel=1),
    )

    assert said(messages) == [("User", "I'll check your order now"), ("Client", "Mm-hmm")]
    assert times(messages) == [(0, 3), (1, 2)]


def test_a_pause_of_more_than_one_second_starts_a_new_message() -> None:
    messages = translate_words(
        word(0.0, 1.0, "Hold", side=Side.USER),
        word(2.0, 2.5, "on", side=Side.USER),  # exactly 1.0 s later: same message
        word(3.51, 4.0, "Thanks", side=Side.USER),  # 1.01 s later: a new one
    )

    assert said(messages) == [("User", "Hold on"), ("User", "Thanks")]
    assert times(messages) == [(0, 3), (3, 4)]


def test_punctuation_attaches_to_the_previous_word_without_a_space() -> None:
    messages = translate_words(
        word(0.0, 0.5, "Hello", speaker="A"),
        word(0.5, 0.5, ",", speaker="A", glue=True),
        word(0.6, 1.0, "world", speaker="A"),
        word(1.0, 1.0, " .", speaker="A", glue=True),
        word(1.1, 1.4, "Bye", speaker="A"),
        word(1.4, 1.4, "!", speaker="A", glue=True),
    )

    assert said(messages) == [("User", "Hello, world. Bye!")]


def test_late_stamped_punctuation_stays_with_its_word() -> None:
    messages = translate_words(word(0.0, 0.5, "Done", channel=0), word(3.0, 3.0, ".", channel=0, glue=True))

    assert said(messages) == [("Client", "Done.")]
    assert times(messages) == [(0, 3)]


def test_diarized_words_resolve_sides_then_group() -> None:
    messages = translate_words(
        word(0.0, 0.3, "Acme", speaker="spk_1"),
        word(0.4, 0.8, "support", speaker="spk_1"),
        word(2.5, 2.8, "Hi", speaker="spk_0"),
        word(2.9, 3.3, "there", speaker="spk_0"),
        word(3.5, 3.9, "Hello", speaker="spk_1"),
    )

    assert said(messages) == [
        ("User", "Acme support"),
        ("Client", "Hi there"),
        ("User", "Hello"),  # 2.7 s after spk_1's last word
    ]


def test_undecided_words_in_a_row_are_one_turn() -> None:
    messages = translate_words(
        word(0.0, 0.4, "Good", speaker="0"),
        word(0.5, 0.9, "morning", speaker="0"),
        word(1.0, 1.3, "where", speaker=UNDECIDED_SPEAKER),
        word(1.4, 1.6, "is", speaker=UNDECIDED_SPEAKER),
        word(1.7, 2.0, "it", speaker=UNDECIDED_SPEAKER),
    )

    assert said(messages) == [("User", "Good morning"), ("Client", "where is it")]


# --- Rule 5: whitespace, order, size -----------------------------------------------------------


def test_whitespace_is_stripped_and_inner_runs_collapsed() -> None:
    messages = translate(seg(0, 1, "  Good\tafternoon,\n\n how  are\u00a0you?\u3000 ", channel=0))

    assert said(messages) == [("Client", "Good afternoon, how are you?")]


def test_empty_and_whitespace_only_segments_are_dropped() -> None:
    messages = translate(
        seg(0, 1, "", channel=0),
        seg(1, 2, " \n\t\u2028", channel=1),
        seg(2, 3, "words", channel=0),
    )

    assert said(messages) == [("Client", "words")]


def test_messages_are_ordered_by_their_exact_start_not_the_rounded_one() -> None:
    messages = translate(
        seg(1.7, 3.0, "third", channel=0),
        seg(1.2, 2.0, "second", channel=1),
        seg(0.5, 1.0, "first", channel=0),
    )

    assert [text for _, text in said(messages)] == ["first", "second", "third"]
    assert [start for start, _ in times(messages)] == [0, 1, 1]


def test_messages_starting_together_keep_the_vendors_order() -> None:
    messages = translate(
        seg(2.0, 3.0, "a", channel=1),
        seg(2.0, 2.5, "b", channel=0),
        seg(2.0, 4.0, "c", channel=1),
    )

    assert [text for _, text in said(messages)] == ["a", "b", "c"]


def test_channels_listed_one_after_the_other_are_interleaved_in_time() -> None:
    messages = translate(
        seg(0.0, 2.0, "Acme support", channel=1),
        seg(4.0, 5.0, "Let me see", channel=1),
        seg(2.0, 4.0, "My order is late", channel=0),
        seg(5.0, 6.0, "Thanks", channel=0),
    )

    assert said(messages) == [
        ("User", "Acme support"),
        ("Client", "My order is late"),
        ("User", "Let me see"),
        ("Client", "Thanks"),
    ]


def test_a_message_over_60000_bytes_is_split_at_word_boundaries() -> None:
    text = " ".join(f"word{index:05d}" for index in range(15_000))  # 149,999 bytes
    messages = translate(seg(10.0, 110.0, text, channel=1))

    assert len(messages) == 3
    assert all(len(str(message["MESSAGE"]).encode()) <= MAX_MESSAGE_BYTES for message in messages)
    assert " ".join(str(message["MESSAGE"]) for message in messages) == text
    assert all(message["SIDE"] == "User" for message in messages)
    # Times are shared out by byte offset: pieces start at ~0, 60,000 and 120,000 of 149,999 bytes.
    assert times(messages) == [(10, 51), (50, 91), (90, 110)]
    assert MESSAGES_SCHEMA.validate(messages) == {}


def test_a_single_word_over_the_limit_is_split_at_a_character_boundary() -> None:
    for text in ("é" * 40_000, "a" + "😀" * 20_000, "x" * 130_001):
        messages = translate(seg(0.0, 4.0, text, channel=0))

        pieces = [str(message["MESSAGE"]) for message in messages]
        assert "".join(pieces) == text
        assert all(0 < len(piece.encode()) <= MAX_MESSAGE_BYTES for piece in pieces)
        assert MESSAGES_SCHEMA.validate(messages) == {}


def test_pieces_of_a_split_message_stay_in_time_order_with_the_other_side() -> None:
    text = " ".join(["monologue"] * 12_000)  # 119,999 bytes: two pieces, the second from ~50 s
    messages = translate(seg(0.0, 100.0, text, channel=1), seg(30.0, 31.0, "Sure", channel=0))

    assert [(side, start) for (side, _), (start, _) in zip(said(messages), times(messages), strict=True)] == [
        ("User", 0),
        ("Client", 30),
        ("User", 50),
    ]


def test_a_word_level_monologue_over_the_limit_is_split_too() -> None:
    words = [word(index * 0.5, index * 0.5 + 0.4, "blah", side=Side.CLIENT) for index in range(14_000)]

    messages = translate_words(*words)

    assert [len(str(message["MESSAGE"]).encode()) for message in messages] == [59_999, 9_999]
    assert MESSAGES_SCHEMA.validate(messages) == {}


# --- attach_params ------------------------------------------------------------------------------


def test_attach_params_carry_the_call_the_messages_and_the_cost() -> None:
    transcript = Transcript([seg(0, 1, "Hi", channel=0)], cost=0.12, cost_currency="USD")

    params = attach_params("externalCall.716f.1773130779", transcript, INBOUND)

    assert params == {
        "CALL_ID": "externalCall.716f.1773130779",
        "MESSAGES": [{"SIDE": "Client", "START_TIME": 0, "STOP_TIME": 1, "MESSAGE": "Hi"}],
        "COST": 0.12,
        "COST_CURRENCY": "USD",
    }
    assert ATTACH_TRANSCRIPTION_SCHEMA.validate(params) == {}


@pytest.mark.parametrize(("cost", "currency"), [(None, None), (0, "USD"), (0.0, None), (None, "EUR")])
def test_a_zero_or_missing_cost_is_not_sent_since_bitrix_ignores_it(cost: float | None, currency: str | None) -> None:
    transcript = Transcript([seg(0, 1, "Hi", channel=0)], cost=cost, cost_currency=currency)

    assert set(attach_params("c1", transcript, INBOUND)) == {"CALL_ID", "MESSAGES"}


def test_a_cost_without_a_currency_is_sent_alone() -> None:
    transcript = Transcript([seg(0, 1, "Hi", channel=0)], cost=1.5)

    assert set(attach_params("c1", transcript, INBOUND)) == {"CALL_ID", "MESSAGES", "COST"}


# --- MessageSchema ------------------------------------------------------------------------------

VALID = {"SIDE": "User", "START_TIME": 0, "STOP_TIME": 1, "MESSAGE": "Hi"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"SIDE": "user"}, "SIDE"),  # Bitrix24 compares case-sensitively
        ({"SIDE": "Agent"}, "SIDE"),
        ({"START_TIME": -1}, "START_TIME"),
        ({"START_TIME": 0.5}, "START_TIME"),
        ({"START_TIME": "0"}, "START_TIME"),
        ({"STOP_TIME": 0}, "STOP_TIME"),
        ({"START_TIME": 5, "STOP_TIME": 5}, "STOP_TIME"),
        ({"MESSAGE": ""}, "MESSAGE"),
        ({"MESSAGE": " padded "}, "MESSAGE"),
        ({"MESSAGE": "x" * (MAX_MESSAGE_BYTES + 1)}, "MESSAGE"),
        ({"CONFIDENCE": 0.9}, "CONFIDENCE"),  # extra keys would break Bitrix24's insert
    ],
)
def test_the_message_schema_rejects_what_bitrix_or_our_rules_reject(change: dict[str, object], field: str) -> None:
    assert field in MESSAGE_SCHEMA.validate({**VALID, **change})


def test_the_message_schema_accepts_a_valid_message() -> None:
    assert MESSAGE_SCHEMA.validate(VALID) == {}
    assert MESSAGE_SCHEMA.validate({**VALID, "MESSAGE": "é" * (MAX_MESSAGE_BYTES // 2)}) == {}


# --- Properties ---------------------------------------------------------------------------------

any_time = st.one_of(
    st.floats(min_value=-2.0, max_value=5.0, allow_nan=False),  # sub-second, negative, near 0
    st.floats(min_value=0.0, max_value=7_200.0, allow_nan=False),
    st.floats(allow_nan=False, allow_infinity=False),  # huge (up to 1.8e308) and tiny
)
any_text = st.one_of(
    st.text(),  # any unicode, often empty
    st.text(alphabet=" \t\n\r\u00a0\u2028\u3000\x1c"),  # whitespace only
    st.lists(st.text(min_size=1, max_size=8), max_size=6).map(" ".join),
)
any_label = st.one_of(
    st.fixed_dictionaries({"side": st.sampled_from(Side)}),
    st.fixed_dictionaries({"channel": st.integers(min_value=0, max_value=5)}),
    st.fixed_dictionaries({"speaker": st.sampled_from(["A", "B", "C", "spk_0", UNDECIDED_SPEAKER])}),
    st.fixed_dictionaries(
        {"channel": st.integers(min_value=0, max_value=1), "speaker": st.sampled_from(["A", "?"])},
        optional={"side": st.sampled_from(Side)},
    ),
)
any_segment = st.builds(
    lambda start, end, text, label, glue: Segment(start, end, text, glue=glue, **label),
    any_time,
    any_time,
    any_text,
    any_label,
    st.booleans(),
)
any_transcript = st.builds(
    Transcript,
    segments=st.lists(any_segment, max_size=30),
    granularity=st.sampled_from(["segment", "word"]),
)
any_rules = st.builds(
    SideRules,
    direction=st.sampled_from(Direction),
    channel0=st.sampled_from(Role),
    first_speaker=st.sampled_from(Role),
)


def assert_valid_messages(messages: list[dict[str, str | int]]) -> None:
    assert MESSAGES_SCHEMA.validate(messages) == {}
    for message in messages:
        assert set(message) == KEYS
        assert message["SIDE"] in ("User", "Client")
        start, stop, text = message["START_TIME"], message["STOP_TIME"], message["MESSAGE"]
        assert isinstance(start, int) and isinstance(stop, int) and isinstance(text, str)
        assert start >= 0 and stop >= 1 and stop > start
        assert text and text == " ".join(text.split())
        assert len(text.encode()) <= MAX_MESSAGE_BYTES
    starts = [message["START_TIME"] for message in messages]
    assert starts == sorted(starts)


def non_space_characters(texts: list[str]) -> list[str]:
    return sorted("".join("".join(text.split()) for text in texts))


@given(any_transcript, any_rules)
def test_any_attributable_transcript_becomes_valid_messages(transcript: Transcript, rules: SideRules) -> None:
    check_attributable(transcript)

    messages = build_messages(transcript, rules)

    assert_valid_messages(messages)
    # Nothing said is lost or invented, whatever the grouping.
    assert non_space_characters([str(message["MESSAGE"]) for message in messages]) == (
        non_space_characters([segment.text for segment in transcript.segments])
    )


@given(any_transcript, any_rules)
def test_no_message_starts_earlier_than_the_one_before_it(transcript: Transcript, rules: SideRules) -> None:
    starts = [draft[0] for draft in messages._drafts(transcript, rules)]

    assert all(earlier <= later for earlier, later in zip(starts, starts[1:], strict=False))


@given(st.lists(any_segment, max_size=30), any_rules)
def test_utterances_come_out_in_exact_start_order_with_ties_in_payload_order(
    segments: list[Segment], rules: SideRules
) -> None:
    messages = build_messages(Transcript(segments), rules)

    expected = [
        (max(0, math.floor(segment.start)), " ".join(segment.text.split()))
        for segment in sorted(segments, key=lambda segment: segment.start)
        if segment.text.split()
    ]
    assert [(message["START_TIME"], message["MESSAGE"]) for message in messages] == expected


long_words = st.lists(
    st.text(min_size=1, max_size=12).map(lambda text: "".join(text.split()) or "w"),
    min_size=1,
    max_size=8,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long_words, st.sampled_from([" ", "", "\n "]), any_time, any_time, st.booleans())
def test_any_oversized_text_splits_into_valid_pieces(
    words: list[str], separator: str, start: float, end: float, word_level: bool
) -> None:
    unit = separator.join(words) + separator
    text = unit * (MAX_MESSAGE_BYTES * 5 // (2 * len(unit.encode())) + 1)  # ~2.5 limits or more
    if word_level:
        transcript = Transcript([Segment(start, end, text, channel=0)], granularity="word")
    else:
        transcript = Transcript([Segment(start, end, text, channel=0), Segment(start, end, "x", channel=1)])

    messages = build_messages(transcript, SideRules())

    # whitespace runs collapse to one space before splitting, so count the collapsed bytes
    collapsed_bytes = len(" ".join(text.split()).encode())
    assert len(messages) >= -(-collapsed_bytes // MAX_MESSAGE_BYTES) + (0 if word_level else 1)
    assert len([m for m in messages if m["SIDE"] == "Client"]) >= 2
    assert_valid_messages(messages)
    assert non_space_characters([str(message["MESSAGE"]) for message in messages]) == (
        non_space_characters([segment.text for segment in transcript.segments])
    )


@given(st.lists(any_segment, min_size=1, max_size=10), st.integers(min_value=0), st.text())
def test_any_unlabelled_spoken_segment_is_refused(segments: list[Segment], position: int, text: str) -> None:
    unlabelled = Segment(0.0, 1.0, text + " spoken")
    segments.insert(position % (len(segments) + 1), unlabelled)

    for granularity in ("segment", "word"):
        transcript = Transcript(segments, granularity=granularity)
        with pytest.raises(ValidationError):
            check_attributable(transcript)
        with pytest.raises(ValidationError):
            build_messages(transcript, SideRules())

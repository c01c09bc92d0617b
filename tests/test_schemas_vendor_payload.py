"""The pieces every vendor schema shares: fast segments, field-path errors, URL options, references."""

from __future__ import annotations

import dataclasses

import pytest
from marshmallow import ValidationError

from b24scribe.transcript import CallReference, Segment
from schemas._vendor_payload import (
    ItemShape,
    PayloadErrors,
    channel_from_query,
    field_error,
    load_json_object,
    new_segment,
    reference_from_mapping,
    reference_from_metadata,
    reference_from_query_string,
)


def test_new_segment_is_a_true_frozen_segment() -> None:
    fast = new_segment(1.5, 2.0, "Hi", 1, "S1", True)

    assert type(fast) is Segment
    assert fast == Segment(1.5, 2.0, "Hi", channel=1, speaker="S1", glue=True)
    assert hash(fast) == hash(Segment(1.5, 2.0, "Hi", channel=1, speaker="S1", glue=True))
    assert new_segment(0.0, 1.0, "x") == Segment(0.0, 1.0, "x")
    assert dataclasses.replace(fast, speaker=None).speaker is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.text = "changed"  # type: ignore[misc]


def test_payload_errors_nest_by_path_like_marshmallow() -> None:
    errors = PayloadErrors()
    errors.add(("results", 3, "start_time"), "Not a valid number of seconds.")
    errors.add(("results", 3, "end_time"), "Missing data for required field.")
    errors.add(("results", 7), "Not a valid object.")
    errors.add(("results", 7, "text"), "ignored: its parent is already reported")

    with pytest.raises(ValidationError) as caught:
        errors.raise_if_any()
    assert caught.value.messages == {
        "results": {
            3: {"start_time": ["Not a valid number of seconds."], "end_time": ["Missing data for required field."]},
            7: ["Not a valid object."],
        }
    }


def test_an_hour_of_broken_words_does_not_make_a_huge_error_body() -> None:
    errors = PayloadErrors()
    for index in range(10_000):
        errors.add(("words", index, "start"), "Must be greater than or equal to 0.")

    with pytest.raises(ValidationError) as caught:
        errors.raise_if_any()
    messages = caught.value.messages
    assert isinstance(messages, dict)
    assert len(messages["words"]) == PayloadErrors.LIMIT
    assert messages["_schema"] == ["10000 problems in all; only the first 20 are listed."]


def test_no_errors_raise_nothing() -> None:
    PayloadErrors().raise_if_any()


def test_field_error_builds_the_nested_message() -> None:
    assert field_error(("a", 0, "b"), "Bad.").messages == {"a": {0: {"b": ["Bad."]}}}


def test_item_shape_reports_every_problem_of_an_item() -> None:
    shape = ItemShape(
        required=(("start", "seconds"), ("end", "seconds"), ("text", "text")),
        optional=(("speaker", "label"),),
        start="start",
        end="end",
    )
    errors = PayloadErrors()
    shape.report(errors, ("words", 0), {"start": True, "text": "x", "speaker": 1.5})
    shape.report(errors, ("words", 1), {"start": 2, "end": 1, "text": "x"})
    shape.report(errors, ("words", 2), "hello")

    with pytest.raises(ValidationError) as caught:
        errors.raise_if_any()
    assert caught.value.messages == {
        "words": {
            0: {
                "start": ["Not a valid number of seconds."],
                "end": ["Missing data for required field."],
                "speaker": ["Not a valid string or integer."],
            },
            1: {"end": ["Must not be before start."]},
            2: ["Not a valid object."],
        }
    }


@pytest.mark.parametrize(("value", "channel"), [("0", 0), ("1", 1), (" 1 ", 1), ("", None)])
def test_channel_from_the_url(value: str, channel: int | None) -> None:
    assert channel_from_query({"channel": value}) == channel


def test_no_channel_in_the_url_means_the_file_holds_the_whole_call() -> None:
    assert channel_from_query({"pbx": "asterisk"}) is None


@pytest.mark.parametrize("value", ["2", "-1", "left", "0.0"])
def test_a_channel_other_than_0_or_1_is_refused(value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        channel_from_query({"channel": value})
    assert list(caught.value.messages) == ["channel"]


def test_references_from_metadata_written_as_a_query_string() -> None:
    assert reference_from_query_string("pbx=asterisk&call=1700000000.123") == CallReference(
        pbx="asterisk", pbx_call_id="1700000000.123"
    )
    assert reference_from_query_string("?b24_call_id=externalCall.abc.1") == CallReference(
        b24_call_id="externalCall.abc.1"
    )
    assert reference_from_query_string("InternalOrderNumber 123").is_empty()
    assert reference_from_query_string("order=5").is_empty()
    assert reference_from_query_string(None).is_empty()


def test_references_from_a_mapping_ignore_other_keys_and_non_strings() -> None:
    assert reference_from_mapping({"pbx": " asterisk ", "call": 17, "callback_secret": "x"}) == CallReference(
        pbx="asterisk"
    )


def test_a_body_must_be_a_json_object() -> None:
    assert load_json_object(b'{"a": 1}') == {"a": 1}
    with pytest.raises(ValidationError) as caught:
        load_json_object(b'{"a": "\xff"}')
    assert caught.value.messages == {"_schema": ["The body is not valid JSON (UnicodeDecodeError)."]}


def test_vendor_metadata_names_a_call_with_the_contracts_keys_else_the_short_ones() -> None:
    prefixed = reference_from_metadata({"b24scribe_pbx": "asterisk", "b24scribe_call": "1733.5", "other": "x"})
    assert (prefixed.pbx, prefixed.pbx_call_id, prefixed.b24_call_id) == ("asterisk", "1733.5", None)
    by_id = reference_from_metadata({"b24scribe_b24_call_id": "externalCall.1", "pbx": "generic"})
    assert (by_id.b24_call_id, by_id.pbx) == ("externalCall.1", None)  # the contract's keys win whole
    short = reference_from_metadata({"pbx": "generic", "call": "c-1"})
    assert (short.pbx, short.pbx_call_id) == ("generic", "c-1")
    assert reference_from_metadata(["not", "a", "mapping"]).is_empty()

"""What every fast path (msgspec in front of a marshmallow schema) is tested with: generated
payloads (valid, then edged, junked, dropped or padded with an unknown field) and one check that
the fast path never accepts what the schema refuses nor reads a field differently."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import strategies as st

# Strings no column may hold, or only just: NUL and other controls (C0, DEL, C1), lone surrogates,
# text that is not printable, and lengths past every column.
HOSTILE_TEXT = st.sampled_from(
    ["\x00", "a\x00b", "\ud800", "x\udfff", "\x1b[0m", "\x7f", "\x85", "a\u2028b", "x" * 201]
)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**31 - 1, 2**31, 604_800, 604_801, 2**63, -(2**63) - 1]),
    st.floats(),
    st.text(max_size=4),
    HOSTILE_TEXT,
    st.sampled_from([[], {}, ["a"], {"a": 1}, "1.5", "3"]),
)
# Bodies that are not what json.dumps writes: each fast path must decline them or read them as its schema does.
HOSTILE_BODIES: list[bytes] = [
    b"\xff\xfe",
    b'{"a": "\xff"}',
    b'{"a": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate: json.loads reads it, msgspec does not
    b"[" * 10_000 + b"]" * 10_000,
    b"1" + b"0" * 5000,
    b"1e400",
    b"NaN",
]


def texts(*lengths: int) -> st.SearchStrategy[str]:
    """Strings of these lengths, some not ASCII (the limits count characters)."""
    return st.one_of(*(st.text(alphabet=st.sampled_from("a1+é☎😀 "), min_size=n, max_size=n) for n in lengths))


@st.composite
def changed(
    draw: st.DrawFn,
    valid: dict[str, st.SearchStrategy[Any]],
    edges: dict[str, st.SearchStrategy[Any]],
    required: Sequence[str],
    unknown_names: Sequence[str],
    most_changes: int = 2,
) -> dict[str, Any]:
    """A valid object (the required fields and some others), then up to `most_changes` changes:
    a field at or past its edge, junk, dropped, or an unknown field added."""
    names = sorted(valid)
    chosen = [*required, *draw(st.lists(st.sampled_from(names), unique=True))]
    item = {name: draw(valid[name]) for name in dict.fromkeys(chosen)}
    for _ in range(draw(st.integers(0, most_changes))):
        name = draw(st.sampled_from(names))
        change = draw(st.sampled_from(["edge", "junk", "drop", "unknown"]))
        if change == "edge":
            item[name] = draw(edges[name])
        elif change == "junk":
            item[name] = draw(JUNK)
        elif change == "drop":
            item.pop(name, None)
        else:
            item[draw(st.sampled_from(unknown_names))] = draw(JUNK)
    return item


def assert_fast_path_agrees(
    body: bytes, fast_path: Callable[[bytes], Any], parse: Callable[[bytes], Any], contract: Callable[[bytes], Any]
) -> None:
    """`fast_path` declines the body (None) or reads it exactly as the schema (`contract`) does, and
    `parse` (fast path, else schema) ends as the schema does: the value, or the same errors."""
    expected = contract(body)
    fast = fast_path(body)
    assert fast is None or fast == expected
    assert parse(body) == expected

"""The check every fast path (msgspec in front of a marshmallow schema) must pass on every body."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def assert_fast_path_agrees(
    body: bytes, fast_path: Callable[[bytes], Any], parse: Callable[[bytes], Any], contract: Callable[[bytes], Any]
) -> None:
    """`fast_path` declines the body (None) or reads it exactly as the schema (`contract`) does, and
    `parse` (fast path, else schema) ends as the schema does: the value, or the same errors."""
    expected = contract(body)
    fast = fast_path(body)
    assert fast is None or fast == expected
    assert parse(body) == expected

"""PHP semantics the fake needs to answer like Bitrix24 (its REST server is PHP).

Casts, truthiness, loose comparison and bracket-notation form decoding decide which inputs
Bitrix24 accepts and what it stores, so the fake copies them rather than Python's own rules.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

_PHONE_JUNK = re.compile(r"[^0-9#*+,;]")
_NUMERIC_PREFIX = re.compile(r"[ \t\n\r\v\f]*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NUMERIC_STRING = re.compile(_NUMERIC_PREFIX.pattern + r"[ \t\n\r\v\f]*")


def php_int(value: object) -> int:
    """PHP 8 ``(int)`` cast: floats truncate, strings use their numeric prefix, else 0."""
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else 0
    if isinstance(value, str):
        match = _NUMERIC_PREFIX.match(value)
        if match is None:
            return 0
        text = match.group().strip()
        with contextlib.suppress(ValueError):
            return int(text)
        number = float(text)
        return int(number) if math.isfinite(number) else 0
    if isinstance(value, list | dict):
        return 1 if value else 0
    return 0


def php_float(value: object) -> float:
    """PHP 8 ``(float)`` cast."""
    if isinstance(value, bool | int | float):
        return float(value)
    if isinstance(value, str):
        match = _NUMERIC_PREFIX.match(value)
        return float(match.group().strip()) if match else 0.0
    return 0.0


def php_str(value: object) -> str:
    """PHP string conversion as used in string interpolation."""
    if value is None or value is False:
        return ""
    if value is True:
        return "1"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list | dict):
        return "Array"
    return str(value)


def php_truthy(value: object) -> bool:
    """PHP truthiness: ``"0"`` and ``""`` are false, as are empty arrays."""
    if isinstance(value, str):
        return value not in ("", "0")
    return bool(value)


def php_loosely_equals_int(value: object, number: int) -> bool:
    """PHP 8 ``$value == $number`` for an int ``$number`` (used by ``in_array`` without strict)."""
    if isinstance(value, bool):
        return value == (number != 0)
    if isinstance(value, int | float):
        return value == number
    if isinstance(value, str):
        return _NUMERIC_STRING.fullmatch(value) is not None and float(value) == number
    return False


def strip_phone(value: object) -> str:
    """``CVoxImplantPhone::stripLetters``: keep only ``0-9 # * + , ;``."""
    return _PHONE_JUNK.sub("", php_str(value))


def parse_php_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Decode PHP bracket notation (``MESSAGES[0][SIDE]=User``) into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        _assign_php_key(root, _split_php_key(key), value)
    listified = _listify(root)
    return listified if isinstance(listified, dict) else {}


def _split_php_key(key: str) -> list[str]:
    base, bracket, rest = key.partition("[")
    # PHP turns dots and spaces of the top-level name into underscores.
    parts = [base.replace(".", "_").replace(" ", "_")]
    if bracket:
        parts.extend(re.findall(r"\[([^\]]*)\]", "[" + rest))
    return parts


def _assign_php_key(node: dict[str, Any], path: list[str], value: str) -> None:
    for position, part in enumerate(path):
        key = part if part else _next_php_index(node)
        if position == len(path) - 1:
            node[key] = value
            return
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child


def _next_php_index(node: Mapping[str, Any]) -> str:
    indexes = [int(key) for key in node if key.lstrip("-").isdigit()]
    return str(max(indexes) + 1 if indexes else 0)


def _listify(node: object) -> object:
    """Turn dicts keyed exactly "0".."n-1" (in order) into lists, recursively."""
    if not isinstance(node, dict):
        return node
    converted = {key: _listify(value) for key, value in node.items()}
    if converted and list(converted) == [str(index) for index in range(len(converted))]:
        return list(converted.values())
    return converted

"""Fault injection: scripted answers for the next calls, and reproducible random faults.

Injections answer a method with a given status and body (unprocessed), drop its connection, or
answer it late after performing it; random faults do the same by seeded dice, so a failing run
can be replayed.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fake_bitrix24.protocol import JSON_CONTENT_TYPE, Reply

if TYPE_CHECKING:
    from fake_bitrix24.state import FakeConfig


@dataclass
class Injection:
    """A scripted answer for the next ``remaining`` calls of ``method`` ("*": any)."""

    method: str
    remaining: int
    kind: Literal["answer", "drop", "slow"]
    status: int = 0
    body: object = None
    content_type: str = JSON_CONTENT_TYPE
    seconds: float = 0.0


class FaultDice:
    """Reproducible fault rolls in [0, 1) from a seed (a test tool, not for cryptography)."""

    def __init__(self, seed: int | None) -> None:
        self._seed = ""
        self._rolls = 0
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the sequence; no seed picks a random one."""
        self._seed = secrets.token_hex(8) if seed is None else str(seed)
        self._rolls = 0

    def roll(self) -> float:
        """The next number of the sequence."""
        self._rolls += 1
        text = f"{self._seed}:{self._rolls}".encode()
        digest = hashlib.blake2b(text, digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64


class FaultsMixin:
    """The fault steps of FakeBitrix24's request pipeline (called with its lock held)."""

    config: FakeConfig
    _dice: FaultDice
    _injections: list[Injection]

    def _take_injection(self, method: str) -> Injection | None:
        for injection in self._injections:
            if injection.method in ("*", method):
                injection.remaining -= 1
                if injection.remaining <= 0:
                    self._injections.remove(injection)
                return injection
        return None

    def _injected_reply(self, injection: Injection) -> Reply:
        if injection.kind == "drop":
            return Reply(0, None, drop=True)
        body = injection.body
        if body is None:
            body = _default_error_body(injection.status)
        return Reply(injection.status, body, injection.content_type)

    def _roll_fault(self) -> str:
        config = self.config
        if config.error_rate <= 0 and config.drop_rate <= 0 and config.slow_rate <= 0:
            return ""
        roll = self._dice.roll()
        if roll < config.error_rate:
            return "error"
        if roll < config.error_rate + config.drop_rate:
            return "drop"
        if roll < config.error_rate + config.drop_rate + config.slow_rate:
            return "slow"
        return ""


def _default_error_body(status: int) -> dict[str, Any]:
    known = {
        503: ("QUERY_LIMIT_EXCEEDED", "Too many requests"),
        429: ("OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit."),
        401: ("INVALID_CREDENTIALS", "Invalid request credentials"),
        403: ("WRONG_AUTH_TYPE", "Current authorization type is denied for this method"),
        404: ("ERROR_METHOD_NOT_FOUND", "Method not found!"),
    }
    code, description = known.get(status, ("INTERNAL_SERVER_ERROR", "Internal server error"))
    return {"error": code, "error_description": description}

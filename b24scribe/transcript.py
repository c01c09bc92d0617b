"""The canonical transcript every vendor schema produces, and the roles that decide sides."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal


class Side(enum.StrEnum):
    """Bitrix24's two sides of a call: the portal employee and the customer."""

    USER = "User"
    CLIENT = "Client"

    def other(self) -> Side:
        """The opposite side."""
        return Side.CLIENT if self is Side.USER else Side.USER


class Role(enum.StrEnum):
    """Who a channel or the first speaker is (contract §6.3): a call role or a Bitrix24 side."""

    CALLER = "caller"
    CALLEE = "callee"
    USER = "user"
    CLIENT = "client"

    def side(self, direction: Direction) -> Side:
        """The Bitrix24 side this role is on a call of the given direction."""
        if self is Role.USER:
            return Side.USER
        if self is Role.CLIENT:
            return Side.CLIENT
        caller_is_client = direction is Direction.INBOUND
        if self is Role.CALLER:
            return Side.CLIENT if caller_is_client else Side.USER
        return Side.USER if caller_is_client else Side.CLIENT


class Direction(enum.StrEnum):
    """Which way a call went, seen from the company."""

    INBOUND = "inbound"
    OUTBOUND = "outbound"


UNDECIDED_SPEAKER = "?"  # whisper.cpp's label for "could not tell": turn-taking decides


@dataclass(frozen=True, slots=True)
class Segment:
    """One utterance (or one word, for word-level transcripts), times in seconds from call start.

    Exactly one of `side`, `channel` or `speaker` normally identifies who speaks; `side` wins,
    then `channel`, then `speaker`. `glue` marks a word that attaches to the previous word with
    no space (punctuation in word-level transcripts).
    """

    start: float
    end: float
    text: str
    channel: int | None = None
    speaker: str | None = None
    side: Side | None = None
    glue: bool = False


@dataclass(slots=True)
class Transcript:
    """A vendor's result in our own terms: what the Bitrix24 translation consumes."""

    segments: list[Segment]
    granularity: Literal["segment", "word"] = "segment"
    cost: float | None = None
    cost_currency: str | None = None


@dataclass(slots=True)
class CallReference:
    """Which call a transcript belongs to, as the URL or a vendor's metadata field names it."""

    pbx: str | None = None
    pbx_call_id: str | None = None
    b24_call_id: str | None = None
    # the portal the call is on, where the vendor's metadata says (`b24scribe_portal`): a callback
    # without `?portal=` (one workspace-wide webhook for every portal) still reaches its portal's call
    portal: str | None = None

    def is_empty(self) -> bool:
        """True when nothing names a call."""
        return not (self.pbx_call_id or self.b24_call_id)


@dataclass(slots=True)
class VendorResult:
    """What a vendor schema returns for one callback.

    `status` is `completed` (with a transcript), `failed` (the vendor's reason in
    `failure_reason`; never sent to Bitrix24), or `fetch` (the callback only names a job whose
    result must be fetched from the vendor's API: `fetch_id`).
    """

    status: Literal["completed", "failed", "fetch"]
    transcript: Transcript | None = None
    vendor_job_id: str | None = None
    failure_reason: str | None = None
    fetch_id: str | None = None
    reference: CallReference = field(default_factory=CallReference)

"""The registry of sources: each STT vendor as data.

Adding a vendor touches its schema module (which exports `VENDOR`) and one line here. Every
vendor's parsers are registered wrapped in `checked_vendor_result` (schemas/limits.py): whatever a
vendor module returns, what leaves the registry fits contract §12's ranges and the columns it is stored
in, for callbacks and fetched transcripts alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from b24scribe.transcript import VendorResult
from schemas import (
    assemblyai,
    deepgram,
    fasterwhisper,
    generic_transcript,
    openai,
    revai,
    speechmatics,
    whispercpp,
)
from schemas.limits import checked_vendor_result
from schemas.source import Parser, SttVendor


def _checked_parser(parse: Parser) -> Parser:
    def checked(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
        return checked_vendor_result(parse(raw_body, query))

    checked.__doc__ = parse.__doc__
    return checked


def _checked(vendor: SttVendor) -> SttVendor:
    """The vendor with its parsers' results checked (fails closed: a ValidationError naming the field)."""
    fetch = vendor.fetch and dataclasses.replace(vendor.fetch, parse=_checked_parser(vendor.fetch.parse))
    return dataclasses.replace(vendor, parse=_checked_parser(vendor.parse), fetch=fetch)


STT_VENDORS: dict[str, SttVendor] = {
    vendor.name: _checked(vendor)
    for vendor in (
        generic_transcript.VENDOR,
        deepgram.VENDOR,
        assemblyai.VENDOR,
        revai.VENDOR,
        speechmatics.VENDOR,
        openai.VENDOR,
        whispercpp.VENDOR,
        fasterwhisper.VENDOR,
    )
}

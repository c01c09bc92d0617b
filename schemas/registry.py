"""The registry of sources: every PBX and STT vendor, one line each.

Adding a source touches its module (which exports its `PbxSource` or `SttVendor`) and one line
here. Every parser is registered wrapped in a check of contract §12's ranges (b24scribe/limits.py):
whatever a source module returns, what leaves the registry fits the ranges and the columns it is
stored in, for callbacks and fetched transcripts alike. The app hands `SOURCES` to the core.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from b24scribe.events import CallEvent
from b24scribe.limits import check_call_event, checked_vendor_result
from b24scribe.sources import FetchContext, Parser, PbxSource, Sources, SttVendor
from b24scribe.transcript import VendorResult
from schemas import (
    assemblyai,
    aws,
    azure,
    deepgram,
    elevenlabs,
    fasterwhisper,
    generic_transcript,
    gladia,
    google,
    mango,
    openai,
    pbx_events,
    plivo,
    revai,
    speechmatics,
    telnyx,
    twilio,
    twilio_pbx,
    vonage,
    vosk,
    whispercpp,
    yandex,
    zadarma,
)


def _checked_parser(parse: Parser) -> Parser:
    def checked(raw_body: bytes, query: Mapping[str, str]) -> VendorResult:
        return checked_vendor_result(parse(raw_body, query))

    checked.__doc__ = parse.__doc__
    return checked


def _checked(vendor: SttVendor) -> SttVendor:
    """The vendor with its parsers' results checked (fails closed: a ValidationError naming the field)."""
    fetch = vendor.fetch
    if fetch is not None and fetch.parse is not None:
        fetch = dataclasses.replace(fetch, parse=_checked_parser(fetch.parse))
    if fetch is not None and fetch.run is not None:
        fetch = dataclasses.replace(fetch, run=_checked_run(fetch.run))
    return dataclasses.replace(vendor, parse=_checked_parser(vendor.parse), fetch=fetch)


def _checked_run(run: Callable[[FetchContext], VendorResult]) -> Callable[[FetchContext], VendorResult]:
    def checked(context: FetchContext) -> VendorResult:
        return checked_vendor_result(run(context))

    checked.__doc__ = run.__doc__
    return checked


def _checked_pbx(pbx: PbxSource) -> PbxSource:
    """The PBX with its parser's events checked the same way (unless its parser checks them itself)."""
    if pbx.checks_limits:
        return pbx
    parse = pbx.parse

    def checked(raw_body: bytes, query: Mapping[str, str]) -> CallEvent:
        return check_call_event(parse(raw_body, query))

    checked.__doc__ = parse.__doc__
    return dataclasses.replace(pbx, parse=checked)


def registry(pbxs: tuple[PbxSource, ...], vendors: tuple[SttVendor, ...]) -> Sources:
    """A registry of these sources, every parser checked."""
    return Sources(
        stt={vendor.name: _checked(vendor) for vendor in vendors},
        pbx={pbx.name: _checked_pbx(pbx) for pbx in pbxs},
    )


PBXS: tuple[PbxSource, ...] = (
    pbx_events.GENERIC,
    pbx_events.ASTERISK,
    telnyx.SOURCE,
    plivo.SOURCE,
    mango.SOURCE,
    zadarma.SOURCE,
    vonage.SOURCE,
    twilio_pbx.SOURCE,
)
VENDORS: tuple[SttVendor, ...] = (
    generic_transcript.VENDOR,
    deepgram.VENDOR,
    assemblyai.VENDOR,
    revai.VENDOR,
    speechmatics.VENDOR,
    openai.VENDOR,
    whispercpp.VENDOR,
    fasterwhisper.VENDOR,
    gladia.VENDOR,
    elevenlabs.VENDOR,
    google.VENDOR,
    yandex.VENDOR,
    vosk.VENDOR,
    azure.VENDOR,
    aws.VENDOR,
    twilio.VENDOR,
)

SOURCES = registry(PBXS, VENDORS)
STT_VENDORS: Mapping[str, SttVendor] = SOURCES.stt
PBX_SOURCES: Mapping[str, PbxSource] = SOURCES.pbx

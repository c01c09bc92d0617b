"""The registry of sources: each STT vendor as data (STYLE 4).

Adding a vendor touches its schema module (which exports `VENDOR`) and one line here.
"""

from __future__ import annotations

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
from schemas.source import SttVendor

STT_VENDORS: dict[str, SttVendor] = {
    vendor.name: vendor
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

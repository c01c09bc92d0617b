"""faster-whisper segments posted by the user's script (`POST /hooks/stt/fasterwhisper`).

Accepted: a JSON list of segment dicts (`[s._asdict() for s in segments]`: `start`, `end` in
seconds, `text`), the same under `{"segments": [...]}`, or NamedTuples dumped as JSON arrays
(`[id, seek, start, end, text, …]`). faster-whisper has no speakers: post one file per channel
with `?channel=0|1`. The translation lives with the Whisper family in `schemas.openai`.
"""

from __future__ import annotations

from b24scribe.sources import SttVendor
from schemas.openai import parse_fasterwhisper

VENDOR = SttVendor(
    name="fasterwhisper", parse=parse_fasterwhisper, summary="faster-whisper segments, posted by your script"
)

"""whisper.cpp output posted by the user's script (`POST /hooks/stt/whispercpp`).

Accepted: the CLI's `-oj` JSON (`transcription[]`, `offsets` in milliseconds, `--diarize`
speakers "0"/"1" as stereo channels and "?" as undecided, `--tinydiarize` turns) or the bundled
server's `verbose_json`. The translation lives with the rest of the Whisper family in
`schemas.openai`, which documents both shapes.
"""

from __future__ import annotations

from b24scribe.sources import SttVendor
from schemas.openai import parse_whispercpp

VENDOR = SttVendor(name="whispercpp", parse=parse_whispercpp, summary="whisper.cpp JSON output, posted by your script")

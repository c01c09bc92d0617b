"""A one-hour Gladia v2 pre-recorded callback for the translation benchmark (bench/translation.py).

A stereo call (two distinct channels) of ~10,000 words: one utterance per turn with its words, as
`payload.transcription.utterances[]`, and the call named in `custom_metadata`.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.translation import WORDS, _turns  # noqa: E402


def gladia_payload(words: int = WORDS, seed: int = 7) -> bytes:
    """Gladia callback, stereo: utterances (float seconds, 0-based channel) with their words."""
    rng = random.Random(seed)
    utterances: list[dict[str, Any]] = []
    for channel, _start, turn in _turns(rng, words):
        items = [
            {
                "word": (" " if position else "") + word + punctuation,
                "start": start,
                "end": end,
                "confidence": round(rng.uniform(0.6, 1.0), 3),
            }
            for position, (word, start, end, punctuation) in enumerate(turn)
        ]
        utterances.append(
            {
                "text": "".join(item["word"] for item in items).strip(),
                "language": "en",
                "start": items[0]["start"],
                "end": items[-1]["end"],
                "confidence": 0.94,
                "channel": channel,
                "words": items,
            }
        )
    body = {
        "id": "45463597-20b7-4af7-b3b3-f5fb778203ab",
        "event": "transcription.success",
        "payload": {
            "metadata": {
                "audio_duration": 3600.0,
                "number_of_distinct_channels": 2,
                "billing_time": 7200.0,
                "transcription_time": 95.2,
            },
            "transcription": {
                "full_transcript": " ".join(utterance["text"] for utterance in utterances),
                "languages": ["en"],
                "utterances": utterances,
            },
        },
        "custom_metadata": {"b24scribe_pbx": "asterisk", "b24scribe_call": "1700000000.123"},
    }
    return json.dumps(body).encode()


if __name__ == "__main__":
    from b24scribe.messages import SideRules, build_messages  # noqa: E402
    from bench.translation import _best_of_each  # noqa: E402
    from schemas import gladia  # noqa: E402

    payload = gladia_payload()
    loads, translate = _best_of_each(
        lambda: json.loads(payload), lambda: build_messages(gladia.parse(payload, {}).transcript, SideRules()), 15
    )
    print(
        f"gladia: {len(payload)} bytes, json.loads {loads * 1000:.2f} ms, translate {translate * 1000:.2f} ms, "
        f"ratio {translate / loads:.2f}"
    )

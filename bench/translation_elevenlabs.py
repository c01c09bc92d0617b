"""A one-hour ElevenLabs Speech-to-Text webhook for the translation benchmark (bench/translation.py).

A diarized mono call of ~10,000 words: the `speech_to_text_transcription` event whose transcription
lists every word (punctuation attached, `speaker_0`/`speaker_1`) with a `spacing` item between words,
and the call named in `webhook_metadata`.
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


def elevenlabs_payload(words: int = WORDS, seed: int = 8) -> bytes:
    """ElevenLabs webhook event, diarized mono: words and spacing items (float seconds)."""
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    for channel, _start, turn in _turns(rng, words):
        speaker = f"speaker_{channel}"
        for word, start, end, punctuation in turn:
            if items:
                previous_end = items[-1]["end"]
                items.append(
                    {
                        "text": " ",
                        "start": previous_end,
                        "end": start,
                        "type": "spacing",
                        "speaker_id": speaker,
                        "logprob": 0.0,
                    }
                )
            items.append(
                {
                    "text": word + punctuation,
                    "start": start,
                    "end": end,
                    "type": "word",
                    "speaker_id": speaker,
                    "logprob": round(-rng.uniform(0.0, 0.6), 4),
                }
            )
    body = {
        "type": "speech_to_text_transcription",
        "event_timestamp": 1764066030,
        "data": {
            "request_id": "rq_5Hk2v9QzT1b7",
            "webhook_metadata": {"b24scribe_pbx": "asterisk", "b24scribe_call": "1700000000.123"},
            "transcription": {
                "language_code": "eng",
                "language_probability": 0.98,
                "text": "".join(item["text"] for item in items),
                "words": items,
                "transcription_id": "tr_9c1f2a7d",
                "audio_duration_secs": 3600.0,
            },
        },
    }
    return json.dumps(body).encode()


if __name__ == "__main__":
    from b24scribe.messages import SideRules, build_messages  # noqa: E402
    from bench.translation import _best_of_each  # noqa: E402
    from schemas import elevenlabs  # noqa: E402

    payload = elevenlabs_payload()
    loads, translate = _best_of_each(
        lambda: json.loads(payload), lambda: build_messages(elevenlabs.parse(payload, {}).transcript, SideRules()), 15
    )
    print(
        f"elevenlabs: {len(payload)} bytes, json.loads {loads * 1000:.2f} ms, translate {translate * 1000:.2f} ms, "
        f"ratio {translate / loads:.2f}"
    )

"""A one-hour Twilio Conversational Intelligence transcript for the translation benchmark (bench/translation.py).

A dual-channel call of ~10,000 words as `GET /v2/Transcripts/{sid}/Sentences` answers it, all on one
page: a sentence per turn (and per sentence end within a turn), `media_channel` 1/2, `start_time` and
`end_time` as strings of seconds, `sid`, `confidence`, and `words`: each word's text, its times null
because b24scribe does not ask for `WordTimestamps` (the shape of the API reference's example), and `meta`.
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

SID = "GT3f1c8e2a9b7d4c6e8f0a1b2c3d4e5f6a"


def twilio_payload(words: int = WORDS, seed: int = 12) -> bytes:
    """Twilio Intelligence sentences of a stereo call (string seconds, channels from 1), one page."""
    rng = random.Random(seed)
    sentences: list[dict[str, Any]] = []
    for channel, _start, turn in _turns(rng, words):
        sentence: list[tuple[str, float, float, str]] = []
        for position, item in enumerate(turn):
            sentence.append(item)
            if item[3] in (".", "?") or position == len(turn) - 1:
                sentences.append(
                    {
                        "media_channel": channel + 1,
                        "sentence_index": len(sentences),
                        "start_time": f"{sentence[0][1]:.2f}",
                        "end_time": f"{sentence[-1][2]:.2f}",
                        "transcript": " ".join(word + punctuation for word, _s, _e, punctuation in sentence),
                        "sid": f"GX{len(sentences):032x}",
                        "confidence": f"{rng.uniform(0.6, 1.0):.4f}",
                        "words": [
                            {"word": word + punctuation, "start_time": None, "end_time": None}
                            for word, _s, _e, punctuation in sentence
                        ],
                    }
                )
                sentence = []
    base = f"https://intelligence.twilio.com/v2/Transcripts/{SID}/Sentences"
    body = {
        "sentences": sentences,
        "meta": {
            "page": 0,
            "page_size": 5000,
            "first_page_url": f"{base}?PageSize=5000&Page=0",
            "previous_page_url": None,
            "url": f"{base}?PageSize=5000&Page=0",
            "next_page_url": None,
            "key": "sentences",
        },
    }
    return json.dumps(body).encode()


if __name__ == "__main__":
    from b24scribe.messages import SideRules, build_messages  # noqa: E402
    from bench.translation import _best_of_each  # noqa: E402
    from schemas import twilio  # noqa: E402

    payload = twilio_payload()
    result = twilio.parse_sentences(payload, {})
    assert result.transcript is not None
    loads, translate = _best_of_each(
        lambda: json.loads(payload),
        lambda: build_messages(twilio.parse_sentences(payload, {}).transcript, SideRules()),  # type: ignore[arg-type]
        15,
    )
    print(
        f"twilio: {len(payload)} bytes, {len(result.transcript.segments)} sentences, json.loads "
        f"{loads * 1000:.2f} ms, translate {translate * 1000:.2f} ms, ratio {translate / loads:.2f}"
    )

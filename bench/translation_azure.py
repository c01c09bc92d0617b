"""A one-hour Azure AI Speech batch transcription result file for the translation benchmark
(bench/translation.py).

A stereo call of ~10,000 words as the `kind: Transcription` result file is: `combinedRecognizedPhrases`
per channel and one `recognizedPhrases` item per turn, sorted by channel as Azure writes them, each
with ISO 8601 and tick times and an `nBest` of one alternative (lexical, itn, maskedITN, display).
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

TICKS = 10_000_000


def azure_payload(words: int = WORDS, seed: int = 11) -> bytes:
    """Azure batch transcription result file, stereo: one phrase per turn (ticks = 100 ns)."""
    rng = random.Random(seed)
    phrases: list[dict[str, Any]] = []
    for channel, _start, turn in _turns(rng, words):
        start, end = turn[0][1], turn[-1][2]
        display = " ".join(word + punctuation for word, _s, _e, punctuation in turn)
        lexical = " ".join(word.lower() for word, _s, _e, _p in turn)
        phrases.append(
            {
                "recognitionStatus": "Success",
                "channel": channel,
                "offset": f"PT{start:.2f}S",
                "duration": f"PT{end - start:.2f}S",
                "offsetInTicks": float(round(start * TICKS)),
                "durationInTicks": float(round((end - start) * TICKS)),
                "nBest": [
                    {
                        "confidence": round(rng.uniform(0.6, 0.99), 7),
                        "lexical": lexical,
                        "itn": lexical,
                        "maskedITN": lexical,
                        "display": display,
                    }
                ],
            }
        )
    phrases.sort(key=lambda phrase: phrase["channel"])  # Azure sorts stereo phrases by channel
    combined = [
        {
            "channel": channel,
            "lexical": " ".join(p["nBest"][0]["lexical"] for p in phrases if p["channel"] == channel),
            "itn": "",
            "maskedITN": "",
            "display": " ".join(p["nBest"][0]["display"] for p in phrases if p["channel"] == channel),
        }
        for channel in (0, 1)
    ]
    body = {
        "source": "https://example.blob.core.windows.net/calls/1700000000.123.wav",
        "timestamp": "2025-05-24T13:37:05Z",
        "durationInTicks": 3600 * TICKS,
        "durationMilliseconds": 3_600_000,
        "duration": "PT1H",
        "combinedRecognizedPhrases": combined,
        "recognizedPhrases": phrases,
    }
    return json.dumps(body).encode()


if __name__ == "__main__":
    from b24scribe.messages import SideRules, build_messages  # noqa: E402
    from bench.translation import _best_of_each  # noqa: E402
    from schemas.registry import SOURCES  # noqa: E402

    payload = azure_payload()
    parse = SOURCES.stt["azure"].parse
    loads, translate = _best_of_each(
        lambda: json.loads(payload),
        lambda: build_messages(parse(payload, {}).transcript, SideRules()),  # type: ignore[arg-type]
        15,
    )
    print(
        f"azure: {len(payload)} bytes, json.loads {loads * 1000:.2f} ms, translate {translate * 1000:.2f} ms, "
        f"ratio {translate / loads:.2f}"
    )

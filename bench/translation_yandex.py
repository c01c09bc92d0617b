"""Translation cost of a one-hour Yandex SpeechKit call, against `json.loads` of the same bytes.

`yandex_payload` is the finished v2 long-running operation of a stereo call: one chunk per turn with
its words (Duration strings with SpeechKit's float noise, `"0.879999999s"`), `channelTag` "1"/"2".

    python bench/translation_yandex.py     # prints the ratio; exits 1 if it is over 2.0
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from b24scribe.messages import SideRules, build_messages  # noqa: E402
from bench.translation import TARGET_RATIO, WORDS, _best_of_each, _turns  # noqa: E402
from schemas import yandex  # noqa: E402


def _noisy(seconds: float) -> str:
    """A Duration as SpeechKit writes it: a float just below the value, `"0.879999999s"`."""
    return f"{max(seconds - 1e-9, 0.0):.9f}s"


def yandex_payload(words: int = WORDS, seed: int = 9) -> bytes:
    """A stereo call: one chunk per turn and channel, every word timed."""
    rng = random.Random(seed)
    chunks: list[dict[str, Any]] = []
    for channel, _start, turn in _turns(rng, words):
        items = [
            {"startTime": _noisy(start), "endTime": _noisy(end), "word": word.lower(), "confidence": 1}
            for word, start, end, _punctuation in turn
        ]
        chunks.append(
            {
                "alternatives": [{"words": items, "text": " ".join(item["word"] for item in items), "confidence": 1}],
                "channelTag": str(channel + 1),
            }
        )
    body = {
        "done": True,
        "response": {
            "@type": "type.googleapis.com/yandex.cloud.ai.stt.v2.LongRunningRecognitionResponse",
            "chunks": chunks,
        },
        "id": "e03sup6d5h1qr2kvtbe5",
        "createdAt": "2026-11-25T10:20:29Z",
        "createdBy": "ajes08feato8gyw6ztfs",
        "modifiedAt": "2026-11-25T10:41:36Z",
    }
    return json.dumps(body, ensure_ascii=False).encode()


def main() -> int:
    body = yandex_payload()

    def translate() -> object:
        result = yandex.parse(body, {})
        assert result.transcript is not None
        return build_messages(result.transcript, SideRules())

    loads, translated = _best_of_each(lambda: json.loads(body), translate, 15)
    ratio = translated / loads
    print(
        f"yandex {len(body)} bytes",
        f"json.loads {loads * 1000:.2f} ms",
        f"translate {translated * 1000:.2f} ms",
        f"ratio {ratio:.2f}",
    )
    return 1 if ratio > TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())

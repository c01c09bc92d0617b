"""Translation cost of a one-hour Vosk call, against `json.loads` of the same bytes.

`vosk_payload` is one channel's list of Vosk results (`SetWords(True)`): one result per utterance of
that side with its words (`conf`, `start`, `end`, `word`), ending in the empty final result. Each
channel is its own file (posted with `?channel=0|1`); this one speaks about `words` words of a call
of twice as many.

    python bench/translation_vosk.py       # prints the ratio; exits 1 if it is over 2.0
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
from schemas import vosk  # noqa: E402


def vosk_payload(words: int = WORDS, seed: int = 10, channel: int = 0) -> bytes:
    """One channel's results of a one-hour call, lowercase words without punctuation."""
    rng = random.Random(seed)
    results: list[dict[str, Any]] = []
    for turn_channel, _start, turn in _turns(rng, 2 * words):  # this channel speaks about half
        if turn_channel != channel:
            continue
        items = [
            {"conf": round(rng.uniform(0.5, 1.0), 6), "end": end, "start": start, "word": word.lower()}
            for word, start, end, _punctuation in turn
        ]
        results.append({"result": items, "text": " ".join(item["word"] for item in items)})
    results.append({"text": ""})
    return json.dumps(results, ensure_ascii=False).encode()


def main() -> int:
    body = vosk_payload()

    def translate() -> object:
        result = vosk.parse(body, {"channel": "0"})
        assert result.transcript is not None
        return build_messages(result.transcript, SideRules())

    loads, translated = _best_of_each(lambda: json.loads(body), translate, 15)
    ratio = translated / loads
    print(
        f"vosk {len(body)} bytes",
        f"json.loads {loads * 1000:.2f} ms",
        f"translate {translated * 1000:.2f} ms",
        f"ratio {ratio:.2f}",
    )
    return 1 if ratio > TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())

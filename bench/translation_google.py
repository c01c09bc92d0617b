"""Translation cost of a one-hour Google Speech-to-Text call, against `json.loads` of the same bytes.

`google_payload` is the finished v1 long-running operation of a stereo call recognised per channel
(`enableSeparateRecognitionPerChannel`, `enableWordTimeOffsets`, automatic punctuation): one result
per turn with its words, Duration strings, 1-based `channelTag`. `google_diarized_payload` is a mono
call with speaker diarization: the per-turn results plus the final result repeating every word with
its speaker tag (what Google sends). Both go into bench/translation.py's CASES the same way.

    python bench/translation_google.py     # prints both ratios; exits 1 if one is over 2.0
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
from schemas import google  # noqa: E402


def _duration(seconds: float) -> str:
    """A protobuf JSON Duration as Google writes it: `"4s"`, `"1.300s"`."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{text}s" if "." not in text else f"{seconds:.3f}s"


def _operation(results: list[dict[str, Any]]) -> bytes:
    body = {
        "name": "4517398062171658425",
        "metadata": {
            "@type": "type.googleapis.com/google.cloud.speech.v1.LongRunningRecognizeMetadata",
            "progressPercent": 100,
            "startTime": "2026-11-25T10:20:30.123456Z",
            "lastUpdateTime": "2026-11-25T10:41:02.654321Z",
            "uri": "gs://acme-calls/1700000000.123.wav",
        },
        "done": True,
        "response": {
            "@type": "type.googleapis.com/google.cloud.speech.v1.LongRunningRecognizeResponse",
            "results": results,
            "totalBilledTime": "3600s",
            "requestId": "8307046453523117011",
        },
    }
    return json.dumps(body).encode()


def google_payload(words: int = WORDS, seed: int = 7) -> bytes:
    """A stereo call, one result per turn and channel, every word timed."""
    rng = random.Random(seed)
    results: list[dict[str, Any]] = []
    for channel, _start, turn in _turns(rng, words):
        items = [
            {"startTime": _duration(start), "endTime": _duration(end), "word": word + punctuation}
            for word, start, end, punctuation in turn
        ]
        results.append(
            {
                "alternatives": [
                    {
                        "transcript": " ".join(item["word"] for item in items),
                        "confidence": round(rng.uniform(0.7, 0.99), 8),
                        "words": items,
                    }
                ],
                "channelTag": channel + 1,
                "resultEndTime": _duration(turn[-1][2] + 0.2),
                "languageCode": "en-us",
            }
        )
    return _operation(results)


def google_diarized_payload(words: int = WORDS, seed: int = 8) -> bytes:
    """A mono call with diarization: per-turn results, then every word again with its speaker."""
    rng = random.Random(seed)
    results: list[dict[str, Any]] = []
    tagged: list[dict[str, Any]] = []
    for speaker, _start, turn in _turns(rng, words):
        items = [
            {"startTime": _duration(start), "endTime": _duration(end), "word": word + punctuation}
            for word, start, end, punctuation in turn
        ]
        results.append(
            {
                "alternatives": [
                    {"transcript": " ".join(item["word"] for item in items), "confidence": 0.91, "words": items}
                ],
                "resultEndTime": _duration(turn[-1][2] + 0.2),
                "languageCode": "en-us",
            }
        )
        tagged.extend({**item, "speakerTag": speaker + 1, "speakerLabel": str(speaker + 1)} for item in items)
    results.append({"alternatives": [{"words": tagged}], "languageCode": "en-us"})
    return _operation(results)


def main() -> int:
    over = False
    for name, make in (("google", google_payload), ("google diarized", google_diarized_payload)):
        body = make()

        def translate(body: bytes = body) -> object:
            result = google.parse(body, {})
            assert result.transcript is not None
            return build_messages(result.transcript, SideRules())

        loads, translated = _best_of_each(lambda body=body: json.loads(body), translate, 15)  # type: ignore[misc]
        ratio = translated / loads
        over = over or ratio > TARGET_RATIO
        print(
            f"{name:<16} {len(body)} bytes",
            f"json.loads {loads * 1000:.2f} ms",
            f"translate {translated * 1000:.2f} ms",
            f"ratio {ratio:.2f}",
        )
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())

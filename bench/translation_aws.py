"""A one-hour AWS Transcribe output for the translation benchmark (bench/translation.py).

A stereo call of ~10,000 words with channel identification, as Transcribe writes its output file:
`results.items` (an `id`, `type` pronunciation with start/end times as STRINGS, punctuation items
without times, `alternatives[0]` with a string `confidence`, `channel_label` `ch_0`/`ch_1`), the same
items again per channel under `results.channel_labels`, and the whole text in `results.transcripts`.
`channel_labels=False` leaves the per-channel copy out (a smaller file, the harder ratio).
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


def aws_payload(words: int = WORDS, seed: int = 9, channel_labels: bool = True) -> bytes:
    """AWS Transcribe output JSON, stereo (ChannelIdentification): string times, punctuation items."""
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    per_channel: list[list[dict[str, Any]]] = [[], []]
    for channel, _start, turn in _turns(rng, words):
        label = f"ch_{channel}"
        for word, start, end, punctuation in turn:
            item = {
                "id": len(items),
                "channel_label": label,
                "type": "pronunciation",
                "alternatives": [{"confidence": f"{rng.uniform(0.6, 1.0):.4f}", "content": word}],
                "start_time": f"{start:.3f}",
                "end_time": f"{end:.3f}",
            }
            items.append(item)
            per_channel[channel].append(item)
            if punctuation:
                mark = {
                    "id": len(items),
                    "channel_label": label,
                    "type": "punctuation",
                    "alternatives": [{"confidence": "0.0", "content": punctuation}],
                }
                items.append(mark)
                per_channel[channel].append(mark)
    results: dict[str, Any] = {
        "transcripts": [{"transcript": " ".join(str(item["alternatives"][0]["content"]) for item in items)}],
        "items": items,
    }
    if channel_labels:
        results["channel_labels"] = {
            "channels": [{"channel_label": f"ch_{n}", "items": per_channel[n]} for n in (0, 1)],
            "number_of_channels": 2,
        }
    body = {"jobName": "b24-bench-9f3e", "accountId": "111122223333", "status": "COMPLETED", "results": results}
    return json.dumps(body).encode()


if __name__ == "__main__":
    from b24scribe.messages import SideRules, build_messages  # noqa: E402
    from bench.translation import _best_of_each  # noqa: E402
    from schemas import aws  # noqa: E402

    for with_copy in (True, False):
        payload = aws_payload(channel_labels=with_copy)
        loads, translate = _best_of_each(
            lambda payload=payload: json.loads(payload),  # type: ignore[misc]
            lambda payload=payload: build_messages(aws.parse(payload, {}).transcript, SideRules()),  # type: ignore[misc, union-attr]
            15,
        )
        print(
            f"aws (channel_labels={with_copy}): {len(payload)} bytes, json.loads {loads * 1000:.2f} ms, "
            f"translate {translate * 1000:.2f} ms, ratio {translate / loads:.2f}"
        )

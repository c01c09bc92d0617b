"""Translation cost of a one-hour call per STT vendor, against `json.loads` of the same bytes.

For each vendor a realistic payload of ~10,000 words is generated (deterministic seed): Deepgram
multichannel with utterances and words, Speechmatics json-v2 words, an AssemblyAI fetched transcript
with words and utterances, Rev.ai monologues, OpenAI verbose_json with segments and words, and the
second wave's (Google stereo and diarized mono, Yandex, one Vosk channel, Gladia, ElevenLabs words,
AWS Transcribe output, an Azure result file, Twilio's fetched sentences).
`translate` is the vendor's `parse(body, query)` (which decodes the JSON itself) followed by
`build_messages` with the default SideRules. Target: translate ≤ 2.0 × json.loads (a hard limit).

    python bench/translation.py            # prints the table; exits 1 if a ratio is over target
"""

from __future__ import annotations

import gc
import json
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from b24scribe.messages import SideRules, build_messages  # noqa: E402
from b24scribe.transcript import VendorResult  # noqa: E402
from schemas import assemblyai, deepgram, generic_transcript, openai, revai, speechmatics  # noqa: E402

TARGET_RATIO = 2.0
WORDS = 10_000
RUNS = 15

_SAMPLE_SPEECH = (
    "hello thank you for calling how can I help today my order number is not arrived yet "
    "could you please check the delivery status of course one moment let me see "
    "the parcel left our warehouse on Monday and should reach you tomorrow morning "
    "that is great news Привет спасибо заказ доставка завтра"
)
_VOCABULARY = tuple(_SAMPLE_SPEECH.split())
_PUNCTUATION = (".", ",", "?")


def _turns(rng: random.Random, words: int) -> list[tuple[int, float, list[tuple[str, float, float, str]]]]:
    """A conversation: turns of (channel, start, words of (word, start, end, punctuation))."""
    turns: list[tuple[int, float, list[tuple[str, float, float, str]]]] = []
    clock = 0.3
    channel = 0
    produced = 0
    while produced < words:
        count = min(rng.randint(3, 25), words - produced)
        turn: list[tuple[str, float, float, str]] = []
        turn_start = clock
        for position in range(count):
            duration = rng.uniform(0.12, 0.45)
            punctuation = ""
            if position == count - 1:
                punctuation = rng.choice(_PUNCTUATION)
            elif rng.random() < 0.08:
                punctuation = ","
            turn.append((rng.choice(_VOCABULARY), round(clock, 2), round(clock + duration, 2), punctuation))
            clock += duration + rng.uniform(0.0, 0.15)
        turns.append((channel, turn_start, turn))
        produced += count
        clock += rng.uniform(0.2, 1.5)
        channel = 1 - channel
    return turns


def deepgram_payload(words: int = WORDS, seed: int = 1) -> bytes:
    """Deepgram multichannel + diarize + utterances: words per channel and utterances."""
    rng = random.Random(seed)
    channel_words: list[list[dict[str, Any]]] = [[], []]
    utterances: list[dict[str, Any]] = []
    for channel, _start, turn in _turns(rng, words):
        items: list[dict[str, Any]] = [
            {
                "word": word.lower(),
                "start": start,
                "end": end,
                "confidence": round(rng.uniform(0.6, 1.0), 4),
                "punctuated_word": word + punctuation,
                "speaker": 0,
                "speaker_confidence": round(rng.uniform(0.3, 1.0), 4),
            }
            for word, start, end, punctuation in turn
        ]
        channel_words[channel].extend(items)
        utterances.append(
            {
                "start": items[0]["start"],
                "end": items[-1]["end"],
                "confidence": 0.97,
                "channel": channel,
                "transcript": " ".join(item["punctuated_word"] for item in items),
                "words": items,
                "speaker": 0,
                "id": f"{len(utterances):08x}-0000-4000-8000-000000000000",
            }
        )
    utterances.sort(key=lambda utterance: (utterance["channel"], utterance["start"]))
    body = {
        "metadata": {
            "transaction_key": "deprecated",
            "request_id": "7b9c3a52-2f0e-4f57-9d2b-3c6a1d0e8f11",
            "sha256": "0" * 64,
            "created": "2026-11-25T10:20:30.000Z",
            "duration": 3600.0,
            "channels": 2,
            "models": ["3b3aabe4-608a-46ac-9585-7960a25daf1a"],
            "extra": {"pbx": "asterisk", "call": "1700000000.123"},
        },
        "results": {
            "channels": [
                {
                    "alternatives": [
                        {
                            "transcript": " ".join(word["punctuated_word"] for word in words_),
                            "confidence": 0.98,
                            "words": words_,
                        }
                    ]
                }
                for words_ in channel_words
            ],
            "utterances": utterances,
        },
    }
    return json.dumps(body).encode()


def speechmatics_payload(words: int = WORDS, seed: int = 2) -> bytes:
    """Speechmatics json-v2 with channel diarization: words and punctuation items."""
    rng = random.Random(seed)
    results: list[dict[str, Any]] = []
    for channel, _start, turn in _turns(rng, words):
        label = f"channel_{channel + 1}"
        for word, start, end, punctuation in turn:
            results.append(
                {
                    "alternatives": [
                        {"confidence": round(rng.uniform(0.6, 1.0), 2), "content": word, "language": "en"}
                    ],
                    "channel": label,
                    "end_time": end,
                    "start_time": start,
                    "type": "word",
                }
            )
            if punctuation:
                results.append(
                    {
                        "alternatives": [{"confidence": 1, "content": punctuation, "language": "en"}],
                        "attaches_to": "previous",
                        "channel": label,
                        "end_time": end,
                        "is_eos": punctuation != ",",
                        "start_time": end,
                        "type": "punctuation",
                    }
                )
    results.sort(key=lambda item: item["start_time"])
    body = {
        "format": "2.9",
        "job": {
            "created_at": "2026-11-25T10:20:30.000Z",
            "data_name": "call.wav",
            "duration": 3600,
            "id": "r6sr3jlzjj",
            "tracking": {"reference": "pbx=asterisk&call=1700000000.123"},
        },
        "metadata": {
            "created_at": "2026-11-25T10:40:30.000Z",
            "type": "transcription",
            "transcription_config": {"language": "en", "diarization": "channel"},
        },
        "results": results,
    }
    return json.dumps(body).encode()


def assemblyai_payload(words: int = WORDS, seed: int = 3) -> bytes:
    """An AssemblyAI fetched transcript with multichannel utterances and words (ms)."""
    rng = random.Random(seed)
    all_words: list[dict[str, Any]] = []
    utterances: list[dict[str, Any]] = []
    for channel, _start, turn in _turns(rng, words):
        items: list[dict[str, Any]] = [
            {
                "text": word + punctuation,
                "start": round(start * 1000),
                "end": round(end * 1000),
                "confidence": round(rng.uniform(0.6, 1.0), 4),
                "speaker": str(channel + 1),
                "channel": str(channel + 1),
            }
            for word, start, end, punctuation in turn
        ]
        all_words.extend(items)
        utterances.append(
            {
                "confidence": 0.95,
                "start": items[0]["start"],
                "end": items[-1]["end"],
                "text": " ".join(item["text"] for item in items),
                "words": items,
                "speaker": str(channel + 1),
                "channel": str(channel + 1),
            }
        )
    body = {
        "id": "5551722-f677-48a6-9287-39c0aafd9ac1",
        "status": "completed",
        "language_code": "en_us",
        "audio_url": "https://pbx.example/rec/1700000000.123.wav",
        "text": " ".join(word["text"] for word in all_words),
        "words": all_words,
        "utterances": utterances,
        "confidence": 0.93,
        "audio_duration": 3600,
        "multichannel": True,
        "audio_channels": 2,
        "webhook_url": "https://b24scribe.example/hooks/stt/assemblyai?pbx=asterisk&call=1700000000.123",
        "error": None,
    }
    return json.dumps(body).encode()


def revai_payload(words: int = WORDS, seed: int = 4) -> bytes:
    """A Rev.ai transcript: monologues whose punct elements carry punctuation and spaces."""
    rng = random.Random(seed)
    monologues: list[dict[str, Any]] = []
    for channel, _start, turn in _turns(rng, words):
        elements: list[dict[str, Any]] = []
        for position, (word, start, end, punctuation) in enumerate(turn):
            if position:
                elements.append({"type": "punct", "value": " "})
            elements.append(
                {"type": "text", "value": word, "ts": start, "end_ts": end, "confidence": round(rng.random(), 2)}
            )
            if punctuation:
                elements.append({"type": "punct", "value": punctuation})
        monologues.append({"speaker": channel, "elements": elements})
    return json.dumps({"monologues": monologues}).encode()


def openai_payload(words: int = WORDS, seed: int = 5) -> bytes:
    """OpenAI verbose_json of one channel's file: segments (with tokens) and words."""
    rng = random.Random(seed)
    segments: list[dict[str, Any]] = []
    all_words: list[dict[str, Any]] = []
    for _channel, _start, turn in _turns(rng, words):
        text = "".join(f" {word}{punctuation}" for word, _s, _e, punctuation in turn)
        segments.append(
            {
                "id": len(segments),
                "seek": len(segments) * 3000,
                "start": turn[0][1],
                "end": turn[-1][2],
                "text": text,
                "tokens": [rng.randint(0, 51000) for _ in turn],
                "temperature": 0.0,
                "avg_logprob": -0.21,
                "compression_ratio": 1.4,
                "no_speech_prob": 0.01,
            }
        )
        all_words.extend({"word": word, "start": start, "end": end} for word, start, end, _p in turn)
    body = {
        "task": "transcribe",
        "language": "english",
        "duration": 3600.0,
        "text": "".join(segment["text"] for segment in segments),
        "segments": segments,
        "words": all_words,
        "usage": {"type": "duration", "seconds": 3600},
    }
    return json.dumps(body).encode()


def generic_payload(words: int = WORDS, seed: int = 6) -> bytes:
    """Our generic format (contract §3.2): one segment per turn, its channel, and the cost."""
    rng = random.Random(seed)
    segments = [
        {
            "start": turn[0][1],
            "end": turn[-1][2],
            "text": " ".join(f"{word}{punctuation}" for word, _s, _e, punctuation in turn),
            "channel": channel,
        }
        for channel, _start, turn in _turns(rng, words)
    ]
    return json.dumps({"segments": segments, "cost": 0.25, "cost_currency": "USD"}).encode()


Parser = Callable[[bytes, Mapping[str, str]], VendorResult]
Case = tuple[str, Parser, Callable[[], bytes], Mapping[str, str]]


def cases() -> tuple[Case, ...]:
    """Every vendor's case: the first wave's generators here, the second wave's in bench/translation_<vendor>.py
    (imported here, as they import this module's WORDS and turns)."""
    from bench.translation_aws import aws_payload
    from bench.translation_azure import azure_payload
    from bench.translation_elevenlabs import elevenlabs_payload
    from bench.translation_gladia import gladia_payload
    from bench.translation_google import google_diarized_payload, google_payload
    from bench.translation_twilio import twilio_payload
    from bench.translation_vosk import vosk_payload
    from bench.translation_yandex import yandex_payload
    from schemas import aws, azure, elevenlabs, gladia, google, twilio, vosk, yandex

    return (
        ("deepgram", deepgram.parse, deepgram_payload, {}),
        ("speechmatics", speechmatics.parse, speechmatics_payload, {"status": "success"}),
        ("assemblyai", assemblyai.parse_transcript, assemblyai_payload, {}),
        ("revai", revai.parse_transcript, revai_payload, {"speaker_channels_count": "2"}),
        ("openai", openai.parse, openai_payload, {"channel": "0"}),
        ("generic", generic_transcript.parse, generic_payload, {}),
        ("google", google.parse, google_payload, {}),
        ("google mono", google.parse, google_diarized_payload, {}),
        ("yandex", yandex.parse, yandex_payload, {}),
        ("vosk", vosk.parse, vosk_payload, {"channel": "0"}),
        ("gladia", gladia.parse, gladia_payload, {}),
        ("elevenlabs", elevenlabs.parse, elevenlabs_payload, {}),
        ("aws", aws.parse, aws_payload, {}),
        ("azure", azure.parse, azure_payload, {}),  # the result file, posted as is or fetched
        ("twilio", twilio.parse_sentences, twilio_payload, {}),  # the fetched Sentences
    )


def _best_of_each(first: Callable[[], object], second: Callable[[], object], runs: int) -> tuple[float, float]:
    """The fastest of `runs` calls of each, in seconds, taken in turns (first, second, first, …) so
    both meet the same moments of a shared, noisy machine; the garbage collector is off meanwhile."""
    best = [float("inf"), float("inf")]
    gc.collect()
    gc.disable()
    try:
        for _ in range(runs):
            for index, function in enumerate((first, second)):
                started = time.perf_counter()
                function()
                best[index] = min(best[index], time.perf_counter() - started)
    finally:
        gc.enable()
    return best[0], best[1]


def run(runs: int = RUNS) -> list[dict[str, Any]]:
    """One row per vendor: bytes, json.loads ms, translate ms, ratio, target, ok."""
    rules = SideRules()
    rows: list[dict[str, Any]] = []
    for name, parse, make_payload, query in cases():
        body = make_payload()

        def translate(parse: Parser = parse, body: bytes = body, query: Mapping[str, str] = query) -> object:
            result = parse(body, query)
            assert result.transcript is not None
            return build_messages(result.transcript, rules)

        messages = translate()
        assert isinstance(messages, list) and messages
        loads_seconds, translate_seconds = _best_of_each(
            lambda body=body: json.loads(body),  # type: ignore[misc]
            translate,
            runs,
        )
        ratio = translate_seconds / loads_seconds
        rows.append(
            {
                "vendor": name,
                "bytes": len(body),
                "messages": len(messages),
                "json_loads_ms": round(loads_seconds * 1000, 2),
                "translate_ms": round(translate_seconds * 1000, 2),
                "ratio": round(ratio, 2),
                "target": TARGET_RATIO,
                "ok": ratio <= TARGET_RATIO,
            }
        )
    return rows


def main() -> int:
    """Print the table; non-zero exit when any vendor is over the target."""
    rows = run()
    print(f"{'vendor':<13} | {'json.loads ms':>13} | {'translate ms':>12} | {'ratio':>5} | target ≤ {TARGET_RATIO}")
    print(f"{'-' * 13}-+-{'-' * 13}-+-{'-' * 12}-+-{'-' * 5}-+-{'-' * 12}")
    for row in rows:
        verdict = "ok" if row["ok"] else "OVER"
        print(
            f"{row['vendor']:<13} | {row['json_loads_ms']:>13.2f} | {row['translate_ms']:>12.2f} | "
            f"{row['ratio']:>5.2f} | {verdict}"
        )
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

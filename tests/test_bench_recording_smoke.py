"""bench/recording.py still works: its WAV files are what they claim, its server sends them whole,
and a tiny run (a 5 MB recording, over the upload-URL flow, and 3 other calls) gets every figure."""

from __future__ import annotations

import hashlib
import io
import wave

import pytest
import requests

from bench.recording import (
    WAV_HEADER_BYTES,
    RecordingServer,
    rows_for,
    sample_block,
    wav_chunks,
    wav_header,
    wav_sha256,
)


def test_a_generated_wav_file_has_exactly_its_size_and_a_header_the_wave_module_reads() -> None:
    size = 3 * 1024 * 1024 + 123  # not a whole number of blocks
    data = b"".join(wav_chunks(size, sample_block()))
    assert len(data) == size and data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    with wave.open(io.BytesIO(data)) as parsed:
        assert (parsed.getnchannels(), parsed.getsampwidth(), parsed.getframerate()) == (1, 2, 8000)
        assert parsed.getnframes() == (size - WAV_HEADER_BYTES) // 2
    assert wav_sha256(size) == hashlib.sha256(data).hexdigest()
    assert len(wav_header(0)) == WAV_HEADER_BYTES


def test_the_recording_server_sends_a_file_whole_with_its_length_and_records_its_digest() -> None:
    with RecordingServer() as files:
        url = files.add("c1", 2_500_000)
        answer = requests.get(url, timeout=10)
        missing = requests.get(url.replace("c1.wav", "c2.wav"), timeout=10)
    assert answer.status_code == 200 and answer.headers["Content-Length"] == "2500000"
    assert answer.headers["Content-Type"] == "audio/wav"
    served = files.served(url)
    assert served.sent == 2_500_000 and served.requests == 1
    assert served.sha256 == hashlib.sha256(answer.content).hexdigest() == wav_sha256(2_500_000)
    assert missing.status_code == 404


def test_a_paced_server_takes_about_the_time_its_rate_says() -> None:
    with RecordingServer(mbps=80.0) as files:  # 10 MB/s: 2 MB in about 0.2 s
        url = files.add("slow", 2_000_000)
        answer = requests.get(url, timeout=10)
    served = files.served(url)
    assert len(answer.content) == 2_000_000
    assert served.started is not None and served.finished is not None
    assert 0.15 < served.finished - served.started < 2.0


@pytest.mark.timeout(120)
def test_a_tiny_run_attaches_the_recording_and_every_transcript_and_gets_every_figure() -> None:
    from bench.recording import measure

    measured = measure(5_000_000, calls=3, rate=20.0, small_bytes=20_000, name="recording-smoke")
    assert measured.big_attached.via == "upload", "over 4 MiB: the upload-URL flow"
    assert measured.big_attached.size == 5_000_000 and measured.sha256_matches
    assert measured.big_served.requests == 1, "downloaded once"
    assert len(measured.latencies) == 3 and all(0 < seconds < 60 for seconds in measured.latencies)
    assert 10 < measured.worker_mb < 1000
    assert sum(name.startswith("gunicorn worker") for name in measured.web_mb) == 2
    rows = {r["name"]: r for r in rows_for(measured, measured)}
    ratio = rows["recording: worker peak RSS, 5 MB run / 1 MB run"]
    assert ratio["figure"] == 1.0 and ratio["ok"] is True
    assert rows["recording 5 MB: card's file = file served (sha256, size)"]["ok"] is True

"""bench/transcribe.py still works: a tiny run (3 calls through web + worker, a fake Deepgram calling
back) puts every transcript on the card and gets every figure."""

from __future__ import annotations

import pytest

from bench.transcribe import run


@pytest.mark.timeout(180)
def test_a_tiny_run_attaches_every_transcript_and_splits_the_vendors_time_out() -> None:
    rows = run(calls=3, rate=10.0, vendor_seconds=0.3)
    by_name = {r["name"].split(": ", 1)[1]: r for r in rows}
    assert by_name["transcripts on the card"]["figure"] == "3 of 3"
    vendor = by_name["the vendor's own time (taken → called back), p50"]["figure"]
    assert 0.3 <= vendor < 2.0
    assert by_name["finished → transcript on the card, p50"]["figure"] > vendor
    assert all(r["ok"] is not False for r in rows)

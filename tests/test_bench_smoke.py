"""The benchmarks still import and their helpers still work (tiny runs; the suite is `bench/run`).

The heavy ones (wrk load, the minute-long pacing run) are skipped unless B24SCRIBE_BENCH_HEAVY=1.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest

HEAVY = pytest.mark.skipif(os.environ.get("B24SCRIBE_BENCH_HEAVY") != "1", reason="heavy: set B24SCRIBE_BENCH_HEAVY=1")


@pytest.mark.parametrize(
    "module",
    [
        "bench.common",
        "bench.bare_app",
        "bench.profiling",
        "bench.ingest",
        "bench.e2e",
        "bench.memory",
        "bench.pacing",
        "bench.pacing_one_portal",
        "bench.suite",
        "bench.translation",
    ],
)
def test_each_bench_module_imports(module: str) -> None:
    imported = importlib.import_module(module)
    if module not in ("bench.common", "bench.bare_app", "bench.profiling"):
        assert callable(getattr(imported, "run", None) or getattr(imported, "main", None))


def test_the_bare_app_reads_the_body_and_answers_202() -> None:
    from bench.bare_app import create_app

    client = create_app().test_client()
    answer = client.post("/hooks/pbx/generic", data=b'{"call_id": "1"}', content_type="application/json")
    assert answer.status_code == 202
    assert client.get("/livez").status_code == 200


def test_rows_print_as_a_table_and_a_miss_fails(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.common import main_for, row

    assert main_for([row("a", 1.5, "ms", "≤ 2", True), row("b", 3, "")]) == 0
    assert main_for([row("c", 0.5, "×", "≥ 0.75", False)]) == 1
    printed = capsys.readouterr().out
    assert "bench" in printed and "MISS" in printed and "1.500 ms" in printed


def test_payloads_have_the_promised_shape() -> None:
    import json

    from bench.common import generic_transcript, one_hour_deepgram, pbx_event

    assert len(json.loads(generic_transcript(30))["segments"]) == 30
    assert json.loads(pbx_event("x.1"))["call_id"] == "x.1"
    hour = one_hour_deepgram("job-1")
    words = sum(len(c["alternatives"][0]["words"]) for c in json.loads(hour)["results"]["channels"])
    assert words == 10_000 and 1.2e6 < len(hour) < 2e6


def test_the_profile_summary_reads_py_spy_raw_stacks(tmp_path: Path) -> None:
    from bench.common import ROOT
    from bench.profiling import summarize

    sqlalchemy = "/x/site-packages/sqlalchemy/engine/default.py"
    raw = tmp_path / "py-spy-123.txt"
    raw.write_text(
        f"thread (7): group-commit;run (threading.py:1);_commit ({ROOT}/b24scribe/db.py:120);"
        f"do_commit ({sqlalchemy}:954) 30\n"
        f"thread (8): ThreadPoolExecutor-0_0;run (threading.py:1);_compile ({sqlalchemy}:10) 5\n"
        f"thread (9): ThreadPoolExecutor-0_1;run (threading.py:1);wait (/usr/lib/python3.11/threading.py:327) 5\n"
    )
    lines = summarize([raw], rate=10, seconds=4)
    assert lines[0] == "pid 123, share of wall time sampled busy: group-commit 75 %, request threads (sum of 2) 25 %"
    assert any("75.0 %  COMMIT" in line for line in lines)
    assert any("_commit (b24scribe/db.py)" in line for line in lines)


@pytest.mark.timeout(60)
def test_a_tiny_end_to_end_latency_run() -> None:
    from bench import e2e

    measured = e2e.latencies(count=3, warmup=1)
    assert len(measured) == 3
    assert all(-0.05 < seconds < 10 for seconds in measured)


@pytest.mark.timeout(60)
def test_a_tiny_memory_run_reads_every_process_peak() -> None:
    from bench import memory

    peaks = memory.peaks(calls=1, words=300)
    assert peaks.messages > 0
    names = list(peaks.processes)
    assert sum(name.startswith("gunicorn worker") for name in names) == 2
    assert any(name.startswith("worker") for name in names)
    assert all(mb > 10 for mb in peaks.processes.values())


@HEAVY
@pytest.mark.timeout(300)
def test_a_short_ingest_run_commits_exactly_what_it_acknowledged() -> None:
    from bench import ingest

    if shutil.which("wrk") is None and os.geteuid() != 0:
        pytest.skip("wrk is not installed")
    rows = ingest.run(rounds=1, seconds=2.0, kinds=("pbx",), profile=False)
    durability = next(r for r in rows if "acknowledged = committed" in r["name"])
    assert durability["ok"], durability
    ceilings = {r["name"].split(": ")[1]: r["figure"] for r in rows if r["unit"] == "req/s"}
    assert set(ceilings) == {"bare Flask", "app", "plain WSGI (context)"}
    assert all(isinstance(figure, float) and figure > 0 for figure in ceilings.values()), ceilings


@HEAVY
@pytest.mark.timeout(300)
def test_a_short_pacing_run_gets_no_503() -> None:
    from bench import pacing_one_portal

    rows = pacing_one_portal.run(count=55)
    assert next(r for r in rows if "503" in r["name"])["ok"]

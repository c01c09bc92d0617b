"""The benchmarks still import and their helpers still work (tiny runs; the suite is `bench/run`).

The heavy ones (the full ingest comparison, the minute-long pacing run) are skipped unless
B24SCRIBE_BENCH_HEAVY=1; the tiny runs that need wrk are skipped where it is not installed.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from pathlib import Path

import pytest

HEAVY = pytest.mark.skipif(os.environ.get("B24SCRIBE_BENCH_HEAVY") != "1", reason="heavy: set B24SCRIBE_BENCH_HEAVY=1")
WRK = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")


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
        "bench.sustained",
        "bench.fault_run",
        "bench.fold_rate",
        "bench.health_queries",
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
    rows = ingest.run(rounds=1, seconds=2.0, kinds=("pbx",), profile=False, backends=("sqlite",))
    durability = [r for r in rows if "acknowledged = stored" in r["name"]]
    assert len(durability) == 2 and all(r["ok"] for r in durability), durability
    rates = {r["name"]: r["figure"] for r in rows if r["unit"] == "req/s"}
    assert set(rates) == {
        "ingest PBX event: bare Flask",
        "ingest PBX event: plain WSGI (context)",
        "ingest PBX event, sqlite, web + worker",
        "ingest PBX event, sqlite, web only",
    }
    assert all(isinstance(figure, float) and figure > 0 for figure in rates.values()), rates
    assert any(r["name"].endswith("web + worker: / bare Flask") and r["target"] == "≥ 0.75" for r in rows)


@WRK
@pytest.mark.timeout(120)
def test_a_tiny_ingest_run_of_web_and_worker_stores_every_acknowledged_event_and_the_worker_folds_them(
    tmp_path: Path,
) -> None:
    from bench import ingest
    from bench.common import Workspace

    space = Workspace(tmp_path)
    body = tmp_path / "body.json"
    body.write_bytes(b"")
    measured = ingest.measure("app", "pbx", "smoke", 1.0, space, body, backend="sqlite", mode="procfile")
    assert measured.run.ok > 0 and measured.run.non_2xx == 0
    assert measured.acknowledged == measured.committed, measured
    assert measured.fold_backlog >= 0 and measured.fold_left == 0, "the worker folded every stored event"
    assert len(measured.worker_cpu) == 2


def test_the_backlog_is_read_from_the_outbox_by_part(tmp_path: Path) -> None:
    import time

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from b24scribe.models import Base, Job
    from bench.common import DatabaseProbe, wait_for_drain

    url = f"sqlite:///{tmp_path / 'probe.sqlite3'}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    now = time.time()
    states = [
        ("apply", "pending"),
        ("apply", "done"),
        ("register", "waiting"),
        ("attach", "leased"),
        ("finish", "dead"),
    ]
    with Session(engine) as session, session.begin():
        session.add_all(
            Job(kind=kind, state=state, attempts=0, next_attempt_at=now, created_at=now, updated_at=now)
            for kind, state in states
        )
    engine.dispose()
    with DatabaseProbe(url) as probe:
        assert (probe.backlog(), probe.backlog("fold"), probe.backlog("delivery")) == (3, 1, 2)
        assert probe.jobs_created() == 5
    assert wait_for_drain(url, timeout=0.3)[0] == 3


def test_a_backlog_that_grows_is_not_kept_up_with_and_one_that_wobbles_is() -> None:
    from bench.sustained import Load, Sample, Step, slope

    assert slope([(0.0, 0.0), (1.0, 2.0), (2.0, 4.0)]) == pytest.approx(2.0)
    load = Load(sent=2000, ok=2000, non_2xx=0, socket_errors=0, calls=1000, late=0, seconds=10.0, p50_ms=5, p99_ms=9)
    growing = [Sample(float(t), 20 * t, 500 * t) for t in range(11)]  # +20 jobs/s of 500 arriving: 4 %
    wobbling = [Sample(float(t), 100 + (7 if t % 2 else -7), 500 * t) for t in range(11)]
    assert not Step(100.0, load, growing, (0.0, 10.0)).kept_up
    assert Step(100.0, load, wobbling, (0.0, 10.0)).kept_up
    slow_web = Load(
        sent=1000, ok=1000, non_2xx=0, socket_errors=0, calls=500, late=400, seconds=10.0, p50_ms=5, p99_ms=9
    )
    assert not Step(100.0, slow_web, wobbling, (0.0, 10.0)).kept_up, "wrk sent only half the rate"
    refused = Load(
        sent=2000, ok=1990, non_2xx=10, socket_errors=0, calls=1000, late=0, seconds=10.0, p50_ms=5, p99_ms=9
    )
    assert not Step(100.0, refused, wobbling, (0.0, 10.0)).kept_up


def test_sustained_rows_have_the_targets_and_a_doubled_call_fails() -> None:
    from bench.sustained import Outcome, rows_for

    one = Outcome("postgresql", 1, best=100.0, calls=500, attached_once=500)
    two = Outcome("postgresql", 2, best=160.0, calls=500, attached_once=499, attached_more=1)
    lite = Outcome("sqlite", 1, best=150.0, failed_at=180.0, calls=800, attached_once=800)
    rows = {r["name"]: r for r in rows_for([lite, one, two])}
    assert rows["sustained sqlite, 1 worker: highest rate kept up (not kept up at 180)"]["ok"] is True
    assert rows["sustained sqlite, 1 worker: attached exactly once"]["ok"] is True
    assert rows["sustained postgresql, 2 workers: attached exactly once"]["ok"] is False
    scaling = rows["sustained postgresql: 2 workers / 1 worker"]
    assert scaling["figure"] == 1.6 and scaling["target"] == "≥ 1.7" and scaling["ok"] is False


def test_sustained_configs_name_the_bad_item() -> None:
    from bench.sustained import parse_configs

    assert parse_configs("sqlite:1,postgresql:2") == [("sqlite", 1), ("postgresql", 2)]
    with pytest.raises(ValueError, match="'mysql:1'"):
        parse_configs("sqlite:1,mysql:1")


@WRK
@pytest.mark.timeout(180)
def test_a_tiny_sustained_search_attaches_every_call_exactly_once() -> None:
    from bench import sustained

    plan = sustained.Plan(window=3.0, warmup=1.0, probe=2.0, probe_rate=20.0, steps=1, portals=2, drain=60.0)
    outcome = sustained.search("sqlite", 1, plan)
    assert outcome.calls > 20, outcome
    assert outcome.attached_once == outcome.calls and outcome.attached_more == 0, outcome
    assert outcome.backlog_left == 0 and outcome.dead == 0
    assert len(outcome.steps) == 1 and outcome.steps[0].load.non_2xx == 0, outcome.steps[0].describe()


def test_the_fault_run_uses_the_service_defaults_and_answers_after_its_timeout() -> None:
    from bench.fault_run import FaultConfig, config_for, worker_argv

    acceptance = config_for("postgresql")
    assert (acceptance.calls, acceptance.workers, acceptance.kills, acceptance.time_limit) == (300, 3, 3, 240.0)
    assert acceptance.service_settings() == {}, "the acceptance run sets none of the service's settings"
    assert acceptance.slow_answer_seconds == 21.0, "slower than the default 20 s Bitrix24 timeout"
    assert (acceptance.error_rate, acceptance.slow_rate) == (0.10, 0.10)
    assert worker_argv(acceptance.threads)[-2:] == ["app", "worker"], "the Procfile's worker command"
    fast = FaultConfig.fast()
    assert fast.calls == 100 and fast.slow_answer_seconds > float(fast.service_settings()["B24SCRIBE_BITRIX24_TIMEOUT"])


def test_the_fault_runs_kills_land_at_random_points_of_the_progress(tmp_path: Path) -> None:
    import subprocess
    import sys

    from bench.fault_run import Chaos, Processes

    progress = {"done": 0.0}
    with Processes(tmp_path) as processes:

        def sleeper() -> subprocess.Popen[bytes]:
            return processes.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], {})

        workers = [sleeper(), sleeper()]
        first = list(workers)
        chaos = Chaos(
            processes, sleeper, workers, kills=3, between=(0.2, 0.6), seed=1, progress=lambda: progress["done"]
        )
        assert all(0.2 <= point <= 0.6 for point in chaos.points) and chaos.points == sorted(chaos.points)
        chaos.thread.start()
        time.sleep(0.5)
        assert chaos.kills == 0, "nothing is killed before the first point"
        progress["done"] = 1.0
        chaos.thread.join(timeout=10)
        assert chaos.kills == 3
        assert any(worker.returncode == -9 for worker in first), "killed with SIGKILL"
        assert all(worker.poll() is None for worker in workers), "and replaced"


def test_the_suite_reports_a_bench_that_is_not_there_and_reads_other_benches_rows() -> None:
    from bench import suite

    assert "sustained" in suite.BENCHES and "fault" in suite.BENCHES
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(suite.OPTIONAL, "nothing", ("no_such_bench", {}))
        rows = suite.optional_rows("nothing", quick=True, notes=[])
    assert rows[0]["ok"] is None and "not there" in str(rows[0]["figure"])
    assert suite.as_row("x", {"name": "a", "figure": 1.0, "unit": "s"})["unit"] == "s"
    with pytest.raises(ValueError, match="figure"):
        suite.as_row("x", {"name": "a"})


@HEAVY
@pytest.mark.timeout(300)
def test_a_short_pacing_run_gets_no_503() -> None:
    from bench import pacing_one_portal

    rows = pacing_one_portal.run(count=55)
    assert next(r for r in rows if "503" in r["name"])["ok"]


def test_a_fault_run_passes_only_when_every_call_is_attached_once_within_the_limit() -> None:
    from dataclasses import replace

    from bench.fault_run import FaultResult, rows_for

    good = FaultResult("sqlite", 2, None, 3, 300, time_limit=240.0, attached_seconds=103.4, attached_once=300)
    assert good.ok
    assert not replace(good, attached_seconds=241.0).ok, "too late"
    assert not replace(good, attached_seconds=None, attached_once=299, missing=1).ok, "a call never attached"
    assert not replace(good, attached_once=299, attached_more=1).ok, "a call attached twice"
    assert not replace(good, count_503=1).ok, "throttled"
    rows = {r["name"].split(": ")[1]: r for r in rows_for(replace(good, attached_seconds=250.0))}
    assert rows["every call attached after"]["ok"] is False and rows["every call attached after"]["target"] == "≤ 240 s"
    assert rows["attached exactly once"]["ok"] is True


def test_the_capacity_estimate_counts_the_drain_after_the_probe() -> None:
    from bench.sustained import capacity

    assert capacity(calls=1000, loaded=10.0, drained=10.0, backlog_left=0, jobs=5000) == pytest.approx(50.0)
    assert capacity(calls=1000, loaded=10.0, drained=10.0, backlog_left=2500, jobs=5000) == pytest.approx(25.0)
    assert capacity(calls=0, loaded=10.0, drained=0.0, backlog_left=0, jobs=0) == 0.0


def test_a_command_benchs_printed_figures_become_rows() -> None:
    from bench.suite import printed_figures

    printed = "sqlite: filled 5,000 call rows\nsqlite: GET /readyz   median     5.9 ms\nno figures here: none\n"
    assert printed_figures(printed) == [
        ("sqlite", "filled 5,000 call rows"),
        ("sqlite", "GET /readyz median 5.9 ms"),
    ]

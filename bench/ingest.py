"""Ingest throughput: the real app under gunicorn vs a bare Flask endpoint, loaded with wrk.

Both are served with the Procfile's command and gunicorn.conf.py (gevent, 2 workers);
the app on a fresh SQLite database migrated with `flask --app app db upgrade` (WAL,
synchronous=FULL). wrk runs on loopback with bench/post.lua: each request a distinct call id, so
each is a real insert. Runs are interleaved (bare, app, bare, app, …), a short warm-up before each,
and the median of the measured runs is reported. For PBX events a plain WSGI callable under the
same gunicorn settings is measured too, as context: the app's hooks skip Flask's dispatch
(handlers/hooks.HookLane), so how far it is from gunicorn's own ceiling is worth knowing.

After each app run the database must hold exactly as many events as wrk counted 2xx answers,
with no non-2xx answer: wrk stops sending at the deadline and waits for every answer in flight,
so nothing is cut off. Target: app ≥ 0.75 × bare for PBX events. When it is missed, the app is
profiled with py-spy under the same load and the summary is printed.

    python bench/ingest.py [--rounds 3] [--seconds 10] [--kinds pbx,stt] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench import profiling
from bench.common import (
    TOKEN,
    Row,
    Workspace,
    count_rows,
    cpu_seconds,
    fresh_database,
    generic_transcript,
    install_signal_handlers,
    main_for,
    row,
    service_env,
    start_web,
    stop_process,
    tail,
    workspace,
)

LUA = Path(__file__).resolve().parent / "post.lua"
TARGET_PBX = 0.75
CONNECTIONS = 32
WRK_THREADS = 2
WARMUP_SECONDS = 2.0
MAX_DRAIN_SECONDS = 30.0  # wrk's -d beyond the deadline: the longest wait for answers in flight
PROFILE_SECONDS = 6
PROFILE_RATE = 200  # samples per second
PATHS = {"pbx": "/hooks/pbx/generic", "stt": "/hooks/stt/generic"}
LABELS = {"pbx": "PBX event", "stt": "transcript (30 segments)"}
NOTES: list[str] = []


@dataclass(frozen=True)
class WrkRun:
    """What post.lua's done() reported for one wrk run."""

    sent: int
    ok: int
    non_2xx: int
    socket_errors: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Measured:
    """One measured run of one server (the app also with its durability check)."""

    server: str
    run: WrkRun
    acknowledged: int = 0  # 2xx of warm-up + measured run
    committed: int = 0  # events in the database afterwards
    in_flight_at_stop: int = 0
    worker_cpu: tuple[float, ...] = ()  # CPU seconds of each gunicorn worker during the measured run


def ensure_wrk() -> str:
    """wrk, installed with apt-get when missing and running as root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("wrk is not installed; install it (apt-get install wrk) or run as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"], check=True, timeout=600, env=env, stdout=subprocess.DEVNULL
    )
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("apt-get install wrk did not provide wrk")
    return found


def run_wrk(base_url: str, kind: str, prefix: str, seconds: float, space: Workspace, body_file: Path) -> WrkRun:
    """One wrk run of post.lua against `base_url`; sends for `seconds`, then drains."""
    out = space.path / f"wrk-{prefix}.json"
    env = {
        **os.environ,
        "BENCH_KIND": kind,
        "BENCH_TOKEN": TOKEN,
        "BENCH_PREFIX": prefix,
        "BENCH_SECONDS": str(seconds),
        "BENCH_BODY_FILE": str(body_file),
        "BENCH_OUT": str(out),
    }
    duration = seconds + MAX_DRAIN_SECONDS
    argv = [ensure_wrk(), "-t", str(WRK_THREADS), "-c", str(CONNECTIONS), "-d", f"{duration:.0f}s"]
    argv += ["--timeout", f"{MAX_DRAIN_SECONDS:.0f}s", "-s", str(LUA), base_url + PATHS[kind]]
    log = space.path / f"wrk-{prefix}.log"
    markers = [Path(f"{out}.drained.{n}") for n in range(1, WRK_THREADS + 1)]
    for stale in (out, *markers):
        stale.unlink(missing_ok=True)
    with log.open("wb") as output:
        wrk = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + duration + 30
            while wrk.poll() is None and time.monotonic() < deadline:
                if all(marker.exists() for marker in markers):
                    wrk.send_signal(signal.SIGINT)  # every answer is in: end the run now
                    break
                time.sleep(0.02)
            wrk.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
    if wrk.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed ({wrk.returncode}): {tail(log)}")
    data = json.loads(out.read_text())
    errors = data["errors"]
    window = data["window_s"] or seconds
    return WrkRun(
        sent=int(data["sent"]),
        ok=int(data["ok"]),
        non_2xx=int(data["non_2xx"]),
        socket_errors=int(errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]),
        requests_per_second=(data["ok"] + data["non_2xx"]) / window,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


def measure(server: str, kind: str, label: str, seconds: float, space: Workspace, body_file: Path) -> Measured:
    """Start the server fresh, warm it up, measure, stop it, check the database (app)."""
    if server == "app":
        url = fresh_database(space, f"ingest-{label}")
        web = start_web(space, service_env(space.path, url), name=f"web-{label}")
    else:
        url = ""
        env = service_env(space.path, f"sqlite:///{space.path}/unused.sqlite3")
        factory = "create_wsgi_app" if server == "wsgi" else "create_app"
        web = start_web(space, env, app=f"bench.bare_app:{factory}()", name=f"{server}-{label}")
    try:
        warm = run_wrk(web.url, kind, f"{server}-{label}-warm", WARMUP_SECONDS, space, body_file)
        pids = web.worker_pids()
        before = [cpu_seconds(pid) for pid in pids]
        measured = run_wrk(web.url, kind, f"{server}-{label}-run", seconds, space, body_file)
        cpu = tuple(cpu_seconds(pid) - start for pid, start in zip(pids, before, strict=True))
    finally:
        stop_process(web.process)
    if server != "app":
        return Measured(server, measured, worker_cpu=cpu)
    acknowledged = warm.ok + measured.ok
    in_flight = (warm.sent - warm.ok - warm.non_2xx) + (measured.sent - measured.ok - measured.non_2xx)
    return Measured(server, measured, acknowledged, count_rows(url, "inbound_event"), in_flight, cpu)


def sqlite_settings(space: Workspace) -> tuple[str, str]:
    """(synchronous, journal_mode) of the app's write connections, read through its own Database."""
    from sqlalchemy import text

    from b24scribe.db import Database

    database = Database(f"sqlite:///{space.path}/pragma-check.sqlite3")
    try:
        with database.write_engine.connect() as connection:
            synchronous = connection.execute(text("PRAGMA synchronous")).scalar_one()
            journal = connection.execute(text("PRAGMA journal_mode")).scalar_one()
    finally:
        database.dispose()
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    return names.get(int(synchronous), str(synchronous)), str(journal).upper()


def fsync_commit_rate(space: Workspace, seconds: float = 2.0) -> float:
    """Physical ceiling of one-commit-per-request: SQLite WAL FULL commits/s, one row each."""
    path = space.path / "fsync-probe.sqlite3"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
        commits, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO t (body) VALUES (?)", (b"x" * 300,))
            connection.execute("COMMIT")
            commits += 1
        return commits / (time.perf_counter() - started)


def profile_app(kind: str, space: Workspace, body_file: Path) -> list[str]:
    """py-spy on both gunicorn workers of the app under the same wrk load: threads, then the GIL."""
    url = fresh_database(space, f"profile-{kind}")
    web = start_web(space, service_env(space.path, url), name=f"web-profile-{kind}")
    lines: list[str] = []
    result: dict[str, WrkRun] = {}

    def drive() -> None:
        result["run"] = run_wrk(web.url, kind, f"profile-{kind}", 2 * PROFILE_SECONDS + 2, space, body_file)

    try:
        driver = threading.Thread(target=drive, name="wrk-driver", daemon=True)
        driver.start()
        time.sleep(1.0)
        pids = web.worker_pids()
        threads = profiling.record(pids, PROFILE_SECONDS, space.path, PROFILE_RATE)
        gil = profiling.record(pids, PROFILE_SECONDS, space.path, PROFILE_RATE, gil=True)
        driver.join(timeout=2 * PROFILE_SECONDS + MAX_DRAIN_SECONDS + 60)
    finally:
        stop_process(web.process)
    run = result.get("run")
    if run is not None:
        lines.append(f"load while sampled: {run.requests_per_second:,.0f} req/s, p50 {run.p50_ms:.1f} ms")
    lines.append("-- every non-idle thread (wall time, includes waiting on fsync and on the GIL):")
    lines += profiling.summarize(threads, PROFILE_RATE, PROFILE_SECONDS)
    lines.append("-- only the thread holding the GIL (Python running):")
    lines += profiling.summarize(gil, PROFILE_RATE, PROFILE_SECONDS)
    return lines


def run(
    rounds: int = 3, seconds: float = 10.0, kinds: tuple[str, ...] = ("pbx", "stt"), profile: bool | None = None
) -> list[Row]:
    """Interleaved bare/app runs per kind of request; rows with medians, ratios and checks."""
    NOTES.clear()
    rows: list[Row] = []
    with workspace() as space:
        synchronous, journal = sqlite_settings(space)
        rows.append(
            row(
                "ingest: app's SQLite write connections",
                f"{journal}, synchronous={synchronous}",
                "",
                "WAL, synchronous=FULL",
                synchronous == "FULL" and journal == "WAL",
            )
        )
        rows.append(row("ingest: disk ceiling, 1 fsync'd commit per insert", fsync_commit_rate(space), "commits/s"))
        for kind in kinds:
            body_file = space.path / f"body-{kind}.json"
            body_file.write_bytes(generic_transcript(30) if kind == "stt" else b"")
            bare: list[Measured] = []
            app: list[Measured] = []
            wsgi: list[Measured] = []
            for number in range(rounds):
                bare.append(measure("bare", kind, f"{kind}{number}", seconds, space, body_file))
                app.append(measure("app", kind, f"{kind}{number}", seconds, space, body_file))
                if kind == "pbx":  # context for the target: gunicorn's own ceiling, no framework
                    wsgi.append(measure("wsgi", kind, f"{kind}{number}", seconds, space, body_file))
            rows += _rows(kind, bare, app, wsgi)
            missed = kind == "pbx" and _ratio(bare, app) < TARGET_PBX
            if profile or (profile is None and missed):
                NOTES.append(f"ingest {kind}: py-spy profile of the app's gunicorn workers under wrk load")
                NOTES.extend("  " + line for line in profile_app(kind, space, body_file))
    return rows


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _ratio(bare: list[Measured], app: list[Measured]) -> float:
    return _median([m.run.requests_per_second for m in app]) / _median([m.run.requests_per_second for m in bare])


def _rows(kind: str, bare: list[Measured], app: list[Measured], wsgi: list[Measured]) -> list[Row]:
    label = f"ingest {LABELS[kind]}"
    ratio = _ratio(bare, app)
    target = f"≥ {TARGET_PBX}" if kind == "pbx" else ""
    acknowledged = sum(m.acknowledged for m in app)
    committed = sum(m.committed for m in app)
    non_2xx = sum(m.run.non_2xx for m in app)
    socket_errors = sum(m.run.socket_errors for m in app + bare + wsgi)
    in_flight = sum(m.in_flight_at_stop for m in app)
    exact = all(m.acknowledged == m.committed for m in app) and non_2xx == 0 and in_flight == 0
    durability = f"{acknowledged:,} 2xx = {committed:,} rows, non-2xx {non_2xx}"
    if in_flight or socket_errors:
        durability += f", unanswered {in_flight}, socket errors {socket_errors}"
    for name, runs in (("bare", bare), ("app", app), ("plain WSGI", wsgi)):
        if not runs:
            continue
        NOTES.append(
            f"{label}, {name} runs: "
            + "; ".join(
                f"{m.run.requests_per_second:,.0f} req/s (p50 {m.run.p50_ms:.1f} ms, p99 {m.run.p99_ms:.1f} ms, "
                f"CPU s per gunicorn worker {' + '.join(f'{c:.1f}' for c in m.worker_cpu)})"
                for m in runs
            )
        )
    context = []
    if wsgi:
        context = [
            row(f"{label}: plain WSGI (context)", _median([m.run.requests_per_second for m in wsgi]), "req/s"),
            row(f"{label}: app / plain WSGI", round(_ratio(wsgi, app), 3), "×"),
        ]
    return [
        row(f"{label}: bare Flask", _median([m.run.requests_per_second for m in bare]), "req/s"),
        row(f"{label}: bare p50 / p99", _latency(bare), "ms"),
        row(f"{label}: app", _median([m.run.requests_per_second for m in app]), "req/s"),
        row(f"{label}: app p50 / p99", _latency(app), "ms"),
        row(f"{label}: app / bare", round(ratio, 3), "×", target, ratio >= TARGET_PBX if target else None),
        row(f"{label}: acknowledged = committed", durability, "", "equal, non-2xx 0", exact),
        *context,
    ]


def _latency(measured: list[Measured]) -> str:
    return f"{_median([m.run.p50_ms for m in measured]):.1f} / {_median([m.run.p99_ms for m in measured]):.1f}"


def main() -> int:
    """Command line: print the rows (and notes); exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--kinds", default="pbx,stt")
    parser.add_argument("--profile", action="store_true", default=None, help="profile even when the target is met")
    args = parser.parse_args()
    install_signal_handlers()
    rows = run(args.rounds, args.seconds, tuple(args.kinds.split(",")), args.profile)
    status = main_for(rows)
    for note in NOTES:
        print(note)
    return status


if __name__ == "__main__":
    sys.exit(main())

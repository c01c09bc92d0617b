"""Ingest throughput as users run the service: the Procfile's processes together, loaded with wrk,
side by side with a bare Flask endpoint under the same gunicorn command line.

Users start `web: gunicorn 'app:create_app()' --config gunicorn.conf.py` and `worker: flask --app app
worker` together, with the defaults (gevent, 2 web processes, one worker), on SQLite or PostgreSQL.
That is the figure with its target ("web + worker"): the worker folds what the web stores while
the web is loaded, on the same database. The web process alone ("web only") is measured too,
labelled as such. Each run gets a fresh database migrated with `flask --app app db upgrade` (SQLite:
WAL, synchronous=FULL; PostgreSQL: a new schema of B24SCRIBE_BENCH_POSTGRES_URL or
B24SCRIBE_TEST_POSTGRES_URL, dropped afterwards). wrk runs on loopback (16 connections) with
bench/post.lua: each request a distinct call id, so each is a real insert. Runs are interleaved
(bare, app, bare, app, …), a short warm-up before each, and the median of the measured runs is
reported. For PBX events a plain WSGI callable under the same gunicorn settings is measured too, as
context (gunicorn's own ceiling).

After each app run the database must hold exactly as many events as wrk counted 2xx answers,
with no non-2xx answer: wrk stops sending at the deadline and waits for every answer in flight,
so nothing is cut off. With the worker, its backlog is read when the load stops: stored events
still to fold into their calls, and deliveries not done (no portal is configured, so they are
dry-run ones, paced like real ones at the default 2/s: that part drains slowly by design); then
how long the worker takes to fold every stored event (at most 60 s).
Targets for PBX events: web + worker ≥ 0.75 × bare on SQLite, ≥ 0.5 × bare on PostgreSQL (web
only too). When the SQLite target is missed the app is profiled with py-spy under the same load.

    python bench/ingest.py [--rounds 3] [--seconds 10] [--kinds pbx,stt] [--backends sqlite,postgresql]
                           [--modes procfile,web] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
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
    DatabaseProbe,
    Row,
    Workspace,
    backends_available,
    count_rows,
    cpu_seconds,
    database,
    generic_transcript,
    install_signal_handlers,
    main_for,
    row,
    run_wrk_until_drained,
    service_env,
    start_web,
    start_worker,
    stop_process,
    tail,
    wait_for_drain,
    workspace,
)

LUA = Path(__file__).resolve().parent / "post.lua"
TARGETS_PBX = {"sqlite": 0.75, "postgresql": 0.5}  # app / bare, for PBX events
TARGET_PBX = TARGETS_PBX["sqlite"]
CONNECTIONS = 16  # as the issue measured (the web-only figures of earlier READMEs used 32)
WRK_THREADS = 2
WARMUP_SECONDS = 2.0
MAX_DRAIN_SECONDS = 30.0  # wrk's -d beyond the deadline: the longest wait for answers in flight
PROFILE_SECONDS = 6
PROFILE_RATE = 200  # samples per second
PATHS = {"pbx": "/hooks/pbx/generic", "stt": "/hooks/stt/generic"}
LABELS = {"pbx": "PBX event", "stt": "transcript (30 segments)"}
MODES = {"procfile": "web + worker", "web": "web only"}
BACKENDS = ("sqlite", "postgresql")
FOLD_SECONDS = 60.0  # the longest wait for the worker to fold every stored event after a run
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
    """One measured run of one server (the app also with its durability check and backlog)."""

    server: str  # bare | wsgi | app
    run: WrkRun
    backend: str = ""  # the app's database: sqlite | postgresql
    mode: str = ""  # the app's processes: procfile (web + worker) | web (web only)
    acknowledged: int = 0  # 2xx of warm-up + measured run
    committed: int = 0  # events in the database afterwards
    in_flight_at_stop: int = 0
    worker_cpu: tuple[float, ...] = ()  # CPU seconds of each gunicorn worker during the measured run
    folder_cpu: float = 0.0  # CPU seconds of the Procfile's worker during the measured run (web + worker)
    fold_backlog: int = 0  # events not folded yet when the load stopped (web + worker)
    delivery_backlog: int = 0  # deliveries not done when the load stopped (paced: 2/s per portal)
    fold_left: int = 0  # events still not folded after the drain wait
    drain_seconds: float = 0.0  # how long the worker took to fold every event after the load


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
    data = run_wrk_until_drained(argv, env, out, log, WRK_THREADS, duration + 30)
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


def measure(
    server: str,
    kind: str,
    label: str,
    seconds: float,
    space: Workspace,
    body_file: Path,
    backend: str = "sqlite",
    mode: str = "web",
) -> Measured:
    """Start the server fresh, warm it up, measure, stop it, check the database (app)."""
    if server != "app":
        env = service_env(space.path, f"sqlite:///{space.path}/unused.sqlite3")
        factory = "create_wsgi_app" if server == "wsgi" else "create_app"
        web = start_web(space, env, app=f"bench.bare_app:{factory}()", name=f"{server}-{label}")
        try:
            run_wrk(web.url, kind, f"{server}-{label}-warm", WARMUP_SECONDS, space, body_file)
            measured, cpu = _measured_run(
                web.worker_pids(), web.url, kind, f"{server}-{label}", seconds, space, body_file
            )
        finally:
            stop_process(web.process)
        return Measured(server, measured, worker_cpu=cpu)
    name = f"{mode}-{backend}-{label}"
    with database(space, backend, f"ingest-{name}") as url:
        env = service_env(space.path, url)
        web = start_web(space, env, name=f"web-{name}")
        worker = start_worker(space, env, name=f"worker-{name}") if mode == "procfile" else None
        try:
            warm = run_wrk(web.url, kind, f"app-{name}-warm", WARMUP_SECONDS, space, body_file)
            pids = web.worker_pids() + ([worker.pid] if worker is not None else [])
            measured, cpu = _measured_run(pids, web.url, kind, f"app-{name}", seconds, space, body_file)
            folder_cpu = cpu[-1] if worker is not None else 0.0
            cpu = cpu[:-1] if worker is not None else cpu
            with DatabaseProbe(url) as probe:
                backlog = (probe.backlog("fold"), probe.backlog("delivery"))
            left, drained = (0, 0.0)
            if worker is not None:  # timed from the backlog's reading: the web idles meanwhile
                if worker.poll() is not None:
                    raise RuntimeError(
                        f"the worker exited with {worker.returncode}:\n{tail(space.path / f'worker-{name}.log')}"
                    )
                left, drained = wait_for_drain(url, FOLD_SECONDS, [worker], part="fold")
        finally:
            stop_process(web.process)
            if worker is not None:
                stop_process(worker)
        acknowledged = warm.ok + measured.ok
        in_flight = (warm.sent - warm.ok - warm.non_2xx) + (measured.sent - measured.ok - measured.non_2xx)
        committed = count_rows(url, "inbound_event")
    return Measured(
        server,
        measured,
        backend,
        mode,
        acknowledged,
        committed,
        in_flight,
        cpu,
        folder_cpu,
        *backlog,
        left,
        round(drained, 2),
    )


def _measured_run(
    pids: list[int], url: str, kind: str, prefix: str, seconds: float, space: Workspace, body_file: Path
) -> tuple[WrkRun, tuple[float, ...]]:
    """One wrk run and the CPU seconds each of `pids` spent meanwhile."""
    before = [cpu_seconds(pid) for pid in pids]
    measured = run_wrk(url, kind, f"{prefix}-run", seconds, space, body_file)
    return measured, tuple(cpu_seconds(pid) - start for pid, start in zip(pids, before, strict=True))


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


def profile_app(kind: str, space: Workspace, body_file: Path, backend: str = "sqlite") -> list[str]:
    """py-spy on both gunicorn workers of the app under the same wrk load: threads, then the GIL."""
    with database(space, backend, f"profile-{kind}-{backend}") as url:
        return _profile_web(kind, space, body_file, url)


def _profile_web(kind: str, space: Workspace, body_file: Path, url: str) -> list[str]:
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
    rounds: int = 3,
    seconds: float = 10.0,
    kinds: tuple[str, ...] = ("pbx", "stt"),
    profile: bool | None = None,
    backends: tuple[str, ...] | None = None,
    modes: tuple[str, ...] = ("procfile", "web"),
) -> list[Row]:
    """Interleaved bare/app runs per kind of request, backend and mode; rows with medians, ratios, checks.

    `backends` None: SQLite, and PostgreSQL when one is configured and reachable."""
    NOTES.clear()
    rows: list[Row] = []
    chosen = tuple(backends_available()) if backends is None else backends
    for name in (*chosen, *modes):
        if name not in BACKENDS and name not in MODES:
            raise ValueError(f"unknown backend or mode {name!r}: backends {BACKENDS}, modes {tuple(MODES)}")
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
            wsgi: list[Measured] = []
            app: dict[tuple[str, str], list[Measured]] = {(b, m): [] for b in chosen for m in modes}
            for number in range(rounds):
                bare.append(measure("bare", kind, f"{kind}{number}", seconds, space, body_file))
                for backend, mode in app:
                    app[backend, mode].append(
                        measure("app", kind, f"{kind}{number}", seconds, space, body_file, backend, mode)
                    )
                if kind == "pbx":  # context for the target: gunicorn's own ceiling, no framework
                    wsgi.append(measure("wsgi", kind, f"{kind}{number}", seconds, space, body_file))
            rows += _bare_rows(kind, bare, wsgi)
            for (backend, mode), runs in app.items():
                rows += _rows(kind, backend, mode, bare, runs)
            sqlite_runs = app.get(("sqlite", "procfile")) or app.get(("sqlite", "web")) or []
            missed = kind == "pbx" and bool(sqlite_runs) and _ratio(bare, sqlite_runs) < TARGET_PBX
            if profile or (profile is None and missed):
                for backend in chosen if profile else ("sqlite",):
                    what = "py-spy profile of the app's gunicorn workers under wrk load (web only)"
                    NOTES.append(f"ingest {kind}, {backend}: {what}")
                    NOTES.extend("  " + line for line in profile_app(kind, space, body_file, backend))
    return rows


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _ratio(bare: list[Measured], app: list[Measured]) -> float:
    return _median([m.run.requests_per_second for m in app]) / _median([m.run.requests_per_second for m in bare])


def _median_int(runs: list[Measured], name: str) -> int:
    return int(_median([float(getattr(m, name)) for m in runs]))


def _runs_note(label: str, runs: list[Measured]) -> str:
    return f"{label} runs: " + "; ".join(
        f"{m.run.requests_per_second:,.0f} req/s (p50 {m.run.p50_ms:.1f} ms, p99 {m.run.p99_ms:.1f} ms, "
        f"CPU s per gunicorn worker {' + '.join(f'{c:.1f}' for c in m.worker_cpu)}"
        + (
            f", worker CPU s {m.folder_cpu:.1f}, "
            f"at stop {m.fold_backlog:,} events to fold and {m.delivery_backlog:,} deliveries, "
            f"folded {m.drain_seconds:.1f} s later"
            if m.mode == "procfile"
            else ""
        )
        + ")"
        for m in runs
    )


def _bare_rows(kind: str, bare: list[Measured], wsgi: list[Measured]) -> list[Row]:
    label = f"ingest {LABELS[kind]}"
    NOTES.append(_runs_note(f"{label}, bare Flask", bare))
    rows = [
        row(f"{label}: bare Flask", _median([m.run.requests_per_second for m in bare]), "req/s"),
        row(f"{label}: bare p50 / p99", _latency(bare), "ms"),
    ]
    if wsgi:
        NOTES.append(_runs_note(f"{label}, plain WSGI", wsgi))
        rows.append(row(f"{label}: plain WSGI (context)", _median([m.run.requests_per_second for m in wsgi]), "req/s"))
    socket_errors = sum(m.run.socket_errors for m in bare + wsgi)
    if socket_errors:
        rows.append(row(f"{label}: bare socket errors", socket_errors, "", "0", False))
    return rows


def _rows(kind: str, backend: str, mode: str, bare: list[Measured], app: list[Measured]) -> list[Row]:
    label = f"ingest {LABELS[kind]}, {backend}, {MODES[mode]}"
    ratio = _ratio(bare, app)
    goal = TARGETS_PBX[backend] if kind == "pbx" else None
    target = f"≥ {goal}" if goal is not None else ""
    acknowledged = sum(m.acknowledged for m in app)
    committed = sum(m.committed for m in app)
    non_2xx = sum(m.run.non_2xx for m in app)
    socket_errors = sum(m.run.socket_errors for m in app)
    in_flight = sum(m.in_flight_at_stop for m in app)
    exact = all(m.acknowledged == m.committed for m in app) and non_2xx == 0 and in_flight == 0
    durability = f"{acknowledged:,} 2xx = {committed:,} rows, non-2xx {non_2xx}"
    if in_flight or socket_errors:
        durability += f", unanswered {in_flight}, socket errors {socket_errors}"
    NOTES.append(_runs_note(label, app))
    rows = [
        row(f"{label}", _median([m.run.requests_per_second for m in app]), "req/s"),
        row(f"{label}: p50 / p99", _latency(app), "ms"),
        row(f"{label}: / bare Flask", round(ratio, 3), "×", target, ratio >= goal if goal is not None else None),
        row(f"{label}: acknowledged = stored", durability, "", "equal, non-2xx 0", exact),
    ]
    if mode == "procfile":
        left = max(m.fold_left for m in app)
        rows += [
            row(f"{label}: worker backlog at stop, events to fold", _median_int(app, "fold_backlog"), "events"),
            row(f"{label}: worker backlog at stop, deliveries", _median_int(app, "delivery_backlog"), "jobs"),
            row(
                f"{label}: every event folded after the load in",
                _median([m.drain_seconds for m in app]),
                "s",
                f"≤ {FOLD_SECONDS:g} s",
                left == 0,
            ),
        ]
    return rows


def _latency(measured: list[Measured]) -> str:
    return f"{_median([m.run.p50_ms for m in measured]):.1f} / {_median([m.run.p99_ms for m in measured]):.1f}"


def main() -> int:
    """Command line: print the rows (and notes); exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--kinds", default="pbx,stt")
    parser.add_argument("--backends", default=None, help="default: sqlite, and postgresql when reachable")
    parser.add_argument("--modes", default="procfile,web", help="procfile (web + worker), web (web only)")
    parser.add_argument("--profile", action="store_true", default=None, help="profile even when the target is met")
    args = parser.parse_args()
    install_signal_handlers()
    backends = tuple(args.backends.split(",")) if args.backends else None
    rows = run(
        args.rounds, args.seconds, tuple(args.kinds.split(",")), args.profile, backends, tuple(args.modes.split(","))
    )
    status = main_for(rows)
    for note in NOTES:
        print(note)
    return status


if __name__ == "__main__":
    sys.exit(main())

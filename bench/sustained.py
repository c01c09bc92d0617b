"""Sustained throughput: the highest rate of calls the whole service keeps up with.

A call is what a user's PBX and speech-to-text vendor send: a PBX `call.finished` event and, right
after it, the call's generic transcript (30 segments). The service runs as users run it (the
Procfile's `web` and one or more `worker` processes, defaults otherwise) and delivers to several
fake Bitrix24 portals (fake_bitrix24/, run as its own process, without limits) through
B24SCRIBE_BITRIX24_PORTALS; the service's pacing is lifted (B24SCRIBE_RATE_PER_SECOND and
B24SCRIBE_RATE_BURST 1000) because this measures the engine, not Bitrix24's limits. Each call
becomes three requests to Bitrix24: register, finish, attachTranscription.

wrk offers calls at a fixed rate (open loop, bench/calls.lua) for a warm-up and then a 60 s window,
while the bench reads the backlog every second: the outbox's jobs not done yet (events to fold
into their calls, deliveries to make). The service keeps up with a rate when, over the window,
  - wrk could send at that rate (≥ 95 % of it) and every answer was a 2xx, and
  - the backlog stayed flat: its least-squares slope is at most 3 % of the rate at which jobs
    arrive (so the service completes ≥ 97 % of what arrives; a backlog that only wobbles is flat).
The rate is searched: a short overload probe and the drain after it estimate the capacity (calls
done / time from the probe's start until the backlog is empty), then rates are tried from 80 %
of the estimate, up (×1.25) until one is not kept up with or down (×0.8) until one is, then halving
the gap between the best rate kept up with and the lowest not (geometric mean) until they are within
10 % of each other or 5 rates were tried. Between steps the backlog is drained. At the end every
call whose event and transcript were acknowledged must carry exactly one transcript on the fake.

Run on SQLite (one worker) and on PostgreSQL with one and with two worker processes. Targets:
≥ 150 calls/s on SQLite; PostgreSQL with 2 workers ≥ 1.7 × PostgreSQL with 1.

    python bench/sustained.py [--configs sqlite:1,postgresql:1,postgresql:2] [--window 60] [--quick]

PostgreSQL: B24SCRIBE_BENCH_POSTGRES_URL or B24SCRIBE_TEST_POSTGRES_URL (a fresh schema per run,
dropped afterwards). Everything listens on 127.0.0.1; every process is killed with its process
group when the bench ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.common import (
    BIN,
    ROOT,
    TOKEN,
    DatabaseProbe,
    Row,
    Workspace,
    backends_available,
    database,
    generic_transcript,
    http,
    install_signal_handlers,
    main_for,
    row,
    run_wrk_until_drained,
    service_env,
    start_process,
    start_web,
    start_worker,
    stop_process,
    tail,
    wait_for_drain,
    workspace,
)

LUA = Path(__file__).resolve().parent / "calls.lua"
TARGET_SQLITE = 150.0  # calls/s
TARGET_SCALING = 1.7  # PostgreSQL, 2 workers / 1 worker
SEND_SHARE = 0.95  # wrk must reach this share of the offered rate
FLAT_SHARE = 0.03  # the backlog may grow by at most this share of the job arrival rate
CONNECTIONS = 64  # many independent senders: the schedule, not the connections, sets the pace
WRK_THREADS = 2
LIFTED_PACING = {"B24SCRIBE_RATE_PER_SECOND": "1000", "B24SCRIBE_RATE_BURST": "1000"}
NOTES: list[str] = []


@dataclass(frozen=True)
class Plan:
    """How long and how hard to search (the defaults are the full run; `quick()` a smoke run)."""

    window: float = 60.0  # seconds the backlog must stay flat
    warmup: float = 10.0  # seconds at the rate before the window starts
    probe: float = 10.0  # seconds of overload to estimate the capacity
    probe_rate: float = 400.0  # calls/s offered by the probe
    steps: int = 5  # rates tried after the probe, at most
    portals: int = 8
    drain: float = 120.0  # the longest wait for the backlog to empty between steps and at the end

    @classmethod
    def quick(cls) -> Plan:
        """Short steps, two of them: the harness works, the figures are rough."""
        return cls(window=10.0, warmup=3.0, probe=5.0, steps=2, portals=4, drain=60.0)


@dataclass(frozen=True)
class Sample:
    """The backlog and the newest job id at one moment (monotonic seconds)."""

    at: float
    backlog: int
    jobs: int


@dataclass(frozen=True)
class Load:
    """What calls.lua reported for one wrk run."""

    sent: int
    ok: int
    non_2xx: int
    socket_errors: int
    calls: int  # calls whose event and transcript were both sent
    late: int  # requests sent more than 100 ms behind the schedule
    seconds: float  # from the first request to the last answer
    p50_ms: float
    p99_ms: float
    refusal: str = ""  # the first non-2xx answer (status and body), if any


@dataclass
class Step:
    """One rate tried."""

    rate: float
    load: Load
    samples: list[Sample]
    window: tuple[float, float]

    @property
    def achieved(self) -> float:
        """Calls per second wrk really sent (answered requests / 2 over the run)."""
        return (self.load.ok + self.load.non_2xx) / 2 / self.load.seconds if self.load.seconds else 0.0

    def in_window(self) -> list[Sample]:
        """The samples taken in the measured window."""
        return [s for s in self.samples if self.window[0] <= s.at <= self.window[1]]

    @property
    def slope(self) -> float:
        """The backlog's least-squares growth over the window, jobs per second."""
        return slope([(s.at, float(s.backlog)) for s in self.in_window()])

    @property
    def job_rate(self) -> float:
        """Jobs created per second over the window."""
        window = self.in_window()
        if len(window) < 2 or window[-1].at <= window[0].at:
            return 0.0
        return (window[-1].jobs - window[0].jobs) / (window[-1].at - window[0].at)

    @property
    def sent_ok(self) -> bool:
        """wrk kept the rate and every answer was a 2xx."""
        return self.achieved >= SEND_SHARE * self.rate and self.load.non_2xx == 0 and self.load.socket_errors == 0

    @property
    def flat(self) -> bool:
        """The backlog did not grow over the window (beyond FLAT_SHARE of the arrivals)."""
        return len(self.in_window()) >= 3 and self.slope <= FLAT_SHARE * max(self.job_rate, 1.0)

    @property
    def kept_up(self) -> bool:
        """Both: the service took every call at the rate and finished what arrived."""
        return self.sent_ok and self.flat

    def describe(self) -> str:
        """One line for the notes."""
        window = self.in_window()
        backlog = f"{window[0].backlog:,} → {window[-1].backlog:,}" if window else "?"
        return (
            f"{self.rate:,.0f} calls/s offered, {self.achieved:,.1f} sent ({self.load.late:,} requests late, "
            f"non-2xx {self.load.non_2xx}, socket errors {self.load.socket_errors}, p50 {self.load.p50_ms:.0f} ms, "
            f"p99 {self.load.p99_ms:.0f} ms); backlog over the window {backlog} jobs, slope {self.slope:+.1f} "
            f"jobs/s vs {self.job_rate:,.0f} jobs/s arriving: {'kept up' if self.kept_up else 'NOT kept up'}"
            + (f"; first refusal: {self.load.refusal}" if self.load.refusal else "")
        )


@dataclass
class Outcome:
    """One configuration's search."""

    backend: str
    workers: int
    best: float = 0.0  # highest rate kept up with (0: none)
    failed_at: float = 0.0  # lowest rate not kept up with (0: none tried)
    estimate: float = 0.0  # the probe's capacity estimate
    steps: list[Step] = field(default_factory=list)
    calls: int = 0  # calls acknowledged completely (event and transcript)
    attached_once: int = 0
    attached_more: int = 0
    backlog_left: int = 0
    dead: int = 0  # jobs that gave up (a call that can then never be complete)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        """`sustained sqlite, 1 worker`."""
        return f"sustained {self.backend}, {self.workers} worker{'s' if self.workers > 1 else ''}"


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 with fewer than two distinct x)."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


# --- the fake Bitrix24, out of process -------------------------------------------------------


@dataclass
class Fake:
    """`python -m fake_bitrix24` in its own process (its own GIL): portals and control URL."""

    process: subprocess.Popen[bytes]
    portals: dict[str, str]  # our portal name → webhook URL
    control_url: str

    def state(self) -> dict[str, object]:
        """GET /_fake/state."""
        status, body = http("GET", self.control_url + "state", timeout=60)
        if status != 200:
            raise RuntimeError(f"the fake's state answered {status}")
        state: dict[str, object] = json.loads(body)
        return state


def start_fake(space: Workspace, portals: int) -> Fake:
    """The fake with `portals` portals, no rate limit, no faults; waits for its announcement."""
    log = space.path / "fake-bitrix24.log"
    argv = [str(BIN / "python"), "-m", "fake_bitrix24", "--port", "0", "--portals", str(portals)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    process = start_process(argv, env, ROOT, log, stdout=subprocess.PIPE)
    holder: list[bytes] = []
    reader = threading.Thread(target=_read_line, args=(process, holder), name="fake-announcement", daemon=True)
    reader.start()
    reader.join(timeout=30)
    if not holder:
        stop_process(process)
        raise RuntimeError(f"the fake Bitrix24 did not start; log {log}:\n{tail(log)}")
    line = holder[0]
    announced = json.loads(line)
    urls = list(announced["webhook_urls"])
    return Fake(process, {f"p{n + 1}": url for n, url in enumerate(urls)}, str(announced["control_url"]))


def _read_line(process: subprocess.Popen[bytes], holder: list[bytes]) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    if line:
        holder.append(line)


# --- load and samples ------------------------------------------------------------------------


class Sampler:
    """Reads the backlog and the newest job id every `every` seconds in a thread."""

    def __init__(self, url: str, every: float = 1.0) -> None:
        self.url = url
        self.every = every
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backlog-sampler", daemon=True)

    def _run(self) -> None:
        with DatabaseProbe(self.url) as probe:
            while not self._stop.is_set():
                at = time.monotonic()
                self.samples.append(Sample(at, probe.backlog(), probe.jobs_created()))
                self._stop.wait(max(0.0, self.every - (time.monotonic() - at)))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def offer(web_url: str, rate: float, seconds: float, number: int, portals: list[str], space: Workspace) -> Load:
    """wrk with calls.lua: `rate` calls/s for `seconds`, then every answer awaited."""
    from bench.ingest import ensure_wrk

    out = space.path / f"wrk-calls-{number}.json"
    body = space.path / "transcript.json"
    if not body.exists():
        body.write_bytes(generic_transcript(30))
    env = {
        **os.environ,
        "BENCH_TOKEN": TOKEN,
        "BENCH_PREFIX": f"s{number}",
        "BENCH_NUMBER": str(number),
        "BENCH_SECONDS": str(seconds),
        "BENCH_RATE": str(rate),
        "BENCH_THREADS": str(WRK_THREADS),
        "BENCH_PORTALS": " ".join(portals),
        "BENCH_BODY_FILE": str(body),
        "BENCH_OUT": str(out),
    }
    drain = 60.0
    argv = [ensure_wrk(), "-t", str(WRK_THREADS), "-c", str(CONNECTIONS), "-d", f"{seconds + drain:.0f}s"]
    argv += ["--timeout", f"{drain:.0f}s", "-s", str(LUA), web_url]
    log = space.path / f"wrk-calls-{number}.log"
    data = run_wrk_until_drained(argv, env, out, log, WRK_THREADS, seconds + drain + 30)
    errors = data["errors"]
    refused = sorted(out.parent.glob(f"{out.name}.refused.*"))
    return Load(
        sent=int(data["sent"]),
        ok=int(data["ok"]),
        non_2xx=int(data["non_2xx"]),
        socket_errors=int(errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]),
        calls=int(data["calls"]),
        late=int(data["late"]),
        seconds=float(data["window_s"]) or seconds,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        refusal=refused[0].read_text(errors="replace")[:300] if refused else "",
    )


# --- the search ------------------------------------------------------------------------------


def search(backend: str, workers: int, plan: Plan) -> Outcome:
    """Start the service on a fresh database, probe, step the rate, check every call on the fake."""
    outcome = Outcome(backend, workers)
    began = time.monotonic()
    with workspace() as space, database(space, backend, f"sustained-{backend}-{workers}") as url:
        fake = start_fake(space, plan.portals)
        processes: list[subprocess.Popen[bytes]] = [fake.process]
        try:
            portals = " ".join(f"{name}={hook}" for name, hook in fake.portals.items())
            env = service_env(space.path, url, {"B24SCRIBE_BITRIX24_PORTALS": portals, **LIFTED_PACING})
            web = start_web(space, env)
            processes.append(web.process)
            for number in range(workers):
                processes.append(start_worker(space, env, name=f"worker-{number + 1}"))
            names = list(fake.portals)
            number = 0

            def step(rate: float, seconds: float, warmup: float) -> Step:
                nonlocal number
                number += 1
                _drain(url, plan.drain, processes[2:], space)
                started = time.monotonic()
                with Sampler(url) as sampler:
                    load = offer(web.url, rate, warmup + seconds, number, names, space)
                outcome.calls += load.calls
                return Step(rate, load, sampler.samples, (started + warmup, started + warmup + seconds))

            probe = step(plan.probe_rate, plan.probe, 0.0)
            left, drained = wait_for_drain(url, plan.drain, processes[2:])
            with DatabaseProbe(url) as reader:
                jobs = reader.jobs_created()
            outcome.estimate = capacity(probe.load.calls, probe.load.seconds, drained, left, jobs)
            NOTES.append(
                f"{outcome.label}: probe {probe.describe()}; capacity estimate {outcome.estimate:,.0f} calls/s"
            )
            rate = max(5.0, round(0.8 * outcome.estimate))
            for _ in range(plan.steps):
                tried = step(rate, plan.window, plan.warmup)
                outcome.steps.append(tried)
                NOTES.append(f"{outcome.label}: {tried.describe()}")
                if tried.kept_up:
                    outcome.best = max(outcome.best, rate)
                else:
                    outcome.failed_at = min(outcome.failed_at or rate, rate)
                if outcome.best and outcome.failed_at:
                    if outcome.failed_at / outcome.best <= 1.1:
                        break  # known within 10 %
                    rate = round(math.sqrt(outcome.best * outcome.failed_at))  # halve the gap
                    if rate in (outcome.best, outcome.failed_at):
                        break  # as close as whole calls per second go
                elif outcome.best:
                    rate = round(rate * 1.25)
                else:
                    rate = max(1.0, round(rate * 0.8))
            outcome.backlog_left = _drain(url, plan.drain, processes[2:], space)
            with DatabaseProbe(url) as reader:
                outcome.dead = reader.scalar("SELECT count(*) FROM job WHERE state = 'dead'")
                if outcome.backlog_left:
                    NOTES.append(f"{outcome.label}: backlog left after {plan.drain:g} s: {reader.backlog_summary()}")
            attachments = fake.state()["attachments_by_call"]
            if not isinstance(attachments, dict):
                raise RuntimeError(f"the fake's state has no attachments_by_call object: {type(attachments)}")
            counts = [len(ids) for ids in attachments.values()]
            outcome.attached_once = sum(1 for n in counts if n == 1)
            outcome.attached_more = sum(1 for n in counts if n > 1)
        finally:
            for process in reversed(processes):
                stop_process(process)
    outcome.seconds = round(time.monotonic() - began, 1)
    return outcome


def capacity(calls: int, loaded: float, drained: float, backlog_left: int, jobs: int) -> float:
    """Calls per second over an overload probe and the drain after it: `calls` sent in `loaded`
    seconds, then `drained` seconds until the backlog was empty (or `backlog_left` of `jobs` jobs
    were still not done). The web and the worker share the machine while loaded and the worker has
    it alone while draining, so this lies between the whole service's capacity and the worker's."""
    elapsed = loaded + drained
    if calls <= 0 or elapsed <= 0:
        return 0.0
    done_share = 1.0 - backlog_left / max(1, jobs)
    return max(0.0, calls * done_share / elapsed)


def _drain(url: str, timeout: float, workers: list[subprocess.Popen[bytes]], space: Workspace) -> int:
    """Wait for the backlog to empty; the jobs left (a dead worker is an error)."""
    left, _ = wait_for_drain(url, timeout, workers)
    for number, worker in enumerate(workers, start=1):
        if worker.poll() is not None:
            log = space.path / f"worker-{number}.log"
            raise RuntimeError(f"worker {number} exited with {worker.returncode}; log {log}:\n{tail(log)}")
    return left


# --- rows ------------------------------------------------------------------------------------


def rows_for(outcomes: list[Outcome]) -> list[Row]:
    """The suite's rows: best rate per configuration, targets, exactly-once checks."""
    rows: list[Row] = []
    by_key = {(o.backend, o.workers): o for o in outcomes}
    for outcome in outcomes:
        target, ok = "", None
        if outcome.backend == "sqlite":
            target, ok = f"≥ {TARGET_SQLITE:g} calls/s", outcome.best >= TARGET_SQLITE
        ceiling = f" (not kept up at {outcome.failed_at:,.0f})" if outcome.failed_at else " (no rate failed)"
        rows.append(row(f"{outcome.label}: highest rate kept up{ceiling}", outcome.best, "calls/s", target, ok))
        exact = (
            outcome.attached_once == outcome.calls
            and outcome.attached_more == 0
            and outcome.backlog_left == 0
            and outcome.dead == 0
        )
        rows.append(
            row(
                f"{outcome.label}: attached exactly once",
                f"{outcome.attached_once:,} of {outcome.calls:,} calls, doubled {outcome.attached_more}, "
                f"backlog left {outcome.backlog_left}, dead jobs {outcome.dead}",
                "",
                "all, 0 doubled, 0 left",
                exact,
            )
        )
    one, two = by_key.get(("postgresql", 1)), by_key.get(("postgresql", 2))
    if one and two:
        ratio = two.best / one.best if one.best else 0.0
        rows.append(
            row(
                "sustained postgresql: 2 workers / 1 worker",
                round(ratio, 3),
                "×",
                f"≥ {TARGET_SCALING:g}",
                ratio >= TARGET_SCALING,
            )
        )
    return rows


def parse_configs(text: str) -> list[tuple[str, int]]:
    """`sqlite:1,postgresql:2` → [("sqlite", 1), ("postgresql", 2)]."""
    configs: list[tuple[str, int]] = []
    for item in text.split(","):
        backend, _, count = item.strip().partition(":")
        if backend not in ("sqlite", "postgresql") or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--configs: expected backend:workers such as sqlite:1 or postgresql:2, got {item!r}")
        configs.append((backend, int(count)))
    return configs


def default_configs() -> list[tuple[str, int]]:
    """SQLite with one worker; PostgreSQL with one and two when it is reachable."""
    configs = [("sqlite", 1)]
    if "postgresql" in backends_available():
        configs += [("postgresql", 1), ("postgresql", 2)]
    return configs


def run(configs: list[tuple[str, int]] | None = None, plan: Plan | None = None) -> list[Row]:
    """Every configuration's search; the suite's rows (notes in NOTES)."""
    NOTES.clear()
    outcomes = [search(backend, workers, plan or Plan()) for backend, workers in configs or default_configs()]
    return rows_for(outcomes)


def main() -> int:
    """Command line: print the rows and notes; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=None, help="backend:workers, comma-separated (default: all)")
    parser.add_argument("--window", type=float, default=None, help="seconds the backlog must stay flat (60)")
    parser.add_argument("--steps", type=int, default=None, help="rates tried after the probe, at most (5)")
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run; figures are rough)")
    args = parser.parse_args()
    install_signal_handlers()
    try:
        configs = parse_configs(args.configs) if args.configs else None
    except ValueError as error:
        parser.error(str(error))
    plan = Plan.quick() if args.quick else Plan()
    if args.window is not None or args.steps is not None:
        from dataclasses import replace

        plan = replace(plan, window=args.window or plan.window, steps=args.steps or plan.steps)
    rows = run(configs, plan)
    status = main_for(rows)
    for note in NOTES:
        print(note)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Fault run: nothing lost, nothing doubled, never throttled - while Bitrix24 misbehaves and workers die.

1,000 calls are created finished directly on the fake Bitrix24 (as another integration would), then
their 1,000 transcripts are posted concurrently (32 threads) to a real gunicorn web process. Worker
processes (`flask --app app worker`) deliver them while the fake answers 10 % of requests with 500
(nothing done), 10 % slower than the client timeout (done, answered late), and enforces a leaky
bucket with raised rates (burst 50, 50/s) that the service's pacing matches (45/s, burst 40). A
worker is killed with SIGKILL every few seconds and replaced. Leases are 2 s, the retry schedule
is short. At the end every call must carry exactly one transcript on the fake, and the fake should
have answered no 503.

    python bench/fault_run.py                        # SQLite (2 workers), and PostgreSQL (3 workers)
    python bench/fault_run.py --backend sqlite --calls 300 --kills 3
    B24SCRIBE_BENCH_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test python bench/fault_run.py

The PostgreSQL run uses B24SCRIBE_BENCH_POSTGRES_URL or B24SCRIBE_TEST_POSTGRES_URL (a fresh schema,
dropped afterwards). Everything listens on 127.0.0.1; every process runs in its own process group
and is killed with it when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypedDict

import requests
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/fault_run.py`: make the repository importable
    sys.path.insert(0, str(ROOT))

from b24scribe.db import Database  # noqa: E402
from b24scribe.models import AttachLedger, Base, Job  # noqa: E402
from tests.fake_bitrix24 import FakeBitrix24  # noqa: E402

BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
TOKEN = "fault-run-inbound-token-3b7e"
ADMIN_TOKEN = "fault-run-admin-token-8c21"
POSTGRES_ENV = ("B24SCRIBE_BENCH_POSTGRES_URL", "B24SCRIBE_TEST_POSTGRES_URL")


class Row(TypedDict):
    """One line of the benchmark suite's table."""

    name: str
    figure: float | int | str
    unit: str
    target: str
    ok: bool | None  # None: reported without a target


# --- processes -----------------------------------------------------------------------------


class Processes:
    """Subprocesses, each in its own process group; all killed (with their groups) on close."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._live: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._counter = Counter[str]()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start `argv` with its output in `<workdir>/<name>-<n>.log`."""
        with self._lock:
            self._counter[name] += 1
            log_path = self.workdir / f"{name}-{self._counter[name]}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                list(argv), cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        with self._lock:
            self._live.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process and its group, and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, process: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
        """SIGTERM the group, wait up to `grace` seconds, then SIGKILL; the exit status."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill(process)
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group
            os.killpg(process.pid, signal.SIGKILL)
        return process.returncode

    def close(self) -> None:
        """Stop everything still running."""
        with self._lock:
            live, self._live = self._live, []
        for process in live:
            self.stop(process, grace=5.0)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def service_env(
    workdir: Path, database_url: str, portals: Mapping[str, str], extra: Mapping[str, str]
) -> dict[str, str]:
    """The environment of the web and worker processes: only our B24SCRIBE_* variables."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("B24SCRIBE_")}
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir(exist_ok=True)
    env.update(
        {
            "B24SCRIBE_DATABASE_URL": database_url,
            "B24SCRIBE_BITRIX24_PORTALS": " ".join(f"{name}={url}" for name, url in portals.items()),
            "B24SCRIBE_INBOUND_TOKEN": TOKEN,
            "B24SCRIBE_ADMIN_TOKEN": ADMIN_TOKEN,
            "B24SCRIBE_LOG_LEVEL": "WARNING",
            "B24SCRIBE_ACCESS_LOG": "0",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            **extra,
        }
    )
    return env


def start_web(processes: Processes, env: Mapping[str, str], timeout: float = 30.0) -> str:
    """gunicorn 'app:create_app()' --config gunicorn.conf.py on a free port; its base URL once live."""
    port = free_port()
    web_env = {**env, "HOST": LOOPBACK, "PORT": str(port)}
    web = processes.start(
        "web", [str(BIN / "gunicorn"), "app:create_app()", "--config", str(ROOT / "gunicorn.conf.py")], web_env
    )
    base = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if web.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {web.returncode}; see {processes.workdir}/web-*.log")
        with contextlib.suppress(requests.RequestException):
            if requests.get(base + "/livez", timeout=1).status_code == 200:
                return base
        time.sleep(0.1)
    raise RuntimeError("gunicorn did not come up in time")


def worker_argv(threads: int) -> list[str]:
    """`flask --app app worker --threads N`."""
    return [sys.executable, "-m", "flask", "--app", "app", "worker", "--threads", str(threads)]


# --- databases -----------------------------------------------------------------------------


def backend_of(database_url: str) -> str:
    """sqlite or postgresql."""
    return "postgresql" if make_url(database_url).get_backend_name() == "postgresql" else "sqlite"


def postgres_url() -> str | None:
    """The PostgreSQL server to run against, if one is configured and reachable."""
    for name in POSTGRES_ENV:
        url = os.environ.get(name)
        if url:
            engine = create_engine(url)
            try:
                with engine.connect():
                    return url
            except Exception:  # noqa: BLE001 - unreachable means "skip this backend"
                return None
            finally:
                engine.dispose()
    return None


@contextlib.contextmanager
def fresh_database(backend: str, workdir: Path) -> Iterator[str]:
    """An empty database with every table: a SQLite file in `workdir`, or a new PostgreSQL schema."""
    if backend == "sqlite":
        url = f"sqlite:///{workdir / 'b24scribe.sqlite3'}"
        create_tables(url)
        yield url
        return
    server = postgres_url()
    if server is None:
        raise RuntimeError(f"no reachable PostgreSQL: set {POSTGRES_ENV[0]}")
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in server else "?"
    url = f"{server}{separator}options=-csearch_path%3D{schema}"
    try:
        create_tables(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def create_tables(database_url: str) -> None:
    """Every table of the service (what the test suite does; `flask db upgrade` in production)."""
    engine = create_engine(database_url)
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()


# --- the fake's side -----------------------------------------------------------------------


def add_portals(fake: FakeBitrix24, count: int) -> dict[str, str]:
    """`count` portals p1..pN on the fake, one webhook each: name → webhook URL."""
    return {f"p{n}": fake.add_webhook(portal=f"p{n}") for n in range(1, count + 1)}


def create_finished_calls(webhook_urls: Sequence[str], count: int, threads: int = 8) -> list[tuple[str, str]]:
    """Register and finish `count` calls directly on the fake, round-robin over the portals:
    [(portal index as str, CALL_ID)] in order. Run before any fault or limit is switched on."""
    local = threading.local()

    def create(index: int) -> tuple[str, str]:
        http: requests.Session | None = getattr(local, "http", None)
        if http is None:
            http = local.http = requests.Session()
        portal = index % len(webhook_urls)
        url = webhook_urls[portal]
        registered = http.post(
            url + "telephony.externalCall.register.json",
            json={"USER_ID": 1, "PHONE_NUMBER": f"+1555{index:07d}", "TYPE": 2, "EXTERNAL_CALL_ID": f"run-{index}"},
            timeout=10,
        )
        registered.raise_for_status()
        call_id = str(registered.json()["result"]["CALL_ID"])
        http.post(
            url + "telephony.externalCall.finish.json",
            json={"CALL_ID": call_id, "USER_ID": 1, "DURATION": 30 + index % 300},
            timeout=10,
        ).raise_for_status()
        return str(portal), call_id

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(create, range(count)))


def transcript_body(index: int) -> dict[str, Any]:
    """A small two-sided transcript, different for every call."""
    return {
        "segments": [
            {"start": 0.3, "end": 2.4, "text": f"Good afternoon, this is call {index}.", "channel": 0},
            {"start": 2.9, "end": 5.2, "text": "Hello, I would like to check my order.", "channel": 1},
            {"start": 5.6, "end": 7.0, "text": f"Order {index * 7919 % 100000} is on its way.", "channel": 0},
        ]
    }


def post_transcripts(
    web: str, calls: Sequence[tuple[str, str]], portal_names: Sequence[str], threads: int, deadline: float
) -> Counter[str]:
    """POST every call's transcript concurrently, retrying what fails like a vendor would: outcomes."""
    local = threading.local()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def post(item: tuple[int, tuple[str, str]]) -> None:
        index, (portal, call_id) = item
        http: requests.Session | None = getattr(local, "http", None)
        if http is None:
            http = local.http = requests.Session()
        url = f"{web}/hooks/stt/generic?b24_call_id={call_id}&portal={portal_names[int(portal)]}"
        outcome = "gave up"
        for attempt in range(8):
            if time.monotonic() > deadline:
                break
            try:
                answer = http.post(
                    url, json=transcript_body(index), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
                )
            except requests.RequestException:
                outcome = "connection error"
            else:
                if answer.status_code in (200, 202):
                    outcome = str(answer.status_code)
                    break
                outcome = f"HTTP {answer.status_code}"
                if answer.status_code < 500:
                    break
            time.sleep(0.2 * 2**attempt)
        with lock:
            outcomes[outcome] += 1

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(post, enumerate(calls)))
    return outcomes


# --- the run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultConfig:
    """Knobs of one fault run (the defaults are the acceptance run)."""

    calls: int = 1000
    portals: int = 1
    workers: int = 2
    threads: int = 2
    post_threads: int = 32
    error_rate: float = 0.10
    slow_rate: float = 0.10
    client_timeout: float = 0.5
    slow_seconds: float = 1.0
    fake_burst: float = 50.0
    fake_rate: float = 50.0
    rate: float = 45.0
    burst: int = 40
    lease_seconds: float = 2.0
    retry_schedule: str = "0.2,0.5,1,2,2,2,2,2,2,2,2,2,2,2,2"
    kills: int = 6
    kill_every: float = 6.0
    time_limit: float = 170.0
    seed: int = 20260101
    deny_statistics: bool = False  # the portal hides voximplant.statistic.get: resends are flagged


@dataclass
class FaultResult:
    """What a fault run measured."""

    backend: str
    workers: int
    threads: int
    portals: int
    calls: int
    deny_statistics: bool = False
    seconds: float = 0.0
    finished: bool = False
    attached_once: int = 0
    attached_more: int = 0
    missing: int = 0
    extra_attachments: int = 0
    possible_duplicates: int = 0
    count_503: int = 0
    kills: int = 0
    retries: int = 0
    jobs: dict[str, int] = field(default_factory=dict)
    posted: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    responses: dict[str, int] = field(default_factory=dict)
    logs: str = ""

    @property
    def ok(self) -> bool:
        """Every call's transcript attached exactly once (or, where the portal hides its statistics,
        every doubled call flagged as a possible duplicate), and no 503."""
        if self.deny_statistics:
            doubles_flagged = self.attached_more <= self.possible_duplicates
            return self.finished and self.missing == 0 and doubles_flagged and self.count_503 == 0
        return (
            self.finished
            and self.attached_once == self.calls
            and self.attached_more == 0
            and self.missing == 0
            and self.count_503 == 0
        )


def attach_states(db: Database) -> dict[str, int]:
    """Attach jobs by state."""
    with db.read() as session:
        rows = session.execute(select(Job.state, func.count()).where(Job.kind == "attach").group_by(Job.state))
        return {state: count for state, count in rows}


class Chaos:
    """Kills a random live worker with SIGKILL every `every` seconds (up to `kills`), replacing it."""

    def __init__(
        self,
        processes: Processes,
        start_worker: Callable[[], subprocess.Popen[bytes]],
        workers: list[subprocess.Popen[bytes]],
        kills: int,
        every: float,
        seed: int,
    ) -> None:
        self.processes = processes
        self.start_worker = start_worker
        self.workers = workers
        self.kills_wanted = kills
        self.every = every
        self.rng = random.Random(seed)
        self.kills = 0
        self.restarts = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def _run(self) -> None:
        while self.kills < self.kills_wanted and not self.stop.wait(self.every * self.rng.uniform(0.6, 1.4)):
            with self.lock:
                victim = self.rng.choice(self.workers)
                self.processes.kill(victim)
                self.kills += 1
                self.workers[self.workers.index(victim)] = self.start_worker()

    def replace_crashed(self) -> None:
        """A worker that exited on its own is restarted too (and counted)."""
        with self.lock:
            for position, worker in enumerate(self.workers):
                if worker.poll() is not None:
                    self.restarts += 1
                    self.workers[position] = self.start_worker()


def run_fault(database_url: str, config: FaultConfig, workdir: Path) -> FaultResult:
    """One fault run against an empty database at `database_url` (tables are created if missing)."""
    create_tables(database_url)
    result = FaultResult(
        backend_of(database_url), config.workers, config.threads, config.portals, config.calls, config.deny_statistics
    )
    result.logs = str(workdir)
    db = Database(database_url, group_commit=False)
    with FakeBitrix24(host=LOOPBACK) as fake, Processes(workdir) as processes:
        portals = add_portals(fake, config.portals)
        calls = create_finished_calls(list(portals.values()), config.calls)
        set_up_requests = len(fake.requests)
        fake.set_rate_limit(burst=config.fake_burst, rate=config.fake_rate)
        fake.set_faults(
            error_rate=config.error_rate,
            slow_rate=config.slow_rate,
            slow_seconds=config.slow_seconds,
            seed=config.seed,
        )
        fake.configure(deny_statistics=config.deny_statistics)
        env = service_env(
            workdir,
            database_url,
            portals,
            {
                "B24SCRIBE_RATE_PER_SECOND": str(config.rate),
                "B24SCRIBE_RATE_BURST": str(config.burst),
                "B24SCRIBE_LEASE_SECONDS": str(config.lease_seconds),
                "B24SCRIBE_BITRIX24_TIMEOUT": str(config.client_timeout),
                "B24SCRIBE_RETRY_SCHEDULE": config.retry_schedule,
                "B24SCRIBE_WORKER_POLL_SECONDS": "0.2",
            },
        )
        web = start_web(processes, env)
        workers = [processes.start("worker", worker_argv(config.threads), env) for _ in range(config.workers)]
        chaos = Chaos(
            processes,
            lambda: processes.start("worker", worker_argv(config.threads), env),
            workers,
            config.kills,
            config.kill_every,
            config.seed,
        )
        started = time.monotonic()
        deadline = started + config.time_limit
        chaos.thread.start()
        posted = post_transcripts(web, calls, list(portals), config.post_threads, deadline)
        result.posted = dict(posted)
        while time.monotonic() < deadline:
            states = attach_states(db)
            if states.get("done", 0) >= config.calls or (
                sum(states.values()) >= config.calls and not {"pending", "leased", "waiting"} & set(states)
            ):
                result.finished = states.get("done", 0) == config.calls
                break
            chaos.replace_crashed()
            time.sleep(0.25)
        result.seconds = round(time.monotonic() - started, 1)
        chaos.stop.set()
        chaos.thread.join(timeout=15)
        result.kills = chaos.kills
        for worker in list(chaos.workers):
            processes.stop(worker, grace=10.0)
        result.jobs = attach_states(db)
        with db.read() as session:
            result.retries = int(session.scalar(select(func.sum(Job.attempts)).where(Job.kind == "attach")) or 0)
            result.possible_duplicates = int(
                session.scalar(select(func.count()).where(AttachLedger.possible_duplicate.is_(True))) or 0
            )
        attachments = fake.attachments_by_call(portal=None)
        recorded = fake.requests[set_up_requests:]
    db.dispose()
    counts = [len(attachments.get(call_id, [])) for _, call_id in calls]
    result.attached_once = sum(1 for n in counts if n == 1)
    result.attached_more = sum(1 for n in counts if n > 1)
    result.missing = sum(1 for n in counts if n == 0)
    result.extra_attachments = sum(n - 1 for n in counts if n > 1)
    result.count_503 = sum(1 for r in recorded if r.status == 503)
    result.requests = dict(Counter(r.method for r in recorded))
    result.responses = {str(k): v for k, v in sorted(Counter(r.status for r in recorded).items())}
    return result


def rows_for(result: FaultResult, time_target: float = 180.0) -> list[Row]:
    """The suite's rows for one run."""
    label = f"fault run {result.backend} ({result.workers} workers)"
    return [
        {
            "name": f"{label}: attached exactly once",
            "figure": result.attached_once,
            "unit": f"of {result.calls} calls",
            "target": f"= {result.calls}",
            "ok": result.attached_once == result.calls and result.finished,
        },
        {
            "name": f"{label}: attached twice or more",
            "figure": result.attached_more,
            "unit": "calls",
            "target": "0",
            "ok": result.attached_more == 0,
        },
        {
            "name": f"{label}: possible duplicates flagged",
            "figure": result.possible_duplicates,
            "unit": "",
            "target": "",
            "ok": None,
        },
        {"name": f"{label}: 503 from Bitrix24", "figure": result.count_503, "unit": "", "target": "0", "ok": None},
        {
            "name": f"{label}: time",
            "figure": result.seconds,
            "unit": "s",
            "target": f"≤ {time_target:g} s",
            "ok": result.seconds <= time_target and result.finished,
        },
        {"name": f"{label}: SIGKILLs", "figure": result.kills, "unit": "", "target": "", "ok": None},
        {"name": f"{label}: retries spent", "figure": result.retries, "unit": "attempts", "target": "", "ok": None},
    ]


def describe(result: FaultResult) -> str:
    """The figures of one run, for people."""
    lines = [
        f"fault run on {result.backend}: {result.workers} workers × {result.threads} threads, "
        f"{result.portals} portal(s), {result.calls} calls"
        + (", the portal hides its call statistics" if result.deny_statistics else ""),
        f"  time                         {result.seconds:.1f} s ({'finished' if result.finished else 'NOT finished'})",
        f"  attached exactly once        {result.attached_once} / {result.calls}",
        f"  attached twice or more       {result.attached_more} ({result.extra_attachments} extra transcripts)",
        f"  missing                      {result.missing}",
        f"  possible duplicates flagged  {result.possible_duplicates}",
        f"  503 from the fake            {result.count_503}",
        f"  workers killed (SIGKILL)     {result.kills}",
        f"  retries (attempts spent)     {result.retries}",
        f"  attach jobs by state         {json.dumps(result.jobs, sort_keys=True)}",
        f"  posts                        {json.dumps(result.posted, sort_keys=True)}",
        f"  requests to Bitrix24         {json.dumps(result.requests, sort_keys=True)}",
        f"  answers                      {json.dumps(result.responses, sort_keys=True)}",
        f"  logs                         {result.logs}",
    ]
    return "\n".join(lines)


def run_backend(backend: str, config: FaultConfig, keep: bool = False) -> FaultResult:
    """A fault run on a fresh database of `backend` in a temporary directory."""
    workdir = Path(tempfile.mkdtemp(prefix=f"b24scribe-fault-{backend}-"))
    with fresh_database(backend, workdir) as url:
        result = run_fault(url, config, workdir)
    if result.ok and not keep:
        for path in sorted(workdir.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        workdir.rmdir()
        result.logs = "(removed)"
    return result


def backends() -> list[str]:
    """SQLite always; PostgreSQL when one is configured and reachable."""
    return ["sqlite"] + (["postgresql"] if postgres_url() else [])


def config_for(backend: str, **changes: Any) -> FaultConfig:
    """The acceptance configuration: 2 workers on SQLite, 3 on PostgreSQL."""
    return FaultConfig(**{"workers": 2 if backend == "sqlite" else 3, **changes})


def run() -> list[Row]:
    """The suite's entry point: the acceptance run on every available backend."""
    rows: list[Row] = []
    for backend in backends():
        rows.extend(rows_for(run_backend(backend, config_for(backend))))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the figures of each backend's run; exit 1 if a call is missing, doubled or too slow."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "all"], default="all")
    parser.add_argument("--calls", type=int, default=FaultConfig.calls)
    parser.add_argument("--portals", type=int, default=FaultConfig.portals)
    parser.add_argument("--workers", type=int, default=None, help="default: 2 on SQLite, 3 on PostgreSQL")
    parser.add_argument("--threads", type=int, default=FaultConfig.threads, help="claim loops per worker")
    parser.add_argument("--kills", type=int, default=FaultConfig.kills)
    parser.add_argument("--kill-every", type=float, default=FaultConfig.kill_every)
    parser.add_argument("--time-limit", type=float, default=FaultConfig.time_limit)
    parser.add_argument("--seed", type=int, default=FaultConfig.seed)
    parser.add_argument("--deny-statistics", action="store_true", help="the portal hides voximplant.statistic.get")
    parser.add_argument("--keep", action="store_true", help="keep the logs and database")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    args = parser.parse_args(argv)

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds the context managers: processes are killed

    signal.signal(signal.SIGTERM, interrupted)
    chosen = backends() if args.backend == "all" else [args.backend]
    failed = False
    for backend in chosen:
        changes: dict[str, Any] = {
            "calls": args.calls,
            "portals": args.portals,
            "threads": args.threads,
            "kills": args.kills,
            "kill_every": args.kill_every,
            "time_limit": args.time_limit,
            "seed": args.seed,
            "deny_statistics": args.deny_statistics,
        }
        if args.workers is not None:
            changes["workers"] = args.workers
        result = run_backend(backend, config_for(backend, **changes), keep=args.keep)
        print(json.dumps(asdict(result)) if args.json else describe(result), flush=True)
        failed = failed or not result.ok or result.seconds > args.time_limit
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

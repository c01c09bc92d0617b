"""Fault run: nothing lost, nothing doubled, never throttled - while Bitrix24 misbehaves and workers die.

The acceptance run uses the service's default settings (as users run it): 300 calls are created
finished directly on the fake Bitrix24 (as another integration would), over 3 portals, then their
300 transcripts are posted concurrently (32 threads) to a real gunicorn web process. Worker
processes (the Procfile's `flask --app app worker`, 2 on SQLite and 3 on PostgreSQL) deliver them
while the fake answers 10 % of requests with 500 (nothing done), 10 % only after the service's
Bitrix24 timeout has passed (done, answered too late: 21 s against the default 20 s), and enforces
Bitrix24's leaky bucket (burst 50, 2/s per portal) against the service's default pacing (45, 2/s).
A random worker is killed with SIGKILL at 3 random moments (when the share of calls attached
reaches points drawn from 5-80 %) and replaced. Every call must carry
exactly one transcript on the fake within 240 s, and the fake should have answered no 503.

The suite's test (tests/test_fault_tolerance.py) runs the same machinery small and fast:
`FaultConfig.fast()`, 100 calls with short leases, timeouts and retry delays.

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
from fake_bitrix24 import FakeBitrix24  # noqa: E402

BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
TOKEN = "fault-run-inbound-token-3b7e"
ADMIN_TOKEN = "fault-run-admin-token-8c21"
POSTGRES_ENV = ("B24SCRIBE_BENCH_POSTGRES_URL", "B24SCRIBE_TEST_POSTGRES_URL")
ATTACH = "telephony.call.attachtranscription"
NOTES: list[str] = []  # the figures of the suite's runs (describe())


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


def worker_argv(threads: int | None = None) -> list[str]:
    """`flask --app app worker` (the Procfile's command), with `--threads N` when given."""
    argv = [sys.executable, "-m", "flask", "--app", "app", "worker"]
    return argv + (["--threads", str(threads)] if threads is not None else [])


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


DEFAULT_BITRIX24_TIMEOUT = 20.0  # the service's B24SCRIBE_BITRIX24_TIMEOUT default


@dataclass(frozen=True)
class FaultConfig:
    """Knobs of one fault run (the defaults are the acceptance run). A service setting left None
    is not set: the service runs with its own default, as users run it."""

    calls: int = 300
    portals: int = 3
    workers: int = 2
    threads: int | None = None  # claim loops per worker (`--threads`); None: the Procfile's command
    post_threads: int = 32
    error_rate: float = 0.10
    slow_rate: float = 0.10
    client_timeout: float | None = None  # B24SCRIBE_BITRIX24_TIMEOUT
    slow_seconds: float | None = None  # None: one second longer than the client's timeout
    fake_burst: float = 50.0  # Bitrix24's own bucket
    fake_rate: float = 2.0
    rate: float | None = None  # B24SCRIBE_RATE_PER_SECOND
    burst: int | None = None  # B24SCRIBE_RATE_BURST
    lease_seconds: float | None = None  # B24SCRIBE_LEASE_SECONDS
    retry_schedule: str | None = None  # B24SCRIBE_RETRY_SCHEDULE
    poll_seconds: float | None = None  # B24SCRIBE_WORKER_POLL_SECONDS
    kills: int = 3
    # the SIGKILLs come at random moments of the run: when the share of calls attached reaches
    # points drawn uniformly from this range (so they land mid-run however fast the machine is)
    kill_between: tuple[float, float] = (0.05, 0.8)
    time_limit: float = 240.0  # every call attached on the fake within this
    settle_seconds: float = 60.0  # how long past it the run waits for the outbox to know it is done
    seed: int = 20260101
    deny_statistics: bool = False  # the portal hides voximplant.statistic.get: resends are flagged

    @classmethod
    def fast(cls, **changes: Any) -> FaultConfig:
        """The test suite's run: 100 calls on one portal, short timeouts, leases and retry delays,
        raised Bitrix24 limits (the service's pacing matches them)."""
        settings: dict[str, Any] = {
            "calls": 100,
            "portals": 1,
            "threads": 2,
            "client_timeout": 0.5,
            "slow_seconds": 1.0,
            "fake_burst": 50.0,
            "fake_rate": 50.0,
            "rate": 45.0,
            "burst": 40,
            "lease_seconds": 2.0,
            "retry_schedule": "0.2,0.5,1,2,2,2,2,2,2,2,2,2,2,2,2",
            "poll_seconds": 0.2,
            "kills": 3,
        }
        return cls(**{**settings, **changes})

    @property
    def slow_answer_seconds(self) -> float:
        """How late the fake's slow answers come: after the service's timeout."""
        if self.slow_seconds is not None:
            return self.slow_seconds
        return (self.client_timeout or DEFAULT_BITRIX24_TIMEOUT) + 1.0

    def service_settings(self) -> dict[str, str]:
        """The B24SCRIBE_* variables this run sets (none of them: the service's defaults)."""
        chosen = {
            "B24SCRIBE_RATE_PER_SECOND": self.rate,
            "B24SCRIBE_RATE_BURST": self.burst,
            "B24SCRIBE_LEASE_SECONDS": self.lease_seconds,
            "B24SCRIBE_BITRIX24_TIMEOUT": self.client_timeout,
            "B24SCRIBE_RETRY_SCHEDULE": self.retry_schedule,
            "B24SCRIBE_WORKER_POLL_SECONDS": self.poll_seconds,
        }
        return {name: str(value) for name, value in chosen.items() if value is not None}


@dataclass
class FaultResult:
    """What a fault run measured."""

    backend: str
    workers: int
    threads: int | None
    portals: int
    calls: int
    deny_statistics: bool = False
    time_limit: float = 240.0
    settings: dict[str, str] = field(default_factory=dict)  # what the run set; the rest are defaults
    seconds: float = 0.0  # until the outbox had done every attach job (or gave up waiting)
    attached_seconds: float | None = None  # until the fake had every call's transcript (None: not all)
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
        """Every call's transcript attached exactly once in time (or, where the portal hides its
        statistics, every doubled call flagged as a possible duplicate), and no 503. The outbox may
        still hold a retry then (`finished` False): with the default schedule a job that failed three
        times waits 10 minutes, although an earlier, too slow attempt may have attached it."""
        if self.deny_statistics:
            doubles_flagged = self.attached_more <= self.possible_duplicates
            return self.finished and self.missing == 0 and doubles_flagged and self.count_503 == 0
        return (
            self.in_time
            and self.attached_once == self.calls
            and self.attached_more == 0
            and self.missing == 0
            and self.count_503 == 0
        )

    @property
    def in_time(self) -> bool:
        """Every call had its transcript on the fake within the time limit."""
        return self.attached_seconds is not None and self.attached_seconds <= self.time_limit


def attach_states(db: Database) -> dict[str, int]:
    """Attach jobs by state."""
    with db.read() as session:
        rows = session.execute(select(Job.state, func.count()).where(Job.kind == "attach").group_by(Job.state))
        return {state: count for state, count in rows}


class Chaos:
    """Kills a random live worker with SIGKILL, and replaces it, each time the share of calls done
    (`progress()`, 0-1) reaches one of `kills` points drawn at random from `between`."""

    def __init__(
        self,
        processes: Processes,
        start_worker: Callable[[], subprocess.Popen[bytes]],
        workers: list[subprocess.Popen[bytes]],
        kills: int,
        between: tuple[float, float],
        seed: int,
        progress: Callable[[], float],
    ) -> None:
        self.processes = processes
        self.start_worker = start_worker
        self.workers = workers
        self.rng = random.Random(seed)
        self.points = sorted(self.rng.uniform(*between) for _ in range(kills))
        self.progress = progress
        self.kills = 0
        self.restarts = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def _run(self) -> None:
        while self.kills < len(self.points) and not self.stop.wait(0.1):
            if self.progress() < self.points[self.kills]:
                continue
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
        backend_of(database_url),
        config.workers,
        config.threads,
        config.portals,
        config.calls,
        config.deny_statistics,
        config.time_limit,
        config.service_settings(),
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
            slow_seconds=config.slow_answer_seconds,
            seed=config.seed,
        )
        fake.configure(deny_statistics=config.deny_statistics)
        env = service_env(workdir, database_url, portals, config.service_settings())
        web = start_web(processes, env)
        workers = [processes.start("worker", worker_argv(config.threads), env) for _ in range(config.workers)]
        chaos = Chaos(
            processes,
            lambda: processes.start("worker", worker_argv(config.threads), env),
            workers,
            config.kills,
            config.kill_between,
            config.seed,
            lambda: attach_states(db).get("done", 0) / config.calls,
        )
        started, wall_started = time.monotonic(), time.time()
        deadline = started + config.time_limit
        chaos.thread.start()
        posted = post_transcripts(web, calls, list(portals), config.post_threads, deadline)
        result.posted = dict(posted)
        # past the deadline the run goes on a while, so that what the outbox still does (a resend
        # that would double a call) is seen; the deadline itself is checked on the fake's clock
        while time.monotonic() < deadline + config.settle_seconds:
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
    first_attached: dict[str, float] = {}
    for request in recorded:
        if request.method == ATTACH and request.status == 200:
            first_attached.setdefault(str(request.params.get("CALL_ID")), request.timestamp)
    if len(first_attached) >= len(calls):
        result.attached_seconds = round(max(first_attached.values()) - wall_started, 1)
    counts = [len(attachments.get(call_id, [])) for _, call_id in calls]
    result.attached_once = sum(1 for n in counts if n == 1)
    result.attached_more = sum(1 for n in counts if n > 1)
    result.missing = sum(1 for n in counts if n == 0)
    result.extra_attachments = sum(n - 1 for n in counts if n > 1)
    result.count_503 = sum(1 for r in recorded if r.status == 503)
    result.requests = dict(Counter(r.method for r in recorded))
    result.responses = {str(k): v for k, v in sorted(Counter(r.status for r in recorded).items())}
    return result


def rows_for(result: FaultResult) -> list[Row]:
    """The suite's rows for one run."""
    time_target = result.time_limit
    label = f"fault run {result.backend}, {result.calls} calls, {result.workers} workers"
    return [
        {
            "name": f"{label}: attached exactly once",
            "figure": result.attached_once,
            "unit": f"of {result.calls} calls",
            "target": f"= {result.calls}",
            "ok": result.attached_once == result.calls,
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
            "name": f"{label}: every call attached after",
            "figure": result.attached_seconds if result.attached_seconds is not None else "never",
            "unit": "s" if result.attached_seconds is not None else "",
            "target": f"≤ {time_target:g} s",
            "ok": result.in_time,
        },
        {
            "name": f"{label}: the outbox knew every attach done after",
            "figure": result.seconds if result.finished else f"not in {result.seconds:g} s: {result.jobs}",
            "unit": "s" if result.finished else "",
            "target": "",
            "ok": None,
        },
        {"name": f"{label}: SIGKILLs", "figure": result.kills, "unit": "", "target": "", "ok": None},
        {"name": f"{label}: retries spent", "figure": result.retries, "unit": "attempts", "target": "", "ok": None},
    ]


def describe(result: FaultResult) -> str:
    """The figures of one run, for people."""
    lines = [
        f"fault run on {result.backend}: {result.workers} workers"
        + (f" × {result.threads} threads" if result.threads is not None else "")
        + f", {result.portals} portal(s), {result.calls} calls"
        + (", the portal hides its call statistics" if result.deny_statistics else ""),
        "  settings                     "
        + (" ".join(f"{k}={v}" for k, v in sorted(result.settings.items())) or "the service's defaults"),
        "  every call attached after    "
        + (f"{result.attached_seconds:.1f} s" if result.attached_seconds is not None else "never (calls missing)")
        + f", limit {result.time_limit:g} s",
        f"  outbox done after            {result.seconds:.1f} s ({'finished' if result.finished else 'NOT finished'})",
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


def config_for(backend: str, fast: bool = False, **changes: Any) -> FaultConfig:
    """The acceptance configuration (or the test suite's `fast` one): 2 workers on SQLite, 3 on PostgreSQL."""
    changes = {"workers": 2 if backend == "sqlite" else 3, **changes}
    return FaultConfig.fast(**changes) if fast else FaultConfig(**changes)


def run(quick: bool = False) -> list[Row]:
    """The suite's entry point: the acceptance run on every available backend (quick: the fast
    configuration of the test suite, 100 calls)."""
    rows: list[Row] = []
    for backend in backends():
        result = run_backend(backend, config_for(backend, fast=quick))
        NOTES.append(describe(result))
        rows.extend(rows_for(result))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the figures of each backend's run; exit 1 if a call is missing, doubled or too slow."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "all"], default="all")
    parser.add_argument("--fast", action="store_true", help="the test suite's configuration (short timeouts)")
    parser.add_argument("--calls", type=int, default=None, help=f"default {FaultConfig.calls}")
    parser.add_argument("--portals", type=int, default=None, help=f"default {FaultConfig.portals}")
    parser.add_argument("--workers", type=int, default=None, help="default: 2 on SQLite, 3 on PostgreSQL")
    parser.add_argument("--threads", type=int, default=None, help="claim loops per worker (default: the Procfile's)")
    parser.add_argument("--kills", type=int, default=None, help=f"default {FaultConfig.kills}")
    parser.add_argument("--time-limit", type=float, default=None, help=f"default {FaultConfig.time_limit:g} s")
    parser.add_argument("--seed", type=int, default=None)
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
        given = {
            "calls": args.calls,
            "portals": args.portals,
            "workers": args.workers,
            "threads": args.threads,
            "kills": args.kills,
            "time_limit": args.time_limit,
            "seed": args.seed,
        }
        changes: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
        if args.deny_statistics:
            changes["deny_statistics"] = True
        result = run_backend(backend, config_for(backend, fast=args.fast, **changes), keep=args.keep)
        print(json.dumps(asdict(result)) if args.json else describe(result), flush=True)
        failed = failed or not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

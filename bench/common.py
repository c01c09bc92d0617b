"""Shared plumbing of the benchmarks: rows, processes (one process group each, always reaped),
the real web and worker processes on a fresh database (a SQLite file, or a PostgreSQL schema of
B24SCRIBE_BENCH_POSTGRES_URL / B24SCRIBE_TEST_POSTGRES_URL), the worker's backlog read beside them,
the in-process fake Bitrix24, payloads, and the machine's description.

Everything listens on 127.0.0.1 only; every subprocess is bounded in time and killed with its
process group when the bench ends (normally, on an exception, or on SIGTERM/SIGINT).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, TypedDict

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/x.py`: make the repository importable
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from fake_bitrix24 import FakeBitrix24

BIN = Path(sys.executable).parent
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
TOKEN = "bench-inbound-token-5d1e"
LOOPBACK = "127.0.0.1"


class Row(TypedDict):
    """One line of the results table."""

    name: str
    figure: float | int | str
    unit: str
    target: str
    ok: bool | None  # None: informational, no target


def row(name: str, figure: float | int | str, unit: str = "", target: str = "", ok: bool | None = None) -> Row:
    """A results row; `ok` None means the figure is reported without a target."""
    return {"name": name, "figure": figure, "unit": unit, "target": target, "ok": ok}


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in [0, 1]) of a non-empty sequence."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[index]


def print_rows(rows: Sequence[Row], file: IO[str] | None = None) -> None:
    """The `bench | figure | target | ok` table."""
    out = file or sys.stdout
    shown = [(r["name"], format_figure(r["figure"], r["unit"]), r["target"] or "—", verdict(r["ok"])) for r in rows]
    widths = [max(len(h), *(len(s[i]) for s in shown)) for i, h in enumerate(("bench", "figure", "target", "ok"))]
    header = ("bench", "figure", "target", "ok")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), file=out)
    print("-+-".join("-" * w for w in widths), file=out)
    for line in shown:
        cells = [line[0].ljust(widths[0]), line[1].rjust(widths[1]), line[2].ljust(widths[2]), line[3]]
        print(" | ".join(cells), file=out)


def format_figure(figure: float | int | str, unit: str) -> str:
    """A figure with its unit, floats rounded to what is meaningful."""
    if isinstance(figure, float):
        text = f"{figure:,.0f}" if abs(figure) >= 1000 else f"{figure:.3f}" if abs(figure) < 10 else f"{figure:.1f}"
    elif isinstance(figure, int):
        text = f"{figure:,}"
    else:
        text = figure
    return f"{text} {unit}".strip()


def verdict(ok: bool | None) -> str:
    """ok / MISS / — (informational)."""
    return "—" if ok is None else "ok" if ok else "MISS"


def main_for(run_rows: Sequence[Row]) -> int:
    """Print a bench's rows; exit status 1 when a target is missed."""
    print_rows(run_rows)
    return 1 if any(r["ok"] is False for r in run_rows) else 0


# --- Machine -------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """CPU model, cores, Python, SQLite: printed above the table."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": str(os.cpu_count() or 0),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
    }


# --- Processes -----------------------------------------------------------------------------

_LIVE: dict[int, subprocess.Popen[bytes]] = {}
_LIVE_LOCK = threading.Lock()


def _reap_all() -> None:
    with _LIVE_LOCK:
        processes = list(_LIVE.values())
    for process in processes:
        stop_process(process, grace=3.0)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    _reap_all()
    raise SystemExit(128 + signum)


atexit.register(_reap_all)


def install_signal_handlers() -> None:
    """SIGTERM/SIGINT: kill every process group we started, then exit (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


def start_process(
    argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path, stdout: int | IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own process group (so it and its children can be killed together)."""
    log_file = log.open("ab")
    try:
        process = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log_file,
            stderr=log_file,
            start_new_session=True,
        )
    finally:
        log_file.close()
    with _LIVE_LOCK:
        _LIVE[process.pid] = process
    return process


def stop_process(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it after `grace` seconds."""
    with _LIVE_LOCK:
        _LIVE.pop(process.pid, None)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    # the group may outlive its leader (gunicorn workers): make sure nothing of it is left
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def http(
    method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    """One HTTP request (status, body); HTTP errors are answers, not exceptions."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Wait until GET `url` answers 200 (the process must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}; log {log}:\n{tail(log)}")
        with contextlib.suppress(OSError):
            if http("GET", url, timeout=2.0)[0] == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s; log {log}:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def children(pid: int) -> list[int]:
    """Direct children of a process (gunicorn's workers)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.extend(int(p) for p in (task / "children").read_text().split())
    return sorted(set(found))


def proc_status_kib(pid: int, key: str) -> int:
    """A `VmHWM`/`VmRSS` line of /proc/<pid>/status in KiB (0 if the process is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 if it is gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


# --- The service ---------------------------------------------------------------------------


def service_env(workdir: Path, database_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a web or worker process: ours, without the developer's B24SCRIBE_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24SCRIBE_", "PROMETHEUS_MULTIPROC"))}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONDONTWRITEBYTECODE": "1",
            "B24SCRIBE_DATABASE_URL": database_url,
            "B24SCRIBE_INBOUND_TOKEN": TOKEN,
            "HOST": LOOPBACK,
            # inside the workspace, so it goes with it (the default is a directory under /tmp)
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus"),
        }
    )
    env.pop("WEB_CONCURRENCY", None)  # the Procfile's settings: gunicorn.conf.py's defaults
    env.pop("WEB_THREADS", None)
    env.update(extra or {})
    return env


@dataclass
class Workspace:
    """A temporary directory (working directory of the processes, database, logs)."""

    path: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="b24scribe-bench-")))
    keep: bool = False

    def cleanup(self) -> None:
        """Remove the directory unless asked to keep it."""
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def workspace(keep: bool = False) -> Iterator[Workspace]:
    """A Workspace removed at the end."""
    space = Workspace(keep=keep or os.environ.get("BENCH_KEEP") == "1")
    try:
        yield space
    finally:
        space.cleanup()


def fresh_database(space: Workspace, name: str) -> str:
    """A new SQLite database migrated with `flask --app app db upgrade` (the release step)."""
    path = space.path / f"{name}.sqlite3"
    url = f"sqlite:///{path}"
    migrate(space, url, name)
    return url


def database_path(url: str) -> Path:
    """The file of a `sqlite:///` URL."""
    return Path(url.removeprefix("sqlite:///"))


def is_sqlite(url: str) -> bool:
    """True for a `sqlite:` URL (else the bench runs on PostgreSQL)."""
    return url.startswith("sqlite:")


def count_rows(url: str, table: str, where: str = "") -> int:
    """SELECT count(*) on the bench's own database (SQLite file or PostgreSQL schema)."""
    query = f"SELECT count(*) FROM {table}" + (f" WHERE {where}" if where else "")  # noqa: S608
    if is_sqlite(url):
        with contextlib.closing(sqlite3.connect(database_path(url), timeout=30)) as connection:
            return int(connection.execute(query).fetchone()[0])
    from sqlalchemy import create_engine, text

    engine = create_engine(url, poolclass=_null_pool())
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(query)).scalar_one())
    finally:
        engine.dispose()


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool


# The outbox's jobs that are not finished yet: the worker's backlog (stored events still to fold,
# and deliveries to Bitrix24 still to make or waiting for their call).
BACKLOG_STATES = ("waiting", "pending", "leased")
BACKLOG_WHERE = "state IN ({})".format(", ".join(f"'{state}'" for state in BACKLOG_STATES))


class DatabaseProbe:
    """One read connection of the bench to the service's database: backlog and counts, cheaply.

    A reader beside the service: SQLite in WAL mode lets it read while the service writes; on
    PostgreSQL it is one more connection. Every query is an indexed count (`ix_job_due`).
    """

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        self.url = url
        self.engine = create_engine(url, poolclass=_null_pool())
        self._connection = self.engine.connect()

    def scalar(self, query: str) -> int:
        """One integer (a count, or a max id: 0 when there is no row)."""
        from sqlalchemy import text

        result = self._connection.execute(text(query)).scalar()
        self._connection.rollback()  # never hold a snapshot (SQLite: the WAL could not be checkpointed)
        return int(result or 0)

    def backlog(self, part: str = "all") -> int:
        """Jobs not finished yet: `all`, `fold` (stored events to fold into their calls: the inbox's
        `apply` jobs) or `delivery` (requests to Bitrix24 to make, or waiting for their call)."""
        kinds = {"all": "", "fold": " AND kind = 'apply'", "delivery": " AND kind != 'apply'"}[part]
        return self.scalar(f"SELECT count(*) FROM job WHERE {BACKLOG_WHERE}{kinds}")  # noqa: S608

    def backlog_summary(self) -> str:
        """What the backlog is made of: `kind state: n` and the commonest last errors (for notes)."""
        from sqlalchemy import text

        where = f"WHERE {BACKLOG_WHERE}"
        groups = self._connection.execute(
            text(f"SELECT kind, state, count(*) FROM job {where} GROUP BY kind, state ORDER BY 3 DESC")  # noqa: S608
        ).all()
        errors = self._connection.execute(
            text(f"SELECT last_error, count(*) FROM job {where} GROUP BY last_error ORDER BY 2 DESC LIMIT 3")  # noqa: S608
        ).all()
        self._connection.rollback()
        parts = [f"{kind} {state}: {count}" for kind, state, count in groups]
        parts += [f"last error {str(error)[:120]!r} × {count}" for error, count in errors if error]
        return "; ".join(parts) or "empty"

    def jobs_created(self) -> int:
        """The newest job's id: how many jobs were ever created (ids only grow)."""
        return self.scalar("SELECT max(id) FROM job")

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()
        self.engine.dispose()

    def __enter__(self) -> DatabaseProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def wait_for_drain(
    url: str, timeout: float, processes: Sequence[subprocess.Popen[bytes]] = (), part: str = "all"
) -> tuple[int, float]:
    """Wait until the backlog (`part` of it, see DatabaseProbe.backlog) is empty or `timeout` has
    passed: (jobs left, seconds waited)."""
    started = time.monotonic()
    with DatabaseProbe(url) as probe:
        left = probe.backlog(part)
        while left and time.monotonic() - started < timeout:
            if any(process.poll() is not None for process in processes):
                break  # a worker died: nothing will drain
            time.sleep(0.1)
            left = probe.backlog(part)
    return left, time.monotonic() - started


POSTGRES_ENV = ("B24SCRIBE_BENCH_POSTGRES_URL", "B24SCRIBE_TEST_POSTGRES_URL")


def postgres_server() -> str | None:
    """The PostgreSQL server the benches may use (first of POSTGRES_ENV that is set), if reachable."""
    from sqlalchemy import create_engine

    for name in POSTGRES_ENV:
        url = os.environ.get(name)
        if not url:
            continue
        engine = create_engine(url, poolclass=_null_pool())
        try:
            with engine.connect():
                return url
        except Exception:  # noqa: BLE001 - unreachable means "no PostgreSQL for the benches"
            return None
        finally:
            engine.dispose()
    return None


def backends_available() -> list[str]:
    """sqlite always; postgresql when one is configured and reachable."""
    return ["sqlite"] + (["postgresql"] if postgres_server() else [])


@contextlib.contextmanager
def database(space: Workspace, backend: str, name: str) -> Iterator[str]:
    """A fresh migrated database: a SQLite file in the workspace, or a new PostgreSQL schema
    (dropped at the end). Both migrated with `flask --app app db upgrade` (the release step)."""
    if backend == "sqlite":
        yield fresh_database(space, name)
        return
    if backend != "postgresql":
        raise ValueError(f"backend must be sqlite or postgresql, not {backend!r}")
    server = postgres_server()
    if server is None:
        raise RuntimeError(f"no reachable PostgreSQL: set {POSTGRES_ENV[0]} (a SQLAlchemy URL)")
    import uuid

    from sqlalchemy import create_engine, text

    schema = f"bench_{name.replace('-', '_')[:30]}_{uuid.uuid4().hex[:8]}".lower()
    admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=_null_pool())
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        separator = "&" if "?" in server else "?"
        url = f"{server}{separator}options=-csearch_path%3D{schema}"
        try:
            migrate(space, url, name)
            yield url
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


def migrate(space: Workspace, url: str, name: str) -> None:
    """`flask --app app db upgrade` on `url` (output in the workspace)."""
    log = space.path / f"{name}.migrate.log"
    with log.open("wb") as out:
        subprocess.run(
            [str(BIN / "flask"), "--app", "app", "db", "upgrade"],
            env=service_env(space.path, url),
            cwd=space.path,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=120,
        )


@dataclass
class Web:
    """A running gunicorn (Procfile's command, gunicorn.conf.py) on a free loopback port."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def worker_pids(self) -> list[int]:
        """The gunicorn worker processes."""
        return children(self.process.pid)


def start_web(
    space: Workspace, env: Mapping[str, str], app: str = "app:create_app()", name: str = "web", port: int | None = None
) -> Web:
    """`gunicorn 'app:create_app()' --config gunicorn.conf.py` (or another app), ready to serve, on
    `port` (a free one if None: a caller that must name the URL in the settings picks it first)."""
    port = port or free_port()
    log = space.path / f"{name}.log"
    process = start_process(
        [str(BIN / "gunicorn"), app, "--config", str(GUNICORN_CONF)],
        {**env, "PORT": str(port)},
        space.path,
        log,
    )
    web = Web(process, f"http://{LOOPBACK}:{port}", log)
    try:
        wait_http(f"{web.url}/livez", process, log)
        # both workers must be up, not just the first one to answer
        deadline = time.monotonic() + 20
        while len(web.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    except BaseException:
        stop_process(process)
        raise
    return web


def start_worker(space: Workspace, env: Mapping[str, str], name: str = "worker") -> subprocess.Popen[bytes]:
    """`flask --app app worker` (the Procfile's worker)."""
    return start_process([str(BIN / "flask"), "--app", "app", "worker"], env, space.path, space.path / f"{name}.log")


def post(url: str, body: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
    """POST a hook with the bench's bearer token."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    return http("POST", url, body, headers, timeout)


# --- The fake Bitrix24 ---------------------------------------------------------------------


def start_fake() -> FakeBitrix24:
    """A FakeBitrix24 serving in this process (no limits until configured)."""
    from fake_bitrix24 import FakeBitrix24

    return FakeBitrix24(host=LOOPBACK).start()


def create_finished_calls(fake: FakeBitrix24, count: int, prefix: str = "bench") -> list[str]:
    """Register and finish `count` calls directly in the fake (not through the service).

    Sent in-process through `handle`, so they count in the fake's bucket if one is enabled:
    create calls before `set_rate_limit` (which starts with an empty bucket).
    """
    from urllib.parse import urlsplit

    from fake_bitrix24 import IncomingRequest

    base = urlsplit(fake.webhook_url).path

    def call(method: str, params: dict[str, Any]) -> dict[str, Any]:
        request = IncomingRequest("POST", base + method, "", json.dumps(params).encode(), "application/json")
        reply = fake.handle(request)
        if reply.status != 200 or not isinstance(reply.payload, dict):
            raise RuntimeError(f"fake {method} answered {reply.status}: {reply.payload!r}")
        result: dict[str, Any] = reply.payload["result"]
        return result

    call_ids: list[str] = []
    for number in range(count):
        registered = call(
            "telephony.externalcall.register",
            {
                "USER_ID": 1,
                "TYPE": 2,
                "PHONE_NUMBER": f"+1555{number:07d}",
                "EXTERNAL_CALL_ID": f"{prefix}.{number}",
                "CRM_CREATE": 0,
            },
        )
        call(
            "telephony.externalcall.finish",
            {"CALL_ID": registered["CALL_ID"], "USER_ID": 1, "DURATION": 60, "STATUS_CODE": "200"},
        )
        call_ids.append(str(registered["CALL_ID"]))
    return call_ids


def b24_call_ids(fake: FakeBitrix24) -> dict[str, str]:
    """The PBX's call id (EXTERNAL_CALL_ID) → the CALL_ID the fake gave at register."""
    found: dict[str, str] = {}
    for request in fake.calls_to("telephony.externalcall.register"):
        if request.status == 200 and isinstance(request.response, dict):
            found.setdefault(str(request.params.get("EXTERNAL_CALL_ID")), str(request.response["result"]["CALL_ID"]))
    return found


def attach_receipts(fake: FakeBitrix24) -> dict[str, float]:
    """CALL_ID → when the fake received its first successful attachTranscription (its clock)."""
    received: dict[str, float] = {}
    for request in fake.calls_to("telephony.call.attachTranscription"):
        if request.status == 200:
            received.setdefault(str(request.params.get("CALL_ID")), request.timestamp)
    return received


# --- Payloads ------------------------------------------------------------------------------

_SPEECH = (
    "hello thank you for calling how can I help today my order has not arrived yet could you please "
    "check the delivery status of course one moment let me see the parcel left our warehouse on Monday "
    "and should reach you tomorrow morning that is great news"
)
_WORDS = tuple(_SPEECH.split())


def pbx_event(call_id: str) -> bytes:
    """A small generic PBX event (the Lua script builds the same one)."""
    return json.dumps(
        {
            "event": "call.finished",
            "call_id": call_id,
            "direction": "inbound",
            "from": "+15551234567",
            "to": "+15550000000",
            "extension": "101",
            "started_at": "2026-11-25T10:20:30+01:00",
            "duration": 73,
            "status": "answered",
        }
    ).encode()


def generic_transcript(segments: int = 30, seed: int = 7) -> bytes:
    """A typical generic transcript callback: `segments` utterances, alternating channels."""
    rng = random.Random(seed)
    clock = 0.4
    items: list[dict[str, Any]] = []
    for number in range(segments):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        duration = len(words) * 0.35
        items.append(
            {
                "start": round(clock, 2),
                "end": round(clock + duration, 2),
                "text": " ".join(words),
                "channel": number % 2,
            }
        )
        clock += duration + rng.uniform(0.2, 1.2)
    return json.dumps({"segments": items, "cost": 0.12, "cost_currency": "USD"}).encode()


def one_hour_deepgram(request_id: str, words: int = 10_000, seed: int = 11) -> bytes:
    """A Deepgram multichannel callback of a one-hour call: ~10,000 words, ~1.5 MB, no utterances."""
    rng = random.Random(seed)
    channels: list[list[dict[str, Any]]] = [[], []]
    clock, channel, produced = 0.3, 0, 0
    while produced < words:
        turn = min(rng.randint(3, 25), words - produced)
        for position in range(turn):
            word = rng.choice(_WORDS)
            duration = rng.uniform(0.12, 0.3)
            ending = "." if position == turn - 1 else ""
            channels[channel].append(
                {
                    "word": word.lower(),
                    "start": round(clock, 3),
                    "end": round(clock + duration, 3),
                    "confidence": round(rng.uniform(0.6, 1.0), 4),
                    "punctuated_word": word + ending,
                    "speaker": 0,
                    "speaker_confidence": round(rng.uniform(0.3, 1.0), 4),
                }
            )
            clock += duration + rng.uniform(0.0, 0.08)
        produced += turn
        clock += rng.uniform(0.2, 1.0)
        channel = 1 - channel
    body = {
        "metadata": {
            "request_id": request_id,
            "created": "2026-11-25T10:20:30.000Z",
            "duration": round(clock, 1),
            "channels": 2,
            "models": ["3b3aabe4-608a-46ac-9585-7960a25daf1a"],
        },
        "results": {
            "channels": [
                {
                    "alternatives": [
                        {
                            "transcript": " ".join(w["punctuated_word"] for w in items),
                            "confidence": 0.98,
                            "words": items,
                        }
                    ]
                }
                for items in channels
            ]
        },
    }
    return json.dumps(body).encode()


def one_hour_generic(words: int = 10_000, seed: int = 11) -> bytes:
    """The same one-hour call in the generic format: one segment per word (the fallback)."""
    rng = random.Random(seed)
    segments: list[dict[str, Any]] = []
    clock, channel, produced = 0.3, 0, 0
    while produced < words:
        turn = min(rng.randint(3, 25), words - produced)
        for _ in range(turn):
            duration = rng.uniform(0.12, 0.3)
            segments.append(
                {
                    "start": round(clock, 3),
                    "end": round(clock + duration, 3),
                    "text": rng.choice(_WORDS),
                    "channel": channel,
                    "speaker": f"spk_{channel}",
                }
            )
            clock += duration + rng.uniform(0.0, 0.08)
        produced += turn
        clock += rng.uniform(0.2, 1.0)
        channel = 1 - channel
    return json.dumps({"segments": segments}).encode()


def run_wrk_until_drained(
    argv: list[str], env: dict[str, str], out: Path, log: Path, threads: int, deadline_seconds: float
) -> dict[str, Any]:
    """Run wrk with one of our Lua scripts until every thread has written its "drained" marker
    (every answer is in) or `deadline_seconds` pass; the script's JSON figures from `out`."""
    markers = [Path(f"{out}.drained.{n}") for n in range(1, threads + 1)]
    for stale in (out, *markers):
        stale.unlink(missing_ok=True)
    with log.open("wb") as output:
        wrk = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + deadline_seconds
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
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures

"""Delivery's own cost: worker CPU per job of a drain with pacing lifted (target ≤ 2 ms).

Two modes. Dry run: calls spread over many portals each get a register job and a finish job
waiting for it (what folding a finished call queues); a worker in this process drains them and
nothing is sent, so what is measured is claiming, executing and recording. Sending: every call
also has a transcript and an attach job waiting for the finish, and each request really goes to
a fake Bitrix24 in a process of its own (fake_bitrix24/, several portals, no limits), so
the HTTP client and the sender threads are paid for too. The bucket is lifted in both, so pacing
never makes the worker wait. Printed: CPU ms per job (this process's user + system time over the
drain, divided by the jobs run; the fake's CPU is its own process's) and jobs/s, per backend and
mode, with the load average (the machine may be shared). The same drain varies by ±25 % from one
run to the next on a shared 2-core machine, so each is run --rounds times (3) and the median is the
figure; every round's is printed beside it.

    python bench/delivery_cpu.py                        # both modes; SQLite, and PostgreSQL when configured
    python bench/delivery_cpu.py --calls 2000 --portals 500 --backend sqlite --mode dry-run
    python bench/delivery_cpu.py --mode sending --calls 300 --send-portals 8 --senders 32

PostgreSQL comes from B24SCRIBE_BENCH_POSTGRES_URL or B24SCRIBE_TEST_POSTGRES_URL (a fresh schema,
dropped at the end). Everything stays on this machine.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/delivery_cpu.py`: make the repository importable
    sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from b24scribe import outbox  # noqa: E402
from b24scribe.db import Database  # noqa: E402
from b24scribe.models import Call, InboundEvent, Job, TranscriptPart  # noqa: E402
from b24scribe.settings import Settings  # noqa: E402
from b24scribe.worker import Worker  # noqa: E402
from bench.fault_run import backends, fresh_database  # noqa: E402
from schemas.registry import SOURCES  # noqa: E402

TARGET_MS = 2.0
DEFAULT_SENDERS = Settings().worker_senders  # B24SCRIBE_WORKER_SENDERS as users run it


@dataclass(frozen=True)
class CpuResult:
    """One drain's figures."""

    backend: str
    mode: str
    jobs: int
    cpu_ms_per_job: float
    jobs_per_second: float
    outcome_transactions: int = 0
    claims: int = 0


def queue_calls(
    db: Database, calls: int, portals: int | list[str], attach: bool = False, user_id: int | None = None
) -> int:
    """`calls` registered-to-be calls over `portals` (a count, or their names): a register job each
    and a finish waiting for it, plus (`attach`) a transcript and an attach job waiting for the
    finish. Returns how many jobs were queued."""
    now = time.time()
    names = portals if isinstance(portals, list) else [f"portal-{i}.bitrix24.example" for i in range(portals)]
    jobs = 0
    with db.write() as session:
        for index in range(calls):
            portal = names[index % len(names)]
            call = Call(
                portal=portal,
                pbx="generic",
                pbx_call_id=f"bench-{index}",
                direction="inbound",
                from_number="+15551230000",
                to_number="+15550000000",
                extension=None if user_id else "101",
                user_id=user_id,
                duration=42,
                status="answered",
                finish_reported=True,
                stage="new",
                created_at=now,
                updated_at=now,
            )
            session.add(call)
            session.flush()
            outbox.enqueue(session, "register", call_id=call.id, portal=portal, now=now)
            outbox.enqueue(session, "finish", call_id=call.id, portal=portal, waiting=True, now=now)
            jobs += 2
            if attach:
                event = InboundEvent(
                    source="stt",
                    provider="generic",
                    dedupe_key=f"bench-{index}",
                    received_at=now,
                    query={},
                    body=b"{}",
                    state="accepted",
                    call_id=call.id,
                )
                session.add(event)
                session.flush()
                session.add(
                    TranscriptPart(
                        call_id=call.id,
                        event_id=event.id,
                        vendor="generic",
                        status="completed",
                        segments=[
                            [0.0, 2.0, "Hello, Acme support.", None, None, "User", False],
                            [2.5, 4.0, "Hi, my order is late.", None, None, "Client", False],
                        ],
                        received_at=now,
                        delivery_state="queued",
                    )
                )
                outbox.enqueue(
                    session, "attach", call_id=call.id, event_id=event.id, portal=portal, waiting=True, now=now
                )
                jobs += 1
    return jobs


@contextmanager
def fake_bitrix24(portals: int) -> Iterator[dict[str, str]]:
    """`python -m fake_bitrix24` in a process of its own (its CPU is not ours): portal → webhook URL."""
    argv = [sys.executable, "-m", "fake_bitrix24", "--port", "0", "--portals", str(portals)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("the fake Bitrix24 did not start")
        urls = json.loads(line)["webhook_urls"]
        yield {f"bench-portal-{n}": url for n, url in enumerate(urls)}
    finally:
        process.terminate()
        process.wait(timeout=10)


def measure(
    database_url: str,
    backend: str,
    calls: int,
    portals: int,
    mode: str = "dry-run",
    profile: Path | None = None,
    senders: int = DEFAULT_SENDERS,
) -> CpuResult:
    """Queue the calls, then drain them (dry run, or sending to a fake Bitrix24) and time the worker's CPU."""
    with fake_bitrix24(portals) if mode == "sending" else _no_portals() as urls:
        settings = Settings(
            database_url=database_url,
            rate_per_second=1e6,
            rate_burst=1_000_000,
            log_level="WARNING",
            bitrix24_portals=urls,
            worker_senders=senders,
        )
        db = Database(database_url)
        try:
            sending = mode == "sending"
            queued = queue_calls(db, calls, list(urls) or portals, attach=sending, user_id=1 if sending else None)
            worker = Worker(db, settings, SOURCES)
            profiler = _profiler(profile)
            cpu, wall = time.process_time(), time.perf_counter()
            worker.drain(timeout=600)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if profiler is not None and profile is not None:
                profiler.disable()
                profiler.dump_stats(str(profile))
            with db.read() as session:
                done = session.scalar(select(func.count()).select_from(Job).where(Job.state == "done")) or 0
            if done != queued:
                raise RuntimeError(f"only {done} of {queued} jobs were done")
            return CpuResult(
                backend, mode, done, 1000 * cpu / done, done / wall, worker.deliverer.group_commits, worker.claims
            )
        finally:
            db.dispose()


@contextmanager
def _no_portals() -> Iterator[dict[str, str]]:
    yield {}


def _profiler(path: Path | None) -> cProfile.Profile | None:
    if path is None:
        return None
    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=None, help="calls (dry run: 1500, two jobs each; sending: 400)")
    parser.add_argument("--portals", type=int, default=300, help="portals of the dry run")
    parser.add_argument("--send-portals", type=int, default=8, help="portals of the fake Bitrix24 when sending")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], action="append")
    parser.add_argument("--mode", choices=["dry-run", "sending"], action="append")
    parser.add_argument(
        "--senders",
        type=int,
        default=DEFAULT_SENDERS,
        help="B24SCRIBE_WORKER_SENDERS when sending (default: its default)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="drains per mode and backend, each on a fresh database (median)"
    )
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats of the drain here")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)  # a drain of thousands of jobs logs nothing worth timing
    failed = False
    for mode in args.mode or ["dry-run", "sending"]:
        calls = args.calls or (1500 if mode == "dry-run" else 400)
        portals = args.portals if mode == "dry-run" else args.send_portals
        for backend in args.backend or backends():
            results = []
            for _ in range(args.rounds):
                with (
                    tempfile.TemporaryDirectory(prefix="b24scribe-cpu-") as workdir,
                    fresh_database(backend, Path(workdir)) as url,
                ):
                    results.append(measure(url, backend, calls, portals, mode, args.profile, args.senders))
            result = sorted(results, key=lambda r: r.cpu_ms_per_job)[len(results) // 2]  # the median round
            ok = result.cpu_ms_per_job <= TARGET_MS
            failed |= not ok
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            rounds = ", ".join(f"{r.cpu_ms_per_job:.2f}" for r in results)
            print(
                f"delivery CPU, {mode}, {backend}: {result.cpu_ms_per_job:.2f} ms/job, median of {len(results)} "
                f"({rounds}) (target ≤ {TARGET_MS:g}) {'✓' if ok else '✗'}; {result.jobs_per_second:.0f} jobs/s; "
                f"{result.jobs} jobs over {portals} portals in {result.claims} claims and "
                f"{result.outcome_transactions} outcome transactions; load average {load}",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Pacing: several portals at Bitrix24's real limits, drained as fast as the limits allow, never a 503.

The fake Bitrix24 enforces its real leaky bucket per portal (burst 50, 2/s) and the service runs
with its defaults (2/s after a burst of 45). Enough transcripts are queued per portal to exhaust the
burst (100 each, on 3 portals, via B24SCRIBE_BITRIX24_PORTALS and `?portal=`); then worker
processes deliver them. The bucket's theoretical minimum is (N − burst) / rate per portal, portals
in parallel; the figure is ideal / actual (target ≥ 0.9), measured on the fake from the first
request to the last. Also reported: 503s (target 0), the most requests any window of t seconds saw
compared with burst + rate × t, and the most requests one portal ever had in flight (target: at most
B24SCRIBE_PORTAL_CONCURRENCY).

    python bench/pacing.py                          # SQLite; 3 portals × 100 transcripts
    python bench/pacing.py --backend postgresql --workers 3

Everything listens on 127.0.0.1; every process is killed with its process group at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/pacing.py`: make the repository importable
    sys.path.insert(0, str(ROOT))

from b24scribe.db import Database  # noqa: E402
from b24scribe.settings import Settings  # noqa: E402
from bench.fault_run import (  # noqa: E402
    LOOPBACK,
    Processes,
    Row,
    add_portals,
    attach_states,
    backend_of,
    backends,
    create_finished_calls,
    create_tables,
    fresh_database,
    post_transcripts,
    service_env,
    start_web,
    worker_argv,
)
from fake_bitrix24 import FakeBitrix24, IncomingRequest, Reply  # noqa: E402

ATTACH = "telephony.call.attachtranscription"
# the service's default: requests one portal may have in flight at once (B24SCRIBE_PORTAL_CONCURRENCY)
MAX_IN_FLIGHT = Settings().portal_concurrency


@dataclass(frozen=True)
class PacingConfig:
    """Knobs of one pacing run; None for rate/burst means the service's defaults (2/s, 45)."""

    portals: int = 3
    per_portal: int = 100
    fake_burst: float = 50.0
    fake_rate: float = 2.0
    rate: float | None = None
    burst: int | None = None
    workers: int = 2
    threads: int = 2
    latency: float = 0.02  # the fake's answer time, so overlapping requests would show
    time_limit: float = 120.0


@dataclass
class PacingResult:
    """What a pacing run measured."""

    backend: str
    portals: int
    per_portal: int
    rate: float
    burst: int
    finished: bool = False
    ideal_seconds: float = 0.0
    actual_seconds: float = 0.0
    efficiency: float = 0.0
    count_503: int = 0
    max_over_bucket: float = 0.0  # most requests in any window beyond burst + rate × t (≤ 0 is fine)
    max_in_flight: int = 0
    per_portal_seconds: dict[str, float] = field(default_factory=dict)
    requests: int = 0

    @property
    def ok(self) -> bool:
        """Within 10 % of the ideal, no 503, never more requests in flight per portal than allowed."""
        return self.finished and self.efficiency >= 0.9 and self.count_503 == 0 and self.max_in_flight <= MAX_IN_FLIGHT


class InFlight:
    """Wraps the fake's request handler to count the requests each portal has in progress."""

    def __init__(self, fake: FakeBitrix24, codes: dict[str, str]) -> None:
        self.codes = codes  # webhook code → portal name
        self.current: dict[str, int] = {}
        self.most = 0
        self.lock = threading.Lock()
        self.handle = fake.handle

    def reset(self) -> None:
        """Forget the maximum seen so far."""
        with self.lock:
            self.most = max(self.current.values(), default=0)

    def __call__(self, request: IncomingRequest) -> Reply:
        parts = request.path.split("/")
        portal = self.codes.get(parts[3] if len(parts) > 3 else "", "?")
        with self.lock:
            self.current[portal] = self.current.get(portal, 0) + 1
            self.most = max(self.most, self.current[portal])
        try:
            return self.handle(request)
        finally:
            with self.lock:
                self.current[portal] -= 1


def most_over_bucket(times: Sequence[float], burst: float, rate: float) -> float:
    """max over windows [tᵢ, tⱼ] of (requests in it) − (burst + rate × (tⱼ − tᵢ)); ≤ 0: within."""
    ordered = sorted(times)
    worst = float("-inf")
    for first, start in enumerate(ordered):
        # the worst window starting at `start` ends at some request; check each (n ≤ a few hundred)
        for last in range(first, len(ordered)):
            worst = max(worst, (last - first + 1) - (burst + rate * (ordered[last] - start)))
    return worst


@contextlib.contextmanager
def instrumented_fake(portal_count: int) -> Iterator[tuple[FakeBitrix24, dict[str, str], InFlight]]:
    """The in-process fake with `portal_count` portals and an in-flight counter on its handler."""
    with FakeBitrix24(host=LOOPBACK) as fake:
        portals = add_portals(fake, portal_count)
        codes = {url.rstrip("/").split("/")[-1]: name for name, url in portals.items()}
        counter = InFlight(fake, codes)
        fake.handle = counter  # type: ignore[method-assign]
        yield fake, portals, counter


def run_pacing(database_url: str, config: PacingConfig, workdir: Path) -> PacingResult:
    """One pacing run against an empty database at `database_url`."""
    create_tables(database_url)
    defaults = Settings()
    rate = config.rate if config.rate is not None else defaults.rate_per_second
    burst = config.burst if config.burst is not None else defaults.rate_burst
    result = PacingResult(backend_of(database_url), config.portals, config.per_portal, rate, burst)
    db = Database(database_url, group_commit=False)
    total = config.portals * config.per_portal
    with instrumented_fake(config.portals) as (fake, portals, in_flight), Processes(workdir) as processes:
        calls = create_finished_calls(list(portals.values()), total)
        set_up_requests = len(fake.requests)
        in_flight.reset()  # the set-up ran 8 threads at once; from here on only the service sends
        fake.set_rate_limit(burst=config.fake_burst, rate=config.fake_rate)  # empty buckets
        fake.set_latency(config.latency)
        extra = {"B24SCRIBE_RATE_PER_SECOND": str(config.rate)} if config.rate is not None else {}
        if config.burst is not None:
            extra["B24SCRIBE_RATE_BURST"] = str(config.burst)
        env = service_env(workdir, database_url, portals, extra)
        web = start_web(processes, env)
        deadline = time.monotonic() + config.time_limit
        posted = post_transcripts(web, calls, list(portals), threads=16, deadline=deadline)
        if set(posted) - {"202"}:
            raise RuntimeError(f"posting failed: {dict(posted)}")
        workers = [processes.start("worker", worker_argv(config.threads), env) for _ in range(config.workers)]
        while time.monotonic() < deadline:
            if attach_states(db).get("done", 0) >= total:
                result.finished = True
                break
            time.sleep(0.2)
        for worker in workers:
            processes.stop(worker)
        recorded = fake.requests[set_up_requests:]
        result.max_in_flight = in_flight.most
    db.dispose()
    result.requests = len(recorded)
    result.count_503 = sum(1 for r in recorded if r.status == 503)
    by_portal: dict[str, list[float]] = {}
    for request in recorded:
        by_portal.setdefault(request.portal or "?", []).append(request.timestamp)
    result.per_portal_seconds = {name: round(max(ts) - min(ts), 2) for name, ts in sorted(by_portal.items())}
    stamps = [r.timestamp for r in recorded]
    result.actual_seconds = round(max(stamps) - min(stamps), 2) if stamps else 0.0
    result.ideal_seconds = max(0.0, (config.per_portal - burst) / rate)
    result.efficiency = round(result.ideal_seconds / result.actual_seconds, 3) if result.actual_seconds else 0.0
    result.max_over_bucket = round(
        max((most_over_bucket(ts, config.fake_burst, config.fake_rate) for ts in by_portal.values()), default=0.0), 2
    )
    return result


def rows_for(result: PacingResult) -> list[Row]:
    """The suite's rows for one run."""
    label = f"pacing {result.backend} ({result.portals} portals × {result.per_portal})"
    return [
        {
            "name": f"{label}: efficiency (ideal/actual)",
            "figure": result.efficiency,
            "unit": f"({result.ideal_seconds:g} s / {result.actual_seconds:g} s)",
            "target": "≥ 0.9",
            "ok": result.efficiency >= 0.9 and result.finished,
        },
        {
            "name": f"{label}: 503 from Bitrix24",
            "figure": result.count_503,
            "unit": "",
            "target": "0",
            "ok": result.count_503 == 0,
        },
        {
            "name": f"{label}: most in flight per portal",
            "figure": result.max_in_flight,
            "unit": "",
            "target": f"≤ {MAX_IN_FLIGHT}",
            "ok": result.max_in_flight <= MAX_IN_FLIGHT,
        },
    ]


def describe(result: PacingResult) -> str:
    """The figures of one run, for people."""
    return "\n".join(
        [
            f"pacing on {result.backend}: {result.portals} portals × {result.per_portal} transcripts, "
            f"service {result.rate:g}/s burst {result.burst}",
            f"  finished                       {result.finished}",
            f"  ideal (N − burst) / rate       {result.ideal_seconds:.2f} s",
            f"  actual, first to last request  {result.actual_seconds:.2f} s "
            f"(per portal {json.dumps(result.per_portal_seconds)})",
            f"  efficiency (ideal / actual)    {result.efficiency:.3f}   target ≥ 0.9",
            f"  503 from the fake              {result.count_503}   target 0",
            f"  most in flight per portal      {result.max_in_flight}   target ≤ {MAX_IN_FLIGHT}",
            f"  worst window vs burst + rate×t {result.max_over_bucket:+.2f} requests (≤ 0: within the fake's bucket)",
            f"  requests                       {result.requests}",
        ]
    )


def run_backend(backend: str, config: PacingConfig) -> PacingResult:
    """A pacing run on a fresh database of `backend`."""
    with tempfile.TemporaryDirectory(prefix=f"b24scribe-pacing-{backend}-") as directory:
        workdir = Path(directory)
        with fresh_database(backend, workdir) as url:
            return run_pacing(url, config, workdir)


def run(count: int = PacingConfig.per_portal, portals: int = PacingConfig.portals) -> list[Row]:
    """The suite's entry point: `portals` portals × `count` transcripts at the real limits, on SQLite."""
    return rows_for(run_backend("sqlite", PacingConfig(portals=portals, per_portal=count)))


def main(argv: list[str] | None = None) -> int:
    """Print the figures; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "all"], default="sqlite")
    parser.add_argument("--portals", type=int, default=PacingConfig.portals)
    parser.add_argument("--per-portal", type=int, default=PacingConfig.per_portal)
    parser.add_argument("--workers", type=int, default=PacingConfig.workers)
    parser.add_argument("--threads", type=int, default=PacingConfig.threads)
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    args = parser.parse_args(argv)

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds the context managers: processes are killed

    signal.signal(signal.SIGTERM, interrupted)
    config = PacingConfig(portals=args.portals, per_portal=args.per_portal, workers=args.workers, threads=args.threads)
    failed = False
    for backend in backends() if args.backend == "all" else [args.backend]:
        result = run_backend(backend, config)
        shown: Any = asdict(result) if args.json else describe(result)
        print(json.dumps(shown) if args.json else shown, flush=True)
        failed = failed or not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

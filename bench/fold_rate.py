"""How fast the worker folds stored events into calls, transcripts and jobs (the worker alone).

Fills a fresh database with stored PBX events and transcripts exactly as the hooks store them
(the app's own hooks, through Flask's test client, several requests at once so they group-commit
as under load), then times `folding.apply_pending` until nothing is left to fold, and checks what it
built: one call per PBX call, one transcript per callback, a register, a finish and an attach job
per call. Every call gets `call.started`, then `call.finished`, then its transcript; the stored
order is shuffled a little, so some transcripts arrive before their call's events, as they do.

Targets: 2,000 events/s on SQLite, 500 events/s per worker on PostgreSQL (when
B24SCRIBE_TEST_POSTGRES_URL or --postgres names a server; each run gets its own schema).

    python bench/fold_rate.py [--events 3000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from sqlalchemy import create_engine, func, select, text

from app import create_app
from b24scribe import folding
from b24scribe.db import Database
from b24scribe.migrate import upgrade
from b24scribe.models import Call, Job, TranscriptPart
from b24scribe.settings import Settings
from bench.common import Row, generic_transcript, main_for, pbx_event, percentile, row
from schemas.registry import SOURCES

SQLITE_TARGET = 2000.0  # events/s
POSTGRES_TARGET = 500.0  # events/s per worker
TOKEN = "bench-fold-token-3c9a"
EVENTS_PER_CALL = 3  # started, finished, one transcript


def _requests(calls: int, seed: int = 5) -> list[tuple[str, bytes]]:
    """(path, body) of every hook request, mostly in call order with some transcripts early."""
    transcript = generic_transcript(segments=20)
    requests: list[tuple[str, bytes]] = []
    for number in range(calls):
        call_id = f"1765000000.{number:06d}"
        started = json.loads(pbx_event(call_id)) | {"event": "call.started"}
        for key in ("duration", "status"):
            started.pop(key)
        requests.append(("/hooks/pbx/generic", json.dumps(started).encode()))
        requests.append(("/hooks/pbx/generic", pbx_event(call_id)))
        requests.append((f"/hooks/stt/generic?pbx=generic&call={call_id}", transcript))
    rng = random.Random(seed)
    for index in range(0, len(requests) - 3, 3):  # one call in ten: its transcript comes first
        if rng.random() < 0.1:
            requests[index], requests[index + 2] = requests[index + 2], requests[index]
    return requests


def fill(settings: Settings, calls: int) -> None:
    """Store every event through the hooks, 8 requests at a time (they share group commits on SQLite)."""
    app = create_app(settings)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    requests = _requests(calls)

    def send(chunk: list[tuple[str, bytes]]) -> None:
        client = app.test_client()
        for path, body in chunk:
            response = client.post(path, data=body, headers=headers)
            if response.status_code != 202:
                raise RuntimeError(f"{path}: {response.status_code} {response.get_data(as_text=True)[:200]}")

    # each call's events stay in one thread, in order (the PBX sends them one after the other)
    chunks = [requests[i : i + 3 * 25] for i in range(0, len(requests), 3 * 25)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, chunks))
    app.extensions["b24scribe.db"].dispose()


@dataclass
class Folded:
    """One database's figures: events, seconds to fill and to fold, and each batch's write."""

    events: int = 0
    fill_seconds: float = 0.0
    fold_seconds: float = 0.0
    writes: list[tuple[int, float]] = field(default_factory=list)  # (events, seconds) of each batch's write


def fold_all(db: Database, settings: Settings, writes: list[tuple[int, float]]) -> tuple[int, float]:
    """Fold until nothing is left, as the worker loop does; (events folded, seconds).

    Each batch's write transaction (how long the hooks wait for the SQLite write lock at most) is
    recorded in `writes` as the batch sizer sees it.
    """
    sizer = folding._batch_size
    observe = sizer.observe

    def recording(asked: int, events: int, seconds: float) -> None:
        writes.append((events, seconds))
        observe(asked, events, seconds)

    sizer.observe = recording  # type: ignore[method-assign]
    folded, started = 0, time.perf_counter()
    try:
        while taken := folding.apply_pending(db, settings, SOURCES):
            folded += taken
    finally:
        sizer.observe = observe  # type: ignore[method-assign]
    return folded, time.perf_counter() - started


def check(db: Database, calls: int) -> None:
    """What folding must have built (a fast fold that builds the wrong thing is no figure)."""
    with db.read() as session:
        jobs = dict(session.execute(select(Job.kind, func.count()).where(Job.kind != "apply").group_by(Job.kind)).all())
        built = {
            "calls": session.scalar(select(func.count()).select_from(Call)),
            "transcripts": session.scalar(select(func.count()).select_from(TranscriptPart)),
            "open applies": session.scalar(select(func.count()).where(Job.kind == "apply", Job.state != "done")),
        }
    expected_jobs = {"register": calls, "finish": calls, "attach": calls}
    if built != {"calls": calls, "transcripts": calls, "open applies": 0} or jobs != expected_jobs:
        raise RuntimeError(f"folding built {built} and jobs {jobs}, expected {calls} of each")


def measure(database_url: str, calls: int) -> Folded:
    """Fill a freshly migrated database through the hooks, then fold it."""
    upgrade(database_url)
    settings = Settings(database_url=database_url, inbound_token=TOKEN, log_level="WARNING")
    result = Folded()
    started = time.perf_counter()
    fill(settings, calls)
    result.fill_seconds = time.perf_counter() - started
    db = Database(database_url)
    try:
        result.events, result.fold_seconds = fold_all(db, settings, result.writes)
        check(db, calls)
    finally:
        db.dispose()
    return result


def _postgres_schema(url: str) -> tuple[str, str]:
    schema = f"bench_fold_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    separator = "&" if "?" in url else "?"
    return schema, f"{url}{separator}options=-csearch_path%3D{schema}"


def _drop_schema(url: str, schema: str) -> None:
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def _rows(backend: str, result: Folded, target: float) -> list[Row]:
    rate = result.events / result.fold_seconds if result.fold_seconds > 0 else 0.0
    sizes = [events for events, _ in result.writes] or [0]
    seconds = [spent for _, spent in result.writes] or [0.0]
    return [
        row(
            f"fold {backend}: {result.events:,} stored events folded (worker alone)",
            rate,
            "events/s",
            f"≥ {target:,.0f}",
        ),
        row(f"fold {backend}: ratio to the target", rate / target, "×", "≥ 1", rate >= target),
        row(f"fold {backend}: events per batch, median (max)", f"{median(sizes):.0f} ({max(sizes)})"),
        row(
            f"fold {backend}: a batch's write transaction, median / p99 / max",
            f"{1000 * median(seconds):.1f} / {1000 * percentile(seconds, 0.99):.1f} / {1000 * max(seconds):.1f} ms",
        ),
        row(f"fold {backend}: filling through the hooks (context)", result.events / result.fill_seconds, "events/s"),
    ]


def run(events: int = 3000, postgres_url: str | None = None) -> list[Row]:
    """The bench's rows: SQLite, then PostgreSQL when a server is named."""
    calls = max(1, events // EVENTS_PER_CALL)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="b24scribe-fold-") as workdir:
        rows += _rows("SQLite", measure(f"sqlite:///{workdir}/fold.sqlite3", calls), SQLITE_TARGET)
    postgres_url = postgres_url or os.environ.get("B24SCRIBE_TEST_POSTGRES_URL")
    if postgres_url:
        schema, url = _postgres_schema(postgres_url)
        try:
            rows += _rows("PostgreSQL", measure(url, calls), POSTGRES_TARGET)
        finally:
            _drop_schema(postgres_url, schema)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000, help="stored events per database (default 3000)")
    parser.add_argument("--postgres", help="PostgreSQL URL (default: $B24SCRIBE_TEST_POSTGRES_URL)")
    arguments = parser.parse_args()
    return main_for(run(arguments.events, arguments.postgres))


if __name__ == "__main__":
    raise SystemExit(main())

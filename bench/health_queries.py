"""How long `/metrics` and `/readyz` take with a million stored events (contract §12: their queries stay cheap).

Fills a fresh, migrated SQLite database (and a PostgreSQL schema, when B24SCRIBE_TEST_POSTGRES_URL or
--postgres names a server) with stored history, inserted in bulk straight into the tables:

- N inbound events over the last 60 days (a quarter of them call.started, call.finished, a transcript
  and call.answered of one call each; one in 40 rejected), their apply jobs (done);
- N/4 calls with a register, a finish and an attach job each (done), and N/4 delivered transcripts;
- a few hundred open and dead jobs, as a live service has.

Then times `GET /metrics` and `GET /readyz` through the app (Flask's test client, so no HTTP noise),
after one warm-up request, and one housekeeping round of retention (the worker's share: a few
batches, each one short write transaction) over the half of the events that are past 30 days.

    python bench/health_queries.py [--events 1000000] [--runs 20] [--postgres URL] [--no-postgres]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [_root] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from app import create_app
from b24scribe import retention
from b24scribe.db import Database
from b24scribe.migrate import upgrade
from b24scribe.settings import Settings

DAY = 86400.0
BODY = json.dumps({"event": "call.finished", "call_id": "x" * 16, "duration": 73, "status": "answered"}).encode()
SEGMENTS = json.dumps([[0.4, 2.9, "Good afternoon", 0, None, "user", False]])

EVENT_COLUMNS = (
    "id",
    "source",
    "provider",
    "dedupe_key",
    "received_at",
    "content_type",
    "query",
    "body",
    "state",
    "error",
    "call_id",
)
CALL_COLUMNS = (
    "id",
    "portal",
    "pbx",
    "pbx_call_id",
    "b24_call_id",
    "external",
    "answered",
    "finish_reported",
    "stage",
    "created_at",
    "updated_at",
)
JOB_COLUMNS = (
    "kind",
    "call_id",
    "event_id",
    "transcript_id",
    "portal",
    "state",
    "attempts",
    "next_attempt_at",
    "ambiguous",
    "created_at",
    "updated_at",
)
TRANSCRIPT_COLUMNS = (
    "id",
    "call_id",
    "event_id",
    "vendor",
    "status",
    "granularity",
    "segments",
    "side_overrides",
    "received_at",
    "delivery_state",
)


def history(table: str, events: int, now: float) -> Iterator[tuple[object, ...]]:
    """The rows of one table of the stored history (streamed: a million rows are not held in memory)."""
    calls = events // 4
    rejected_error = json.dumps({"message": "the call event cannot be processed", "fields": {"status": ["bad"]}})
    if table == "call":
        for call in range(1, calls + 1):
            received = now - 60 * DAY * (1 - call / calls)
            yield (
                call,
                "acme.bitrix24.com",
                "generic",
                f"call-{call}",
                f"externalCall.{call}",
                False,
                True,
                True,
                "finished",
                received,
                received,
            )
        return
    for event in range(1, events + 1):
        call = min(calls, (event - 1) // 4 + 1)
        received = now - 60 * DAY * (1 - event / events) + (event % 997) / 997
        kind, rejected = event % 4, event % 40 == 0
        source = "stt" if kind == 2 else "pbx"
        if table == "inbound_event":
            yield (
                event,
                source,
                "generic",
                f"k{event}",
                received,
                "application/json",
                "{}",
                BODY,
                "rejected" if rejected else "accepted",
                rejected_error if rejected else None,
                None if rejected else call,
            )
        elif rejected:
            continue
        elif table == "transcript" and kind == 2:
            yield (event, call, event, "generic", "completed", "segment", SEGMENTS, "{}", received, "delivered")
        elif table == "job":
            yield ("apply", None, event, None, None, "done", 1, received, False, received, received)
            if kind != 3:
                job_kind = ("register", "finish", "attach")[kind]
                yield (
                    job_kind,
                    call,
                    event,
                    event if kind == 2 else None,
                    "acme.bitrix24.com",
                    "done",
                    1,
                    received,
                    False,
                    received,
                    received,
                )
    if table == "job":
        for n in range(300):  # a live queue: some due, some waiting, some dead
            state = ("pending", "waiting", "dead")[n % 3]
            yield ("attach", 1 + n, None, None, "acme.bitrix24.com", state, 2, now - 30, False, now, now)


COLUMNS = {"call": CALL_COLUMNS, "inbound_event": EVENT_COLUMNS, "job": JOB_COLUMNS, "transcript": TRANSCRIPT_COLUMNS}
ORDER = ("call", "inbound_event", "transcript", "job")


def fill_sqlite(path: str, events: int, now: float) -> dict[str, int]:
    """Bulk insert into SQLite: one transaction per table, no fsync while filling."""
    counts = {}
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA synchronous=OFF")
    for table in ORDER:
        names = COLUMNS[table]
        connection.execute("BEGIN")
        insert = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"  # noqa: S608
        connection.executemany(insert, history(table, events, now))
        connection.execute("COMMIT")
        counts[table] = connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
    connection.execute("ANALYZE")
    connection.close()
    return counts


def fill_postgres(url: str, events: int, now: float) -> dict[str, int]:
    """Bulk insert into PostgreSQL with COPY, then ANALYZE and VACUUM (as autovacuum would, in time)."""
    import psycopg

    counts = {table: 0 for table in ORDER}
    engine = create_engine(url)
    raw = engine.raw_connection()
    try:
        driver = raw.driver_connection
        assert isinstance(driver, psycopg.Connection)
        with driver.cursor() as cursor:
            for table in ORDER:
                with cursor.copy(f"COPY {table} ({', '.join(COLUMNS[table])}) FROM STDIN") as copy:
                    for row in history(table, events, now):
                        copy.write_row(row)
                        counts[table] += 1
        driver.commit()
        driver.autocommit = True
        for table in ORDER:
            driver.execute(f"VACUUM ANALYZE {table}")
        for table in ("call", "inbound_event", "transcript"):  # COPY with explicit ids: move the sequences on
            driver.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"  # noqa: S608
            )
    finally:
        raw.close()
        engine.dispose()
    return counts


def timed(client: FlaskClient, path: str, runs: int) -> list[float]:
    """Milliseconds per request, after one warm-up."""
    get = client.get
    get(path)
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        response = get(path)
        took.append((time.perf_counter() - started) * 1000)
        assert response.status_code in (200, 503), (path, response.status_code)
    return took


def measure(name: str, database_url: str, events: int, runs: int) -> list[str]:
    """Fill one database, time the endpoints and one retention round; the printed lines."""
    now = time.time()
    upgrade(database_url)
    started = time.perf_counter()
    if database_url.startswith("sqlite"):
        counts = fill_sqlite(database_url.removeprefix("sqlite:///"), events, now)
    else:
        counts = fill_postgres(database_url, events, now)
    filled = time.perf_counter() - started
    settings = Settings(database_url=database_url, admin_token="bench-admin-token-1234", log_level="WARNING")
    app = create_app(settings)
    client = app.test_client()
    lines = [f"{name}: filled {', '.join(f'{n:,} {t}' for t, n in counts.items())} rows in {filled:.1f} s"]
    for path in ("/metrics", "/readyz"):
        took = timed(client, path, runs)
        lines.append(
            f"{name}: GET {path:9} median {statistics.median(took):7.1f} ms, "
            f"p95 {sorted(took)[max(0, int(len(took) * 0.95) - 1)]:7.1f} ms, max {max(took):7.1f} ms ({runs} runs)"
        )
    db: Database = app.extensions["b24scribe.db"]
    started = time.perf_counter()
    report = retention.purge_expired(db, 30.0, now)
    round_ms = (time.perf_counter() - started) * 1000
    lines.append(
        f"{name}: one housekeeping retention round: {report.events} events purged in {report.batches} batches, "
        f"{round_ms:.0f} ms in all ({round_ms / max(1, report.batches):.0f} ms per write transaction)"
    )
    db.dispose()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--postgres", default=os.environ.get("B24SCRIBE_TEST_POSTGRES_URL"))
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="b24scribe-health-") as directory:
        lines += measure("sqlite", f"sqlite:///{directory}/health.sqlite3", args.events, args.runs)
    if args.postgres and not args.no_postgres:
        schema = f"bench_health_{uuid.uuid4().hex[:10]}"
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        separator = "&" if "?" in args.postgres else "?"
        try:
            lines += measure(
                "postgresql", f"{args.postgres}{separator}options=-csearch_path%3D{schema}", args.events, args.runs
            )
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
    output = io.StringIO()
    for line in lines:
        print(line, file=output)
    print(output.getvalue(), end="")


if __name__ == "__main__":
    main()

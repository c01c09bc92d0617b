"""The SQLite group committer behind every hook: concurrent requests share commits, each is answered
only once its own rows are durable, and one request's failure costs no other request its commit."""

from __future__ import annotations

import sqlite3
import string
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from b24scribe import db as db_module
from b24scribe.db import Database, GroupCommitter


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    """A SQLite database with one small table the tests write to."""
    database = Database(f"sqlite:///{tmp_path}/commits.sqlite3")
    with database.write_engine.begin() as connection:
        connection.execute(text("CREATE TABLE note (id INTEGER PRIMARY KEY, body TEXT NOT NULL UNIQUE)"))
        connection.execute(
            text(
                "CREATE TABLE child (id INTEGER PRIMARY KEY, note_id INTEGER NOT NULL"
                " REFERENCES note (id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    yield database
    database.dispose()


def committer_of(database: Database) -> GroupCommitter:
    committer = database.committer
    assert committer is not None, "SQLite databases group-commit the hooks' writes"
    return committer


def insert(body: str) -> Callable[[sqlite3.Connection], int]:
    def work(driver: sqlite3.Connection) -> int:
        row_id = driver.execute("INSERT INTO note (body) VALUES (?)", (body,)).lastrowid
        assert row_id is not None
        return row_id

    return work


def stored(database: Database) -> dict[str, int]:
    """What another connection sees: only committed rows."""
    path = database.write_engine.url.database
    assert path is not None
    with sqlite3.connect(path) as reader:
        return {body: row_id for row_id, body in reader.execute("SELECT id, body FROM note")}


def run_concurrently(count: int, target: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            target(index)
        except BaseException as error:  # noqa: BLE001 - collected for the test's assertion
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "requests did not finish"
    return errors


def in_one_batch(database: Database, threads: list[threading.Thread], in_order: bool = False) -> None:
    """Start `threads` while the committer is busy, so all their requests share its next commit
    (`in_order`: one at a time, each queued before the next starts, so the batch keeps their order)."""
    committer = committer_of(database)
    entered, release = threading.Event(), threading.Event()

    def block(_driver: sqlite3.Connection) -> None:
        entered.set()
        release.wait(10)

    blocker = threading.Thread(target=lambda: database.transact(lambda _c: None, on_sqlite=block), daemon=True)
    blocker.start()
    assert entered.wait(10)  # the committer is inside the blocker's batch
    for queued, thread in enumerate(threads, start=1):
        thread.start()
        if in_order:
            wait_until(lambda queued=queued: committer.waiting() == queued)  # type: ignore[misc]
    wait_until(lambda: committer.waiting() == len(threads))
    release.set()
    for thread in [blocker, *threads]:
        thread.join(30)
        assert not thread.is_alive()


def orphan_child(driver: sqlite3.Connection) -> int:
    """A row whose deferred foreign key points nowhere: the statement succeeds, the COMMIT fails."""
    row_id = driver.execute("INSERT INTO child (note_id) VALUES (999)").lastrowid
    assert row_id is not None
    return row_id


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_concurrent_requests_share_commits_and_each_is_answered_after_its_own_commit(sqlite_db: Database) -> None:
    seen_after_answer: list[bool] = []

    def request(index: int) -> None:
        for n in range(25):
            body = f"request-{index}-{n}"
            row_id = sqlite_db.transact(lambda _c: 0, on_sqlite=insert(body))
            # the answer comes after the commit: a separate connection already sees the row
            seen_after_answer.append(stored(sqlite_db).get(body) == row_id)

    assert run_concurrently(16, request) == []
    committer = committer_of(sqlite_db)
    assert len(stored(sqlite_db)) == 400
    assert all(seen_after_answer) and len(seen_after_answer) == 400
    assert committer.committed == 400
    assert committer.batches < 400, "concurrent requests never shared a commit"


def test_one_failing_request_costs_no_other_request_its_commit(sqlite_db: Database) -> None:
    sqlite_db.transact(lambda _c: 0, on_sqlite=insert("taken"))
    results: dict[int, Any] = {}

    def request(index: int) -> None:
        body = "taken" if index == 3 else f"fresh-{index}"  # request 3 violates the UNIQUE constraint
        try:
            results[index] = sqlite_db.transact(lambda _c: 0, on_sqlite=insert(body))
        except sqlite3.IntegrityError as error:
            results[index] = error

    in_one_batch(sqlite_db, [threading.Thread(target=request, args=(i,), daemon=True) for i in range(8)])

    assert isinstance(results[3], sqlite3.IntegrityError)
    rows = stored(sqlite_db)
    assert set(rows) == {"taken"} | {f"fresh-{i}" for i in range(8) if i != 3}
    assert all(results[i] == rows[f"fresh-{i}"] for i in range(8) if i != 3)


def test_a_failed_commit_fails_every_request_in_it_stores_nothing_and_the_next_commit_works(
    sqlite_db: Database,
) -> None:
    outcomes: dict[int, Any] = {}

    def request(index: int) -> None:
        work = orphan_child if index == 0 else insert(f"batch-{index}")
        try:
            outcomes[index] = sqlite_db.transact(lambda _c: 0, on_sqlite=work)
        except sqlite3.IntegrityError as error:
            outcomes[index] = error

    in_one_batch(sqlite_db, [threading.Thread(target=request, args=(i,), daemon=True) for i in range(5)])

    # one commit, so one fate: every request in it is told it failed, and none of it is stored
    assert all(isinstance(outcome, sqlite3.IntegrityError) for outcome in outcomes.values())
    assert len(outcomes) == 5
    assert stored(sqlite_db) == {}
    assert sqlite_db.transact(lambda _c: 0, on_sqlite=insert("after")) == stored(sqlite_db)["after"]


def test_when_a_lone_retry_fails_to_commit_what_was_committed_is_still_acknowledged(sqlite_db: Database) -> None:
    sqlite_db.transact(lambda _c: 0, on_sqlite=insert("taken"))
    outcomes: dict[str, Any] = {}
    works = {"first": insert("first"), "duplicate": insert("taken"), "orphan": orphan_child, "last": insert("last")}

    def request(name: str) -> None:
        try:
            outcomes[name] = sqlite_db.transact(lambda _c: 0, on_sqlite=works[name])
        except sqlite3.IntegrityError as error:
            outcomes[name] = error

    threads = [threading.Thread(target=request, args=(name,), daemon=True) for name in works]
    in_one_batch(sqlite_db, threads, in_order=True)

    # the duplicate sends the batch to one transaction per request: "first" commits alone and is
    # acknowledged; the orphan's own commit fails, and "last", not yet committed, is told so too
    rows = stored(sqlite_db)
    assert outcomes["first"] == rows["first"]
    assert isinstance(outcomes["duplicate"], sqlite3.IntegrityError)
    assert isinstance(outcomes["orphan"], sqlite3.IntegrityError)
    assert isinstance(outcomes["last"], sqlite3.IntegrityError) and "last" not in rows
    assert sqlite_db.transact(lambda _c: 0, on_sqlite=insert("after")) == stored(sqlite_db)["after"]


def test_without_the_sqlite_work_a_transaction_runs_on_a_plain_connection(sqlite_db: Database) -> None:
    def core(connection: Any) -> int:
        connection.execute(text("INSERT INTO note (body) VALUES ('core')"))
        return 1

    assert sqlite_db.transact(core) == 1
    assert "core" in stored(sqlite_db)
    assert committer_of(sqlite_db).committed == 0


GEVENT_SCRIPT = string.Template("""
from gevent import monkey; monkey.patch_all()
import json, sys, gevent
from b24scribe.db import Database

database = Database(sys.argv[1])
database.write_engine.dispose()
with database.write_engine.begin() as connection:
    connection.exec_driver_sql("CREATE TABLE note (id $key PRIMARY KEY, body TEXT NOT NULL)")

def insert(driver, table, n):
    return driver.execute(
        f"INSERT INTO {table} (body) VALUES ($mark) RETURNING id", (f"greenlet-{n}",)).fetchone()[0]

def request(n):
    for _ in range(n % 8):  # requests become ready over several turns of the loop, as from sockets
        gevent.sleep(0)
    table = "no_such_table" if n == 77 else "note"  # one request's own statement fails
    return database.transact(lambda _c: 0, $driver=lambda d: insert(d, table, n))

greenlets = [gevent.spawn(request, n) for n in range(200)]
gevent.joinall(greenlets)
ids = [g.value for g in greenlets if g.successful()]
errors = {n: type(g.exception).__name__ for n, g in enumerate(greenlets) if not g.successful()}
committer = database.committer
print(json.dumps({"ids": ids, "errors": errors, "type": type(committer).__name__,
                  "batches": committer.batches, "committed": committer.committed}))
""")


def run_gevent_script(database_url: str) -> dict[str, Any]:
    """GEVENT_SCRIPT in a process of its own (gevent patches the whole process); what it printed."""
    import json
    import subprocess
    import sys

    sqlite = database_url.startswith("sqlite")
    script = GEVENT_SCRIPT.substitute(
        key="INTEGER" if sqlite else "SERIAL",
        mark="?" if sqlite else "%s",
        driver="on_sqlite" if sqlite else "on_postgres",
    )
    answer = subprocess.run(
        [sys.executable, "-c", script, database_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    result: dict[str, Any] = json.loads(answer.stdout.strip().splitlines()[-1])
    return result


def test_under_gevent_a_batch_takes_every_request_already_in_the_process(tmp_path: Path) -> None:
    # gunicorn's gevent worker: greenlets wait for the commit, and the committer waits for the
    # loop to go idle, so 200 requests that become ready over 8 loop turns share a few commits (8 without);
    # the one whose statement fails gets the error, and its batch's other requests are still committed
    path = tmp_path / "gevent.sqlite3"
    result = run_gevent_script(f"sqlite:///{path}")
    with sqlite3.connect(path) as reader:
        rows = dict(reader.execute("SELECT body, id FROM note"))
    assert result["type"] == "GeventGroupCommitter"
    assert result["errors"] == {"77": "OperationalError"}
    assert sorted(result["ids"]) == sorted(rows.values()) and len(rows) == 199
    assert result["committed"] == 200
    assert result["batches"] <= 5, f"{result['batches']} commits for 200 requests ready within a few loop turns"


WAITING_GREENLET_SCRIPT = """
from gevent import monkey; monkey.patch_all()
import json, sys, time, gevent
from sqlalchemy import select, text
from b24scribe.db import Database

database = Database(sys.argv[1])
writes = []

def write():  # waits for the write lock another process holds
    with database.write() as session:
        session.execute(text("INSERT INTO note (body) VALUES ('after the wait')"))
    writes.append(time.monotonic())

ticks = []
def tick():  # another request of the same process: keeps being served while the write waits
    while len(ticks) < 50:
        gevent.sleep(0.002)
        ticks.append(time.monotonic())

writer = gevent.spawn(write)
ticker = gevent.spawn(tick)
ticker.join(10)
print(json.dumps({"ticks": len(ticks), "written_while_ticking": len(writes)}), flush=True)
sys.stdin.readline()  # the test releases its lock, then says so
writer.join(10)
print(json.dumps({"written": len(writes)}), flush=True)
"""


def test_under_gevent_waiting_for_the_write_lock_lets_the_other_greenlets_run(sqlite_db: Database) -> None:
    # gunicorn's gevent worker: while the worker process holds the SQLite write lock, a request
    # waiting for it must not stop the process's other requests (a blocking flock would)
    import fcntl
    import json
    import os
    import select
    import subprocess
    import sys

    url = str(sqlite_db.write_engine.url)
    lock_file = os.open(f"{sqlite_db.write_engine.url.database}.write-lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_file, fcntl.LOCK_EX)  # as another process (the worker) holding the lock
    child = subprocess.Popen(
        [sys.executable, "-c", WAITING_GREENLET_SCRIPT, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], 15)
        assert ready, "the waiting write stopped the whole process: the other greenlet never finished"
        during = json.loads(child.stdout.readline())
        assert during == {"ticks": 50, "written_while_ticking": 0}
    finally:
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        os.close(lock_file)
        child.stdin.write("released\n")
        child.stdin.flush()
    after = json.loads(child.stdout.readline())
    assert child.wait(30) == 0
    assert after == {"written": 1}
    assert "after the wait" in stored(sqlite_db)


def test_concurrent_transactions_reuse_the_connections_they_opened(db: Database) -> None:
    """A worker's sender threads read at once, over and over: each connection is opened
    once and kept, never opened and closed per transaction (on PostgreSQL each open forks a
    backend; SQLAlchemy's default pool kept only 5 and closed the rest on return)."""
    from sqlalchemy import event

    opened: list[object] = []
    for engine in {db.write_engine, db.read_engine}:
        event.listen(engine, "connect", lambda connection, _record: opened.append(connection))
    inside = threading.Barrier(8)

    def transactions(_index: int) -> None:
        for _round in range(20):
            with db.read() as session:
                session.execute(text("SELECT 1"))
                inside.wait(10)  # all eight hold a connection at once, every round
            inside.wait(10)  # and then all eight have given it back

    assert run_concurrently(8, transactions) == []
    # 8 threads, 160 transactions: no more connections than were ever in use at once
    assert len(opened) <= 8, f"{len(opened)} connections opened for 160 transactions"


@pytest.fixture
def postgres_db() -> Iterator[tuple[Database, str]]:
    """A Database of its own on the test PostgreSQL, named so its server connections can be found."""
    from tests.conftest import POSTGRES_URL

    if POSTGRES_URL is None:
        pytest.skip("needs B24SCRIBE_TEST_POSTGRES_URL")
    name = f"b24scribe-ping-{time.monotonic_ns()}"
    separator = "&" if "?" in POSTGRES_URL else "?"
    database = Database(f"{POSTGRES_URL}{separator}application_name={name}")
    try:
        yield database, name
    finally:
        database.dispose()


def _count_pings(database: Database, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    pinged: list[object] = []
    ping = database.write_engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pinged.append(dbapi_connection)
        return bool(ping(dbapi_connection))

    monkeypatch.setattr(database.write_engine.dialect, "do_ping", counted)
    return pinged


def test_postgresql_connections_in_steady_use_are_not_pinged(
    postgres_db: tuple[Database, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction after another within moments costs no ping round trip; one after a pause does."""
    database, _ = postgres_db
    pinged = _count_pings(database, monkeypatch)
    for _ in range(50):
        with database.read() as session:
            assert session.execute(text("SELECT 1")).scalar() == 1
    assert pinged == []
    time.sleep(db_module.PING_IDLE_SECONDS + 0.1)
    with database.read() as session:
        assert session.execute(text("SELECT 1")).scalar() == 1
    assert len(pinged) == 1


def test_a_postgresql_connection_killed_while_idle_is_replaced_before_use(
    postgres_db: tuple[Database, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server restart (here: the server ends the pool's connections) costs no transaction after it."""
    from sqlalchemy import create_engine

    database, name = postgres_db
    with database.write() as session:
        before = session.execute(text("SELECT pg_backend_pid()")).scalar()
    admin = create_engine(database.url.split("?")[0], isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            killed = connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :name"),
                {"name": name},
            ).all()
        assert len(killed) == 1
    finally:
        admin.dispose()
    pinged = _count_pings(database, monkeypatch)
    time.sleep(db_module.PING_IDLE_SECONDS + 0.1)
    with database.write() as session:
        after = session.execute(text("SELECT pg_backend_pid()")).scalar()
    assert len(pinged) == 1 and after != before


def test_grouped_hook_writes_store_what_a_plain_transaction_stores(db: Database) -> None:
    """The hooks' group-committed path (raw driver statements) and the plain Core path leave the
    same rows: the event, its apply job, the same answer for a duplicate and for a rejected event."""
    from b24scribe.events import RawEvent, store_event, store_rejected
    from b24scribe.models import InboundEvent, Job

    grouped = Database(db.url, group_commit=True)
    plain = Database(db.url, group_commit=False)
    stored_ids: dict[str, list[int]] = {}
    try:
        for name, database in (("grouped", grouped), ("plain", plain)):
            raw = RawEvent("pbx", "generic", f'{{"call": "{name}"}}'.encode(), {"event": "end"}, "application/json")
            first = store_event(database, raw, f"key-{name}")
            again = store_event(database, raw, f"key-{name}")
            rejected = store_rejected(database, raw, {"code": "bad", "fields": {"x": ["no"]}}, f"bad-{name}")
            replayed = store_rejected(database, raw, {"code": "bad", "fields": {"x": ["no"]}}, f"bad-{name}")
            assert (first.duplicate, again.duplicate, again.event_id) == (False, True, first.event_id)
            assert (rejected.duplicate, replayed.duplicate) == (False, True)
            assert replayed.rejected_with == rejected.rejected_with == {"code": "bad", "fields": {"x": ["no"]}}
            assert first.rejected_with is None and again.rejected_with is None
            stored_ids[name] = [first.event_id, rejected.event_id]
        with db.read() as session:

            def shape(event_id: int) -> tuple[Any, ...]:
                event = session.get_one(InboundEvent, event_id)
                jobs = session.scalars(select(Job).where(Job.event_id == event_id)).all()
                return (
                    event.source,
                    event.provider,
                    event.content_type,
                    event.query,
                    event.state,
                    event.error,
                    event.call_id,
                    [(job.kind, job.state, job.attempts, job.ambiguous, job.next_attempt_at > 0) for job in jobs],
                )

            for grouped_id, plain_id in zip(stored_ids["grouped"], stored_ids["plain"], strict=True):
                assert shape(grouped_id) == shape(plain_id)
            assert shape(stored_ids["grouped"][0])[-1] == [("apply", "pending", 0, False, True)]
            assert shape(stored_ids["grouped"][1])[-1] == [], "a rejected event is not folded"
        if not db.is_sqlite:
            assert grouped.committer is not None and grouped.committer.committed == 4
    finally:
        grouped.dispose()
        plain.dispose()


def test_concurrent_hook_writes_share_commits_and_a_duplicate_in_the_same_batch_is_one_event(db: Database) -> None:
    """Many requests at once (some the same delivery twice) share commits on either database; each
    gets its event id after the commit, and a delivery sent twice is stored once."""
    from b24scribe.events import RawEvent, store_event
    from b24scribe.models import InboundEvent

    grouped = Database(db.url, group_commit=True)
    answers: dict[tuple[int, int], Any] = {}
    try:

        def request(index: int) -> None:
            for n in range(10):
                key = f"call-{index % 8}-{n}"  # threads i and i + 8 send the same deliveries
                raw = RawEvent("pbx", "generic", key.encode(), {}, "application/json")
                answers[index, n] = store_event(grouped, raw, key)

        assert run_concurrently(16, request) == []
        committer = grouped.committer
        assert committer is not None
        assert committer.committed == 160 and committer.batches < 160, "concurrent requests never shared a commit"
    finally:
        grouped.dispose()
    with db.read() as session:
        stored_events = dict(session.execute(select(InboundEvent.dedupe_key, InboundEvent.id)).all())
    assert len(stored_events) == 80
    for (index, n), outcome in answers.items():
        assert outcome.event_id == stored_events[f"call-{index % 8}-{n}"]
    assert sum(not outcome.duplicate for outcome in answers.values()) == 80


def test_under_gevent_postgresql_hook_writes_share_commits(database_url: str) -> None:
    """The gevent web on PostgreSQL: 200 requests ready within a few loop turns share a few commits;
    the one whose statement fails gets its error and costs no other request its commit."""
    if database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL only (SQLite: test_under_gevent_a_batch_takes_every_request_already_in_the_process)")
    result = run_gevent_script(database_url)
    database = Database(database_url)
    try:
        with database.read() as session:
            rows = dict(session.execute(text("SELECT body, id FROM note")).all())
    finally:
        database.dispose()
    assert result["type"] == "GeventGroupCommitter"
    assert result["errors"] == {"77": "ProgrammingError"}, "the driver's error, as SQLAlchemy's"
    assert sorted(result["ids"]) == sorted(rows.values()) and len(rows) == 199
    assert result["committed"] == 200
    assert result["batches"] <= 8, f"{result['batches']} commits for 200 requests ready within a few loop turns"


def test_a_grouped_postgresql_write_that_fails_is_answered_503_like_any_storage_failure(
    postgres_db: tuple[Database, str],
) -> None:
    """The group committer talks to psycopg directly; its errors reach the hook as SQLAlchemy's,
    which the hooks answer with 503 (nothing stored, the sender retries)."""
    from sqlalchemy.exc import ProgrammingError

    from handlers.errors import answer_error

    database, _ = postgres_db
    grouped = Database(database.url, group_commit=True)
    try:
        with pytest.raises(ProgrammingError) as raised:
            grouped.transact(lambda _c: 0, on_postgres=lambda d: d.execute("SELECT * FROM no_such_table"))
        assert grouped.transact(lambda _c: 0, on_postgres=lambda d: d.execute("SELECT 1").fetchone()[0]) == 1
    finally:
        grouped.dispose()
    response = answer_error(raised.value, None)
    assert response is not None and response.status_code == 503
    assert response.json is not None and response.json["error"]["code"] == "storage_unavailable"

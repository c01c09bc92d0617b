"""Engines and sessions: SQLite (WAL, synchronous=FULL, BEGIN IMMEDIATE writes) or PostgreSQL."""

from __future__ import annotations

import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, CursorResult, Engine, Result, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # We issue BEGIN ourselves (below), so pysqlite must not start transactions implicitly.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged event survives power loss (NORMAL may roll back the last commits).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front, so a read-then-write transaction waits on the
        # busy timeout instead of failing with SQLITE_BUSY halfway through.
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


T = TypeVar("T")


class WriteLock:
    """One writer at a time across every process and thread using this SQLite file.

    SQLite's own busy handler makes a waiting writer sleep in growing steps (up to 100 ms), so two
    gunicorn processes contending for the write lock lose most of their time asleep. A blocking
    flock on a file beside the database hands the lock over the moment it is free. Fails safe:
    without the file lock, BEGIN IMMEDIATE and the busy timeout still serialise writers.
    """

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the duration of the block."""
        if self._path is None:
            yield
            return
        with self._thread_lock:
            if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
                self._fd, self._pid = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)


class GroupCommitter:
    """Runs concurrent requests' write transactions as one commit, each answered only after it.

    With synchronous=FULL every SQLite commit waits for an fsync; threads of one web process that
    arrive while a commit is in progress queue up and share the next one. Each request runs in its
    own SAVEPOINT, so one request's failure rolls back only its own writes. Fails closed: if the
    shared commit fails, every request in the batch gets the error (nothing acknowledged).
    """

    def __init__(self, engine: Engine, lock: WriteLock, max_batch: int = 64) -> None:
        self._engine = engine
        self._lock = lock
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Callable[[Connection], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._pid = os.getpid()

    def run(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in the next shared transaction and return its result after the commit."""
        self._ensure_thread()
        future: Future[T] = Future()
        self._queue.put((work, future))
        return future.result()

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._commit_loop, name="group-commit", daemon=True)
                self._thread.start()

    def _commit_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit(batch)

    def _commit(self, batch: list[tuple[Callable[[Connection], Any], Future[Any]]]) -> None:
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            with self._lock.held(), self._engine.begin() as connection:
                driver = connection.connection.driver_connection
                assert driver is not None
                for work, future in batch:
                    # a raw SAVEPOINT per request: SQLAlchemy's nested transaction costs more than the insert
                    driver.execute("SAVEPOINT request")
                    try:
                        outcomes.append((future, work(connection), None))
                    except Exception as error:  # this request only: its savepoint is rolled back
                        driver.execute("ROLLBACK TO request")
                        outcomes.append((future, None, error))
                    driver.execute("RELEASE request")
        except Exception as error:
            for _work, future in batch:
                future.set_exception(error)
            return
        for future, result, failure in outcomes:
            if failure is not None:
                future.set_exception(failure)
            else:
                future.set_result(result)


class Database:
    """The service's database: `write()` for transactions that change data, `read()` for views,
    `transact()` for the hooks' short write transactions (group-committed on SQLite)."""

    def __init__(self, url: str, group_commit: bool | None = None) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        if self.is_sqlite:
            if sqlite3.sqlite_version_info < (3, 35):
                raise RuntimeError(f"SQLite {sqlite3.sqlite_version} is too old: 3.35 or newer is needed")
            self.write_engine = _sqlite_engine(url, immediate=True)
            self.read_engine = _sqlite_engine(url, immediate=False)
        else:
            self.write_engine = create_engine(url, pool_pre_ping=True)
            self.read_engine = self.write_engine
        self._write_sessions = sessionmaker(self.write_engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.read_engine, expire_on_commit=False)
        database_file = make_url(url).database if self.is_sqlite else None
        on_disk = database_file not in (None, "", ":memory:")
        self._write_lock = WriteLock(f"{database_file}.write-lock" if on_disk else None)
        use_group_commit = self.is_sqlite if group_commit is None else group_commit
        self._committer = GroupCommitter(self.write_engine, self._write_lock) if use_group_commit else None

    def transact(self, work: Callable[[Connection], T]) -> T:
        """Run `work` (Core statements) in a write transaction; return its result once committed."""
        if self._committer is not None:
            return self._committer.run(work)
        with self._write_lock.held(), self.write_engine.begin() as connection:
            return work(connection)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back on any error."""
        with self._write_lock.held(), self._write_sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction."""
        with self._read_sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        """Close pooled connections (after fork, and at shutdown)."""
        self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            self.read_engine.dispose()


def affected_rows(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE touched."""
    return int(cast(CursorResult[Any], result).rowcount)

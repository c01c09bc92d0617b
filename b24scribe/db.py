"""Engines and sessions: SQLite (WAL, synchronous=FULL, BEGIN IMMEDIATE writes) or PostgreSQL."""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, CursorResult, Engine, Result, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Connections a process keeps open, and as many more it may open for a moment (see Database):
# PostgreSQL's are bounded by the server's max_connections (100 by default) over every process,
# SQLite's (per engine) only by memory.
POOL_SIZE = 10
PING_IDLE_SECONDS = 0.25  # a PostgreSQL connection idle longer than this is pinged before use
SQLITE_POOL_SIZE = 20


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    parsed = make_url(url)
    pool: dict[str, int] = {}
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # see Database: no connect (and pragmas) per transaction
        pool = {"pool_size": SQLITE_POOL_SIZE, "max_overflow": SQLITE_POOL_SIZE}
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **pool)

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
        # Straight on the driver's connection: every transaction begins here, and SQLAlchemy's
        # statement machinery around one constant statement cost more than SQLite's running it.
        connection.connection.driver_connection.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


T = TypeVar("T")


def _ping_idle_connections(engine: Engine) -> None:
    """Ping a pooled connection before use if it sat idle more than PING_IDLE_SECONDS; a dead one
    is replaced (SQLAlchemy retries the checkout with a new connection), so a PostgreSQL restart
    costs no request once the database is back.

    SQLAlchemy's `pool_pre_ping` pings on every checkout: a round trip for each hook request and
    each of the worker's transactions, ~10 % of the worker's CPU per job (bench/delivery_cpu.py).
    A restart takes longer than PING_IDLE_SECONDS, so a connection that outlived one has been idle
    at least that long (or failed in use, which invalidates the pool); the pool is LIFO, so under
    load the same few connections are reused within milliseconds and never pinged.
    """

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection: Any, record: Any) -> None:
        record.info["b24scribe_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("b24scribe_idle_since", None)
        if since is None or time.monotonic() - since < PING_IDLE_SECONDS:
            return  # just opened, or back in use within moments
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            raise DisconnectionError(f"a pooled connection failed its ping: {type(error).__name__}") from error


class WriteLock:
    """One writer at a time across every process and thread using this SQLite file.

    SQLite's own busy handler makes a waiting writer sleep in growing steps (up to 100 ms), so two
    gunicorn processes contending for the write lock lose most of their time asleep. A blocking
    flock on a file beside the database hands the lock over the moment it is free. In a gevent
    process (gunicorn's gevent worker) a blocking flock would stop every greenlet of the process,
    so there the lock is polled without blocking and the greenlet sleeps cooperatively between
    tries (COOPERATIVE_POLL_SECONDS, growing to COOPERATIVE_POLL_MAX_SECONDS): the other requests
    of the process go on being read and answered meanwhile. Fails safe: without the file lock,
    BEGIN IMMEDIATE and the busy timeout still serialise writers.
    """

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self._cooperative = False

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the duration of the block."""
        if self._path is None:
            yield
            return
        with self._thread_lock:
            if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
                self._fd, self._pid = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
                self._cooperative = _under_gevent()
            if self._cooperative:
                _flock_cooperatively(self._fd)
            else:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)


COOPERATIVE_POLL_SECONDS = 0.0002
COOPERATIVE_POLL_MAX_SECONDS = 0.002


def _flock_cooperatively(fd: int) -> None:
    """Take an exclusive flock without blocking the gevent loop: try, and sleep as a greenlet."""
    import gevent

    pause = COOPERATIVE_POLL_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            gevent.sleep(pause)
            pause = min(pause * 2, COOPERATIVE_POLL_MAX_SECONDS)


def _under_gevent() -> bool:
    """True in a process whose threads gevent has replaced by greenlets (gunicorn's gevent worker)."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("threading"))


class _Pending:
    """One request waiting in the group committer: its work, then its result or error."""

    __slots__ = ("work", "done", "result", "error", "committed")

    def __init__(self, work: Callable[[Any], Any], done: Any = None) -> None:
        self.work = work
        self.done = done  # how the request waits: a held Lock (threads) or a gevent Waiter
        self.result: Any = None
        self.error: BaseException | None = None
        self.committed = False  # its rows are durable: whatever fails later, it is answered with its result


class GroupCommitter:
    """Runs concurrent requests' write transactions as one commit, each answered only after it.

    With synchronous=FULL every SQLite commit waits for an fsync; threads of one web process that
    arrive while a commit is in progress queue up and share the next one. One thread owns one raw
    sqlite3 connection and runs BEGIN IMMEDIATE, every request's work, COMMIT: the hooks' hot
    path, so no pool checkout or SQLAlchemy transaction per batch. On PostgreSQL (the gevent web
    processes) the same, on a pooled psycopg connection per batch: a commit (and its WAL flush)
    and a checkout per batch rather than per request. Failure policy: fails closed.
    If one request's work fails, the batch is rolled back and each request is run in a
    transaction of its own (only the failing one gets an error); if a commit fails, every request
    in it gets the error (nothing acknowledged), and the connection is replaced.
    """

    def __init__(self, engine: Engine, lock: WriteLock, max_batch: int = 64) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._lock = lock
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._pid = os.getpid()
        self._proxy: Any = None  # the raw connection, used only by the thread that commits
        self.batches = 0  # commits so far, and the requests they held (tests and benchmarks read them)
        self.committed = 0

    def run(self, work: Callable[[Any], T]) -> T:
        """Run `work` on the shared connection in the next commit; return its result after the commit."""
        if self._thread is None or self._pid != os.getpid():  # first use in this process
            self._start_thread()
        done = threading.Lock()
        done.acquire()  # released by the committer once the shared commit is over
        pending = _Pending(work, done)
        self._queue.put(pending)
        done.acquire()
        if pending.error is not None:
            raise pending.error
        result: T = pending.result
        return result

    def waiting(self) -> int:
        """Requests queued for the next commit (tests read it)."""
        return self._queue.qsize()

    def _start_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or self._pid != os.getpid():
                if self._pid != os.getpid():  # a forked child: the parent's queue and thread are not ours
                    self._pid, self._queue, self._proxy = os.getpid(), queue.SimpleQueue(), None
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
            self._commit_batch(batch)
            for pending in batch:
                pending.done.release()

    def _commit_batch(self, batch: list[_Pending]) -> None:
        try:
            if self._postgres:
                self._commit_pooled(batch)
            else:
                if self._proxy is None:
                    self._proxy = self._engine.raw_connection()  # pragmas applied by the engine's connect hook
                self._commit(self._proxy.driver_connection, batch)
        except BaseException as error:  # noqa: BLE001 - the batch's callers get it, never this thread
            for pending in batch:
                if not pending.committed and pending.error is None:
                    pending.error, pending.result = error, None
            if self._proxy is not None:
                with contextlib.suppress(Exception):
                    self._proxy.invalidate()  # a connection a commit failed on is not trusted again
                self._proxy = None
        if self._postgres:
            # psycopg's errors reach the callers as SQLAlchemy's, as from any other transaction
            # (so the hooks answer 503 for them without knowing the driver)
            driver_error = self._engine.dialect.loaded_dbapi.Error
            for pending in batch:
                if isinstance(pending.error, driver_error):
                    pending.error = DBAPIError.instance(None, None, pending.error, driver_error)

    def _commit_pooled(self, batch: list[_Pending]) -> None:
        """PostgreSQL: a connection from the pool for each batch; one idle since the last batch is
        pinged before use (`_ping_idle_connections`), so a database restart costs no request after it."""
        proxy = self._engine.raw_connection()
        try:
            self._commit(proxy.driver_connection, batch)
        except BaseException:
            proxy.invalidate()  # a connection a commit failed on is not trusted again
            raise
        finally:
            proxy.close()

    def _commit(self, driver: Any, batch: list[_Pending]) -> None:
        with self._lock.held():
            try:
                self._transaction(driver, batch)
            except _WorkFailed:
                # Rare (a request's own statement failed): run each request alone, so one
                # request's failure costs no other request its commit (no savepoints on the
                # common path: two more statements per request). If one of these commits fails,
                # the requests not yet committed get that error, as with a shared commit.
                for pending in batch:
                    pending.result = pending.error = None
                    try:
                        self._transaction(driver, [pending])
                    except _WorkFailed as failed:
                        pending.error = failed.error
        self.batches += 1
        self.committed += len(batch)

    def _transaction(self, driver: Any, batch: list[_Pending]) -> None:
        if self._postgres:  # psycopg begins a transaction with the first statement
            self._run_work(driver, batch, driver.commit, driver.rollback)
            return
        driver.execute("BEGIN IMMEDIATE")
        self._run_work(
            driver,
            batch,
            lambda: driver.execute("COMMIT"),
            lambda: driver.execute("ROLLBACK") if driver.in_transaction else None,
        )

    @staticmethod
    def _run_work(driver: Any, batch: list[_Pending], commit: Callable[[], Any], rollback: Callable[[], Any]) -> None:
        try:
            for pending in batch:
                try:
                    pending.result = pending.work(driver)
                except Exception as error:
                    raise _WorkFailed(error) from error
            commit()
            for pending in batch:
                pending.committed = True
        except BaseException:
            rollback()
            raise


class GeventGroupCommitter(GroupCommitter):
    """The same group commit where requests are greenlets of one thread (gunicorn's gevent worker).

    A request parks on a gevent Waiter (one switch to the hub: no lock, no queue, no thread
    hand-over); the committer is a greenlet that waits for the loop to go idle, so a batch takes
    every request already in the process, then commits and schedules each request's wake-up.
    """

    def __init__(self, engine: Engine, lock: WriteLock, max_batch: int = 64) -> None:
        super().__init__(engine, lock, max_batch)
        import gevent
        from gevent.hub import Waiter, get_hub

        self._gevent, self._waiter_type, self._hub = gevent, Waiter, get_hub()
        self._waiting: list[_Pending] = []
        self._greenlet: Any = None
        self._parked: Any = None  # the committer's Waiter while it has nothing to commit

    def run(self, work: Callable[[Any], T]) -> T:
        """Run `work` on the shared connection in the next commit; return its result after the commit."""
        if self._greenlet is None:
            self._greenlet = self._gevent.spawn(self._commit_loop)
        pending = _Pending(work, self._waiter_type())
        self._waiting.append(pending)
        if self._parked is not None:
            parked, self._parked = self._parked, None
            self._hub.loop.run_callback(parked.switch, None)
        pending.done.get()
        if pending.error is not None:
            raise pending.error
        result: T = pending.result
        return result

    def waiting(self) -> int:
        """Requests queued for the next commit (tests read it)."""
        return len(self._waiting)

    def _commit_loop(self) -> None:
        run_callback = self._hub.loop.run_callback
        while True:
            if not self._waiting:
                self._parked = self._waiter_type()
                self._parked.get()
            self._gevent.idle()  # every request already runnable in the process joins this batch
            batch = self._waiting[: self._max_batch]
            del self._waiting[: len(batch)]
            self._commit_batch(batch)
            for pending in batch:
                run_callback(pending.done.switch, None)


class _WorkFailed(Exception):
    """A request's work raised inside a shared transaction (the transaction is rolled back)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


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
            # Connections kept open (`pool_size`) cover what one process usually runs at once (its
            # sender threads hold one only while they read or write, and the GIL lets few do so
            # together): with SQLAlchemy's default of 5, every transaction beyond five concurrent
            # ones opened a connection (a PostgreSQL backend forked, SQLite's pragmas run again)
            # and closed it again. At most twice as many: web and worker processes together stay
            # within PostgreSQL's default of 100 connections.
            self.write_engine = create_engine(url, pool_use_lifo=True, pool_size=POOL_SIZE, max_overflow=POOL_SIZE)
            _ping_idle_connections(self.write_engine)
            self.read_engine = self.write_engine
        self._write_sessions = sessionmaker(self.write_engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.read_engine, expire_on_commit=False)
        database_file = make_url(url).database if self.is_sqlite else None
        on_disk = database_file not in (None, "", ":memory:")
        self._write_lock = WriteLock(f"{database_file}.write-lock" if on_disk else None)
        # PostgreSQL commits are grouped in the gevent web processes, where many requests of one
        # process wait at once; threads elsewhere (the worker) run their own transactions.
        gevent = _under_gevent()
        use_group_commit = (self.is_sqlite or gevent) if group_commit is None else group_commit
        committer_type = GeventGroupCommitter if gevent else GroupCommitter
        self._committer = committer_type(self.write_engine, self._write_lock) if use_group_commit else None

    def transact(
        self,
        work: Callable[[Connection], T],
        on_sqlite: Callable[[sqlite3.Connection], T] | None = None,
        on_postgres: Callable[[Any], T] | None = None,
    ) -> T:
        """Run `work` (Core statements) in a write transaction; return its result once committed.

        The hooks pass the same writes for the driver's own connection too (`on_sqlite`, a sqlite3
        connection; `on_postgres`, a psycopg one): those are group-committed with other requests'
        where there is a group committer, and `work` runs where there is none.
        """
        if self._committer is not None:
            raw = on_sqlite if self.is_sqlite else on_postgres
            if raw is not None:
                return self._committer.run(raw)
        with self._write_lock.held(), self.write_engine.begin() as connection:
            return work(connection)

    @property
    def committer(self) -> GroupCommitter | None:
        """The group committer (SQLite; PostgreSQL under gevent), or None."""
        return self._committer

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


def upsert_insert(dialect: str | Session | Connection) -> Callable[..., Any]:
    """The INSERT that can say ON CONFLICT for this database (PostgreSQL's, else SQLite's): the one
    place that picks it. Takes the dialect's name, or a session or connection bound to the database."""
    if isinstance(dialect, Session):
        name = dialect.get_bind().dialect.name
    else:
        name = dialect if isinstance(dialect, str) else dialect.dialect.name
    return postgresql.insert if name == "postgresql" else sqlite.insert


def affected_rows(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE touched."""
    return int(cast(CursorResult[Any], result).rowcount)

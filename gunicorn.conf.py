"""gunicorn settings for the `web` process (the Procfile and the benchmarks use this file)."""

import gc
import os
import warnings
from typing import Any

from gunicorn.glogging import Logger, SafeAtoms

from b24scribe.logging import build_formatter, redact

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"  # noqa: S104
# gevent: a hook request is short CPU work plus a wait for the shared SQLite commit (group commit,
# b24scribe/db.py). As greenlets, the requests of one process wait for that commit without OS
# thread switches or GIL hand-overs, and the committer takes everything that arrived while the
# last fsync ran; measured on 2 cores (bench/ingest.py): ~2,900 PBX events/s vs 1,450 with gthread
# (2 × 32 threads, earlier code), p99 25 ms vs 43 ms. psycopg 3 cooperates with gevent on PostgreSQL.
worker_class = os.environ.get("WEB_WORKER_CLASS", "gevent")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = int(os.environ.get("WEB_CONNECTIONS", "1000"))
threads = int(os.environ.get("WEB_THREADS", "32"))  # only for WEB_WORKER_CLASS=gthread
# The kernel spreads new connections over the workers (else one worker can take them all).
reuse_port = True
timeout = 30
graceful_timeout = 30
keepalive = 5
# What gunicorn reads before the app runs, stated rather than inherited (docs/security.md): the request
# line bounds the query (the hooks read at most 200 of its fields), the headers are few and short.
# The body's limits and its 30 s deadline are the hooks' own (handlers/hooks.py).
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = "-" if os.environ.get("B24SCRIBE_ACCESS_LOG", "1") == "1" else None
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss request_id=%({x-request-id}o)s'
# Never preload: prometheus_client must see PROMETHEUS_MULTIPROC_DIR (set in on_starting) before
# the app imports it, and database connections must not be shared across the fork.
preload_app = False

# The gevent worker patches the standard library after this file (and structlog, which imports
# asyncio and so ssl) is loaded, and gevent warns that ssl was imported first. Benign here: web
# processes open no TLS connections (outbound calls to Bitrix24 and vendors are the worker's).
warnings.filterwarnings("ignore", message="Monkey-patching ssl after ssl has already been imported")

_SECRET_HEADERS = ("authorization", "cookie", "x-twilio-signature", "webhook-signature")


class RedactedAtoms(SafeAtoms):
    """gunicorn's atoms, each redacted when the access log format reads it.

    gunicorn builds ~50 atoms per request (every request and response header, every environ
    entry); the format reads six. Redacting all of them on each request took ~9 % of a web
    process's CPU under load (py-spy, bench/ingest.py); redacting what is read costs next to nothing.
    """

    def __init__(self, atoms: dict[str, Any]) -> None:
        dict.__init__(self, atoms)  # SafeAtoms escapes quotes in all of them here; done on lookup instead

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if not isinstance(value, str):
            return value
        if key.startswith("{") and any(name in key.lower() for name in _SECRET_HEADERS):
            return "***"
        return redact(value).replace('"', '\\"')


class RedactingLogger(Logger):
    """gunicorn's logs as JSON lines like the app's, and the access log without `?token=` values (contract §4)."""

    atoms_wrapper_class = RedactedAtoms

    def setup(self, cfg):  # type: ignore[no-untyped-def]
        super().setup(cfg)
        formatter = build_formatter(os.environ.get("B24SCRIBE_LOG_FORMAT", "json"))
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(formatter)


logger_class = RedactingLogger


def on_starting(server: Any) -> None:
    """Give all web processes (and the worker, which derives the same path) one metrics directory."""
    from b24scribe import metrics
    from b24scribe.settings import SettingsError, load_settings

    try:
        database_url = load_settings().database_url
    except SettingsError:
        return  # the app reports it, with the variable's name, when a worker boots
    path = metrics.prepare_multiprocess_dir(database_url)
    removed = metrics.remove_dead_process_files(path)
    server.log.info(f"prometheus multiprocess directory {path} ({removed} stale files removed)")


def when_ready(server: Any) -> None:
    """Say where the web listens: with `reuse_port` each web process binds the address itself, so
    gunicorn's own "Listening at:" line names no address."""
    server.log.info(f"b24scribe web listening on {', '.join(server.cfg.bind)} ({server.cfg.workers} processes)")


def child_exit(server: Any, worker: Any) -> None:
    """A web process ended: drop its live gauges from the merged metrics."""
    from b24scribe import metrics

    metrics.mark_process_dead(worker.pid)


def post_worker_init(worker: Any) -> None:
    """The app is loaded: move its objects out of the garbage collector's sight (`gc.freeze`).

    A loaded app is ~110,000 tracked objects (Flask, SQLAlchemy, marshmallow, apispec) that live
    as long as the process. Requests parked in the group commit outlive young-generation
    collections, so full collections come often, and each one walked all of them: freezing them
    gave ~7 % more PBX events/s (bench/ingest.py, 4,936 vs 4,621 req/s). Objects created later
    are collected as usual.
    """
    gc.collect()
    gc.freeze()

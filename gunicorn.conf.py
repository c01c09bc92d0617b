"""gunicorn settings for the `web` process (the Procfile and the benchmarks use this file)."""

import os

from gunicorn.glogging import Logger

from b24scribe.logging import redact

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"  # noqa: S104
# Threads let one process's concurrent requests share a database commit (group commit).
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("WEB_THREADS", "8"))
timeout = 30
graceful_timeout = 30
keepalive = 5
accesslog = "-" if os.environ.get("B24SCRIBE_ACCESS_LOG", "1") == "1" else None
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss'


class RedactingLogger(Logger):
    """The access log without `?token=` values (SPEC 4)."""

    def atoms(self, resp, req, environ, request_time):  # type: ignore[no-untyped-def]
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U", "q"):
            if key in atoms and isinstance(atoms[key], str):
                atoms[key] = redact(atoms[key])
        return atoms


logger_class = RedactingLogger

"""The ceilings of the ingest bench: a bare Flask app that only reads the body and answers 202
(the target's ceiling), and the same as a plain WSGI callable (gunicorn's own ceiling, for context).

Served exactly like the real app (`gunicorn 'bench.bare_app:create_app()' --config gunicorn.conf.py`:
gevent, 2 workers, the same access log), so the ratio app / bare is what the service's
own work (authentication, validation, the durable commit) costs. The app's hooks are a WSGI
application of their own beside Flask (handlers/hooks.HookApp), so the bench also reports how far
the app is from gunicorn serving a plain WSGI callable (`bench.bare_app:create_wsgi_app()`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, jsonify, request


def create_app() -> Flask:
    """Every POST path answers 202 after reading the body; GET /livez answers 200."""
    app = Flask(__name__)

    @app.post("/<path:_path>")
    def accept(_path: str) -> tuple[Response, int]:
        body = request.get_data(cache=False)
        return jsonify({"event_id": len(body), "duplicate": False}), 202

    @app.get("/livez")
    def livez() -> Response:
        return jsonify({"status": "ok"})

    return app


def create_wsgi_app() -> Callable[[dict[str, Any], Any], Iterable[bytes]]:
    """The same two answers as a plain WSGI callable: no framework at all."""

    def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            answer, status = b'{"event_id": %d, "duplicate": false}\n' % len(body), "202 Accepted"
        else:
            answer, status = b'{"status": "ok"}\n', "200 OK"
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
        return [answer]

    return application

"""The ceiling of the ingest bench: a bare Flask app that only reads the body and answers 202.

Served exactly like the real app (`gunicorn 'bench.bare_app:create_app()' --config gunicorn.conf.py`:
gevent, 2 workers, the same access log), so the ratio app / bare is what the service's
own work (authentication, validation, the durable commit) costs.
"""

from __future__ import annotations

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

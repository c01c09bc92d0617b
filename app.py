"""The app factory: `gunicorn 'app:create_app()'` serves it; `flask --app app …` runs its commands."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog
from flask import Flask

from b24scribe.db import Database
from b24scribe.logging import configure_logging
from b24scribe.metrics import Metrics
from b24scribe.portals import Directory
from b24scribe.settings import Settings, SettingsError, load_settings
from b24scribe.sources import Sources

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


def create_app(settings: Settings | None = None, sources: Sources | None = None) -> Flask:
    """Build the Flask app around one Settings object (read from the environment if not given) and
    the registry of sources (`schemas/registry.py`'s, unless given: tests add their own sources)."""
    if settings is None:
        try:
            settings = load_settings()
        except SettingsError as error:
            # One line naming the variable, then stop: a misconfigured service must not start.
            print(f"b24scribe: configuration error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["b24scribe.settings"] = settings
    app.extensions["b24scribe.db"] = Database(settings.database_url)
    app.extensions["b24scribe.metrics"] = Metrics()
    app.extensions["b24scribe.portals"] = Directory(app.extensions["b24scribe.db"], settings)
    if sources is None:
        from schemas.registry import SOURCES as sources
    app.extensions["b24scribe.sources"] = sources
    register_blueprints(app)
    register_error_handlers(app)
    register_commands(app)
    register_middleware(app)
    return app


class RequestId:
    """WSGI middleware: every request gets an id (the caller's `X-Request-Id`, else a new random one),
    bound to each log line of the request and echoed in the answer's `X-Request-Id`, errors included.

    A middleware rather than Flask before/after_request hooks: the same behaviour for a fraction of
    the per-request cost (Flask resolves every hook on every request).
    """

    def __init__(self, wsgi_app: WSGIApplication) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # unique, not secret: the module PRNG (reseeded in every forked process), not a system call per request
        request_id = environ.get("HTTP_X_REQUEST_ID") or f"{random.getrandbits(128):032x}"
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)

        def start_with_id(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append(("X-Request-Id", request_id))
            return start_response(status, headers, exc_info)

        return self.wsgi_app(environ, start_with_id)


def register_middleware(app: Flask) -> None:
    """The hooks' own WSGI application mounted at /hooks beside Flask (its routes are the registry of
    sources; Flask serves everything else), inside the request id (every request gets one)."""
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from handlers.hooks import HookApp

    extensions = app.extensions
    hooks = HookApp(
        extensions["b24scribe.settings"],
        extensions["b24scribe.db"],
        extensions["b24scribe.metrics"],
        extensions["b24scribe.sources"],
        extensions["b24scribe.portals"],
    )
    app.wsgi_app = RequestId(DispatcherMiddleware(app.wsgi_app, {"/hooks": hooks}))  # type: ignore[method-assign]


def register_blueprints(app: Flask) -> None:
    """Admin API, health and metrics, and the status page; the OpenAPI document covers them and the
    hooks (served beside Flask, see `register_middleware`), which it draws from the registry."""
    from handlers import admin, b24app, health, status_page
    from handlers.openapi import document_hooks, init_api

    api = init_api(app)
    document_hooks(api, app.extensions["b24scribe.sources"])
    api.register_blueprint(admin.bp)
    api.register_blueprint(health.bp)
    api.register_blueprint(b24app.bp)
    app.register_blueprint(status_page.bp)


def register_error_handlers(app: Flask) -> None:
    """One JSON error shape for everything."""
    from handlers.errors import register_error_handlers as register

    register(app)


def register_commands(app: Flask) -> None:
    """`flask worker`, `flask check`, `flask db upgrade`, `flask jobs …`, `flask calls …`, `flask events …`
    (and flask-smorest's `flask openapi write openapi.json`)."""
    from handlers.commands import register

    register(app)

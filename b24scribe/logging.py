"""Structured JSON logs (structlog) with request, event, job and call ids bound; never secrets.

Failure policy: fails closed on secrets — besides never passing tokens, webhook URLs, bodies or
transcript text to a logger, every line goes through `redact` (query tokens, bearer values,
incoming-webhook codes, whsec_ secrets) and values under secret-sounding keys are replaced.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

_TOKEN_IN_URL = re.compile(r"(?<![A-Za-z0-9_])(token=)[^&\s\"']+", re.IGNORECASE)
_WEBHOOK_PATH = re.compile(r"(/rest/\d+/)[A-Za-z0-9_]+")
_BEARER = re.compile(r"(bearer\s+)[^\s\"',]+", re.IGNORECASE)
_SIGNING_SECRET = re.compile(r"whsec_[A-Za-z0-9+/=_-]+")
# Keys whose values are never logged, whatever they hold.
SECRET_KEYS = frozenset(
    {
        "token",
        "inbound_token",
        "admin_token",
        "webhook_secret",
        "secret",
        "password",
        "authorization",
        "cookie",
        "webhook_url",
        "bitrix24_webhook_url",
        "access_token",
        "refresh_token",
        "application_token",
        "client_secret",
        "auth",
        "body",
        "payload",
        "text",
        "segments",
        "messages",
        "transcript",
    }
)


def redact(text: str) -> str:
    """Remove `token=` values, bearer credentials, signing secrets and incoming-webhook codes."""
    lowered = text.lower()
    if "token=" not in lowered and "bearer" not in lowered and "whsec_" not in text and "/rest/" not in text:
        return text  # the common case, on every log line: nothing to look for
    text = _TOKEN_IN_URL.sub(r"\1***", text)
    text = _BEARER.sub(r"\1***", text)
    text = _SIGNING_SECRET.sub("whsec_***", text)
    return _WEBHOOK_PATH.sub(r"\1***", text)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: "***" if str(k).lower() in SECRET_KEYS else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    return value


def _redact_event(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key, value in event_dict.items():
        event_dict[key] = "***" if key.lower() in SECRET_KEYS else _scrub(value)
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact_event,
    ]


def build_formatter(fmt: str = "json") -> logging.Formatter:
    """A stdlib formatter that renders any record (ours, gunicorn's, libraries') like structlog's lines."""
    renderer: Any = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route structlog and stdlib logging to stdout as JSON (or console text)."""
    structlog.configure(
        # filter_by_level first: a debug line on a hot path costs one level check unless asked for
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(build_formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # urllib3 logs full request URLs at DEBUG, and those hold the webhook code: keep it quiet.
    logging.getLogger("urllib3").setLevel("WARNING")
    logging.getLogger("alembic.runtime.plugins").setLevel("WARNING")

"""gunicorn.conf.py's worker hooks (the logging ones are in test_logging.py)."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
from flask import Flask

from tests.test_logging import load_gunicorn_config


def test_a_web_worker_freezes_the_loaded_app_out_of_the_collectors_sight(app: Flask) -> None:
    config = load_gunicorn_config()
    assert any(candidate is app for candidate in gc.get_objects())
    try:
        config.post_worker_init(None)  # what gunicorn calls once the worker has loaded the app
        assert gc.get_freeze_count() > 10_000
        assert not any(candidate is app for candidate in gc.get_objects())  # full collections skip it
    finally:
        gc.unfreeze()
    assert any(candidate is app for candidate in gc.get_objects())


def test_the_access_log_is_on_by_default_and_0_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("B24SCRIBE_ACCESS_LOG", raising=False)
    assert load_gunicorn_config().accesslog == "-"  # one line per request on stdout
    monkeypatch.setenv("B24SCRIBE_ACCESS_LOG", "0")
    assert load_gunicorn_config().accesslog is None


def test_what_gunicorn_reads_before_the_app_is_bounded() -> None:
    config = load_gunicorn_config()
    assert config.limit_request_line == 4094  # the query is in it: 200 short fields fit, millions do not
    assert len("/hooks/stt/generic?" + "&".join(f"f{n}=1" for n in range(200))) < config.limit_request_line
    assert (config.limit_request_fields, config.limit_request_field_size) == (100, 8190)
    assert config.keepalive <= 5  # the gevent worker also reads a request's headers within it


def test_the_web_says_where_it_listens_when_ready() -> None:
    """gunicorn's "Listening at:" names no address when each process binds its own (reuse_port)."""
    config = load_gunicorn_config()
    said: list[str] = []
    server = SimpleNamespace(
        cfg=SimpleNamespace(bind=["0.0.0.0:8000"], workers=2), log=SimpleNamespace(info=said.append)
    )
    config.when_ready(server)
    assert said == ["b24scribe web listening on 0.0.0.0:8000 (2 processes)"]
    assert config.reuse_port is True

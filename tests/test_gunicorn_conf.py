"""gunicorn.conf.py's worker hooks (the logging ones are in test_logging.py)."""

from __future__ import annotations

import gc

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

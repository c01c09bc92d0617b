"""gunicorn.conf.py's worker hooks (the logging ones are in test_logging.py)."""

from __future__ import annotations

import gc

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

"""The ``fake_bitrix24`` pytest fixture.

The fake Bitrix24 itself is the ``fake_bitrix24`` package at the repository root (no pytest in it,
so benchmarks and ``python -m fake_bitrix24`` use it too); this plugin only adds the fixture, and
re-exports ``FakeBitrix24`` for the tests that type their fixture argument with it. Load it with
``pytest_plugins = ["tests.fake_bitrix24"]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fake_bitrix24 import FakeBitrix24

__all__ = ["FakeBitrix24", "fake_bitrix24"]


@pytest.fixture
def fake_bitrix24() -> Iterator[FakeBitrix24]:
    """A running fake Bitrix24 on 127.0.0.1; ``fake_bitrix24.webhook_url`` is its webhook."""
    with FakeBitrix24() as fake:
        yield fake

"""The ``fake_bitrix24`` pytest fixture, and the fake's names for the tests that import them here.

The fake Bitrix24 itself is the ``fake_bitrix24`` package at the repository root (no pytest in it,
so benchmarks and ``python -m fake_bitrix24`` use it too); this plugin only adds the fixture.
Load it with ``pytest_plugins = ["tests.fake_bitrix24"]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fake_bitrix24 import (
    APP_ONLY_METHODS,
    CALL_NOT_REGISTERED,
    DEDUP_WINDOW_SECONDS,
    DEFAULT_PORTAL,
    DEFAULT_SCOPES,
    FAKE_BUGS,
    FINISH_RESULT_KEYS,
    JSON_CONTENT_TYPE,
    OPERATING_WINDOW_MINUTES,
    STATISTIC_PAGE_SIZE,
    TRANSCRIPT_MESSAGE_KEYS,
    TRANSCRIPT_SIDES,
    USER_INACTIVE,
    USER_NOT_SET,
    ActiveCall,
    ApiError,
    Exchange,
    FakeBitrix24,
    FakeBitrix24Handler,
    FakeBitrix24Server,
    FakeConfig,
    FaultDice,
    IncomingRequest,
    Injection,
    LeakyBucket,
    MethodCall,
    MethodHandler,
    Page,
    PortalState,
    RecordedRequest,
    Reply,
    User,
    Webhook,
    build_parser,
    config_from_args,
    main,
    parse_params,
    parse_php_form,
    php_float,
    php_int,
    php_loosely_equals_int,
    php_str,
    php_truthy,
    strip_phone,
)

__all__ = [
    "APP_ONLY_METHODS",
    "CALL_NOT_REGISTERED",
    "DEDUP_WINDOW_SECONDS",
    "DEFAULT_PORTAL",
    "DEFAULT_SCOPES",
    "FAKE_BUGS",
    "FINISH_RESULT_KEYS",
    "JSON_CONTENT_TYPE",
    "OPERATING_WINDOW_MINUTES",
    "STATISTIC_PAGE_SIZE",
    "TRANSCRIPT_MESSAGE_KEYS",
    "TRANSCRIPT_SIDES",
    "USER_INACTIVE",
    "USER_NOT_SET",
    "ActiveCall",
    "ApiError",
    "Exchange",
    "FakeBitrix24",
    "FakeBitrix24Handler",
    "FakeBitrix24Server",
    "FakeConfig",
    "FaultDice",
    "IncomingRequest",
    "Injection",
    "LeakyBucket",
    "MethodCall",
    "MethodHandler",
    "Page",
    "PortalState",
    "RecordedRequest",
    "Reply",
    "User",
    "Webhook",
    "build_parser",
    "config_from_args",
    "fake_bitrix24",
    "main",
    "parse_params",
    "parse_php_form",
    "php_float",
    "php_int",
    "php_loosely_equals_int",
    "php_str",
    "php_truthy",
    "strip_phone",
]


@pytest.fixture
def fake_bitrix24() -> Iterator[FakeBitrix24]:
    """A running fake Bitrix24 on 127.0.0.1; ``fake_bitrix24.webhook_url`` is its webhook."""
    with FakeBitrix24() as fake:
        yield fake

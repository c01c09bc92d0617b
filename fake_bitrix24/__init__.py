"""A fake Bitrix24 REST server for the test suite and benchmarks.

It follows how Bitrix24 behaves towards incoming webhooks, as documented and observed: the
transport, the telephony methods with Bitrix24's own validation order and error strings, the
per-portal leaky bucket, and fault injection. Use the ``fake_bitrix24`` pytest fixture
(tests/fake_bitrix24.py), ``with FakeBitrix24() as fake:``, or run it out of process::

    python -m fake_bitrix24 --port 0 --burst 50 --rate 2

which prints one JSON line (webhook URLs, control URL) and serves until SIGTERM.

Modules: ``server`` (FakeBitrix24, its control API, the HTTP server), ``limits`` (leaky bucket,
operating time), ``faults`` (injections, random faults), ``telephony`` (the REST methods),
``state`` (portals, records, FakeConfig), ``protocol`` (requests, replies, errors), ``php`` (PHP
semantics) and ``cli``. None of them imports pytest, so benchmarks and scripts can use the fake.
"""

from __future__ import annotations

from fake_bitrix24.cli import build_parser, config_from_args, main
from fake_bitrix24.faults import FaultDice, Injection
from fake_bitrix24.limits import OPERATING_WINDOW_MINUTES, LeakyBucket
from fake_bitrix24.php import (
    parse_php_form,
    php_float,
    php_int,
    php_loosely_equals_int,
    php_str,
    php_truthy,
    strip_phone,
)
from fake_bitrix24.protocol import (
    JSON_CONTENT_TYPE,
    ApiError,
    IncomingRequest,
    Page,
    RecordedRequest,
    Reply,
    parse_params,
)
from fake_bitrix24.server import FAKE_BUGS, Exchange, FakeBitrix24, FakeBitrix24Handler, FakeBitrix24Server
from fake_bitrix24.state import (
    DEFAULT_PORTAL,
    DEFAULT_SCOPES,
    ActiveCall,
    FakeConfig,
    MethodCall,
    MethodHandler,
    PortalState,
    User,
    Webhook,
)
from fake_bitrix24.telephony import (
    APP_ONLY_METHODS,
    CALL_NOT_REGISTERED,
    DEDUP_WINDOW_SECONDS,
    FINISH_RESULT_KEYS,
    STATISTIC_PAGE_SIZE,
    TRANSCRIPT_MESSAGE_KEYS,
    TRANSCRIPT_SIDES,
    USER_INACTIVE,
    USER_NOT_SET,
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

"""A fake Bitrix24 REST server for the test suite and benchmarks.

It follows how Bitrix24 behaves towards incoming webhooks and installed applications, as
documented and observed: the transport, the telephony methods with Bitrix24's own validation
order and error strings, the per-portal leaky bucket, OAuth 2.0 tokens, and fault injection. Use
the ``fake_bitrix24`` pytest fixture (tests/fake_bitrix24.py), ``with FakeBitrix24() as fake:``,
or run it out of process::

    python -m fake_bitrix24 --port 0 --burst 50 --rate 2

which prints one JSON line (webhook URLs, control URL) and serves until SIGTERM.

Application mode (OAuth 2.0, a local application)::

    app = fake.create_app(client_id="local.abc.123", client_secret="secret")
    installation = fake.install("portal-a.bitrix24.test", app)
    fake.install_payload(installation)  # the ONAPPINSTALL form to post to the service

Each installed portal has its own REST endpoint ``installation.client_endpoint``
(``http://127.0.0.1:<port>/p/<member_id>/rest/``); calls there carry the access token as ``auth``
(JSON or form body, or query), ``access_token``, or ``Authorization: Bearer``, and go through the
same pipeline and methods as webhook calls, plus ``app.info``. Token errors are Bitrix24's, all
HTTP 401: none → ``NO_AUTH_FOUND``, unknown or another portal's → ``invalid_token``, expired →
``expired_token``, replaced by a refresh → ``expired_token`` (cfg ``superseded_access_error``),
application uninstalled → ``NOT_INSTALLED``. The OAuth server is ``<fake.oauth_url>/oauth/token/``
(GET or POST; ``grant_type=refresh_token`` or ``authorization_code``): it rotates both tokens
(cfg ``rotate_refresh_tokens``) and answers wrong client_id with 200 ``wrong_client``, wrong
secret with 400 ``invalid_client``, a bad, used, revoked or expired refresh token with 400
``invalid_grant``. Tests steer it with ``expire_access_token``, ``revoke_refresh_token``,
``uninstall``, ``advance_clock`` (tokens expire after ``expires_in``), ``inject("oauth.token", ...)``,
and read ``refreshes(member_id)``, ``token_requests`` and the ``member_id``/``access_token``
fields of recorded REST requests. Out of process, ``/_fake/apps``, ``/_fake/install`` and
friends do the same over HTTP.

Call recordings: ``telephony.externalCall.attachRecord`` takes a finished call's ``RECORD_URL``
(stored, never downloaded), ``FILENAME`` + ``FILE_CONTENT`` (base64), or ``FILENAME`` alone, which
answers ``{"uploadUrl": "<base_url>/upload/<token>/", "fieldName": "file"}``: a multipart POST
there is streamed (hundreds of MB in bounded memory) and answers ``{"result": {"FILE_ID": n}}``.
The fake keeps each file's name, size and SHA-256, not its bytes: ``records_by_call()`` gives
every call's history of ``RecordAttachment``, ``GET /_fake/records`` the same over HTTP. Uploads
appear in the request log as method ``upload`` and can be targeted by ``inject("upload", ...)``.

Modules: ``server`` (FakeBitrix24, its control API, the HTTP server), ``limits`` (leaky bucket,
operating time), ``faults`` (injections, random faults), ``telephony`` (the REST methods),
``records`` (attachRecord, the upload route), ``multipart`` (streamed request bodies),
``oauth`` (application mode, the OAuth server), ``apps`` (applications, installations, tokens,
event payloads), ``state`` (portals, records, FakeConfig), ``protocol`` (requests, replies,
errors), ``php`` (PHP semantics) and ``cli``. None of them imports pytest, so benchmarks and
scripts can use the fake.
"""

from __future__ import annotations

from fake_bitrix24.apps import (
    ACCESS_TOKEN_TTL,
    OAUTH_DOMAIN,
    REFRESH_TOKEN_TTL,
    App,
    Installation,
    TokenRequest,
    member_id_for,
)
from fake_bitrix24.cli import build_parser, config_from_args, main
from fake_bitrix24.faults import FaultDice, Injection
from fake_bitrix24.limits import OPERATING_WINDOW_MINUTES, LeakyBucket
from fake_bitrix24.oauth import OAUTH_SERVER_METHOD, OAuthMixin
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
from fake_bitrix24.records import (
    CALL_NOT_IN_STATISTICS,
    FILE_CONTENT_EMPTY,
    FILE_CONTENT_NOT_BASE64,
    FILE_NAME_EMPTY,
    RECORD_EXTENSIONS,
    RECORD_PARAMETERS_MISSING,
    UPLOAD_FIELD,
    UPLOAD_FILE_MISSING,
    UPLOAD_METHOD,
    WRONG_FILE_EXTENSION,
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
    RecordAttachment,
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
    "ACCESS_TOKEN_TTL",
    "APP_ONLY_METHODS",
    "CALL_NOT_IN_STATISTICS",
    "CALL_NOT_REGISTERED",
    "DEDUP_WINDOW_SECONDS",
    "DEFAULT_PORTAL",
    "DEFAULT_SCOPES",
    "FAKE_BUGS",
    "FILE_CONTENT_EMPTY",
    "FILE_CONTENT_NOT_BASE64",
    "FILE_NAME_EMPTY",
    "FINISH_RESULT_KEYS",
    "JSON_CONTENT_TYPE",
    "OAUTH_DOMAIN",
    "OAUTH_SERVER_METHOD",
    "OPERATING_WINDOW_MINUTES",
    "RECORD_EXTENSIONS",
    "RECORD_PARAMETERS_MISSING",
    "REFRESH_TOKEN_TTL",
    "STATISTIC_PAGE_SIZE",
    "TRANSCRIPT_MESSAGE_KEYS",
    "TRANSCRIPT_SIDES",
    "UPLOAD_FIELD",
    "UPLOAD_FILE_MISSING",
    "UPLOAD_METHOD",
    "USER_INACTIVE",
    "USER_NOT_SET",
    "WRONG_FILE_EXTENSION",
    "ActiveCall",
    "ApiError",
    "App",
    "Exchange",
    "FakeBitrix24",
    "FakeBitrix24Handler",
    "FakeBitrix24Server",
    "FakeConfig",
    "FaultDice",
    "IncomingRequest",
    "Injection",
    "Installation",
    "LeakyBucket",
    "MethodCall",
    "MethodHandler",
    "OAuthMixin",
    "Page",
    "PortalState",
    "RecordAttachment",
    "RecordedRequest",
    "Reply",
    "TokenRequest",
    "User",
    "Webhook",
    "build_parser",
    "config_from_args",
    "main",
    "member_id_for",
    "parse_params",
    "parse_php_form",
    "php_float",
    "php_int",
    "php_loosely_equals_int",
    "php_str",
    "php_truthy",
    "strip_phone",
]

"""A thin Bitrix24 REST client of our own over `requests` (and urllib3 pools for the worker).

It sends one request and classifies the answer; retry policy belongs to the outbox.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi
import requests
import urllib3
from requests_toolbelt import MultipartEncoder

# Bitrix24 reports its own validation failures with error "" in real traffic and ERROR_CORE in
# its docs: both mean "the portal looked at the request and said no".
CORE_ERRORS = {"", "ERROR_CORE"}
NOT_FINISHED_SUFFIX = "is not found. Is it finished?"
FINISH_CALL_NOT_FOUND = "Call is not found (call should be registered prior to finishing"
NO_USER = "USER_ID or USER_PHONE_INNER should be set"
JSON_HEADERS = {"Content-Type": "application/json"}
PERMANENT_AUTH_ERRORS = {
    "INVALID_CREDENTIALS",
    "insufficient_scope",
    "WRONG_AUTH_TYPE",
    "NO_AUTH_FOUND",
    "invalid_token",
    "ACCESS_DENIED",
    "ERROR_METHOD_NOT_FOUND",
    "APPLICATION_NOT_FOUND",
    "user_access_error",
}


class Bitrix24Error(Exception):
    """A request to Bitrix24 did not succeed. `retryable` says whether trying later can help."""

    retryable = True

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.description = message


class TransientError(Bitrix24Error):
    """5xx, a connection refused, a non-JSON answer: retry with back-off."""


class AmbiguousError(TransientError):
    """The request went out and no answer came back: it may or may not have been applied."""


class ThrottledError(Bitrix24Error):
    """503 QUERY_LIMIT_EXCEEDED: the portal's leaky bucket is full. Pause, don't spend an attempt."""


class OperationLimitError(Bitrix24Error):
    """429 OPERATION_TIME_LIMIT: this method is blocked until `reset_at` (unix seconds)."""

    def __init__(self, message: str, status: int | None, code: str | None, reset_at: float) -> None:
        super().__init__(message, status, code)
        self.reset_at = reset_at


class PermanentError(Bitrix24Error):
    """Bitrix24 will never accept this request as it is (validation, credentials, scope)."""

    retryable = False


@dataclass(frozen=True, slots=True)
class Response:
    """A successful answer: `result` and the `time` block (may lack operating fields)."""

    result: Any
    time: dict[str, Any]


class Bitrix24Client:
    """Calls methods on one portal through its incoming-webhook base URL.

    Without a `session` of the caller's, the client keeps its own connection pool: `pool_size`
    keep-alive connections to the portal through urllib3 directly (a request costs about half the
    CPU it costs through `requests`, which matters at hundreds of requests a second). What the
    environment says about proxies (HTTPS_PROXY, NO_PROXY) and CA bundles (REQUESTS_CA_BUNDLE,
    CURL_CA_BUNDLE) is read once, here, as `requests` would read it; the bytes on the wire are
    the same JSON body `requests` sends. With a `session` (the start-up check) it goes through it.
    """

    def __init__(
        self, base_url: str, timeout: float, session: requests.Session | None = None, pool_size: int = 4
    ) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout = timeout
        self.operating_reset_at: float | None = None
        self.session = session
        self._timeout = urllib3.Timeout(connect=min(timeout, 10.0), read=timeout)
        self._pool: urllib3.PoolManager | None = None
        self._direct: urllib3.connectionpool.HTTPConnectionPool | None = None  # no proxy: the portal's own pool
        self._base_path = urlsplit(self.base_url).path
        if session is None:
            environment = requests.Session().merge_environment_settings(self.base_url, {}, None, None, None)
            verify = environment.get("verify")
            ca_certs = verify if isinstance(verify, str) else certifi.where()  # what requests trusts
            proxy = (environment.get("proxies") or {}).get(urlsplit(self.base_url).scheme)
            options: dict[str, Any] = {"maxsize": max(1, pool_size), "ca_certs": ca_certs, "retries": False}
            self._pool = urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
            if not proxy:
                # Every method goes to the same host: take its pool once, rather than have the
                # PoolManager parse the URL and look the pool up on each request (~0.1 ms of CPU a
                # request, measured against the fake Bitrix24 on loopback).
                self._direct = self._pool.connection_from_url(self.base_url)

    def call(self, method: str, params: dict[str, Any]) -> Response:
        """POST one method with a JSON body and return its result, or raise a Bitrix24Error."""
        url = f"{self.base_url}{method}.json"
        if self._pool is None:
            return self._call_through_session(url, params)
        body = json.dumps(params, allow_nan=False).encode()
        try:
            if self._direct is not None:
                # a REST method answers itself; a redirect is not followed (its 3xx is not JSON: retried)
                answer = self._direct.urlopen(
                    "POST",
                    f"{self._base_path}{method}.json",
                    body=body,
                    headers=JSON_HEADERS,
                    timeout=self._timeout,
                    redirect=False,
                )
            else:
                answer = self._pool.request("POST", url, body=body, headers=JSON_HEADERS, timeout=self._timeout)
        except (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.LocationValueError) as exc:
            # NewConnectionError (refused, no such host) is a ConnectTimeoutError too: nothing was sent
            refused = isinstance(exc, urllib3.exceptions.NewConnectionError) and "refused" in str(exc).lower()
            reason = "connection refused" if refused else type(exc).__name__
            raise TransientError(f"could not connect to Bitrix24: {reason}") from None
        except (urllib3.exceptions.SSLError, urllib3.exceptions.ProxyError) as exc:
            raise TransientError(f"could not connect to Bitrix24: {type(exc).__name__}") from None
        except urllib3.exceptions.ReadTimeoutError:
            raise AmbiguousError(f"no answer from Bitrix24 within {self.timeout:g} s") from None
        except urllib3.exceptions.HTTPError as exc:  # ProtocolError: the connection went mid-request
            raise AmbiguousError(f"connection to Bitrix24 lost: {type(exc).__name__}") from None
        return self._read(answer.status, answer.data)

    def upload(self, url: str, field: str, path: Path, filename: str, content_type: str) -> Response:
        """POST a file as multipart/form-data to an upload URL the portal gave (attachRecord's
        `uploadUrl`), streamed from disk: a recording of hundreds of MB is never held in memory.

        Only to the portal's own host: the file goes nowhere an answer could point it."""
        if urlsplit(url).netloc.lower() != urlsplit(self.base_url).netloc.lower():
            raise PermanentError("Bitrix24 gave an upload URL on another host than the portal's; not uploading")
        with path.open("rb") as file:
            encoder = MultipartEncoder(fields={field: (filename, file, content_type)})
            headers = {"Content-Type": encoder.content_type, "Content-Length": str(encoder.len)}
            if self._pool is None:
                assert self.session is not None
                try:
                    answer = self.session.post(url, data=encoder, headers=headers, timeout=self._timeout_pair)
                except requests.Timeout:
                    raise AmbiguousError(f"no answer from Bitrix24 within {self.timeout:g} s") from None
                except requests.RequestException as exc:
                    raise AmbiguousError(f"upload to Bitrix24 failed: {type(exc).__name__}") from None
                return self._read(answer.status_code, answer.content)
            try:
                reply = self._pool.request("POST", url, body=encoder, headers=headers, timeout=self._timeout)
            except (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.SSLError) as exc:
                raise TransientError(f"could not connect to Bitrix24: {type(exc).__name__}") from None
            except urllib3.exceptions.ReadTimeoutError:
                raise AmbiguousError(f"no answer from Bitrix24 within {self.timeout:g} s") from None
            except urllib3.exceptions.HTTPError as exc:
                raise AmbiguousError(f"upload to Bitrix24 failed: {type(exc).__name__}") from None
        return self._read(reply.status, reply.data)

    @property
    def _timeout_pair(self) -> tuple[float, float]:
        return (min(self.timeout, 10.0), self.timeout)

    def _call_through_session(self, url: str, params: dict[str, Any]) -> Response:
        assert self.session is not None
        try:
            answer = self.session.post(url, json=params, timeout=(min(self.timeout, 10.0), self.timeout))
        except (requests.ConnectTimeout, requests.exceptions.InvalidURL) as exc:
            raise TransientError(f"could not connect to Bitrix24: {type(exc).__name__}") from None
        except requests.ConnectionError as exc:
            if _refused_before_sending(exc):
                raise TransientError("could not connect to Bitrix24: connection refused") from None
            raise AmbiguousError(f"connection to Bitrix24 lost: {type(exc).__name__}") from None
        except requests.Timeout:
            raise AmbiguousError(f"no answer from Bitrix24 within {self.timeout:g} s") from None
        return self._read(answer.status_code, answer.content)

    def _read(self, status: int, content: bytes) -> Response:
        try:
            body = json.loads(content)
        except ValueError:
            raise TransientError(f"Bitrix24 answered HTTP {status} without JSON", status) from None
        if not isinstance(body, dict):
            raise TransientError(f"Bitrix24 answered HTTP {status} with unexpected JSON", status)
        timing: dict[str, Any] = body["time"] if isinstance(body.get("time"), dict) else {}
        if isinstance(timing.get("operating_reset_at"), int | float):
            self.operating_reset_at = float(timing["operating_reset_at"])
        if status == 200 and "result" in body and "error" not in body:
            return Response(result=body["result"], time=timing)
        code = body.get("error")
        code = code if isinstance(code, str) else ""
        description = body.get("error_description")
        description = description if isinstance(description, str) else code or f"HTTP {status}"
        raise classify_error(status, code, description, self.operating_reset_at)


def classify_error(status: int, code: str, description: str, operating_reset_at: float | None = None) -> Bitrix24Error:
    """Map an error answer to the exception that says what to do about it."""
    if code == "QUERY_LIMIT_EXCEEDED" or (status == 503 and code == "OVERLOAD_LIMIT"):
        return ThrottledError(description, status, code)
    if code == "OPERATION_TIME_LIMIT" or status == 429:
        reset_at = operating_reset_at if operating_reset_at and operating_reset_at > time.time() else time.time() + 60
        return OperationLimitError(description, status, code, reset_at)
    if status >= 500:
        return TransientError(description, status, code)
    if code in PERMANENT_AUTH_ERRORS or status in (401, 403):
        return PermanentError(description, status, code)
    if code in CORE_ERRORS and description.endswith(NOT_FINISHED_SUFFIX):
        return TransientError(description, status, code)
    if code in CORE_ERRORS and description.startswith("Unexpected database error"):
        return TransientError(description, status, code)
    return PermanentError(description, status, code)


def is_not_finished(error: Bitrix24Error) -> bool:
    """attachTranscription's `Call … is not found. Is it finished?`."""
    return error.code in CORE_ERRORS and error.description.endswith(NOT_FINISHED_SUFFIX)


def is_finish_call_not_found(error: Bitrix24Error) -> bool:
    """finish's `Call is not found (call should be registered prior to finishing` (either spelling)."""
    return error.code in CORE_ERRORS and error.description.startswith(FINISH_CALL_NOT_FOUND)


def is_unknown_user(error: Bitrix24Error) -> bool:
    """register/finish could not resolve the user from USER_ID or USER_PHONE_INNER."""
    return error.code in CORE_ERRORS and error.description.rstrip(".") == NO_USER


def _refused_before_sending(exc: requests.ConnectionError) -> bool:
    text = repr(exc)
    return "NewConnectionError" in text or "Connection refused" in text or "NameResolutionError" in text

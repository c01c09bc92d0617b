"""A thin Bitrix24 REST client of our own over `requests` (research/bitrix24.md section 8).

It sends one request and classifies the answer; retry policy belongs to the outbox.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import requests

# Bitrix24 reports its own validation failures with error "" in real traffic and ERROR_CORE in
# its docs: both mean "the portal looked at the request and said no".
CORE_ERRORS = {"", "ERROR_CORE"}
NOT_FINISHED_SUFFIX = "is not found. Is it finished?"
FINISH_CALL_NOT_FOUND = "Call is not found (call should be registered prior to finishing"
NO_USER = "USER_ID or USER_PHONE_INNER should be set"
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
    """Calls methods on one portal through its incoming-webhook base URL."""

    def __init__(self, base_url: str, timeout: float, session: requests.Session | None = None) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout = timeout
        self.session = session or requests.Session()
        self.operating_reset_at: float | None = None

    def call(self, method: str, params: dict[str, Any]) -> Response:
        """POST one method with a JSON body and return its result, or raise a Bitrix24Error."""
        url = f"{self.base_url}{method}.json"
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
        return self._read(answer)

    def _read(self, answer: requests.Response) -> Response:
        try:
            body = answer.json()
        except ValueError:
            raise TransientError(
                f"Bitrix24 answered HTTP {answer.status_code} without JSON", answer.status_code
            ) from None
        if not isinstance(body, dict):
            raise TransientError(
                f"Bitrix24 answered HTTP {answer.status_code} with unexpected JSON", answer.status_code
            )
        timing: dict[str, Any] = body["time"] if isinstance(body.get("time"), dict) else {}
        if isinstance(timing.get("operating_reset_at"), int | float):
            self.operating_reset_at = float(timing["operating_reset_at"])
        if answer.status_code == 200 and "result" in body and "error" not in body:
            return Response(result=body["result"], time=timing)
        code = body.get("error")
        code = code if isinstance(code, str) else ""
        description = body.get("error_description")
        description = description if isinstance(description, str) else code or f"HTTP {answer.status_code}"
        raise classify_error(answer.status_code, code, description, self.operating_reset_at)


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

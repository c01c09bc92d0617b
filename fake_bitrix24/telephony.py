"""The REST methods the fake implements, with Bitrix24's validation order and error strings.

telephony.externalCall.register/finish/show/hide, telephony.call.attachTranscription,
voximplant.statistic.get, user.current/profile and scope: what they accept, store and answer.
telephony.externalCall.attachRecord, with its upload route, lives in records.py.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from fake_bitrix24.php import php_float, php_int, php_loosely_equals_int, php_str, php_truthy, strip_phone
from fake_bitrix24.protocol import ApiError, Page, _local_iso
from fake_bitrix24.state import ActiveCall, FakeConfig, MethodCall, PortalState

DEDUP_WINDOW_SECONDS = 30 * 60
STATISTIC_PAGE_SIZE = 50
TRANSCRIPT_MESSAGE_KEYS = frozenset({"SIDE", "START_TIME", "STOP_TIME", "MESSAGE"})
TRANSCRIPT_SIDES = ("User", "Client")
# The docs call these application-only: a webhook may get 403 WRONG_AUTH_TYPE (cfg).
APP_ONLY_METHODS = frozenset({"telephony.externalcall.register", "telephony.externalcall.finish"})

USER_NOT_SET = "USER_ID or USER_PHONE_INNER should be set"
USER_INACTIVE = "User is not found or is not active"
# The real string has no closing parenthesis (as Bitrix24 sends it).
CALL_NOT_REGISTERED = "Call is not found (call should be registered prior to finishing"

FINISH_RESULT_KEYS = (
    "ID",
    "CALL_ID",
    "EXTERNAL_CALL_ID",
    "PORTAL_USER_ID",
    "PHONE_NUMBER",
    "PORTAL_NUMBER",
    "CALL_DURATION",
    "CALL_START_DATE",
    "CALL_VOTE",
    "COST",
    "COST_CURRENCY",
    "CALL_FAILED_CODE",
    "CALL_FAILED_REASON",
    "REST_APP_ID",
    "CRM_ACTIVITY_ID",
    "COMMENT",
    "CRM_ENTITY_TYPE",
    "CRM_ENTITY_ID",
)
_ISO_8601 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})")
_FILTER_KEY = re.compile(r"(=|!=|!)?([A-Z_]+)")


class TelephonyMethods:
    """FakeBitrix24's method implementations (called with its lock held)."""

    config: FakeConfig

    # Methods --------------------------------------------------------------------------------

    def _core_error(self, description: str) -> ApiError:
        """A telephony validation error: HTTP 400, ``error`` "" (or ERROR_CORE, cfg)."""
        return ApiError(400, self.config.error_code, description)

    def _check_auth_type(self, method: str) -> None:
        if method in APP_ONLY_METHODS and self.config.deny_webhook_app_methods:
            raise ApiError(403, "WRONG_AUTH_TYPE", "Current authorization type is denied for this method")

    def _resolve_user(self, portal: PortalState, params: Mapping[str, Any]) -> int:
        """USER_ID if > 0, else the active real user whose inner phone is USER_PHONE_INNER."""
        user_id = php_int(params.get("USER_ID"))
        if user_id > 0:
            return user_id
        inner = php_str(params.get("USER_PHONE_INNER"))
        if inner:
            for user in portal.users.values():
                if user.active and user.real and user.inner_phone == inner:
                    return user.id
        raise self._core_error(USER_NOT_SET)

    def _require_active_user(self, portal: PortalState, user_id: int) -> None:
        user = portal.users.get(user_id)
        if user is None or not user.active or not user.real:
            raise self._core_error(USER_INACTIVE)

    def _parse_call_type(self, value: object) -> int:
        if not any(php_loosely_equals_int(value, number) for number in range(1, 6)):
            raise self._core_error("Unknown TYPE")
        return php_int(value)

    def _parse_start_date(self, value: object, now: float) -> str:
        if not php_truthy(value):
            return _local_iso(now)
        if not isinstance(value, str) or _ISO_8601.fullmatch(value) is None:
            raise self._core_error("CALL_START_DATE should be in the ISO-8601 format")
        try:
            return datetime.fromisoformat(value).isoformat(timespec="seconds")
        except ValueError:
            raise self._core_error("CALL_START_DATE should be in the ISO-8601 format") from None

    def _register(self, call: MethodCall) -> dict[str, Any]:
        params = call.params
        user_id = self._resolve_user(call.portal, params)
        call_type = self._parse_call_type(params.get("TYPE"))
        start_date = self._parse_start_date(params.get("CALL_START_DATE"), call.now)
        phone = strip_phone(params.get("PHONE_NUMBER"))
        if not phone:
            raise self._core_error("Unsupported phone number format")
        self._require_active_user(call.portal, user_id)
        with_crm = php_truthy(params.get("CRM_ENTITY_TYPE")) and php_truthy(params.get("CRM_ENTITY_ID"))
        candidate = ActiveCall(
            call_id=f"externalCall.{secrets.token_hex(16)}.{int(call.now)}",
            user_id=user_id,
            phone=phone,
            call_type=call_type,
            line=php_str(params.get("LINE_NUMBER"))[:50],
            external_call_id=php_str(params.get("EXTERNAL_CALL_ID")),
            created_at=call.now,
            start_date=start_date,
            crm_entity_type=php_str(params.get("CRM_ENTITY_TYPE")) if with_crm else "",
            crm_entity_id=php_int(params.get("CRM_ENTITY_ID")) if with_crm else None,
        )
        registered = self._find_duplicate(call.portal, candidate, call.now)
        if registered is None:
            registered = candidate
            call.portal.add_active_call(candidate)
        return {
            "CALL_ID": registered.call_id,
            "CRM_CREATED_LEAD": None,
            "CRM_CREATED_ENTITIES": [],
            "CRM_ENTITY_TYPE": registered.crm_entity_type,
            "CRM_ENTITY_ID": registered.crm_entity_id,
        }

    def _find_duplicate(self, portal: PortalState, candidate: ActiveCall, now: float) -> ActiveCall | None:
        """An active call < 30 min old with the same user, phone, type (+ line, external id)."""
        for existing in portal.dedup_candidates(candidate):
            if now - existing.created_at >= DEDUP_WINDOW_SECONDS:
                continue
            if candidate.line and existing.line != candidate.line:
                continue
            return existing
        return None

    def _finish(self, call: MethodCall) -> dict[str, Any]:
        params = call.params
        user_id = self._resolve_user(call.portal, params)
        call_id = params.get("CALL_ID")
        if not isinstance(call_id, str):
            raise ApiError(400, "INVALID_ARGUMENT", "CALL_ID must be a string")
        if call_id not in call.portal.active_calls:
            raise self._core_error(CALL_NOT_REGISTERED)
        self._require_active_user(call.portal, user_id)
        active = call.portal.pop_active_call(call_id)
        row = self._statistics_row(call.portal, active, user_id, params)
        call.portal.add_statistics_row(row)
        return self._finish_result(row, active)

    def _statistics_row(
        self, portal: PortalState, active: ActiveCall, user_id: int, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        duration = max(0, php_int(params.get("DURATION")))
        vote = php_int(params.get("VOTE"))
        row = {
            "ID": portal.next_statistic_id,
            "PORTAL_USER_ID": user_id,
            "PORTAL_NUMBER": active.line,
            "PHONE_NUMBER": active.phone,
            "CALL_ID": active.call_id,
            "EXTERNAL_CALL_ID": active.external_call_id or None,
            "CALL_CATEGORY": "external",
            "CALL_LOG": None,
            "CALL_DURATION": duration,
            "CALL_START_DATE": active.start_date,
            "CALL_RECORD_URL": php_str(params.get("RECORD_URL")) or None,
            "CALL_VOTE": vote if 1 <= vote <= 5 else None,
            "COST": php_float(params.get("COST")),
            "COST_CURRENCY": php_str(params.get("COST_CURRENCY")),
            "CALL_FAILED_CODE": php_str(params.get("STATUS_CODE")) or ("200" if duration else "304"),
            "CALL_FAILED_REASON": php_str(params.get("FAILED_REASON")),
            "CRM_ENTITY_TYPE": active.crm_entity_type,
            "CRM_ENTITY_ID": active.crm_entity_id,
            "CRM_ACTIVITY_ID": None,
            "REST_APP_ID": None,
            "REST_APP_NAME": None,
            "TRANSCRIPT_ID": None,
            "TRANSCRIPT_PENDING": "N",
            "SESSION_ID": None,
            "REDIAL_ATTEMPT": None,
            "COMMENT": None,
            "RECORD_DURATION": None,
            "RECORD_FILE_ID": None,
            "CALL_TYPE": active.call_type,
        }
        portal.next_statistic_id += 1
        return row

    def _finish_result(self, row: Mapping[str, Any], active: ActiveCall) -> dict[str, Any]:
        result = {key: row[key] for key in FINISH_RESULT_KEYS}
        result["INCOMING"] = str(active.call_type)
        result["CALL_STATUS"] = 1 if row["CALL_DURATION"] > 0 else 0
        result["REST_APP_NAME"] = False
        if self.config.finish_start_date_as_object:
            result["CALL_START_DATE"] = {}  # a PHP DateTime object serialises as {}
        return result

    def _attach_transcription(self, call: MethodCall) -> dict[str, Any]:
        params = call.params
        call_id = params.get("CALL_ID")
        if call_id is None:
            raise self._core_error("CALL_ID should be set")
        messages = params.get("MESSAGES")
        if not isinstance(messages, list | dict):
            raise self._core_error("MESSAGES should be an array")
        items = list(enumerate(messages)) if isinstance(messages, list) else list(messages.items())
        for key, message in items:
            self._validate_message(key, message)
        row = call.portal.statistics.get(php_str(call_id))
        if row is None:
            raise self._core_error(f"Call {php_str(call_id)} is not found. Is it finished?")
        if self.config.strict_messages:
            _reject_unknown_message_keys(message for _, message in items)
        return {"TRANSCRIPT_ID": self._store_transcript(call.portal, row, items, params)}

    def _validate_message(self, key: object, message: object) -> None:
        if not isinstance(message, dict):
            # PHP hits a TypeError on a non-array item; the REST server does not catch it.
            raise ApiError(500, "INTERNAL_SERVER_ERROR", f"MESSAGES[{key}] is not an array")
        if message.get("SIDE") not in TRANSCRIPT_SIDES:
            raise self._core_error(f"MESSAGES[{key}][SIDE] should be either Client or User")
        if php_int(message.get("START_TIME")) < 0:
            raise self._core_error(f"MESSAGES[{key}][START_TIME] should be greater or equal to zero")
        if php_int(message.get("STOP_TIME")) <= 0:
            raise self._core_error(f"MESSAGES[{key}][STOP_TIME] should be greater than zero")
        if message.get("MESSAGE") in (None, "", False):
            raise self._core_error(f"MESSAGES[{key}][MESSAGE] is empty")

    def _store_transcript(
        self,
        portal: PortalState,
        row: dict[str, Any],
        items: list[tuple[Any, Any]],
        params: Mapping[str, Any],
    ) -> int:
        transcript_id = portal.next_transcript_id
        portal.next_transcript_id += 1
        cost = params.get("COST")
        priced = php_truthy(cost)
        portal.transcripts[transcript_id] = {
            "call_id": row["CALL_ID"],
            "messages": [message for _, message in items],
            "cost": php_float(cost) if priced else None,
            "cost_currency": php_str(params.get("COST_CURRENCY")) if priced else None,
        }
        row["TRANSCRIPT_ID"] = transcript_id
        row["TRANSCRIPT_PENDING"] = "N"
        portal.attachments.setdefault(row["CALL_ID"], []).append(transcript_id)
        return transcript_id

    def _statistic_get(self, call: MethodCall) -> Page:
        if self.config.deny_statistics:
            raise ApiError(403, "ACCESS_DENIED", "Access denied!")
        filters = call.params.get("FILTER")
        conditions = _parse_filter(filters if isinstance(filters, dict) else {})
        rows = [
            row
            for row in _candidate_rows(call.portal, conditions)
            if all(_matches(row, condition) for condition in conditions)
        ]
        rows = _sorted_rows(rows, call.params.get("SORT"), call.params.get("ORDER"))
        start = max(0, php_int(call.params.get("start")))
        end = start + STATISTIC_PAGE_SIZE
        return Page(
            items=[_database_row(row) for row in rows[start:end]],
            total=len(rows),
            next=end if end < len(rows) else None,
        )

    def _show_or_hide(self, call: MethodCall) -> bool:
        call_id = call.params.get("CALL_ID")
        return isinstance(call_id, str) and call_id in call.portal.active_calls

    def _user_current(self, call: MethodCall) -> dict[str, Any]:
        user = call.portal.users.get(call.webhook.user_id)
        return {
            "ID": str(call.webhook.user_id),
            "ACTIVE": bool(user and user.active),
            "NAME": user.name if user else "",
            "LAST_NAME": "",
            "ADMIN": True,
            "UF_PHONE_INNER": user.inner_phone if user else "",
        }

    def _scope(self, call: MethodCall) -> list[str]:
        return list(call.webhook.scopes)


# --- Helpers used by the methods ------------------------------------------------------------


def _database_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A statistics row as ``voximplant.statistic.get`` prints it: numbers come as strings."""
    printed: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, float):
            printed[key] = f"{value:.4f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            printed[key] = str(value)
        else:
            printed[key] = value
    return printed


def _reject_unknown_message_keys(messages: Iterable[Mapping[str, Any]]) -> None:
    """Strict mode: the ORM refuses transcript-line fields it does not map."""
    for message in messages:
        unknown = sorted(set(message) - TRANSCRIPT_MESSAGE_KEYS)
        if unknown:
            raise ApiError(
                400,
                "ERROR_ARGUMENT",
                f"Bitrix\\Voximplant\\Model\\TranscriptLineTable Entity has no `{unknown[0]}` field.",
            )


def _parse_filter(filters: Mapping[str, Any]) -> list[tuple[bool, str, object]]:
    """(negated, field, value) per FILTER key; only =, ! and != are emulated."""
    conditions: list[tuple[bool, str, object]] = []
    for key, value in filters.items():
        match = _FILTER_KEY.fullmatch(str(key))
        if match is None:
            raise ApiError(400, "ERROR_ARGUMENT", f"Filter key {key!r} is not supported by the fake")
        operator, name = match.groups()
        conditions.append((operator in ("!", "!="), name, value))
    return conditions


def _candidate_rows(portal: PortalState, conditions: list[tuple[bool, str, object]]) -> list[dict[str, Any]]:
    """Use the CALL_ID / EXTERNAL_CALL_ID indexes when the filter pins one value."""
    for negated, name, value in conditions:
        if negated or isinstance(value, list | dict):
            continue
        if name == "CALL_ID":
            row = portal.statistics.get(php_str(value))
            return [row] if row else []
        if name == "EXTERNAL_CALL_ID":
            ids = portal.statistics_by_external_id.get(php_str(value), [])
            return [portal.statistics[call_id] for call_id in ids]
    return list(portal.statistics.values())


def _matches(row: Mapping[str, Any], condition: tuple[bool, str, object]) -> bool:
    negated, name, value = condition
    if name not in row:
        raise ApiError(400, "ERROR_ARGUMENT", f"Unknown filter field {name}")
    wanted = value if isinstance(value, list) else [value]
    found = php_str(row[name]) in {php_str(item) for item in wanted}
    return found != negated


def _sorted_rows(rows: list[dict[str, Any]], sort: object, order: object) -> list[dict[str, Any]]:
    if not isinstance(sort, str) or not sort:
        return rows
    descending = php_str(order).upper() == "DESC"
    return sorted(rows, key=lambda row: php_str(row.get(sort)), reverse=descending)

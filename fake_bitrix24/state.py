"""What the fake portals hold, and the switches that change how the fake behaves.

Users, webhooks, registered calls, statistics rows, transcripts and call records (recordings)
per portal, plus FakeConfig; the server, limits, faults and telephony methods all read or change
these records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fake_bitrix24.apps import Installation
from fake_bitrix24.limits import LeakyBucket

DEFAULT_PORTAL = "default"
DEFAULT_SCOPES = ("telephony", "user")


# --- Records -------------------------------------------------------------------------------


@dataclass
class User:
    """A portal employee; only active, real users can register or finish calls."""

    id: int
    inner_phone: str
    active: bool = True
    real: bool = True
    name: str = ""


@dataclass(frozen=True)
class Webhook:
    """An incoming webhook ``/rest/<user_id>/<code>/`` of one portal."""

    user_id: int
    code: str
    portal: str
    scopes: tuple[str, ...]


@dataclass
class ActiveCall:
    """A registered, not yet finished call (``b_voximplant_call``)."""

    call_id: str
    user_id: int
    phone: str
    call_type: int
    line: str
    external_call_id: str
    created_at: float
    start_date: str
    crm_entity_type: str
    crm_entity_id: int | None

    @property
    def dedup_key(self) -> tuple[int, str, int]:
        """The part of the re-registration filter that is always compared."""
        return (self.user_id, self.phone, self.call_type)


@dataclass(frozen=True)
class RecordAttachment:
    """One recording attached to a finished call by ``telephony.externalCall.attachRecord``.

    ``via`` says how it came: ``"url"`` (RECORD_URL, stored, never downloaded), ``"content"``
    (FILE_CONTENT, base64) or ``"upload"`` (a multipart POST to the upload URL). The fake keeps
    the size and SHA-256 of the file, not its bytes.
    """

    via: str
    filename: str | None
    url: str | None
    size: int | None
    sha256: str | None
    file_id: int
    at: float


def _seed_users() -> dict[int, User]:
    return {
        1: User(1, "101", active=True, name="Active User"),
        2: User(2, "102", active=False, name="Inactive User"),
    }


@dataclass
class PortalState:
    """Everything one Bitrix24 portal holds. Read it after traffic has settled."""

    name: str
    users: dict[int, User] = field(default_factory=_seed_users)
    active_calls: dict[str, ActiveCall] = field(default_factory=dict)
    statistics: dict[str, dict[str, Any]] = field(default_factory=dict)
    transcripts: dict[int, dict[str, Any]] = field(default_factory=dict)
    attachments: dict[str, list[int]] = field(default_factory=dict)
    records: dict[str, list[RecordAttachment]] = field(default_factory=dict)  # CALL_ID → history
    bucket: LeakyBucket = field(default_factory=LeakyBucket)
    operating: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    count_503: int = 0
    next_statistic_id: int = 1
    next_transcript_id: int = 1
    next_file_id: int = 1
    # Indexes keep register and statistic.get O(1) under load; dicts are ordered sets.
    calls_by_key: dict[tuple[int, str, int], dict[str, None]] = field(default_factory=dict)
    calls_by_external_id: dict[tuple[int, str, int, str], dict[str, None]] = field(default_factory=dict)
    statistics_by_external_id: dict[str, list[str]] = field(default_factory=dict)

    def clear(self) -> None:
        """Forget calls, statistics, transcripts, records and limiter state; keep users."""
        fresh = PortalState(self.name, users=self.users)
        self.__dict__.update(fresh.__dict__)

    def add_active_call(self, call: ActiveCall) -> None:
        """Store a newly registered call."""
        self.active_calls[call.call_id] = call
        self.calls_by_key.setdefault(call.dedup_key, {})[call.call_id] = None
        if call.external_call_id:
            external_key = (*call.dedup_key, call.external_call_id)
            self.calls_by_external_id.setdefault(external_key, {})[call.call_id] = None

    def pop_active_call(self, call_id: str) -> ActiveCall:
        """Remove a call that is being finished."""
        call = self.active_calls.pop(call_id)
        del self.calls_by_key[call.dedup_key][call_id]
        if call.external_call_id:
            del self.calls_by_external_id[(*call.dedup_key, call.external_call_id)][call_id]
        return call

    def dedup_candidates(self, candidate: ActiveCall) -> list[ActiveCall]:
        """Active calls that share the candidate's user, phone, type and (if given) external id."""
        if candidate.external_call_id:
            ids = self.calls_by_external_id.get((*candidate.dedup_key, candidate.external_call_id), {})
        else:
            ids = self.calls_by_key.get(candidate.dedup_key, {})
        return [self.active_calls[call_id] for call_id in ids]

    def add_statistics_row(self, row: dict[str, Any]) -> None:
        """Store a finished call's statistics row."""
        self.statistics[row["CALL_ID"]] = row
        if row["EXTERNAL_CALL_ID"]:
            self.statistics_by_external_id.setdefault(row["EXTERNAL_CALL_ID"], []).append(row["CALL_ID"])


@dataclass(frozen=True)
class FakeConfig:
    """Switches for limits, faults and Bitrix24 variants; change with ``configure``."""

    burst: float | None = None  # leaky bucket size; None: no request-rate limit
    rate: float = 2.0  # bucket drain per second
    count_rejected: bool = False  # do 503-rejected requests fill the bucket too
    operating_limit: float | None = None  # seconds per method per 10 min; None: no 429s
    operating_cost: float = 0.1  # seconds charged per call
    operating_in_time: bool = True  # emit time.operating and time.operating_reset_at
    error_rate: float = 0.0  # random 500s, the action is not performed
    drop_rate: float = 0.0  # random dropped connections, the action is not performed
    slow_rate: float = 0.0  # random slow answers, the action IS performed
    slow_seconds: float = 3.0
    latency: float = 0.0  # added before every request
    seed: int | None = None
    error_code: str = ""  # `error` of telephony validation errors: "" (real) or "ERROR_CORE" (docs)
    strict_messages: bool = True  # reject transcript lines with keys beyond the four
    deny_statistics: bool = False  # voximplant.statistic.get answers 403 ACCESS_DENIED
    deny_webhook_app_methods: bool = False  # register/finish via webhook: 403 WRONG_AUTH_TYPE
    finish_start_date_as_object: bool = True  # finish returns CALL_START_DATE as {} like PHP
    rotate_refresh_tokens: bool = True  # a refresh makes the refresh token it used invalid
    superseded_access_error: str = "expired_token"  # an access token replaced by a refresh: or invalid_token

    def updated(self, changes: Mapping[str, object]) -> FakeConfig:
        """A copy with ``changes`` applied; ValueError names an unknown or mistyped key."""
        types = {item.name: str(item.type) for item in dataclasses.fields(self)}
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in types:
                raise ValueError(f"unknown config key {name!r}; known: {sorted(types)}")
            checked[name] = _check_config_value(name, types[name], value)
        return dataclasses.replace(self, **checked)


def _check_config_value(name: str, declared: str, value: object) -> object:
    optional = declared.endswith("| None")
    base = declared.split("|")[0].strip()
    if value is None and optional:
        return None
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "float" and is_number:
        return float(value)  # type: ignore[arg-type]
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "str" and isinstance(value, str):
        return value
    raise ValueError(f"config {name}: expected {declared}, got {value!r}")


@dataclass(frozen=True)
class MethodCall:
    """An authenticated call handed to a method implementation."""

    portal: PortalState
    webhook: Webhook  # for applications: the installing user, the app's scopes
    params: dict[str, Any]
    now: float
    installation: Installation | None = None  # set when the call came with an OAuth token


MethodHandler = Callable[[MethodCall], object]

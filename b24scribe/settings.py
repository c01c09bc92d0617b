"""One settings object, read once from `B24SCRIBE_*` variables (and `.env`), checked at start."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from b24scribe.transcript import Role

PREFIX = "B24SCRIBE_"
# Seconds to wait before attempt n+1 after n failures: about three days in all, then the job is dead.
DEFAULT_RETRY_SCHEDULE = (10.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0, 86400.0)


RECORDING_MODES = ("upload", "url")
# vendors that answer with the transcript itself: nothing calls back, so no public URL is needed
ANSWERS_AT_ONCE = ("openai",)
# vendors b24scribe can submit recordings to itself (contract §10), as B24SCRIBE_TRANSCRIBE_WITH names
# them: the names of b24scribe.delivery.submit.SUBMITTERS (a test holds the two together)
TRANSCRIBE_VENDORS = (
    "deepgram",
    "assemblyai",
    "revai",
    "azure",
    "elevenlabs",
    "gladia",
    "openai",
    "speechmatics",
)


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Typed settings with safe embedded defaults (contract §2)."""

    database_url: str = "sqlite:///instance/b24scribe.sqlite3"
    bitrix24_webhook_url: str | None = None
    # more portals by name, chosen per hook URL with ?portal=<name> (B24SCRIBE_BITRIX24_PORTALS)
    bitrix24_portals: Mapping[str, str] = field(default_factory=dict)
    # a webhook portal's own inbound token (`name:token=url` in B24SCRIBE_BITRIX24_PORTALS): opens that portal only
    portal_tokens: Mapping[str, str] = field(default_factory=dict)
    # the Bitrix24 local application (contract §8): installed portals call REST with OAuth tokens
    bitrix24_client_id: str | None = None
    bitrix24_client_secret: str | None = None
    bitrix24_oauth_url: str = "https://oauth.bitrix.info"
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    bitrix24_timeout: float = 20.0
    # seconds to wait for an STT vendor's API when fetching a finished transcript (not a Bitrix24 request)
    vendor_timeout_seconds: float = 30.0
    inbound_token: str | None = None
    webhook_secret: str | None = None
    admin_token: str | None = None
    default_user_id: int | None = None
    channel0: Role = Role.CALLER
    first_speaker: Role = Role.CALLEE
    crm_create: bool = False
    max_body_bytes: int = 20 * 1024 * 1024
    # a hook body that has not arrived this long after its headers is dropped (contract §12)
    body_timeout_seconds: float = 30.0
    rate_per_second: float = 2.0
    rate_burst: int = 45
    # requests in flight at once per portal, across every worker (a slow answer holds one slot)
    portal_concurrency: int = 4
    # a worker whose heartbeat is older than this is dead: its jobs and slots are taken back
    worker_dead_after_seconds: float = 10.0
    # requests one worker process has in flight at most, over all portals (its sender threads)
    worker_senders: int = 32
    lease_seconds: float = 60.0
    orphan_after_seconds: float = 24 * 3600.0
    worker_poll_seconds: float = 1.0
    log_level: str = "INFO"
    log_format: str = "json"
    # the https base URL the service is reached at (behind a proxy too); https makes the status cookie Secure
    public_url: str | None = None
    # bearer token for /metrics and the details of /readyz (unset: both open, as a private network expects)
    metrics_token: str | None = None
    # raw bodies and transcripts older than this are purged once delivered or dead
    retention_days: float = 30.0
    # recordings (contract §9): upload (download, then upload to Bitrix24) or url (pass RECORD_URL)
    recording_mode: str = "upload"
    # host patterns downloads may go to (names, IPs, `*.` wildcards); empty: none but a cloud PBX's own
    recording_hosts: tuple[str, ...] = ()
    max_recording_bytes: int = 200 * 1024 * 1024
    # a transcript waits at most this long after finish for a known recording to be attached first
    recording_wait_minutes: float = 30.0
    # transcription requests (contract §10): the vendor b24scribe submits each answered call's recording to
    transcribe_with: str | None = None
    transcribe_min_seconds: float = 5.0
    # a submitted call whose transcript has not come this long after submission is reported as failed
    transcribe_timeout_minutes: float = 60.0
    # portals whose calls are never submitted (names as ?portal= gives them)
    transcribe_off_portals: tuple[str, ...] = ()
    # per-vendor keys, API base URLs and other secrets: B24SCRIBE_<VENDOR>_<NAME>, read lazily
    vendor: Mapping[str, str] = field(default_factory=dict)

    @property
    def dry_run(self) -> bool:
        """True when no Bitrix24 portal is configured and no local application either (no portal
        can be installed): jobs are recorded, nothing is sent."""
        return self.bitrix24_webhook_url is None and not self.bitrix24_portals and not self.app_mode

    @property
    def app_mode(self) -> bool:
        """The local application is configured: portals may install it (POST /b24/install)."""
        return self.bitrix24_client_id is not None and self.bitrix24_client_secret is not None

    @property
    def portal(self) -> str:
        """The default portal's key (pacing and the ledger use it): the webhook's host name."""
        if self.bitrix24_webhook_url is not None:
            return urlsplit(self.bitrix24_webhook_url).netloc
        if self.bitrix24_portals:
            return next(iter(self.bitrix24_portals))
        return "dry-run"

    def portal_urls(self) -> dict[str, str]:
        """Every configured portal's key and webhook URL."""
        urls = dict(self.bitrix24_portals)
        if self.bitrix24_webhook_url is not None:
            urls[self.portal] = self.bitrix24_webhook_url
        return urls

    def vendor_setting(self, vendor: str, name: str) -> str | None:
        """A per-vendor setting such as B24SCRIBE_ASSEMBLYAI_API_KEY."""
        return self.vendor.get(f"{vendor.upper()}_{name.upper()}")

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (tests use this)."""
        return replace(self, **changes)


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise SettingsError(f"{PREFIX}{name}: expected true or false, got {raw!r}")


def _parse_number(name: str, raw: str, kind: type[int] | type[float], minimum: float) -> Any:
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}: expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise SettingsError(f"{PREFIX}{name}: expected a finite number, got {raw!r}")
    if value < minimum:
        raise SettingsError(f"{PREFIX}{name}: must be at least {minimum}, got {raw!r}")
    return value


def _parse_role(name: str, raw: str) -> Role:
    try:
        return Role(raw.strip().lower())
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise SettingsError(f"{PREFIX}{name}: expected one of {allowed}, got {raw!r}") from None


def _parse_webhook_url(name: str, raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in {"http", "https"} or not parts.netloc or "/rest/" not in parts.path + "/":
        # never echo the URL: it carries the webhook's secret code
        raise SettingsError(
            f"{PREFIX}{name}: expected the portal's incoming-webhook URL, like https://acme.bitrix24.com/rest/1/abc123/"
        )
    return raw.strip().rstrip("/") + "/"


def _parse_portals(raw: str) -> tuple[dict[str, str], dict[str, str]]:
    """`name=webhook-url` or `name:inbound-token=webhook-url` items: the URLs and the tokens by name."""
    portals: dict[str, str] = {}
    tokens: dict[str, str] = {}
    for item in raw.replace(",", " ").split():
        key, sep, url = item.partition("=")
        name, has_token, token = key.partition(":")
        if not sep or not name or (has_token and not token):
            raise SettingsError(
                f"{PREFIX}BITRIX24_PORTALS: expected name=webhook-url or name:token=webhook-url items, "
                "separated by spaces"
            )
        portals[name] = _parse_webhook_url("BITRIX24_PORTALS", url)
        if token:
            if len(token) < 16:
                raise SettingsError(f"{PREFIX}BITRIX24_PORTALS: portal {name!r}'s token must be at least 16 characters")
            if token in tokens.values():
                raise SettingsError(f"{PREFIX}BITRIX24_PORTALS: two portals have the same token")
            tokens[name] = token
    return portals, tokens


def _parse_public_url(raw: str, name: str = "PUBLIC_URL") -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in {"http", "https"} or not parts.netloc or parts.query or parts.fragment:
        raise SettingsError(f"{PREFIX}{name}: expected a base URL like https://b24scribe.example.com, got {raw!r}")
    return raw.strip().rstrip("/")


def _parse_schedule(raw: str) -> tuple[float, ...]:
    try:
        schedule = tuple(float(part) for part in raw.replace(",", " ").split())
    except ValueError:
        raise SettingsError(f"{PREFIX}RETRY_SCHEDULE: expected seconds separated by commas, got {raw!r}") from None
    if not schedule or any(delay < 0 for delay in schedule):
        raise SettingsError(f"{PREFIX}RETRY_SCHEDULE: expected at least one non-negative delay")
    return schedule


def _parse_hosts(raw: str) -> tuple[str, ...]:
    from b24scribe.delivery.download import parse_hosts

    try:
        return parse_hosts(raw)
    except ValueError as error:
        raise SettingsError(f"{PREFIX}RECORDING_HOSTS: {error}") from None


_TOP_LEVEL = {f.name.upper() for f in fields(Settings)} - {"VENDOR"}


def load_settings(environ: Mapping[str, str] | None = None, dotenv: bool = True) -> Settings:
    """Read settings from the environment (and `.env` in the working directory)."""
    if environ is None:
        if dotenv and Path(".env").is_file():
            from dotenv import load_dotenv

            load_dotenv(".env", override=False)
        environ = os.environ
    raw = {k[len(PREFIX) :]: v for k, v in environ.items() if k.startswith(PREFIX)}
    values: dict[str, Any] = {}

    def text(name: str) -> str | None:
        value = raw.get(name)
        return value if value not in (None, "") else None

    if (url := text("DATABASE_URL")) is not None:
        values["database_url"] = url
    if (url := text("BITRIX24_WEBHOOK_URL")) is not None:
        values["bitrix24_webhook_url"] = _parse_webhook_url("BITRIX24_WEBHOOK_URL", url)
    for name in ("INBOUND_TOKEN", "WEBHOOK_SECRET", "ADMIN_TOKEN", "METRICS_TOKEN"):
        if (secret := text(name)) is not None:
            values[name.lower()] = secret
    if (secret := values.get("webhook_secret")) and not secret.startswith("whsec_"):
        raise SettingsError(f"{PREFIX}WEBHOOK_SECRET: expected a Standard Webhooks secret starting with whsec_")
    numbers: dict[str, tuple[type[int] | type[float], float]] = {
        "BITRIX24_TIMEOUT": (float, 0.1),
        "VENDOR_TIMEOUT_SECONDS": (float, 0.1),
        "DEFAULT_USER_ID": (int, 1),
        "MAX_BODY_BYTES": (int, 1024),
        "BODY_TIMEOUT_SECONDS": (float, 0.1),
        "RATE_PER_SECOND": (float, 0.01),
        "RATE_BURST": (int, 1),
        "PORTAL_CONCURRENCY": (int, 1),
        "WORKER_DEAD_AFTER_SECONDS": (float, 1.0),
        "WORKER_SENDERS": (int, 1),
        "LEASE_SECONDS": (float, 1.0),
        "ORPHAN_AFTER_SECONDS": (float, 1.0),
        "WORKER_POLL_SECONDS": (float, 0.01),
        "RETENTION_DAYS": (float, 1.0),
        "MAX_RECORDING_BYTES": (int, 1024),
        "RECORDING_WAIT_MINUTES": (float, 0.0),
        "TRANSCRIBE_MIN_SECONDS": (float, 0.0),
        "TRANSCRIBE_TIMEOUT_MINUTES": (float, 1.0),
    }
    for name, (kind, minimum) in numbers.items():
        if (value := text(name)) is not None:
            values[name.lower()] = _parse_number(name, value, kind, minimum)
    for name in ("CHANNEL0", "FIRST_SPEAKER"):
        if (value := text(name)) is not None:
            values[name.lower()] = _parse_role(name, value)
    if (value := text("PUBLIC_URL")) is not None:
        values["public_url"] = _parse_public_url(value)
    if (value := text("BITRIX24_PORTALS")) is not None:
        values["bitrix24_portals"], values["portal_tokens"] = _parse_portals(value)
    if (value := text("BITRIX24_OAUTH_URL")) is not None:
        values["bitrix24_oauth_url"] = _parse_public_url(value, "BITRIX24_OAUTH_URL").rstrip("/")
    for name in ("BITRIX24_CLIENT_ID", "BITRIX24_CLIENT_SECRET"):
        if (value := text(name)) is not None:
            values[name.lower()] = value.strip()
    if ("bitrix24_client_id" in values) != ("bitrix24_client_secret" in values):
        raise SettingsError(f"{PREFIX}BITRIX24_CLIENT_ID and {PREFIX}BITRIX24_CLIENT_SECRET go together: set both")
    if (value := text("RETRY_SCHEDULE")) is not None:
        values["retry_schedule"] = _parse_schedule(value)
    if (value := text("RECORDING_MODE")) is not None:
        if value.strip().lower() not in RECORDING_MODES:
            raise SettingsError(f"{PREFIX}RECORDING_MODE: expected upload or url, got {value!r}")
        values["recording_mode"] = value.strip().lower()
    if (value := text("RECORDING_HOSTS")) is not None:
        values["recording_hosts"] = _parse_hosts(value)
    if (value := text("TRANSCRIBE_WITH")) is not None:
        vendor = value.strip().lower()
        if vendor not in TRANSCRIBE_VENDORS:
            raise SettingsError(
                f"{PREFIX}TRANSCRIBE_WITH: expected one of {', '.join(TRANSCRIBE_VENDORS)}, got {value!r}"
            )
        values["transcribe_with"] = vendor
        # a vendor that answers with the transcript needs neither: nothing calls back
        if vendor not in ANSWERS_AT_ONCE and "public_url" not in values:
            raise SettingsError(
                f"{PREFIX}TRANSCRIBE_WITH needs {PREFIX}PUBLIC_URL: "
                f"the vendor calls back at <public URL>/hooks/stt/{vendor}"
            )
        if vendor not in ANSWERS_AT_ONCE and "inbound_token" not in values:
            raise SettingsError(
                f"{PREFIX}TRANSCRIBE_WITH needs {PREFIX}INBOUND_TOKEN: each callback's credential is derived from it"
            )
    if (value := text("TRANSCRIBE_OFF_PORTALS")) is not None:
        values["transcribe_off_portals"] = tuple(name for name in value.replace(",", " ").split() if name)
    if (value := text("CRM_CREATE")) is not None:
        values["crm_create"] = _parse_bool("CRM_CREATE", value)
    if (value := text("LOG_LEVEL")) is not None:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(f"{PREFIX}LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got {value!r}")
        values["log_level"] = value.upper()
    if (value := text("LOG_FORMAT")) is not None:
        if value not in {"json", "console"}:
            raise SettingsError(f"{PREFIX}LOG_FORMAT: expected json or console, got {value!r}")
        values["log_format"] = value
    values["vendor"] = {k: v for k, v in raw.items() if k not in _TOP_LEVEL and v != ""}
    return Settings(**values)

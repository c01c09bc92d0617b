"""Settings: safe defaults, and a bad value stops start-up with one line naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from b24scribe.settings import DEFAULT_RETRY_SCHEDULE, Settings, SettingsError, load_settings
from b24scribe.transcript import Role

ROOT = Path(__file__).resolve().parent.parent


def test_the_embedded_defaults_run_dry_on_sqlite() -> None:
    settings = load_settings({}, dotenv=False)
    assert settings.database_url == "sqlite:///instance/b24scribe.sqlite3"
    assert settings.dry_run and settings.portal == "dry-run"
    assert settings.inbound_token is None and settings.admin_token is None
    assert (settings.channel0, settings.first_speaker) == (Role.CALLER, Role.CALLEE)
    assert (settings.rate_per_second, settings.rate_burst) == (2.0, 45)
    assert settings.retry_schedule == DEFAULT_RETRY_SCHEDULE
    assert 2.5 * 86400 < sum(DEFAULT_RETRY_SCHEDULE) < 3.5 * 86400  # about three days


def test_values_are_read_and_typed() -> None:
    settings = load_settings(
        {
            "B24SCRIBE_BITRIX24_WEBHOOK_URL": "https://acme.bitrix24.com/rest/1/abc123",
            "B24SCRIBE_BITRIX24_PORTALS": "beta=https://beta.bitrix24.com/rest/7/xyz/",
            "B24SCRIBE_CHANNEL0": "Callee",
            "B24SCRIBE_RATE_PER_SECOND": "5",
            "B24SCRIBE_RATE_BURST": "240",
            "B24SCRIBE_RETRY_SCHEDULE": "1, 2,3",
            "B24SCRIBE_ASSEMBLYAI_API_KEY": "k",
            "B24SCRIBE_CRM_CREATE": "yes",
        },
        dotenv=False,
    )
    assert settings.bitrix24_webhook_url == "https://acme.bitrix24.com/rest/1/abc123/"
    assert settings.portal == "acme.bitrix24.com"
    assert settings.portal_urls() == {
        "beta": "https://beta.bitrix24.com/rest/7/xyz/",
        "acme.bitrix24.com": "https://acme.bitrix24.com/rest/1/abc123/",
    }
    assert settings.channel0 is Role.CALLEE
    assert (settings.rate_per_second, settings.rate_burst) == (5.0, 240)
    assert settings.retry_schedule == (1.0, 2.0, 3.0)
    assert settings.vendor_setting("assemblyai", "api_key") == "k"
    assert settings.crm_create is True


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("B24SCRIBE_CHANNEL0", "agent", "caller, callee, user, client"),
        ("B24SCRIBE_RATE_PER_SECOND", "fast", "expected a number"),
        ("B24SCRIBE_RATE_BURST", "0", "at least 1"),
        ("B24SCRIBE_WEBHOOK_SECRET", "plain", "whsec_"),
        ("B24SCRIBE_BITRIX24_WEBHOOK_URL", "acme.bitrix24.com", "incoming-webhook URL"),
        ("B24SCRIBE_RETRY_SCHEDULE", "1,soon", "seconds separated by commas"),
        ("B24SCRIBE_CRM_CREATE", "maybe", "true or false"),
        ("B24SCRIBE_RETENTION_DAYS", "0.5", "at least 1"),
        ("B24SCRIBE_RETENTION_DAYS", "forever", "expected a number"),
        ("B24SCRIBE_RETENTION_DAYS", "nan", "finite"),
        ("B24SCRIBE_LEASE_SECONDS", "inf", "finite"),
        ("B24SCRIBE_BODY_TIMEOUT_SECONDS", "0.01", "at least 0.1"),
        ("B24SCRIBE_BODY_TIMEOUT_SECONDS", "inf", "finite"),
        ("B24SCRIBE_PUBLIC_URL", "b24scribe.example.com", "base URL"),
    ],
)
def test_a_bad_value_names_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({name: value}, dotenv=False)
    assert str(raised.value).startswith(name + ":")
    assert says in str(raised.value)


def test_a_bad_webhook_url_is_not_echoed_because_it_holds_a_secret() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"B24SCRIBE_BITRIX24_WEBHOOK_URL": "ftp://acme/secret-code-123"}, dotenv=False)
    assert "secret-code-123" not in str(raised.value)


def test_a_misconfigured_process_stops_at_start_with_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "B24SCRIBE_RATE_BURST": "lots", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "jobs", "list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if "B24SCRIBE_" in line]
    assert error_lines == ["b24scribe: configuration error: B24SCRIBE_RATE_BURST: expected a number, got 'lots'"]


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.rate_burst = 3  # type: ignore[misc]


def test_retention_metrics_token_and_public_url_are_read() -> None:
    assert load_settings({}, dotenv=False).retention_days == 30.0
    assert load_settings({}, dotenv=False).metrics_token is None
    assert load_settings({}, dotenv=False).body_timeout_seconds == 30.0
    assert load_settings({"B24SCRIBE_BODY_TIMEOUT_SECONDS": "2.5"}, dotenv=False).body_timeout_seconds == 2.5
    settings = load_settings(
        {
            "B24SCRIBE_RETENTION_DAYS": "7",
            "B24SCRIBE_METRICS_TOKEN": "scrape-me",
            "B24SCRIBE_PUBLIC_URL": "https://b24scribe.example.com/",
        },
        dotenv=False,
    )
    assert (settings.retention_days, settings.metrics_token) == (7.0, "scrape-me")
    assert settings.public_url == "https://b24scribe.example.com"

"""Settings: safe defaults, and a bad value stops start-up with one line naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from alembic import command
from sqlalchemy import inspect, text

from b24scribe import outbox
from b24scribe.db import Database
from b24scribe.delivery.fetches import FetchFailed, VendorFetches
from b24scribe.delivery.recording import Recorder
from b24scribe.delivery.sender import pace_from
from b24scribe.migrate import alembic_config, upgrade
from b24scribe.models import Call, DeadReason, Job, JobKind, JobState
from b24scribe.settings import DEFAULT_RETRY_SCHEDULE, Settings, SettingsError, load_settings
from b24scribe.transcript import Role
from schemas.registry import SOURCES

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
        ("B24SCRIBE_VENDOR_TIMEOUT_SECONDS", "0", "at least 0.1"),
        ("B24SCRIBE_VENDOR_TIMEOUT_SECONDS", "soon", "expected a number"),
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


# --- B24SCRIBE_VENDOR_TIMEOUT_SECONDS: vendor fetches wait on their own timeout, not Bitrix24's ---------


def test_the_vendor_timeout_is_read_and_defaults_to_30_seconds() -> None:
    assert load_settings({}, dotenv=False).vendor_timeout_seconds == 30.0
    settings = load_settings(
        {"B24SCRIBE_VENDOR_TIMEOUT_SECONDS": "90", "B24SCRIBE_BITRIX24_TIMEOUT": "5"}, dotenv=False
    )
    assert (settings.vendor_timeout_seconds, settings.bitrix24_timeout) == (90.0, 5.0)
    assert "VENDOR_TIMEOUT_SECONDS" not in settings.vendor, "a setting of its own, not a vendor's"


class _Unreachable:
    """An HTTP session that records the timeout it was given and never answers."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def get(self, url: str, headers: dict[str, str], timeout: float) -> Any:
        self.timeouts.append(timeout)
        raise requests.ConnectionError("down")


def test_a_vendor_fetch_waits_for_the_vendor_timeout_not_the_bitrix24_one(tmp_path: Path) -> None:
    settings = Settings(bitrix24_timeout=2.0, vendor_timeout_seconds=45.0, vendor={"ASSEMBLYAI_API_KEY": "k"})
    http = _Unreachable()
    database = Database(f"sqlite:///{tmp_path}/fetch.sqlite3")
    try:
        fetches = VendorFetches(
            database,
            settings,
            SOURCES,
            http,
            Recorder(database, pace_from(settings), settings.retry_schedule),  # type: ignore[arg-type]
        )
        part = SimpleNamespace(id=1, vendor="assemblyai", vendor_job_id="abc")
        outcome = fetches._get(part.vendor, part.vendor_job_id, part.id, {}, b"")
    finally:
        database.dispose()
    assert http.timeouts == [45.0]
    assert outcome == FetchFailed("assemblyai API unreachable: ConnectionError", retry=True)


# --- Job.dead_reason: why a job is dead, set where it dies, cleared when it comes back -----------------


def test_a_job_says_why_it_died_and_forgets_it_when_replayed(db: Database) -> None:
    with db.write() as session:
        killed = outbox.enqueue(session, JobKind.REGISTER, portal="p", now=0.0)
        exhausted = outbox.enqueue(session, JobKind.FINISH, portal="p", now=0.0)
        retried = outbox.enqueue(session, JobKind.ATTACH, portal="p", now=0.0)
        outbox.kill(session, killed, "400 ERROR_ARGUMENT: bad phone", 1.0)
        outbox.retry_later(session, exhausted, "HTTP 503", 1.0, schedule=())
        outbox.retry_later(session, retried, "HTTP 503", 1.0, schedule=(10.0,))
        ids = killed.id, exhausted.id, retried.id
    with db.read() as session:
        rows = [session.get_one(Job, job_id) for job_id in ids]
        assert [(job.state, job.dead_reason) for job in rows] == [
            ("dead", "permanent"),
            ("dead", "retries"),
            ("pending", None),
        ]
        assert rows[0].last_error == "400 ERROR_ARGUMENT: bad phone", "the words stay for people"
        assert rows[1].last_error == "gave up after 1 attempts: HTTP 503"
    with db.write() as session:
        replayed = outbox.replay(session, ids[0], now=2.0)
        assert replayed is not None and replayed.state == JobState.PENDING
    with db.read() as session:
        assert session.get_one(Job, ids[0]).dead_reason is None


def test_only_jobs_dead_as_orphans_come_back_when_their_call_finishes(db: Database) -> None:
    with db.write() as session:
        call = Call(portal="p", created_at=0.0, updated_at=0.0)
        session.add(call)
        session.flush()
        orphan = outbox.enqueue(session, JobKind.ATTACH, call_id=call.id, portal="p", now=0.0)
        refused = outbox.enqueue(session, JobKind.ATTACH, call_id=call.id, portal="p", now=0.0)
        orphan.state, orphan.dead_reason, orphan.last_error = JobState.DEAD, DeadReason.ORPHAN, "the call never came"
        # a permanent failure whose words happen to start like an orphan's is not revived
        outbox.kill(session, refused, "orphan: looks like one, is not", 1.0)
        call_id, ids = call.id, (orphan.id, refused.id)
    with db.write() as session:
        outbox.revive_orphans(session, call_id)
        assert outbox.run_releases(session, 3.0) == 1
    with db.read() as session:
        first, second = (session.get_one(Job, job_id) for job_id in ids)
        assert (first.state, first.dead_reason, first.last_error, first.attempts) == ("pending", None, None, 0)
        assert (second.state, second.dead_reason) == ("dead", "permanent")


# --- migration 0004: the column, the orphans already dead, and back ---------------------------------------


def test_migration_0004_adds_dead_reason_marks_the_dead_orphans_and_is_reversible(database_url: str) -> None:
    upgrade(database_url, "0003")
    database = Database(database_url)
    try:
        insert = text(
            "INSERT INTO job (kind, state, attempts, next_attempt_at, ambiguous, last_error, created_at, updated_at)"
            " VALUES (:kind, :state, 0, 0, false, :error, 0, 0)"
        )
        with database.write_engine.begin() as connection:
            connection.execute(insert, {"kind": "attach", "state": "dead", "error": "orphan: the PBX did not …"})
            connection.execute(insert, {"kind": "attach", "state": "dead", "error": "gave up after 12 attempts: 503"})
            connection.execute(insert, {"kind": "attach", "state": "waiting", "error": "orphan: not dead (yet)"})
        upgrade(database_url)
        with database.write_engine.connect() as connection:
            reasons = connection.execute(text("SELECT dead_reason FROM job ORDER BY id")).scalars().all()
        assert reasons == ["orphan", None, None]
        command.downgrade(alembic_config(database_url), "0003")
        database.dispose()
        columns = {column["name"] for column in inspect(database.write_engine).get_columns("job")}
        assert "dead_reason" not in columns and "last_error" in columns
        upgrade(database_url)
    finally:
        database.dispose()


def test_a_webhook_portal_may_carry_its_own_inbound_token_and_the_local_application_needs_both_keys() -> None:
    settings = load_settings(
        {
            "B24SCRIBE_BITRIX24_PORTALS": "beta:beta-portal-token-0123=https://beta.bitrix24.com/rest/7/xyz/ "
            "gamma=https://gamma.bitrix24.com/rest/1/abc/",
            "B24SCRIBE_BITRIX24_CLIENT_ID": "local.5f0a1b2c3d4e5f.12345678",
            "B24SCRIBE_BITRIX24_CLIENT_SECRET": "secret",
            "B24SCRIBE_BITRIX24_OAUTH_URL": "http://127.0.0.1:9999/",
        },
        dotenv=False,
    )
    assert settings.bitrix24_portals == {
        "beta": "https://beta.bitrix24.com/rest/7/xyz/",
        "gamma": "https://gamma.bitrix24.com/rest/1/abc/",
    }
    assert settings.portal_tokens == {"beta": "beta-portal-token-0123"}
    assert settings.app_mode and not settings.dry_run
    assert settings.bitrix24_oauth_url == "http://127.0.0.1:9999"
    assert load_settings({}, dotenv=False).bitrix24_oauth_url == "https://oauth.bitrix.info"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"B24SCRIBE_BITRIX24_PORTALS": "beta:short=https://beta.bitrix24.com/rest/7/xyz/"}, "16 characters"),
        ({"B24SCRIBE_BITRIX24_PORTALS": "beta:=https://beta.bitrix24.com/rest/7/xyz/"}, "name:token=webhook-url"),
        (
            {
                "B24SCRIBE_BITRIX24_PORTALS": "a:same-token-0123456789=https://a.bitrix24.com/rest/1/x/ "
                "b:same-token-0123456789=https://b.bitrix24.com/rest/1/y/"
            },
            "the same token",
        ),
        ({"B24SCRIBE_BITRIX24_CLIENT_ID": "local.1"}, "B24SCRIBE_BITRIX24_CLIENT_SECRET"),
        ({"B24SCRIBE_BITRIX24_CLIENT_SECRET": "s"}, "B24SCRIBE_BITRIX24_CLIENT_ID"),
        ({"B24SCRIBE_BITRIX24_OAUTH_URL": "oauth.bitrix.info"}, "B24SCRIBE_BITRIX24_OAUTH_URL"),
    ],
)
def test_a_wrong_portal_or_application_setting_stops_the_start_naming_it(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(environ, dotenv=False)
    assert named in str(error.value)

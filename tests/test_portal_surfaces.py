"""Where people see the portals (contract §3 and §8): `GET /v1/portals`, `flask portals …`, the status
page, `/readyz` details, the `b24scribe_portal_state` metric and `flask check`.

The scene: a webhook portal of the settings (with its own inbound token) beside two portals that
installed the local application against the fake Bitrix24; one of them had its refresh token revoked
while a call was waiting, so it needs re-install and its jobs wait."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import pytest
from click.testing import Result
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app import create_app
from b24scribe import migrate, ratelimit
from b24scribe.db import Database
from b24scribe.models import Job, Portal
from b24scribe.settings import Settings
from fake_bitrix24 import App, Installation
from tests.conftest import ADMIN_TOKEN, INBOUND_TOKEN, admin
from tests.fake_bitrix24 import FakeBitrix24
from tests.test_app_mode import CLIENT_ID, CLIENT_SECRET, PORTAL_A, PORTAL_B, install, post_call, worker_of

WEBHOOK_PORTAL = "hook.bitrix24.test"
WEBHOOK_PORTAL_TOKEN = "webhook-portal-own-token-5d1e"
PUBLIC_URL = "https://scribe.example.com"


@dataclass
class Scene:
    service: Flask
    http: FlaskClient
    a: Installation  # needs re-install, one call's jobs waiting
    b: Installation  # installed, one call delivered
    secrets: list[str]  # what must never be shown: OAuth and application tokens, the webhook URL


@pytest.fixture
def oauth_app(fake_bitrix24: FakeBitrix24) -> App:
    return fake_bitrix24.create_app(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)


@pytest.fixture
def mixed_settings(settings: Settings, fake_bitrix24: FakeBitrix24, oauth_app: App) -> Settings:
    """A webhook portal of the settings, and the local application configured."""
    return settings.with_overrides(
        bitrix24_webhook_url=None,
        bitrix24_portals={WEBHOOK_PORTAL: fake_bitrix24.webhook_url},
        portal_tokens={WEBHOOK_PORTAL: WEBHOOK_PORTAL_TOKEN},
        bitrix24_client_id=CLIENT_ID,
        bitrix24_client_secret=CLIENT_SECRET,
        bitrix24_oauth_url=fake_bitrix24.oauth_url,
        retry_schedule=(0.0, 0.0, 0.0, 0.0),
        public_url=PUBLIC_URL,
        rate_per_second=0.01,  # the bucket hardly refills while a test runs: what it shows is what was taken
        rate_burst=50,
    )


def arrange(service: Flask, fake: FakeBitrix24, oauth_app: App) -> Scene:
    http = service.test_client()
    a = install(http, fake, PORTAL_A, oauth_app)
    b = install(http, fake, PORTAL_B, oauth_app)
    secrets = [fake.webhook_url, fake.webhook_url.rstrip("/").rsplit("/", 1)[1]]
    secrets += [token for i in (a, b) for token in (i.access_token, i.refresh_token, i.application_token)]
    fake.expire_access_token(PORTAL_A)
    fake.revoke_refresh_token(PORTAL_A)
    post_call(http, "1700000100.1", portal=PORTAL_A)
    post_call(http, "1700000100.2", portal=PORTAL_B)
    worker_of(service).drain()
    secrets += [b.access_token, b.refresh_token]  # current ones (unchanged: no refresh was needed)
    return Scene(service, http, a, b, secrets)


@pytest.fixture
def scene(mixed_settings: Settings, db: Database, fake_bitrix24: FakeBitrix24, oauth_app: App) -> Scene:
    return arrange(create_app(mixed_settings), fake_bitrix24, oauth_app)


def inbound_token_of(db: Database, name: str) -> str:
    with db.read() as session:
        token = session.scalar(select(Portal.inbound_token).where(Portal.name == name))
    assert token
    return token


def assert_secret_free(text: str, scene: Scene) -> None:
    for secret in [*scene.secrets, INBOUND_TOKEN, ADMIN_TOKEN]:
        assert secret not in text


def cli(service: Flask, *args: str) -> Result:
    return service.test_cli_runner().invoke(args=list(args))


# -- GET /v1/portals ---------------------------------------------------------------------------


def test_the_admin_api_lists_every_portal_with_its_state_own_token_pacing_and_jobs(scene: Scene, db: Database) -> None:
    with db.write() as session:  # Bitrix24 made the service pause portal B
        ratelimit.pause(session, PORTAL_B, time.time() + 30, "QUERY_LIMIT_EXCEEDED", time.time())

    answer = scene.http.get("/v1/portals", headers=admin())

    assert answer.status_code == 200 and answer.json is not None
    portals = {portal["name"]: portal for portal in answer.json["portals"]}
    assert list(portals) == [WEBHOOK_PORTAL, PORTAL_A, PORTAL_B]
    hook, a, b = portals[WEBHOOK_PORTAL], portals[PORTAL_A], portals[PORTAL_B]
    assert (hook["kind"], hook["state"], hook["member_id"]) == ("webhook", "configured", None)
    assert hook["inbound_token"] == WEBHOOK_PORTAL_TOKEN and hook["fix"] is None
    assert hook["installed_at"] is None and hook["pacing"] is None  # nothing sent to it yet

    assert (a["kind"], a["state"], a["member_id"]) == ("application", "needs_reinstall", scene.a.member_id)
    assert "invalid_grant" in a["state_reason"]
    assert "install the local application again from the portal" in a["fix"]
    assert a["inbound_token"] == inbound_token_of(db, PORTAL_A)
    assert a["jobs"]["pending"] >= 1 and a["jobs"]["dead"] == 0  # its jobs wait, none given up

    assert (b["state"], b["state_reason"], b["fix"]) == ("installed", None, None)
    assert b["inbound_token"] == inbound_token_of(db, PORTAL_B) != a["inbound_token"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", b["installed_at"])
    assert b["jobs"] == {"waiting": 0, "pending": 0, "dead": 0}  # its call went through
    assert b["pacing"]["pause_reason"] == "QUERY_LIMIT_EXCEEDED" and b["pacing"]["paused_until"] > b["installed_at"]
    assert 0 <= b["pacing"]["tokens"] < 1  # a pause empties the bucket
    assert_secret_free(answer.get_data(as_text=True), scene)


def test_the_portal_list_needs_the_admin_token(scene: Scene) -> None:
    assert scene.http.get("/v1/portals").status_code == 401
    assert scene.http.get("/v1/portals", headers={"Authorization": f"Bearer {INBOUND_TOKEN}"}).status_code == 401


def test_a_dry_run_deployment_has_no_portals(settings: Settings, db: Database) -> None:
    http = create_app(settings.with_overrides(bitrix24_webhook_url=None)).test_client()

    answer = http.get("/v1/portals", headers=admin())

    assert answer.status_code == 200 and answer.json == {"portals": []}


# -- flask portals list | show | remove ----------------------------------------------------------


def test_portals_list_prints_a_line_per_portal_and_how_to_fix_the_one_needing_reinstall(scene: Scene) -> None:
    result = cli(scene.service, "portals", "list")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"{WEBHOOK_PORTAL}\twebhook\tconfigured\t")
    a_line = next(line for line in lines if line.startswith(PORTAL_A))
    assert f"\tneeds_reinstall\tmember_id={scene.a.member_id}\t" in a_line and "invalid_grant" in a_line
    assert lines[lines.index(a_line) + 1].startswith("  to fix: install the local application again")
    assert any(line.startswith(f"{PORTAL_B}\tapplication\tinstalled\t") for line in lines)
    assert WEBHOOK_PORTAL_TOKEN not in result.output  # tokens only with `show`
    assert_secret_free(result.output, scene)


def test_portals_show_prints_a_portals_state_reason_and_own_inbound_token_by_name_or_member_id(
    scene: Scene, db: Database
) -> None:
    by_member = cli(scene.service, "portals", "show", scene.a.member_id)
    by_name = cli(scene.service, "portals", "show", PORTAL_A)
    webhook = cli(scene.service, "portals", "show", WEBHOOK_PORTAL)

    assert by_member.exit_code == 0, by_member.output
    shown = json.loads(by_member.output)
    assert (shown["name"], shown["state"]) == (PORTAL_A, "needs_reinstall")
    assert "invalid_grant" in shown["state_reason"] and shown["fix"]
    assert shown["inbound_token"] == inbound_token_of(db, PORTAL_A)
    assert json.loads(by_name.output)["member_id"] == scene.a.member_id
    assert json.loads(webhook.output)["inbound_token"] == WEBHOOK_PORTAL_TOKEN
    for result in (by_member, by_name, webhook):
        assert_secret_free(result.output, scene)


def test_portals_show_names_the_known_portals_when_it_finds_none(scene: Scene) -> None:
    result = cli(scene.service, "portals", "show", "nowhere.bitrix24.test")

    assert result.exit_code == 1
    assert "no portal 'nowhere.bitrix24.test'" in result.output and PORTAL_B in result.output


def test_portals_remove_refuses_a_webhook_portal_they_are_settings(scene: Scene) -> None:
    result = cli(scene.service, "portals", "remove", WEBHOOK_PORTAL, "--yes")

    assert result.exit_code == 1
    assert "is a webhook portal" in result.output and "B24SCRIBE_BITRIX24_PORTALS" in result.output
    assert_secret_free(result.output, scene)


def test_portals_remove_asks_for_yes_then_forgets_the_portal_and_keeps_its_jobs(scene: Scene, db: Database) -> None:
    def jobs_of_a() -> int:
        with db.read() as session:
            return session.scalar(select(func.count()).select_from(Job).where(Job.portal == PORTAL_A)) or 0

    kept = jobs_of_a()
    asked = cli(scene.service, "portals", "remove", scene.a.member_id)

    assert asked.exit_code == 1 and "--yes" in asked.output and "open job(s) are kept" in asked.output
    with db.read() as session:
        assert session.scalar(select(Portal.id).where(Portal.name == PORTAL_A)) is not None

    removed = cli(scene.service, "portals", "remove", PORTAL_A, "--yes")

    assert removed.exit_code == 0, removed.output
    assert f"removed portal {PORTAL_A}" in removed.output and "open job(s) are kept" in removed.output
    with db.read() as session:
        assert session.scalar(select(Portal.id).where(Portal.name == PORTAL_A)) is None
    assert jobs_of_a() == kept > 0
    listed = scene.http.get("/v1/portals", headers=admin()).json or {}
    assert [portal["name"] for portal in listed["portals"]] == [WEBHOOK_PORTAL, PORTAL_B]
    again = cli(scene.service, "portals", "remove", PORTAL_A, "--yes")
    assert again.exit_code == 1 and "no installed portal" in again.output


def test_a_removed_portal_that_installs_again_gets_its_kept_jobs_delivered(
    scene: Scene, db: Database, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    assert cli(scene.service, "portals", "remove", PORTAL_A, "--yes").exit_code == 0

    again = install(scene.http, fake_bitrix24, PORTAL_A, oauth_app)
    worker_of(scene.service).drain()

    assert again.member_id == scene.a.member_id
    with db.read() as session:
        states = set(session.scalars(select(Job.state).where(Job.portal == PORTAL_A)))
    assert states == {"done"}


def test_a_job_of_a_removed_portal_that_comes_up_is_given_up_and_retried_after_the_install(
    mixed_settings: Settings, db: Database, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    service = create_app(mixed_settings)
    http = service.test_client()
    install(http, fake_bitrix24, PORTAL_B, oauth_app)
    post_call(http, "1700000101.1", portal=PORTAL_B)
    assert cli(service, "portals", "remove", PORTAL_B, "--yes").exit_code == 0

    worker_of(service).drain()
    with db.read() as session:
        dead = session.scalars(select(Job).where(Job.portal == PORTAL_B, Job.state == "dead")).all()
    assert [job.kind for job in dead] == ["register"] and "nor installed" in (dead[0].last_error or "")

    install(http, fake_bitrix24, PORTAL_B, oauth_app)
    assert cli(service, "jobs", "retry", "--all-dead").exit_code == 0
    worker_of(service).drain()
    with db.read() as session:
        assert set(session.scalars(select(Job.state).where(Job.portal == PORTAL_B))) == {"done"}


# -- the status page -----------------------------------------------------------------------------


def test_the_status_page_shows_a_portal_needing_reinstall_prominently_with_its_reason_and_fix(
    scene: Scene, db: Database
) -> None:
    html = scene.http.get("/status/", headers=admin()).get_data(as_text=True)

    alert = re.search(r'<div class="alert" role="alert"[^>]*>(.*?)</div>', html, re.S)
    assert alert is not None, html
    assert f"Portal {PORTAL_A} needs re-install" in alert.group(1) and "invalid_grant" in alert.group(1)
    assert "install the local application again from the portal" in alert.group(1)
    assert html.index('role="alert"') < html.index('id="dead-jobs"')  # above everything else
    assert html.count('role="alert"') == 1  # the installed portal and the webhook portal need nothing
    portals = html[html.index('id="portals"') : html.index('id="hooks"')]
    for name in (WEBHOOK_PORTAL, PORTAL_A, PORTAL_B):
        assert name in portals
    assert "local application" in portals and "webhook" in portals and "installed" in portals
    assert inbound_token_of(db, PORTAL_B) in portals  # an installed portal's token is shown to the admin
    assert WEBHOOK_PORTAL_TOKEN not in html and "set in B24SCRIBE_BITRIX24_PORTALS" in portals  # settings stay
    assert f"{PUBLIC_URL}/b24/install" in html
    assert_secret_free(html, scene)


def test_the_status_page_has_no_portal_alert_when_every_portal_works(client: FlaskClient) -> None:
    html = client.get("/status/", headers=admin()).get_data(as_text=True)

    assert 'role="alert"' not in html
    portals = html[html.index('id="portals"') : html.index('id="hooks"')]
    assert "configured" in portals and "none: the global token opens it" in portals


# -- /readyz and /metrics ------------------------------------------------------------------------


def test_readyz_details_name_each_portals_state_and_readiness_does_not_depend_on_them(scene: Scene) -> None:
    worker_of(scene.service).housekeeping()  # a fresh heartbeat: ready

    answer = scene.http.get("/readyz")

    assert answer.status_code == 200 and answer.json is not None and answer.json["status"] == "ok"
    assert answer.json["portals"] == {
        WEBHOOK_PORTAL: "configured",
        PORTAL_A: "needs_reinstall",
        PORTAL_B: "installed",
    }


def test_readyz_shows_portals_only_where_it_shows_details(
    mixed_settings: Settings, db: Database, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    service = create_app(mixed_settings.with_overrides(metrics_token="test-metrics-token-9a4f"))
    install(service.test_client(), fake_bitrix24, PORTAL_A, oauth_app)
    worker_of(service).housekeeping()

    bare = service.test_client().get("/readyz")
    detailed = service.test_client().get("/readyz", headers={"Authorization": "Bearer test-metrics-token-9a4f"})

    assert (bare.status_code, bare.json) == (200, {"status": "ok"})
    assert detailed.json is not None and detailed.json["portals"][PORTAL_A] == "installed"


def test_the_portal_state_metric_is_one_for_each_portals_state_and_zero_for_the_others(scene: Scene) -> None:
    body = scene.http.get("/metrics").get_data(as_text=True)

    series = dict(re.findall(r'^b24scribe_portal_state\{(portal="[^"]+",state="[^"]+")\} (\S+)$', body, re.M))
    assert series == {
        f'portal="{WEBHOOK_PORTAL}",state="configured"': "1.0",
        f'portal="{PORTAL_A}",state="installed"': "0.0",
        f'portal="{PORTAL_A}",state="needs_reinstall"': "1.0",
        f'portal="{PORTAL_A}",state="uninstalled"': "0.0",
        f'portal="{PORTAL_B}",state="installed"': "1.0",
        f'portal="{PORTAL_B}",state="needs_reinstall"': "0.0",
        f'portal="{PORTAL_B}",state="uninstalled"': "0.0",
    }


# -- flask check ---------------------------------------------------------------------------------


@pytest.fixture
def migrated_mixed(mixed_settings: Settings) -> Flask:
    """The mixed deployment on a database made by the migrations, as `flask check` expects it."""
    migrate.upgrade(mixed_settings.database_url)
    return create_app(mixed_settings)


def test_check_warns_when_no_portal_has_installed_the_application_yet_and_gives_the_install_url(
    migrated_mixed: Flask,
) -> None:
    result = cli(migrated_mixed, "check")

    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "no portal has installed it yet" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert f"{PUBLIC_URL}/b24/install" in warnings[0]


def test_check_names_each_installed_portal_that_needs_reinstall_or_was_uninstalled_and_what_to_do(
    migrated_mixed: Flask, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    scene = arrange(migrated_mixed, fake_bitrix24, oauth_app)
    assert scene.http.post("/b24/events", data=fake_bitrix24.uninstall_payload(scene.b)).status_code == 200

    result = cli(migrated_mixed, "check")

    assert result.exit_code == 1
    lines = result.output.splitlines()
    a_line = next(line for line in lines if f"portal {PORTAL_A}" in line)
    b_line = next(line for line in lines if f"portal {PORTAL_B}" in line)
    assert a_line.startswith(f"problem: portal {PORTAL_A} needs re-install (invalid_grant")
    assert "install the local application again from the portal" in a_line
    assert b_line.startswith(f"problem: portal {PORTAL_B} uninstalled the local application")
    assert f"portals remove {PORTAL_B} --yes" in b_line
    assert not any("no portal has installed it yet" in line for line in lines)
    assert_secret_free(result.output, scene)


def test_check_says_an_installed_portal_that_works_is_ok(
    migrated_mixed: Flask, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    install(migrated_mixed.test_client(), fake_bitrix24, PORTAL_B, oauth_app)

    result = cli(migrated_mixed, "check")

    assert result.exit_code == 0, result.output
    assert f"ok: portal {PORTAL_B}: the local application is installed" in result.output


def test_check_tells_a_webhook_portal_answering_wrong_auth_type_to_install_the_local_application(
    migrated_mixed: Flask, fake_bitrix24: FakeBitrix24
) -> None:
    fake_bitrix24.inject("scope", 403)  # Bitrix24's body for 403: WRONG_AUTH_TYPE

    result = cli(migrated_mixed, "check")

    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if WEBHOOK_PORTAL in line and line.startswith("problem")]
    assert lines == [
        f"problem: portal {WEBHOOK_PORTAL}: this method works only for a Bitrix24 application, not an incoming "
        "webhook: install b24scribe as a local application (README: Application mode)"
    ]

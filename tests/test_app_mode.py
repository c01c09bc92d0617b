"""Application mode end to end (contract §8): portals install the local application against the fake
Bitrix24's OAuth server; calls are registered, finished and transcribed with each portal's own
token; an expired token is refreshed once and the request replayed; a revoked refresh token holds
that portal only, until it is installed again; portals never meet."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app import create_app
from b24scribe.db import Database
from b24scribe.models import Job, Portal
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from fake_bitrix24 import App, Installation
from schemas.registry import SOURCES
from tests.conftest import ADMIN_TOKEN, INBOUND_TOKEN, admin, auth
from tests.fake_bitrix24 import FakeBitrix24

CLIENT_ID = "local.5f0a1b2c3d4e5f.12345678"
CLIENT_SECRET = "TopSecretClientSecret"
PORTAL_A = "portal-a.bitrix24.test"
PORTAL_B = "portal-b.bitrix24.test"
TRANSCRIPT = {
    "segments": [
        {"start": 0.5, "end": 2.2, "text": "Acme, good morning", "speaker": "A"},
        {"start": 2.5, "end": 4.9, "text": "Hi, it's about my order", "speaker": "B"},
    ]
}
# as the fake records them (lower case)
METHODS = ("telephony.externalcall.register", "telephony.externalcall.finish", "telephony.call.attachtranscription")


def finished(call_id: str, extension: str = "101") -> dict[str, Any]:
    return {
        "event": "call.finished",
        "call_id": call_id,
        "direction": "inbound",
        "from": "+15551234567",
        "to": "+15550000000",
        "extension": extension,
        "started_at": "2026-12-07T10:20:30+01:00",
        "duration": 42,
        "status": "answered",
    }


@pytest.fixture
def oauth_app(fake_bitrix24: FakeBitrix24) -> App:
    return fake_bitrix24.create_app(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)


@pytest.fixture
def app_settings(settings: Settings, fake_bitrix24: FakeBitrix24, oauth_app: App) -> Settings:
    return settings.with_overrides(
        bitrix24_webhook_url=None,
        bitrix24_portals={},
        bitrix24_client_id=CLIENT_ID,
        bitrix24_client_secret=CLIENT_SECRET,
        bitrix24_oauth_url=fake_bitrix24.oauth_url,
        retry_schedule=(0.0, 0.0, 0.0, 0.0),
    )


@pytest.fixture
def service(app_settings: Settings, db: Database) -> Flask:
    return create_app(app_settings)


@pytest.fixture
def http(service: Flask) -> FlaskClient:
    return service.test_client()


def worker_of(service: Flask) -> Worker:
    return Worker(service.extensions["b24scribe.db"], service.extensions["b24scribe.settings"], SOURCES)


def install(http: FlaskClient, fake: FakeBitrix24, domain: str, app: App) -> Installation:
    installation = fake.install(domain, app)
    answer = http.post("/b24/install", data=fake.install_payload(installation))
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.json == {
        "portal": domain,
        "member_id": installation.member_id,
        "state": "installed",
        "event": "ONAPPINSTALL",
    }
    return installation


def post_call(
    http: FlaskClient, call_id: str, portal: str | None = None, headers: dict[str, str] | None = None
) -> None:
    query = f"?portal={quote(portal)}" if portal else ""
    answer = http.post(f"/hooks/pbx/generic{query}", json=finished(call_id), headers=headers or auth())
    assert answer.status_code == 202, answer.get_data(as_text=True)
    separator = "&" if query else "?"
    url = f"/hooks/stt/generic{query}{separator}pbx=generic&call={quote(call_id)}"
    answer = http.post(url, json=TRANSCRIPT, headers=headers or auth())
    assert answer.status_code == 202, answer.get_data(as_text=True)


def sent(fake: FakeBitrix24, member_id: str | None = None) -> list[tuple[str, str | None]]:
    """(method, member_id) of the telephony requests the fake answered with success."""
    return [
        (r.method, r.member_id)
        for r in fake.requests
        if r.method in METHODS and r.status == 200 and (member_id is None or r.member_id == member_id)
    ]


def portal_token(db: Database, name: str) -> str:
    with db.read() as session:
        token = session.scalar(select(Portal.inbound_token).where(Portal.name == name))
    assert token
    return token


def test_an_installed_portal_gets_its_calls_registered_finished_and_transcribed_with_its_own_token(
    http: FlaskClient, service: Flask, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    installation = install(http, fake_bitrix24, PORTAL_A, oauth_app)
    post_call(http, "1700000000.1")  # the only portal: ?portal= may be left out
    worker_of(service).drain()

    assert sent(fake_bitrix24) == [(method, installation.member_id) for method in METHODS]
    used = {r.access_token for r in fake_bitrix24.requests if r.method in METHODS}
    assert used == {installation.access_token}
    answer = http.get("/v1/calls/generic/1700000000.1", headers=admin())
    assert answer.status_code == 200 and answer.json is not None
    assert answer.json["portal"] == PORTAL_A and answer.json["finished"]


def test_an_expired_token_is_refreshed_once_the_request_replayed_and_the_next_expiry_uses_the_rotated_token(
    http: FlaskClient, service: Flask, db: Database, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    installation = install(http, fake_bitrix24, PORTAL_A, oauth_app)
    first_refresh_token = installation.refresh_token
    fake_bitrix24.expire_access_token(PORTAL_A)
    post_call(http, "1700000000.2", portal=PORTAL_A)
    worker_of(service).drain()

    assert fake_bitrix24.refreshes(PORTAL_A) == 1
    assert [m for m, _ in sent(fake_bitrix24)] == list(METHODS)
    with db.read() as session:
        row = session.scalars(select(Portal).where(Portal.name == PORTAL_A)).one()
        stored_refresh, stored_access = row.refresh_token, row.access_token
    current = fake_bitrix24.installation(PORTAL_A)
    assert stored_refresh == current.refresh_token != first_refresh_token  # rotated, and kept
    assert stored_access == current.access_token

    fake_bitrix24.expire_access_token(PORTAL_A)
    post_call(http, "1700000000.3", portal=installation.member_id)  # a member_id names the portal too
    worker_of(service).drain()
    requests_ = fake_bitrix24.refresh_requests(PORTAL_A)
    assert len(requests_) == 2 and requests_[1].ok
    assert requests_[1].refresh_token == stored_refresh  # the rotated one, not the first
    assert len(sent(fake_bitrix24)) == 2 * len(METHODS)


def test_concurrent_expiries_in_three_workers_cause_one_refresh(
    http: FlaskClient, service: Flask, fake_bitrix24: FakeBitrix24, oauth_app: App, db: Database
) -> None:
    install(http, fake_bitrix24, PORTAL_A, oauth_app)
    for index in range(6):
        post_call(http, f"1700000001.{index}", portal=PORTAL_A)
    fake_bitrix24.expire_access_token(PORTAL_A)
    fake_bitrix24.set_latency(0.05)  # requests overlap across the workers
    workers = [worker_of(service) for _ in range(3)]
    threads = [threading.Thread(target=worker.drain) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    worker_of(service).drain()

    assert fake_bitrix24.refreshes(PORTAL_A) == 1
    assert len(sent(fake_bitrix24)) == 6 * len(METHODS)
    expired = sum(1 for r in fake_bitrix24.requests if r.status == 401)
    assert expired >= 2  # several requests met the expired token at once: still one refresh
    with db.read() as session:
        assert session.scalar(select(Portal.refreshes).where(Portal.name == PORTAL_A)) == 1


def test_three_worker_processes_expiring_at_once_cause_one_refresh(
    http: FlaskClient, app_settings: Settings, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    install(http, fake_bitrix24, PORTAL_A, oauth_app)
    calls = 12
    for index in range(calls):
        post_call(http, f"1700000009.{index}", portal=PORTAL_A)
    fake_bitrix24.expire_access_token(PORTAL_A)
    fake_bitrix24.set_latency(0.05)
    env = {
        **os.environ,
        "B24SCRIBE_DATABASE_URL": app_settings.database_url,
        "B24SCRIBE_BITRIX24_CLIENT_ID": CLIENT_ID,
        "B24SCRIBE_BITRIX24_CLIENT_SECRET": CLIENT_SECRET,
        "B24SCRIBE_BITRIX24_OAUTH_URL": fake_bitrix24.oauth_url,
        "B24SCRIBE_INBOUND_TOKEN": INBOUND_TOKEN,
        "B24SCRIBE_ADMIN_TOKEN": ADMIN_TOKEN,
        "B24SCRIBE_RATE_PER_SECOND": "1000",
        "B24SCRIBE_RATE_BURST": "1000",
        "B24SCRIBE_WORKER_POLL_SECONDS": "0.05",
    }
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "flask", "--app", "app", "worker"]
    workers = [
        subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(3)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(sent(fake_bitrix24)) < calls * len(METHODS) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(timeout=10)
    assert len(sent(fake_bitrix24)) == calls * len(METHODS)
    assert fake_bitrix24.refreshes(PORTAL_A) == 1
    expired = sum(1 for r in fake_bitrix24.requests if r.status == 401)
    assert expired >= 2  # several requests met the expired token at once: still one refresh
    assert len(fake_bitrix24.refresh_requests(PORTAL_A)) == 1


def test_a_revoked_refresh_token_holds_that_portal_only_until_it_is_installed_again(
    http: FlaskClient, service: Flask, db: Database, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    install(http, fake_bitrix24, PORTAL_A, oauth_app)
    b = install(http, fake_bitrix24, PORTAL_B, oauth_app)
    fake_bitrix24.expire_access_token(PORTAL_A)
    fake_bitrix24.revoke_refresh_token(PORTAL_A)
    post_call(http, "1700000002.1", portal=PORTAL_A)
    post_call(http, "1700000002.1", portal=PORTAL_B)  # the same PBX call id: another call
    worker = worker_of(service)
    worker.drain()
    worker.drain()  # again: the portal's jobs are not retried in a loop

    assert sent(fake_bitrix24) == [(method, b.member_id) for method in METHODS]
    assert fake_bitrix24.refreshes(PORTAL_A) == 0 and len(fake_bitrix24.refresh_requests(PORTAL_A)) == 1
    with db.read() as session:
        assert session.scalar(select(Portal.state).where(Portal.name == PORTAL_A)) == "needs_reinstall"
        jobs = session.scalars(select(Job).where(Job.portal == PORTAL_A, Job.kind != "apply")).all()
        assert jobs and all(job.state in ("pending", "waiting") and job.attempts == 0 for job in jobs)

    a = install(http, fake_bitrix24, PORTAL_A, oauth_app)  # the same application_token: accepted
    worker.drain()
    assert [m for m, member in sent(fake_bitrix24) if member == a.member_id] == list(METHODS)


def test_the_same_call_id_on_two_portals_makes_two_calls(
    http: FlaskClient, service: Flask, db: Database, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    a = install(http, fake_bitrix24, PORTAL_A, oauth_app)
    b = install(http, fake_bitrix24, PORTAL_B, oauth_app)
    post_call(http, "1700000003.1", portal=PORTAL_A)
    post_call(http, "1700000003.1", portal=b.member_id)
    worker_of(service).drain()

    assert len(sent(fake_bitrix24, a.member_id)) == len(sent(fake_bitrix24, b.member_id)) == len(METHODS)
    assert len(fake_bitrix24.attachments_by_call(PORTAL_A)) == len(fake_bitrix24.attachments_by_call(PORTAL_B)) == 1
    several = http.get("/v1/calls/generic/1700000003.1", headers=admin())
    assert several.status_code == 409  # two portals have it: name the portal
    one = http.get(f"/v1/calls/generic/1700000003.1?portal={PORTAL_B}", headers=admin())
    assert one.status_code == 200 and one.json is not None and one.json["portal"] == PORTAL_B
    by_member = http.get(f"/v1/calls/generic/1700000003.1?portal={a.member_id}", headers=admin())
    assert by_member.status_code == 200 and by_member.json is not None and by_member.json["portal"] == PORTAL_A


def test_a_portal_token_opens_its_own_portal_only_and_selects_it(
    http: FlaskClient, service: Flask, db: Database, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    install(http, fake_bitrix24, PORTAL_A, oauth_app)
    b = install(http, fake_bitrix24, PORTAL_B, oauth_app)
    token_b = {"Authorization": f"Bearer {portal_token(db, PORTAL_B)}"}

    to_a = http.post(f"/hooks/pbx/generic?portal={PORTAL_A}", json=finished("1700000004.1"), headers=token_b)
    assert to_a.status_code == 403 and to_a.json is not None and to_a.json["error"]["code"] == "wrong_portal"
    without = http.post("/hooks/pbx/generic", json=finished("1700000004.1"), headers=auth())
    assert without.status_code == 422 and "portal" in (without.json or {})["error"]["fields"]

    post_call(http, "1700000004.1", headers=token_b)  # no ?portal=: the token names it
    worker_of(service).drain()
    assert sent(fake_bitrix24) == [(method, b.member_id) for method in METHODS]
    with db.read() as session:
        assert session.scalar(select(Job.id).where(Job.portal == PORTAL_A)) is None


def test_an_uninstall_with_a_wrong_application_token_is_refused_and_a_right_one_holds_the_portal(
    http: FlaskClient, service: Flask, db: Database, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    installation = install(http, fake_bitrix24, PORTAL_A, oauth_app)
    payload = fake_bitrix24.uninstall_payload(installation)
    forged = http.post("/b24/events", data=payload | {"auth[application_token]": "x" * 32})
    assert forged.status_code == 403
    with db.read() as session:
        assert session.scalar(select(Portal.state).where(Portal.name == PORTAL_A)) == "installed"

    done = http.post("/b24/events", data=payload)
    assert done.status_code == 200 and done.json is not None and done.json["state"] == "uninstalled"
    post_call(http, "1700000005.1", portal=PORTAL_A)  # still accepted and stored: it waits
    worker_of(service).drain()
    assert sent(fake_bitrix24) == []
    with db.read() as session:
        row = session.scalars(select(Portal).where(Portal.name == PORTAL_A)).one()
        assert (row.access_token, row.refresh_token) == (None, None)

    install(http, fake_bitrix24, PORTAL_A, oauth_app)
    worker_of(service).drain()
    assert len(sent(fake_bitrix24)) == len(METHODS)


def test_an_install_is_verified_with_the_portal_and_a_reinstall_needs_the_same_application_token(
    http: FlaskClient, fake_bitrix24: FakeBitrix24, oauth_app: App, db: Database
) -> None:
    installation = fake_bitrix24.install(PORTAL_A, oauth_app)
    payload = fake_bitrix24.install_payload(installation)
    forged = http.post("/b24/install", data=payload | {"auth[access_token]": "nope"})
    assert forged.status_code == 403
    other_app = fake_bitrix24.create_app(client_id="local.other.1", client_secret="OtherSecret")
    foreign = fake_bitrix24.install(PORTAL_B, other_app)
    assert http.post("/b24/install", data=fake_bitrix24.install_payload(foreign)).status_code == 403
    missing = http.post("/b24/install", data={"event": "ONAPPINSTALL", "auth[domain]": PORTAL_A})
    assert missing.status_code == 422 and "auth[member_id]" in (missing.json or {})["error"]["fields"]
    with db.read() as session:
        assert session.scalar(select(Portal.id)) is None

    install(http, fake_bitrix24, PORTAL_A, oauth_app)
    again = fake_bitrix24.install(PORTAL_A, oauth_app, application_token="f" * 32)
    refused = http.post("/b24/install", data=fake_bitrix24.install_payload(again))
    assert refused.status_code == 403


def test_a_wrong_client_secret_never_marks_the_portal_and_its_jobs_retry(
    http: FlaskClient, app_settings: Settings, db: Database, fake_bitrix24: FakeBitrix24, oauth_app: App
) -> None:
    good = create_app(app_settings).test_client()
    install(good, fake_bitrix24, PORTAL_A, oauth_app)
    wrong = create_app(app_settings.with_overrides(bitrix24_client_secret="WrongSecret"))
    fake_bitrix24.expire_access_token(PORTAL_A)
    post_call(good, "1700000006.1", portal=PORTAL_A)
    worker_of(wrong).drain()

    with db.read() as session:
        assert session.scalar(select(Portal.state).where(Portal.name == PORTAL_A)) == "installed"
        errors = session.scalars(select(Job.last_error).where(Job.portal == PORTAL_A, Job.kind == "register")).all()
    assert errors and "invalid_client" in (errors[0] or "")


def test_webhook_portals_with_their_own_tokens_open_only_themselves(
    settings: Settings, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    alpha_url = fake_bitrix24.add_webhook(portal="alpha.bitrix24.test")
    beta_url = fake_bitrix24.add_webhook(portal="beta.bitrix24.test")
    tokens = {"alpha": "alpha-portal-token-0123", "beta": "beta-portal-token-01234"}
    service = create_app(
        settings.with_overrides(
            bitrix24_webhook_url=None, bitrix24_portals={"alpha": alpha_url, "beta": beta_url}, portal_tokens=tokens
        )
    )
    http = service.test_client()
    as_beta = {"Authorization": f"Bearer {tokens['beta']}"}
    refused = http.post("/hooks/pbx/generic?portal=alpha", json=finished("1700000007.1"), headers=as_beta)
    assert refused.status_code == 403
    post_call(http, "1700000007.1", headers=as_beta)
    post_call(http, "1700000007.2")  # the global token, no ?portal=: the first portal
    worker_of(service).drain()

    portals = {(r.method, r.portal) for r in fake_bitrix24.requests if r.method in METHODS and r.status == 200}
    assert portals == {(m, "beta.bitrix24.test") for m in METHODS} | {(m, "alpha.bitrix24.test") for m in METHODS}


def test_wrong_auth_type_from_a_webhook_says_in_one_line_to_install_the_local_application(
    client: FlaskClient, worker: Worker, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    fake_bitrix24.configure(deny_webhook_app_methods=True)
    answer = client.post("/hooks/pbx/generic", json=finished("1700000008.1"), headers=auth())
    assert answer.status_code == 202
    worker.drain()

    call = client.get("/v1/calls/generic/1700000008.1", headers=admin()).json
    assert call is not None
    error = call["last_error"]
    assert error.startswith("WRONG_AUTH_TYPE:") and "install b24scribe as a local application" in error
    assert "\n" not in error


@pytest.mark.parametrize(
    "endpoint",
    ["http://intranet.example/rest/", "https://portal.example/admin/", "file:///etc/passwd#/rest/", "ftp://x/rest/"],
)
def test_an_install_naming_a_client_endpoint_that_is_not_a_portals_https_rest_url_is_refused_unsent(
    http: FlaskClient, fake_bitrix24: FakeBitrix24, oauth_app: App, db: Database, endpoint: str
) -> None:
    installation = fake_bitrix24.install(PORTAL_A, oauth_app)
    answer = http.post(
        "/b24/install", data=fake_bitrix24.install_payload(installation) | {"auth[client_endpoint]": endpoint}
    )
    assert answer.status_code == 422 and "auth[client_endpoint]" in (answer.json or {})["error"]["fields"]
    assert not fake_bitrix24.calls_to("app.info")
    with db.read() as session:
        assert session.scalar(select(Portal.id)) is None


@pytest.mark.parametrize(
    "form",
    [
        {"event": "ONAPPUNINSTALL", "auth[member_id]": "a\x00b", "auth[application_token]": "x"},
        {"event": "ONAPPUNINSTALL", "auth[member_id]": "m" * 5000, "auth[application_token]": "x"},
        {"event": "ONAPPUNINSTALL"},
    ],
    ids=["nul", "long", "empty"],
)
def test_a_hostile_event_is_refused_with_a_403_never_a_5xx(http: FlaskClient, form: dict[str, str]) -> None:
    assert http.post("/b24/events", data=form).status_code == 403


def test_a_form_that_is_not_utf8_or_too_big_is_refused_unread(http: FlaskClient) -> None:
    raw = b"event=ONAPPINSTALL&auth%5Bdomain%5D=\xff\xfe"
    bad = http.post("/b24/install", data=raw, content_type="application/x-www-form-urlencoded")
    assert bad.status_code == 400
    big = http.post("/b24/events", data=b"a=" + b"x" * 20_000, content_type="application/x-www-form-urlencoded")
    assert big.status_code == 413

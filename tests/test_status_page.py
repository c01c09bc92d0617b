"""The status page: an admin signs in, sees what failed and why, opens a call, and retries a dead job."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app import create_app
from b24scribe import folding
from b24scribe.db import Database
from b24scribe.models import Call, InboundEvent, Job
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from handlers.status_page import SignInThrottle
from schemas.registry import SOURCES
from tests.conftest import ADMIN_TOKEN, INBOUND_TOKEN, admin, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.operations import (
    CALL_ID,
    FINISHED,
    SENTENCE,
    make_dead_attach,
    post_call,
    post_transcript,
    running_stack,
)

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "status-page.png"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def sign_in(client: FlaskClient, token: str = ADMIN_TOKEN) -> None:
    response = client.post("/status/login", data={"token": token})
    assert response.status_code == 302, response.get_data(as_text=True)


def csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert match is not None
    return match.group(1)


def test_the_page_is_disabled_without_an_admin_token(settings: Settings, db: Database) -> None:
    client = create_app(settings.with_overrides(admin_token=None)).test_client()

    response = client.get("/status/")

    assert response.status_code == 403
    assert "B24SCRIBE_ADMIN_TOKEN" in response.get_data(as_text=True)


def test_a_visitor_is_sent_to_the_sign_in_form(client: FlaskClient) -> None:
    response = client.get("/status/")

    assert response.status_code == 302
    assert response.headers["Location"].endswith("/status/login")
    form = client.get("/status/login").get_data(as_text=True)
    assert 'method="post"' in form and 'type="password"' in form


def test_a_wrong_token_is_refused(client: FlaskClient) -> None:
    response = client.post("/status/login", data={"token": INBOUND_TOKEN})

    assert response.status_code == 401
    assert "Set-Cookie" not in response.headers
    assert INBOUND_TOKEN not in response.get_data(as_text=True)


def test_signing_in_sets_a_signed_expiring_httponly_session_for_the_status_pages_only(client: FlaskClient) -> None:
    response = client.post("/status/login", data={"token": ADMIN_TOKEN})

    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("b24scribe_admin=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/status" in cookie
    assert f"Max-Age={12 * 3600}" in cookie and "Expires=" in cookie
    assert ADMIN_TOKEN not in cookie  # a signed session, never the admin token itself
    assert "Secure" not in cookie  # plain http and no https B24SCRIBE_PUBLIC_URL: a browser would drop it
    assert client.get("/status/").status_code == 200
    assert client.get("/v1/jobs").status_code == 401  # the cookie is no key to the JSON API


def _session_cookie(response: TestResponse) -> str:
    return response.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]


def test_the_session_cookie_is_secure_behind_a_tls_proxy(settings: Settings, db: Database) -> None:
    behind_proxy = create_app(settings.with_overrides(public_url="https://b24scribe.example.com")).test_client()
    direct_tls = create_app(settings).test_client()

    proxied = behind_proxy.post("/status/login", data={"token": ADMIN_TOKEN})
    over_https = direct_tls.post("/status/login", data={"token": ADMIN_TOKEN}, base_url="https://localhost")
    spoofed = direct_tls.post("/status/login", data={"token": ADMIN_TOKEN}, headers={"X-Forwarded-Proto": "https"})

    assert "; Secure" in proxied.headers["Set-Cookie"]
    assert "; Secure" in over_https.headers["Set-Cookie"]
    assert "Secure" not in spoofed.headers["Set-Cookie"]  # X-Forwarded-Proto is not trusted


def test_a_forged_expired_or_old_token_session_is_refused(
    client: FlaskClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = _session_cookie(client.post("/status/login", data={"token": ADMIN_TOKEN}))
    assert client.get("/status/").status_code == 200

    for forged in (ADMIN_TOKEN, value[:-2] + ("AA" if not value.endswith("AA") else "BB"), "", "x" * 3000):
        client.set_cookie("b24scribe_admin", forged, path="/status")
        assert client.get("/status/").status_code == 302, forged

    client.set_cookie("b24scribe_admin", value, path="/status")
    later = time.time() + 12 * 3600 + 5
    monkeypatch.setattr("itsdangerous.timed.time.time", lambda: later)
    assert client.get("/status/").status_code == 302  # expired after 12 h
    monkeypatch.undo()
    assert client.get("/status/").status_code == 200

    rotated = create_app(settings.with_overrides(admin_token="a-new-admin-token-5d1e")).test_client()
    rotated.set_cookie("b24scribe_admin", value, path="/status")
    assert rotated.get("/status/").status_code == 302  # a new admin token ends every session


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_failed_sign_ins_are_slowed_down_per_address(app: Flask) -> None:
    fake = FakeTime()
    app.extensions["b24scribe.sign_in_throttle"] = SignInThrottle(clock=fake.clock, sleep=fake.sleep)
    client = app.test_client()
    other = app.test_client()

    answers = [client.post("/status/login", data={"token": f"guess-{n}"}).status_code for n in range(3)]
    assert answers == [401, 401, 401]
    assert fake.slept == [1.0, 2.0, 2.0]  # each failed answer waits longer (capped at 2 s)

    # 4 s must pass after the third failure: until then even the right token is not looked at
    refused = client.post("/status/login", data={"token": ADMIN_TOKEN})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "Too many failed sign-ins" in refused.get_data(as_text=True)
    other_address = other.post("/status/login", data={"token": ADMIN_TOKEN}, environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert other_address.status_code == 302  # another address is not slowed

    fake.now += 4.0
    assert client.post("/status/login", data={"token": ADMIN_TOKEN}).status_code == 302
    assert client.post("/status/login", data={"token": "guess-again"}).status_code == 401
    assert fake.slept[-1] == 1.0  # a success forgot the failures


def test_the_throttle_forgets_old_addresses_first_and_stays_bounded() -> None:
    fake = FakeTime()
    throttle = SignInThrottle(clock=fake.clock, sleep=lambda _seconds: None)
    throttle.MAX_ADDRESSES = 3
    for address in ("a", "b", "c", "d"):
        throttle.failed(address)
        throttle.failed(address)

    assert throttle.wait_left("a") == 0.0  # forgotten: the least recently failing
    assert throttle.wait_left("d") > 0.0
    fake.now += SignInThrottle.FORGET_AFTER + 1
    assert throttle.wait_left("d") == 0.0


def test_a_slowed_sign_in_does_not_hold_up_other_requests(live_url: str) -> None:
    def failing_sign_in() -> None:
        requests.post(f"{live_url}/status/login", data={"token": "wrong"}, timeout=10)

    first = threading.Thread(target=failing_sign_in)
    first.start()
    time.sleep(0.1)
    started = time.monotonic()
    answer = requests.get(f"{live_url}/livez", timeout=10)
    took = time.monotonic() - started
    first.join()

    assert answer.status_code == 200
    assert took < 0.5  # the failed sign-in waits 1 s; nothing else does


def test_under_gevent_a_slowed_sign_in_holds_up_no_other_request(tmp_path: Path, database_url: str) -> None:
    environ = {"B24SCRIBE_DATABASE_URL": database_url, "B24SCRIBE_ADMIN_TOKEN": ADMIN_TOKEN}
    with running_stack(tmp_path, environ, web_workers=1) as stack:  # one gevent process serves everything
        failing = threading.Thread(
            target=lambda: requests.post(f"{stack.url}/status/login", data={"token": "wrong"}, timeout=10)
        )
        failing.start()
        time.sleep(0.2)
        started = time.monotonic()
        answer = requests.get(f"{stack.url}/livez", timeout=10)
        took = time.monotonic() - started
        failing.join()

    assert answer.status_code == 200
    assert took < 0.5  # the failed sign-in sleeps 1 s in the same process: gevent's sleep yields


HOSTILE = "lone \ud800 surrogate, NUL \x00, bell \x07 and \u202e"


def _store_hostile_content(db: Database) -> tuple[int, int]:
    """A rejected event and a call holding what a hostile sender can get stored (as far as the database lets)."""
    # JSON columns can hold a lone surrogate (escaped); text columns a NUL on SQLite, neither on PostgreSQL
    text = HOSTILE if db.is_sqlite else "bell \x07 and \u202e"
    column_text = "NUL \x00, bell \x07" if db.is_sqlite else "bell \x07 and \u202e"
    now = time.time()
    with db.write() as session:
        call = Call(portal="acme", pbx="generic", pbx_call_id=column_text, created_at=now, updated_at=now)
        call.last_error = column_text
        session.add(call)
        session.flush()
        event = InboundEvent(
            source="pbx",
            provider="generic",
            dedupe_key=f"hostile:{now}",
            received_at=now,
            content_type="application/json",
            query={"portal": text},
            body=b'\xff\xfe{"call_id": "\xed\xa0\x80"}',
            state="rejected",
            error={"message": text, "fields": {text: [f"Unknown field {text}"]}},
            call_id=call.id,
        )
        session.add(event)
        session.flush()
        return call.id, event.id


def test_any_stored_content_renders_safely(client: FlaskClient, db: Database) -> None:
    call_id, event_id = _store_hostile_content(db)
    sign_in(client)

    for url in ("/status/", f"/status/calls/{call_id}"):
        response = client.get(url)
        html = response.get_data(as_text=True)
        assert response.status_code == 200, url
        assert "\x00" not in html and "\x07" not in html
        assert "\ufffd" in html
    assert f"replay-{event_id}" in client.get("/status/").get_data(as_text=True)


@pytest.mark.parametrize("bad_id", [str(2**63), str(2**64 + 5), "99999999999999999999999999", "-1", "abc", "1.5"])
def test_an_id_no_row_can_have_is_a_404(client: FlaskClient, bad_id: str) -> None:
    sign_in(client)
    token = csrf(client.get("/status/").get_data(as_text=True))

    assert client.get(f"/status/calls/{bad_id}").status_code == 404
    assert client.post(f"/status/jobs/{bad_id}/retry", data={"csrf_token": token}).status_code == 404
    assert client.post(f"/status/events/{bad_id}/replay", data={"csrf_token": token}).status_code == 404
    assert client.get(f"/status/calls/{2**63 - 1}").status_code == 404  # the largest id: looked up, not there


def test_the_bearer_header_works_too(client: FlaskClient) -> None:
    assert client.get("/status/", headers=admin()).status_code == 200


def test_signing_out_forgets_the_cookie(client: FlaskClient) -> None:
    sign_in(client)
    token = csrf(client.get("/status/").get_data(as_text=True))

    client.post("/status/logout", data={"csrf_token": token})

    assert client.get("/status/").status_code == 302


def test_the_overview_shows_what_failed_and_why(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    make_dead_attach(client, worker, fake_bitrix24)
    post_call(client, "waiting-call", event="call.started")
    post_transcript(client, "waiting-call")
    client.post("/hooks/pbx/generic", json={**FINISHED, "status": "voicemail"}, headers=auth())
    worker.drain()  # the worker folds the stored events into their calls
    sign_in(client)

    html = client.get("/status/").get_data(as_text=True)

    assert "Transcription is too long for this portal" in html  # the dead job's reason
    assert "waiting for the PBX to report the call" in html  # a transcript waiting, and why
    assert "status: Must be one of" in html  # a rejected event, and why
    assert CALL_ID in html and "externalCall." in html  # the call with its Bitrix24 CALL_ID
    assert SENTENCE not in html  # transcript text stays out of the page


def test_the_overview_lists_each_sources_url_to_paste_from_the_registry(client: FlaskClient) -> None:
    sign_in(client)
    html = client.get("/status/").get_data(as_text=True)

    for source in SOURCES:
        assert f"http://localhost/hooks/{source.kind}/{source.name}" in html
    assert "standard-webhooks (set)" in html  # the generic hooks' signature, its secret set in the tests
    assert INBOUND_TOKEN not in html  # the credential itself is never shown


def test_retry_needs_the_csrf_token(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, db: Database
) -> None:
    make_dead_attach(client, worker, fake_bitrix24)
    sign_in(client)
    with db.read() as session:
        dead = session.query(Job).filter(Job.state == "dead").one()

    forged = client.post(f"/status/jobs/{dead.id}/retry", data={"csrf_token": "0" * 64})
    non_ascii = client.post(f"/status/jobs/{dead.id}/retry", data={"csrf_token": "é" * 64})  # was a 500
    with db.read() as session:
        assert session.get_one(Job, dead.id).state == "dead"
    real = client.post(
        f"/status/jobs/{dead.id}/retry",
        data={"csrf_token": csrf(client.get("/status/").get_data(as_text=True)), "next": "https://evil.example/"},
    )

    assert forged.status_code == 403 and non_ascii.status_code == 403
    assert real.status_code == 303
    assert real.headers["Location"] == f"/status/?notice=retried&id={dead.id}"  # never off-site
    with db.read() as session:
        assert session.get_one(Job, dead.id).state == "pending"
    assert f"Job {dead.id} is queued again." in client.get(real.headers["Location"]).get_data(as_text=True)


def test_a_rejected_event_can_be_replayed_from_the_page(client: FlaskClient) -> None:
    response = client.post("/hooks/pbx/generic?portal=acme", json=FINISHED, headers=auth())
    event_id = response.get_json()["error"]["fields"]["event_id"]
    sign_in(client)
    token = csrf(client.get("/status/").get_data(as_text=True))

    replayed = client.post(f"/status/events/{event_id}/replay", data={"csrf_token": token})

    assert replayed.status_code == 303
    page = client.get(replayed.headers["Location"]).get_data(as_text=True)
    assert f"Event {event_id} is still rejected" in page


def test_the_page_loads_nothing_from_elsewhere_and_runs_no_script(client: FlaskClient, worker: Worker) -> None:
    post_call(client)
    worker.drain()
    sign_in(client)

    for url in ("/status/", "/status/calls/1", "/status/login"):
        response = client.get(url)
        html = response.get_data(as_text=True)
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src" not in policy
        assert re.search(r"<style nonce=\"[^\"]+\">", html)
        assert "<script" not in html
        assert not re.search(r"(src|href)=\"(https?:)?//", html), url
        assert response.headers["X-Frame-Options"] == "DENY"


def test_a_call_page_shows_its_jobs_and_an_unknown_call_is_a_404(client: FlaskClient, worker: Worker) -> None:
    post_call(client)
    worker.drain()
    sign_in(client)

    html = client.get("/status/calls/1").get_data(as_text=True)

    assert "telephony" not in html or "CALL_ID" in html
    assert html.count('class="pill s-done"') == 2  # register and finish
    assert client.get("/status/calls/999").status_code == 404


# -- in a real browser ------------------------------------------------------------------------------


def _browser_skip_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not os.path.exists(CHROMIUM) or not os.path.exists(CHROMEDRIVER):
        return f"Debian's chromium and chromium-driver are not installed ({CHROMIUM}, chromedriver)"
    return None


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    reason = _browser_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="b24scribe-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_an_admin_signs_in_opens_a_call_and_retries_its_dead_job(
    browser: WebDriver,
    live_url: str,
    client: FlaskClient,
    worker: Worker,
    fake_bitrix24: FakeBitrix24,
    db: Database,
    database_url: str,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as arrived
    from selenium.webdriver.support.wait import WebDriverWait

    def wait_for(condition: object) -> None:
        WebDriverWait(browser, 15).until(condition)  # type: ignore[arg-type]

    make_dead_attach(client, worker, fake_bitrix24)
    post_call(client, "1700000042.7", event="call.started", extension="102")
    post_transcript(client, "1700000042.7")
    client.post("/hooks/pbx/generic", json={**FINISHED, "call_id": "x", "status": "voicemail"}, headers=auth())
    folding.apply_pending(db, worker.settings, SOURCES)  # folded into their calls, not delivered yet
    with db.read() as session:
        dead = session.query(Job).filter(Job.state == "dead").one()

    browser.get(f"{live_url}/status/")
    assert browser.current_url.endswith("/status/login")
    browser.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
    browser.find_element(By.ID, "sign-in").click()

    wait_for(arrived.url_to_be(f"{live_url}/status/"))
    wait_for(arrived.presence_of_element_located((By.ID, "job-counts")))
    assert "dead 1" in browser.find_element(By.ID, "job-counts").text
    page = browser.find_element(By.TAG_NAME, "main").text
    assert "Transcription is too long for this portal" in page
    assert "waiting for the PBX to report the call" in page
    cookie = browser.get_cookie("b24scribe_admin")
    assert cookie is not None and cookie["httpOnly"] is True and cookie["sameSite"] == "Lax"
    if "sqlite" in database_url:  # one picture is enough
        SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))

    browser.find_element(By.LINK_TEXT, f"call {dead.call_id}").click()
    wait_for(arrived.url_to_be(f"{live_url}/status/calls/{dead.call_id}"))
    b24_call_id = browser.find_element(By.ID, "b24-call-id").text
    assert b24_call_id.startswith("externalCall.")
    assert "dead" in browser.find_element(By.ID, f"job-{dead.id}").text

    browser.find_element(By.ID, f"retry-{dead.id}").click()

    wait_for(arrived.url_contains(f"/status/calls/{dead.call_id}?notice=retried"))
    wait_for(arrived.presence_of_element_located((By.ID, "notice")))
    assert browser.find_element(By.ID, "notice").text == f"Job {dead.id} is queued again."
    assert "pending" in browser.find_element(By.ID, f"job-{dead.id}").text
    worker.drain()
    browser.get(f"{live_url}/status/calls/{dead.call_id}")
    assert "done" in browser.find_element(By.ID, f"job-{dead.id}").text
    assert [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#call-transcripts .pill")] == ["delivered"]

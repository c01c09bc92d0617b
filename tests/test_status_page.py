"""The status page: an admin signs in, sees what failed and why, opens a call, and retries a dead job."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from flask.testing import FlaskClient

from app import create_app
from b24scribe import inbox
from b24scribe.db import Database
from b24scribe.models import Job
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from tests.conftest import ADMIN_TOKEN, INBOUND_TOKEN, admin, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.operations import CALL_ID, FINISHED, SENTENCE, make_dead_attach, post_call, post_transcript

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


def test_signing_in_sets_a_strict_httponly_cookie_for_the_status_pages_only(client: FlaskClient) -> None:
    response = client.post("/status/login", data={"token": ADMIN_TOKEN})

    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("b24scribe_admin=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/status" in cookie
    assert client.get("/status/").status_code == 200
    assert client.get("/v1/jobs").status_code == 401  # the cookie is no key to the JSON API


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


def test_retry_needs_the_csrf_token(
    client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, db: Database
) -> None:
    make_dead_attach(client, worker, fake_bitrix24)
    sign_in(client)
    with db.read() as session:
        dead = session.query(Job).filter(Job.state == "dead").one()

    forged = client.post(f"/status/jobs/{dead.id}/retry", data={"csrf_token": "0" * 64})
    with db.read() as session:
        assert session.get_one(Job, dead.id).state == "dead"
    real = client.post(
        f"/status/jobs/{dead.id}/retry",
        data={"csrf_token": csrf(client.get("/status/").get_data(as_text=True)), "next": "https://evil.example/"},
    )

    assert forged.status_code == 403
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
    inbox.apply_pending(db, worker.settings)  # folded into their calls, not delivered yet
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
    assert cookie is not None and cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
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

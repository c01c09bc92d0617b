"""The fake Bitrix24's application mode: installations, REST with OAuth tokens, the OAuth server."""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests

from fake_bitrix24 import ACCESS_TOKEN_TTL, OAUTH_DOMAIN, REFRESH_TOKEN_TTL, App, FakeBitrix24, Installation

pytest_plugins = ["tests.fake_bitrix24"]

TIMEOUT = 5.0
CLIENT_ID = "local.5f0a1b2c3d4e5f.12345678"
CLIENT_SECRET = "TopSecretClientSecret"
PORTAL_A = "portal-a.bitrix24.test"
PORTAL_B = "portal-b.bitrix24.test"

NO_AUTH = (401, "NO_AUTH_FOUND", "Wrong authorization data")
INVALID_TOKEN = (401, "invalid_token", "Unable to get application by token")
EXPIRED = (401, "expired_token", "The access token provided has expired")
NOT_INSTALLED = (401, "NOT_INSTALLED", "Application not installed")


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
def app(fake_bitrix24: FakeBitrix24) -> App:
    return fake_bitrix24.create_app(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)


@pytest.fixture
def portal_a(fake_bitrix24: FakeBitrix24, app: App) -> Installation:
    return fake_bitrix24.install(PORTAL_A, app)


def rest(
    installation: Installation, method: str, params: dict[str, Any] | None = None, token: str | None = None
) -> requests.Response:
    """POST JSON with the token as ``auth`` to the installation's client endpoint."""
    body = {"auth": installation.access_token if token is None else token, **(params or {})}
    return requests.post(f"{installation.client_endpoint}{method}.json", json=body, timeout=TIMEOUT)


def refresh(fake: FakeBitrix24, refresh_token: str, **overrides: str) -> requests.Response:
    params = {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": refresh_token,
        **overrides,
    }
    return requests.get(f"{fake.oauth_url}/oauth/token/", params=params, timeout=TIMEOUT)


def error_of(response: requests.Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"], body["error_description"]


def register(installation: Installation, token: str | None = None) -> requests.Response:
    params = {"USER_ID": 1, "PHONE_NUMBER": "+15551234567", "TYPE": 2, "EXTERNAL_CALL_ID": "pbx-1"}
    return rest(installation, "telephony.externalCall.register", params, token)


# --- installation --------------------------------------------------------------------------


def test_install_gives_an_installation_with_its_own_endpoint(
    fake_bitrix24: FakeBitrix24, portal_a: Installation
) -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", portal_a.member_id)
    assert portal_a.domain == PORTAL_A
    assert portal_a.client_id == CLIENT_ID
    assert portal_a.client_endpoint == f"{fake_bitrix24.base_url}/p/{portal_a.member_id}/rest/"
    assert portal_a.expires_in == ACCESS_TOKEN_TTL == 3600
    assert portal_a.scope == "telephony"
    assert portal_a.access_token and portal_a.refresh_token and portal_a.application_token
    assert abs(portal_a.expires - (fake_bitrix24.now() + 3600)) < 5
    assert fake_bitrix24.installation(portal_a.member_id) is portal_a
    assert fake_bitrix24.installation(PORTAL_A) is portal_a
    assert fake_bitrix24.oauth_url == fake_bitrix24.base_url


def test_install_payload_is_the_onappinstall_form(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    payload = fake_bitrix24.install_payload(portal_a)

    assert payload == {
        "event": "ONAPPINSTALL",
        "data[VERSION]": "1",
        "data[ACTIVE]": "Y",
        "data[INSTALLED]": "Y",
        "data[LANGUAGE_ID]": "en",
        "ts": payload["ts"],
        "auth[access_token]": portal_a.access_token,
        "auth[expires]": str(portal_a.expires),
        "auth[expires_in]": "3600",
        "auth[scope]": "telephony",
        "auth[domain]": PORTAL_A,
        "auth[server_endpoint]": f"{fake_bitrix24.oauth_url}/rest/",
        "auth[status]": "L",
        "auth[client_endpoint]": portal_a.client_endpoint,
        "auth[member_id]": portal_a.member_id,
        "auth[user_id]": "1",
        "auth[refresh_token]": portal_a.refresh_token,
        "auth[application_token]": portal_a.application_token,
    }
    assert payload["ts"].isdigit()


def test_uninstall_payload_carries_the_application_token_but_no_tokens(
    fake_bitrix24: FakeBitrix24, portal_a: Installation
) -> None:
    payload = fake_bitrix24.uninstall_payload(portal_a)

    assert payload["event"] == "ONAPPUNINSTALL"
    assert payload["auth[application_token]"] == portal_a.application_token
    assert payload["auth[member_id]"] == portal_a.member_id
    assert payload["auth[domain]"] == PORTAL_A
    assert payload["data[CLEAN]"] == "0"
    assert not any("token]" in key and key != "auth[application_token]" for key in payload)


def test_app_info_names_the_client_id(portal_a: Installation) -> None:
    response = rest(portal_a, "app.info")

    assert response.status_code == 200
    result = response.json()["result"]
    assert result["CODE"] == CLIENT_ID
    assert result["STATUS"] == "L"
    assert result["INSTALLED"] is True
    assert result["PAYMENT_EXPIRED"] == "N"
    assert result["DAYS"] is None
    assert set(result) >= {"ID", "CODE", "VERSION", "STATUS", "INSTALLED", "PAYMENT_EXPIRED", "DAYS", "LICENSE"}
    assert "time" in response.json()


# --- REST with a token ---------------------------------------------------------------------


def test_telephony_flow_with_a_token_lands_on_the_installed_portal(
    fake_bitrix24: FakeBitrix24, portal_a: Installation
) -> None:
    registered = register(portal_a)
    assert registered.status_code == 200, registered.text
    call_id = registered.json()["result"]["CALL_ID"]
    finished = rest(portal_a, "telephony.externalCall.finish", {"CALL_ID": call_id, "USER_ID": 1, "DURATION": 30})
    assert finished.status_code == 200, finished.text
    messages = [{"SIDE": "User", "START_TIME": 0, "STOP_TIME": 2, "MESSAGE": "Hello"}]
    attached = rest(portal_a, "telephony.call.attachTranscription", {"CALL_ID": call_id, "MESSAGES": messages})
    assert attached.status_code == 200, attached.text

    assert call_id in fake_bitrix24.portal_state(PORTAL_A).statistics
    assert fake_bitrix24.statistics == {}  # the default (webhook) portal saw nothing
    recorded = fake_bitrix24.calls_to("telephony.externalCall.register")[-1]
    assert recorded.portal == PORTAL_A
    assert recorded.member_id == portal_a.member_id
    assert recorded.access_token == portal_a.access_token
    assert recorded.client_id == CLIENT_ID
    assert (recorded.user_id, recorded.code) == (None, None)
    assert "auth" not in recorded.params


def test_token_is_accepted_in_query_form_body_and_bearer_header(portal_a: Installation) -> None:
    url = f"{portal_a.client_endpoint}scope.json"
    token = portal_a.access_token

    by_query = requests.get(url, params={"auth": token}, timeout=TIMEOUT)
    by_form = requests.post(url, data={"auth": token}, timeout=TIMEOUT)
    by_access_token = requests.post(url, data={"access_token": token}, timeout=TIMEOUT)
    by_header = requests.post(url, json={}, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT)

    for response in (by_query, by_form, by_access_token, by_header):
        assert response.status_code == 200, response.text
        assert response.json()["result"] == ["telephony"]


def test_missing_and_unknown_tokens(portal_a: Installation) -> None:
    no_token = requests.post(f"{portal_a.client_endpoint}scope.json", json={}, timeout=TIMEOUT)

    assert error_of(no_token) == NO_AUTH
    assert error_of(rest(portal_a, "scope", token="f" * 70)) == INVALID_TOKEN


def test_application_context_is_not_refused_register_and_finish(
    fake_bitrix24: FakeBitrix24, portal_a: Installation
) -> None:
    fake_bitrix24.configure(deny_webhook_app_methods=True)

    assert register(portal_a).status_code == 200
    webhook = requests.post(f"{fake_bitrix24.webhook_url}telephony.externalCall.register", json={}, timeout=TIMEOUT)
    assert error_of(webhook)[:2] == (403, "WRONG_AUTH_TYPE")


def test_token_without_the_scope_is_insufficient_scope(fake_bitrix24: FakeBitrix24) -> None:
    crm_only = fake_bitrix24.create_app(scopes=["crm"])
    installation = fake_bitrix24.install(PORTAL_A, crm_only)

    assert error_of(register(installation)) == (
        401,
        "insufficient_scope",
        "The request requires higher privileges than provided by the access token",
    )


def test_unknown_portal_endpoint_and_webhook_paths_under_it_are_404(
    fake_bitrix24: FakeBitrix24, portal_a: Installation
) -> None:
    unknown = requests.post(f"{fake_bitrix24.base_url}/p/{'0' * 32}/rest/scope.json", json={}, timeout=TIMEOUT)
    webhook_shaped = requests.post(f"{portal_a.client_endpoint}1/abc/scope.json", json={}, timeout=TIMEOUT)

    assert unknown.status_code == 404
    assert webhook_shaped.status_code == 404


def test_portal_limits_apply_to_application_calls(fake_bitrix24: FakeBitrix24, app: App) -> None:
    fake_bitrix24.set_rate_limit(burst=2, rate=0.001)
    a = fake_bitrix24.install(PORTAL_A, app)
    b = fake_bitrix24.install(PORTAL_B, app)

    statuses = [rest(a, "scope").status_code for _ in range(3)]

    assert statuses == [200, 200, 503]
    assert rest(b, "scope").status_code == 200


def test_injections_apply_to_application_calls(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    fake_bitrix24.inject("telephony.externalCall.register", 503)

    assert register(portal_a).status_code == 503
    assert register(portal_a).status_code == 200


# --- expiry and refresh --------------------------------------------------------------------


def test_expired_token_then_refresh_rotates_both_tokens(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    old_access, old_refresh = portal_a.access_token, portal_a.refresh_token
    fake_bitrix24.expire_access_token(portal_a.member_id)

    assert error_of(rest(portal_a, "scope")) == EXPIRED
    response = refresh(fake_bitrix24, old_refresh)

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "access_token",
        "expires",
        "expires_in",
        "scope",
        "domain",
        "server_endpoint",
        "status",
        "client_endpoint",
        "member_id",
        "user_id",
        "refresh_token",
    }
    assert body["domain"] == OAUTH_DOMAIN
    assert body["status"] == "L"
    assert body["scope"] == "telephony"
    assert body["expires_in"] == 3600
    assert body["client_endpoint"] == portal_a.client_endpoint
    assert body["member_id"] == portal_a.member_id
    assert body["user_id"] == 1
    assert body["server_endpoint"] == f"{fake_bitrix24.oauth_url}/rest/"
    assert body["access_token"] not in (old_access, "")
    assert body["refresh_token"] not in (old_refresh, "")
    assert isinstance(body["expires"], int)
    assert (portal_a.access_token, portal_a.refresh_token) == (body["access_token"], body["refresh_token"])

    assert rest(portal_a, "scope", token=body["access_token"]).status_code == 200
    assert error_of(rest(portal_a, "scope", token=old_access)) == EXPIRED
    assert refresh(fake_bitrix24, old_refresh).json() == {"error": "invalid_grant"}
    assert refresh(fake_bitrix24, old_refresh).status_code == 400
    assert fake_bitrix24.refreshes(portal_a.member_id) == 1
    assert fake_bitrix24.refreshes(PORTAL_A) == 1
    attempts = fake_bitrix24.refresh_requests(portal_a.member_id)
    assert [(item.refresh_token, item.status) for item in attempts] == [(old_refresh, 200)] + [(old_refresh, 400)] * 2


def test_a_replaced_access_token_can_answer_invalid_token(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    fake_bitrix24.configure(superseded_access_error="invalid_token")
    old_access = portal_a.access_token

    assert refresh(fake_bitrix24, portal_a.refresh_token).status_code == 200

    assert error_of(rest(portal_a, "scope", token=old_access)) == INVALID_TOKEN


def test_refresh_by_post_form(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    form = {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": portal_a.refresh_token,
    }

    response = requests.post(f"{fake_bitrix24.oauth_url}/oauth/token/", data=form, timeout=TIMEOUT)

    assert response.status_code == 200
    assert response.json()["access_token"] == portal_a.access_token
    assert fake_bitrix24.token_requests[-1].http_method == "POST"


def test_tokens_expire_with_the_fake_clock(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    fake_bitrix24.advance_clock(ACCESS_TOKEN_TTL - 60)
    assert rest(portal_a, "scope").status_code == 200

    fake_bitrix24.advance_clock(60)
    assert error_of(rest(portal_a, "scope")) == EXPIRED

    fake_bitrix24.advance_clock(REFRESH_TOKEN_TTL)
    assert refresh(fake_bitrix24, portal_a.refresh_token).json() == {"error": "invalid_grant"}


def test_refresh_without_rotation_keeps_the_refresh_token_usable(
    fake_bitrix24: FakeBitrix24, portal_a: Installation
) -> None:
    fake_bitrix24.configure(rotate_refresh_tokens=False)
    first = portal_a.refresh_token

    assert refresh(fake_bitrix24, first).status_code == 200
    assert refresh(fake_bitrix24, first).status_code == 200
    assert fake_bitrix24.refreshes(portal_a) == 2


def test_oauth_server_errors(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    token = portal_a.refresh_token

    wrong_secret = refresh(fake_bitrix24, token, client_secret="nope")
    wrong_client = refresh(fake_bitrix24, token, client_id="local.nope.1")
    no_refresh_token = refresh(fake_bitrix24, "")
    bad_grant = refresh(fake_bitrix24, token, grant_type="password")
    unknown = refresh(fake_bitrix24, "not-a-token")

    assert (wrong_secret.status_code, wrong_secret.json()) == (400, {"error": "invalid_client"})
    assert (wrong_client.status_code, wrong_client.json()) == (200, {"error": "wrong_client"})
    assert (no_refresh_token.status_code, no_refresh_token.json()) == (
        400,
        {"error": "invalid_request", "error_description": 'No "refresh_token" parameter found'},
    )
    assert (bad_grant.status_code, bad_grant.json()) == (400, {"error": "unsupported_grant_type"})
    assert (unknown.status_code, unknown.json()) == (400, {"error": "invalid_grant"})
    assert refresh(fake_bitrix24, token).status_code == 200  # none of the failures used the token
    assert fake_bitrix24.refreshes() == 1


def test_refresh_token_of_another_app_is_invalid_grant(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    other = fake_bitrix24.create_app()
    other_install = fake_bitrix24.install(PORTAL_B, other)

    response = refresh(fake_bitrix24, other_install.refresh_token)

    assert (response.status_code, response.json()) == (400, {"error": "invalid_grant"})


def test_revoked_refresh_token_is_invalid_grant(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    fake_bitrix24.revoke_refresh_token(portal_a.member_id)

    response = refresh(fake_bitrix24, portal_a.refresh_token)

    assert (response.status_code, response.json()) == (400, {"error": "invalid_grant"})
    assert rest(portal_a, "scope").status_code == 200  # the access token lives on until it expires
    assert fake_bitrix24.refreshes(portal_a.member_id) == 0


def test_authorization_code_grant_is_single_use(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    code = fake_bitrix24.authorization_code(portal_a.member_id)
    params = {"grant_type": "authorization_code", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "code": code}
    url = f"{fake_bitrix24.oauth_url}/oauth/token/"

    first = requests.get(url, params=params, timeout=TIMEOUT)
    second = requests.get(url, params=params, timeout=TIMEOUT)

    assert first.status_code == 200
    assert rest(portal_a, "scope", token=first.json()["access_token"]).status_code == 200
    assert (second.status_code, second.json()) == (400, {"error": "invalid_grant"})
    assert fake_bitrix24.refreshes(portal_a.member_id) == 0  # counts refresh_token grants only


def test_oauth_server_answers_can_be_injected(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    fake_bitrix24.inject("oauth.token", 503)
    fake_bitrix24.inject("*", 500)  # "*" is for REST methods only

    assert refresh(fake_bitrix24, portal_a.refresh_token).status_code == 503
    assert refresh(fake_bitrix24, portal_a.refresh_token).status_code == 200
    assert fake_bitrix24.refreshes(portal_a.member_id) == 1


# --- uninstall and reinstall ---------------------------------------------------------------


def test_uninstall_stops_tokens_and_refreshes(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    token, refresh_token = portal_a.access_token, portal_a.refresh_token

    payload = fake_bitrix24.uninstall(portal_a.member_id)

    assert payload["event"] == "ONAPPUNINSTALL"
    assert error_of(rest(portal_a, "scope", token=token)) == NOT_INSTALLED
    response = refresh(fake_bitrix24, refresh_token)
    assert (response.status_code, response.json()) == (400, {"error": "invalid_grant"})


def test_reinstall_issues_new_tokens_and_keeps_the_application_token(
    fake_bitrix24: FakeBitrix24, app: App, portal_a: Installation
) -> None:
    old_token, application_token = portal_a.access_token, portal_a.application_token
    fake_bitrix24.uninstall(portal_a)

    again = fake_bitrix24.install(PORTAL_A, app)

    assert again.member_id == portal_a.member_id
    assert again.application_token == application_token
    assert rest(again, "scope").status_code == 200
    assert error_of(rest(again, "scope", token=old_token)) == INVALID_TOKEN
    assert rest(again, "app.info").json()["result"]["INSTALLED"] is True


# --- portals never meet --------------------------------------------------------------------


def test_two_portals_are_isolated(fake_bitrix24: FakeBitrix24, app: App) -> None:
    a = fake_bitrix24.install(PORTAL_A, app)
    b = fake_bitrix24.install(PORTAL_B, app)
    assert a.member_id != b.member_id
    assert a.client_endpoint != b.client_endpoint

    assert error_of(rest(b, "scope", token=a.access_token)) == INVALID_TOKEN
    assert error_of(rest(a, "scope", token=b.access_token)) == INVALID_TOKEN
    assert register(a).status_code == 200
    assert register(b).status_code == 200
    fake_bitrix24.expire_access_token(a.member_id)
    assert error_of(rest(a, "scope")) == EXPIRED
    assert rest(b, "scope").status_code == 200

    assert len(fake_bitrix24.portal_state(PORTAL_A).active_calls) == 1
    assert len(fake_bitrix24.portal_state(PORTAL_B).active_calls) == 1
    assert refresh(fake_bitrix24, a.refresh_token).json()["member_id"] == a.member_id
    assert (fake_bitrix24.refreshes(a.member_id), fake_bitrix24.refreshes(b.member_id)) == (1, 0)


def test_plain_rest_path_belongs_to_the_host_portal(fake_bitrix24: FakeBitrix24, portal_a: Installation) -> None:
    url = f"{fake_bitrix24.base_url}/rest/scope.json"
    body = {"auth": portal_a.access_token}

    by_ip = requests.post(url, json=body, timeout=TIMEOUT)
    by_host = requests.post(url, json=body, headers={"Host": PORTAL_A}, timeout=TIMEOUT)

    assert error_of(by_ip) == INVALID_TOKEN  # 127.0.0.1 is not portal A
    assert by_host.status_code == 200


# --- out of process ------------------------------------------------------------------------


def test_control_endpoints_drive_application_mode(fake_bitrix24: FakeBitrix24) -> None:
    control = fake_bitrix24.control_url
    created = requests.post(
        control + "apps", json={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, timeout=TIMEOUT
    )
    assert created.json()["client_id"] == CLIENT_ID

    installed = requests.post(control + "install", json={"portal": PORTAL_A}, timeout=TIMEOUT).json()
    installation = installed["installation"]
    assert installed["payload"]["auth[access_token]"] == installation["access_token"]
    endpoint = installation["client_endpoint"]
    assert requests.post(endpoint + "scope.json", json={"auth": installation["access_token"]}, timeout=TIMEOUT).ok

    member = {"member_id": installation["member_id"]}
    assert requests.post(control + "expire_token", json=member, timeout=TIMEOUT).ok
    expired = requests.post(endpoint + "scope.json", json={"auth": installation["access_token"]}, timeout=TIMEOUT)
    assert error_of(expired) == EXPIRED
    assert refresh(fake_bitrix24, installation["refresh_token"]).status_code == 200
    state = requests.get(control + "state", timeout=TIMEOUT).json()
    assert state["installations"][f"{installation['member_id']}:{CLIENT_ID}"]["refreshes"] == 1
    assert requests.get(control + "token_requests", timeout=TIMEOUT).json()[0]["status"] == 200
    uninstalled = requests.post(control + "uninstall", json=member, timeout=TIMEOUT).json()
    assert uninstalled["payload"]["event"] == "ONAPPUNINSTALL"
    assert requests.get(control + "installations", timeout=TIMEOUT).json()[0]["installed"] is False


def test_with_statement_and_reset_keep_installations() -> None:
    with FakeBitrix24() as fake:
        installation = fake.install(PORTAL_A)  # creates an application when there is none
        assert refresh_with(fake, installation).status_code == 200
        fake.reset()
        assert fake.token_requests == []
        assert rest(installation, "scope").status_code == 200


def refresh_with(fake: FakeBitrix24, installation: Installation) -> requests.Response:
    app = installation.app
    params = {
        "grant_type": "refresh_token",
        "client_id": app.client_id,
        "client_secret": app.client_secret,
        "refresh_token": installation.refresh_token,
    }
    return requests.get(f"{fake.oauth_url}/oauth/token", params=params, timeout=TIMEOUT)

"""Application mode: installed applications, REST calls with OAuth tokens, and the OAuth server.

An application (``create_app``) is installed on portals (``install``); each installation has
its own REST endpoint ``/p/<member_id>/rest/`` on the fake and its own access and refresh
tokens. REST calls there carry the access token as ``auth`` (body or query), ``access_token``
or ``Authorization: Bearer``, and are answered by the same pipeline and methods as webhooks.
The OAuth server at ``/oauth/token/`` exchanges a refresh token (or an authorization code) for
new tokens and rotates them. Token errors are the ones Bitrix24 sends (see apps.py).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import TYPE_CHECKING, Any

from fake_bitrix24.apps import (
    ACCESS_TOKEN_TTL,
    AUTHORIZATION_CODE_TTL,
    DEFAULT_APP_SCOPES,
    DEFAULT_LANGUAGE,
    EXPIRED_TOKEN,
    INVALID_TOKEN,
    NO_AUTH_FOUND,
    NOT_INSTALLED,
    REFRESH_TOKEN_TTL,
    TOKEN_SCOPE_MISSING,
    AccessToken,
    App,
    Installation,
    RefreshToken,
    TokenRequest,
    app_info,
    install_payload,
    installation_summary,
    member_id_for,
    new_client_id,
    new_client_secret,
    new_token,
    token_answer,
    uninstall_payload,
)
from fake_bitrix24.protocol import ApiError, IncomingRequest, Reply, parse_params
from fake_bitrix24.state import DEFAULT_PORTAL, MethodCall, MethodHandler, PortalState, Webhook

if TYPE_CHECKING:
    from fake_bitrix24.faults import Injection
    from fake_bitrix24.server import Exchange
    from fake_bitrix24.state import FakeConfig

OAUTH_SERVER_METHOD = "oauth.token"  # the name ``inject`` uses for the OAuth server
_APP_PREFIX = re.compile(r"/p/([^/]+)(/rest/.*)")
_GRANT_PARAMETERS = {"refresh_token": "refresh_token", "authorization_code": "code"}


def split_app_prefix(path: str) -> tuple[str | None, str]:
    """(member_id, rest path) of ``/p/<member_id>/rest/...``; (None, path) for other paths."""
    match = _APP_PREFIX.fullmatch(path)
    if match is None:
        return None, path
    return match.group(1), match.group(2)


class OAuthMixin:
    """FakeBitrix24's application mode (state is guarded by its lock)."""

    config: FakeConfig
    _lock: threading.Lock
    _portals: dict[str, PortalState]
    _injections: list[Injection]
    _methods: dict[str, tuple[str | None, MethodHandler]]

    if TYPE_CHECKING:  # provided by FakeBitrix24 and FaultsMixin

        @property
        def base_url(self) -> str: ...

        def now(self) -> float: ...

        def _injected_reply(self, injection: Injection) -> Reply: ...

    def _init_oauth(self) -> None:
        self._apps: dict[str, App] = {}
        self._installations: dict[tuple[str, str], Installation] = {}
        self._domains: dict[str, str] = {}  # member_id → portal name
        self._access_tokens: dict[str, AccessToken] = {}
        self._refresh_tokens: dict[str, RefreshToken] = {}
        self._codes: dict[str, RefreshToken] = {}
        self._token_requests: list[TokenRequest] = []
        self._next_local_id = 1
        self._app_methods: dict[str, tuple[str | None, MethodHandler]] = {"app.info": (None, self._app_info)}

    # Addresses ------------------------------------------------------------------------------

    @property
    def oauth_url(self) -> str:
        """The OAuth server's base URL (``<oauth_url>/oauth/token/``), without a trailing ``/``."""
        return self.base_url

    def client_endpoint_for(self, member_id: str) -> str:
        """A portal's REST endpoint for applications, ending with ``/rest/``."""
        return f"{self.base_url}/p/{member_id}/rest/"

    # Setup ----------------------------------------------------------------------------------

    def create_app(
        self,
        client_id: str | None = None,
        client_secret: str | None = None,
        scopes: tuple[str, ...] | list[str] = DEFAULT_APP_SCOPES,
        version: int = 1,
        access_token_ttl: int = ACCESS_TOKEN_TTL,
    ) -> App:
        """Register an application (a local app, "uses API only"); returns it."""
        app = App(
            client_id=client_id or new_client_id(),
            client_secret=client_secret or new_client_secret(),
            scopes=tuple(scopes),
            version=version,
            access_token_ttl=access_token_ttl,
        )
        with self._lock:
            if app.client_id in self._apps:
                raise ValueError(f"an application with client_id {app.client_id!r} exists")
            self._apps[app.client_id] = app
        return app

    @property
    def apps(self) -> list[App]:
        """The registered applications, oldest first."""
        with self._lock:
            return list(self._apps.values())

    def install(
        self,
        portal: str,
        app: App | None = None,
        *,
        user_id: int = 1,
        application_token: str | None = None,
        language_id: str = DEFAULT_LANGUAGE,
    ) -> Installation:
        """Install ``app`` (default: the newest app, created if there is none) on a portal.

        ``portal`` is its domain, e.g. ``portal-a.bitrix24.test``; the portal is created with the
        usual seed users if new. Installing again issues new tokens (the old ones stop working)
        and keeps the application token unless ``application_token`` is given. The fake must be
        started (the client endpoint names its port).
        """
        if app is None:
            app = self.apps[-1] if self.apps else self.create_app()
        member_id = member_id_for(portal)
        endpoint = self.client_endpoint_for(member_id)
        with self._lock:
            if self._apps.get(app.client_id) != app:
                raise ValueError(f"unknown application {app.client_id!r}; use create_app first")
            self._portals.setdefault(portal, PortalState(portal))
            self._domains[member_id] = portal
            installation = self._installations.get((member_id, app.client_id))
            if installation is None:
                installation = Installation(
                    app=app,
                    member_id=member_id,
                    domain=portal,
                    client_endpoint=endpoint,
                    server_endpoint=f"{self.oauth_url}/rest/",
                    local_id=self._next_local_id,
                    application_token=application_token or new_token()[:32],
                    user_id=user_id,
                    language_id=language_id,
                )
                self._next_local_id += 1
                self._installations[(member_id, app.client_id)] = installation
            else:
                installation.installed = True
                installation.user_id = user_id
                installation.language_id = language_id
                if application_token:
                    installation.application_token = application_token
            self._issue_tokens(installation, self.now(), rotate=True)
            return installation

    def installation(self, target: str | Installation, client_id: str | None = None) -> Installation:
        """An installation by member_id or domain (``client_id`` if the portal has several apps)."""
        with self._lock:
            return self._find_installation(target, client_id)

    @property
    def installations(self) -> list[Installation]:
        """Every installation, installed or not, oldest first."""
        with self._lock:
            return list(self._installations.values())

    def install_payload(self, installation: Installation) -> dict[str, str]:
        """The ``ONAPPINSTALL`` form Bitrix24 posts to the installation callback (current tokens)."""
        with self._lock:
            return install_payload(installation, self.now())

    def uninstall_payload(self, installation: Installation, clean: bool = False) -> dict[str, str]:
        """The ``ONAPPUNINSTALL`` event form: application token and member_id, no OAuth tokens."""
        with self._lock:
            return uninstall_payload(installation, self.now(), clean)

    # Control for tests ----------------------------------------------------------------------

    def uninstall(self, target: str | Installation, client_id: str | None = None) -> dict[str, str]:
        """Uninstall: every token of the installation stops working; returns ONAPPUNINSTALL."""
        with self._lock:
            installation = self._find_installation(target, client_id)
            installation.installed = False
            key = (installation.member_id, installation.client_id)
            for record in self._access_tokens.values():
                if (record.member_id, record.client_id) == key and not record.retired:
                    record.retired = "uninstalled"
            for grant in (*self._refresh_tokens.values(), *self._codes.values()):
                if (grant.member_id, grant.client_id) == key and not grant.state:
                    grant.state = "uninstalled"
            return uninstall_payload(installation, self.now())

    def expire_access_token(self, target: str | Installation, client_id: str | None = None) -> None:
        """The installation's current access token answers ``expired_token`` from now on."""
        with self._lock:
            installation = self._find_installation(target, client_id)
            self._access_tokens[installation.access_token].expires_at = self.now()

    def revoke_refresh_token(self, target: str | Installation, client_id: str | None = None) -> None:
        """The installation's current refresh token is refused (``invalid_grant``) from now on."""
        with self._lock:
            installation = self._find_installation(target, client_id)
            self._refresh_tokens[installation.refresh_token].state = "revoked"

    def authorization_code(self, target: str | Installation, client_id: str | None = None) -> str:
        """A one-time code for ``grant_type=authorization_code`` (valid 30 s)."""
        with self._lock:
            installation = self._find_installation(target, client_id)
            code = new_token()[:32]
            self._codes[code] = RefreshToken(
                code, installation.member_id, installation.client_id, self.now() + AUTHORIZATION_CODE_TTL
            )
            return code

    def refreshes(self, target: str | Installation | None = None) -> int:
        """Successful ``grant_type=refresh_token`` exchanges, of one portal (member_id/domain) or all."""
        return len(
            [
                request
                for request in self.refresh_requests(target)
                if request.ok and request.grant_type == "refresh_token"
            ]
        )

    def refresh_requests(self, target: str | Installation | None = None) -> list[TokenRequest]:
        """OAuth server requests whose token or code belongs to one portal (or all requests)."""
        requests = self.token_requests
        if target is None:
            return requests
        member_id = self._member_of(target)
        return [request for request in requests if request.member_id == member_id]

    @property
    def token_requests(self) -> list[TokenRequest]:
        """Every OAuth server request so far, oldest first (a copy)."""
        with self._lock:
            return list(self._token_requests)

    def _member_of(self, target: str | Installation) -> str:
        if isinstance(target, Installation):
            return target.member_id
        with self._lock:
            if target in self._domains:
                return target
            return member_id_for(target) if member_id_for(target) in self._domains else target

    def _find_installation(self, target: str | Installation, client_id: str | None) -> Installation:
        if isinstance(target, Installation):
            member_id, client_id = target.member_id, target.client_id
        elif target in self._domains:
            member_id = target
        else:
            member_id = member_id_for(target)
        found = [
            installation
            for (member, client), installation in self._installations.items()
            if member == member_id and client_id in (None, client)
        ]
        if not found:
            raise KeyError(f"no installation for {target!r}")
        if len(found) > 1:
            raise ValueError(f"{target!r} has several applications; pass client_id")
        return found[0]

    def _issue_tokens(self, installation: Installation, now: float, rotate: bool) -> None:
        """New access and refresh tokens; the previous access token (and refresh token) retire."""
        previous = self._access_tokens.get(installation.access_token)
        if previous is not None and not previous.retired:
            previous.retired = "superseded"
        old_refresh = self._refresh_tokens.get(installation.refresh_token)
        if rotate and old_refresh is not None and not old_refresh.state:
            old_refresh.state = "used"
        member_id, client_id = installation.member_id, installation.client_id
        access = AccessToken(new_token(), member_id, client_id, now + installation.expires_in)
        refresh = RefreshToken(new_token(), member_id, client_id, now + REFRESH_TOKEN_TTL)
        self._access_tokens[access.token] = access
        self._refresh_tokens[refresh.token] = refresh
        installation.access_token = access.token
        installation.refresh_token = refresh.token
        installation.expires = int(access.expires_at)

    def _oauth_summary(self) -> dict[str, Any]:
        """``/_fake/state`` additions (called with the lock held)."""
        refreshes: dict[str, int] = {}
        for request in self._token_requests:
            if request.ok and request.grant_type == "refresh_token" and request.member_id:
                refreshes[request.member_id] = refreshes.get(request.member_id, 0) + 1
        return {
            "installations": {
                f"{inst.member_id}:{inst.client_id}": {
                    "domain": inst.domain,
                    "installed": inst.installed,
                    "refreshes": refreshes.get(inst.member_id, 0),
                }
                for inst in self._installations.values()
            },
            "token_requests": len(self._token_requests),
        }

    # REST with a token ----------------------------------------------------------------------

    def _route_app(self, exchange: Exchange, request: IncomingRequest, member_id: str | None) -> PortalState:
        """Take the token out of the parameters; find the portal the endpoint belongs to.

        ``/p/<member_id>/rest/`` names the portal; plain ``/rest/`` is the portal whose domain
        the Host header names, else the default portal (where no application is installed).
        """
        exchange.app_route = True
        exchange.access_token = _take_token(exchange.params, request) or None
        if member_id is None:
            host = request.host.rsplit(":", 1)[0].strip().lower() if request.host else ""
            candidate = member_id_for(host) if host else ""
            member_id = candidate if candidate in self._domains else None
        elif member_id not in self._domains:
            raise ApiError(404, "NOT_FOUND", f"No such portal: {member_id}")
        exchange.member_id = member_id
        return self._portals[self._domains[member_id] if member_id else DEFAULT_PORTAL]

    def _authenticate_app(self, exchange: Exchange) -> tuple[Webhook, MethodHandler]:
        """Token checks in Bitrix24's order, then the method and its scope."""
        token = exchange.access_token
        if not token:
            raise _token_error(NO_AUTH_FOUND)
        record = self._access_tokens.get(token)
        if record is None or record.member_id != exchange.member_id:
            raise _token_error(INVALID_TOKEN)
        installation = self._installations[(record.member_id, record.client_id)]
        exchange.client_id = record.client_id
        exchange.installation = installation
        if not installation.installed:
            raise _token_error(NOT_INSTALLED)
        if record.retired == "uninstalled":
            raise _token_error(INVALID_TOKEN)
        if record.retired == "superseded":
            superseded = INVALID_TOKEN if self.config.superseded_access_error == "invalid_token" else EXPIRED_TOKEN
            raise _token_error(superseded)
        if exchange.started >= record.expires_at:
            raise _token_error(EXPIRED_TOKEN)
        spec = self._methods.get(exchange.method) or self._app_methods.get(exchange.method)
        if spec is None:
            raise ApiError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        scope, handler = spec
        if scope is not None and scope not in installation.app.scopes:
            raise _token_error(TOKEN_SCOPE_MISSING)
        principal = Webhook(
            user_id=installation.user_id,
            code=f"app:{installation.client_id}",
            portal=installation.domain,
            scopes=installation.app.scopes,
        )
        return principal, handler

    def _app_info(self, call: MethodCall) -> dict[str, Any]:
        if call.installation is None:  # only reachable with a token
            raise ApiError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        return app_info(call.installation)

    # The OAuth server -----------------------------------------------------------------------

    def handle_oauth(self, request: IncomingRequest) -> Reply:
        """Answer ``GET``/``POST /oauth/token/``: exchange a refresh token or a code for tokens."""
        started = self.now()
        if request.path.rstrip("/") != "/oauth/token":
            return Reply(404, {"error": "NOT_FOUND", "error_description": f"No such path: {request.path}"})
        try:
            params = parse_params(request)
        except ApiError as error:
            return Reply(400, {"error": "invalid_request", "error_description": error.description})
        with self._lock:
            injection = self._take_oauth_injection()
            if injection is not None and injection.kind != "slow":
                reply = self._injected_reply(injection)
                self._record_token_request(request, params, started, None, reply)
                return reply
            status, body, member_id = self._grant(params, started)
            reply = Reply(status, body)
            if injection is not None:
                reply.delay_after = injection.seconds
            self._record_token_request(request, params, started, member_id, reply)
        return reply

    def _take_oauth_injection(self) -> Injection | None:
        for injection in self._injections:
            if injection.method == OAUTH_SERVER_METHOD:
                injection.remaining -= 1
                if injection.remaining <= 0:
                    self._injections.remove(injection)
                return injection
        return None

    def _grant(self, params: dict[str, Any], now: float) -> tuple[int, dict[str, Any], str | None]:
        """(status, body, member_id) in the OAuth server's order: client, secret, grant."""
        client_id = _text(params.get("client_id"))
        app = self._apps.get(client_id)
        if app is None:
            return 200, {"error": "wrong_client"}, None
        if _text(params.get("client_secret")) != app.client_secret:
            return 400, {"error": "invalid_client"}, None
        grant_type = _text(params.get("grant_type"))
        if not grant_type:
            return 400, _invalid_request("grant_type"), None
        parameter = _GRANT_PARAMETERS.get(grant_type)
        if parameter is None:
            return 400, {"error": "unsupported_grant_type"}, None
        presented = _text(params.get(parameter))
        if not presented:
            return 400, _invalid_request(parameter), None
        store = self._refresh_tokens if parameter == "refresh_token" else self._codes
        grant = store.get(presented)
        member_id = grant.member_id if grant else None
        if grant is None or grant.client_id != client_id or grant.state or now >= grant.expires_at:
            return 400, {"error": "invalid_grant"}, member_id
        installation = self._installations[(grant.member_id, grant.client_id)]
        if not installation.installed:
            return 400, {"error": "invalid_grant"}, member_id
        rotate = self.config.rotate_refresh_tokens
        if parameter == "code" or rotate:
            grant.state = "used"
        self._issue_tokens(installation, now, rotate)
        return 200, token_answer(installation), member_id

    def _record_token_request(
        self,
        request: IncomingRequest,
        params: dict[str, Any],
        started: float,
        member_id: str | None,
        reply: Reply,
    ) -> None:
        self._token_requests.append(
            TokenRequest(
                timestamp=started,
                http_method=request.http_method,
                grant_type=_text(params.get("grant_type")),
                client_id=_text(params.get("client_id")),
                refresh_token=_text(params.get("refresh_token")),
                code=_text(params.get("code")),
                member_id=member_id,
                status=reply.status,
                response=dict(reply.payload) if isinstance(reply.payload, dict) else {},
            )
        )

    # Control endpoints ----------------------------------------------------------------------

    def _oauth_control(self, http_method: str, action: str, body: dict[str, Any]) -> Reply | None:
        """``/_fake/apps``, ``install``, ``installations``, ``uninstall``, ``expire_token``,
        ``revoke_refresh_token``, ``token_requests``; None for other actions."""
        if action == "apps" and http_method == "POST":
            app = self.create_app(
                client_id=body.get("client_id"),
                client_secret=body.get("client_secret"),
                scopes=tuple(body.get("scopes", DEFAULT_APP_SCOPES)),
                access_token_ttl=int(body.get("access_token_ttl", ACCESS_TOKEN_TTL)),
            )
            return Reply(200, dataclasses.asdict(app))
        if action == "install" and http_method == "POST":
            client_id = body.get("client_id")
            chosen = self._apps[str(client_id)] if client_id else None
            installation = self.install(
                str(body["portal"]), chosen, application_token=body.get("application_token") or None
            )
            summary = installation_summary(installation)
            return Reply(200, {"installation": summary, "payload": self.install_payload(installation)})
        if action == "installations" and http_method == "GET":
            return Reply(200, [installation_summary(item) for item in self.installations])
        if action == "token_requests" and http_method == "GET":
            return Reply(200, [dataclasses.asdict(item) for item in self.token_requests])
        if http_method != "POST" or action not in ("uninstall", "expire_token", "revoke_refresh_token"):
            return None
        member_id, client_id = str(body["member_id"]), body.get("client_id")
        if action == "uninstall":
            return Reply(200, {"ok": True, "payload": self.uninstall(member_id, client_id)})
        if action == "expire_token":
            self.expire_access_token(member_id, client_id)
        else:
            self.revoke_refresh_token(member_id, client_id)
        return Reply(200, {"ok": True})


def _take_token(params: dict[str, Any], request: IncomingRequest) -> str:
    """The access token of a request: ``auth``, then ``access_token``, then the Bearer header."""
    for name in ("auth", "access_token"):
        value = params.pop(name, None)
        if value is not None and value != "":
            return value if isinstance(value, str) else repr(value)
    scheme, _, credentials = request.authorization.partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    return ""


def _token_error(error: tuple[str, str]) -> ApiError:
    return ApiError(401, *error)


def _invalid_request(parameter: str) -> dict[str, str]:
    return {"error": "invalid_request", "error_description": f'No "{parameter}" parameter found'}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""

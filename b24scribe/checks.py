"""`flask check`: is this deployment able to do its job? Settings, schema, and each Bitrix24 portal.

Every finding is one line a person can act on. None ever holds a secret: portals are named by
their host, never by their webhook URL (its path is the webhook's password).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import requests
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from b24scribe.bitrix24 import Bitrix24Client, Bitrix24Error, PermanentError
from b24scribe.db import Database
from b24scribe.logging import redact
from b24scribe.migrate import alembic_config
from b24scribe.models import PortalState
from b24scribe.portals import WRONG_AUTH_TYPE_HINT, Directory
from b24scribe.settings import Settings
from b24scribe.sources import Sources

MIN_TOKEN_LENGTH = 16
REQUIRED_SCOPE = "telephony"
# What a person does about an installed portal that cannot be called (here, the status page, the admin API).
REINSTALL_FIX = (
    "install the local application again from the portal, as its administrator; its waiting jobs then go by themselves"
)
UNINSTALLED_FIX = (
    "install the local application again from the portal to resume its waiting jobs, "
    "or forget the portal with `flask --app app portals remove {name} --yes`"
)


def portal_fix(name: str, state: str) -> str | None:
    """How to bring a portal in this state back (None: nothing to do)."""
    if state == PortalState.NEEDS_REINSTALL:
        return REINSTALL_FIX
    if state == PortalState.UNINSTALLED:
        return UNINSTALLED_FIX.format(name=name)
    return None


def install_url(settings: Settings) -> str:
    """Where Bitrix24 sends a portal's installation (the local application's installation callback)."""
    return f"{settings.public_url or 'https://<B24SCRIBE_PUBLIC_URL>'}/b24/install"


@dataclass(frozen=True, slots=True)
class Finding:
    """One result: `ok`, `warning` (works, but look) or `problem` (will not work as configured)."""

    level: str
    message: str

    def line(self) -> str:
        """How the CLI prints it."""
        return f"{self.level}: {redact(self.message)}"


def ok(message: str) -> Finding:
    """A check that passed."""
    return Finding("ok", message)


def warning(message: str) -> Finding:
    """Works, but probably not as intended."""
    return Finding("warning", message)


def problem(message: str) -> Finding:
    """Will not work as configured."""
    return Finding("problem", message)


def check_settings(settings: Settings) -> list[Finding]:
    """Settings that parse but leave the service unable (or unsafe) to work."""
    findings: list[Finding] = []
    if settings.inbound_token is None and settings.webhook_secret is None:
        findings.append(problem("B24SCRIBE_INBOUND_TOKEN is not set: every hook answers 503"))
    elif settings.inbound_token is None:
        findings.append(
            warning("B24SCRIBE_INBOUND_TOKEN is not set: only generic hooks signed with B24SCRIBE_WEBHOOK_SECRET work")
        )
    elif len(settings.inbound_token) < MIN_TOKEN_LENGTH:
        findings.append(
            warning(f"B24SCRIBE_INBOUND_TOKEN is shorter than {MIN_TOKEN_LENGTH} characters: easy to guess")
        )
    if settings.admin_token is None:
        findings.append(warning("B24SCRIBE_ADMIN_TOKEN is not set: the admin API and the status page are disabled"))
    elif len(settings.admin_token) < MIN_TOKEN_LENGTH:
        findings.append(warning(f"B24SCRIBE_ADMIN_TOKEN is shorter than {MIN_TOKEN_LENGTH} characters: easy to guess"))
    if settings.metrics_token is not None and len(settings.metrics_token) < MIN_TOKEN_LENGTH:
        findings.append(
            warning(f"B24SCRIBE_METRICS_TOKEN is shorter than {MIN_TOKEN_LENGTH} characters: easy to guess")
        )
    if settings.dry_run:
        findings.append(
            warning("B24SCRIBE_BITRIX24_WEBHOOK_URL is not set: dry-run, jobs are recorded and nothing is sent")
        )
    if settings.recording_mode == "upload" and not settings.recording_hosts:
        findings.append(
            warning(
                "B24SCRIBE_RECORDING_HOSTS is not set: recordings are downloaded only from a cloud PBX's own "
                "hosts; any other PBX's recording URL is refused (name its host, or B24SCRIBE_RECORDING_MODE=url)"
            )
        )
    for portal, url in settings.portal_urls().items():
        if url.startswith("http://"):
            findings.append(warning(f"portal {portal}: the webhook URL is plain http, its secret travels unencrypted"))
    if not findings:
        findings.append(ok("settings are complete"))
    return findings


def schema_revisions(db: Database) -> tuple[set[str], set[str]]:
    """(the database's current Alembic revisions, the migrations' heads)."""
    script = ScriptDirectory.from_config(alembic_config(db.url))
    with db.write_engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    return current, set(script.get_heads())


def check_database(db: Database) -> list[Finding]:
    """The database answers and its schema is at the newest migration."""
    try:
        current, heads = schema_revisions(db)
    except Exception as exc:  # the URL may hold a password: name the failure, not the URL
        return [problem(f"the database is unreachable ({type(exc).__name__}): check B24SCRIBE_DATABASE_URL")]
    if current == heads:
        return [ok(f"database schema is at the newest migration ({', '.join(sorted(heads))})")]
    if not current:
        return [problem("the database has no schema yet: run `flask --app app db upgrade`")]
    return [
        problem(
            f"the database schema is at {', '.join(sorted(current))}, not {', '.join(sorted(heads))}: "
            "run `flask --app app db upgrade`"
        )
    ]


def _describe(error: Bitrix24Error) -> str:
    code = f"{error.code}: " if error.code else ""
    return f"{code}{error.description}"


def check_portal(portal: str, webhook_url: str, timeout: float, session: requests.Session | None = None) -> Finding:
    """One portal: reachable, the webhook's credentials accepted, the telephony scope granted."""
    client = Bitrix24Client(webhook_url, timeout, session)
    try:
        scopes = client.call("scope", {}).result
        user = client.call("user.current", {}).result
    except PermanentError as error:
        if error.code == "WRONG_AUTH_TYPE":
            return problem(f"portal {portal}: {WRONG_AUTH_TYPE_HINT}")
        return problem(
            f"portal {portal}: Bitrix24 refused the webhook ({_describe(error)}): "
            "check the webhook URL, and that the webhook and its user still exist"
        )
    except Bitrix24Error as error:
        return problem(f"portal {portal}: Bitrix24 is unreachable ({_describe(error)})")
    granted = [str(scope) for scope in scopes] if isinstance(scopes, list) else []
    if REQUIRED_SCOPE not in granted:
        return problem(
            f"portal {portal}: the webhook lacks the {REQUIRED_SCOPE} scope (it has: {', '.join(granted) or 'none'}): "
            f"edit the webhook in Bitrix24 and add {REQUIRED_SCOPE}"
        )
    who = f"user {user.get('ID')}" if isinstance(user, dict) else "its user"
    return ok(f"portal {portal}: reachable, webhook of {who}, scopes: {', '.join(granted)}")


def check_bitrix24(settings: Settings) -> list[Finding]:
    """Every configured portal (none in dry-run)."""
    return [check_portal(portal, url, settings.bitrix24_timeout) for portal, url in settings.portal_urls().items()]


def check_installed_portals(settings: Settings, db: Database) -> list[Finding]:
    """The portals that installed the local application: each one's state, and what to do about one
    that cannot be called. Nothing is sent to them (their tokens are for delivering calls)."""
    if not settings.app_mode:
        return []
    try:
        portals = Directory(db, settings).snapshot().portals
    except Exception as exc:  # the database check names the cause; the URL may hold a password
        return [problem(f"the installed portals could not be read from the database ({type(exc).__name__})")]
    installed = [info for info in portals.values() if info.kind == "application"]
    if not installed:
        return [
            warning(
                "the local application is configured and no portal has installed it yet: install it in Bitrix24 "
                f"with the installation callback {install_url(settings)}"
                + ("" if settings.public_url else " (set B24SCRIBE_PUBLIC_URL to the URL Bitrix24 reaches)")
            )
        ]
    findings = []
    for info in installed:
        fix = portal_fix(info.name, info.state)
        if fix is None:
            findings.append(ok(f"portal {info.name}: the local application is installed (member_id {info.member_id})"))
        elif info.state == PortalState.NEEDS_REINSTALL:
            why = f" ({info.state_reason})" if info.state_reason else ""
            findings.append(problem(f"portal {info.name} needs re-install{why}: {fix}"))
        else:
            findings.append(problem(f"portal {info.name} uninstalled the local application: {fix}"))
    return findings


def check_sources(settings: Settings, sources: Sources) -> list[Finding]:
    """The hook URLs the registry serves, and how each source can authenticate as configured."""
    findings = [ok(f"hooks: {', '.join(f'/hooks/{kind}/{name}' for kind, name in sources.labels())}")]
    for source in sources:
        for scheme in source.signatures:
            if scheme.configured(settings, source.name):
                findings.append(ok(f"/hooks/{source.kind}/{source.name} verifies {scheme.name} signatures"))
            elif settings.inbound_token is None:
                findings.append(
                    warning(f"/hooks/{source.kind}/{source.name}: neither a token nor its {scheme.name} secret is set")
                )
    return findings


def check_transcription_vendor(settings: Settings, session: requests.Session | None = None) -> list[Finding]:
    """The vendor b24scribe submits recordings to (B24SCRIBE_TRANSCRIBE_WITH): its key, by a harmless
    read-only request (Deepgram: the key's projects). Nothing is submitted."""
    vendor = settings.transcribe_with
    if vendor is None:
        return []
    from b24scribe.delivery.submit import SUBMITTERS, VendorError

    submitter = SUBMITTERS[vendor]
    http = session or requests.Session()
    try:
        submitter.check(http, settings)
    except VendorError as error:
        return [problem(f"B24SCRIBE_TRANSCRIBE_WITH={vendor}: the key does not work: {error}")]
    finally:
        if session is None:
            http.close()
    findings = [ok(f"{vendor}: the key works; answered calls with a recording are submitted for transcription")]
    if vendor in WORKSPACE_WEBHOOK_VENDORS and not settings.vendor_setting(vendor, "webhook_secret"):
        # the vendor's one webhook is signed: without the secret it opens only with ?token=<inbound token>
        polled = " (b24scribe still asks Azure after B24SCRIBE_TRANSCRIBE_TIMEOUT_MINUTES)" if vendor == "azure" else ""
        findings.append(
            warning(
                f"B24SCRIBE_TRANSCRIBE_WITH={vendor}: B24SCRIBE_{vendor.upper()}_WEBHOOK_SECRET is not set, so "
                f"{vendor}'s signed webhook is refused unless its URL carries ?token=<B24SCRIBE_INBOUND_TOKEN>{polled}"
            )
        )
    return findings


# vendors whose results come to one webhook for the whole account, signed with its secret (not to a
# callback URL b24scribe gives each job)
WORKSPACE_WEBHOOK_VENDORS = ("elevenlabs", "azure")


def run_checks(settings: Settings, db: Database, sources: Sources) -> list[Finding]:
    """All checks, in the order a person would fix them."""
    return [
        *check_settings(settings),
        *check_sources(settings, sources),
        *check_database(db),
        *check_bitrix24(settings),
        *check_installed_portals(settings, db),
        *check_transcription_vendor(settings),
    ]


def has_problems(findings: Iterable[Finding]) -> bool:
    """Whether any finding is a problem (the command then exits non-zero)."""
    return any(finding.level == "problem" for finding in findings)

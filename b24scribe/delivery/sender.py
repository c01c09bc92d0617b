"""The portal sender: every request to Bitrix24 goes out through `PortalSender.send`.

It holds what sending to a portal takes: the client per portal (a keep-alive pool each), pacing
(a job's first request is paid for by its claim, any further one waits for a token), the dry-run
decision (the one place that decides it: no portal configured, no client, nothing is sent; the
worker and the steps ask `dry_run` here), fencing (a request goes out only while the job's lease
holds, with a margin), and the policy that turns a Bitrix24 error into what the outbox does with
the job (`fail`). Installed portals (the local application, contract §8) are called at their
`client_endpoint` with their access token, refreshed here on `expired_token` and the request
replayed (`b24scribe.portals.OAuthTokens`): the steps never see a credential.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from b24scribe import metrics, outbox, ratelimit
from b24scribe.bitrix24 import (
    AmbiguousError,
    Bitrix24Client,
    Bitrix24Error,
    OperationLimitError,
    PermanentError,
    Response,
    ThrottledError,
)
from b24scribe.db import Database
from b24scribe.delivery.recording import Recorder
from b24scribe.models import Call, Job, JobState
from b24scribe.outbox import Claim
from b24scribe.portals import (
    PORTAL_WAITING,
    WRONG_AUTH_TYPE_HINT,
    Credentials,
    OAuthTokens,
    PortalUnavailable,
    mark_needs_reinstall,
)
from b24scribe.ratelimit import Pace
from b24scribe.settings import Settings

log = structlog.get_logger(__name__)
_LEASE_EXPIRES = select(Job.lease_expires_at).where(
    Job.id == bindparam("b_id"), Job.state == JobState.LEASED, Job.lease_owner == bindparam("b_owner")
)

# An installed portal's access token that no longer works: refreshed once, the request replayed.
EXPIRED_TOKEN_CODES = frozenset({"expired_token", "invalid_token"})
# The application is gone from the portal: nothing works until it is installed again.
NOT_INSTALLED_CODES = frozenset({"NOT_INSTALLED", "APPLICATION_NOT_FOUND"})
PORTAL_WAIT_SECONDS = 3600.0  # a backstop: claims skip such a portal, and a re-install resumes its jobs


class LeaseLost(Exception):
    """Our lease expired and the job was reclaimed; the outcome is not ours to record."""


def pace_from(settings: Settings) -> Pace:
    """The pacing the settings give every portal."""
    return Pace(settings.rate_per_second, settings.rate_burst, settings.lease_seconds, settings.portal_concurrency)


def clients_from(settings: Settings) -> dict[str, Bitrix24Client]:
    """A client per configured portal (none in dry-run), each with a keep-alive pool of as many
    connections as the portal has requests in flight at most (its B24SCRIBE_PORTAL_CONCURRENCY slots)."""
    pool = max(1, min(settings.portal_concurrency, settings.worker_senders))
    return {
        portal: Bitrix24Client(url, settings.bitrix24_timeout, pool_size=pool)
        for portal, url in settings.portal_urls().items()
    }


class PortalSender:
    """Sends a job's requests to its portal, paced and fenced, or records them in dry-run."""

    def __init__(
        self, db: Database, settings: Settings, clients: dict[str, Bitrix24Client], recorder: Recorder
    ) -> None:
        self.db = db
        self.settings = settings
        self.clients = clients
        self.recorder = recorder
        self.pace = pace_from(settings)
        self.oauth = OAuthTokens(db, settings) if settings.app_mode else None
        self._app_clients: dict[str, Bitrix24Client] = {}  # installed portals' clients, by client_endpoint
        # when this worker's heartbeat was last written (its own clock); 0: unknown (see `_lease_holds`)
        self.beat_at = 0.0

    @property
    def dry_run(self) -> bool:
        """Nothing is sent: no portal is configured (so no client was made) and no local application."""
        return not self.clients and self.oauth is None

    def send(self, claim: Claim, method: str, params: dict[str, Any]) -> Response | None:
        """Send to the job's portal, or in dry-run return None (the caller records the request)."""
        if self.dry_run:
            return None
        client, credentials = self._ready_to_send(claim)
        started = time.monotonic()
        try:
            with metrics.bitrix24_request(method):
                if credentials is None:
                    return client.call(method, params)
                return self._call_installed(claim.portal or "", client, credentials, method, params)
        finally:
            self._note_stall(claim, started)

    def _call_installed(
        self, portal: str, client: Bitrix24Client, credentials: Credentials, method: str, params: dict[str, Any]
    ) -> Response:
        """Call an installed portal with its access token; on `expired_token`, one refresh (shared
        by every worker, see `OAuthTokens.refresh`) and the request again with the new token."""
        assert self.oauth is not None
        try:
            return client.call(method, {**params, "auth": credentials.access_token})
        except PermanentError as error:
            if error.code in NOT_INSTALLED_CODES:
                raise self._needs_reinstall(portal, error) from None
            if error.code not in EXPIRED_TOKEN_CODES:
                raise
        fresh = self.oauth.refresh(portal, credentials)
        try:
            return self._app_client(fresh).call(method, {**params, "auth": fresh.access_token})
        except PermanentError as error:
            if error.code in EXPIRED_TOKEN_CODES | NOT_INSTALLED_CODES:
                raise self._needs_reinstall(portal, error) from None
            raise

    def _needs_reinstall(self, portal: str, error: Bitrix24Error) -> PortalUnavailable:
        """The portal refuses even a fresh token: it waits for a re-install (its jobs too)."""
        assert self.oauth is not None
        reason = f"{error.code}: {error.description}"
        with self.db.write() as session:
            mark_needs_reinstall(session, portal, reason, time.time())
        self.oauth.forget(portal)
        log.warning("portal needs the local application installed again", portal=portal, code=error.code)
        return PortalUnavailable(f"portal {portal} needs the local application installed again: {reason}")

    def _app_client(self, credentials: Credentials) -> Bitrix24Client:
        client = self._app_clients.get(credentials.client_endpoint)
        if client is None:
            pool = max(1, min(self.settings.portal_concurrency, self.settings.worker_senders))
            client = Bitrix24Client(credentials.client_endpoint, self.settings.bitrix24_timeout, pool_size=pool)
            self._app_clients[credentials.client_endpoint] = client
        return client

    def upload(self, claim: Claim, url: str, field: str, path: Path, filename: str, content_type: str) -> Response:
        """POST a file to an upload URL the job's portal gave, paced and fenced like `send`."""
        client, _ = self._ready_to_send(claim)
        started = time.monotonic()
        try:
            with metrics.bitrix24_request("upload"):
                return client.upload(url, field, path, filename, content_type)
        finally:
            self._note_stall(claim, started)

    def _ready_to_send(self, claim: Claim) -> tuple[Bitrix24Client, Credentials | None]:
        """The job's portal's client (and an installed portal's credentials), once a pacing token
        is ours and the lease still holds."""
        client = self.clients.get(claim.portal or "")
        credentials = None
        if client is None:
            if self.oauth is not None and claim.portal:
                credentials = self.oauth.credentials(claim.portal)  # PortalUnavailable: it waits
            if credentials is None:
                raise PermanentError(
                    f"portal {claim.portal!r} is not configured (B24SCRIBE_BITRIX24_PORTALS) nor installed"
                )
            client = self._app_client(credentials)
        self.recorder.flush()  # what the batch has done so far is recorded before we wait on a portal
        batch = self.recorder.batch
        if claim.portal is not None and batch.sent > 0:
            self._wait_for_token(claim.portal)  # the claim paid for the first request only
        if not self._lease_holds(claim):
            raise LeaseLost()
        batch.sent += 1
        return client, credentials

    def _note_stall(self, claim: Claim, started: float) -> None:
        if claim.portal is not None and time.monotonic() - started > self.pace.stall_seconds:
            self.recorder.batch.stalled[claim.portal] = 1

    def _lease_holds(self, claim: Claim) -> bool:
        """Fencing, fails closed: send only while our lease has a margin left, so a worker that
        stalled past its lease cannot send behind the back of the job's next owner (whose look-up
        then comes at least the margin after our request).

        Without a read when the claim itself proves it: a lease is only taken back once it has
        expired or once its worker's heartbeat is B24SCRIBE_WORKER_DEAD_AFTER_SECONDS old, so a
        claim younger than its lease less the margin, by a worker that beat within half the dead-
        after time, still holds (workers' clocks may differ by up to that half). Anything older,
        or a worker whose beats lag, asks the database."""
        margin = min(self.settings.lease_seconds / 3, self.settings.bitrix24_timeout)
        now = time.time()
        if (
            claim.claimed_at <= now < claim.claimed_at + self.settings.lease_seconds - margin
            and 0.0 <= now - self.beat_at < self.settings.worker_dead_after_seconds / 2
        ):
            return True
        with self.db.read() as session:
            expires = session.connection().scalar(_LEASE_EXPIRES, {"b_id": claim.job_id, "b_owner": claim.owner})
        return expires is not None and expires - time.time() > margin

    def _wait_for_token(self, portal: str) -> None:
        pace = self.pace
        deadline = time.monotonic() + 2.0 / pace.rate_per_second
        while True:
            with self.db.write() as session:
                wait = ratelimit.take_followup_token(session, portal, time.time(), pace)
            if wait is None or time.monotonic() >= deadline:
                return
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))

    def fail(self, claim: Claim, error: Bitrix24Error, note: str = "") -> None:
        """Map a Bitrix24 error to what the outbox does with the job."""
        now = time.time()
        message = f"{error.code + ': ' if error.code else ''}{error.description}{note}"
        if error.code == "WRONG_AUTH_TYPE":
            message = f"WRONG_AUTH_TYPE: {WRONG_AUTH_TYPE_HINT}"
        log.info("bitrix24 error", status=error.status, code=error.code, retryable=error.retryable)
        schedule = self.settings.retry_schedule

        def apply(session: Session, job: Job) -> None:
            if isinstance(error, PortalUnavailable):
                # not the job's fault: it waits for the portal, without spending an attempt
                outbox.defer(session, job, now + PORTAL_WAIT_SECONDS, PORTAL_WAITING, now)
            elif isinstance(error, ThrottledError):
                until = now + ratelimit.THROTTLE_PAUSE_SECONDS
                if claim.portal:
                    ratelimit.pause(session, claim.portal, until, "QUERY_LIMIT_EXCEEDED", now)
                outbox.defer(session, job, until, message, now)
            elif isinstance(error, OperationLimitError):
                if claim.portal:
                    ratelimit.pause(session, claim.portal, error.reset_at, "OPERATION_TIME_LIMIT", now)
                outbox.defer(session, job, error.reset_at, message, now)
            elif error.retryable:
                outbox.retry_later(
                    session, job, message, now, ambiguous=isinstance(error, AmbiguousError), schedule=schedule
                )
            else:
                outbox.kill(session, job, message, now)
                if job.call_id:
                    session.get_one(Call, job.call_id).last_error = message

        self.recorder.record(claim, apply)

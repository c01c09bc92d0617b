"""Vendor fetches: GET a finished transcript from an STT vendor's API, for callbacks that carry only an id.

Not a Bitrix24 request: it goes to the vendor's configured API host (never a host named in a payload),
is not paced per portal, and waits at most B24SCRIBE_VENDOR_TIMEOUT_SECONDS (a vendor's transcript
can be large and slow to come, whatever Bitrix24's own timeout is). What came back is parsed with the
vendor's schema and stored on the transcript part; a completed one queues the call's attach job.
Failure policy: an unreachable API, HTTP 5xx or 429 spends an attempt (the retry schedule); a missing
key, another HTTP status or an unreadable transcript kills the job, with the reason on the part too.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests
from marshmallow import ValidationError
from sqlalchemy.orm import Session

from b24scribe import outbox
from b24scribe.db import Database
from b24scribe.delivery.recording import Recorder
from b24scribe.events import part_values, queue_attach
from b24scribe.models import Call, InboundEvent, Job, JobState, TranscriptPart
from b24scribe.outbox import Claim
from b24scribe.settings import Settings
from b24scribe.sources import Sources
from b24scribe.transcript import VendorResult


@dataclass(frozen=True, slots=True)
class Fetched:
    """The vendor answered with its result for the part (completed, or failed on its side)."""

    part_id: int
    result: VendorResult


@dataclass(frozen=True, slots=True)
class FetchFailed:
    """No result: retry later (`retry`) or give up, with the reason."""

    reason: str
    retry: bool


class VendorFetches:
    """The fetch step: read the part, GET the vendor's result, record it."""

    def __init__(
        self, db: Database, settings: Settings, sources: Sources, http: requests.Session, recorder: Recorder
    ) -> None:
        self.db = db
        self.settings = settings
        self.sources = sources
        self.http = http
        self.recorder = recorder

    def fetch(self, claim: Claim) -> None:
        with self.db.read() as session:
            part = session.get_one(TranscriptPart, claim.transcript_id)
            # the callback URL's options (?channel=, ?speaker_channels_count=, …) apply to the fetch too
            callback_query = dict(session.get_one(InboundEvent, part.event_id).query or {})
            session.expunge_all()
        self.record(claim, self._get(part, callback_query))

    def _get(self, part: TranscriptPart, callback_query: dict[str, Any]) -> Fetched | FetchFailed:
        vendor = self.sources.stt[part.vendor]
        assert vendor.fetch is not None and part.vendor_job_id
        base = (self.settings.vendor_setting(vendor.name, "API_URL") or vendor.fetch.default_api_url).rstrip("/")
        api_key = self.settings.vendor_setting(vendor.name, "API_KEY")
        if not api_key:
            return FetchFailed(f"B24SCRIBE_{vendor.name.upper()}_API_KEY is not set", retry=False)
        # Only the configured API host is ever fetched; the id from the payload is one path segment.
        url = base + vendor.fetch.path.format(id=quote(part.vendor_job_id, safe=""))
        try:
            answer = self.http.get(
                url, headers=vendor.fetch.headers(api_key), timeout=self.settings.vendor_timeout_seconds
            )
        except requests.RequestException as exc:
            return FetchFailed(f"{vendor.name} API unreachable: {type(exc).__name__}", retry=True)
        if answer.status_code >= 500 or answer.status_code == 429:
            return FetchFailed(f"{vendor.name} API answered HTTP {answer.status_code}", retry=True)
        if answer.status_code != 200:
            return FetchFailed(f"{vendor.name} API answered HTTP {answer.status_code}", retry=False)
        try:
            return Fetched(part.id, vendor.fetch.parse(answer.content, callback_query))
        except ValidationError as exc:
            return FetchFailed(
                f"{vendor.name} transcript unreadable: {sorted(_field_paths(exc.messages))}", retry=False
            )

    def record(self, claim: Claim, outcome: Fetched | FetchFailed) -> None:
        """Queue what the fetch found, for the batch's next flush."""
        if isinstance(outcome, Fetched):
            self.recorder.record(claim, lambda s, j: _fetched(s, j, outcome))
        else:
            schedule = self.settings.retry_schedule
            self.recorder.record(claim, lambda s, j: _fetch_failed(s, j, outcome, schedule))


def _fetched(session: Session, job: Job, outcome: Fetched) -> None:
    now = time.time()
    result = outcome.result
    row = session.get_one(TranscriptPart, outcome.part_id)
    if result.status == "fetch":  # fetched, yet still only an id: nothing more will come of it
        result = dataclasses.replace(result, status="failed", failure_reason=None)
    for column, value in part_values(result).items():
        setattr(row, column, value)
    if row.status == "completed" and job.call_id:
        queue_attach(session, session.get_one(Call, job.call_id), job.event_id, now)
    outbox.complete(session, job, {"status": row.status}, now)


def _fetch_failed(session: Session, job: Job, outcome: FetchFailed, schedule: tuple[float, ...]) -> None:
    now = time.time()
    if outcome.retry:
        outbox.retry_later(session, job, outcome.reason, now, schedule=schedule)
    else:
        outbox.kill(session, job, outcome.reason, now)
    if job.state == JobState.DEAD and job.transcript_id:
        part = session.get_one(TranscriptPart, job.transcript_id)
        part.failure_reason = outcome.reason


def _field_paths(messages: Any, prefix: str = "") -> set[str]:
    if isinstance(messages, dict):
        paths: set[str] = set()
        for key, value in messages.items():
            paths |= _field_paths(value, f"{prefix}.{key}" if prefix else str(key))
        return paths
    return {prefix or "_schema"}

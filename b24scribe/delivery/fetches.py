"""Vendor fetches: GET a finished transcript from an STT vendor's API, for callbacks that carry only an id.

Not a Bitrix24 request: it goes to the vendor's configured API host (never a host named in a payload),
is not paced per portal, and waits at most B24SCRIBE_VENDOR_TIMEOUT_SECONDS (a vendor's transcript
can be large and slow to come, whatever Bitrix24's own timeout is). What came back is parsed with the
vendor's schema and stored on the transcript part; a completed one queues the call's attach job.
Failure policy: an unreachable API, HTTP 5xx or 429 spends an attempt (the retry schedule); a missing
key, another HTTP status or an unreadable transcript kills the job, with the reason on the part too.
"""

from __future__ import annotations

import contextlib
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
from b24scribe.events import RawEvent, bounded_key, part_values, queue_attach, store_event_in
from b24scribe.models import Call, InboundEvent, Job, JobState, TranscriptPart
from b24scribe.outbox import Claim
from b24scribe.settings import Settings
from b24scribe.sources import FetchContext, FetchError, FetchSpec, Sources
from b24scribe.transcript import VendorResult


@dataclass(frozen=True, slots=True)
class Fetched:
    """The vendor answered with its result for the part (completed, or failed on its side)."""

    part_id: int | None  # None: the callback named no call, and this result says which (it is placed there)
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
            part = session.get(TranscriptPart, claim.transcript_id) if claim.transcript_id is not None else None
            event = session.get_one(InboundEvent, part.event_id if part is not None else claim.event_id)
            # the callback URL's options (?channel=, ?speaker_channels_count=, …) apply to the fetch too
            callback_query, callback_body = dict(event.query or {}), bytes(event.body or b"")
            session.expunge_all()
        if part is None:  # a callback that names no call: the fetch says which (`fetch_names_call`)
            vendor, job_id = self.sources.stt[event.provider], None
            with contextlib.suppress(ValidationError):  # it parsed when stored; a later version may not
                parsed = vendor.parse(callback_body, callback_query)
                job_id = parsed.fetch_id or parsed.vendor_job_id  # a failed job too: its call is in the job
            if not job_id:
                self.record(claim, FetchFailed(f"{vendor.name}: the callback names no job to fetch", retry=False))
                return
            self.record(claim, self._get(vendor.name, job_id, None, callback_query, callback_body))
            return
        assert part.vendor_job_id
        self.record(claim, self._get(part.vendor, part.vendor_job_id, part.id, callback_query, callback_body))

    def _get(
        self, vendor_name: str, job_id: str, part_id: int | None, callback_query: dict[str, Any], callback_body: bytes
    ) -> Fetched | FetchFailed:
        vendor = self.sources.stt[vendor_name]
        spec = vendor.fetch
        assert spec is not None
        api_key = self.settings.vendor_setting(vendor.name, "API_KEY")
        if spec.needs_api_key and not api_key:
            return FetchFailed(f"B24SCRIBE_{vendor.name.upper()}_API_KEY is not set", retry=False)
        context = FetchContext(
            vendor=vendor.name,
            # Only the configured API host is ever fetched (never a host named in a payload).
            api_url=(self.settings.vendor_setting(vendor.name, "API_URL") or spec.default_api_url).rstrip("/"),
            api_key=api_key,
            fetch_id=job_id,
            callback_body=callback_body,
            callback_query=callback_query,
            http=self.http,
            timeout=self.settings.vendor_timeout_seconds,
            settings=self.settings,
        )
        try:
            return Fetched(part_id, spec.run(context) if spec.run is not None else _one_get(spec, context))
        except FetchError as failure:
            return FetchFailed(failure.reason, failure.retry)
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


def _one_get(spec: FetchSpec, context: FetchContext) -> VendorResult:
    """The simple fetch: one GET of `path` with the id as one path segment, its body parsed."""
    assert spec.headers is not None and spec.parse is not None
    url = context.api_url + spec.path.format(id=quote(context.fetch_id, safe=""))
    answer = context.get(url, spec.headers(context.api_key or ""))
    return spec.parse(answer.content, context.callback_query)


def _place(session: Session, job: Job, result: VendorResult, now: float) -> None:
    """The callback named no call and the vendor's result does (AWS job tags, Azure customProperties):
    store the callback again with its call named in the URL, as if it had come that way. The fold then
    places it on its call like any other (one more fetch of the same job, which is cheap and keeps
    one way of folding); a retry of this job finds the stored copy by its key."""
    reference = result.reference
    event = session.get_one(InboundEvent, job.event_id)
    naming: dict[str, str] | None = None
    if reference.b24_call_id:
        naming = {"b24_call_id": reference.b24_call_id}
    elif reference.pbx and reference.pbx_call_id:
        naming = {"pbx": reference.pbx, "call": reference.pbx_call_id}
    if naming is not None and reference.portal and not (event.query or {}).get("portal"):
        naming["portal"] = reference.portal  # the job's metadata names the portal too (b24scribe_portal)
    if naming is None:
        why = f" ({result.failure_reason})" if result.status == "failed" and result.failure_reason else ""
        reason = (
            f"{event.provider}: neither the callback nor the vendor's job names the call{why}: add "
            "?pbx=<pbx>&call=<call id> or ?b24_call_id=<CALL_ID> to the URL, or name it in the job's metadata"
        )
        outbox.kill(session, job, reason, now)
        return
    raw = RawEvent(
        "stt", event.provider, bytes(event.body or b""), {**(event.query or {}), **naming}, event.content_type
    )
    placed = store_event_in(session.connection(), raw, bounded_key(f"placed:{event.id}"))
    outbox.complete(session, job, {"placed_as_event": placed.event_id, **naming}, now)


def _fetched(session: Session, job: Job, outcome: Fetched) -> None:
    now = time.time()
    result = outcome.result
    if outcome.part_id is None:
        _place(session, job, result, now)
        return
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

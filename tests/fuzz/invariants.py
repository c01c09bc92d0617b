"""The two rules every fuzz case is held to, and the tally `scripts/fuzz` prints.

1. No 5xx: whatever is sent, the answer is below 500 (a 5xx tells the sender "retry", so a payload
   that always fails would be retried for ever, and it usually means a bug).
2. Accepted ⇒ processable: every 2xx becomes a call, a transcript or jobs the worker finishes.
   After `Worker.drain()` no job may be retrying, leased or dead for a reason of ours ("folding the
   event failed", "can no longer be read", a stuck lease); a transcript waiting for its call is
   given the call's `call.finished` (through the PBX's own hook) and must then be attached; and no
   stored text may be longer than its column (SQLite does not enforce lengths, PostgreSQL does:
   checking them makes the SQLite run find what would break on PostgreSQL).

Cases are counted per family (route group) and findings kept with the request that caused them,
the status and the last line of the server's traceback, for the report.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import traceback
from collections import Counter
from collections.abc import Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest
from flask.testing import FlaskClient
from sqlalchemy import String, func, select
from werkzeug.test import TestResponse

from b24scribe.db import Database
from b24scribe.models import Base, Call, InboundEvent, Job
from b24scribe.worker import Worker
from schemas.registry import PBX_SOURCES as PBX_PARSERS
from tests.conftest import auth

# Dead jobs whose reason is the outside world's answer, not ours: the job ran to a recorded end.
# Dead jobs that are an outcome, not a failure to process: a vendor's own answer, or a recording
# on a host the allow-list does not name (refused by design, contract §9; the call goes on).
VENDOR_OUTCOMES = re.compile(
    r"^(B24SCRIBE_\w+_API_KEY is not set|\w+ API answered HTTP 4\d\d"
    r"|the recording was refused: .* is not in B24SCRIBE_RECORDING_HOSTS)"
)
DRAIN_ROUNDS = 5
DUE_SOON_SECONDS = 2.0  # under the first retry's 10 s: a job retrying on its schedule is not waited for
FINISHABLE_PBXS = tuple(PBX_PARSERS)  # the PBX hooks that can send the call.finished a transcript waits for


@dataclass(frozen=True)
class Finding:
    """One broken case: what was sent, what came back, and where it broke."""

    family: str
    kind: str  # 5xx | unprocessable | too-long | nonconforming
    request: str
    status: int | None
    detail: str
    area: str = ""

    def line(self) -> str:
        status = "-" if self.status is None else str(self.status)
        return f"[{self.kind}] {self.family} {status}: {self.request} -> {self.detail}" + (
            f" (area: {self.area})" if self.area else ""
        )


@dataclass
class Tally:
    """Cases run per family and what broke; one per pytest session (`TALLY`).

    Findings that differ only in numbers (job and event ids) are one finding with a count: the
    first request that showed it stays as the example.
    """

    cases: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    repeats: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, family: str, status: int | None) -> None:
        with self._lock:
            self.cases[family] += 1
            if status is not None and 200 <= status < 300:
                self.accepted[family] += 1

    @staticmethod
    def key(finding: Finding) -> tuple[str, str, str]:
        return (finding.family, finding.kind, re.sub(r"\d+", "N", finding.detail))

    def add(self, finding: Finding) -> None:
        with self._lock:
            key = self.key(finding)
            if not self.repeats[key]:
                self.findings.append(finding)
            self.repeats[key] += 1

    def times(self, finding: Finding) -> int:
        return self.repeats[self.key(finding)]

    def as_json(self) -> dict[str, Any]:
        return {
            "cases": dict(self.cases),
            "accepted": dict(self.accepted),
            "findings": [
                {**asdict(finding), "times": self.times(finding), "known_open": known_open(finding)}
                for finding in self.findings
            ],
        }


TALLY = Tally()


def describe(method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None) -> str:
    """A short, reproducible-enough description of a request (no credentials)."""
    text = f"{method} {path[:300]}{'…' if len(path) > 300 else ''}"
    if headers:
        shown = {k: (v[:80] + "…" if len(v) > 80 else v) for k, v in headers.items() if k.lower() != "authorization"}
        if shown:
            text += f" headers={shown}"
    if body:
        text += f" body[{len(body)}]={body[:160]!r}{'…' if len(body) > 160 else ''}"
    return text


class ServerErrors(logging.Handler):
    """Keeps the last line of every traceback the app logs (the 5xx's cause, for the report)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            frames = traceback.extract_tb(error.__traceback__)
            where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
            self.lines.append(f"{type(error).__name__}: {str(error)[:200]}{where}")
            return
        message = record.getMessage()
        if "exception" in message or "error" in message.lower():
            self.lines.append(message[:300])

    def take(self) -> str:
        lines, self.lines = self.lines, []
        return lines[-1] if lines else ""


@contextmanager
def server_errors() -> Iterator[ServerErrors]:
    """Capture the app's error log (its traceback lines) while fuzzing."""
    handler = ServerErrors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def area_of(family: str, kind: str) -> str:
    """Which part of the code a finding belongs to (who fixes it)."""
    if family.startswith(("v1", "health", "metrics", "status", "openapi GET", "openapi POST /v1")):
        return "admin/status/metrics"
    if kind == "5xx":
        return "HTTP edge (handlers/hooks.py)"
    return "schemas/intake (validation and field limits)"


class Fuzzer:
    """Sends cases to the app in-process, applies rule 1 at once and rule 2 at `settle()`."""

    def __init__(
        self, client: FlaskClient, worker: Worker, db: Database, errors: ServerErrors, tally: Tally | None = None
    ) -> None:
        self.client, self.worker, self.db, self.errors = client, worker, db, errors
        self.tally = TALLY if tally is None else tally  # the suite's tests report to the session's tally
        self.accepted: dict[int, tuple[str, str]] = {}  # event id -> (family, request)
        self.pending = 0
        self.found: list[Finding] = []  # this fuzzer's findings, every occurrence

    def add(self, finding: Finding) -> None:
        self.tally.add(finding)
        self.found.append(finding)

    def report(self) -> str:
        """This fuzzer's distinct findings, one line each with how often it was seen."""
        seen: Counter[tuple[str, str, str]] = Counter(Tally.key(finding) for finding in self.found)
        first: dict[tuple[str, str, str], Finding] = {}
        for finding in self.found:
            first.setdefault(Tally.key(finding), finding)
        return "\n".join(f"{finding.line()} ×{seen[key]}" for key, finding in first.items())

    def send(
        self,
        family: str,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | list[tuple[str, str]] | None = None,
        documented: Container[int] = (),
    ) -> TestResponse:
        """One case; a 5xx is a finding (unless `documented`, as /readyz's 503), a 2xx remembered for `settle()`."""
        url = path + ("?" + urlencode(query, errors="surrogatepass") if query else "")
        response = self.client.open(url, method=method, data=body, headers=dict(headers or {}))
        request = describe(method, url, body, headers)
        self.observe(family, request, response.status_code, response.get_data(), documented)
        return response

    def observe(self, family: str, request: str, status: int, answer: bytes, documented: Container[int] = ()) -> None:
        self.tally.count(family, status)
        if status >= 500 and status not in documented:
            detail = self.errors.take() or answer[:200].decode("utf-8", "replace")
            self.add(Finding(family, "5xx", request, status, detail, area_of(family, "5xx")))
            return
        if 200 <= status < 300:
            try:
                event_id = json.loads(answer).get("event_id")
            except (ValueError, AttributeError):
                event_id = None
            if isinstance(event_id, int):
                self.accepted[event_id] = (family, request)
                self.pending += 1

    def settle(self) -> None:
        """Rule 2 for everything accepted so far: drain, finish waiting calls, drain, inspect."""
        if not self.pending:
            return
        self.pending = 0
        self._drain()
        self._finish_waiting_calls()
        self._drain()
        self._inspect_jobs()
        self._inspect_lengths()

    def _drain(self) -> None:
        """Run the worker until nothing is due; a job due within a few seconds (pacing, a lease just
        given back) is waited for, a job retrying on its back-off schedule is not (that is a finding)."""
        for _ in range(DRAIN_ROUNDS):
            try:
                self.worker.drain(timeout=60)
            except Exception as error:  # a bug in the worker's own loop: report, go on
                frames = traceback.extract_tb(error.__traceback__)
                where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
                detail = f"{type(error).__name__}: {str(error)[:200]}{where}"
                self.add(Finding("worker", "unprocessable", "Worker.drain()", None, detail, "worker"))
                return
            with self.db.read() as session:
                soon = session.scalar(
                    select(func.min(Job.next_attempt_at)).where(
                        Job.state.in_(("pending", "leased")), Job.next_attempt_at <= time.time() + DUE_SOON_SECONDS
                    )
                )
            if soon is None:
                return
            time.sleep(min(DUE_SOON_SECONDS, max(0.05, soon - time.time())))

    def _origin(self, event_id: int | None, call_id: int | None) -> tuple[str, str]:
        if event_id is not None and event_id in self.accepted:
            return self.accepted[event_id]
        if call_id is not None:
            with self.db.read() as session:
                for (other,) in session.execute(select(InboundEvent.id).where(InboundEvent.call_id == call_id)):
                    if other in self.accepted:
                        return self.accepted[other]
        return ("unknown", f"event {event_id}, call {call_id}")

    def _finish_waiting_calls(self) -> None:
        with self.db.read() as session:
            calls = session.execute(
                select(Call.id, Call.pbx, Call.pbx_call_id, Call.portal)
                .where(Call.stage != "finished", Call.pbx.in_(FINISHABLE_PBXS), Call.pbx_call_id.is_not(None))
                .where(Call.id.in_(select(Job.call_id).where(Job.state == "waiting")))
            ).all()
        for call_id, pbx, pbx_call_id, portal in calls:
            finished = {
                "event": "call.finished",
                "call_id": pbx_call_id,
                "direction": "inbound",
                "from": "+15551234567",
                "to": "101",
                "extension": "101",
                "started_at": "2026-11-25T10:20:30+01:00",
                "duration": 30,
                "status": "answered",
            }
            if not PBX_PARSERS[str(pbx)].form:
                body = json.dumps(finished).encode()
                headers = {**auth(), "Content-Type": "application/json"}
            else:
                body = urlencode(finished).encode()
                headers = {**auth(), "Content-Type": "application/x-www-form-urlencoded"}
            # calls are keyed per portal: the PBX reports it on the portal the transcript named
            response = self.client.post(f"/hooks/pbx/{pbx}?{urlencode({'portal': portal})}", data=body, headers=headers)
            if not 200 <= response.status_code < 300:
                family, request = self._origin(None, call_id)
                detail = (
                    f"a transcript waits for call {pbx}:{str(pbx_call_id)[:80]!r}, which the {pbx} hook refuses to "
                    f"finish ({response.status_code}: {response.get_data(as_text=True)[:160]})"
                )
                self.add(Finding(family, "unprocessable", request, None, detail, area_of(family, "unprocessable")))

    def _inspect_jobs(self) -> None:
        with self.db.read() as session:
            jobs = session.execute(
                select(Job.id, Job.kind, Job.state, Job.attempts, Job.last_error, Job.event_id, Job.call_id).where(
                    Job.state != "done"
                )
            ).all()
            stages = dict(session.execute(select(Call.id, Call.pbx)).all())
        for job_id, kind, state, attempts, last_error, event_id, call_id in jobs:
            reason = last_error or ""
            if state == "dead" and VENDOR_OUTCOMES.match(reason):
                continue
            family, request = self._origin(event_id, call_id)
            detail = f"{kind} job {job_id} is {state} after {attempts} attempts: {reason[:200] or 'no error recorded'}"
            pbx = stages.get(call_id or 0)
            if state == "waiting" and pbx is not None and pbx not in FINISHABLE_PBXS:
                detail += f" (its call is from PBX {pbx[:40]!r}, which no hook can report: it can never finish)"
            self.add(Finding(family, "unprocessable", request, None, detail, area_of(family, "unprocessable")))

    def _inspect_lengths(self) -> None:
        with self.db.read() as session:
            for table in Base.metadata.sorted_tables:
                for column in table.columns:
                    if not isinstance(column.type, String) or not column.type.length:
                        continue
                    limit = column.type.length
                    rows = session.execute(
                        select(table.c.id if "id" in table.c else column, func.length(column)).where(
                            func.length(column) > limit
                        )
                    ).all()
                    for row_id, length in rows:
                        event_id = row_id if table.name == "inbound_event" else None
                        call_id = row_id if table.name == "call" else None
                        family, request = self._origin(event_id, call_id)
                        detail = (
                            f"{table.name}.{column.name} holds {length} characters, over its column's {limit} "
                            "(PostgreSQL refuses it)"
                        )
                        self.add(Finding(family, "too-long", request, None, detail, area_of(family, "unprocessable")))


# Bugs the suite found that are reported and open (being fixed in files the suite does not own): a
# test whose only findings match one of these is marked xfail with the reason, so a red build means
# something new. (pattern matched against "request -> failure", the reason shown.) Remove an entry
# once its fix lands: the tests then hold the line.
KNOWN_OPEN: dict[str, str] = {}


def known_open(finding: Finding) -> str | None:
    """The reason a finding is a known, reported bug, or None."""
    text = f"{finding.request} -> {finding.detail}"
    return next((reason for pattern, reason in KNOWN_OPEN.items() if re.search(pattern, text)), None)


def assert_clean(fuzz: Fuzzer, what: str) -> None:
    """The end of every fuzz test: no finding; only known open ones make it an xfail."""
    if not fuzz.found:
        return
    unknown = [finding for finding in fuzz.found if known_open(finding) is None]
    assert not unknown, f"{what}: {len(fuzz.found)} cases broke a rule:\n{fuzz.report()}"
    reasons = sorted({reason for finding in fuzz.found if (reason := known_open(finding))})
    pytest.xfail("known open bugs: " + "; ".join(reasons))


def write_report(path: str | None = None) -> None:
    """Write the tally as JSON where `scripts/fuzz` asked for it (B24SCRIBE_FUZZ_REPORT)."""
    path = path or os.environ.get("B24SCRIBE_FUZZ_REPORT")
    if path:
        with open(path, "w") as out:
            json.dump(TALLY.as_json(), out, indent=1)

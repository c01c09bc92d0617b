"""The outbox and the per-portal pacing under concurrency, in the style of Convoy's queue tests
(`queue/postgres/queue_test.go`): claims never overlap, leases behave, retries and deferrals count
attempts correctly, the bucket holds, and Bitrix24's throttling and permanent errors are obeyed.
Every test runs on SQLite and, when reachable, PostgreSQL."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update
from sqlalchemy.dialects import sqlite

from app import create_app
from b24scribe import folding, outbox, ratelimit
from b24scribe.db import Database
from b24scribe.models import AttachLedger, Base, Call, Job, PortalPacing
from b24scribe.outbox import Claim
from b24scribe.ratelimit import Pace
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import admin, auth, finished_call
from tests.fake_bitrix24 import FakeBitrix24

ATTACH = "telephony.call.attachTranscription"
TRANSCRIPT = {
    "segments": [
        {"start": 0.4, "end": 2.9, "text": "Good afternoon, Acme support.", "channel": 0},
        {"start": 3.2, "end": 6.0, "text": "Hello! I'd like to change my plan.", "channel": 1},
    ]
}
FAST = Pace(rate_per_second=1000.0, burst=1000, lease_seconds=30.0)


# --- helpers -------------------------------------------------------------------------------


def add_jobs(db: Database, count: int, portal: Callable[[int], str | None], now: float | None = None) -> list[int]:
    """`count` pending jobs due at `now`; `portal(i)` names each one's portal (None: unpaced)."""
    with db.write() as session:
        jobs = [outbox.enqueue(session, "fetch", portal=portal(i), now=now) for i in range(count)]
        return [job.id for job in jobs]


def claim(db: Database, owner: str, pace: Pace = FAST, now: float | None = None) -> Claim | None:
    with db.write() as session:
        return outbox.claim_next(session, owner, pace, is_postgres=not db.is_sqlite, now=now)


def finish(db: Database, taken: Claim, now: float | None = None) -> None:
    with db.write() as session:
        job = outbox.leased_job(session, taken)
        assert job is not None, "the lease should still be ours"
        outbox.complete(session, job, {"ok": True}, time.time() if now is None else now)


def job_row(db: Database, job_id: int) -> Job:
    with db.read() as session:
        job = session.get_one(Job, job_id)
        session.expunge(job)
        return job


def pacing_row(db: Database, portal: str) -> PortalPacing:
    with db.read() as session:
        row = session.get_one(PortalPacing, portal)
        session.expunge(row)
        return row


def run_threads(count: int, target: Callable[[int], None], timeout: float = 60.0) -> None:
    """Run `target(i)` in `count` threads at once; re-raise the first failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def body(index: int) -> None:
        try:
            start.wait(timeout=10)
            target(index)
        except BaseException as error:  # surfaced in the test's thread below
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(timeout=max(0.1, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "claiming threads did not finish in time"
    if errors:
        raise errors[0]


# --- claiming ------------------------------------------------------------------------------


def test_concurrent_claimers_never_take_the_same_job(db: Database) -> None:
    ids = add_jobs(db, 300, lambda i: None)
    claimed: list[list[int]] = [[] for _ in range(8)]
    # Every claimer holds one lease before any goes on: eight live leases at once, whatever order
    # the (unfair) write lock hands out turns in, so the run below is concurrent by construction.
    all_hold_one = threading.Barrier(8)

    def claimer(index: int) -> None:
        while (taken := claim(db, f"worker-{index}")) is not None:
            claimed[index].append(taken.job_id)
            if len(claimed[index]) == 1:
                all_hold_one.wait(timeout=30)

    run_threads(8, claimer)

    everything = [job_id for batch in claimed for job_id in batch]
    assert sorted(everything) == sorted(ids), "every job claimed exactly once"
    assert all(claimed), "no claimer was told the queue was empty while jobs were left"
    with db.read() as session:
        owners = {job.id: job.lease_owner for job in session.scalars(select(Job))}
    for index, batch in enumerate(claimed):
        assert all(owners[job_id] == f"worker-{index}" for job_id in batch)


def test_concurrent_workers_take_each_paced_job_once_and_never_more_than_the_slots_of_one_portal(
    db: Database,
) -> None:
    # A fresh portal's pacing row is created by whichever claimer gets there first: concurrently.
    ids = add_jobs(db, 120, lambda i: f"portal-{i % 12}")
    pace = Pace(1000.0, 1000, lease_seconds=30.0, concurrency=2)
    claimed: list[int] = []
    in_flight: dict[str, int] = {}
    most: dict[str, int] = {}
    guard = threading.Lock()

    def worker(index: int) -> None:
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            taken = claim(db, f"worker-{index}", pace)
            if taken is None:
                with db.read() as session:
                    if outbox.counts_by_state(session).get("pending", 0) == 0:
                        return
                time.sleep(0.005)
                continue
            assert taken.portal is not None
            with guard:
                claimed.append(taken.job_id)
                in_flight[taken.portal] = in_flight.get(taken.portal, 0) + 1
                most[taken.portal] = max(most.get(taken.portal, 0), in_flight[taken.portal])
            time.sleep(0.002)  # "the request"
            with guard:  # before the release commits: nobody else can take the slot yet
                in_flight[taken.portal] -= 1
            finish(db, taken)

    run_threads(8, worker)

    assert max(most.values()) <= 2, most
    assert sorted(claimed) == sorted(ids)
    with db.read() as session:
        assert outbox.counts_by_state(session) == {"done": 120}


def test_postgresql_claims_skip_rows_another_claimer_has_locked_without_waiting(db: Database) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE); SKIP LOCKED is PostgreSQL's")
    add_jobs(db, 30, lambda i: None)
    with db.write() as first:
        mine = outbox.claim_next(first, "first", FAST, is_postgres=True)
        assert mine is not None
        started = time.monotonic()
        other = claim(db, "second")  # while the first claim's transaction is still open
        assert time.monotonic() - started < 1.0, "the second claimer did not wait for the first"
    assert other is not None and other.job_id != mine.job_id


def test_postgresql_claimers_never_wait_for_each_others_portal_rows(db: Database) -> None:
    """Two claimers that each hold one portal's row and want the other's would deadlock if they
    waited; a row another claimer holds is skipped instead (that portal is busy being claimed)."""
    if db.is_sqlite:
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE): there is no row lock to wait for")
    now = time.time()
    with db.write() as session:  # both rows exist
        assert set(ratelimit.budgets(session, ["p", "q"], now, FAST, lock=True)) == {"p", "q"}
    outcome: dict[str, object] = {}

    def take(name: str, session_holds: str, wants: str, ready: threading.Barrier) -> None:
        with db.write() as session:
            assert session_holds in ratelimit.budgets(session, [session_holds], now, FAST, lock=True)
            ready.wait(timeout=5)
            started = time.monotonic()
            outcome[name] = ratelimit.budgets(session, [wants], now, FAST, lock=True)
            outcome[name + " waited"] = time.monotonic() - started
            # hold the row until both have tried: one that commits first would free its row for the other
            both_tried.wait(timeout=5)

    ready, both_tried = threading.Barrier(2), threading.Barrier(2)
    threads = [
        threading.Thread(target=take, args=("a", "p", "q", ready), daemon=True),
        threading.Thread(target=take, args=("b", "q", "p", ready), daemon=True),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert outcome.get("a") == {} and outcome.get("b") == {}, outcome  # both skipped
    assert max(float(outcome["a waited"]), float(outcome["b waited"])) < 0.5, outcome  # type: ignore[arg-type]


def test_a_delayed_job_is_not_claimed_early(db: Database) -> None:
    now = time.time()
    (job_id,) = add_jobs(db, 1, lambda i: "p", now=now + 30)

    assert claim(db, "w", now=now) is None
    assert claim(db, "w", now=now + 29.9) is None
    taken = claim(db, "w", now=now + 30)
    assert taken is not None and taken.job_id == job_id


def test_a_live_lease_is_not_reclaimed_but_an_expired_one_is_and_is_claimable(db: Database) -> None:
    now = time.time()
    (job_id,) = add_jobs(db, 1, lambda i: "p", now=now)
    pace = Pace(1000.0, 1000, lease_seconds=10.0)
    first = claim(db, "dead-worker", pace, now=now)
    assert first is not None and not first.ambiguous

    with db.write() as session:
        assert outbox.reclaim_expired(session, now=now + 9) == 0
    assert claim(db, "other", pace, now=now + 9) is None  # still leased, the portal still busy

    with db.write() as session:
        assert outbox.reclaim_expired(session, now=now + 11) == 1
    job = job_row(db, job_id)
    assert (job.state, job.lease_owner, job.attempts, job.ambiguous) == ("pending", None, 0, True)

    second = claim(db, "other", pace, now=now + 11)
    assert second is not None and second.job_id == job_id
    # The request of the dead worker may have gone out: the next one looks before resending.
    assert second.ambiguous is True
    with db.write() as session:  # the dead worker's late write finds the job is not its own
        assert outbox.leased_job(session, first) is None


def test_a_foreign_lease_is_not_renewed(db: Database) -> None:
    now = time.time()
    (job_id,) = add_jobs(db, 1, lambda i: "p", now=now)
    mine = claim(db, "mine", now=now)
    assert mine is not None
    expires = job_row(db, job_id).lease_expires_at
    foreign = Claim(mine.job_id, mine.kind, mine.portal, "someone-else", mine.attempts, mine.ambiguous)

    with db.write() as session:
        assert outbox.renew_leases(session, [foreign], 30.0, now=now + 20) == 0
    assert job_row(db, job_id).lease_expires_at == expires

    with db.write() as session:
        assert outbox.renew_leases(session, [mine], 30.0, now=now + 20) == 1
    assert job_row(db, job_id).lease_expires_at == pytest.approx(now + 50)


# --- attempts --------------------------------------------------------------------------------


def test_retry_increments_attempts_and_releases_the_lease_and_the_portal(db: Database) -> None:
    now = time.time()
    (job_id,) = add_jobs(db, 1, lambda i: "p", now=now)
    taken = claim(db, "w", now=now)
    assert taken is not None
    with db.write() as session:
        job = outbox.leased_job(session, taken)
        assert job is not None
        outbox.retry_later(session, job, "HTTP 500", now, schedule=(10.0, 20.0))

    job = job_row(db, job_id)
    assert (job.state, job.attempts, job.lease_owner, job.last_error) == ("pending", 1, None, "HTTP 500")
    assert 8.0 <= job.next_attempt_at - now <= 12.0  # 10 s ± 20 % jitter
    assert claim(db, "w", now=now + 1) is None
    assert claim(db, "w", now=now + 12.01) is not None


def test_defer_does_not_spend_an_attempt(db: Database) -> None:
    now = time.time()
    (job_id,) = add_jobs(db, 1, lambda i: "p", now=now)
    taken = claim(db, "w", now=now)
    assert taken is not None
    with db.write() as session:
        job = outbox.leased_job(session, taken)
        assert job is not None
        outbox.defer(session, job, now + 3, "QUERY_LIMIT_EXCEEDED", now)

    job = job_row(db, job_id)
    assert (job.state, job.attempts, job.next_attempt_at) == ("pending", 0, now + 3)


def test_a_job_put_off_earlier_in_the_same_transaction_is_hurried_when_what_it_waits_for_ends(db: Database) -> None:
    # The worker writes a batch of outcomes in one transaction: a transcript put off for the call's
    # recording, then the recording's job done. The transcript must go now, not after the wait.
    now = time.time()
    with db.write() as session:
        call = Call(portal="p", stage="finished", created_at=now, updated_at=now)
        session.add(call)
        session.flush()
        call_id = call.id
        attach_id = outbox.enqueue(session, "attach", call_id=call_id, portal="p", now=now).id
    taken = claim(db, "w", now=now)
    assert taken is not None and taken.job_id == attach_id
    with db.write() as session:
        job = outbox.leased_job(session, taken)
        assert job is not None
        outbox.defer(session, job, now + 1800, "waiting for the recording", now)
        outbox.hurry(session, call_id, "attach", "waiting for the recording")
        outbox.run_releases(session, now + 1)

    job = job_row(db, attach_id)
    assert (job.state, job.next_attempt_at) == ("pending", now + 1)


def test_a_job_is_dead_after_the_last_scheduled_retry_and_replay_brings_it_back(db: Database) -> None:
    schedule = (1.0, 2.0, 4.0)
    now = time.time()
    (job_id,) = add_jobs(db, 1, lambda i: "p", now=now)
    delays = []
    for attempt in range(1, 5):
        taken = claim(db, "w", now=now)
        assert taken is not None, f"attempt {attempt} should be claimable"
        with db.write() as session:
            job = outbox.leased_job(session, taken)
            assert job is not None
            outbox.retry_later(session, job, "HTTP 502", now, schedule=schedule)
            delays.append(job.next_attempt_at - now)
        now += 5.0
    job = job_row(db, job_id)
    assert (job.state, job.attempts) == ("dead", 4)
    assert job.last_error == "gave up after 4 attempts: HTTP 502"
    for delay, base in zip(delays, schedule, strict=False):
        assert base * 0.8 <= delay <= base * 1.2
    assert claim(db, "w", now=now + 1e6) is None

    with db.write() as session:
        outbox.replay(session, job_id, now=now)
    job = job_row(db, job_id)
    assert (job.state, job.attempts, job.next_attempt_at) == ("pending", 0, now)
    assert claim(db, "w", now=now) is not None


def test_the_default_schedule_spans_about_three_days_with_a_quick_first_retry() -> None:
    schedule = Settings().retry_schedule
    assert schedule[0] <= 10
    assert 2.5 * 86400 <= sum(schedule) <= 3.5 * 86400
    assert outbox.retry_delay(len(schedule) + 1, schedule=schedule) is None


# --- pacing --------------------------------------------------------------------------------


def test_the_bucket_never_allows_more_than_burst_plus_rate_times_t(db: Database) -> None:
    pace = Pace(rate_per_second=2.0, burst=5, lease_seconds=30.0)
    add_jobs(db, 60, lambda i: "p")
    start = time.time()
    granted: list[float] = []
    with db.write() as session:  # one transaction: simulated time, 10 s in steps of 50 ms
        for step in range(201):
            now = start + step * 0.05
            while (taken := outbox.claim_next(session, "w", pace, not db.is_sqlite, now)) is not None:
                granted.append(now)
                job = outbox.leased_job(session, taken)
                assert job is not None
                outbox.complete(session, job, None, now)

    assert len(granted) == 5 + 2 * 10  # the burst, then 2/s for 10 s
    for first in range(len(granted)):
        for last in range(first, len(granted)):
            window = granted[last] - granted[first]
            assert last - first + 1 <= pace.burst + pace.rate_per_second * window + 1e-6


def test_a_portal_has_its_slots_in_flight_and_a_dead_holder_frees_its_slot_after_its_lease(db: Database) -> None:
    now = time.time()
    add_jobs(db, 4, lambda i: "p", now=now)
    (other,) = add_jobs(db, 1, lambda i: "q", now=now)
    pace = Pace(1000.0, 1000, lease_seconds=5.0, concurrency=2)

    first = claim(db, "a", pace, now=now)
    second = claim(db, "a", pace, now=now)
    assert first is not None and second is not None and {first.portal, second.portal} == {"p"}
    third = claim(db, "b", pace, now=now)
    assert third is not None and third.job_id == other, "another portal is not held up"
    assert claim(db, "b", pace, now=now) is None, "both of p's slots are taken"

    finish(db, first, now)
    fourth = claim(db, "b", pace, now=now)
    assert fourth is not None and fourth.portal == "p", "a finished request frees its slot"
    assert claim(db, "c", pace, now=now) is None
    # A holder dies: its slot comes back with its lease (here: expired; see the heartbeat tests).
    with db.write() as session:
        assert outbox.reclaim_expired(session, now=now + 4.9) == 0
    assert claim(db, "c", pace, now=now + 4.9) is None
    with db.write() as session:
        assert outbox.reclaim_expired(session, now=now + 5.1) == 3
    assert claim(db, "c", pace, now=now + 5.1) is not None


def test_a_batch_claim_takes_what_each_portals_tokens_and_slots_allow_and_one_job_per_call(db: Database) -> None:
    now = time.time()
    pace = Pace(rate_per_second=1.0, burst=3, lease_seconds=30.0, concurrency=2)
    add_jobs(db, 5, lambda i: "few-tokens", now=now)
    add_jobs(db, 5, lambda i: None, now=now)
    with db.write() as session:  # few-tokens has one token left; a fresh portal has the burst
        ratelimit.budgets(session, ["few-tokens"], now, pace, lock=not db.is_sqlite)
        session.execute(update(PortalPacing).values(tokens=1.0, refilled_at=now))
    add_jobs(db, 5, lambda i: "fresh", now=now)

    with db.write() as session:
        claims = outbox.claim_batch(session, "w", pace, not db.is_sqlite, limit=20, now=now)
    by_portal: dict[str | None, int] = {}
    for taken in claims:
        by_portal[taken.portal] = by_portal.get(taken.portal, 0) + 1
    assert by_portal == {"few-tokens": 1, "fresh": 2, None: 5}, "tokens, then slots, bound each portal"
    assert pacing_row(db, "few-tokens").tokens == pytest.approx(0.0)
    assert pacing_row(db, "fresh").tokens == pytest.approx(1.0)
    with db.read() as session:
        assert outbox.counts_by_state(session) == {"leased": 8, "pending": 7}


def test_a_due_retry_is_claimed_before_a_backlog_of_fresh_jobs(db: Database) -> None:
    now = time.time()
    add_jobs(db, 300, lambda i: None, now=now - 60)  # a backlog, due for a minute
    with db.write() as session:
        retry = outbox.enqueue(session, "fetch", now=now - 120)
        retry.attempts, retry.next_attempt_at = 1, now  # failed earlier, due only now
    with db.write() as session:
        claims = outbox.claim_batch(session, "w", FAST, not db.is_sqlite, limit=8, now=now)
    assert claims[0].job_id == retry.id and claims[0].attempts == 1
    assert len(claims) == 8


def test_a_paused_portal_is_not_claimed_until_the_pause_ends(db: Database) -> None:
    now = time.time()
    add_jobs(db, 1, lambda i: "p", now=now)
    claim(db, "w", now=now)  # creates the pacing row
    with db.write() as session:
        session.execute(update(Job).values(state="pending", lease_owner=None))
        ratelimit.pause(session, "p", now + 5, "QUERY_LIMIT_EXCEEDED", now)
    assert claim(db, "w", now=now + 4.9) is None
    assert claim(db, "w", now=now + 5.1) is not None


def test_an_idle_or_throttled_worker_finds_nothing_to_claim_with_a_read(db: Database) -> None:
    """On SQLite the worker asks this before it takes the write lock the hooks wait for."""
    now = time.time()
    with db.read() as session:
        assert not outbox.any_claimable(session, FAST, now)  # nothing queued
    add_jobs(db, 3, lambda i: "p", now=now)
    claim(db, "w", now=now)  # creates the pacing row
    with db.write() as session:
        session.execute(update(Job).values(state="pending", lease_owner=None))
        ratelimit.pause(session, "p", now + 5, "QUERY_LIMIT_EXCEEDED", now)
    with db.read() as session:
        assert not outbox.any_claimable(session, FAST, now + 1)  # only a paused portal's jobs
        assert outbox.any_claimable(session, FAST, now + 5.1)  # the pause is over


# --- delivery: throttling, permanent errors, the ledger --------------------------------------


@pytest.fixture
def portals(settings: Settings, fake_bitrix24: FakeBitrix24) -> dict[str, str]:
    """Two portals on the fake: `first` and `second`, each with its own webhook and bucket."""
    return {
        "first": fake_bitrix24.add_webhook(portal="first"),
        "second": fake_bitrix24.add_webhook(portal="second"),
    }


@pytest.fixture
def service(settings: Settings, db: Database, portals: dict[str, str]) -> Iterator[tuple[Flask, Worker]]:
    """The app and an in-process worker configured for both portals, with a short schedule."""
    configured = settings.with_overrides(
        bitrix24_webhook_url=None, bitrix24_portals=portals, retry_schedule=(0.3, 0.6), bitrix24_timeout=0.5
    )
    app = create_app(configured)
    yield app, Worker(app.extensions["b24scribe.db"], configured, SOURCES)
    app.extensions["b24scribe.db"].dispose()


def post_transcript(client: FlaskClient, call_id: str, portal: str, text: str = "") -> None:
    body = TRANSCRIPT if not text else {"segments": [{"start": 0, "end": 2, "text": text, "channel": 0}]}
    answer = client.post(f"/hooks/stt/generic?b24_call_id={call_id}&portal={portal}", json=body, headers=auth())
    assert answer.status_code == 202, answer.get_data(as_text=True)


def attach_job(app: Flask, call_id: str) -> dict[str, Any]:
    answer = app.test_client().get(f"/v1/calls/by-b24/{call_id}", headers=admin())
    state = answer.get_json()
    assert state is not None
    jobs = [job for job in state["jobs"] if job["kind"] == "attach"]
    return dict(jobs[-1])


def raw_job(app: Flask, job_id: int) -> Job:
    return job_row(app.extensions["b24scribe.db"], job_id)


def test_503_pauses_only_that_portal_and_spends_no_attempt(
    service: tuple[Flask, Worker], portals: dict[str, str], fake_bitrix24: FakeBitrix24, monkeypatch: Any
) -> None:
    app, worker = service
    monkeypatch.setattr(ratelimit, "THROTTLE_PAUSE_SECONDS", 1.0)
    throttled, other = finished_call(portals["first"]), finished_call(portals["second"])
    post_transcript(app.test_client(), throttled, "first")
    fake_bitrix24.inject(ATTACH, 503)  # the next attach, whichever portal it is for
    worker.drain()
    post_transcript(app.test_client(), other, "second")
    worker.drain()

    job = raw_job(app, attach_job(app, throttled)["id"])
    assert (job.state, job.attempts) == ("pending", 0)
    assert job.last_error == "QUERY_LIMIT_EXCEEDED: Too many requests"
    pacing = pacing_row(app.extensions["b24scribe.db"], "first")
    assert pacing.pause_reason == "QUERY_LIMIT_EXCEEDED" and pacing.paused_until > time.time()
    assert attach_job(app, other)["state"] == "done", "the other portal is not paused"

    time.sleep(1.1)
    worker.drain()
    done = attach_job(app, throttled)
    assert (done["state"], done["attempts"]) == ("done", 0)
    assert len(fake_bitrix24.attachments_by_call("first")[throttled]) == 1


def test_429_waits_until_operating_reset_at_and_spends_no_attempt(
    service: tuple[Flask, Worker], portals: dict[str, str], fake_bitrix24: FakeBitrix24
) -> None:
    app, worker = service
    call_id = finished_call(portals["first"])
    post_transcript(app.test_client(), call_id, "first")
    fake_bitrix24.inject_operating_limit(ATTACH, reset_in=1.0)
    worker.drain()

    answered = fake_bitrix24.calls_to(ATTACH)[0].response
    assert isinstance(answered, dict)
    reset_at = answered["time"]["operating_reset_at"]
    job = raw_job(app, attach_job(app, call_id)["id"])
    assert (job.state, job.attempts, job.next_attempt_at) == ("pending", 0, reset_at)
    assert pacing_row(app.extensions["b24scribe.db"], "first").paused_until == reset_at
    if time.time() < reset_at - 0.2:
        assert worker.drain() == 0, "nothing is sent before operating_reset_at"

    time.sleep(max(0.0, reset_at - time.time()) + 0.05)
    worker.drain()
    assert attach_job(app, call_id)["state"] == "done"
    sent = [r.timestamp for r in fake_bitrix24.calls_to(ATTACH)]
    assert len(sent) == 2 and sent[1] >= reset_at


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (
            401,
            {"error": "INVALID_CREDENTIALS", "error_description": "Invalid request credentials"},
            "INVALID_CREDENTIALS",
        ),
        (
            400,
            {"error": "", "error_description": "MESSAGES[0][SIDE] should be either Client or User"},
            "MESSAGES[0][SIDE] should be either Client or User",
        ),
    ],
    ids=["invalid-credentials", "validation"],
)
def test_permanent_errors_go_dead_at_once_with_the_reason_and_are_listed(
    service: tuple[Flask, Worker],
    portals: dict[str, str],
    fake_bitrix24: FakeBitrix24,
    status: int,
    body: dict[str, str],
    reason: str,
) -> None:
    app, worker = service
    call_id = finished_call(portals["first"])
    post_transcript(app.test_client(), call_id, "first")
    fake_bitrix24.inject(ATTACH, status, body)
    worker.drain()

    job = attach_job(app, call_id)
    assert job["state"] == "dead" and job["attempts"] == 0
    assert reason in job["last_error"]
    listed = app.test_client().get("/v1/jobs?state=dead", headers=admin()).get_json()
    assert listed is not None and [j["id"] for j in listed["jobs"]] == [job["id"]]
    cli = app.test_cli_runner().invoke(args=["jobs", "list", "--state", "dead"])
    assert cli.exit_code == 0 and reason in cli.output and "dead" in cli.output

    # The operator fixes the cause and replays: one by one over the API, or all from the CLI.
    replayed = app.test_client().post(f"/v1/jobs/{job['id']}/retry", headers=admin())
    assert replayed.status_code == 202
    worker.drain()
    assert attach_job(app, call_id)["state"] == "done"
    assert len(fake_bitrix24.attachments_by_call("first")[call_id]) == 1


def test_transient_errors_follow_the_configured_schedule_then_die_and_replay_all_dead(
    service: tuple[Flask, Worker], portals: dict[str, str], fake_bitrix24: FakeBitrix24
) -> None:
    app, worker = service  # schedule (0.3, 0.6): three attempts, then dead
    call_id = finished_call(portals["first"])
    post_transcript(app.test_client(), call_id, "first")
    fake_bitrix24.inject(ATTACH, 500, times=3)
    worker.drain()
    job = raw_job(app, attach_job(app, call_id)["id"])
    # on a loaded machine the drain may outlast the first 0.3 s back-off and spend the second attempt
    assert job.state == "pending" and job.attempts in (1, 2)
    scheduled = (0.3, 0.6)[job.attempts - 1]
    assert 0.8 * scheduled - 0.01 <= job.next_attempt_at - job.updated_at <= 1.2 * scheduled + 0.01
    deadline = time.monotonic() + 10
    while raw_job(app, job.id).state != "dead" and time.monotonic() < deadline:
        time.sleep(0.1)
        worker.drain()
    job = raw_job(app, job.id)
    assert (job.state, job.attempts) == ("dead", 3)
    assert job.last_error == "gave up after 3 attempts: INTERNAL_SERVER_ERROR: Internal server error"

    cli = app.test_cli_runner().invoke(args=["jobs", "retry", "--all-dead"])
    assert cli.exit_code == 0 and "replayed 1 job(s)" in cli.output
    worker.drain()
    assert attach_job(app, call_id)["state"] == "done"


def test_the_ledger_stops_a_replayed_job_from_attaching_the_same_transcript_again(
    service: tuple[Flask, Worker], portals: dict[str, str], fake_bitrix24: FakeBitrix24
) -> None:
    app, worker = service
    call_id = finished_call(portals["first"])
    post_transcript(app.test_client(), call_id, "first")
    worker.drain()
    job = attach_job(app, call_id)
    assert job["state"] == "done"
    first_id = job["result"]["TRANSCRIPT_ID"]

    # Its completion is lost (say, restored from an older backup) and an operator replays it.
    db: Database = app.extensions["b24scribe.db"]
    with db.write() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(state="dead", result=None))
    assert app.test_client().post(f"/v1/jobs/{job['id']}/retry", headers=admin()).status_code == 202
    worker.drain()
    # The vendor delivers the same transcript again under a new job id: a new job, the same bytes.
    again = app.test_client().post(
        f"/hooks/stt/generic?b24_call_id={call_id}&portal=first", json={**TRANSCRIPT, "job_id": "redo"}, headers=auth()
    )
    assert again.status_code == 202 and again.get_json()["duplicate"] is False
    worker.drain()

    assert fake_bitrix24.attachments_by_call("first")[call_id] == [first_id]
    assert len(fake_bitrix24.calls_to(ATTACH)) == 1
    assert attach_job(app, call_id)["result"]["TRANSCRIPT_ID"] == first_id
    with db.read() as session:
        assert session.scalars(select(AttachLedger.b24_transcript_id)).all() == [first_id]

    # A changed transcript is a different request: it is sent.
    post_transcript(app.test_client(), call_id, "first", text="A corrected transcript.")
    worker.drain()
    assert len(fake_bitrix24.attachments_by_call("first")[call_id]) == 2


@pytest.mark.parametrize("statistics_visible", [True, False], ids=["lookup", "lookup-denied"])
def test_after_an_ambiguous_failure_bitrix24_is_asked_before_resending(
    settings: Settings, db: Database, portals: dict[str, str], fake_bitrix24: FakeBitrix24, statistics_visible: bool
) -> None:
    # the retry is not due before the test makes it so: a slow machine's first drain cannot reach it
    configured = settings.with_overrides(
        bitrix24_webhook_url=None, bitrix24_portals=portals, retry_schedule=(60.0,), bitrix24_timeout=0.5
    )
    app = create_app(configured)
    worker = Worker(app.extensions["b24scribe.db"], configured, SOURCES)
    fake_bitrix24.configure(deny_statistics=not statistics_visible)
    call_id = finished_call(portals["first"])
    post_transcript(app.test_client(), call_id, "first")
    fake_bitrix24.inject_slow(ATTACH, seconds=1.0)  # performed, answered after the client gave up
    worker.drain()
    job_id = attach_job(app, call_id)["id"]
    job = raw_job(app, job_id)
    assert (job.state, job.attempts, job.ambiguous) == ("pending", 1, True)

    time.sleep(0.6)  # the slow answer has landed in the fake
    with db.write() as session:
        session.execute(update(Job).where(Job.id == job_id).values(next_attempt_at=time.time()))
    worker.drain()
    job_view = attach_job(app, call_id)
    attachments = fake_bitrix24.attachments_by_call("first")[call_id]
    assert job_view["state"] == "done"
    assert len(fake_bitrix24.calls_to("voximplant.statistic.get")) == 1
    if statistics_visible:
        assert len(attachments) == 1 and job_view["result"]["TRANSCRIPT_ID"] == attachments[0]
        assert "possible_duplicate" not in job_view["result"]
    else:
        assert len(attachments) == 2 and job_view["result"]["possible_duplicate"] is True
        with app.extensions["b24scribe.db"].read() as session:
            assert session.scalars(select(AttachLedger.possible_duplicate)).all() == [True]


def test_every_request_of_a_job_takes_a_token(
    settings: Settings, db: Database, portals: dict[str, str], fake_bitrix24: FakeBitrix24
) -> None:
    """The look-up before a resend is a request too: it waits for its own token."""
    paced = settings.with_overrides(
        bitrix24_webhook_url=None,
        bitrix24_portals=portals,
        retry_schedule=(0.3,),
        bitrix24_timeout=0.5,
        rate_per_second=2.0,
        rate_burst=1,
    )
    app = create_app(paced)
    worker = Worker(app.extensions["b24scribe.db"], paced, SOURCES)
    fake_bitrix24.configure(deny_statistics=True)  # the look-up is answered, the resend follows
    call_id = finished_call(portals["first"])
    post_transcript(app.test_client(), call_id, "first")
    fake_bitrix24.inject_slow(ATTACH, seconds=1.0)
    claimed: list[float] = []  # when each claim took its token
    claim_batch = worker.claim_batch

    def timed_claim(limit: int = 32) -> list[Claim]:
        claims = claim_batch(limit)
        claimed.extend(c.claimed_at for c in claims)
        return claims

    worker.claim_batch = timed_claim  # type: ignore[method-assign]
    worker.drain()
    time.sleep(0.6)
    worker.drain()

    assert attach_job(app, call_id)["state"] == "done"
    sent = [(r.method, r.timestamp) for r in fake_bitrix24.requests if r.portal == "first"][-3:]
    assert [method for method, _ in sent] == [ATTACH.lower(), "voximplant.statistic.get", ATTACH.lower()]
    # 2 requests/s with a burst of 1: the retry's claim paid for the look-up, and the resend waited
    # half a second for a token of its own. (A token is taken at the claim, a moment before its
    # request: at most B24SCRIBE_PORTAL_CONCURRENCY tokens of a portal are ever held that way.)
    assert len(claimed) == 2 and claimed[1] - claimed[0] >= 0.45
    assert sent[1][1] >= claimed[1] and sent[2][1] - claimed[1] >= 0.45
    app.extensions["b24scribe.db"].dispose()


def test_a_worker_whose_job_was_reclaimed_while_it_stalled_does_not_send(
    service: tuple[Flask, Worker], portals: dict[str, str], fake_bitrix24: FakeBitrix24
) -> None:
    """Fencing: the lease is checked just before the request, so a worker that stalled past its
    lease (GC pause, lost database) cannot attach behind the back of the job's new owner."""
    app, worker = service
    db: Database = app.extensions["b24scribe.db"]
    call_id = finished_call(portals["first"])
    post_transcript(app.test_client(), call_id, "first")
    folding.apply_pending(db, worker.settings, SOURCES)  # fold the stored event: its attach job is queued
    claimed = worker.claim()
    assert claimed is not None
    # the worker stalls for longer than the lease (its claim is that old when it wakes up) ...
    stalled = dataclasses.replace(claimed, claimed_at=claimed.claimed_at - worker.settings.lease_seconds - 1)
    later = claimed.claimed_at + worker.settings.lease_seconds + 1
    with db.write() as session:  # ... meanwhile its lease expired: another worker sweeps and claims
        assert outbox.reclaim_expired(session, now=later) == 1
        new_owner = outbox.claim_next(session, "new-owner", worker.pace, not db.is_sqlite, now=later)
    assert new_owner is not None and new_owner.job_id == stalled.job_id

    worker.deliverer.run(stalled)  # the stalled worker wakes up

    assert fake_bitrix24.calls_to(ATTACH) == []
    job = raw_job(app, stalled.job_id)
    assert (job.state, job.lease_owner) == ("leased", "new-owner")


def test_a_fresh_claim_of_a_worker_taken_for_dead_is_not_sent(
    service: tuple[Flask, Worker], portals: dict[str, str], fake_bitrix24: FakeBitrix24
) -> None:
    """A fresh claim is sent without reading its lease again only while its worker's heartbeat is
    recent: a worker whose beats stopped (and whose jobs another worker took back) asks the
    database, and does not send."""
    app, worker = service
    db: Database = app.extensions["b24scribe.db"]
    call_id = finished_call(portals["first"])
    post_transcript(app.test_client(), call_id, "first")
    folding.apply_pending(db, worker.settings, SOURCES)
    claimed = worker.claim()
    assert claimed is not None
    dead_after = worker.settings.worker_dead_after_seconds
    worker.beat(now=time.time() - dead_after - 1)  # its last beat is older than the dead-after time
    with db.write() as session:  # a live worker takes its jobs back
        assert outbox.reclaim_dead_workers(session, dead_after, alive="another") == 1

    worker.deliverer.run(claimed)

    assert fake_bitrix24.calls_to(ATTACH) == []
    assert raw_job(app, claimed.job_id).state == "pending"


@pytest.mark.parametrize(
    ("statement", "index"),
    [
        (folding._CANDIDATES, "ix_job_apply_due"),  # the fold's batch of events
        (outbox._CANDIDATES[False, False], "ix_job_claim"),  # a claim's due retries
    ],
    ids=["fold-batch", "claim-retries"],
)
def test_a_backlog_of_other_jobs_is_not_walked_to_find_these(tmp_path: Any, statement: Any, index: str) -> None:
    """SQLite's planner, left to itself, walked ix_job_due (every pending job of every kind) for
    both and sorted what it found: with a delivery backlog of 40,000 jobs that cost 5–7 ms per
    batch and per claim, several times a second. Each must search its own index instead."""
    database = Database(f"sqlite:///{tmp_path}/plans.sqlite3")
    Base.metadata.create_all(database.write_engine)
    sql = str(statement.compile(dialect=sqlite.dialect()))
    with database.read_engine.connect() as connection:
        plan = [row[3] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", (1,) * sql.count("?"))]
    database.dispose()
    assert any(step.startswith("SEARCH job USING INDEX " + index) for step in plan), plan
    assert not any("ix_job_due (state=? AND next_attempt_at" in step for step in plan), plan

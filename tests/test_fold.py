"""Folding stored events in batches: the same calls, transcripts and jobs as one event at a time,
one bad event never blocks the others, a time budget, and concurrent workers on PostgreSQL."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update

from b24scribe import fold, folding
from b24scribe.db import Database
from b24scribe.models import Call, InboundEvent, Job, TranscriptPart
from b24scribe.settings import Settings
from schemas.registry import SOURCES
from tests.conftest import auth

FINISHED = {
    "event": "call.finished",
    "call_id": "A-1",
    "direction": "inbound",
    "from": "+15551234567",
    "to": "+15550000000",
    "extension": "101",
    "started_at": "2026-11-25T10:20:30+01:00",
    "duration": 73,
    "status": "answered",
}
STARTED = {k: v for k, v in FINISHED.items() if k not in ("duration", "status")} | {"event": "call.started"}


def transcript(text: str = "Acme, good morning") -> dict[str, Any]:
    return {"segments": [{"start": 0.5, "end": 2.2, "text": text, "speaker": "A"}]}


@pytest.fixture(autouse=True)
def fresh_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with the first batch size (the module learns it from the writes it times)."""
    monkeypatch.setattr(folding, "_batch_size", folding._BatchSize())


def fold_all(database: Database, settings: Settings) -> int:
    """Fold until nothing is due, as the worker loop does."""
    folded = 0
    while taken := folding.apply_pending(database, settings, SOURCES):
        folded += taken
    return folded


@pytest.fixture
def database(app: Flask) -> Database:
    db: Database = app.extensions["b24scribe.db"]
    return db


@pytest.fixture
def settings_of(app: Flask) -> Settings:
    settings: Settings = app.extensions["b24scribe.settings"]
    return settings


def post(client: FlaskClient, path: str, body: dict[str, Any]) -> int:
    response = client.post(path, json=body, headers=auth())
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.json is not None
    return int(response.json["event_id"])


def store_scenario(client: FlaskClient) -> None:
    """Events out of order, several per call, a second finish, and transcripts of an external call."""
    post(client, "/hooks/stt/generic?pbx=generic&call=A-1", transcript())  # before its call's events
    post(client, "/hooks/pbx/generic", STARTED)
    post(client, "/hooks/pbx/generic", FINISHED)
    post(client, "/hooks/pbx/generic", FINISHED | {"duration": 74, "extension": ""})  # later wins, "" erases nothing
    post(client, "/hooks/pbx/generic", FINISHED | {"call_id": "B-2", "direction": "outbound"})
    post(client, "/hooks/stt/generic?pbx=generic&call=B-2", transcript())
    post(client, "/hooks/pbx/generic", STARTED | {"call_id": "C-3"})
    post(client, "/hooks/stt/generic?b24_call_id=CALL-9", transcript())
    post(client, "/hooks/stt/generic?b24_call_id=CALL-9", transcript("a second part"))


def snapshot(database: Database) -> dict[str, Any]:
    """What folding built, by call (ids left out)."""
    with database.read() as session:
        calls = {call.id: call for call in session.scalars(select(Call))}
        name = {call_id: call.pbx_call_id or call.b24_call_id for call_id, call in calls.items()}
        jobs = session.scalars(select(Job).where(Job.kind != "apply").order_by(Job.id))
        events = session.scalars(select(InboundEvent).order_by(InboundEvent.id))
        parts = session.scalars(select(TranscriptPart).order_by(TranscriptPart.id))
        applies = session.execute(select(Job.state, func.count()).where(Job.kind == "apply").group_by(Job.state))
        return {
            "calls": {
                name[c.id]: (c.stage, c.external, c.direction, c.extension, c.duration, c.answered, c.finish_reported)
                for c in calls.values()
            },
            "jobs": [(j.kind, name[j.call_id or 0], j.state) for j in jobs],
            "events": [name.get(e.call_id or 0) for e in events],
            "transcripts": [(name[p.call_id or 0], p.status, p.delivery_state) for p in parts],
            "applies": dict(applies.all()),
        }


EXPECTED = {
    "calls": {
        "A-1": ("new", False, "inbound", "101", 74, True, True),
        "B-2": ("new", False, "outbound", "101", 73, True, True),
        "C-3": ("new", False, "inbound", "101", None, False, False),
        "CALL-9": ("finished", True, "inbound", None, None, False, True),
    },
    "jobs": [
        ("attach", "A-1", "waiting"),  # the transcript came first: it waits for its call to finish
        ("register", "A-1", "pending"),
        ("finish", "A-1", "waiting"),  # waits for the register; the second finish queues nothing
        ("register", "B-2", "pending"),
        ("finish", "B-2", "waiting"),
        ("attach", "B-2", "waiting"),
        ("register", "C-3", "pending"),
        ("attach", "CALL-9", "pending"),  # one attach sends both parts
    ],
    "events": ["A-1", "A-1", "A-1", "A-1", "B-2", "B-2", "C-3", "CALL-9", "CALL-9"],
    "transcripts": [
        ("A-1", "completed", "queued"),
        ("B-2", "completed", "queued"),
        ("CALL-9", "completed", "queued"),
        ("CALL-9", "completed", "queued"),
    ],
    "applies": {"done": 9},
}


def test_a_batch_builds_the_same_calls_transcripts_and_jobs_as_one_event_at_a_time(
    client: FlaskClient, database: Database, settings_of: Settings
) -> None:
    store_scenario(client)
    assert folding.apply_pending(database, settings_of, SOURCES) == 9  # one batch: every event of every call
    assert snapshot(database) == EXPECTED


def test_one_event_at_a_time_builds_what_a_batch_builds(
    client: FlaskClient, database: Database, settings_of: Settings
) -> None:
    store_scenario(client)
    for _ in range(9):
        assert folding.apply_pending(database, settings_of, SOURCES, limit=1) == 1
    assert folding.apply_pending(database, settings_of, SOURCES) == 0
    assert snapshot(database) == EXPECTED


def test_events_folded_again_later_change_nothing_twice(
    client: FlaskClient, database: Database, settings_of: Settings
) -> None:
    store_scenario(client)
    assert fold_all(database, settings_of) == 9
    # the same events arrive again in a new delivery (a replay, or a PBX that changes its bytes)
    post(client, "/hooks/pbx/generic", FINISHED | {"duration": 75})
    post(client, "/hooks/stt/generic?b24_call_id=CALL-9", transcript("a third part"))
    assert fold_all(database, settings_of) == 2
    after = snapshot(database)
    assert after["calls"]["A-1"][4] == 75
    assert after["jobs"] == EXPECTED["jobs"]  # no second register, finish or attach
    assert len(after["transcripts"]) == 5


def test_a_call_being_registered_gets_no_second_register_and_its_new_transcript_a_new_attach(
    client: FlaskClient, database: Database, settings_of: Settings
) -> None:
    post(client, "/hooks/pbx/generic", FINISHED)
    post(client, "/hooks/stt/generic?pbx=generic&call=A-1", transcript())
    assert fold_all(database, settings_of) == 2
    with database.write() as session:  # the register and the attach are leased by the delivery side
        session.execute(update(Job).where(Job.kind.in_(("register", "attach"))).values(state="leased"))
    post(client, "/hooks/pbx/generic", FINISHED | {"duration": 80})
    post(client, "/hooks/stt/generic?pbx=generic&call=A-1", transcript("a second part"))
    assert folding.apply_pending(database, settings_of, SOURCES) == 2
    jobs = snapshot(database)["jobs"]
    # a leased attach may already have read the parts: the new part needs an attach of its own
    assert jobs == [
        ("register", "A-1", "leased"),
        ("finish", "A-1", "waiting"),
        ("attach", "A-1", "leased"),
        ("attach", "A-1", "waiting"),
    ]


def test_one_bad_event_in_a_batch_is_retried_later_and_the_others_are_folded(
    client: FlaskClient, database: Database, settings_of: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = post(client, "/hooks/pbx/generic", FINISHED)
    bad = post(client, "/hooks/stt/generic?pbx=generic&call=A-1", transcript())
    last = post(client, "/hooks/pbx/generic", FINISHED | {"call_id": "B-2"})
    real = fold._fold_transcript

    def broken_for_one(plan: Any, call: Any, event_id: int, *args: Any) -> None:
        if event_id == bad:
            raise RuntimeError("a bug in the fold")
        real(plan, call, event_id, *args)

    monkeypatch.setattr(fold, "_fold_transcript", broken_for_one)
    assert folding.apply_pending(database, settings_of, SOURCES) == 3
    with database.read() as session:
        applies = {job.event_id: job for job in session.scalars(select(Job).where(Job.kind == "apply"))}
        assert (applies[first].state, applies[last].state) == ("done", "done")
        assert (applies[bad].state, applies[bad].attempts) == ("pending", 1)
        assert applies[bad].last_error == "folding the event failed: RuntimeError"
        assert applies[bad].next_attempt_at > time.time()  # backs off instead of spinning
        assert session.scalar(select(func.count()).select_from(TranscriptPart)) == 0
        assert session.scalar(select(func.count()).where(Job.kind == "register")) == 2
    assert folding.apply_pending(database, settings_of, SOURCES) == 0  # not due yet

    monkeypatch.setattr(fold, "_fold_transcript", real)  # fixed
    with database.write() as session:
        session.execute(update(Job).where(Job.event_id == bad, Job.kind == "apply").values(next_attempt_at=0))
    assert folding.apply_pending(database, settings_of, SOURCES) == 1
    assert snapshot(database)["transcripts"] == [("A-1", "completed", "queued")]


def test_an_event_that_keeps_failing_is_dead_with_the_reason_at_the_end_of_the_schedule(
    client: FlaskClient, database: Database, settings_of: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    event_id = post(client, "/hooks/pbx/generic", FINISHED)

    def broken(*_args: Any) -> None:
        raise RuntimeError("a bug in the fold")

    monkeypatch.setattr(fold, "_fold_call_event", broken)
    one_retry = dataclasses.replace(settings_of, retry_schedule=(0.0,))
    assert folding.apply_pending(database, one_retry, SOURCES, limit=1) == 1  # first failure: due again at once (0 s)
    assert folding.apply_pending(database, one_retry, SOURCES, limit=1) == 1  # second failure: the schedule is over
    with database.read() as session:
        job = session.scalars(select(Job).where(Job.event_id == event_id, Job.kind == "apply")).one()
        assert (job.state, job.attempts) == ("dead", 2)
        assert job.last_error == "folding the event failed: RuntimeError"
    assert folding.apply_pending(database, one_retry, SOURCES) == 0


def test_a_call_takes_at_most_limit_events_and_stops_when_its_time_budget_is_spent(
    client: FlaskClient, database: Database, settings_of: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for number in range(12):
        post(client, "/hooks/pbx/generic", FINISHED | {"call_id": f"call-{number}"})
    assert folding.apply_pending(database, settings_of, SOURCES, limit=3) == 3
    monkeypatch.setattr(folding._batch_size, "events", 4)
    monkeypatch.setattr(folding._batch_size, "observe", lambda *_args: None)
    # a budget already spent still folds one batch, then returns
    assert folding.apply_pending(database, settings_of, SOURCES, budget_seconds=0.0) == 4
    # a budget long enough folds every batch that is due
    assert folding.apply_pending(database, settings_of, SOURCES, budget_seconds=60.0) == 5
    assert snapshot(database)["applies"] == {"done": 12}


def test_events_that_arrive_while_a_batch_is_written_wait_for_the_next_turn(
    client: FlaskClient, database: Database, settings_of: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that took every due event ends the pass: what arrives meanwhile is gathered into the
    next turn's batch, not folded at once in a write transaction of its own (on SQLite each one
    holds the write lock the hooks wait for)."""
    for number in range(3):
        post(client, "/hooks/pbx/generic", FINISHED | {"call_id": f"early-{number}"})
    real_read = folding._read
    arrived: list[int] = []

    def read_while_more_arrive(*args: Any) -> Any:
        if not arrived:  # while the first batch is being read, two more events come in
            arrived.extend(post(client, "/hooks/pbx/generic", FINISHED | {"call_id": f"late-{n}"}) for n in range(2))
        return real_read(*args)

    monkeypatch.setattr(folding, "_read", read_while_more_arrive)
    assert folding.apply_pending(database, settings_of, SOURCES, budget_seconds=60.0) == 3
    assert snapshot(database)["applies"] == {"done": 3, "pending": 2}
    assert folding.apply_pending(database, settings_of, SOURCES, budget_seconds=60.0) == 2
    assert snapshot(database)["applies"] == {"done": 5}


def test_batches_are_sized_so_that_their_writes_stay_short() -> None:
    target = folding.WRITE_SECONDS
    size = folding._BatchSize()
    start = size.events
    size.observe(start, start, target / 4)  # first writes: grow while short, shrink while long
    assert size.events == 2 * start
    size.observe(size.events, size.events, target * 4)
    assert size.events == start
    size.observe(size.events, 3, target / 4)  # few were due: says nothing about a full batch
    assert size.events == start

    def learn(fixed: float, per_event: float) -> int:
        learner = folding._BatchSize()
        for events in (20, 40, 60, 80, 20, 40):
            learner.observe(events, events, fixed + per_event * events)
        return learner.events

    # a write of n events takes fixed + n × per_event: the size whose write takes the target
    assert learn(0.005, 0.0002) == pytest.approx((target - 0.005) / 0.0002, abs=1)
    # a fixed part over the target alone (a slow fsync): smaller batches would not be shorter
    assert learn(0.03, 0.0002) == pytest.approx(0.03 / 0.0002, abs=1)
    assert learn(0.0, 1.0) == folding.MIN_BATCH
    assert learn(0.0, 1e-7) == folding.MAX_BATCH


def test_workers_folding_at_once_fold_every_event_once(
    client: FlaskClient,
    database: Database,
    settings_of: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # PostgreSQL: several workers take different events (SKIP LOCKED) and take turns on a call's row,
    # without deadlocks; SQLite: they take turns on the write lock
    for number in range(40):
        call_id = f"shared-{number % 4}"  # many events of the same few calls, in every batch
        post(
            client,
            "/hooks/pbx/generic",
            (STARTED if number < 4 else FINISHED) | {"call_id": call_id, "duration": number},
        )
        if number % 4 == 0:
            other = f"shared-{number // 4 % 4}"
            post(client, f"/hooks/stt/generic?pbx=generic&call={other}", transcript(f"part {number}"))
    monkeypatch.setattr(folding._batch_size, "events", 3)
    monkeypatch.setattr(folding._batch_size, "observe", lambda *_args: None)
    folded: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while taken := folding.apply_pending(database, settings_of, SOURCES, limit=3):
                folded.append(taken)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert "folding a batch failed" not in capsys.readouterr().out  # no deadlock sent a batch back
    assert sum(folded) == 50
    state = snapshot(database)
    assert state["applies"] == {"done": 50}
    assert sorted(state["calls"]) == [f"shared-{n}" for n in range(4)]
    assert sorted(kind for kind, _, _ in state["jobs"]) == ["attach"] * 4 + ["finish"] * 4 + ["register"] * 4
    # every call has a finish's duration (which one depends on which worker folded last)
    assert all(call[4] is not None and call[4] >= 4 for call in state["calls"].values())


def test_postgres_a_worker_skips_the_events_another_worker_is_folding(
    client: FlaskClient, database: Database, settings_of: Settings
) -> None:
    if database.is_sqlite:
        pytest.skip("SQLite has one writer at a time")
    for number in range(6):
        post(client, "/hooks/pbx/generic", FINISHED | {"call_id": f"call-{number}"})
    with database.write() as other:  # another worker's batch: the three oldest events, locked
        held, _more = folding._load(other, 3, lock=True)
        assert len(held) == 3
        taken: list[int] = []
        meanwhile = threading.Thread(target=lambda: taken.append(folding.apply_pending(database, settings_of, SOURCES)))
        meanwhile.start()
        meanwhile.join(10)
        assert not meanwhile.is_alive(), "the worker waited for the events another worker holds"
        assert taken == [3]  # the other three
    assert folding.apply_pending(database, settings_of, SOURCES) == 3  # released: now those
    assert snapshot(database)["applies"] == {"done": 6}

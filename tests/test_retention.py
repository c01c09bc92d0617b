"""Retention: after B24SCRIBE_RETENTION_DAYS the raw bodies and transcript text of finished calls are
purged by the worker, while the admin API and the status page still tell what happened."""

from __future__ import annotations

import time

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from b24scribe import retention
from b24scribe.db import Database
from b24scribe.models import InboundEvent, Job, TranscriptPart
from b24scribe.replay import replay_event
from b24scribe.settings import Settings
from b24scribe.worker import Worker
from schemas.registry import SOURCES
from tests.conftest import admin, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.operations import CALL_ID, FINISHED, SENTENCE, post_call, post_transcript

DAY = 86400.0


def later(days: float) -> float:
    """A moment `days` from now."""
    return time.time() + days * DAY


def delivered_call(client: FlaskClient, worker: Worker, call_id: str = CALL_ID) -> tuple[int, int]:
    """A call registered, finished and its transcript attached; (the call event's id, the transcript event's id)."""
    call_event = post_call(client, call_id)["event_id"]
    transcript_event = post_transcript(client, call_id)["event_id"]
    worker.drain()
    return call_event, transcript_event


def test_the_defaults_keep_thirty_days() -> None:
    assert Settings().retention_days == 30.0
    assert retention.cutoff(30, now=100 * DAY) == 70 * DAY


def test_a_delivered_call_older_than_retention_loses_its_text_but_not_its_story(
    client: FlaskClient, worker: Worker, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    call_event, transcript_event = delivered_call(client, worker)
    before = client.get(f"/v1/calls/generic/{CALL_ID}", headers=admin()).get_json()

    report, end = retention.purge(db, 30, now=later(31))

    assert end is None
    assert (report.events, report.transcripts, report.requests, report.kept_open) == (2, 1, 1, 0)
    with db.read() as session:
        for event in session.scalars(select(InboundEvent)):
            assert event.body == b"" and event.purged_at is not None
            assert event.state == "accepted" and event.call_id is not None
        part = session.scalars(select(TranscriptPart)).one()
        assert part.segments is None and part.delivery_state == "delivered" and part.b24_transcript_id is not None
        attach = session.scalars(select(Job).where(Job.kind == "attach")).one()
        assert attach.request is None and attach.state == "done" and attach.result
    after = client.get(f"/v1/calls/generic/{CALL_ID}", headers=admin()).get_json()
    assert SENTENCE in str(before) and SENTENCE not in str(after)
    assert [t["state"] for t in after["transcripts"]] == ["delivered"]
    assert after["transcripts"][0]["transcript_id"] == before["transcripts"][0]["transcript_id"]
    assert after["b24_call_id"] == before["b24_call_id"]
    shown = client.get(f"/v1/events/{transcript_event}", headers=admin()).get_json()
    assert shown["outcome"] == "folded" and shown["purged_at"] is not None and shown["body_bytes"] == 0
    assert client.get(f"/v1/events/{call_event}", headers=admin()).get_json()["call"]["b24_call_id"]


def test_a_late_retry_of_a_purged_webhook_is_still_a_duplicate(
    client: FlaskClient, worker: Worker, db: Database
) -> None:
    call_event, _ = delivered_call(client, worker)
    retention.purge(db, 30, now=later(31))

    again = client.post("/hooks/pbx/generic", json=FINISHED, headers=auth())

    assert again.status_code == 200
    assert again.get_json() == {"event_id": call_event, "duplicate": True}


def test_recent_events_and_open_work_are_kept(client: FlaskClient, worker: Worker, db: Database) -> None:
    post_call(client, "finished-and-sent")
    worker.drain()
    post_call(client, "waiting-call", event="call.started")
    post_transcript(client, "waiting-call")  # its attach job waits for the call to finish
    from b24scribe import folding

    folding.apply_pending(db, worker.settings, SOURCES)

    nothing_old = retention.purge(db, 30)[0]
    report = retention.purge(db, 30, now=later(31))[0]

    assert nothing_old.events == 0
    assert report.events == 1  # the call that is done
    assert report.kept_open == 2  # the waiting call's start and its transcript
    with db.read() as session:
        part = session.scalars(select(TranscriptPart)).one()
        assert part.segments  # its call is still being sent: the text stays
        kept = session.scalars(select(InboundEvent).where(InboundEvent.purged_at.is_(None))).all()
        assert len(kept) == 2 and all(event.body for event in kept)


def test_an_event_not_yet_folded_is_kept(client: FlaskClient, db: Database) -> None:
    post_call(client)  # stored, its apply job still pending: no worker ran

    report = retention.purge(db, 30, now=later(31))[0]

    assert (report.events, report.kept_open) == (0, 1)


def test_an_old_rejected_event_is_purged_and_then_not_replayed(
    client: FlaskClient, db: Database, settings: Settings
) -> None:
    rejected = client.post("/hooks/pbx/generic", json={**FINISHED, "status": "voicemail"}, headers=auth())
    event_id = rejected.get_json()["error"]["fields"]["event_id"]

    report = retention.purge(db, 30, now=later(31))[0]
    replayed = replay_event(db, settings, SOURCES, event_id)

    assert (report.events, report.rejected_events) == (1, 1)
    assert (replayed.outcome, replayed.detail) == ("skipped", "purged by retention: its body is no longer stored")
    shown = client.get(f"/v1/events/{event_id}", headers=admin()).get_json()
    assert shown["outcome"] == "rejected" and "status" in shown["reason"]  # the reason is kept


def test_the_worker_purges_in_small_batches_and_moves_past_what_it_must_keep(
    client: FlaskClient, worker: Worker, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "BATCH", 2)
    monkeypatch.setattr(retention, "HOUSEKEEPING_BATCHES", 2)
    post_call(client, "kept-1", event="call.started")
    post_transcript(client, "kept-1")
    post_call(client, "kept-2", event="call.started")
    post_transcript(client, "kept-2")
    for n in range(6):
        post_call(client, f"done-{n}")
    worker.drain()
    writes: list[int] = []
    real_write = db.write

    def counted_write():  # type: ignore[no-untyped-def]
        writes.append(1)
        return real_write()

    rounds = []
    for _ in range(3):  # each round resumes where the last stopped: 3 rounds of 2 batches of 2 see all 10
        monkeypatch.setattr(db, "write", counted_write)
        retention.purge_expired(db, 30, now=later(31))
        monkeypatch.setattr(db, "write", real_write)
        rounds.append(len(writes))
        writes.clear()

    with db.read() as session:
        purged = session.scalars(select(InboundEvent.id).where(InboundEvent.purged_at.is_not(None))).all()
        kept = session.scalars(select(InboundEvent.id).where(InboundEvent.purged_at.is_(None))).all()
    assert all(n <= 2 for n in rounds)  # at most two short write transactions per round
    # the waiting calls' transcripts are kept (their attach jobs are open); everything else went
    assert len(purged) == 8 and len(kept) == 2
    with db.read() as session:
        assert all(part.segments for part in session.scalars(select(TranscriptPart)))


def test_the_worker_housekeeping_purges(client: FlaskClient, worker: Worker, db: Database) -> None:
    delivered_call(client, worker)

    worker.housekeeping()
    with db.read() as session:
        assert session.scalar(select(InboundEvent.purged_at).limit(1)) is None  # nothing is 30 days old yet
    worker.housekeeping(now=later(31))

    with db.read() as session:
        assert all(event.purged_at for event in session.scalars(select(InboundEvent)))
        assert session.scalars(select(TranscriptPart.segments)).one() is None


def test_a_channel_arriving_after_its_other_channel_was_purged_is_not_sent_as_the_whole_transcript(
    client: FlaskClient, worker: Worker, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    post_call(client, CALL_ID)
    one_channel = {"segments": [{"start": 0.5, "end": 2.0, "text": "Good afternoon", "channel": 0}]}
    other_channel = {"segments": [{"start": 2.5, "end": 4.0, "text": "Hello there", "channel": 0}]}
    first = client.post(f"/hooks/stt/generic?pbx=generic&call={CALL_ID}&channel=0", json=one_channel, headers=auth())
    assert first.status_code == 202
    worker.drain()
    assert len(fake_bitrix24.calls_to("telephony.call.attachTranscription")) == 1
    retention.purge(db, 30, now=later(31))

    late = client.post(f"/hooks/stt/generic?pbx=generic&call={CALL_ID}&channel=1", json=other_channel, headers=auth())
    assert late.status_code == 202
    worker.drain()

    # the card keeps the whole transcript it has rather than being replaced by one channel
    assert len(fake_bitrix24.calls_to("telephony.call.attachTranscription")) == 1
    with db.read() as session:
        dead = session.scalars(select(Job).where(Job.kind == "attach", Job.state == "dead")).one()
    assert dead.last_error is not None and "purged" in dead.last_error

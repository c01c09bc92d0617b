"""The operator's commands: `check`, `jobs list/retry`, `events list/replay`, `calls show`, `db upgrade`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import Result
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app import create_app
from b24scribe import migrate
from b24scribe.db import Database
from b24scribe.events import RawEvent
from b24scribe.models import InboundEvent, Job
from b24scribe.settings import Settings
from b24scribe.sources import SttVendor
from b24scribe.transcript import Segment, Transcript, VendorResult
from b24scribe.worker import Worker
from schemas import registry
from schemas.registry import SOURCES
from tests.conftest import ADMIN_TOKEN, INBOUND_TOKEN, auth
from tests.fake_bitrix24 import FakeBitrix24
from tests.operations import CALL_ID, FINISHED, SENTENCE, free_port, make_dead_attach, post_call, post_transcript

Invoke = Callable[..., Result]


def invoker(app: Flask) -> Invoke:
    runner = app.test_cli_runner()

    def invoke(*args: str) -> Result:
        return runner.invoke(args=list(args))

    return invoke


@pytest.fixture
def cli(app: Flask) -> Invoke:
    return invoker(app)


@pytest.fixture
def migrated(settings: Settings) -> Flask:
    """An app whose database was made by the migrations, as `flask db upgrade` does in production."""
    migrate.upgrade(settings.database_url)
    return create_app(settings)


# -- check ----------------------------------------------------------------------------------------


def secret_free(result: Result, fake: FakeBitrix24) -> None:
    code = fake.webhook_url.rstrip("/").rsplit("/", 1)[1]
    for secret in (code, fake.webhook_url, INBOUND_TOKEN, ADMIN_TOKEN):
        assert secret not in result.output


def test_check_passes_on_a_migrated_database_and_a_reachable_portal(
    migrated: Flask, fake_bitrix24: FakeBitrix24
) -> None:
    result = invoker(migrated)("check")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert not [line for line in lines if not line.startswith(("ok: ", "warning: "))], lines
    assert "warning: portal 127.0.0.1" in result.output and "plain http" in result.output  # the fake is http
    assert any("newest migration" in line for line in lines)
    assert any(f"portal {fake_bitrix24.base_url.split('//')[1]}: reachable" in line for line in lines)
    assert any("telephony" in line for line in lines)
    secret_free(result, fake_bitrix24)
    assert [r.method for r in fake_bitrix24.requests] == ["scope", "user.current"]


def test_check_finds_a_database_that_was_never_migrated(cli: Invoke) -> None:
    result = cli("check")  # the test database was made with create_all, not by the migrations

    assert result.exit_code == 1
    assert "problem: the database has no schema yet: run `flask --app app db upgrade`" in result.output


def test_db_upgrade_then_check(settings: Settings, fake_bitrix24: FakeBitrix24) -> None:
    cli = invoker(create_app(settings))

    upgrade = cli("db", "upgrade")
    check = cli("check")

    assert upgrade.exit_code == 0 and "database is up to date" in upgrade.output
    assert check.exit_code == 0, check.output


def test_check_names_a_missing_telephony_scope(
    migrated: Flask, settings: Settings, fake_bitrix24: FakeBitrix24
) -> None:
    url = fake_bitrix24.add_webhook(code="crmonlywebhook77", scopes=("crm", "user"))
    cli = invoker(create_app(settings.with_overrides(bitrix24_webhook_url=url)))

    result = cli("check")

    assert result.exit_code == 1
    assert "the webhook lacks the telephony scope (it has: crm, user)" in result.output
    assert "crmonlywebhook77" not in result.output


def test_check_names_refused_credentials_without_printing_the_webhook(
    migrated: Flask, settings: Settings, fake_bitrix24: FakeBitrix24
) -> None:
    url = f"{fake_bitrix24.base_url}/rest/1/revokedcode1234/"
    cli = invoker(create_app(settings.with_overrides(bitrix24_webhook_url=url)))

    result = cli("check")

    assert result.exit_code == 1
    assert "Bitrix24 refused the webhook (INVALID_CREDENTIALS" in result.output
    assert "revokedcode1234" not in result.output


def test_check_names_an_unreachable_portal(migrated: Flask, settings: Settings) -> None:
    url = f"http://127.0.0.1:{free_port()}/rest/1/unreachable99/"
    cli = invoker(create_app(settings.with_overrides(bitrix24_webhook_url=url, bitrix24_timeout=1.0)))

    result = cli("check")

    assert result.exit_code == 1
    assert "is unreachable (could not connect to Bitrix24" in result.output
    assert "unreachable99" not in result.output


def test_check_says_what_missing_secrets_mean(migrated: Flask, settings: Settings) -> None:
    cli = invoker(
        create_app(
            settings.with_overrides(
                inbound_token=None, webhook_secret=None, admin_token=None, bitrix24_webhook_url=None
            )
        )
    )

    result = cli("check")

    assert result.exit_code == 1
    assert "problem: B24SCRIBE_INBOUND_TOKEN is not set: every hook answers 503" in result.output
    assert "warning: B24SCRIBE_ADMIN_TOKEN is not set" in result.output
    assert "warning: B24SCRIBE_BITRIX24_WEBHOOK_URL is not set: dry-run" in result.output


def test_check_warns_of_a_short_metrics_token(migrated: Flask, settings: Settings) -> None:
    short = invoker(create_app(settings.with_overrides(metrics_token="short")))("check")
    long_enough = invoker(create_app(settings.with_overrides(metrics_token="m" * 24)))("check")

    assert "warning: B24SCRIBE_METRICS_TOKEN is shorter than 16 characters" in short.output
    assert "METRICS_TOKEN" not in long_enough.output
    assert "short" not in short.output.replace("shorter", "")  # the token itself is never printed


# -- jobs -----------------------------------------------------------------------------------------


def test_jobs_list_shows_dead_jobs_with_their_reason(
    cli: Invoke, client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24
) -> None:
    make_dead_attach(client, worker, fake_bitrix24)

    result = cli("jobs", "list", "--state", "dead")

    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "counts: dead=1, done=4"  # two stored events folded, register, finish
    assert len(lines) == 2
    assert "\tattach\tdead\tattempts=0\t" in lines[1]
    assert "Transcription is too long for this portal" in lines[1]


def test_jobs_retry_all_dead_replays_them(
    cli: Invoke, client: FlaskClient, worker: Worker, fake_bitrix24: FakeBitrix24, db: Database
) -> None:
    make_dead_attach(client, worker, fake_bitrix24)
    make_dead_attach(client, worker, fake_bitrix24, call_id="second")

    result = cli("jobs", "retry", "--all-dead")

    assert result.exit_code == 0
    assert result.output.strip() == "replayed 2 job(s)"
    worker.drain()
    with db.read() as session:
        assert {job.state for job in session.query(Job)} == {"done"}


def test_jobs_retry_names_what_it_left_alone(cli: Invoke, client: FlaskClient, worker: Worker) -> None:
    post_call(client)
    worker.drain()

    result = cli("jobs", "retry", "1", "999")
    usage = cli("jobs", "retry")

    assert "1: is done, not dead; left alone" in result.output
    assert "999: no such job" in result.output
    assert "replayed 0 job(s)" in result.output
    assert usage.exit_code == 2 and "name job ids or pass --all-dead" in usage.output


def test_calls_show_prints_the_call_as_json(cli: Invoke, client: FlaskClient, worker: Worker) -> None:
    post_call(client)
    worker.drain()

    by_pbx = cli("calls", "show", CALL_ID, "--pbx", "generic")
    shown = json.loads(by_pbx.output)
    by_b24 = cli("calls", "show", shown["b24_call_id"])
    missing = cli("calls", "show", "nope")

    assert shown["stage"] == "finished"
    assert json.loads(by_b24.output)["id"] == shown["id"]
    assert missing.exit_code == 1 and "no such call" in missing.output


# -- events replay --------------------------------------------------------------------------------


def rejected_pbx_event(client: FlaskClient) -> int:
    response = client.post("/hooks/pbx/generic?portal=acme", json=FINISHED, headers=auth())
    assert response.status_code == 422
    event_id: int = response.get_json()["error"]["fields"]["event_id"]
    return event_id


def test_a_rejected_event_passes_after_the_configuration_is_fixed(
    client: FlaskClient, settings: Settings, db: Database, fake_bitrix24: FakeBitrix24
) -> None:
    """The PBX was pointed at a portal nobody configured; once it is, the kept event is replayed."""
    event_id = rejected_pbx_event(client)
    listed = invoker(create_app(settings))("events", "list", "--rejected")
    assert f"{event_id}\tpbx/generic\trejected\t" in listed.output
    assert "portal: must be a portal's name, domain or member_id; known:" in listed.output

    acme = fake_bitrix24.add_webhook(code="acmewebhook", portal="acme")
    fixed = create_app(settings.with_overrides(bitrix24_portals={"acme": acme}))
    result = invoker(fixed)("events", "replay", "--rejected")

    assert result.exit_code == 0, result.output
    assert f"{event_id}: accepted: stored as event " in result.output
    assert result.output.splitlines()[-1] == "replayed 1 event(s), 1 accepted"
    Worker(db, fixed.extensions["b24scribe.settings"], SOURCES).drain()
    assert len(fake_bitrix24.portal_state("acme").statistics) == 1  # registered and finished on acme
    with db.read() as session:
        old = session.get_one(InboundEvent, event_id)
        assert old.state == "replayed" and old.error is not None
        assert session.get_one(InboundEvent, old.error["replayed_as"]).state == "accepted"
    again = invoker(fixed)("events", "replay", str(event_id))
    assert "skipped: already replayed as event" in again.output


def test_a_still_broken_event_stays_rejected_with_its_reason(client: FlaskClient, cli: Invoke, db: Database) -> None:
    event_id = rejected_pbx_event(client)

    result = cli("events", "replay", str(event_id))

    assert result.exit_code == 0
    assert f"{event_id}: rejected: still rejected: portal: must be one of" in result.output
    with db.read() as session:
        assert session.get_one(InboundEvent, event_id).state == "rejected"


def test_replay_of_an_unknown_event_fails(cli: Invoke) -> None:
    result = cli("events", "replay", "424242")

    assert result.exit_code == 1
    assert "424242: missing: no such event" in result.output
    assert cli("events", "replay").exit_code == 2


def test_a_rejected_transcript_is_stored_after_a_parser_fix(
    client: FlaskClient, cli: Invoke, worker: Worker, fake_bitrix24: FakeBitrix24, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vendor parser bug rejected a good callback; after the fix the kept raw body goes through."""
    from marshmallow import ValidationError

    post_call(client)
    worker.drain()

    def buggy(_body: bytes, _query: Any) -> VendorResult:
        raise ValidationError({"segments": ["the parser had a bug"]})

    fixed = registry.STT_VENDORS["generic"]
    monkeypatch.setitem(registry.STT_VENDORS, "generic", SttVendor(name="generic", parse=buggy))
    response = client.post(
        f"/hooks/stt/generic?pbx=generic&call={CALL_ID}&token={INBOUND_TOKEN}",
        json={"segments": [{"start": 0.0, "end": 2.0, "text": SENTENCE, "side": "Client"}]},
    )
    assert response.status_code == 422
    monkeypatch.setitem(registry.STT_VENDORS, "generic", fixed)

    result = cli("events", "replay", "--rejected", "--source", "stt")
    worker.drain()

    assert ": accepted: stored as event" in result.output
    attached = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert len(attached) == 1 and SENTENCE in json.dumps(attached[0].params)


def test_an_accepted_transcript_is_translated_again_and_resent_only_if_it_changed(
    client: FlaskClient, cli: Invoke, worker: Worker, fake_bitrix24: FakeBitrix24, monkeypatch: pytest.MonkeyPatch
) -> None:
    post_call(client)
    event_id = post_transcript(client)["event_id"]
    worker.drain()
    assert len(fake_bitrix24.calls_to("telephony.call.attachTranscription")) == 1

    unchanged = cli("events", "replay", str(event_id))
    worker.drain()
    assert f"{event_id}: retranslated: translated again (2 segments); attach queued" in unchanged.output
    assert len(fake_bitrix24.calls_to("telephony.call.attachTranscription")) == 1  # the ledger knew it

    def fixed(_body: bytes, _query: Any) -> VendorResult:  # say, a fixed unit conversion
        return VendorResult(
            status="completed",
            transcript=Transcript(segments=[Segment(0.0, 3.0, "Corrected text", side=None, speaker="A")]),
        )

    monkeypatch.setitem(registry.STT_VENDORS, "generic", SttVendor(name="generic", parse=fixed))
    changed = cli("events", "replay", str(event_id))
    worker.drain()

    assert f"{event_id}: retranslated" in changed.output
    attached = fake_bitrix24.calls_to("telephony.call.attachTranscription")
    assert len(attached) == 2 and "Corrected text" in json.dumps(attached[1].params)


def test_accepted_call_events_are_not_replayed(client: FlaskClient, cli: Invoke) -> None:
    event_id = post_call(client)["event_id"]

    result = cli("events", "replay", str(event_id))

    assert f"{event_id}: skipped: accepted call events were folded into their call" in result.output


def test_the_raw_event_keeps_no_token(client: FlaskClient, db: Database) -> None:
    client.post(f"/hooks/pbx/generic?portal=acme&token={INBOUND_TOKEN}", json=FINISHED)

    with db.read() as session:
        stored = session.query(InboundEvent).one()
        raw: RawEvent = RawEvent(stored.source, stored.provider, stored.body, stored.query, stored.content_type)
    assert raw.query == {"portal": "acme"}


def test_purge_empties_old_finished_events_and_says_what_it_did(
    cli: Invoke, client: FlaskClient, worker: Worker, db: Database
) -> None:
    post_call(client)
    post_transcript(client)
    worker.drain()
    post_call(client, "still-open", event="call.started")  # not folded yet: kept

    kept_recent = cli("purge")
    purged = cli("purge", "--older-than", "0")

    assert kept_recent.exit_code == 0, kept_recent.output
    assert "(30 days ago)" in kept_recent.output and "purged 0 event body(ies)" in kept_recent.output
    assert purged.exit_code == 0, purged.output
    assert "purged 2 event body(ies) (pbx 1, stt 1), 0 of them rejected" in purged.output
    assert "purged the text of 1 transcript(s) and 1 attach request(s)" in purged.output
    assert "kept 1 old event(s) whose call or jobs are still open" in purged.output
    with db.read() as session:
        assert [bool(event.body) for event in session.scalars(select(InboundEvent).order_by(InboundEvent.id))] == [
            False,
            False,
            True,
        ]


def test_purge_refuses_a_negative_age(cli: Invoke) -> None:
    result = cli("purge", "--older-than", "-3")

    assert result.exit_code == 2
    assert "--older-than" in result.output


def test_events_list_prints_any_stored_content_safely(cli: Invoke, db: Database) -> None:
    hostile = "lone \ud800 and NUL \x00" if db.is_sqlite else "escape \x1b[31m"
    with db.write() as session:
        session.add(
            InboundEvent(
                source="pbx",
                provider="generic",
                dedupe_key="hostile",
                received_at=1.0,
                query={},
                body=b"\xed\xa0\x80",
                state="rejected",
                error={"message": hostile, "fields": {hostile: [hostile]}},
            )
        )

    result = cli("events", "list", "--rejected")

    assert result.exit_code == 0, result.output
    assert "\ufffd" in result.output and "\x00" not in result.output and "\x1b" not in result.output

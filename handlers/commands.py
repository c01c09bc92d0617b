"""CLI commands (`flask --app app …`): the worker, migrations, and the operator's tools."""

from __future__ import annotations

import json
import logging
import time

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext
from sqlalchemy import func, or_, select
from sqlalchemy.orm import defer

from b24scribe import metrics, migrate, outbox, retention
from b24scribe.calls import AmbiguousCall, describe_call, describe_job, find_by_b24, find_by_pbx, iso
from b24scribe.checks import has_problems, install_url, run_checks
from b24scribe.db import Database
from b24scribe.models import OPEN_JOB_STATES, InboundEvent, Job, Portal
from b24scribe.replay import field_summary, rejected_event_ids, replay_event
from b24scribe.settings import Settings
from b24scribe.sources import Sources
from b24scribe.worker import Worker
from handlers.admin import describe_portals, displayable, portals_snapshot


def _settings() -> Settings:
    settings: Settings = current_app.extensions["b24scribe.settings"]
    return settings


def _db() -> Database:
    db: Database = current_app.extensions["b24scribe.db"]
    return db


def _sources() -> Sources:
    sources: Sources = current_app.extensions["b24scribe.sources"]
    return sources


@click.command("worker")
@click.option("--threads", default=1, show_default=True, help="claim loops in this process")
@click.option("--migrate/--no-migrate", "run_migrations", default=False, help="upgrade the database first")
def worker_command(threads: int, run_migrations: bool) -> None:
    """Deliver outbox jobs to Bitrix24 until SIGTERM."""
    if run_migrations:
        migrate.upgrade(_settings().database_url)
    # Counters go where the web processes' /metrics merges them (see b24scribe.metrics).
    metrics.prepare_multiprocess_dir(_settings().database_url)
    Worker(_db(), _settings(), _sources(), threads=threads).run_forever()


db_group = AppGroup("db", help="Database schema.")


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations up to the newest (the Procfile's release step)."""
    migrate.upgrade(_settings().database_url)
    click.echo("database is up to date")


jobs_group = AppGroup("jobs", help="The outbox.")


@jobs_group.command("list")
@click.option("--state", type=click.Choice(["waiting", "pending", "leased", "done", "dead"]), default=None)
@click.option("--limit", default=50, show_default=True)
def jobs_list(state: str | None, limit: int) -> None:
    """Counts by state, then one line per job (newest first)."""
    with _db().read() as session:
        counts = outbox.counts_by_state(session)
        click.echo("counts: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no jobs"))
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            query = query.where(Job.state == state)
        for job in session.scalars(query):
            shown = describe_job(job)
            click.echo(
                displayable(
                    f"{shown['id']}\t{shown['kind']}\t{shown['state']}\tattempts={shown['attempts']}\t"
                    f"call={shown['call']}\t{shown['last_error'] or ''}"
                )
            )


@jobs_group.command("retry")
@click.argument("job_ids", nargs=-1, type=int)
@click.option("--all-dead", is_flag=True, help="replay every dead job")
def jobs_retry(job_ids: tuple[int, ...], all_dead: bool) -> None:
    """Replay dead jobs: the given ids, or all of them."""
    if not job_ids and not all_dead:
        raise click.UsageError("name job ids or pass --all-dead")
    with _db().write() as session:
        ids = list(job_ids) or list(session.scalars(select(Job.id).where(Job.state == "dead")))
        replayed = 0
        for job_id in ids:
            job = session.get(Job, job_id)
            if job is None:
                click.echo(f"{job_id}: no such job", err=True)
            elif job.state != "dead":
                click.echo(f"{job_id}: is {job.state}, not dead; left alone", err=True)
            else:
                outbox.replay(session, job_id)
                replayed += 1
    click.echo(f"replayed {replayed} job(s)")


calls_group = AppGroup("calls", help="Calls and their transcripts.")


@calls_group.command("show")
@click.argument("reference")
@click.option("--pbx", default=None, help="the PBX the id belongs to (else REFERENCE is a Bitrix24 CALL_ID)")
@click.option("--portal", default=None, help="the portal the PBX call belongs to (needed when several have one)")
def calls_show(reference: str, pbx: str | None, portal: str | None) -> None:
    """A call's state as JSON, by Bitrix24 CALL_ID or (with --pbx) by the PBX's call id."""
    with _db().read() as session:
        try:
            call = find_by_pbx(session, pbx, reference, portal) if pbx else find_by_b24(session, reference)
        except AmbiguousCall as ambiguous:
            raise click.ClickException(f"{ambiguous}: add --portal") from None
        if call is None:
            raise click.ClickException("no such call")
        click.echo(json.dumps(displayable(describe_call(session, call)), indent=2, ensure_ascii=False))


portals_group = AppGroup("portals", help="Bitrix24 portals: webhook ones (settings) and installed ones.")


@portals_group.command("list")
def portals_list() -> None:
    """One line per portal: name, kind, state, member_id, jobs waiting, pending and dead, and why."""
    snapshot = portals_snapshot()
    with _db().read() as session:
        portals = describe_portals(session, snapshot, _settings(), time.time())
    if not portals:
        click.echo(
            "no portals: set B24SCRIBE_BITRIX24_WEBHOOK_URL, or configure the local application "
            f"(B24SCRIBE_BITRIX24_CLIENT_ID) and install it from the portal ({install_url(_settings())})"
        )
    for portal in portals:
        jobs = portal["jobs"]
        why = f"\t{portal['state_reason']}" if portal["state_reason"] else ""
        click.echo(
            displayable(
                f"{portal['name']}\t{portal['kind']}\t{portal['state']}\tmember_id={portal['member_id'] or ''}\t"
                f"waiting={jobs['waiting']}\tpending={jobs['pending']}\tdead={jobs['dead']}{why}"
            )
        )
        if portal["fix"]:
            click.echo(displayable(f"  to fix: {portal['fix']}"))


@portals_group.command("show")
@click.argument("reference", metavar="NAME_OR_MEMBER_ID")
def portals_show(reference: str) -> None:
    """A portal as JSON, its own inbound token included: state, why, what to do, pacing and jobs."""
    snapshot = portals_snapshot()
    name = snapshot.resolve(reference)
    if name is None:
        raise click.ClickException(
            displayable(f"no portal {reference!r}; known: {', '.join(snapshot.portals) or 'none'}")
        )
    with _db().read() as session:
        shown = next(p for p in describe_portals(session, snapshot, _settings(), time.time()) if p["name"] == name)
    click.echo(json.dumps(displayable(shown), indent=2, ensure_ascii=False))


@portals_group.command("remove")
@click.argument("reference", metavar="NAME_OR_MEMBER_ID")
@click.option("--yes", is_flag=True, help="really forget the portal: its tokens and its own inbound token")
def portals_remove(reference: str, yes: bool) -> None:
    """Forget an installed portal: its OAuth tokens and its own inbound token. Its jobs are kept.
    Webhook portals are settings: remove them from B24SCRIBE_BITRIX24_WEBHOOK_URL or _PORTALS."""
    settings = _settings()
    if reference in settings.portal_urls() or reference.lower() in settings.portal_urls():
        raise click.ClickException(
            displayable(
                f"portal {reference} is a webhook portal, not an installed one: it comes from the settings "
                "(B24SCRIBE_BITRIX24_WEBHOOK_URL or B24SCRIBE_BITRIX24_PORTALS); remove it there"
            )
        )
    with _db().write() as session:
        row = session.scalars(
            select(Portal).where(or_(Portal.member_id == reference, Portal.name == reference.lower()))
        ).first()
        if row is None:
            known = ", ".join(session.scalars(select(Portal.name).order_by(Portal.name))) or "none"
            raise click.ClickException(displayable(f"no installed portal {reference!r}; installed: {known}"))
        name = row.name
        open_jobs = (
            session.scalar(
                select(func.count()).select_from(Job).where(Job.portal == name, Job.state.in_(OPEN_JOB_STATES))
            )
            or 0
        )
        # What the sender does today with a job whose portal is neither configured nor installed: gives it up.
        kept = (
            f"its {open_jobs} open job(s) are kept; one that comes up before the portal installs the application "
            "again is given up (dead: retry it after the install with `flask --app app jobs retry --all-dead`)"
        )
        if not yes:
            raise click.ClickException(
                displayable(
                    f"this forgets portal {name} (state {row.state}), its tokens and its own inbound token; "
                    f"{kept}. Run again with --yes"
                )
            )
        session.delete(row)
    current_app.extensions["b24scribe.portals"].invalidate()
    click.echo(displayable(f"removed portal {name}; {kept}"))


@click.command("check")
@with_appcontext
def check_command() -> None:
    """Check settings, the database schema and every Bitrix24 portal; exit 1 on any problem."""
    logging.getLogger("alembic.runtime.migration").setLevel("WARNING")  # only our findings on the terminal
    findings = run_checks(_settings(), _db(), _sources())
    for finding in findings:
        click.echo(finding.line(), err=finding.level == "problem")
    if has_problems(findings):
        raise SystemExit(1)


events_group = AppGroup("events", help="Inbound events as received (raw bodies kept for replay).")


@events_group.command("list")
@click.option("--rejected", is_flag=True, help="only events that could not be processed")
@click.option("--limit", default=50, show_default=True)
def events_list(rejected: bool, limit: int) -> None:
    """One line per event, newest first: id, source/provider, state, received, call, why rejected."""
    query = select(InboundEvent).options(defer(InboundEvent.body)).order_by(InboundEvent.id.desc()).limit(limit)
    if rejected:
        query = query.where(InboundEvent.state.in_(("rejected", "replaying")))
    with _db().read() as session:
        for event in session.scalars(query):
            error = event.error or {}
            why = field_summary(error["fields"]) if event.state != "accepted" and error.get("fields") else ""
            if event.state == "replayed":
                why = f"replayed as event {error.get('replayed_as')}"
            click.echo(
                displayable(
                    f"{event.id}\t{event.source}/{event.provider}\t{event.state}\t{iso(event.received_at)}\t"
                    f"call={event.call_id or ''}\t{why}"
                )
            )


@events_group.command("replay")
@click.argument("event_ids", nargs=-1, type=int)
@click.option("--rejected", "all_rejected", is_flag=True, help="replay every rejected event")
@click.option("--source", type=click.Choice(["pbx", "stt"]), default=None, help="with --rejected: only these")
@click.option("--provider", default=None, help="with --rejected: only this PBX or vendor")
def events_replay(event_ids: tuple[int, ...], all_rejected: bool, source: str | None, provider: str | None) -> None:
    """Parse stored events again, through the hooks' own code (after a fix): rejected ones are stored if
    they now pass; accepted transcripts are translated again and re-attached if they changed."""
    if not event_ids and not all_rejected:
        raise click.UsageError("name event ids or pass --rejected")
    ids = list(event_ids) or rejected_event_ids(_db(), source, provider)
    outcomes = [replay_event(_db(), _settings(), _sources(), event_id) for event_id in ids]
    for outcome in outcomes:
        click.echo(outcome.line())
    counted: dict[str, int] = {}
    for outcome in outcomes:
        counted[outcome.outcome] = counted.get(outcome.outcome, 0) + 1
    click.echo(f"replayed {len(outcomes)} event(s)" + "".join(f", {n} {name}" for name, n in sorted(counted.items())))
    if any(outcome.outcome == "missing" for outcome in outcomes):
        raise SystemExit(1)


@click.command("purge")
@with_appcontext
@click.option(
    "--older-than",
    "older_than",
    type=click.FloatRange(min=0),
    default=None,
    metavar="DAYS",
    help="purge what was received more than DAYS ago  [default: B24SCRIBE_RETENTION_DAYS, 30]",
)
def purge_command(older_than: float | None) -> None:
    """Empty the raw bodies and transcript text of finished events received more than DAYS ago
    (the rows stay: what happened is still told); events whose jobs are still open are kept."""
    days = _settings().retention_days if older_than is None else older_than
    click.echo(f"purging what was received before {iso(retention.cutoff(days))} ({days:g} days ago)")
    report, _end = retention.purge(_db(), days)
    for line in report.lines():
        click.echo(line)


def register(app: Flask) -> None:
    """Attach the commands to the app's CLI."""
    app.cli.add_command(worker_command)
    app.cli.add_command(check_command)
    app.cli.add_command(events_group)
    app.cli.add_command(db_group)
    app.cli.add_command(jobs_group)
    app.cli.add_command(calls_group)
    app.cli.add_command(portals_group)
    app.cli.add_command(purge_command)

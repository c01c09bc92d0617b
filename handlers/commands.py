"""CLI commands (`flask --app app …`): the worker, migrations, and the operator's tools."""

from __future__ import annotations

import json

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from sqlalchemy import select

from b24scribe import migrate, outbox
from b24scribe.calls import describe_call, describe_job, find_by_b24, find_by_pbx
from b24scribe.db import Database
from b24scribe.models import Job
from b24scribe.settings import Settings
from b24scribe.worker import Worker


def _settings() -> Settings:
    settings: Settings = current_app.extensions["b24scribe.settings"]
    return settings


def _db() -> Database:
    db: Database = current_app.extensions["b24scribe.db"]
    return db


@click.command("worker")
@click.option("--threads", default=1, show_default=True, help="claim loops in this process")
@click.option("--migrate/--no-migrate", "run_migrations", default=False, help="upgrade the database first")
def worker_command(threads: int, run_migrations: bool) -> None:
    """Deliver outbox jobs to Bitrix24 until SIGTERM."""
    if run_migrations:
        migrate.upgrade(_settings().database_url)
    Worker(_db(), _settings(), threads=threads).run_forever()


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
                f"{shown['id']}\t{shown['kind']}\t{shown['state']}\tattempts={shown['attempts']}\t"
                f"call={shown['call']}\t{shown['last_error'] or ''}"
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
def calls_show(reference: str, pbx: str | None) -> None:
    """A call's state as JSON, by Bitrix24 CALL_ID or (with --pbx) by the PBX's call id."""
    with _db().read() as session:
        call = find_by_pbx(session, pbx, reference) if pbx else find_by_b24(session, reference)
        if call is None:
            raise click.ClickException("no such call")
        click.echo(json.dumps(describe_call(session, call), indent=2, ensure_ascii=False))


def register(app: Flask) -> None:
    """Attach the commands to the app's CLI."""
    app.cli.add_command(worker_command)
    app.cli.add_command(db_group)
    app.cli.add_command(jobs_group)
    app.cli.add_command(calls_group)

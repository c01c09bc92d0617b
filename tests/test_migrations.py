"""The Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect

from b24scribe.db import Database
from b24scribe.migrate import alembic_config, upgrade
from b24scribe.models import Base


def test_upgrade_to_head_creates_every_table_and_matches_the_models(database_url: str) -> None:
    upgrade(database_url)
    database = Database(database_url)
    try:
        tables = set(inspect(database.write_engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        # raises if autogenerate would find any difference between migrations and models
        command.check(alembic_config(database_url))
    finally:
        database.dispose()


def test_upgrade_twice_is_harmless(database_url: str) -> None:
    upgrade(database_url)
    upgrade(database_url)

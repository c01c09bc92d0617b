"""Alembic environment: batch mode so the same migrations run on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import context

from b24scribe.db import Database
from b24scribe.models import Base

config = context.config
database = Database(config.get_main_option("sqlalchemy.url") or "")

with database.write_engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
database.dispose()

"""job dead reason: why a job is dead, as a field rather than a prefix of last_error

job.dead_reason is orphan | retries | permanent while a job is dead (NULL otherwise). Orphaned attach
jobs were told apart by "orphan:" at the start of last_error; those already dead are given the field
here, so the revive when their call finishes (which now selects on the field) still finds them. The
human text stays in last_error.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dead_reason', sa.String(length=16), nullable=True))
    job = sa.table('job', sa.column('state', sa.String), sa.column('last_error', sa.Text), sa.column('dead_reason', sa.String))
    op.execute(
        job.update()
        .where(job.c.state == 'dead', job.c.last_error.like('orphan:%'))
        .values(dead_reason='orphan')
    )


def downgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_column('dead_reason')

"""engine: the worker holding each lease, the claim and fold indexes, slots counted from leases

A job's lease now names its worker process (job.lease_worker), so a worker whose heartbeat stops
has its jobs taken back at once; a portal's in-flight slots are its leased jobs, so the single
in-flight lease on portal_pacing goes. Leases taken before this migration have no worker and come
back when they expire, as before.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 00:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_worker', sa.String(length=100), nullable=True))
        batch_op.create_index('ix_job_claim', ['state', 'attempts', 'next_attempt_at'], unique=False)
        batch_op.create_index('ix_job_apply_due', ['kind', 'state', 'id'], unique=False)
    with op.batch_alter_table('portal_pacing', schema=None) as batch_op:
        batch_op.drop_column('inflight_expires_at')
        batch_op.drop_column('inflight_owner')


def downgrade() -> None:
    with op.batch_alter_table('portal_pacing', schema=None) as batch_op:
        batch_op.add_column(sa.Column('inflight_owner', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('inflight_expires_at', sa.Float(), nullable=True))
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('ix_job_apply_due')
        batch_op.drop_index('ix_job_claim')
        batch_op.drop_column('lease_worker')

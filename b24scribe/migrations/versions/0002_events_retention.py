"""events retention: inbound_event.purged_at and the indexes /metrics, retention and /v1/events read

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 00:35:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inbound_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purged_at', sa.Float(), nullable=True))
        batch_op.create_index('ix_inbound_event_state', ['state', 'id'], unique=False)
        batch_op.create_index(
            'ix_inbound_event_unpurged',
            ['received_at', 'id'],
            unique=False,
            sqlite_where=sa.text('purged_at IS NULL'),
            postgresql_where=sa.text('purged_at IS NULL'),
        )
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.create_index('ix_job_event_id', ['event_id'], unique=False)
    with op.batch_alter_table('transcript', schema=None) as batch_op:
        batch_op.create_index('ix_transcript_delivery_state', ['delivery_state'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('transcript', schema=None) as batch_op:
        batch_op.drop_index('ix_transcript_delivery_state')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('ix_job_event_id')
    with op.batch_alter_table('inbound_event', schema=None) as batch_op:
        batch_op.drop_index('ix_inbound_event_unpurged')
        batch_op.drop_index('ix_inbound_event_state')
        batch_op.drop_column('purged_at')

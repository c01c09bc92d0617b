"""call recording: what became of a call's recording (contract §9)

The recording's URL was kept on the call already; its channels, its state (attached, dry-run,
refused, failed), the reason it is not attached, the URL and file (name, sha256) it was attached
from and when are new. Existing calls have no recording attached: every new column starts NULL.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 07:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('call', schema=None) as batch_op:
        batch_op.add_column(sa.Column('recording_channels', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('recording_state', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('recording_error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('recording_attached_url', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('recording_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('recording_file', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('recording_attached_at', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('call', schema=None) as batch_op:
        for name in (
            'recording_attached_at',
            'recording_file',
            'recording_sha256',
            'recording_attached_url',
            'recording_error',
            'recording_state',
            'recording_channels',
        ):
            batch_op.drop_column(name)

"""call transcription: b24scribe submits a call's recording to the STT vendor (contract §10)

Whether the PBX allowed it (`transcribe`, true unless an event said false), and what became of the
request: its state, the vendor, the vendor's job id (indexed: a callback that lost its query finds its
call by it), why it failed, when it was submitted. Existing calls were never submitted: NULL.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('call', schema=None) as batch_op:
        batch_op.add_column(sa.Column('transcribe', sa.Boolean(), server_default=sa.text('true'), nullable=False))
        batch_op.add_column(sa.Column('transcription_state', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('transcription_vendor', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('transcription_job_id', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('transcription_error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('transcription_submitted_at', sa.Float(), nullable=True))
        batch_op.create_index(batch_op.f('ix_call_transcription_job_id'), ['transcription_job_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('call', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_call_transcription_job_id'))
        for name in (
            'transcription_submitted_at',
            'transcription_error',
            'transcription_job_id',
            'transcription_vendor',
            'transcription_state',
            'transcribe',
        ):
            batch_op.drop_column(name)

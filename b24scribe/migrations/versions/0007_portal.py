"""installed portals: the Bitrix24 local application's installations and their OAuth tokens

One row per portal that installed the application (contract §8), keyed by Bitrix24's member_id,
named by its domain (what calls, jobs and pacing call it). Webhook portals stay settings: nothing
existing moves, and a single-portal database keeps working as it is.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 14:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'portal',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('member_id', sa.String(length=64), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('client_endpoint', sa.Text(), nullable=True),
        sa.Column('access_token', sa.Text(), nullable=True),
        sa.Column('refresh_token', sa.Text(), nullable=True),
        sa.Column('expires_at', sa.Float(), nullable=True),
        sa.Column('application_token', sa.String(length=64), nullable=True),
        sa.Column('inbound_token', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=20), nullable=False),
        sa.Column('state_reason', sa.Text(), nullable=True),
        sa.Column('installed_at', sa.Float(), nullable=False),
        sa.Column('updated_at', sa.Float(), nullable=False),
        sa.Column('refreshed_at', sa.Float(), nullable=True),
        sa.Column('refreshes', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_portal')),
        sa.UniqueConstraint('member_id', name=op.f('uq_portal_member_id')),
        sa.UniqueConstraint('name', name=op.f('uq_portal_name')),
        sa.UniqueConstraint('inbound_token', name=op.f('uq_portal_inbound_token')),
    )


def downgrade() -> None:
    op.drop_table('portal')

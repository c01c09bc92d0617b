"""calls keyed per portal: two portals' PBXs may use the same call ids without ever meeting

The unique key of a call was (pbx, pbx_call_id): with several portals, two tenants' Asterisk
linkedids could merge into one call, and one tenant's transcript land on another's call card. It is
now (portal, pbx, pbx_call_id). Every existing row keeps its portal, so the data carries over as it
is. A downgrade fails if two portals already hold the same PBX call id (merging them is not ours to
decide).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 05:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('call', schema=None) as batch_op:
        batch_op.drop_constraint('uq_call_pbx_call', type_='unique')
        batch_op.create_unique_constraint('uq_call_portal_pbx_call', ['portal', 'pbx', 'pbx_call_id'])


def downgrade() -> None:
    with op.batch_alter_table('call', schema=None) as batch_op:
        batch_op.drop_constraint('uq_call_portal_pbx_call', type_='unique')
        batch_op.create_unique_constraint('uq_call_pbx_call', ['pbx', 'pbx_call_id'])

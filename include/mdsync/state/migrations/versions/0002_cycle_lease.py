"""The cycle lease: one row per state store naming the run that may run a cycle now (mdsync.lease).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    lease = op.create_table(
        "cycle_lease",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("run_id", sa.String(250)),
        sa.Column("holder_key", sa.String(64)),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("acquired_at", _TS),
        sa.Column("renewed_at", _TS),
        sa.Column("expires_at", _TS),
        sa.Column("released_at", _TS),
    )
    # the one row every acquire updates conditionally (free: holder_key is NULL)
    op.bulk_insert(lease, [{"name": "cycle"}])


def downgrade() -> None:
    op.drop_table("cycle_lease")

"""Merges: Marketo persons merged away, and the person each one survives as (issue 10).

A merge deletes its losers from Marketo; the sync remembers them so a Dynamics row that still names a loser in its
Marketo-id column is repointed to the winner (never linked to a person that no longer exists, nor used to create
the person again).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "merges",
        sa.Column("loser_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("winner_id", sa.BigInteger, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_id", sa.String(250)),
    )
    op.create_index("ix_merges_winner", "merges", ["winner_id"])


def downgrade() -> None:
    op.drop_index("ix_merges_winner", table_name="merges")
    op.drop_table("merges")

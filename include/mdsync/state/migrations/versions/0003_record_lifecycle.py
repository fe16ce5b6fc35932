"""Record lifecycle: deletions (tombstones) and the sync-filter state of links (issue 10).

- ``deletions``: one row per linked pair ended by a delete on one side (which side, what the delete policy did),
  so the identity stage never creates the deleted record again from its surviving partner.
- ``links.out_of_filter_since``: set while the link's Dynamics record is outside its entity type's sync filter
  (the pair is not synced; the line "left the sync filter" is logged once).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("links") as batch:
        batch.add_column(sa.Column("out_of_filter_since", _TS))
    op.create_table(
        "deletions",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("deleted_in", sa.String(16), nullable=False),
        sa.Column("person_id", sa.BigInteger, nullable=False),
        sa.Column("dynamics_type", sa.String(16), nullable=False),
        sa.Column("dynamics_id", sa.String(36), nullable=False),
        sa.Column("policy", sa.String(16), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("run_id", sa.String(250)),
        sa.UniqueConstraint("deleted_in", "person_id", "dynamics_type", "dynamics_id", name="uq_deletions_pair"),
    )
    op.create_index("ix_deletions_person", "deletions", ["person_id"])
    op.create_index("ix_deletions_dynamics", "deletions", ["dynamics_id"])


def downgrade() -> None:
    op.drop_index("ix_deletions_dynamics", table_name="deletions")
    op.drop_index("ix_deletions_person", table_name="deletions")
    op.drop_table("deletions")
    with op.batch_alter_table("links") as batch:
        batch.drop_column("out_of_filter_since")

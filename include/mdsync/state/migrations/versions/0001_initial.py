"""Initial state store: links, baselines, watermarks, activity, sync_errors.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "links",
        sa.Column("person_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("dynamics_type", sa.String(16), nullable=False),
        sa.Column("dynamics_id", sa.String(36), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("linked_at", _TS, nullable=False),
        sa.Column("run_id", sa.String(250)),
        sa.UniqueConstraint("dynamics_type", "dynamics_id", name="uq_links_dynamics_record"),
    )
    op.create_table(
        "baselines",
        sa.Column("person_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("field", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text),
        sa.Column("synced_at", _TS, nullable=False),
        sa.Column("run_id", sa.String(250)),
    )
    op.create_table(
        "watermarks",
        sa.Column("source", sa.String(16), primary_key=True),
        sa.Column("entity_type", sa.String(16), primary_key=True),
        sa.Column("high_water", _TS),
        sa.Column("token", sa.Text),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("run_id", sa.String(250)),
    )
    op.create_table(
        "activity",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250)),
        sa.Column("at", _TS, nullable=False),
        sa.Column("entity_type", sa.String(16)),
        sa.Column("person_id", sa.BigInteger),
        sa.Column("email", sa.String(254)),
        sa.Column("dynamics_type", sa.String(16)),
        sa.Column("dynamics_id", sa.String(36)),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("field", sa.String(64)),
        sa.Column("old_value", sa.Text),
        sa.Column("new_value", sa.Text),
        sa.Column("winner", sa.String(16)),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_activity_person", "activity", ["person_id"])
    op.create_index("ix_activity_email", "activity", ["email"])
    op.create_index("ix_activity_run", "activity", ["run_id"])
    op.create_index("ix_activity_dynamics", "activity", ["dynamics_id"])
    op.create_table(
        "sync_errors",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("person_id", sa.BigInteger),
        sa.Column("dynamics_type", sa.String(16)),
        sa.Column("dynamics_id", sa.String(36)),
        sa.Column("target", sa.String(16), nullable=False),
        sa.Column("field", sa.String(64)),
        sa.Column("value", sa.Text),
        sa.Column("code", sa.String(64)),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("first_seen_at", _TS, nullable=False),
        sa.Column("last_seen_at", _TS, nullable=False),
        sa.Column("occurrences", sa.Integer, nullable=False, server_default="1"),
        sa.Column("run_id", sa.String(250)),
        sa.Column("resolved_at", _TS),
    )
    op.create_index("ix_sync_errors_open", "sync_errors", ["person_id", "target", "field", "resolved_at"])


def downgrade() -> None:
    for table in ("sync_errors", "activity", "watermarks", "baselines", "links"):
        op.drop_table(table)

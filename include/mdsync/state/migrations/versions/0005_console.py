"""The operator console (issue 11): one summary row per run, dry runs' planned writes, and activity indexes.

- ``runs``: what each run did (counts per side, API calls, its mass-change outcome and the whole report as JSON),
  written by the report task, so the console's health page never aggregates the activity table.
- ``previews``: a dry run's planned activity lines (a dry run commits nothing to ``activity``), so its planned
  writes can be shown as a table.
- activity indexes for the console's collision and error tables (``action`` then ``id``: newest first, paged)
  and the time filters (``at``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_COUNTS = ("created_dynamics", "created_marketo", "written_dynamics", "written_marketo", "linked", "collisions",
           "errors_dynamics", "errors_marketo", "held", "read_marketo", "read_dynamics", "calls_marketo",
           "calls_dynamics")


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(250), primary_key=True),
        sa.Column("run_type", sa.String(32)),
        sa.Column("dry_run", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("undo_of", sa.String(250)),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("mass_change", sa.String(32)),
        *[sa.Column(name, sa.Integer, nullable=False, server_default="0") for name in _COUNTS],
        sa.Column("summary", sa.Text),
    )
    op.create_index("ix_runs_finished", "runs", ["finished_at"])
    op.create_table(
        "previews",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
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
    op.create_index("ix_previews_run", "previews", ["run_id", "id"])
    op.create_index("ix_activity_action_id", "activity", ["action", "id"])
    op.create_index("ix_activity_at", "activity", ["at"])


def downgrade() -> None:
    op.drop_index("ix_activity_at", table_name="activity")
    op.drop_index("ix_activity_action_id", table_name="activity")
    op.drop_index("ix_previews_run", table_name="previews")
    op.drop_table("previews")
    op.drop_index("ix_runs_finished", table_name="runs")
    op.drop_table("runs")

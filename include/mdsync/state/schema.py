"""State-store tables (SQLAlchemy Core). Migrations in ``migrations/versions`` create and upgrade them.

- ``links``: a Marketo person <-> a Dynamics lead or contact (each side at most once).
- ``baselines``: the last synced canonical value per person and field (the third side of the diff).
- ``watermarks``: how far extraction got, per source and entity type (a time and/or a paging token).
- ``activity``: every decision (create, update, link, collision, skip, error), queryable by person.
- ``sync_errors``: open rejections, so a rejected value is not re-sent every cycle.
- ``cycle_lease``: one row: which run may run a cycle against this store now (:mod:`mdsync.lease`).
- ``deletions``: linked pairs ended by a delete on one side (tombstones: the deleted record is not created again
  from its surviving partner); ``links.out_of_filter_since`` marks links whose record left the sync filter.
- ``merges``: Marketo persons merged away (``loser_id``) and the person that survived them (``winner_id``).
- ``runs``: one summary row per run (counts per side, API calls, the mass-change outcome, the report as JSON).
- ``previews``: a dry run's planned activity lines (a dry run records nothing in ``activity``).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

links = sa.Table(
    "links",
    metadata,
    sa.Column("person_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("dynamics_type", sa.String(16), nullable=False),
    sa.Column("dynamics_id", sa.String(36), nullable=False),
    sa.Column("method", sa.String(32), nullable=False),
    sa.Column("linked_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("run_id", sa.String(250)),
    # set while the Dynamics record is outside its entity type's sync filter (the pair is not synced)
    sa.Column("out_of_filter_since", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("dynamics_type", "dynamics_id", name="uq_links_dynamics_record"),
)

baselines = sa.Table(
    "baselines",
    metadata,
    sa.Column("person_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("field", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text),
    sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("run_id", sa.String(250)),
)

watermarks = sa.Table(
    "watermarks",
    metadata,
    sa.Column("source", sa.String(16), primary_key=True),
    sa.Column("entity_type", sa.String(16), primary_key=True),
    sa.Column("high_water", sa.DateTime(timezone=True)),
    sa.Column("token", sa.Text),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("run_id", sa.String(250)),
)

def _decision_columns() -> list[sa.Column]:
    """The columns of one recorded decision (``activity``) or planned one (a dry run's ``previews``)."""
    return [
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
    ]


activity = sa.Table(
    "activity",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(250)),
    *_decision_columns(),
    sa.Index("ix_activity_person", "person_id"),
    sa.Index("ix_activity_email", "email"),
    sa.Index("ix_activity_run", "run_id"),
    sa.Index("ix_activity_dynamics", "dynamics_id"),
    # the console's collision/error tables (newest first, paged) and time filters
    sa.Index("ix_activity_action_id", "action", "id"),
    sa.Index("ix_activity_at", "at"),
)

sync_errors = sa.Table(
    "sync_errors",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("person_id", sa.BigInteger),
    sa.Column("dynamics_type", sa.String(16)),
    sa.Column("dynamics_id", sa.String(36)),
    sa.Column("target", sa.String(16), nullable=False),
    sa.Column("field", sa.String(64)),
    sa.Column("value", sa.Text),
    sa.Column("code", sa.String(64)),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("occurrences", sa.Integer, nullable=False, server_default="1"),
    sa.Column("run_id", sa.String(250)),
    sa.Column("resolved_at", sa.DateTime(timezone=True)),
    sa.Index("ix_sync_errors_open", "person_id", "target", "field", "resolved_at"),
)

cycle_lease = sa.Table(
    "cycle_lease",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    # the holder's run (kept after release, as the last holder)
    sa.Column("run_id", sa.String(250)),
    # who holds it now (the run's identity: dag, run id and start); NULL when free
    sa.Column("holder_key", sa.String(64)),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("acquired_at", sa.DateTime(timezone=True)),
    sa.Column("renewed_at", sa.DateTime(timezone=True)),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
    sa.Column("released_at", sa.DateTime(timezone=True)),
)

deletions = sa.Table(
    "deletions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    # the side the record was deleted on: "marketo" (the person) or "dynamics" (the lead or contact)
    sa.Column("deleted_in", sa.String(16), nullable=False),
    sa.Column("person_id", sa.BigInteger, nullable=False),
    sa.Column("dynamics_type", sa.String(16), nullable=False),
    sa.Column("dynamics_id", sa.String(36), nullable=False),
    # the entity type's delete policy then, and what it did to the other side (flag, delete, deactivate, kept, unlink)
    sa.Column("policy", sa.String(16), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("run_id", sa.String(250)),
    sa.UniqueConstraint("deleted_in", "person_id", "dynamics_type", "dynamics_id", name="uq_deletions_pair"),
    sa.Index("ix_deletions_person", "person_id"),
    sa.Index("ix_deletions_dynamics", "dynamics_id"),
)

merges = sa.Table(
    "merges",
    metadata,
    sa.Column("loser_id", sa.BigInteger, primary_key=True, autoincrement=False),
    # the surviving person (a chain of merges is followed to its end before it is stored)
    sa.Column("winner_id", sa.BigInteger, nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("run_id", sa.String(250)),
    sa.Index("ix_merges_winner", "winner_id"),
)

#: the per-run counts of ``runs`` (the console's charts and run table)
RUN_COUNTS = ("created_dynamics", "created_marketo", "written_dynamics", "written_marketo", "linked", "collisions",
              "errors_dynamics", "errors_marketo", "held", "read_marketo", "read_dynamics", "calls_marketo",
              "calls_dynamics")

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String(250), primary_key=True),
    sa.Column("run_type", sa.String(32)),
    sa.Column("dry_run", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("undo_of", sa.String(250)),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    # the mass-change guard's outcome (under_threshold, approved, rejected, timed_out, allowed, dry_run)
    sa.Column("mass_change", sa.String(32)),
    *[sa.Column(name, sa.Integer, nullable=False, server_default="0") for name in RUN_COUNTS],
    sa.Column("summary", sa.Text),
    sa.Index("ix_runs_finished", "finished_at"),
)

previews = sa.Table(
    "previews",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(250), nullable=False),
    *_decision_columns(),
    sa.Index("ix_previews_run", "run_id", "id"),
)

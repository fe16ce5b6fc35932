"""The migrations build exactly the schema the code uses (no drift between schema.py and versions/)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from mdsync.state import open_store
from mdsync.state.schema import metadata


def test_migrated_database_matches_schema(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'state.sqlite'}")
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": "mdsync_alembic_version"})
        drift = [d for d in compare_metadata(ctx, metadata) if not (d[0] == "remove_table" and d[1].name == "mdsync_alembic_version")]
    assert drift == []

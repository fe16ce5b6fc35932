"""Alembic environment: runs on the connection that :class:`mdsync.state.StateStore` hands over."""

from alembic import context

from mdsync.state.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table="mdsync_alembic_version",
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()

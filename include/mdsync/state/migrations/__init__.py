"""Alembic migrations of the state store; run by :meth:`mdsync.state.StateStore.upgrade`."""

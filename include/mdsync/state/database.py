"""The state store's database: its URL, the engine, and schema migrations (light: SQLAlchemy and Alembic only).

Kept apart from :mod:`mdsync.state.store` (which frames tables with pandas) so that small tasks — taking
and releasing the cycle lease (:mod:`mdsync.lease`) — can open the store without importing pandas.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mdsync.errors import StateStoreError

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "mdsync_alembic_version"
#: the PostgreSQL advisory lock that serialises schema migrations ("mdsync" in ASCII)
_MIGRATION_LOCK_KEY = 0x6D6473796E63


def default_state_url() -> str:
    """``$MDSYNC_STATE_URL``, else a SQLite file under ``$AIRFLOW_HOME/mdsync/``."""
    url = os.environ.get("MDSYNC_STATE_URL")
    if url:
        return url
    home = Path(os.environ.get("AIRFLOW_HOME", Path.home() / "airflow"))
    return f"sqlite:///{home / 'mdsync' / 'state.sqlite'}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; everything stored is UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def safe_url(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable URL>"


def create_engine(url: str) -> Engine:
    """An engine for the state store at ``url`` (a SQLite file's folder is created; WAL and a busy timeout)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = sa.create_engine(url, future=True)
    except Exception as exc:  # bad URL, missing driver
        raise StateStoreError(f"cannot open the state store {safe_url(url)}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets the report task and the UI read while a cycle writes; a busy timeout rides out brief locks.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def upgrade(engine: Engine, url: str) -> None:
    """Create or upgrade the schema to the newest migration (idempotent).

    Tasks start together (the two extracts of the first run, a second deployment): one migrates, the others
    wait for it (a lock file beside SQLite, an advisory lock on PostgreSQL) and then find the schema at head.
    """
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with _migration_lock(url), engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except sa.exc.OperationalError as exc:
        raise StateStoreError(f"cannot migrate the state store {safe_url(url)}: {exc.orig}") from exc


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    """An exclusive lock file beside a SQLite store (PostgreSQL uses an advisory lock instead)."""
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        yield
        return
    import fcntl

    path = Path(url.removeprefix("sqlite:///") + ".migrate.lock")
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def revision(engine: Engine) -> str | None:
    """The schema revision the database is at (``None`` before the first upgrade)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()

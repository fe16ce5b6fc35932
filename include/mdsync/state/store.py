"""The state store: links, baselines, watermarks, the activity log, open sync errors, deletions and merges.

SQLite file by default, PostgreSQL through a URL (``postgresql+psycopg://user:pass@host/db``). The schema
is created and upgraded by Alembic migrations on :meth:`StateStore.upgrade` (run by :func:`open_store`).
Every write method takes an optional connection so several writes can share one transaction
(:meth:`StateStore.transaction`); without one, the method commits its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mdsync.canonical import CANONICAL_DTYPE
from mdsync.errors import StateStoreError
from mdsync.state import database, schema
from mdsync.state.database import default_state_url, utcnow
from mdsync.state.database import utc as _utc

log = logging.getLogger(__name__)

#: rows per executemany / IN (...) chunk; well under SQLite's and PostgreSQL's parameter limits
_CHUNK = 5000

__all__ = ["StateStore", "Watermark", "default_state_url", "open_store", "utcnow"]


def _none(value):
    """NaN/NA -> None for the database driver."""
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else value


def _frame(rows, columns: list[str]) -> pd.DataFrame:
    """Result rows -> a frame, column by column (``from_records`` on SQLAlchemy rows probes every row)."""
    if not rows:
        return pd.DataFrame(columns=columns)
    data = list(zip(*rows))
    return pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in zip(columns, data)}).infer_objects()


def _chunks(seq: list, size: int = _CHUNK) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


@dataclass(frozen=True)
class Watermark:
    """How far extraction from ``source`` got for ``entity_type``."""

    source: str
    entity_type: str
    high_water: datetime | None
    token: str | None
    updated_at: datetime
    run_id: str | None


class StateStore:
    """Access to the sync's state tables.

    :param url: a SQLAlchemy URL; default :func:`default_state_url`.
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_state_url()
        self.engine: Engine = database.create_engine(self.url)
        #: when set (by the task that holds the cycle lease), every write transaction first renews that lease
        #: and fails with :class:`mdsync.lease.LeaseLost` when this run no longer holds it
        self.fence = None

    @property
    def _safe_url(self) -> str:
        return database.safe_url(self.url)

    def __repr__(self) -> str:
        return f"StateStore({self._safe_url})"

    # -- schema ---------------------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Create or upgrade the schema to the newest migration (idempotent; serialised between processes)."""
        database.upgrade(self.engine, self.url)

    def revision(self) -> str | None:
        """The schema revision the database is at (``None`` before the first upgrade)."""
        return database.revision(self.engine)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction for several writes: committed on success, rolled back on any error."""
        with self.engine.begin() as conn:
            if self.fence is not None:
                self.fence(conn)
            yield conn

    @contextmanager
    def _tx(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self.transaction() as own:
                yield own

    def _upsert(self, conn: Connection, table: sa.Table, rows: list[dict], keys: list[str], update: list[str]) -> None:
        if not rows:
            return
        dialect = conn.dialect.name
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:  # pragma: no cover - only the two supported back ends are configured
            raise StateStoreError(f"unsupported state-store database {dialect!r}; use SQLite or PostgreSQL")
        stmt = insert(table)
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_={c: stmt.excluded[c] for c in update})
        for chunk in _chunks(rows):
            conn.execute(stmt, chunk)

    @staticmethod
    def _bulk_insert(conn: Connection, table: sa.Table, columns: list[str], rows: Iterable[tuple],
                     keys: list[str] | None = None, update: list[str] | None = None) -> None:
        """INSERT (or upsert on ``keys``) many rows straight through the driver's executemany.

        Values must already be what the driver takes (:meth:`_bind` converts datetimes); both back ends
        accept ``INSERT … ON CONFLICT (keys) DO UPDATE SET c = excluded.c``. Much faster than compiling each
        row through SQLAlchemy, which matters when a first sync writes millions of baselines.
        """
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join([mark] * len(columns))})"
        if keys:
            sets = ", ".join(f"{c} = excluded.{c}" for c in update or [])
            sql += f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}" if sets else f" ON CONFLICT ({', '.join(keys)}) DO NOTHING"
        rows = list(rows)
        for chunk in _chunks(rows, 50_000):
            conn.exec_driver_sql(sql, chunk)

    @staticmethod
    def _bind(conn: Connection, column: sa.Column, value):
        """``value`` as the driver stores it for ``column`` (e.g. SQLite datetimes as SQLAlchemy's text)."""
        process = column.type.bind_processor(conn.dialect)
        return process(value) if process else value

    # -- links ----------------------------------------------------------------------------------------

    def save_links(self, links: pd.DataFrame, run_id: str | None, conn: Connection | None = None) -> None:
        """Create or replace links.

        :param links: ``person_id, dynamics_type, dynamics_id, method`` rows, optionally ``paused`` (the record is
            outside the sync filter). A person or Dynamics record that was linked elsewhere is re-linked, and the
            baselines of re-linked persons are dropped (they described another pair).
        """
        if links.empty:
            return
        now = utcnow()
        paused = links["paused"].fillna(False).astype(bool) if "paused" in links else pd.Series(False, index=links.index)
        rows = [
            {"person_id": int(p), "dynamics_type": t, "dynamics_id": str(d), "method": m, "linked_at": now, "run_id": run_id,
             "out_of_filter_since": now if out else None}
            for (p, t, d, m), out in zip(links[["person_id", "dynamics_type", "dynamics_id", "method"]].itertuples(index=False),
                                         paused.tolist())
        ]
        with self._tx(conn) as c:
            existing = self._links_for(c, [r["person_id"] for r in rows], [r["dynamics_id"] for r in rows])
            new = {(r["person_id"], r["dynamics_type"], r["dynamics_id"]) for r in rows}
            stale = [
                int(p) for p, t, d in existing[["person_id", "dynamics_type", "dynamics_id"]].itertuples(index=False)
                if (int(p), t, d) not in new
            ]
            if stale:
                for chunk in _chunks(stale):
                    c.execute(sa.delete(schema.links).where(schema.links.c.person_id.in_(chunk)))
                    c.execute(sa.delete(schema.baselines).where(schema.baselines.c.person_id.in_(chunk)))
            self._upsert(c, schema.links, rows, ["person_id"],
                         ["dynamics_type", "dynamics_id", "method", "linked_at", "run_id", "out_of_filter_since"])

    def _links_for(self, conn: Connection, person_ids: list[int], dynamics_ids: list[str]) -> pd.DataFrame:
        t = schema.links
        parts = []
        for chunk in _chunks(person_ids):
            parts.append(conn.execute(sa.select(t).where(t.c.person_id.in_(chunk))).mappings().all())
        for chunk in _chunks(dynamics_ids):
            parts.append(conn.execute(sa.select(t).where(t.c.dynamics_id.in_(chunk))).mappings().all())
        rows = [dict(r) for part in parts for r in part]
        return pd.DataFrame(rows, columns=[c.name for c in t.columns]).drop_duplicates("person_id")

    def load_links(self, dynamics_type: str | None = None, person_ids: Iterable[int] | None = None) -> pd.DataFrame:
        """Links indexed by person id: ``dynamics_type, dynamics_id, method, linked_at, paused`` (``paused``: the
        Dynamics record is outside the sync filter, so the pair is not synced)."""
        t = schema.links
        query = sa.select(t.c.person_id, t.c.dynamics_type, t.c.dynamics_id, t.c.method, t.c.linked_at,
                          t.c.out_of_filter_since)
        if dynamics_type:
            query = query.where(t.c.dynamics_type == dynamics_type)
        frame = self._read(query, t.c.person_id, person_ids)
        frame["person_id"] = frame["person_id"].astype("int64")
        frame["paused"] = frame.pop("out_of_filter_since").notna().astype(bool)
        return frame.set_index("person_id").sort_index()

    def set_paused(self, states: pd.DataFrame, conn: Connection | None = None) -> int:
        """Mark links whose record left the sync filter (``paused`` true) or entered it again (false).

        :param states: ``person_id, paused`` rows; a link already in that state keeps its time.
        """
        if states.empty:
            return 0
        t = schema.links
        now = utcnow()
        out = [int(p) for p in states.loc[states["paused"].astype(bool), "person_id"]]
        back = [int(p) for p in states.loc[~states["paused"].astype(bool), "person_id"]]
        with self._tx(conn) as c:
            for chunk in _chunks(out):
                c.execute(sa.update(t).where(t.c.person_id.in_(chunk), t.c.out_of_filter_since.is_(None))
                          .values(out_of_filter_since=now))
            for chunk in _chunks(back):
                c.execute(sa.update(t).where(t.c.person_id.in_(chunk)).values(out_of_filter_since=None))
        return len(states)

    def remove_links(self, person_ids: Iterable[int], conn: Connection | None = None) -> None:
        """Forget links (and their baselines), e.g. after a record was deleted on either side."""
        ids = [int(p) for p in person_ids]
        with self._tx(conn) as c:
            for chunk in _chunks(ids):
                c.execute(sa.delete(schema.baselines).where(schema.baselines.c.person_id.in_(chunk)))
                c.execute(sa.delete(schema.links).where(schema.links.c.person_id.in_(chunk)))

    # -- deletions ------------------------------------------------------------------------------------

    DELETION_COLUMNS = ["deleted_in", "person_id", "dynamics_type", "dynamics_id", "policy", "action"]

    def save_deletions(self, rows: pd.DataFrame, run_id: str | None, conn: Connection | None = None) -> int:
        """Record linked pairs ended by a delete (:attr:`DELETION_COLUMNS`); a pair recorded before is refreshed."""
        if rows.empty:
            return 0
        now = utcnow()
        frame = rows[self.DELETION_COLUMNS].astype(object)
        frame["person_id"] = rows["person_id"].astype("int64").astype(object)  # plain ints for the driver
        frame["dynamics_id"] = rows["dynamics_id"].astype(str).str.lower()
        records = [{**dict(zip(self.DELETION_COLUMNS, values)), "at": now, "run_id": run_id}
                   for values in frame.itertuples(index=False, name=None)]
        with self._tx(conn) as c:
            self._upsert(c, schema.deletions, records, ["deleted_in", "person_id", "dynamics_type", "dynamics_id"],
                         ["policy", "action", "at", "run_id"])
        return len(records)

    def load_deletions(self, person_ids: Iterable[int] = (), dynamics_ids: Iterable[str] = ()) -> pd.DataFrame:
        """Recorded deletions of these persons or Dynamics records (either side): :attr:`DELETION_COLUMNS`, ``at``."""
        t = schema.deletions
        query = sa.select(*(t.c[n] for n in self.DELETION_COLUMNS), t.c.at)
        columns = [c.name for c in query.selected_columns]
        pids = sorted({int(p) for p in person_ids})
        dids = sorted({str(d).lower() for d in dynamics_ids})
        with self.engine.connect() as c:
            rows = [r for chunk in _chunks(pids) for r in c.execute(query.where(t.c.person_id.in_(chunk))).all()]
            rows += [r for chunk in _chunks(dids) for r in c.execute(query.where(t.c.dynamics_id.in_(chunk))).all()]
        frame = _frame(rows, columns)
        if frame.empty:
            return frame.astype({"person_id": "int64"})
        return frame.drop_duplicates(["deleted_in", "person_id", "dynamics_type", "dynamics_id"]).astype(
            {"person_id": "int64"}).reset_index(drop=True)

    # -- merges ---------------------------------------------------------------------------------------

    def save_merges(self, rows: pd.DataFrame, run_id: str | None, conn: Connection | None = None) -> int:
        """Remember Marketo persons merged away: ``loser_id, winner_id`` rows (a loser seen again is refreshed)."""
        if rows.empty:
            return 0
        now = utcnow()
        frame = rows[["loser_id", "winner_id"]].dropna().astype("int64").drop_duplicates("loser_id", keep="last")
        records = [{"loser_id": int(lo), "winner_id": int(w), "at": now, "run_id": run_id}
                   for lo, w in frame.itertuples(index=False, name=None)]
        with self._tx(conn) as c:
            self._upsert(c, schema.merges, records, ["loser_id"], ["winner_id", "at", "run_id"])
        return len(records)

    def load_merges(self, loser_ids: Iterable[int]) -> pd.DataFrame:
        """The remembered merges of these persons: ``loser_id, winner_id`` (one row per loser found)."""
        t = schema.merges
        ids = sorted({int(i) for i in loser_ids})
        with self.engine.connect() as c:
            rows = [r for chunk in _chunks(ids) for r in c.execute(
                sa.select(t.c.loser_id, t.c.winner_id).where(t.c.loser_id.in_(chunk))).all()]
        frame = _frame(rows, ["loser_id", "winner_id"])
        return frame.astype({"loser_id": "int64", "winner_id": "int64"}).reset_index(drop=True)

    def baseline_rows(self, person_ids: Iterable[int], conn: Connection | None = None) -> pd.DataFrame:
        """The stored baselines of these persons as long rows (``person_id, field, value``, nulls kept), e.g. to
        carry them to the person that now holds the pair (:meth:`save_baselines` takes them back)."""
        t = schema.baselines
        ids = sorted({int(i) for i in person_ids})

        def read(c: Connection) -> list:
            return [r for chunk in _chunks(ids) for r in c.execute(
                sa.select(t.c.person_id, t.c.field, t.c.value).where(t.c.person_id.in_(chunk))).all()]

        if conn is not None:  # inside the caller's transaction (it sees that transaction's writes)
            rows = read(conn)
        else:
            with self.engine.connect() as c:
                rows = read(c)
        frame = _frame(rows, ["person_id", "field", "value"]).astype({"person_id": "int64", "value": object})
        return frame.assign(value=frame["value"].where(frame["value"].notna(), None)).reset_index(drop=True)

    # -- baselines ------------------------------------------------------------------------------------

    def save_baselines(self, updates: pd.DataFrame, run_id: str | None, conn: Connection | None = None) -> int:
        """Set the baseline of each ``person_id, field`` to ``value`` (canonical text or NA)."""
        if updates.empty:
            return 0
        updates = updates.drop_duplicates(["person_id", "field"], keep="last")
        persons = updates["person_id"].to_numpy(dtype="int64").tolist()
        values = updates["value"].astype(object).where(updates["value"].notna(), None).tolist()
        fields = updates["field"].astype(str).tolist()
        with self._tx(conn) as c:
            now = self._bind(c, schema.baselines.c.synced_at, utcnow())
            self._bulk_insert(c, schema.baselines, ["person_id", "field", "value", "synced_at", "run_id"],
                              ((p, f, v, now, run_id) for p, f, v in zip(persons, fields, values)),
                              keys=["person_id", "field"], update=["value", "synced_at", "run_id"])
        return len(persons)

    def load_baselines(self, person_ids: Iterable[int] | None = None, fields: list[str] | None = None) -> pd.DataFrame:
        """Baselines as a wide canonical frame: index person id, one column per field (NA = null or unknown)."""
        t = schema.baselines
        query = sa.select(t.c.person_id, t.c.field, t.c.value)
        if fields:
            query = query.where(t.c.field.in_(fields))
        long = self._read(query, t.c.person_id, person_ids)
        if long.empty:
            wide = pd.DataFrame(index=pd.Index([], dtype="int64", name="person_id"))
        else:
            long["person_id"] = long["person_id"].astype("int64")
            long["value"] = long["value"].astype(CANONICAL_DTYPE)
            wide = long.pivot(index="person_id", columns="field", values="value")
            wide.columns.name = None
        for f in fields or []:
            if f not in wide.columns:
                wide[f] = pd.Series(np.nan, index=wide.index, dtype=CANONICAL_DTYPE)
        return wide.astype(CANONICAL_DTYPE)

    # -- watermarks -----------------------------------------------------------------------------------

    def watermark(self, source: str, entity_type: str) -> Watermark | None:
        """The stored watermark, or ``None`` when this source/entity was never extracted."""
        t = schema.watermarks
        with self.engine.connect() as c:
            row = c.execute(sa.select(t).where(t.c.source == source, t.c.entity_type == entity_type)).mappings().first()
        if row is None:
            return None
        return Watermark(
            source=row["source"], entity_type=row["entity_type"], high_water=_utc(row["high_water"]),
            token=row["token"], updated_at=_utc(row["updated_at"]), run_id=row["run_id"],
        )

    def save_watermark(
        self, source: str, entity_type: str, high_water: datetime | None, token: str | None, run_id: str | None,
        conn: Connection | None = None,
    ) -> None:
        """Advance (or set) a watermark. Called only when the cycle's loads are done (DESIGN §4.5)."""
        if high_water is not None and high_water.tzinfo is None:
            raise ValueError(f"watermark for {source}/{entity_type} must be timezone-aware, got {high_water!r}")
        row = {
            "source": source, "entity_type": entity_type, "high_water": _utc(high_water), "token": token,
            "updated_at": utcnow(), "run_id": run_id,
        }
        with self._tx(conn) as c:
            self._upsert(c, schema.watermarks, [row], ["source", "entity_type"], ["high_water", "token", "updated_at", "run_id"])

    # -- activity -------------------------------------------------------------------------------------

    ACTIVITY_COLUMNS = [
        "entity_type", "person_id", "email", "dynamics_type", "dynamics_id", "action", "field",
        "old_value", "new_value", "winner", "detail",
    ]

    def record_activity(self, rows: pd.DataFrame, run_id: str | None, conn: Connection | None = None,
                        table: sa.Table = schema.activity) -> int:
        """Append activity rows (any subset of :attr:`ACTIVITY_COLUMNS`; ``action`` is required).

        :param table: ``activity``, or ``previews`` for a dry run's planned lines (:meth:`record_preview`).
        """
        if rows.empty:
            return 0
        if "action" not in rows.columns or rows["action"].isna().any():
            raise ValueError("every activity row needs an action")
        frame = rows.reindex(columns=self.ACTIVITY_COLUMNS).astype(object)
        frame = frame.where(frame.notna(), None)
        person = pd.to_numeric(frame["person_id"], errors="coerce")
        frame["person_id"] = pd.Series(person.astype("Int64").astype(object), index=frame.index).where(person.notna(), None)
        for c in ("old_value", "new_value", "detail", "dynamics_id"):
            frame[c] = frame[c].where(frame[c].isna(), frame[c].astype(str)).where(frame[c].notna(), None)
        columns = list(self.ACTIVITY_COLUMNS)
        with self._tx(conn) as c:
            now = self._bind(c, table.c.at, utcnow())
            self._bulk_insert(c, table, columns + ["run_id", "at"],
                              (tuple(values) + (run_id, now) for values in frame.itertuples(index=False, name=None)))
        return len(frame)

    def activity(
        self, *, person_id: int | None = None, email: str | None = None, dynamics_id: str | None = None,
        run_id: str | None = None, limit: int | None = None,
    ) -> pd.DataFrame:
        """Activity rows, oldest first, filtered by person, email (case-insensitive), Dynamics id or run.

        An email also finds rows of the persons it was recorded for, so a person's history stays complete
        after their email changed.
        """
        t = schema.activity
        query = sa.select(t)
        if email is not None:
            persons = sa.select(t.c.person_id).where(sa.func.lower(t.c.email) == email.lower(), t.c.person_id.is_not(None))
            query = query.where(sa.or_(sa.func.lower(t.c.email) == email.lower(), t.c.person_id.in_(persons)))
        if person_id is not None:
            query = query.where(t.c.person_id == int(person_id))
        if dynamics_id is not None:
            query = query.where(t.c.dynamics_id == dynamics_id)
        if run_id is not None:
            query = query.where(t.c.run_id == run_id)
        query = query.order_by(t.c.id)
        if limit:
            query = query.limit(limit)
        frame = self._read(query)
        frame["at"] = pd.to_datetime(frame["at"], utc=True)
        return frame

    def replace_preview(self, parts: Iterable[pd.DataFrame], run_id: str) -> int:
        """Keep a dry run's planned activity lines (the console shows them as its planned writes; they never go to
        ``activity``). A retried commit replaces the run's earlier lines. Returns the number of lines."""
        t = schema.previews
        with self.transaction() as tx:
            tx.execute(sa.delete(t).where(t.c.run_id == run_id))
            return sum(self.record_activity(part, run_id, conn=tx, table=t) for part in parts)

    def previews(self, run_id: str, *, limit: int = 100, offset: int = 0) -> pd.DataFrame:
        """A dry run's planned lines, in the order it planned them (paged)."""
        t = schema.previews
        frame = self._read(sa.select(t).where(t.c.run_id == run_id).order_by(t.c.id).limit(limit).offset(offset))
        frame["at"] = pd.to_datetime(frame["at"], utc=True)
        return frame

    # -- runs -----------------------------------------------------------------------------------------

    def record_run(self, run_id: str, counts: dict, *, summary: dict, run_type: str | None = None,
                   dry_run: bool = False, undo_of: str | None = None, mass_change: str | None = None,
                   conn: Connection | None = None) -> None:
        """Keep a run's summary (one row per run; a task tried again replaces its row).

        :param counts: the numbers of :data:`~mdsync.state.schema.RUN_COUNTS` (missing ones are 0).
        :param summary: the run's whole report (stored as JSON).
        """
        import json

        unknown = set(counts) - set(schema.RUN_COUNTS)
        if unknown:
            raise ValueError(f"unknown run counts {sorted(unknown)}; the counts are {', '.join(schema.RUN_COUNTS)}")
        row = {"run_id": run_id, "run_type": run_type, "dry_run": bool(dry_run), "undo_of": undo_of,
               "finished_at": utcnow(), "mass_change": mass_change,
               **{k: int(counts.get(k) or 0) for k in schema.RUN_COUNTS},
               "summary": json.dumps(summary, default=str, sort_keys=True)}
        with self._tx(conn) as c:
            self._upsert(c, schema.runs, [row], ["run_id"], [k for k in row if k != "run_id"])

    def runs(self, *, since: datetime | None = None, limit: int = 50, offset: int = 0,
             run_ids: Iterable[str] | None = None, undo_of: str | None = None,
             dry_run: bool | None = None) -> pd.DataFrame:
        """Run summaries, newest first (without the JSON report: :meth:`run_summary` has it), optionally only
        those since a time, with these ids, undoing a run, or (not) dry runs."""
        t = schema.runs
        query = sa.select(*[c for c in t.c if c.name != "summary"]).order_by(t.c.finished_at.desc())
        if since is not None:
            query = query.where(t.c.finished_at >= since)
        if run_ids is not None:
            query = query.where(t.c.run_id.in_(list(run_ids)))
        if undo_of is not None:
            query = query.where(t.c.undo_of == undo_of)
        if dry_run is not None:
            query = query.where(t.c.dry_run.is_(bool(dry_run)))
        frame = self._read(query.limit(limit).offset(offset))
        frame["finished_at"] = pd.to_datetime(frame["finished_at"], utc=True)
        return frame

    def run_summary(self, run_id: str) -> dict | None:
        """A run's whole report (as the report task returned it), or None when the run recorded none."""
        import json

        with self.engine.connect() as c:
            text = c.execute(sa.select(schema.runs.c.summary).where(schema.runs.c.run_id == run_id)).scalar()
        return None if text is None else json.loads(text)

    def recent_runs(self, limit: int = 5) -> pd.DataFrame:
        """The runs that recorded activity, newest first: ``run_id, last_at, lines`` (e.g. to name an undo's run)."""
        t = schema.activity
        last = sa.func.max(t.c.at).label("last_at")
        query = (sa.select(t.c.run_id, last, sa.func.count().label("lines")).where(t.c.run_id.is_not(None))
                 .group_by(t.c.run_id).order_by(last.desc()).limit(limit))
        frame = self._read(query)
        frame["last_at"] = pd.to_datetime(frame["last_at"], utc=True)
        return frame

    # -- sync errors ----------------------------------------------------------------------------------

    def open_errors(self, target: str | None = None, person_ids: Iterable[int] | None = None) -> pd.DataFrame:
        """Unresolved rejections: ``person_id, dynamics_type, dynamics_id, target, field, value, code, message, ...``."""
        t = schema.sync_errors
        query = sa.select(t).where(t.c.resolved_at.is_(None))
        if target:
            query = query.where(t.c.target == target)
        frame = self._read(query, t.c.person_id, person_ids)
        frame["value"] = frame["value"].astype(CANONICAL_DTYPE)
        return frame

    def record_errors(self, rows: pd.DataFrame, run_id: str | None, conn: Connection | None = None) -> int:
        """Open (or refresh) sync errors, one per ``person_id, target, field``.

        :param rows: ``person_id, dynamics_type, dynamics_id, target, field, value, code, message``.
        """
        if rows.empty:
            return 0
        t = schema.sync_errors
        now = utcnow()
        cols = ["person_id", "dynamics_type", "dynamics_id", "target", "field", "value", "code", "message"]
        with self._tx(conn) as c:
            for values in rows.reindex(columns=cols).itertuples(index=False, name=None):
                rec = {k: _none(v) for k, v in zip(cols, values)}
                rec["person_id"] = None if rec["person_id"] is None else int(rec["person_id"])
                rec["message"] = rec["message"] or "rejected without a message"
                match = sa.and_(
                    t.c.resolved_at.is_(None), t.c.target == rec["target"],
                    t.c.person_id.is_(None) if rec["person_id"] is None else t.c.person_id == rec["person_id"],
                    t.c.field.is_(None) if rec["field"] is None else t.c.field == rec["field"],
                )
                updated = c.execute(
                    sa.update(t).where(match).values(
                        value=rec["value"], code=rec["code"], message=rec["message"], last_seen_at=now,
                        occurrences=t.c.occurrences + 1, run_id=run_id,
                        dynamics_type=rec["dynamics_type"], dynamics_id=rec["dynamics_id"],
                    )
                ).rowcount
                if not updated:
                    c.execute(sa.insert(t).values(**rec, first_seen_at=now, last_seen_at=now, occurrences=1, run_id=run_id))
        return len(rows)

    def resolve_errors(self, keys: pd.DataFrame, conn: Connection | None = None) -> int:
        """Close open errors for ``person_id, target, field`` (the value went through, or the source changed).

        Open errors are few and successful writes many (a first sync writes every linked record): the open
        ones are read once and matched to ``keys`` as frames, and only the matches are closed.
        """
        if keys.empty:
            return 0
        t = schema.sync_errors
        now = utcnow()
        with self._tx(conn) as c:
            open_rows = pd.DataFrame.from_records(
                c.execute(sa.select(t.c.id, t.c.person_id, t.c.target, t.c.field).where(t.c.resolved_at.is_(None))).all(),
                columns=["id", "person_id", "target", "field"])
            if open_rows.empty:
                return 0
            wanted = keys[["person_id", "target", "field"]].astype({"person_id": "int64"}).astype({"field": object})
            open_rows = open_rows.dropna(subset=["person_id"]).astype({"person_id": "int64"})
            hits = open_rows.merge(wanted.drop_duplicates(), on=["person_id", "target", "field"])["id"].tolist()
            for chunk in _chunks(hits):
                c.execute(sa.update(t).where(t.c.id.in_(chunk)).values(resolved_at=now))
        return len(hits)

    # -- reading --------------------------------------------------------------------------------------

    def _read(self, query: sa.Select, id_column: sa.Column | None = None, ids: Iterable[int] | None = None) -> pd.DataFrame:
        columns = [c.name for c in query.selected_columns]
        with self.engine.connect() as c:
            if ids is None or id_column is None:
                rows = c.execute(query).all()
            else:
                wanted = sorted({int(i) for i in ids})
                if len(wanted) > 4 * _CHUNK:
                    # many ids (a full reconcile): one scan of the table beats hundreds of IN (...) queries
                    sql = str(query.compile(dialect=c.dialect, compile_kwargs={"literal_binds": True}))
                    frame = _frame(c.exec_driver_sql(sql).fetchall(), columns)
                    return frame[frame[id_column.name].isin(wanted)].reset_index(drop=True)
                rows = [r for chunk in _chunks(wanted) for r in c.execute(query.where(id_column.in_(chunk))).all()]
        return _frame(rows, columns)


def open_store(url: str | None = None) -> StateStore:
    """Open the state store and bring its schema up to date."""
    store = StateStore(url)
    store.upgrade()
    log.info("state store %s at schema revision %s", store._safe_url, store.revision())
    return store

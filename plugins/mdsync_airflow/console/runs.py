"""A run's story for the console: its counts and report, its decisions (the activity it recorded), a dry run's
planned writes (``previews``), and the undo flow (preview first, then the undo itself)."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from mdsync_airflow.console import sources
from mdsync_airflow.console.health import RUN_COLUMNS

#: the most rows a page of decisions or planned writes shows
MAX_PAGE_SIZE = 500
#: the columns of a decision or planned-write row, as the API returns them
ROW_COLUMNS = ["id", "at", "action", "entity_type", "person_id", "email", "dynamics_type", "dynamics_id", "field",
               "old_value", "new_value", "winner", "detail"]


def _rows(frame: pd.DataFrame) -> list[dict]:
    if frame.empty:
        return []
    out = frame.reindex(columns=ROW_COLUMNS).astype(object)
    out["at"] = out["at"].map(lambda t: None if t is None or pd.isna(t) else pd.Timestamp(t).isoformat())
    return out.where(out.notna(), None).to_dict("records")


def _page(table: sa.Table, run_id: str, action: str | None, page: int, page_size: int) -> dict:
    page, page_size = max(page, 1), min(max(page_size, 1), MAX_PAGE_SIZE)
    where = [table.c.run_id == run_id] + ([table.c.action == action] if action else [])
    store = sources.store()
    with store.engine.connect() as c:
        total = c.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar() or 0
        by_action = dict(c.execute(sa.select(table.c.action, sa.func.count()).where(table.c.run_id == run_id)
                                   .group_by(table.c.action)).all())
        rows = c.execute(sa.select(*[table.c[k] for k in ROW_COLUMNS]).where(*where).order_by(table.c.id)
                         .limit(page_size).offset((page - 1) * page_size)).all()
    frame = pd.DataFrame(rows, columns=ROW_COLUMNS)
    return {"total": int(total), "page": page, "page_size": page_size, "by_action": by_action, "rows": _rows(frame)}


def decisions(run_id: str, action: str | None = None, page: int = 1, page_size: int = 100) -> dict:
    """The activity a run recorded (what it created, linked, wrote, which collisions it resolved ...), paged."""
    from mdsync.state import schema

    return _page(schema.activity, run_id, action, page, page_size)


def preview(run_id: str, action: str | None = None, page: int = 1, page_size: int = 100) -> dict:
    """A dry run's planned lines (its writes, creates, collisions as it would have recorded them), paged."""
    from mdsync.state import schema

    return _page(schema.previews, run_id, action, page, page_size)


def undo_previews(run_id: str) -> list[dict]:
    """Dry runs that previewed the undo of ``run_id``, newest first (an undo is started after one of them)."""
    runs = sources.store().runs(limit=20, undo_of=run_id, dry_run=True)
    return [] if runs.empty else runs[["run_id", "finished_at"]].assign(
        finished_at=runs["finished_at"].map(lambda t: t.isoformat())).to_dict("records")


def run(run_id: str) -> dict:
    """One run: Airflow's state and conf, the sync's counts and report, and its undo previews."""
    airflow = next(iter(sources.dag_runs(limit=1, run_ids=[run_id])), None)
    store = sources.store()
    stored = store.runs(run_ids=[run_id], limit=1)
    row = None if stored.empty else stored.iloc[0].to_dict()
    if airflow is None and row is None:
        return {}
    return {"run_id": run_id, "airflow": airflow, "reported": row is not None,
            "dry_run": bool(row["dry_run"]) if row else bool((airflow or {}).get("conf", {}).get("dry_run")),
            "undo_of": (row or {}).get("undo_of") or ((airflow or {}).get("conf") or {}).get("undo_run"),
            "mass_change": (row or {}).get("mass_change"),
            "counts": {k: int(row[k]) for k in RUN_COLUMNS} if row else None,
            "summary": store.run_summary(run_id), "undo_previews": undo_previews(run_id)}

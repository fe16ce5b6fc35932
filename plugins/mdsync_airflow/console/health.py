"""The health page's numbers: recent runs with their counts, API calls today against the daily quotas, what
each run synced over the last day and week, what is waiting, and the next run.

Counts come from the state store's ``runs`` table (one row per run, written by the report task), states and
times from Airflow's own runs; nothing here scans the activity table.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pandas as pd
import sqlalchemy as sa

from mdsync_airflow.console import sources

#: Marketo's daily quota resets at midnight US Central time (usage.md)
MARKETO_DAY = ZoneInfo("America/Chicago")
#: Marketo's usage numbers cost an API call: asked at most every 5 minutes
_usage = sources.TTLCache(300)

#: the counts shown per run, in the order of the table
RUN_COLUMNS = ("created_dynamics", "created_marketo", "written_dynamics", "written_marketo", "linked", "collisions",
               "errors_dynamics", "errors_marketo", "held", "calls_marketo", "calls_dynamics")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def recent_runs(limit: int = 20, offset: int = 0) -> list[dict]:
    """The latest runs, newest first: Airflow's runs (state, times, conf) and the runs the state store recorded
    (counts per side), joined by run id; a run only one of them knows (a cycle run outside Airflow, a run still
    going) is listed too."""
    wanted = limit + offset
    airflow = {r["run_id"]: r for r in sources.dag_runs(limit=wanted)}
    stored = sources.store().runs(limit=wanted)
    stored = stored.assign(finished_at=stored["finished_at"].map(lambda t: t.isoformat())) if not stored.empty else stored
    by_id = {row["run_id"]: row for row in stored.to_dict("records")} if not stored.empty else {}
    missing = [rid for rid in airflow if rid not in by_id]
    if missing:  # reported runs older than the store's latest page
        extra = sources.store().runs(run_ids=missing, limit=len(missing))
        for row in extra.to_dict("records"):
            by_id[row["run_id"]] = {**row, "finished_at": row["finished_at"].isoformat()}
    out = []
    for run_id in dict.fromkeys([*airflow, *by_id]):
        run, row = airflow.get(run_id), by_id.get(run_id)
        conf = (run or {}).get("conf") or {}
        base = run or {"run_id": run_id, "state": "success", "run_type": (row or {}).get("run_type"), "conf": {},
                       "queued_at": None, "start_date": None, "end_date": row["finished_at"], "triggered_by": None,
                       "in_airflow": False}
        out.append({"in_airflow": run is not None, **base, "reported": row is not None,
                    "dry_run": bool(row["dry_run"]) if row else bool(conf.get("dry_run")),
                    "undo_of": (row or {}).get("undo_of") or conf.get("undo_run"),
                    "mass_change": (row or {}).get("mass_change"),
                    **{k: (int(row[k]) if row else None) for k in RUN_COLUMNS}})
    out.sort(key=lambda r: r.get("end_date") or r.get("start_date") or r.get("queued_at") or "", reverse=True)
    return out[offset:offset + limit]


def _own_calls(runs: pd.DataFrame, since: datetime, column: str) -> int:
    if runs.empty:
        return 0
    return int(runs.loc[runs["finished_at"] >= since, column].sum())


def _marketo_usage() -> dict | None:
    """Today's total from Marketo's usage endpoint, or None when the instance does not allow it."""
    def ask():
        from mdsync.errors import SyncError

        client = sources.marketo_client()
        usage = getattr(client, "usage", None)
        if usage is None:
            return None
        try:
            frame = usage(days=1)
        except SyncError as exc:
            return {"error": str(exc)}
        if frame is None or len(frame) == 0:
            return {"total": 0}
        return {"total": int(frame["total"].iloc[-1])}

    try:
        return _usage.get("marketo", ask)
    except Exception as exc:  # no connection configured, service down: fall back to the sync's own counts
        return {"error": f"{type(exc).__name__}: {exc}"}


def calls_today(runs: pd.DataFrame, now: datetime) -> dict:
    """API calls used today per service against the daily quota: Marketo's own usage endpoint where the instance
    allows it, the sync's own counts otherwise (and always for Dataverse, which has no usage endpoint)."""
    settings = sources.settings()
    marketo_midnight = now.astimezone(MARKETO_DAY).replace(hour=0, minute=0, second=0, microsecond=0)
    own_marketo = _own_calls(runs, marketo_midnight.astimezone(timezone.utc), "calls_marketo")
    usage = _marketo_usage()
    if usage and "total" in usage:
        marketo = {"used": usage["total"], "source": "Marketo usage endpoint (all integrations)", "sync_used": own_marketo}
    else:
        marketo = {"used": own_marketo, "source": "the sync's own count (Marketo's usage endpoint: "
                   + ((usage or {}).get("error") or "not available") + ")", "sync_used": own_marketo}
    day_ago = now - timedelta(hours=24)
    dynamics_used = _own_calls(runs, day_ago, "calls_dynamics")
    return {
        "marketo": {**marketo, "quota": settings.marketo_daily_quota, "resets": "midnight US Central time",
                    "percent": round(100 * marketo["used"] / settings.marketo_daily_quota, 1)},
        "dynamics": {"used": dynamics_used, "sync_used": dynamics_used, "source": "the sync's own count (last 24 h)",
                     "quota": settings.dynamics_daily_requests, "resets": "a rolling 24 hours",
                     "percent": round(100 * dynamics_used / settings.dynamics_daily_requests, 1)},
    }


def series(runs: pd.DataFrame, now: datetime) -> dict:
    """Records synced and calls per run over the last day (one point per run) and per hour over the last week."""
    cols = ["records", "calls_marketo", "calls_dynamics"]
    if runs.empty:
        return {"day": [], "week": []}
    r = runs.assign(records=runs[["written_dynamics", "written_marketo", "created_dynamics", "created_marketo"]]
                    .sum(axis=1)).sort_values("finished_at")
    day = r[r["finished_at"] >= now - timedelta(days=1)]
    week = r[r["finished_at"] >= now - timedelta(days=7)]
    hourly = (week.set_index("finished_at")[cols].resample("1h").sum().reset_index()
              if not week.empty else pd.DataFrame(columns=["finished_at", *cols]))
    def points(frame):
        return [{"at": t.isoformat(), **{c: int(v) for c, v in zip(cols, vals)}}
                for t, *vals in frame[["finished_at", *cols]].itertuples(index=False, name=None)]
    return {"day": [{"run_id": rid, **p} for rid, p in zip(day["run_id"], points(day))], "week": points(hourly)}


def waiting() -> dict:
    """What is waiting: open errors, a held mass change, runs waiting on the cycle lease, a quota pause."""
    from mdsync.lease import CycleLease, QuotaPauses
    from mdsync.state import schema

    store = sources.store()
    with store.engine.connect() as c:
        open_errors = c.execute(sa.select(sa.func.count()).select_from(schema.sync_errors)
                                .where(schema.sync_errors.c.resolved_at.is_(None))).scalar()
    now = _now()
    lease = CycleLease(store.engine).state()
    pause = QuotaPauses(store.engine).active()
    tasks = sources.waiting_tasks()
    return {
        "open_errors": int(open_errors or 0),
        "mass_change": tasks["mass_change"],
        "lease_waiters": tasks["lease"],
        "lease": None if lease is None else {"held": lease.held(now), "run_id": lease.run_id,
                                             "describe": lease.describe(now)},
        "quota_pause": None if pause is None else {"service": pause.service, "resets_at": pause.resets_at.isoformat(),
                                                   "run_id": pause.run_id, "line": pause.line()},
    }


def health() -> dict:
    """Everything the health page shows."""
    now = _now()
    week = sources.store().runs(since=now - timedelta(days=7), limit=10_000)
    return {"now": now.isoformat(), "runs": recent_runs(), "calls_today": calls_today(week, now),
            "series": series(week, now), "waiting": waiting(), "next_run": sources.next_run()}

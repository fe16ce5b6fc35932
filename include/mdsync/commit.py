"""Stage 6 of the cycle: commit and record (DESIGN §4.5, §4.6).

In one transaction: baselines advance for the writes that succeeded (and for values both sides already
agree on); rejections open (or refresh) sync errors and successful writes close them; every decision becomes
an activity row; watermarks advance. Nothing before this stage moves a baseline or a watermark, so a retried
task or a re-run of the whole cycle converges to the same end state.
"""

from __future__ import annotations

import logging
from datetime import datetime

import pandas as pd

from mdsync.plan import REQUIRES_BOTH, REQUIRES_DYNAMICS, REQUIRES_MARKETO, REQUIRES_NOTHING

log = logging.getLogger("mdsync.commit")

_KEY = ["person_id", "field"]


def succeeded_baselines(updates: pd.DataFrame, dynamics_results: pd.DataFrame, marketo_results: pd.DataFrame) -> pd.DataFrame:
    """Baseline updates whose required write (or both writes) went through, or that needed none."""
    if updates.empty:
        return updates

    def ok_keys(results: pd.DataFrame) -> pd.MultiIndex:
        if results.empty:
            return pd.MultiIndex.from_arrays([[], []], names=_KEY)
        good = results[results["ok"].astype(bool)]
        return pd.MultiIndex.from_frame(good[_KEY].astype({"person_id": "int64", "field": "str"}))

    keys = pd.MultiIndex.from_frame(updates[_KEY].astype({"person_id": "int64", "field": "str"}))
    requires = updates["requires"].to_numpy()
    dynamics_ok, marketo_ok = keys.isin(ok_keys(dynamics_results)), keys.isin(ok_keys(marketo_results))
    keep = ((requires == REQUIRES_NOTHING)
            | ((requires == REQUIRES_DYNAMICS) & dynamics_ok)
            | ((requires == REQUIRES_MARKETO) & marketo_ok)
            | ((requires == REQUIRES_BOTH) & dynamics_ok & marketo_ok))
    return updates[keep]


def error_rows(results: pd.DataFrame, target: str, entity_of: pd.Series) -> pd.DataFrame:
    """Failed writes as sync-error rows (dry runs excluded)."""
    if results.empty:
        return pd.DataFrame()
    failed = results[~results["ok"].astype(bool) & results["error_code"].ne("dry_run").fillna(True)]
    if failed.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "person_id": failed["person_id"], "dynamics_type": failed["person_id"].map(entity_of),
        "dynamics_id": failed["dynamics_id"], "target": target, "field": failed["field"], "value": failed["value"],
        "code": failed["error_code"].astype(object), "message": failed["error_message"].astype(object),
    })


def resolved_keys(results: pd.DataFrame, target: str) -> pd.DataFrame:
    if results.empty:
        return pd.DataFrame(columns=["person_id", "target", "field"])
    good = results[results["ok"].astype(bool)]
    return good[["person_id", "field"]].assign(target=target)


def commit_cycle(
    store, run_id: str, *, baselines, activity, errors: pd.DataFrame,
    resolved: pd.DataFrame, watermarks: list[tuple[str, str, datetime | None, str | None]],
    links: pd.DataFrame | None = None, unlinked: list[int] = (),
    deletions: pd.DataFrame | None = None, paused: pd.DataFrame | None = None,
    moved: pd.DataFrame | None = None, merges: pd.DataFrame | None = None,
) -> dict:
    """Persist a cycle's outcome atomically. Returns counts.

    :param baselines: / :param activity: a frame, or an iterable of frames written one after another in the
        same transaction (a first sync's millions of rows never sit in memory at once).
    :param deletions: linked pairs this cycle ended by a delete (:meth:`StateStore.save_deletions`).
    :param paused: ``person_id, paused``: links whose record left or entered the sync filter.
    :param moved: ``from_person, to_person``: pairs a merge handed to another person or record; their baselines
        follow them (re-linking would drop them), and this cycle's own baseline updates come on top.
    :param merges: ``loser_id, winner_id``: Marketo persons merged away (:meth:`StateStore.save_merges`).
    """
    with store.transaction() as tx:
        earlier = _committed_before(tx, run_id, watermarks)
        if earlier is not None:
            log.info("run %s committed this cycle already (an earlier try of this task committed, then the task was "
                     "not seen to finish): nothing is recorded twice", run_id)
            return earlier
        carried = carried_baselines(store, moved, tx)
        if unlinked:
            store.remove_links(unlinked, conn=tx)
        if links is not None and not links.empty:
            store.save_links(links, run_id, conn=tx)
        if not carried.empty:
            store.save_baselines(carried, run_id, conn=tx)
        if merges is not None and not merges.empty:
            store.save_merges(merges, run_id, conn=tx)
        if paused is not None and not paused.empty:
            store.set_paused(paused, conn=tx)
        if deletions is not None and not deletions.empty:
            store.save_deletions(deletions, run_id, conn=tx)
        n_base = sum(store.save_baselines(b, run_id, conn=tx) for b in _frames(baselines))
        store.resolve_errors(resolved, conn=tx)
        n_err = store.record_errors(errors, run_id, conn=tx)
        n_act = sum(store.record_activity(a, run_id, conn=tx) for a in _frames(activity))
        for source, entity, high_water, token in watermarks:
            store.save_watermark(source, entity, high_water, token, run_id, conn=tx)
    return {"baselines": n_base, "errors": n_err, "activity": n_act, "watermarks": len(watermarks)}


def carried_baselines(store, moved: pd.DataFrame | None, conn) -> pd.DataFrame:
    """The stored baselines of each ``from_person`` as ``to_person``'s (``person_id, field, value``), read before
    the links change (a re-link drops the baselines of the persons it moves)."""
    if moved is None or moved.empty:
        return pd.DataFrame(columns=["person_id", "field", "value"])
    moved = moved.drop_duplicates("from_person", keep="last")
    rows = store.baseline_rows(moved["from_person"].tolist(), conn=conn)
    to = pd.Series(moved["to_person"].astype("int64").to_numpy(), index=moved["from_person"].astype("int64").to_numpy())
    return rows.assign(person_id=rows["person_id"].map(to).astype("int64"))


def _frames(parts):
    return [parts] if isinstance(parts, pd.DataFrame) else parts


def _committed_before(conn, run_id: str, watermarks) -> dict | None:
    """What an earlier try of this same commit recorded, when it went through: a retried commit task whose first
    try committed (the worker died before Airflow saw the task finish) must not record the run's activity, errors
    and baselines twice. It is the same commit when the run's first watermark is already this run's, at this very
    high-water mark (a whole run cleared and run again extracts anew, so it commits a later one)."""
    import sqlalchemy as sa

    from mdsync.state import schema
    from mdsync.state.database import utc

    if not watermarks:
        return None
    source, entity, high_water, _ = watermarks[0]
    w = schema.watermarks
    row = conn.execute(sa.select(w.c.run_id, w.c.high_water).where(w.c.source == source,
                                                                  w.c.entity_type == entity)).first()
    if row is None or row.run_id != run_id or utc(row.high_water) != utc(high_water):
        return None

    def count(table) -> int:
        return conn.execute(sa.select(sa.func.count()).select_from(table).where(table.c.run_id == run_id)).scalar_one()

    return {"baselines": count(schema.baselines), "errors": count(schema.sync_errors),
            "activity": count(schema.activity), "watermarks": len(watermarks)}

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

from mdsync.activity import activity_frame
from mdsync.load import LINK_FIELD
from mdsync.plan import REQUIRES_DYNAMICS, REQUIRES_MARKETO, REQUIRES_NOTHING

log = logging.getLogger("mdsync.commit")

_KEY = ["person_id", "field"]


def succeeded_baselines(updates: pd.DataFrame, dynamics_results: pd.DataFrame, marketo_results: pd.DataFrame) -> pd.DataFrame:
    """Baseline updates whose required write went through (or that needed none)."""
    if updates.empty:
        return updates

    def ok_keys(results: pd.DataFrame) -> pd.MultiIndex:
        if results.empty:
            return pd.MultiIndex.from_arrays([[], []], names=_KEY)
        good = results[results["ok"].astype(bool)]
        return pd.MultiIndex.from_frame(good[_KEY].astype({"person_id": "int64", "field": "str"}))

    keys = pd.MultiIndex.from_frame(updates[_KEY].astype({"person_id": "int64", "field": "str"}))
    requires = updates["requires"].to_numpy()
    keep = ((requires == REQUIRES_NOTHING)
            | ((requires == REQUIRES_DYNAMICS) & keys.isin(ok_keys(dynamics_results)))
            | ((requires == REQUIRES_MARKETO) & keys.isin(ok_keys(marketo_results))))
    return updates[keep]


def write_activity(entity: str, writes: pd.DataFrame, results: pd.DataFrame, target: str) -> pd.DataFrame:
    """One activity row per attempted write: ``update`` when it went through, ``error`` when it did not."""
    if results.empty:
        return activity_frame([])
    data = results[results["field"] != LINK_FIELD].merge(
        writes[["person_id", "field", "previous", "reason"]], on=_KEY, how="left")
    where = "Dynamics" if target == "dynamics" else "Marketo"
    ok = data["ok"].astype(bool)
    dry = data["error_code"].eq("dry_run").fillna(False)
    detail = data["reason"].fillna("") + f" -> {where}"
    detail = detail.where(~dry, detail + " [dry run: not written]")
    failed = ~ok & ~dry
    detail = detail.where(~failed, f"{where} rejected the value: " + data["error_code"].fillna("").astype(str) + " "
                          + data["error_message"].fillna("").astype(str) + "; not re-sent until the value changes")
    return activity_frame(pd.DataFrame({
        "entity_type": entity, "person_id": data["person_id"], "dynamics_type": entity, "dynamics_id": data["dynamics_id"],
        "action": pd.Series("update", index=data.index).where(~failed, "error"), "field": data["field"],
        "old_value": data["previous"], "new_value": data["value"], "detail": detail,
    }))


def collision_activity(entity: str, collisions: pd.DataFrame) -> pd.DataFrame:
    if collisions.empty:
        return activity_frame([])
    c = collisions
    winner_value = c["marketo_value"].where(c["winner"] == "marketo", c["dynamics_value"])
    loser_value = c["dynamics_value"].where(c["winner"] == "marketo", c["marketo_value"])

    def show(s: pd.Series) -> pd.Series:
        return s.astype(object).map(lambda v: "(empty)" if v is None or pd.isna(v) else repr(str(v)))

    detail = ("Marketo " + show(c["marketo_value"]) + " vs Dynamics " + show(c["dynamics_value"]) + " (last synced "
              + show(c["baseline"]) + "): " + c["reason"])
    return activity_frame(pd.DataFrame({
        "entity_type": entity, "person_id": c["person_id"], "dynamics_type": entity, "dynamics_id": c["dynamics_id"],
        "action": "collision", "field": c["field"], "old_value": loser_value, "new_value": winner_value,
        "winner": c["winner"], "detail": detail,
    }))


def held_activity(entity: str, held: pd.DataFrame, target: str) -> pd.DataFrame:
    if held.empty:
        return activity_frame([])
    where = "Dynamics" if target == "dynamics" else "Marketo"
    return activity_frame(pd.DataFrame({
        "entity_type": entity, "person_id": held["person_id"], "dynamics_type": entity, "dynamics_id": held["dynamics_id"],
        "action": "skip", "field": held["field"], "old_value": held["previous"], "new_value": held["value"],
        "detail": f"not re-sent: {where} already rejected this value (retried when it changes, or with retry_failed)",
    }))


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
    store, run_id: str, *, baselines: pd.DataFrame, activity: pd.DataFrame, errors: pd.DataFrame,
    resolved: pd.DataFrame, watermarks: list[tuple[str, str, datetime | None, str | None]],
    links: pd.DataFrame | None = None, unlinked: list[int] = (),
) -> dict:
    """Persist a cycle's outcome atomically. Returns counts."""
    with store.transaction() as tx:
        if unlinked:
            store.remove_links(unlinked, conn=tx)
        if links is not None and not links.empty:
            store.save_links(links, run_id, conn=tx)
        n_base = store.save_baselines(baselines, run_id, conn=tx)
        store.resolve_errors(resolved, conn=tx)
        n_err = store.record_errors(errors, run_id, conn=tx)
        n_act = store.record_activity(activity, run_id, conn=tx)
        for source, entity, high_water, token in watermarks:
            store.save_watermark(source, entity, high_water, token, run_id, conn=tx)
    return {"baselines": n_base, "errors": n_err, "activity": n_act, "watermarks": len(watermarks)}

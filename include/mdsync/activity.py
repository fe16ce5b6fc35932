"""The activity log: one readable line per record decision, in the task log and in the state store.

Actions: ``create``, ``update``, ``consent``, ``link``, ``unlink``, ``collision``, ``skip``, ``error``, ``ambiguous``,
``flag`` and ``delete`` (what a delete policy did to a deleted pair's survivor: flagged it, or deleted/deactivated
it), ``merge`` (a merge on either side: a link moved to the surviving record or person, a loser's link dropped, two
persons to merge in Marketo), and an undo run's ``undo`` (a value restored) and ``undo_skipped`` (not restored, or
listed: see :mod:`mdsync.undo`).
``consent`` is a change of a consent flag (``opt_out_wins``): an opt-out written to the other side
(:func:`write_activity`), or a re-opt-in held back because the other side still says opted out
(:func:`consent_held_activity`); ``winner`` names the side whose opt-out holds.
Every stage builds its rows with the builders here (one place for what a line says).
``python -m mdsync.activity --email ann@example.com`` (``make activity EMAIL=…``) prints a person's history.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import pandas as pd

from mdsync.config import Side
from mdsync.constants import DELETED_FLAG, PSEUDO_FIELDS

COLUMNS = [
    "entity_type", "person_id", "email", "dynamics_type", "dynamics_id", "action", "field", "old_value",
    "new_value", "winner", "detail",
]


def activity_frame(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Rows (dicts or a frame) -> an activity frame with every column (missing ones empty)."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    return frame.reindex(columns=COLUMNS).astype(object).where(lambda f: f.notna(), None)


def write_activity(entity: str, writes: pd.DataFrame, results: pd.DataFrame, target: str) -> pd.DataFrame:
    """One activity row per attempted write: ``update`` (``consent`` for a consent flag, with the source side
    as ``winner``) when it went through, ``error`` when it did not."""
    if results.empty:
        return activity_frame([])
    if "action" not in writes.columns:
        writes = writes.assign(action="update")
    data = results[~results["field"].isin(PSEUDO_FIELDS)].merge(
        writes[["person_id", "field", "previous", "reason", "action"]], on=["person_id", "field"], how="left")
    where = "Dynamics" if target == "dynamics" else "Marketo"
    action = data["action"].astype(object).where(data["action"].notna(), "update")
    consent = action.eq("consent")
    ok = data["ok"].astype(bool)
    dry = data["error_code"].eq("dry_run").fillna(False)
    detail = data["reason"].fillna("") + WRITTEN_TO[target]
    detail = detail.where(~dry, detail + " [dry run: not written]")
    failed = ~ok & ~dry
    detail = detail.where(~failed, f"{where} rejected the value: " + data["error_code"].fillna("").astype(str) + " "
                          + data["error_message"].fillna("").astype(str) + "; not re-sent until the value changes")
    source = "marketo" if target == "dynamics" else "dynamics"
    return activity_frame(pd.DataFrame({
        "entity_type": entity, "person_id": data["person_id"], "dynamics_type": entity, "dynamics_id": data["dynamics_id"],
        "action": action.where(~failed, "error"), "field": data["field"],
        "old_value": data["previous"], "new_value": data["value"],
        "winner": pd.Series(source, index=data.index).where(consent, None), "detail": detail,
    }))


def flag_failed_activity(results: pd.DataFrame, target: str, entity: str | None = None) -> pd.DataFrame:
    """``error`` rows for deleted flags (delete policy ``flag``) that ``target`` refused (identity logged the
    decision; a flag that went through needs no second line). ``entity``: the results' entity type, when they
    carry no ``entity_type`` column (Dynamics results are per entity type)."""
    if results.empty:
        return activity_frame([])
    bad = results[results["field"].eq(DELETED_FLAG).to_numpy() & ~results["ok"].astype(bool).to_numpy()
                  & results["error_code"].ne("dry_run").fillna(True).to_numpy()]
    if bad.empty:
        return activity_frame([])
    where = "Dynamics" if target == "dynamics" else "Marketo"
    entity = bad["entity_type"] if "entity_type" in bad else entity
    return activity_frame(pd.DataFrame({
        "person_id": bad["person_id"], "dynamics_id": bad["dynamics_id"], "entity_type": entity,
        "dynamics_type": entity, "action": "error", "field": DELETED_FLAG,
        "detail": f"{where} refused the deleted flag: " + bad["error_code"].fillna("").astype(str) + " "
                  + bad["error_message"].fillna("").astype(str) + "; the record is kept, unlinked, without it"}))


#: how a write line's detail ends: the side written (:func:`written_side` reads it back, e.g. for an undo)
WRITTEN_TO = {"dynamics": " -> Dynamics", "marketo": " -> Marketo"}


def written_side(detail: pd.Series) -> pd.Series:
    """The side a stored write line (:func:`write_activity`) wrote, from its detail: ``dynamics``, ``marketo``, or
    None (not a write: a held re-opt-in's ``consent`` line, a dry run's line)."""
    text = detail.astype(object).where(detail.notna(), "").astype(str)
    to_dynamics = text.str.endswith(WRITTEN_TO["dynamics"]).to_numpy()
    to_marketo = text.str.endswith(WRITTEN_TO["marketo"]).to_numpy()
    return pd.Series(np.where(to_dynamics, "dynamics", np.where(to_marketo, "marketo", None)), index=detail.index,
                     dtype=object)


def consent_held_activity(entity: str, held: pd.DataFrame) -> pd.DataFrame:
    """``consent`` rows for re-opt-ins not propagated (:attr:`mdsync.plan.SyncPlan.consent_held`): the change on
    the side that re-opted in (the opt-out it had -> what it says now), the other side as ``winner``."""
    if held.empty:
        return activity_frame([])
    on_marketo = held["reopted"].eq("marketo")
    now = held["marketo_value"].where(on_marketo, held["dynamics_value"])
    return activity_frame(pd.DataFrame({
        "entity_type": entity, "person_id": held["person_id"], "dynamics_type": entity, "dynamics_id": held["dynamics_id"],
        "action": "consent", "field": held["field"], "old_value": held["baseline"], "new_value": now,
        "winner": pd.Series("dynamics", index=held.index).where(on_marketo, "marketo"), "detail": held["reason"],
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


def problem_activity(entity: str, problems, links: pd.DataFrame) -> pd.DataFrame:
    """``skip`` rows for values that could not be read (:class:`mdsync.canonical.Problem`), one frame per field."""
    parts = []
    for p in problems:  # one frame per field with unreadable values
        where = "Marketo" if p.side is Side.MARKETO else "Dynamics"
        values = pd.Series(p.values.to_numpy(), dtype=object)
        shown = values.map(repr)
        parts.append(pd.DataFrame({
            "entity_type": entity, "person_id": p.keys.to_numpy(), "dynamics_type": entity,
            "dynamics_id": links["dynamics_id"].reindex(p.keys).to_numpy(), "action": "skip", "field": p.field,
            "new_value": values.where(values.notna(), None).astype(object).map(lambda v: None if v is None else str(v)).to_numpy(),
            "detail": (where + " value " + shown + " left alone: " + p.reason).to_numpy()}))
    return activity_frame(pd.concat(parts, ignore_index=True)) if parts else activity_frame([])


def blocked_activity(entity: str, blocked: pd.DataFrame, where: str) -> pd.DataFrame:
    """``skip`` rows for planned writes to fields the sync user cannot update on ``where``."""
    if blocked.empty:
        return activity_frame([])
    return activity_frame(blocked.assign(
        entity_type=entity, dynamics_type=entity, action="skip", old_value=blocked["previous"],
        new_value=blocked["value"], detail=f"not written: the sync user cannot update this field in {where}"))


def _short(value, limit: int = 80) -> str:
    if _blank(value):
        return "(empty)"
    text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "…'"


def _blank(value) -> bool:
    return value is None or (not isinstance(value, str) and pd.isna(value)) or value == ""


def format_line(row: dict) -> str:
    """One human-readable line for an activity row."""
    row = {k: (None if _blank(v) else v) for k, v in row.items()}
    who = f"person {row.get('person_id')}" if row.get("person_id") is not None else "no person"
    if row.get("email"):
        who += f" <{row['email']}>"
    if row.get("dynamics_id"):
        who += f" ⇄ {row.get('dynamics_type') or 'record'} {row['dynamics_id']}"
    action = str(row.get("action") or "?")
    text = f"{action.upper():<9} {who}"
    if row.get("field"):
        text += f" | {row['field']}"
        if action in ("update", "consent", "collision", "error", "skip", "undo", "undo_skipped"):
            text += f": {_short(row.get('old_value'))} -> {_short(row.get('new_value'))}"
    if row.get("winner"):
        text += f" | winner: {row['winner']}"
    if row.get("detail"):
        text += f" | {row['detail']}"
    return text


def log_activity(frame: pd.DataFrame, logger: logging.Logger, limit: int | None = None) -> None:
    """Write one line per activity row to ``logger`` (errors at WARNING, the rest at INFO)."""
    rows = frame.to_dict("records")
    shown = rows if limit is None else rows[:limit]
    for row in shown:
        level = logging.WARNING if row.get("action") in ("error", "ambiguous") else logging.INFO
        logger.log(level, "%s", format_line(row))
    if limit is not None and len(rows) > limit:
        logger.info("... and %d more activity rows (all are in the state store's activity table)", len(rows) - limit)


def main(argv: list[str] | None = None) -> int:
    from mdsync.state import open_store

    parser = argparse.ArgumentParser(prog="python -m mdsync.activity", description="Print a person's sync history.")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--email", help="the person's email (case-insensitive; also finds rows under older emails)")
    who.add_argument("--person", type=int, help="the Marketo person id")
    who.add_argument("--dynamics-id", help="the Dynamics lead or contact id")
    who.add_argument("--run", help="an Airflow run id: everything that run did")
    parser.add_argument("--state-url", help="state store URL (default: $MDSYNC_STATE_URL or the Airflow home's SQLite)")
    args = parser.parse_args(argv)
    store = open_store(args.state_url)
    history = store.activity(email=args.email, person_id=args.person, dynamics_id=args.dynamics_id, run_id=args.run)
    if history.empty:
        print(f"no activity found in {store!r} for {args.email or args.person or args.dynamics_id or args.run}")
        return 1
    for row in history.to_dict("records"):
        print(f"{row['at']:%Y-%m-%d %H:%M:%S}  {row['run_id'] or '-':<40}  {format_line(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Undo a run (issue 9 item 5, DESIGN §4): put back the values an earlier run wrote, where they still stand.

An undo is an ordinary cycle with the run parameter ``undo_run``: extract reads, by id, just the persons and
Dynamics records the undone run wrote (not the window, so no watermark moves), identity runs as usual, and each
``plan_<entity>`` builds its plan here (:func:`plan_undo`) instead of the three-way diff. The plan has the shape
:func:`mdsync.plan.plan_entity` returns, so field access, held-back rejections, the mass-change guard, the loads
(batching, per-field retry, dry run) and commit handle it as they handle every plan.

What the undone run wrote comes from its activity lines (:func:`run_writes`): each successful write is an
``update``, ``consent`` or ``undo`` line with the canonical field, the written side's value before
(``old_value``) and the value written (``new_value``), all canonical, and the side written at the end of its
detail (:func:`mdsync.activity.written_side`). Per pair and field the run wrote:

- the value to restore is the written side's value before the run (a run that wrote both sides, as an undo
  does, with different values before: the entity type's collision winner's);
- it is restored on **both** sides of the pair, the side the run wrote and the side the change came from, so
  the pair agrees and the restored value becomes its baseline (restore one side only and the next cycle would
  carry the change over again). A side that already holds the restored value is not written;
- only where each side still holds what the run left there (or already the restored value): a value changed
  since, on either side, is never overwritten; it is an ``undo_skipped`` line and listed in the report;
- an opt-out (``rule: opt_out_wins``) is never turned into an opt-in, not even by an undo; a one-way field is
  not written against its direction; a pair no longer linked as it was, a record no longer found, or a field no
  longer mapped or readable is not restored. Each is an ``undo_skipped`` line saying why;
- records the run created and links it made are listed (``undo_skipped`` lines), never deleted or unlinked.

Restores are ``undo`` writes, their activity lines naming the undone run. A restore's baseline update requires
every write it makes (:data:`mdsync.plan.REQUIRES_BOTH` when it writes both sides): half a restore keeps the
baseline, and the next cycle carries on from what was written. An undo is a run like any other: undoing an undo
restores what the undo replaced. Everything here is pure on frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mdsync.activity import activity_frame, written_side
from mdsync.canonical import CANONICAL_DTYPE
from mdsync.config import Direction, EntityConfig, Side
from mdsync.diff import OPTED_OUT, diff_key
from mdsync.errors import ConfigError
from mdsync.plan import (BASELINE_COLUMNS, COLLISION_COLUMNS, CONSENT_HELD_COLUMNS, REQUIRES_BOTH,
                         REQUIRES_DYNAMICS, REQUIRES_MARKETO, WRITE_COLUMNS, SyncPlan)
from mdsync.results import UndoItem, UndoSummary

#: activity actions of an undo run: a value restored, a value not restored (or a record only listed)
UNDO, UNDO_SKIPPED = "undo", "undo_skipped"
#: the actions of successful write lines (an ``error`` line is a write that did not happen)
WRITE_ACTIONS = ("update", "consent", UNDO)
#: the actions of lines that are listed, not undone
LISTED_ACTIONS = ("create", "link")
#: why a pair-field is not restored (the keys of :attr:`UndoSummary.skipped`)
CHANGED_LATER, CONSENT_KEPT, ONE_WAY, NOT_LINKED, NOT_FOUND, NOT_READABLE, NOT_MAPPED, ALREADY_RESTORED = (
    "changed_later", "consent", "one_way", "not_linked", "not_found", "not_readable", "not_mapped",
    "already_restored")
#: changed-later values named in the run's report per entity type (all are activity lines)
REPORT_ITEMS = 20
WRITES_COLUMNS = ["entity_type", "person_id", "dynamics_id", "field", "side", "old", "new"]
_WHERE = {"dynamics": "Dynamics", "marketo": "Marketo"}


@dataclass
class UndoPlan:
    """One entity type's undo: the plan of restores, the lines of what it does not restore, and a summary."""

    plan: SyncPlan
    #: ``undo_skipped`` activity rows: values not restored (and why), records created and links made (listed)
    notes: pd.DataFrame
    summary: UndoSummary


def run_writes(activity: pd.DataFrame) -> pd.DataFrame:
    """The successful writes among a run's activity rows, one row per entity type, person, field and side written:
    :data:`WRITES_COLUMNS` (``old``: the side's value before the run, ``new``: what the run left there, canonical)."""
    if activity.empty:
        return _frame({c: [] for c in WRITES_COLUMNS})
    rows = activity.sort_values("id", kind="stable") if "id" in activity else activity
    rows = rows[rows["action"].isin(WRITE_ACTIONS).to_numpy() & rows["field"].notna().to_numpy()
                & rows["person_id"].notna().to_numpy()]
    rows = rows.assign(side=written_side(rows["detail"]))
    rows = rows[rows["side"].notna()]
    key = ["entity_type", "person_id", "field", "side"]
    # a line written twice (a retried commit) counts once: the value before the first, the value of the last
    first = rows.drop_duplicates(key, keep="first")[key + ["old_value"]]
    last = rows.drop_duplicates(key, keep="last")[key + ["new_value", "dynamics_id"]]
    out = first.merge(last, on=key).rename(columns={"old_value": "old", "new_value": "new"})
    return _frame({c: out[c].to_numpy() for c in WRITES_COLUMNS})


def _frame(columns: dict) -> pd.DataFrame:
    out = pd.DataFrame(columns)
    out["person_id"] = out["person_id"].astype("int64")
    for c in ("old", "new"):
        out[c] = out[c].astype(CANONICAL_DTYPE)
    return out


def listed_lines(activity: pd.DataFrame) -> pd.DataFrame:
    """A run's ``create`` and ``link`` lines: records it created and links it made (an undo lists them)."""
    if activity.empty:
        return activity_frame([])
    rows = activity[activity["action"].isin(LISTED_ACTIONS)]
    return rows.drop_duplicates(["action", "entity_type", "person_id", "dynamics_id"])


def records_to_read(activity: pd.DataFrame) -> tuple[list[int], dict[str, list[str]]]:
    """What an undo extracts: the Marketo persons and, per entity type, the Dynamics records the run wrote."""
    writes = run_writes(activity)
    persons = sorted(set(writes["person_id"].tolist()))
    records = {str(e): sorted(set(part["dynamics_id"].dropna().astype(str)))
               for e, part in writes.groupby("entity_type", sort=True)}
    return persons, records


def check_request(undo_run: str, activity: pd.DataFrame, *, this_run: str, person_ids=(), full_resync: bool = False,
                  recent: pd.DataFrame | None = None) -> None:
    """Refuse an undo that cannot be done, in one line (:class:`ConfigError`: no retry fixes it).

    :param activity: the undone run's activity rows (empty: no such run in this state store).
    :param recent: the latest runs with activity (``run_id, last_at``), named when the run is unknown.
    """
    if undo_run == this_run:
        raise ConfigError(f"run parameter undo_run: {undo_run!r} is this run itself; name an earlier run")
    if person_ids or full_resync:
        other = "person_ids" if person_ids else "full_resync"
        raise ConfigError(f"run parameter undo_run cannot be combined with {other}: an undo syncs only what run "
                          f"{undo_run!r} wrote; start the undo on its own (dry_run and allow_mass_change are fine)")
    if activity.empty:
        known = "" if recent is None or recent.empty else \
            "; the latest runs with activity are " + ", ".join(
                f"{r.run_id} ({pd.Timestamp(r.last_at):%Y-%m-%d %H:%M} UTC)" for r in recent.itertuples())
        raise ConfigError(f"run parameter undo_run: run {undo_run!r} recorded no activity in this state store "
                          f"(not a run id of this store, a run that wrote nothing, or a dry run): nothing to "
                          f"undo{known}")
    if run_writes(activity).empty and listed_lines(activity).empty:
        raise ConfigError(f"run parameter undo_run: run {undo_run!r} wrote nothing (no value written, no record "
                          f"created, no link made): nothing to undo")


def _same(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Null-aware equality of two canonical comparison keys (NA equals NA)."""
    return (a == b).to_numpy(dtype=bool, na_value=False) | (a.isna().to_numpy() & b.isna().to_numpy())


def _show(values: pd.Series) -> pd.Series:
    return values.astype(object).map(lambda v: "(empty)" if v is None or pd.isna(v) else repr(str(v)))


def plan_undo(entity: EntityConfig, activity: pd.DataFrame, marketo: pd.DataFrame, dynamics: pd.DataFrame,
              links: pd.DataFrame, baseline: pd.DataFrame, *, undone_run: str) -> UndoPlan:
    """The restores of one entity type's pairs that ``undone_run`` wrote.

    :param activity: the undone run's activity rows (every entity type's; this one's are used).
    :param marketo: / :param dynamics: canonical frames of the pairs' values now (index person id), as the plan
        stage builds them: a person missing from one was not found on that side, a missing column is a field the
        sync user cannot read there.
    :param links: this entity type's links now (index person id, ``dynamics_id``).
    :param baseline: the baselines now (wide canonical frame, index person id).
    """
    name, winner = entity.name, entity.collision_winner
    writes = run_writes(activity)
    writes = writes[writes["entity_type"] == name]
    key = ["person_id", "field"]
    d = writes[writes["side"] == "dynamics"].set_index(key)
    m = writes[writes["side"] == "marketo"].set_index(key)
    idx = d.index.union(m.index)
    on_d, on_m = idx.isin(d.index), idx.isin(m.index)
    # the side whose value before the run is restored: the one written, or the collision winner when both were
    from_d = on_d & (~on_m | (winner is Side.DYNAMICS))
    restore = d["old"].reindex(idx).where(from_d, m["old"].reindex(idx))
    # what each side holds if nobody changed it since: what the run wrote there, else what it wrote on the other
    left_d = d["new"].reindex(idx).where(on_d, m["new"].reindex(idx))
    left_m = m["new"].reindex(idx).where(on_m, d["new"].reindex(idx))
    run_record = d["dynamics_id"].reindex(idx).where(on_d, m["dynamics_id"].reindex(idx))
    pids = idx.get_level_values("person_id").to_numpy(dtype="int64")
    fields = idx.get_level_values("field").to_numpy(dtype=object)
    n = len(idx)

    linked = links["dynamics_id"].reindex(pids)
    same_pair = linked.notna().to_numpy() & (linked.astype(str).str.lower().to_numpy()
                                            == run_record.astype(str).str.lower().to_numpy())
    reason = np.full(n, None, dtype=object)
    where = np.full(n, None, dtype=object)  # the side a reason is about
    write_d, write_m = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    now_d, now_m = np.full(n, None, dtype=object), np.full(n, None, dtype=object)
    changed_d, changed_m = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    maps = {f.name: f for f in entity.fields}

    def mark(mask: np.ndarray, why: str, side=None) -> None:
        mask = mask & (reason == None)  # noqa: E711 - elementwise on an object array
        reason[mask] = why
        if side is not None:
            where[mask] = side if isinstance(side, str) else side[mask]

    for fname, pos in pd.Series(range(n)).groupby(fields, sort=False).indices.items():
        fmap = maps.get(fname)
        if fmap is None:
            reason[pos] = NOT_MAPPED
            continue
        rows = np.zeros(n, dtype=bool)
        rows[pos] = True
        mark(rows & ~same_pair, NOT_LINKED)
        ids = pids[pos]
        res_key = diff_key(restore.iloc[pos].reset_index(drop=True), fmap)
        state = {}
        for side, frame, left, now in (("dynamics", dynamics, left_d, now_d), ("marketo", marketo, left_m, now_m)):
            found = np.zeros(n, dtype=bool)
            found[pos] = pd.Index(ids).isin(frame.index)
            mark(rows & ~found, NOT_FOUND, side)
            readable = fname in frame.columns
            if not readable:
                mark(rows, NOT_READABLE, side)
            current = (frame[fname].reindex(ids) if readable else pd.Series(np.nan, index=ids)).astype(CANONICAL_DTYPE)
            now[pos] = current.astype(object).where(current.notna(), None).to_numpy()
            cur_key = diff_key(current.reset_index(drop=True), fmap)
            state[side] = (_same(cur_key, diff_key(left.iloc[pos].reset_index(drop=True), fmap)),
                           _same(cur_key, res_key), cur_key.eq(OPTED_OUT).to_numpy(dtype=bool, na_value=False))
        if fmap.direction is not Direction.BOTH:
            mark(rows, ONE_WAY, "marketo" if fmap.direction is Direction.TO_DYNAMICS else "dynamics")
        (left_here_d, restored_d, out_d), (left_here_m, restored_m, out_m) = state["dynamics"], state["marketo"]
        if fmap.opt_out_wins:  # never an opt-in over an opt-out, whatever else holds
            restore_out = res_key.eq(OPTED_OUT).to_numpy(dtype=bool, na_value=False)
            consent = np.zeros(n, dtype=bool)
            consent[pos] = ~restore_out & (out_d | out_m)
            mark(consent, CONSENT_KEPT)
        changed_d[pos], changed_m[pos] = ~(left_here_d | restored_d), ~(left_here_m | restored_m)
        mark(rows & (changed_d | changed_m), CHANGED_LATER)
        write_d[pos], write_m[pos] = left_here_d & ~restored_d, left_here_m & ~restored_m
        mark(rows & ~write_d & ~write_m, ALREADY_RESTORED)
    ok = reason == None  # noqa: E711
    write_d &= ok
    write_m &= ok

    dynamics_ids = np.where(linked.notna().to_numpy(), linked.to_numpy(dtype=object), run_record.to_numpy(dtype=object))
    base = np.full(n, None, dtype=object)
    if not baseline.empty and n:
        wide = baseline.reindex(index=pd.Index(np.unique(pids)), columns=list(dict.fromkeys(fields)))
        rows_at, cols_at = wide.index.get_indexer(pids), wide.columns.get_indexer(fields)
        base = wide.astype(object).to_numpy()[rows_at, cols_at]
    why = f"undo of run {undone_run}: the value before that run"

    def writes_to(mask: np.ndarray, now: np.ndarray) -> pd.DataFrame:
        return _canonical(pd.DataFrame({
            "person_id": pids[mask], "dynamics_id": dynamics_ids[mask], "field": fields[mask],
            "value": restore.to_numpy(dtype=object)[mask], "previous": now[mask], "baseline": base[mask],
            "reason": why, "action": UNDO}), WRITE_COLUMNS)

    restored = write_d | write_m
    requires = np.where(write_d & write_m, REQUIRES_BOTH, np.where(write_d, REQUIRES_DYNAMICS, REQUIRES_MARKETO))
    baselines = _canonical(pd.DataFrame({"person_id": pids[restored], "field": fields[restored],
                                         "value": restore.to_numpy(dtype=object)[restored],
                                         "requires": requires[restored]}), BASELINE_COLUMNS)
    plan = SyncPlan(entity=name, dynamics_writes=writes_to(write_d, now_d), marketo_writes=writes_to(write_m, now_m),
                    collisions=_canonical(pd.DataFrame(columns=COLLISION_COLUMNS), COLLISION_COLUMNS),
                    baseline_updates=baselines,
                    consent_held=_canonical(pd.DataFrame(columns=CONSENT_HELD_COLUMNS), CONSENT_HELD_COLUMNS),
                    compared=len(np.unique(pids)))

    skipped = ~ok
    frame = pd.DataFrame({"person_id": pids, "dynamics_id": dynamics_ids, "field": fields, "reason": reason,
                          "where": where, "now_d": now_d, "now_m": now_m, "changed_d": changed_d,
                          "changed_m": changed_m, "left": left_d.astype(object).to_numpy(),
                          "restore": restore.astype(object).to_numpy(),
                          "written": np.where(on_d & on_m, "both", np.where(on_d, "dynamics", "marketo"))})[skipped]
    notes = _skipped_notes(name, frame, undone_run)
    listed = listed_lines(activity)
    listed = listed[listed["entity_type"] == name] if not listed.empty else listed
    notes = pd.concat([notes, _listed_notes(listed, undone_run)], ignore_index=True)
    later = frame[frame["reason"] == CHANGED_LATER]
    summary = UndoSummary(
        run_id=undone_run, restores=int(restored.sum()),
        skipped={str(k): int(v) for k, v in pd.Series(reason[skipped]).value_counts().sort_index().items()},
        created=int(listed["action"].eq("create").sum()) if not listed.empty else 0,
        linked=int(listed["action"].eq("link").sum()) if not listed.empty else 0,
        changed_later=[_item(name, r) for r in later.head(REPORT_ITEMS).itertuples(index=False)])
    return UndoPlan(plan=plan, notes=notes, summary=summary)


def _canonical(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    frame = frame.reindex(columns=columns)
    for c in columns:
        frame[c] = frame[c].astype("int64") if c == "person_id" else frame[c].astype(CANONICAL_DTYPE)
    return frame.reset_index(drop=True)


def _changed_in(frame: pd.DataFrame) -> pd.Series:
    return pd.Series(np.where(frame["changed_d"] & frame["changed_m"], "both",
                              np.where(frame["changed_d"], "dynamics", "marketo")), index=frame.index)


def _cut(value) -> str | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    text = str(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _item(entity: str, row) -> UndoItem:
    changed_in = "both" if row.changed_d and row.changed_m else ("dynamics" if row.changed_d else "marketo")
    return UndoItem(entity=entity, person_id=int(row.person_id),
                    dynamics_id=None if pd.isna(row.dynamics_id) else str(row.dynamics_id), field=str(row.field),
                    changed_in=changed_in, wrote=_cut(row.left),
                    now=_cut(row.now_m if changed_in == "marketo" else row.now_d), restore=_cut(row.restore))


def _skipped_notes(entity: str, frame: pd.DataFrame, run: str) -> pd.DataFrame:
    """``undo_skipped`` lines: what a value is now -> what the undo would have restored, and why it did not."""
    if frame.empty:
        return activity_frame([])
    changed = _changed_in(frame)
    here = frame["where"].where(frame["where"].notna(), changed.where(frame["reason"] == CHANGED_LATER, "dynamics"))
    now = frame["now_m"].where(here == "marketo", frame["now_d"])
    side_name = here.map({"dynamics": "Dynamics", "marketo": "Marketo", "both": "both sides"})
    written = frame["written"].map({"dynamics": "in Dynamics", "marketo": "in Marketo", "both": "on both sides"})
    detail = pd.Series(f"run {run}: not restored", index=frame.index, dtype=object)
    texts = {
        CHANGED_LATER: (f"run {run} wrote " + _show(frame["left"]) + " " + written + "; changed in " + side_name
                        + " since: kept, not restored (an undo never overwrites a later change)"),
        CONSENT_KEPT: pd.Series(f"consent: an undo never turns an opt-out into an opt-in (the opt-out run {run} "
                                f"carried over stays; clear it on both sides to opt back in)", index=frame.index),
        ONE_WAY: ("one-way field, " + side_name + " is its source: not written against its direction (restore it in "
                  + side_name + " and the next cycle carries it over)"),
        NOT_LINKED: pd.Series(f"no longer linked to the {entity} run {run} wrote: not restored", index=frame.index),
        NOT_FOUND: "the record is no longer in " + side_name + ": not restored",
        NOT_READABLE: "the sync user cannot read this field in " + side_name + " now: not restored",
        NOT_MAPPED: pd.Series(f"no longer a mapped field of {entity}s: not restored", index=frame.index),
        ALREADY_RESTORED: pd.Series(f"already back to the value before run {run} on both sides: nothing to restore",
                                    index=frame.index),
    }
    for why, text in texts.items():
        mask = frame["reason"] == why
        detail[mask] = text[mask]
    return activity_frame(pd.DataFrame({
        "entity_type": entity, "person_id": frame["person_id"], "dynamics_type": entity,
        "dynamics_id": frame["dynamics_id"], "action": UNDO_SKIPPED, "field": frame["field"],
        "old_value": now, "new_value": frame["restore"], "detail": detail}))


def _listed_notes(listed: pd.DataFrame, run: str) -> pd.DataFrame:
    """``undo_skipped`` lines for the records a run created and the links it made: listed, not undone."""
    if listed.empty:
        return activity_frame([])
    created = listed["action"].eq("create")
    what = listed["detail"].fillna("").astype(str)
    detail = ("created by run " + run + " (" + what + "): listed, not deleted (an undo never deletes a record; "
              "delete it by hand if it should go)").where(created, "linked by run " + run + " (" + what
                                                          + "): listed, the link is kept")
    return activity_frame(listed.assign(action=UNDO_SKIPPED, field=None, old_value=None, new_value=None,
                                        winner=None, detail=detail))

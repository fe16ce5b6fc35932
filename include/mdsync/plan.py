"""The write plan: what to write to each side, the collisions, and how the baseline advances.

:func:`plan_entity` runs diff -> resolve -> plan for one entity type and returns a :class:`SyncPlan` of long
frames (one row per person and field), which the load stage groups into API records and the record stage
turns into activity-log lines. Baseline updates carry the write they depend on, so the commit stage
advances a baseline only when that write succeeded (DESIGN §4.5). A write's ``action`` is ``consent`` for
consent flags (``opt_out_wins``) and ``update`` otherwise; re-opt-ins the rule holds back are in
:attr:`SyncPlan.consent_held`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mdsync.canonical import CANONICAL_DTYPE
from mdsync.config import EntityConfig, Side
from mdsync.diff import three_way_diff
from mdsync.resolve import FieldDecision, held_reason, resolve

WRITE_COLUMNS = ["person_id", "dynamics_id", "field", "value", "previous", "baseline", "reason", "action"]
#: ``action`` of a write: an ordinary update, or a consent change (an opt-out flowing to the other side)
UPDATE, CONSENT = "update", "consent"
#: re-opt-ins held back by ``opt_out_wins``; ``reopted``: the side that changed to opted in
CONSENT_HELD_COLUMNS = [
    "person_id", "dynamics_id", "field", "marketo_value", "dynamics_value", "baseline", "reopted", "reason",
]
COLLISION_COLUMNS = [
    "person_id", "dynamics_id", "field", "marketo_value", "dynamics_value", "baseline", "winner", "reason",
]
BASELINE_COLUMNS = ["person_id", "field", "value", "requires"]
#: ``requires`` values of a baseline update: no write, the Dynamics write, the Marketo write, both writes (an
#: undo that restores a value on both sides of a pair).
REQUIRES_NOTHING, REQUIRES_DYNAMICS, REQUIRES_MARKETO, REQUIRES_BOTH = "", "dynamics", "marketo", "both"


def _empty(columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype=CANONICAL_DTYPE) for c in columns})
    frame["person_id"] = frame["person_id"].astype("int64")
    return frame


@dataclass
class SyncPlan:
    """Everything one cycle decided for one entity type."""

    entity: str
    #: writes to Dynamics / Marketo: person_id, dynamics_id, field, value (canonical), previous (the target's
    #: current value), baseline, reason
    dynamics_writes: pd.DataFrame
    marketo_writes: pd.DataFrame
    #: person_id, dynamics_id, field, marketo_value, dynamics_value, baseline, winner, reason
    collisions: pd.DataFrame
    #: person_id, field, value, requires ("" | "dynamics" | "marketo")
    baseline_updates: pd.DataFrame
    #: re-opt-ins not propagated because the other side still says opted out (see CONSENT_HELD_COLUMNS)
    consent_held: pd.DataFrame
    compared: int = 0

    @property
    def is_empty(self) -> bool:
        return self.dynamics_writes.empty and self.marketo_writes.empty

    def summary(self) -> dict[str, int]:
        """Counts for logs and the run report."""
        return {
            "compared": self.compared,
            "dynamics_records": int(self.dynamics_writes["person_id"].nunique()),
            "dynamics_fields": len(self.dynamics_writes),
            "marketo_records": int(self.marketo_writes["person_id"].nunique()),
            "marketo_fields": len(self.marketo_writes),
            "collisions": len(self.collisions),
            "consent_changes": int(self.dynamics_writes["action"].eq(CONSENT).sum()
                                   + self.marketo_writes["action"].eq(CONSENT).sum()),
            "consent_held": len(self.consent_held),
            "baseline_updates": len(self.baseline_updates),
        }


def plan_entity(
    entity: EntityConfig,
    baseline: pd.DataFrame,
    marketo: pd.DataFrame,
    dynamics: pd.DataFrame,
    links: pd.DataFrame,
    *,
    keys: pd.Index | None = None,
    marketo_invalid: pd.DataFrame | None = None,
    dynamics_invalid: pd.DataFrame | None = None,
) -> SyncPlan:
    """Diff, resolve and plan one entity type's linked pairs.

    :param links: the entity type's links, indexed by person id, with a ``dynamics_id`` column; only linked
        persons are compared.
    :param keys: persons to compare (default: everyone present in ``marketo`` or ``dynamics``).
    Other parameters: see :func:`mdsync.diff.three_way_diff`.
    """
    if keys is None:
        keys = marketo.index.union(dynamics.index)
    keys = pd.Index(keys).intersection(links.index)
    diff = three_way_diff(
        entity, baseline, marketo, dynamics, keys=keys,
        marketo_invalid=marketo_invalid, dynamics_invalid=dynamics_invalid,
    )
    decisions = resolve(diff)
    dynamics_ids = links["dynamics_id"].reindex(diff.keys).to_numpy()
    return _assemble(entity, diff.keys, dynamics_ids, decisions)


def _assemble(
    entity: EntityConfig, keys: pd.Index, dynamics_ids: np.ndarray, decisions: list[FieldDecision]
) -> SyncPlan:
    person_ids = keys.to_numpy()
    winner = entity.collision_winner
    to_dyn, to_mkt, collisions, baselines, held = [], [], [], [], []
    for dec in decisions:
        fd = dec.diff
        name = fd.field.name
        action = CONSENT if dec.consent else UPDATE

        def rows(mask: np.ndarray, **columns) -> pd.DataFrame:
            data = {"person_id": person_ids[mask], "dynamics_id": dynamics_ids[mask], "field": name}
            data.update({k: (v[mask] if isinstance(v, pd.Series) else v) for k, v in columns.items()})
            return pd.DataFrame({k: (v.to_numpy() if isinstance(v, pd.Series) else v) for k, v in data.items()})

        if dec.to_dynamics.any():
            m = dec.to_dynamics
            to_dyn.append(rows(m, value=fd.marketo, previous=fd.dynamics, baseline=fd.baseline,
                               reason=dec.dynamics_reasons(m, entity.name, winner), action=action))
            baselines.append(rows(m, value=fd.marketo, requires=REQUIRES_DYNAMICS))
        if dec.to_marketo.any():
            m = dec.to_marketo
            to_mkt.append(rows(m, value=fd.dynamics, previous=fd.marketo, baseline=fd.baseline,
                               reason=dec.marketo_reasons(m, entity.name, winner), action=action))
            baselines.append(rows(m, value=fd.dynamics, requires=REQUIRES_MARKETO))
        if dec.collision.any():
            m = dec.collision
            collisions.append(rows(m, marketo_value=fd.marketo, dynamics_value=fd.dynamics, baseline=fd.baseline,
                                   winner=winner.value,
                                   reason=dec.dynamics_reasons(m, entity.name, winner) if winner is Side.MARKETO
                                   else dec.marketo_reasons(m, entity.name, winner)))
        for side, m in ((Side.MARKETO, dec.held_marketo), (Side.DYNAMICS, dec.held_dynamics)):
            if m.any():  # the baseline keeps the opt-out: no baseline update
                held.append(rows(m, marketo_value=fd.marketo, dynamics_value=fd.dynamics, baseline=fd.baseline,
                                 reopted=side.value, reason=held_reason(side)))
        agreed = fd.same & ~fd.baseline_exact
        if agreed.any():
            baselines.append(rows(agreed, value=fd.marketo, requires=REQUIRES_NOTHING))

    def frame(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
        if not parts:
            return _empty(columns)
        out = pd.concat(parts, ignore_index=True)
        for col in columns:
            if col not in ("person_id",) and col in out:
                out[col] = out[col].astype(CANONICAL_DTYPE)
        return out[[c for c in columns if c in out.columns]]

    return SyncPlan(
        entity=entity.name,
        dynamics_writes=frame(to_dyn, WRITE_COLUMNS),
        marketo_writes=frame(to_mkt, WRITE_COLUMNS),
        collisions=frame(collisions, COLLISION_COLUMNS),
        consent_held=frame(held, CONSENT_HELD_COLUMNS),
        baseline_updates=frame(baselines, ["person_id", "field", "value", "requires"]),
        compared=len(keys),
    )


def suppress_known_rejections(
    writes: pd.DataFrame, open_errors: pd.DataFrame, target: Side
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop writes that the target already rejected with the same value (DESIGN §4: not re-sent every cycle).

    :param writes: a plan's writes to ``target``.
    :param open_errors: open sync errors with ``person_id, target, field, value`` columns.
    :returns: (writes to send, writes held back because the same value was rejected before).
    """
    if writes.empty or open_errors.empty:
        return writes, writes.iloc[0:0]
    key = ["person_id", "field"]
    errors = open_errors.loc[open_errors["target"] == target.value, key + ["value"]].drop_duplicates(key)
    merged = writes.merge(errors, on=key, how="left", suffixes=("", "_rejected"), indicator=True)
    rejected = merged["_merge"].eq("both").to_numpy()
    same_value = (merged["value"] == merged["value_rejected"]).to_numpy(dtype=bool, na_value=False)
    same_value = same_value | (merged["value"].isna().to_numpy() & merged["value_rejected"].isna().to_numpy())
    held = rejected & same_value
    out = merged[writes.columns]
    return out.loc[~held].reset_index(drop=True), out.loc[held].reset_index(drop=True)

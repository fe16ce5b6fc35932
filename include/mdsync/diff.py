"""Three-way diff (DESIGN §4.3): baseline vs Marketo vs Dynamics, per linked pair and mapped field.

Inputs are canonical frames (see :mod:`mdsync.canonical`) indexed by Marketo person id:

- ``baseline``: the last synced value of every field of every linked pair (from the state store);
- ``marketo`` / ``dynamics``: the rows each side reported in this window (full records).

A person missing from a side's frame did not change on that side in this window, so that side's value is
taken to be the baseline. A field missing from a side's frame (the sync user cannot read it, or the side
does not carry it) is treated the same way for every row. All work is column-wise over the whole frame:
one vectorised pass per mapped field, no per-row Python.

A consent flag (``rule: opt_out_wins``) is compared by whether it says *opted out* (``"true"``): null and
``"false"`` both mean "not opted out" and are the same value for the diff, so ``same`` / ``*_changed`` are
about the opt-out only (:mod:`mdsync.resolve` applies the rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field

import numpy as np
import pandas as pd

from mdsync.canonical import CANONICAL_DTYPE, compare_key
from mdsync.config import EntityConfig, FieldMap

OPTED_OUT = "true"


@dataclass
class FieldDiff:
    """How one field compares across the three versions, for every row of :attr:`Diff.keys`."""

    field: FieldMap
    baseline: pd.Series
    marketo: pd.Series
    dynamics: pd.Series
    #: Marketo and Dynamics hold the same canonical value (nothing to write).
    same: np.ndarray
    #: Marketo's value differs from the baseline.
    marketo_changed: np.ndarray
    #: Dynamics' value differs from the baseline.
    dynamics_changed: np.ndarray
    #: the baseline holds exactly this value already (no baseline update needed when the sides agree).
    baseline_exact: np.ndarray
    #: consent flags (``opt_out_wins``) only: whether each side says opted out (``"true"``); ``None`` otherwise.
    marketo_opted_out: np.ndarray | None = None
    dynamics_opted_out: np.ndarray | None = None


@dataclass
class Diff:
    """The three-way comparison of one entity type's linked pairs."""

    entity: EntityConfig
    keys: pd.Index
    fields: list[FieldDiff] = dataclass_field(default_factory=list)


def _equal(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Null-aware equality: NA equals NA, NA never equals a value."""
    both_na = a.isna().to_numpy() & b.isna().to_numpy()
    eq = (a == b).to_numpy(dtype=bool, na_value=False)
    return eq | both_na


def diff_key(values: pd.Series, fmap: FieldMap) -> pd.Series:
    """What the diff compares: a consent flag by its opt-out alone (null = false), the rest by :func:`compare_key`."""
    if fmap.opt_out_wins:
        return pd.Series(np.where(_opted_out(values), OPTED_OUT, "false"), index=values.index, dtype=CANONICAL_DTYPE)
    return compare_key(values, fmap)


def _opted_out(values: pd.Series) -> np.ndarray:
    return values.eq(OPTED_OUT).to_numpy(dtype=bool, na_value=False)


def _column(frame: pd.DataFrame, name: str, keys: pd.Index) -> pd.Series | None:
    if name not in frame.columns:
        return None
    return frame[name].reindex(keys).astype(CANONICAL_DTYPE)


def _unchanged_cells(invalid: pd.DataFrame | None, field: str, keys: pd.Index) -> np.ndarray | None:
    """Cells whose value could not be read (see :class:`mdsync.canonical.Problem`): treated as unchanged."""
    if invalid is None or invalid.empty:
        return None
    hits = invalid.loc[invalid["field"] == field, "person_id"]
    if hits.empty:
        return None
    return keys.isin(hits)


def three_way_diff(
    entity: EntityConfig,
    baseline: pd.DataFrame,
    marketo: pd.DataFrame,
    dynamics: pd.DataFrame,
    *,
    keys: pd.Index | None = None,
    marketo_invalid: pd.DataFrame | None = None,
    dynamics_invalid: pd.DataFrame | None = None,
) -> Diff:
    """Compare baseline, Marketo and Dynamics for every linked pair that changed on either side.

    :param entity: the entity type's config (fields to compare).
    :param baseline: last synced canonical values, indexed by person id, one column per field name.
    :param marketo: Marketo's current canonical values for persons that changed there.
    :param dynamics: Dynamics' current canonical values (re-indexed by linked person id) for records that
        changed there.
    :param keys: the person ids to compare; default: every person present in ``marketo`` or ``dynamics``.
    :param marketo_invalid: ``person_id, field`` cells whose Marketo value was unreadable (left unchanged).
    :param dynamics_invalid: the same for Dynamics.
    """
    if keys is None:
        keys = marketo.index.union(dynamics.index)
    keys = pd.Index(keys, name="person_id")
    in_marketo = keys.isin(marketo.index)
    in_dynamics = keys.isin(dynamics.index)
    diff = Diff(entity=entity, keys=keys)
    na = pd.Series(np.nan, index=keys, dtype=CANONICAL_DTYPE)

    for fmap in entity.fields:
        base = _column(baseline, fmap.name, keys)
        base = na if base is None else base
        m = _side_values(marketo, fmap.name, keys, in_marketo, base, _unchanged_cells(marketo_invalid, fmap.name, keys))
        d = _side_values(
            dynamics, fmap.name, keys, in_dynamics, base, _unchanged_cells(dynamics_invalid, fmap.name, keys)
        )
        base_k, m_k, d_k = diff_key(base, fmap), diff_key(m, fmap), diff_key(d, fmap)
        diff.fields.append(
            FieldDiff(
                field=fmap,
                baseline=base,
                marketo=m,
                dynamics=d,
                same=_equal(m_k, d_k),
                marketo_changed=~_equal(m_k, base_k),
                dynamics_changed=~_equal(d_k, base_k),
                baseline_exact=_equal(m, base),
                marketo_opted_out=_opted_out(m) if fmap.opt_out_wins else None,
                dynamics_opted_out=_opted_out(d) if fmap.opt_out_wins else None,
            )
        )
    return diff


def _side_values(
    frame: pd.DataFrame,
    name: str,
    keys: pd.Index,
    present: np.ndarray,
    base: pd.Series,
    unreadable: np.ndarray | None,
) -> pd.Series:
    values = _column(frame, name, keys)
    if values is None:
        return base
    keep = present if unreadable is None else present & ~unreadable
    return values.where(keep, base)

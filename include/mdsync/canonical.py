"""Canonical values (DESIGN §5): one comparable representation per field, whichever side it came from.

Every synced value becomes a string in pandas' pyarrow-backed ``str`` dtype, or NA:

- null and empty string are both NA;
- strings are kept exactly; emails are kept as written but *compared* case-insensitively and without surrounding
  spaces (:func:`compare_key`), as identity matches them;
- numbers by value (``"12"`` for 12, 12.0 and ``"12.00"``; ``"12.5"``);
- booleans ``"true"`` / ``"false"``;
- datetimes in UTC at second resolution, ``"2026-11-22T02:47:54Z"``;
- picklists as the Marketo label (Dataverse option values go through the config's value map).

Values that cannot be read (an unparseable date, a picklist option with no mapping) are not guessed: they
become NA and are reported as :class:`Problem` rows so the diff can skip that cell and the activity log
can say why. :func:`to_marketo` / :func:`to_dynamics` turn canonical values back into what each API expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mdsync.config import FieldMap, FieldType, Side

#: The dtype of canonical columns.
CANONICAL_DTYPE = pd.StringDtype("pyarrow", na_value=np.nan)

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}
_BOOL_WORDS = {**{w: "true" for w in _TRUE}, **{w: "false" for w in _FALSE}}


@dataclass(frozen=True)
class Problem:
    """A value that could not be canonicalised (one per field, listing the records)."""

    field: str
    side: Side
    keys: pd.Index
    values: pd.Series
    reason: str


def _empty_to_na(s: pd.Series) -> pd.Series:
    s = s.astype(CANONICAL_DTYPE)
    return s.mask(s == "")


def canonical_series(raw: pd.Series, field: FieldMap, side: Side) -> tuple[pd.Series, Problem | None]:
    """Canonicalise one column of raw API values.

    :param raw: values as one side's API returned them (any dtype).
    :param field: the field's config entry (type, value map).
    :param side: which side the values come from (picklists differ per side).
    :returns: the canonical series (same index) and a :class:`Problem` for unreadable values, or ``None``.
    """
    ftype = field.type
    # An empty string is "no value" for every type.
    present = raw.notna().to_numpy() & ~raw.eq("").to_numpy(dtype=bool, na_value=False)
    if ftype in (FieldType.STRING, FieldType.EMAIL):
        return _empty_to_na(raw), None

    out = pd.Series(np.nan, index=raw.index, dtype=CANONICAL_DTYPE)
    if ftype in (FieldType.INTEGER, FieldType.NUMBER):
        num = pd.to_numeric(raw.where(present), errors="coerce").astype("float64")
        ok = num.notna() & np.isfinite(num.fillna(0))
        integral = ok & (num % 1 == 0) & (num.abs() < 2**53)
        out[integral] = num[integral].astype("int64").astype(str)
        frac = ok & ~integral
        out[frac] = num[frac].astype(str)
        bad = present & ~ok
        reason = "not a number"
    elif ftype is FieldType.BOOLEAN:
        if pd.api.types.is_bool_dtype(raw.dtype):
            words = raw.map({True: "true", False: "false"})
        else:  # isin on arrow strings, not a Python map per value
            text = raw.where(present).astype(CANONICAL_DTYPE).str.strip().str.lower()
            words = pd.Series(np.where(text.isin(_TRUE), "true", np.where(text.isin(_FALSE), "false", None)),
                              index=raw.index)
        out = words.astype(CANONICAL_DTYPE)
        bad = present & out.isna()
        reason = "not a boolean"
    elif ftype is FieldType.DATETIME:
        ts = pd.to_datetime(raw.where(present), utc=True, errors="coerce", format="ISO8601")
        ok = ts.notna()
        out[ok] = ts[ok].dt.floor("s").dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        bad = present & ~ok
        reason = "not an ISO 8601 datetime"
    elif ftype is FieldType.PICKLIST:
        assert field.values is not None
        if side is Side.DYNAMICS:
            codes = pd.to_numeric(raw.where(present), errors="coerce")
            out = codes.map(field.values).astype(CANONICAL_DTYPE)
            reason = f"option value has no label in the value map of {field.name}"
        else:
            labels = _empty_to_na(raw)
            out = labels.where(labels.isin(list(field.values.values())))
            reason = f"label is not in the value map of {field.name}"
        bad = present & out.isna()
    else:  # pragma: no cover - FieldType is closed
        raise AssertionError(ftype)

    problem = None
    if np.any(bad):
        bad = np.asarray(bad, dtype=bool)
        problem = Problem(field.name, side, raw.index[bad], raw[bad], reason)
    return out, problem


def canonical_frame(raw: pd.DataFrame, fields: list[FieldMap], side: Side) -> tuple[pd.DataFrame, list[Problem]]:
    """Canonicalise a frame whose columns are one side's API names.

    Columns absent from ``raw`` (e.g. dropped because the sync user cannot read them) stay absent, so the
    diff treats that side as unchanged for them.

    :returns: a frame with canonical field names as columns (same index) and the problems found.
    """
    name_of = {(f.marketo if side is Side.MARKETO else f.dynamics): f for f in fields}
    columns: dict[str, pd.Series] = {}
    problems: list[Problem] = []
    for api_name, field in name_of.items():
        if api_name not in raw.columns:
            continue
        columns[field.name], problem = canonical_series(raw[api_name], field, side)
        if problem is not None:
            problems.append(problem)
    return pd.DataFrame(columns, index=raw.index), problems


def compare_key(values: pd.Series, field: FieldMap) -> pd.Series:
    """What two canonical values are compared by: emails as identity matches them (case-insensitively, surrounding
    spaces aside: ``" Ann@x.com "`` is the address ``ann@x.com``), everything else exactly."""
    if field.type is FieldType.EMAIL:
        key = values.str.strip().str.lower()
        return key.mask(key == "")
    return values


def to_marketo(values: pd.Series, field: FieldMap) -> pd.Series:
    """Canonical values -> Marketo REST values (object dtype, ``None`` for null)."""
    return _to_api(values, field, Side.MARKETO)


def to_dynamics(values: pd.Series, field: FieldMap) -> pd.Series:
    """Canonical values -> Dataverse Web API values (object dtype, ``None`` for null)."""
    return _to_api(values, field, Side.DYNAMICS)


def _to_api(values: pd.Series, field: FieldMap, side: Side) -> pd.Series:
    ftype = field.type
    if ftype is FieldType.BOOLEAN:
        out = values.map({"true": True, "false": False})
    elif ftype is FieldType.INTEGER:
        out = pd.to_numeric(values, errors="coerce").astype("Int64").astype(object)
    elif ftype is FieldType.NUMBER:
        num = pd.to_numeric(values, errors="coerce")
        out = num.astype(object)
    elif ftype is FieldType.PICKLIST and side is Side.DYNAMICS:
        assert field.values is not None
        reverse = {label: option for option, label in field.values.items()}
        out = values.map(reverse).astype(object)
    else:
        out = values.astype(object)
    return out.astype(object).where(values.notna(), None)

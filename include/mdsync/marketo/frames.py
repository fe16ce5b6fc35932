"""Typed pandas frames from Marketo records and back to JSON-ready values."""

from __future__ import annotations

import math
from datetime import date, datetime, timezone

import numpy as np
import pandas as pd

_INT = {"integer", "score", "percent"}
_FLOAT = {"float", "currency"}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _to_bool(value):
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return pd.NA
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text in ("", "null"):
        return pd.NA
    raise ValueError(f"not a boolean: {value!r}")


def typed_column(series: pd.Series, data_type: str | None) -> pd.Series:
    """Convert one column to the pandas dtype of a Marketo data type (nullable dtypes, datetimes in UTC)."""
    if data_type in _INT:
        return pd.to_numeric(series, errors="raise").astype("Int64")
    if data_type in _FLOAT:
        return pd.to_numeric(series, errors="raise").astype("Float64")
    if data_type == "boolean":
        return series.map(_to_bool).astype("boolean")
    if data_type == "datetime":
        return pd.to_datetime(series, utc=True, format="ISO8601")
    if data_type == "date":
        return pd.to_datetime(series, format="ISO8601")
    return series.astype("string")


def typed_frame(records: list[dict] | pd.DataFrame, columns: list[str], types: dict[str, str]) -> pd.DataFrame:
    """A frame with ``columns`` in order, each typed per ``types`` (Marketo data types from describe).

    :raises ValueError: naming the column and data type when a value does not fit.
    """
    df = records if isinstance(records, pd.DataFrame) else pd.DataFrame.from_records(records, columns=columns)
    df = df.reindex(columns=columns)
    out = {}
    for col in columns:
        try:
            out[col] = typed_column(df[col], types.get(col))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"Marketo column {col!r} does not hold {types.get(col)!r} values: {exc}") from exc
    return pd.DataFrame(out, index=df.index)


def json_value(value):
    """A frame cell or Python value as Marketo JSON: None for missing, ISO 8601 UTC for datetimes."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (pd.Timestamp, datetime)):
        ts = pd.Timestamp(value)
        if ts.tzinfo is None:
            ts = ts.tz_localize(timezone.utc)
        return ts.tz_convert(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    return value


def records_of(data) -> list[dict]:
    """Input records (a frame or an iterable of mappings) as JSON-ready dicts."""
    if isinstance(data, pd.DataFrame):
        rows = data.to_dict(orient="records")
    else:
        rows = [dict(r) for r in data]
    return [{k: json_value(v) for k, v in row.items()} for row in rows]

"""The collisions table: every ``collision`` line of the state store's activity log (both sides changed the same
field of a linked pair between two runs), filtered, newest first, paged, and as CSV.

A collision line (:func:`mdsync.activity.collision_activity`) holds the losing value in ``old_value``, the winning
one in ``new_value`` and the winning side in ``winner``: the Marketo and Dynamics values are read from those
columns. The last synced value (the baseline the two changes were compared with) is only kept in the line's
``detail`` (``Marketo 'a' vs Dynamics 'b' (last synced 'c'): reason``); the ``baselines`` table cannot give it
back, since the collision's own commit replaced it with the winning value. It is parsed from ``detail``: the
three values are Python string literals (or ``(empty)``), so the parse is exact, quotes and escapes included; a
line in any other shape shows no baseline rather than a wrong one.

The state store may hold a million activity rows: every query starts from ``action = 'collision'`` ordered by
``id`` descending, which the index ``ix_activity_action_id (action, id)`` answers without a sort; the count is a
count over that index; the CSV export walks the rows in chunks by id (keyset), never holding them all.
"""

from __future__ import annotations

import ast
import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import date, datetime, time, timedelta, timezone

import numpy as np
import pandas as pd
import sqlalchemy as sa
from fastapi import HTTPException

from mdsync_airflow.console import sources

#: the largest page the API serves (the CSV export has every row)
MAX_PAGE_SIZE = 500
#: rows per query of a CSV export (bounded memory however many rows match)
CSV_CHUNK = 5000
WINNERS = ("marketo", "dynamics")
ACTION = "collision"

#: a value as ``collision_activity`` shows it in ``detail``: a Python string literal or ``(empty)``
_LITERAL = r"""(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\(empty\))"""
_DETAIL = rf"^Marketo {_LITERAL} vs Dynamics {_LITERAL} \(last synced (?P<baseline>{_LITERAL})\): (?P<reason>.*)$"

#: the CSV's columns, in order (and the JSON rows' keys, with the links)
CSV_COLUMNS = ["id", "at", "entity", "person_id", "email", "dynamics_type", "dynamics_id", "field", "marketo_value",
               "dynamics_value", "baseline", "winner", "run_id", "reason"]


@dataclass(frozen=True)
class CollisionFilters:
    """What the table is narrowed to (every filter optional).

    :param entity: the entity type (``lead``, ``contact``).
    :param field: the canonical field name (``job_title``).
    :param winner: the side whose value won (``marketo`` or ``dynamics``).
    :param run: the Airflow run id that recorded the collision.
    :param since: from this day (UTC) on, inclusive.
    :param until: up to this day (UTC), inclusive.
    :param q: a Marketo person id, a Dynamics record id, or part of an email (case-insensitive).
    """

    entity: str | None = None
    field: str | None = None
    winner: str | None = None
    run: str | None = None
    since: date | None = None
    until: date | None = None
    q: str | None = None

    def query(self) -> dict:
        """The filters as query-string values (for the pager's and the CSV link's URLs)."""
        return {k: (v.isoformat() if isinstance(v, date) else v) for k, v in asdict(self).items() if v}


def parse_day(value: str | None, name: str) -> date | None:
    """A ``YYYY-MM-DD`` filter value (empty: no filter).

    :raises HTTPException: 422 naming the parameter and the value when it is not a date.
    """
    if value is None or not str(value).strip():
        return None
    try:
        return date.fromisoformat(str(value).strip()[:10])
    except ValueError:
        raise HTTPException(422, f"{name}={value!r} is not a date; give it as YYYY-MM-DD (UTC)") from None


def blank(value: str | None) -> str | None:
    """A filter value from a form: surrounding spaces dropped, empty as None."""
    value = (value or "").strip()
    return value or None


def filters_from(entity=None, field=None, winner=None, run=None, since=None, until=None, q=None) -> CollisionFilters:
    """Filters from query parameters (strings, maybe empty as an HTML form sends them), checked.

    :raises HTTPException: 422 for an unknown winner or a bad date, or ``since`` after ``until``.
    """
    winner = blank(winner)
    if winner is not None and winner.lower() not in WINNERS:
        raise HTTPException(422, f"winner={winner!r} is not a side; give marketo or dynamics")
    f = CollisionFilters(entity=blank(entity), field=blank(field), winner=winner and winner.lower(), run=blank(run),
                         since=parse_day(since, "since"), until=parse_day(until, "until"), q=blank(q))
    if f.since and f.until and f.since > f.until:
        raise HTTPException(422, f"since={f.since} is after until={f.until}; nothing can match")
    return f


def day_bounds(since: date | None, until: date | None) -> tuple[datetime | None, datetime | None]:
    """UTC instants: the start of ``since`` and the start of the day after ``until`` (an exclusive bound)."""
    start = datetime.combine(since, time.min, tzinfo=timezone.utc) if since else None
    end = datetime.combine(until + timedelta(days=1), time.min, tzinfo=timezone.utc) if until else None
    return start, end


def person_text(t: sa.Table, q: str) -> sa.ColumnElement:
    """``q`` as a Marketo person id, a Dynamics record id, or part of an email (LIKE wildcards taken literally)."""
    like = "%" + q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    terms = [sa.func.lower(t.c.email).like(like, escape="\\"), t.c.dynamics_id == q, t.c.dynamics_id == q.lower()]
    if q.isdigit():
        terms.append(t.c.person_id == int(q))
    return sa.or_(*terms)


def _conditions(f: CollisionFilters) -> list[sa.ColumnElement]:
    from mdsync.state import schema

    t = schema.activity
    where = [t.c.action == ACTION]
    if f.entity:
        where.append(t.c.entity_type == f.entity)
    if f.field:
        where.append(t.c.field == f.field)
    if f.winner:
        where.append(t.c.winner == f.winner)
    if f.run:
        where.append(t.c.run_id == f.run)
    start, end = day_bounds(f.since, f.until)
    if start:
        where.append(t.c.at >= start)
    if end:
        where.append(t.c.at < end)
    if f.q:
        where.append(person_text(t, f.q))
    return where


def select_rows(f: CollisionFilters, *, limit: int, offset: int = 0, before_id: int | None = None) -> sa.Select:
    """The matching collision lines, newest first (``before_id``: only lines older than that id, for keyset
    chunks)."""
    from mdsync.state import schema

    t = schema.activity
    where = _conditions(f)
    if before_id is not None:
        where.append(t.c.id < before_id)
    return sa.select(t).where(*where).order_by(t.c.id.desc()).limit(limit).offset(offset)


def select_count(f: CollisionFilters) -> sa.Select:
    """How many collision lines match (a count over ``ix_activity_action_id`` without other filters)."""
    from mdsync.state import schema

    return sa.select(sa.func.count(schema.activity.c.id)).where(*_conditions(f))


def _text(series: pd.Series) -> pd.Series:
    """Values as text or None (the stored text columns come back as str or None)."""
    return series.astype(object).where(series.notna(), None)


def baselines_from_detail(detail: pd.Series) -> pd.Series:
    """The last synced value of each collision line, parsed from its ``detail`` (None when empty or when the
    line is not in :func:`mdsync.activity.collision_activity`'s shape)."""
    text = detail.astype(object).where(detail.notna(), "").astype(str)
    shown = text.str.extract(_DETAIL)["baseline"]
    shown = shown.astype(object).where(shown.notna(), None)
    plain = shown.notna() & ~shown.fillna("").str.contains("\\", regex=False) & shown.ne("(empty)")
    out = pd.Series(None, index=detail.index, dtype=object)
    out[plain] = shown[plain].str.slice(1, -1)
    escaped = shown.notna() & ~plain & shown.ne("(empty)")
    if escaped.any():  # only values with escapes need Python's own reading of the literal
        out[escaped] = shown[escaped].map(ast.literal_eval)
    return out


def reasons_from_detail(detail: pd.Series) -> pd.Series:
    """Why the winner won, from the line's ``detail`` (the whole detail when it is not in the usual shape)."""
    text = detail.astype(object).where(detail.notna(), "").astype(str)
    reason = text.str.extract(_DETAIL)["reason"]
    return reason.astype(object).where(reason.notna(), text.where(text.ne(""), None))


def shape(rows: list, columns: list[str]) -> pd.DataFrame:
    """Collision lines (SQL rows of ``activity``) -> the table's columns (:data:`CSV_COLUMNS`)."""
    if not rows:
        return pd.DataFrame(columns=CSV_COLUMNS)
    raw = pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in zip(columns, zip(*rows))})
    marketo_won = raw["winner"].eq("marketo").to_numpy()
    dynamics_won = raw["winner"].eq("dynamics").to_numpy()
    old, new = _text(raw["old_value"]).to_numpy(), _text(raw["new_value"]).to_numpy()
    person = pd.to_numeric(raw["person_id"], errors="coerce").astype("Int64")
    return pd.DataFrame({
        "id": raw["id"].astype("int64"),
        "at": pd.to_datetime(raw["at"], utc=True).map(lambda t: t.isoformat() if not pd.isna(t) else None),
        "entity": _text(raw["entity_type"]),
        "person_id": person.astype(object).where(person.notna(), None),
        "email": _text(raw["email"]),
        "dynamics_type": _text(raw["dynamics_type"]),
        "dynamics_id": _text(raw["dynamics_id"]),
        "field": _text(raw["field"]),
        "marketo_value": pd.Series(np.where(marketo_won, new, np.where(dynamics_won, old, None)), dtype=object),
        "dynamics_value": pd.Series(np.where(dynamics_won, new, np.where(marketo_won, old, None)), dtype=object),
        "baseline": baselines_from_detail(raw["detail"]),
        "winner": _text(raw["winner"]),
        "run_id": _text(raw["run_id"]),
        "reason": reasons_from_detail(raw["detail"]),
    })


def records(frame: pd.DataFrame) -> list[dict]:
    """A shaped frame as JSON-ready dicts (None for missing values, plain ints)."""
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict("records")


def page(f: CollisionFilters, page_no: int = 1, page_size: int = 50) -> dict:
    """One page of matching collisions, newest first, with how many match in all.

    :returns: ``{"total", "page", "page_size", "rows"}``; each row has :data:`CSV_COLUMNS`.
    """
    store = sources.store()
    query = select_rows(f, limit=page_size, offset=(page_no - 1) * page_size)
    with store.engine.connect() as c:
        total = int(c.execute(select_count(f)).scalar() or 0)
        result = c.execute(query)
        rows, columns = result.all(), list(result.keys())
    return {"total": total, "page": page_no, "page_size": page_size, "rows": records(shape(rows, columns))}


def csv_stream(select_chunk: Callable[[int | None], sa.Select], shape_rows: Callable[[list, list[str]], pd.DataFrame],
               columns: list[str], chunk: int = CSV_CHUNK) -> Iterator[str]:
    """CSV text in pieces: the header, then each chunk of rows (``select_chunk(before_id)`` gives the next at most
    ``chunk`` rows older than ``before_id``, newest first), until a chunk comes back short.

    Each chunk is its own short read, so an export of a million rows holds one chunk at a time and does not keep
    a read transaction open while the client downloads.
    """
    out = io.StringIO()
    csv.writer(out).writerow(columns)
    yield out.getvalue()
    store = sources.store()
    before: int | None = None
    while True:
        with store.engine.connect() as c:
            result = c.execute(select_chunk(before))
            rows, names = result.all(), list(result.keys())
        if not rows:
            return
        frame = shape_rows(rows, names)
        yield frame.reindex(columns=columns).to_csv(index=False, header=False, lineterminator="\r\n")
        if len(rows) < chunk:
            return
        before = int(frame["id"].min())


def csv_rows(f: CollisionFilters, chunk: int = CSV_CHUNK) -> Iterator[str]:
    """Every matching collision as CSV (header first), newest first, in chunks of ``chunk`` rows."""
    return csv_stream(lambda before: select_rows(f, limit=chunk, before_id=before), shape, CSV_COLUMNS, chunk)


def filter_choices() -> dict:
    """What the page's filter lists offer: the sync config's entity types and their fields (read from the config,
    not by scanning the activity log), and the two sides."""
    config = sources.config()
    fields = sorted({name for entity in config.entities.values() for name in entity.field_names})
    return {"entities": sorted(config.entities), "fields": fields, "winners": list(WINNERS)}

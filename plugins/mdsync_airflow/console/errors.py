"""The errors table: open rejections from the state store's ``sync_errors`` (a value a service refused, not
re-sent until it changes or a run retries it), filtered, newest first, paged and as CSV, and the check behind
*retry selected* (a run with ``retry_failed`` for those persons).

``sync_errors`` holds one open row per person, target side and field (a rejection seen again refreshes its row:
``last_seen_at``, ``occurrences``); resolved rows keep their ``resolved_at`` and are not shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pandas as pd
import sqlalchemy as sa
from fastapi import HTTPException

from mdsync_airflow.console import sources
from mdsync_airflow.console.collisions import CSV_CHUNK, blank, csv_stream, records

TARGETS = ("dynamics", "marketo")
#: the CSV's columns, in order (and the JSON rows' keys)
CSV_COLUMNS = ["id", "person_id", "dynamics_type", "dynamics_id", "target", "field", "value", "message", "code",
               "first_seen_at", "last_seen_at", "occurrences", "run_id"]
#: the most persons one retry may name (a retry run reads each of them from both services)
MAX_RETRY = 1000


@dataclass(frozen=True)
class ErrorFilters:
    """What the table is narrowed to (every filter optional).

    :param target: the side that refused the value (``dynamics`` or ``marketo``).
    :param field: the canonical field name.
    :param entity: the Dynamics record type (``lead``, ``contact``).
    :param q: a Marketo person id, a Dynamics record id, or text in the value, the message or the code.
    """

    target: str | None = None
    field: str | None = None
    entity: str | None = None
    q: str | None = None

    def query(self) -> dict:
        """The filters as query-string values."""
        return {k: v for k, v in asdict(self).items() if v}


def filters_from(target=None, field=None, entity=None, q=None) -> ErrorFilters:
    """Filters from query parameters (maybe empty, as an HTML form sends them).

    :raises HTTPException: 422 for an unknown target side.
    """
    target = blank(target)
    if target is not None and target.lower() not in TARGETS:
        raise HTTPException(422, f"target={target!r} is not a side; give dynamics or marketo")
    return ErrorFilters(target=target and target.lower(), field=blank(field), entity=blank(entity), q=blank(q))


def _conditions(f: ErrorFilters) -> list[sa.ColumnElement]:
    from mdsync.state import schema

    t = schema.sync_errors
    where = [t.c.resolved_at.is_(None)]
    if f.target:
        where.append(t.c.target == f.target)
    if f.field:
        where.append(t.c.field == f.field)
    if f.entity:
        where.append(t.c.dynamics_type == f.entity)
    if f.q:
        like = "%" + f.q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        terms = [t.c.dynamics_id == f.q, t.c.dynamics_id == f.q.lower(),
                 *[sa.func.lower(col).like(like, escape="\\") for col in (t.c.value, t.c.message, t.c.code)]]
        if f.q.isdigit():
            terms.append(t.c.person_id == int(f.q))
        where.append(sa.or_(*terms))
    return where


def select_rows(f: ErrorFilters, *, limit: int, offset: int = 0, before_id: int | None = None) -> sa.Select:
    """The matching open errors, newest first (``before_id``: only older rows, for keyset chunks)."""
    from mdsync.state import schema

    t = schema.sync_errors
    where = _conditions(f)
    if before_id is not None:
        where.append(t.c.id < before_id)
    return sa.select(t).where(*where).order_by(t.c.id.desc()).limit(limit).offset(offset)


def _iso(series: pd.Series) -> pd.Series:
    stamps = pd.to_datetime(series, utc=True)
    return stamps.map(lambda t: t.isoformat() if not pd.isna(t) else None).astype(object)


def shape(rows: list, columns: list[str]) -> pd.DataFrame:
    """``sync_errors`` rows -> the table's columns (:data:`CSV_COLUMNS`)."""
    if not rows:
        return pd.DataFrame(columns=CSV_COLUMNS)
    raw = pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in zip(columns, zip(*rows))})
    person = pd.to_numeric(raw["person_id"], errors="coerce").astype("Int64")
    out = raw.reindex(columns=CSV_COLUMNS).astype(object)
    out["id"] = raw["id"].astype("int64")
    out["person_id"] = person.astype(object).where(person.notna(), None)
    out["occurrences"] = pd.to_numeric(raw["occurrences"]).astype("int64")
    out["first_seen_at"], out["last_seen_at"] = _iso(raw["first_seen_at"]), _iso(raw["last_seen_at"])
    return out


def page(f: ErrorFilters, page_no: int = 1, page_size: int = 50) -> dict:
    """One page of matching open errors, newest first, with how many match in all.

    :returns: ``{"total", "page", "page_size", "rows"}``; each row has :data:`CSV_COLUMNS`.
    """
    from mdsync.state import schema

    count = sa.select(sa.func.count(schema.sync_errors.c.id)).where(*_conditions(f))
    with sources.store().engine.connect() as c:
        total = int(c.execute(count).scalar() or 0)
        result = c.execute(select_rows(f, limit=page_size, offset=(page_no - 1) * page_size))
        rows, columns = result.all(), list(result.keys())
    return {"total": total, "page": page_no, "page_size": page_size, "rows": records(shape(rows, columns))}


def csv_rows(f: ErrorFilters, chunk: int = CSV_CHUNK) -> Iterator[str]:
    """Every matching open error as CSV (header first), newest first, in chunks of ``chunk`` rows."""
    return csv_stream(lambda before: select_rows(f, limit=chunk, before_id=before), shape, CSV_COLUMNS, chunk)


def filter_choices() -> dict:
    """What the page's filter lists offer: the sides, and the config's entity types and fields."""
    config = sources.config()
    fields = sorted({name for entity in config.entities.values() for name in entity.field_names})
    return {"targets": list(TARGETS), "entities": sorted(config.entities), "fields": fields}


def _bad(message: str, ids: list) -> HTTPException:
    return HTTPException(422, {"message": message, "bad_ids": ids})


def retry_person_ids(payload) -> list[int]:
    """The persons of a *retry selected* request (``{"person_ids": [...]}``), checked: a non-empty list of whole
    numbers, each a person with an open error. Returns them without repeats, in the order given.

    :raises HTTPException: 422 with ``{"message", "bad_ids"}`` naming what is wrong and what to do.
    """
    ids = payload.get("person_ids") if isinstance(payload, dict) else None
    if not isinstance(ids, list) or not ids:
        raise _bad('send {"person_ids": [...]}: a non-empty list of the Marketo person ids to retry', [])
    not_ints = [v for v in ids if isinstance(v, bool) or not isinstance(v, int) or v <= 0]
    if not_ints:
        raise _bad(f"not Marketo person ids (positive whole numbers): {', '.join(map(repr, not_ints))}", not_ints)
    wanted = list(dict.fromkeys(ids))
    if len(wanted) > MAX_RETRY:
        raise _bad(f"{len(wanted)} persons selected; retry at most {MAX_RETRY} at a time", [])
    open_ids = set(sources.store().open_errors(person_ids=wanted)["person_id"].dropna().astype("int64").tolist())
    missing = [i for i in wanted if i not in open_ids]
    if missing:
        raise _bad(f"no open error for person{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}: "
                   "already resolved, or never rejected; reload the errors page and select again", missing)
    return wanted

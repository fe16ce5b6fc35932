""""Why didn't this sync?" and the live side-by-side read of one pair (the operator console, issue 11).

Three entry points, all importable without Airflow:

- :func:`side_by_side` reads one pair live (the Marketo person by id, the Dataverse lead or contact by id, with the
  same client calls the cycle makes), canonicalises both with the engine's own functions
  (:func:`mdsync.canonical.canonical_frame`) and puts the stored baseline next to them, field by field
  (:class:`PairValues`).
- :func:`why` lists every reason that applies to a person, a Dynamics record or an email (optionally one field),
  from the state store, the config, the field access of the last schema refresh and a live read
  (:class:`Explanation`). No reason means the pair is in sync ("in sync; last synced at <time> in run <id>").
- :func:`find_subject` resolves what the console's search box was given (an email, a Marketo person id, a
  Dynamics GUID) to the pairs the state store knows (:class:`Subject`).

Reason codes (stable: the console and scripts match on them; the title and detail are for people):

``record_not_found``
    The person (or the lead/contact) does not exist on its side any more, and the state store records no
    delete or merge of it (deleted outside the sync's view, or a wrong id).
``deleted``
    A delete ended the pair (table ``deletions``): the survivor is kept apart (not linked again, nothing created
    again unless ``deletes.recreate``); or the linked record was deleted and the next cycle applies the policy.
``merged``
    The person was merged away in Marketo (table ``merges``), the Dataverse record is the subordinate of a merge,
    or a ``merge`` line held it (the survivor already has another partner).
``not_marked_for_sync``
    An unlinked Marketo person without the sync marker (``marketo.sync_marker``): the sync never creates a
    Dynamics record for it on its own.
``no_email``
    An unlinked person marked for sync, or an unlinked Dynamics record, without an email: nothing can be matched
    or created.
``outside_sync_filter``
    The Dynamics record fails its entity type's sync filter (evaluated live with the engine's own
    :func:`mdsync.identity.in_filter`), the link is paused (``links.out_of_filter_since``), or a marked person's
    email belongs to a record outside the filter (so nothing is created for it).
``ambiguous_match``
    The sync found several candidates and did nothing (activity lines with action ``ambiguous``).
``field_not_mapped``
    The asked field is not mapped for the pair's entity type.
``field_dropped``
    The field is mapped but the last schema refresh dropped it on one side (the sync user cannot read or update
    it; :class:`mdsync.access.FieldAccess`).
``direction``
    The field's direction does not carry the change the way it happened (e.g. ``to_dynamics`` and the change was
    made in Dynamics).
``value_unreadable``
    The live value cannot be read as the field's type (a picklist label missing from the value map, a bad
    number or date): the sync leaves that cell alone.
``value_rejected``
    An open rejection (table ``sync_errors``): the value is not re-sent until it changes or a run asks
    ``retry_failed``. Also a refused write of the link fields, the deleted flag, a delete or a Marketo merge.
``create_refused``
    The service refused to create the record on the other side (an open ``sync_errors`` row without a field, or
    an ``error`` line of a refused Marketo create): retried every cycle.
``collision_lost``
    The field changed on both sides and the other side won (the latest ``collision`` line of the field, not
    superseded by a later run).
``consent_held``
    A re-opt-in was not propagated because the other side still says opted out (``opt_out_wins``).
``mass_change_held``
    A run that would have written it was held by the mass-change guard (rejected, or not approved in time).
    Airflow keeps that outcome (XCom ``guard`` of ``approve_mass_change``); the console passes such runs as
    ``guard_held_runs``, and a ``runs`` table in the state store, when there is one, is read too.
``not_yet_reached``
    The change is newer than what the last cycle read (the live ``updatedAt`` / ``modifiedon`` is after the
    watermark), or no cycle has committed yet; the detail says when the last cycle committed.
``skipped``
    The last cycle that read an unlinked record or person skipped it for a reason none of the codes above covers
    (e.g. a lead whose email a contact took: "the contact ... with the same email is linked instead", or a link
    field naming a record that does not exist): its ``skip`` line, quoted.
``unexplained``
    The two sides differ (or a record in scope has no partner) and nothing above explains it: a full reconcile
    (``full_resync``) or a manual run naming the person compares it again.
``several_matches``
    (:func:`why` by email only) the email names several pairs: choose one by its person id or Dynamics id.

Every state-store read is a SQLAlchemy Core select over :mod:`mdsync.state.schema` by an indexed column
(``person_id``, ``dynamics_id``, ``email``, primary keys) with a ``LIMIT``, so a million activity rows cost what a
handful do. Emails are matched case-insensitively through index range scans over the case variants of their first
characters (the ``email`` index is case-sensitive), then compared exactly in lower case.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field as dc_field
from datetime import datetime, timedelta, timezone
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from mdsync import access as access_stage
from mdsync.canonical import canonical_frame, compare_key
from mdsync.config import ENTITY_TYPES, Direction, EntityConfig, FieldMap, Side, SyncConfig
from mdsync.extract import MASTER_ID, MERGED, lifecycle_columns, marketo_fields
from mdsync.identity import in_filter
from mdsync.state import schema
from mdsync.state.database import utc

#: activity rows read per key (person, Dynamics id, email) and kind: the newest first
ACTIVITY_LIMIT = 200
#: rows read of the other bounded lookups (deletions, merges, errors, links by email)
ROW_LIMIT = 50
#: characters of an email whose case variants are scanned in the (case-sensitive) email index
EMAIL_PREFIX = 3
#: a cycle runs every 5 minutes: a last commit older than this is worth saying
STALE_AFTER = timedelta(minutes=15)
#: the activity actions that can explain something (read apart from the recent history, so none is crowded out)
NOTABLE = ("ambiguous", "collision", "merge", "delete", "flag", "unlink", "error", "skip", "consent")
#: mass-change outcomes under which nothing was written
HELD_OUTCOMES = ("rejected", "timed_out", "awaiting_approval")
_GUID = re.compile(r"^\{?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}?$")


# -- results ------------------------------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def dump(self) -> dict[str, Any]:
        """JSON-ready form (datetimes as ISO 8601 strings)."""
        return self.model_dump(mode="json")


class Subject(_Model):
    """One pair (or one side of one) the console can explain."""

    person_id: int | None = None
    dynamics_type: str | None = None
    dynamics_id: str | None = None
    email: str | None = None
    #: the state store links the two now
    linked: bool = False
    #: the state store knows it (a link, activity lines, a deletion); False: only the id was given
    known: bool = True


class LinkInfo(_Model):
    """A state-store link (``links`` row)."""

    method: str
    linked_at: datetime | None = None
    out_of_filter_since: datetime | None = None
    run_id: str | None = None


class FieldRow(_Model):
    """One mapped field of a pair: both sides' canonical values and the last synced one."""

    field: str
    marketo_name: str
    dynamics_name: str
    direction: str
    marketo: str | None = None
    dynamics: str | None = None
    baseline: str | None = None
    #: the two canonical values differ (emails compared case-insensitively, null = empty)
    differs: bool = False
    baseline_synced_at: datetime | None = None
    baseline_run_id: str | None = None
    #: a live value that cannot be read as the field's type (then shown as null): which side and why
    problem: str | None = None
    #: the last schema refresh dropped the field on a side (the sync user cannot read or update it): why
    dropped: str | None = None


class PairValues(_Model):
    """A live read of one pair, field by field (:func:`side_by_side`)."""

    person_id: int | None = None
    dynamics_type: str | None = None
    dynamics_id: str | None = None
    email: str | None = None
    link: LinkInfo | None = None
    rows: list[FieldRow] = Field(default_factory=list)
    #: a side was asked for (or linked) but the service has no such record
    marketo_missing: bool = False
    dynamics_missing: bool = False
    marketo_updated_at: datetime | None = None
    dynamics_modified_on: datetime | None = None
    #: the Dynamics record passes its entity type's sync filter (None: no record read)
    dynamics_in_filter: bool | None = None
    dynamics_statecode: int | None = None
    #: the person's sync marker (``syncToDynamics``) and ``dynamicsSyncAs``
    marked_for_sync: bool | None = None
    sync_as: str | None = None
    #: what the link fields on each record say (Marketo: ``type:id``; Dataverse: the Marketo person id)
    marketo_link_field: str | None = None
    dynamics_link_column: str | None = None
    #: the Dataverse record is the subordinate of a merge into this master
    dynamics_merged_into: str | None = None
    read_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    _marketo_raw: pd.DataFrame | None = PrivateAttr(default=None)
    _dynamics_raw: pd.DataFrame | None = PrivateAttr(default=None)

    @property
    def differing(self) -> list[FieldRow]:
        return [r for r in self.rows if r.differs]


class Reason(_Model):
    """One reason a record or field is not (yet) in sync."""

    code: str
    title: str
    detail: str
    action: str
    run_id: str | None = None
    field: str | None = None
    at: datetime | None = None


class Explanation(_Model):
    """The answer to "why didn't this sync?" (:func:`why`)."""

    subject: Subject | None = None
    #: ``in_sync``, ``not_synced``, ``unknown`` (nothing read live and nothing found), ``choose`` (several pairs)
    status: str
    summary: str
    reasons: list[Reason] = Field(default_factory=list)
    values: PairValues | None = None
    candidates: list[Subject] = Field(default_factory=list)
    last_synced_at: datetime | None = None
    last_run_id: str | None = None
    #: where field access came from: ``cache <time>`` (the last schema refresh), ``live``, or ``none``
    field_access: str = "none"
    checked_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def codes(self) -> list[str]:
        return [r.code for r in self.reasons]


@dataclass(frozen=True)
class HeldRun:
    """A run whose mass change was held (from Airflow: the ``guard`` XCom of ``approve_mass_change``).

    :param decision: the XCom value (:class:`mdsync.results.GuardDecision` as JSON), when the console has it: its
        sample names the first records the run would have written.
    """

    run_id: str
    outcome: str = "rejected"
    at: datetime | None = None
    decision: dict | None = None


# -- small helpers ----------------------------------------------------------------------------------------

def _none(value):
    """NaN/NA/NaT -> None; numpy scalars -> Python."""
    if value is None:
        return None
    if not isinstance(value, (str, bytes, dict, list)) and pd.isna(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _text(value) -> str | None:
    value = _none(value)
    return None if value is None else str(value)


def _when(value) -> datetime | None:
    value = _none(value)
    if value is None:
        return None
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, str):
        value = pd.Timestamp(value).to_pydatetime()
    return utc(value)


def _at(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "(unknown time)"


def _show(value) -> str:
    return "(empty)" if value is None else repr(str(value))


def is_guid(text: str) -> bool:
    """Whether ``text`` is a Dataverse row id (a GUID, braces allowed)."""
    return bool(_GUID.match(text.strip()))


def _guid(text: str) -> str:
    return str(uuid.UUID(text.strip().strip("{}")))


def _id_variants(dynamics_id: str) -> list[str]:
    """The spellings a GUID may be stored under (as given, lower and upper case)."""
    return list(dict.fromkeys([dynamics_id, dynamics_id.lower(), dynamics_id.upper()]))


def _frame(conn, query: sa.Select) -> pd.DataFrame:
    columns = [c.name for c in query.selected_columns]
    rows = conn.execute(query).all()
    return pd.DataFrame([tuple(r) for r in rows], columns=columns, dtype=object) if rows else \
        pd.DataFrame(columns=columns, dtype=object)


def _empty(table: sa.Table) -> pd.DataFrame:
    return pd.DataFrame(columns=[c.name for c in table.columns], dtype=object)


def _email_ranges(email: str, width: int = EMAIL_PREFIX) -> list[tuple[str, str]]:
    """Index ranges ``[low, high)`` covering every spelling of ``email`` that differs only in letter case: one
    range per case variant of its first ``width`` characters (at most ``2 ** width``)."""
    key = email.strip().lower()
    head = key[:width]
    options = [sorted({c.lower(), c.upper()}) for c in head]
    ranges = []
    for combo in product(*options):
        low = "".join(combo)
        ranges.append((low, low[:-1] + chr(ord(low[-1]) + 1)) if low else ("", "\U0010ffff"))
    return ranges


def _email_clause(column: sa.Column, email: str, low: str, high: str):
    return sa.and_(column >= low, column < high, sa.func.lower(column) == email.strip().lower())


def _entity_of(config: SyncConfig, name: str | None) -> EntityConfig | None:
    return config.entities.get(name) if name else None


def _field_of(entity: EntityConfig, name: str) -> FieldMap | None:
    """A mapped field by its canonical, Marketo or Dataverse name (case-insensitive for the API names)."""
    low = name.lower()
    for f in entity.fields:
        if f.name == name or f.marketo.lower() == low or f.dynamics.lower() == low:
            return f
    return None


# -- state-store reads (bounded, by indexed columns) ---------------------------------------------------------

def _link_rows(conn, config: SyncConfig, *, person_id: int | None = None, dynamics_id: str | None = None,
               dynamics_type: str | None = None) -> pd.DataFrame:
    t = schema.links
    query = sa.select(t)
    if person_id is not None:
        query = query.where(t.c.person_id == int(person_id))
    else:
        # the unique key is (dynamics_type, dynamics_id): name the types so the index serves the lookup
        types = [dynamics_type] if dynamics_type else list(config.entities)
        query = query.where(t.c.dynamics_type.in_(types), t.c.dynamics_id.in_(_id_variants(dynamics_id)))
    return _frame(conn, query.limit(ROW_LIMIT))


def _link_info(row: dict | None) -> LinkInfo | None:
    if row is None:
        return None
    return LinkInfo(method=str(row["method"]), linked_at=_when(row.get("linked_at")),
                    out_of_filter_since=_when(row.get("out_of_filter_since")), run_id=_text(row.get("run_id")))


def _activity(conn, *, person_id: int | None = None, dynamics_id: str | None = None, email: str | None = None,
              actions: Sequence[str] | None = None, field: str | None = None, after_id: int | None = None,
              limit: int = ACTIVITY_LIMIT) -> pd.DataFrame:
    """Activity rows of one key, newest first (an email: case-insensitive, through index ranges)."""
    t = schema.activity
    # The key's index must serve the query: ``action || ''`` and ``id + 0`` keep the planner off the action index
    # and the primary key (on a million rows, all collisions, or every row after an old one, are far more).
    conditions = []
    if actions:
        conditions.append(t.c.action.concat("").in_(list(actions)))
    if field is not None:
        conditions.append(t.c.field.concat("") == field)
    if after_id is not None:
        conditions.append((t.c.id + 0) > int(after_id))
    if person_id is not None:
        keys = [t.c.person_id == int(person_id)]
    elif dynamics_id is not None:
        keys = [t.c.dynamics_id.in_(_id_variants(dynamics_id))]
    elif email:
        keys = [_email_clause(t.c.email, email, low, high) for low, high in _email_ranges(email)]
    else:
        return _empty(t)
    parts = [_frame(conn, sa.select(t).where(key, *conditions).order_by(t.c.id.desc()).limit(limit)) for key in keys]
    parts = [p for p in parts if not p.empty]
    if not parts:
        return _empty(t)
    out = pd.concat(parts, ignore_index=True).drop_duplicates("id")
    return out.sort_values("id", ascending=False).head(limit).reset_index(drop=True)


def _history(conn, subject: Subject, emails: Iterable[str]) -> pd.DataFrame:
    """The activity that can explain something about ``subject``: its notable lines and its latest lines, by person,
    Dynamics id and email."""
    keys = []
    if subject.person_id is not None:
        keys.append({"person_id": subject.person_id})
    if subject.dynamics_id:
        keys.append({"dynamics_id": subject.dynamics_id})
    keys += [{"email": e} for e in dict.fromkeys(e.strip().lower() for e in emails if e)]
    parts = []
    for key in keys:
        parts.append(_activity(conn, **key, actions=NOTABLE))
        parts.append(_activity(conn, **key, limit=ROW_LIMIT))
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=[c.name for c in schema.activity.columns])
    out = pd.concat(parts, ignore_index=True).drop_duplicates("id").sort_values("id", ascending=False)
    out["at"] = out["at"].map(_when)
    return out.reset_index(drop=True)


def _open_errors(conn, person_id: int | None, dynamics_id: str | None) -> pd.DataFrame:
    t = schema.sync_errors
    query = sa.select(t).where(t.c.resolved_at.is_(None))
    if person_id is not None:
        query = query.where(t.c.person_id == int(person_id))
    elif dynamics_id:  # a refused create of a Dynamics-only record: no person yet (few open rows have none)
        query = query.where(t.c.person_id.is_(None), t.c.dynamics_id.in_(_id_variants(dynamics_id)))
    else:
        return _empty(t)
    return _frame(conn, query.order_by(t.c.id.desc()).limit(ROW_LIMIT))


def _deletions(conn, person_id: int | None, dynamics_id: str | None) -> pd.DataFrame:
    t = schema.deletions
    parts = []
    if person_id is not None:
        parts.append(_frame(conn, sa.select(t).where(t.c.person_id == int(person_id)).order_by(t.c.id.desc())
                            .limit(ROW_LIMIT)))
    if dynamics_id:
        parts.append(_frame(conn, sa.select(t).where(t.c.dynamics_id.in_(_id_variants(dynamics_id)))
                            .order_by(t.c.id.desc()).limit(ROW_LIMIT)))
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=[c.name for c in t.columns])
    return pd.concat(parts, ignore_index=True).drop_duplicates("id").reset_index(drop=True)


def _merged_away(conn, person_id: int | None) -> dict | None:
    """The ``merges`` row of a person merged away (by its primary key), or None."""
    if person_id is None:
        return None
    t = schema.merges
    row = conn.execute(sa.select(t).where(t.c.loser_id == int(person_id))).mappings().first()
    return dict(row) if row else None


def _baselines(conn, person_id: int | None) -> pd.DataFrame:
    t = schema.baselines
    if person_id is None:
        return pd.DataFrame(columns=["field", "value", "synced_at", "run_id"])
    # by the primary key's first column; a person has one row per mapped field
    return _frame(conn, sa.select(t.c.field, t.c.value, t.c.synced_at, t.c.run_id)
                  .where(t.c.person_id == int(person_id)).limit(500))


def _watermarks(conn) -> dict[tuple[str, str], dict]:
    t = schema.watermarks  # a few rows: one per source and entity type
    return {(r["source"], r["entity_type"]): dict(r) for r in conn.execute(sa.select(t).limit(100)).mappings()}


def _held_runs_in_store(conn, since: datetime | None) -> list[HeldRun]:
    """Runs the state store's ``runs`` table (when this store has one) records as held by the mass-change guard
    since ``since`` (the last commit)."""
    runs = getattr(schema, "runs", None)
    if runs is None or "mass_change" not in runs.c or not sa.inspect(conn).has_table(runs.name):
        return []
    query = sa.select(runs.c.run_id, runs.c.mass_change, runs.c.finished_at).where(
        runs.c.mass_change.in_(HELD_OUTCOMES))
    if since is not None:
        query = query.where(runs.c.finished_at > since)
    rows = conn.execute(query.order_by(runs.c.finished_at.desc()).limit(10)).all()
    return [HeldRun(run_id=r[0], outcome=r[1], at=utc(r[2])) for r in rows]


# -- find_subject ---------------------------------------------------------------------------------------------

def find_subject(store, query: str) -> list[Subject]:
    """The pairs a search-box query names: an email (case-insensitive), a Marketo person id (digits) or a Dynamics
    id (a GUID), from the state store's links, activity and deletions.

    An id the store knows nothing about still comes back (``known=False``), so the console can read it live with
    :func:`why` or :func:`side_by_side`.

    :raises ValueError: the query is none of the three, naming what was given.
    """
    text = (query or "").strip()
    if not text:
        raise ValueError("empty search: give an email, a Marketo person id (digits) or a Dynamics id (GUID)")
    with store.engine.connect() as conn:
        if text.isdigit():
            return _subjects_of_person(conn, int(text))
        if is_guid(text):
            return _subjects_of_record(conn, _guid(text))
        if "@" in text:
            return _subjects_of_email(conn, text)
    raise ValueError(f"{text!r} is not an email, a Marketo person id (digits) or a Dynamics id (GUID)")


def _link_of(conn, person_id: int) -> dict | None:
    t = schema.links
    row = conn.execute(sa.select(t).where(t.c.person_id == int(person_id))).mappings().first()
    return dict(row) if row else None


def _latest_email(rows: pd.DataFrame) -> str | None:
    emails = rows["email"].dropna() if "email" in rows else pd.Series([], dtype=object)
    return str(emails.iloc[0]) if len(emails) else None  # rows are newest first


def _subjects_of_person(conn, person_id: int) -> list[Subject]:
    link = _link_of(conn, person_id)
    rows = _activity(conn, person_id=person_id, limit=ROW_LIMIT)
    email = _latest_email(rows)
    if link:
        return [Subject(person_id=person_id, dynamics_type=link["dynamics_type"], dynamics_id=link["dynamics_id"],
                        email=email, linked=True)]
    known = not rows.empty or not _deletions(conn, person_id, None).empty or _merged_away(conn, person_id) is not None
    return [Subject(person_id=person_id, email=email, linked=False, known=known)]


def _subjects_of_record(conn, dynamics_id: str) -> list[Subject]:
    t = schema.links
    # any entity type: the caller gave a bare GUID (the unique key's first column is the type, so list them all)
    found = _frame(conn, sa.select(t).where(t.c.dynamics_type.in_(list(ENTITY_TYPES)),
                                            t.c.dynamics_id.in_(_id_variants(dynamics_id))).limit(ROW_LIMIT))
    rows = _activity(conn, dynamics_id=dynamics_id, limit=ROW_LIMIT)
    if not found.empty:
        link = found.iloc[0]
        email = _latest_email(_activity(conn, person_id=int(link["person_id"]), limit=ROW_LIMIT)) or _latest_email(rows)
        return [Subject(person_id=int(link["person_id"]), dynamics_type=str(link["dynamics_type"]),
                        dynamics_id=str(link["dynamics_id"]), email=email, linked=True)]
    kinds = rows["dynamics_type"].dropna() if not rows.empty else pd.Series([], dtype=object)
    gone = _deletions(conn, None, dynamics_id)
    if kinds.empty and not gone.empty:
        kinds = gone["dynamics_type"]
    return [Subject(dynamics_type=str(kinds.iloc[0]) if len(kinds) else None, dynamics_id=dynamics_id,
                    email=_latest_email(rows), linked=False, known=not rows.empty or not gone.empty)]


def _subjects_of_email(conn, email: str) -> list[Subject]:
    rows = _activity(conn, email=email)
    if rows.empty:
        return []
    out: list[Subject] = []
    persons = pd.unique(rows["person_id"].dropna().astype("int64"))
    covered: set[str] = set()
    for pid in persons[:ROW_LIMIT]:
        link = _link_of(conn, int(pid))
        mine = rows[rows["person_id"].eq(pid).to_numpy()]
        if link:
            covered.add(str(link["dynamics_id"]).lower())
            out.append(Subject(person_id=int(pid), dynamics_type=link["dynamics_type"], dynamics_id=link["dynamics_id"],
                               email=_latest_email(mine), linked=True))
        else:
            out.append(Subject(person_id=int(pid), email=_latest_email(mine), linked=False))
    alone = rows[rows["person_id"].isna().to_numpy() & rows["dynamics_id"].notna().to_numpy()]
    for did, part in alone.groupby(alone["dynamics_id"].astype(str).str.lower(), sort=False):
        if did in covered:
            continue
        links = _subjects_of_record(conn, did)
        if links and links[0].linked:
            if links[0].person_id not in {s.person_id for s in out}:
                out.append(links[0])
            continue
        out.append(Subject(dynamics_type=_text(part["dynamics_type"].dropna().iloc[0]) if part["dynamics_type"].notna().any()
                           else None, dynamics_id=str(part["dynamics_id"].iloc[0]), email=_latest_email(part),
                           linked=False))
    return out


# -- live reads ---------------------------------------------------------------------------------------------------

def _person_fields(config: SyncConfig) -> list[str]:
    extra = [config.marketo.deleted_flag_field] if config.marketo.deleted_flag_field else []
    return list(dict.fromkeys(["id", *marketo_fields(config), *extra]))


def _record_columns(config: SyncConfig, entity: EntityConfig) -> list[str]:
    """The columns the cycle reads of a record (every mapped column: an unreadable one comes back empty)."""
    flag = [config.dynamics.deleted_flag_column] if config.dynamics.deleted_flag_column else []
    return list(dict.fromkeys([entity.id_column, *(f.dynamics for f in entity.fields), config.dynamics.marketo_id_column,
                               "statecode", "modifiedon", *entity.filter.columns, *lifecycle_columns(entity), *flag]))


def read_person(config: SyncConfig, marketo_client, person_id: int) -> pd.DataFrame:
    """The Marketo person by id (the fields a cycle reads), as one row or none."""
    return marketo_client.get_leads("id", [int(person_id)], _person_fields(config))


def read_record(config: SyncConfig, dynamics_client, entity: EntityConfig, dynamics_id: str) -> pd.DataFrame:
    """The Dataverse lead or contact by id (the columns a cycle reads), as one row or none."""
    from mdsync.dynamics import eq

    return dynamics_client.query(entity.entity_set, _record_columns(config, entity),
                                 filter=eq(entity.id_column, uuid.UUID(_guid(dynamics_id))))


def _records_by_email(config: SyncConfig, dynamics_client, email: str) -> dict[str, pd.DataFrame]:
    from mdsync.dynamics import eq

    return {name: dynamics_client.query(e.entity_set, _record_columns(config, e), filter=eq(e.email_field.dynamics, email))
            for name, e in config.entities.items()}


def _sync_as(config: SyncConfig, person: pd.DataFrame) -> str | None:
    marker = config.marketo.sync_marker
    if person.empty or not marker.as_field or marker.as_field not in person:
        return None
    value = _text(person[marker.as_field].iloc[0])
    return value.strip().lower() if value else None


def _marked(config: SyncConfig, person: pd.DataFrame) -> bool | None:
    column = config.marketo.sync_marker.field
    if person.empty or column not in person:
        return None
    value = _none(person[column].iloc[0])
    return str(value).strip().lower() in ("true", "1", "yes") if value is not None else False


def _canonical_one(raw: pd.DataFrame, entity: EntityConfig, side: Side) -> tuple[dict, dict]:
    """One record's canonical values per field, and the problems (field -> why) of values that cannot be read."""
    if raw.empty:
        return {}, {}
    frame, problems = canonical_frame(raw.head(1).reset_index(drop=True), entity.fields, side)
    values = {name: _text(frame[name].iloc[0]) for name in frame.columns}
    where = "Marketo" if side is Side.MARKETO else "Dynamics"
    notes = {p.field: f"{where} value {_show(_none(p.values.iloc[0]))} cannot be read: {p.reason}" for p in problems}
    return values, notes


def _same(a: str | None, b: str | None, f: FieldMap) -> bool:
    """Whether two canonical values are the same to the diff (null = null; emails case-insensitively)."""
    x, y = compare_key(pd.Series([a, b], dtype="string"), f)
    return (pd.isna(x) and pd.isna(y)) or (not pd.isna(x) and not pd.isna(y) and x == y)


def _pair_rows(entity: EntityConfig, marketo: dict, dynamics: dict, problems: dict, baselines: pd.DataFrame,
               have_marketo: bool, have_dynamics: bool) -> list[FieldRow]:
    """Field rows for one pair (vectorised over the entity type's fields)."""
    names = entity.field_names
    base = baselines.drop_duplicates("field").set_index("field") if not baselines.empty else \
        pd.DataFrame(columns=["value", "synced_at", "run_id"])
    m = pd.Series([marketo.get(n) for n in names], index=names, dtype=object)
    d = pd.Series([dynamics.get(n) for n in names], index=names, dtype=object)
    differs = np.zeros(len(names), dtype=bool)
    if have_marketo and have_dynamics:  # one pair: a dozen fields, each compared as the diff compares it
        differs = np.array([not _same(m[f.name], d[f.name], f) for f in entity.fields], dtype=bool)
    rows = []
    for i, f in enumerate(entity.fields):
        b = base.loc[f.name] if f.name in base.index else None
        rows.append(FieldRow(
            field=f.name, marketo_name=f.marketo, dynamics_name=f.dynamics, direction=f.direction.value,
            marketo=m[f.name], dynamics=d[f.name], baseline=_text(b["value"]) if b is not None else None,
            differs=bool(differs[i]), baseline_synced_at=_when(b["synced_at"]) if b is not None else None,
            baseline_run_id=_text(b["run_id"]) if b is not None else None, problem=problems.get(f.name)))
    return rows


def side_by_side(config: SyncConfig, marketo_client, dynamics_client, store, *, person_id: int | None = None,
                 dynamics_type: str | None = None, dynamics_id: str | None = None,
                 access: access_stage.FieldAccess | None = None) -> PairValues:
    """A live read of one pair: the Marketo person and the Dataverse lead or contact, canonicalised with the
    engine's functions, and the stored baseline per mapped field.

    Give the person, the Dynamics record, or both; the other side comes from the state store's link. A person
    without a link shows an empty Dynamics side (the fields of the entity type its ``dynamicsSyncAs`` or the
    marker's default names); a record without a person an empty Marketo side. A record the service does not have
    is marked missing (``marketo_missing`` / ``dynamics_missing``), never raised.

    :param dynamics_type: ``lead`` or ``contact``; without it a bare Dynamics id is looked up in both tables.
    :param access: the field access of the last schema refresh (:func:`field_access`): its metadata spares the
        clients their describe and metadata calls, and the rows say which fields it dropped.
    :raises ValueError: nothing to read, an unconfigured entity type, or a Dynamics id that is not a GUID.
    """
    if person_id is None and not dynamics_id:
        raise ValueError("side_by_side needs a Marketo person id, a Dynamics id, or both")
    if dynamics_type is not None and dynamics_type not in config.entities:
        raise ValueError(f"dynamics_type {dynamics_type!r} is not configured (configured: {', '.join(config.entities)})")
    if dynamics_id and not is_guid(dynamics_id):
        raise ValueError(f"Dynamics id {dynamics_id!r} is not a GUID (e.g. 3f2504e0-4f89-11d3-9a0c-0305e82c3301)")
    dynamics_id = _guid(dynamics_id) if dynamics_id else None
    with store.engine.connect() as conn:
        found = _link_rows(conn, config, person_id=person_id) if person_id is not None else \
            _link_rows(conn, config, dynamics_id=dynamics_id, dynamics_type=dynamics_type)
        link = found.iloc[0].to_dict() if not found.empty else None
        if link is not None and person_id is not None and dynamics_id and str(link["dynamics_id"]).lower() != dynamics_id:
            link = None  # the person is linked elsewhere: the two given records are not a pair
        if person_id is None and link is not None:
            person_id = int(link["person_id"])
        if not dynamics_id and link is not None:
            dynamics_type, dynamics_id = str(link["dynamics_type"]), str(link["dynamics_id"])
        baselines = _baselines(conn, person_id) if link is not None else _baselines(conn, None)
    if access is not None:  # as the cycle's tasks do: no describe or metadata call for what the refresh read
        for entity_set, meta in access.dynamics_metadata.items():
            dynamics_client.preload_metadata(entity_set, meta["logical_name"], pd.DataFrame(meta["attributes"]))
        if access.marketo_describe:
            marketo_client.use_describe(pd.DataFrame(access.marketo_describe))
    person = read_person(config, marketo_client, person_id) if person_id is not None else pd.DataFrame()
    record, entity = pd.DataFrame(), _entity_of(config, dynamics_type)
    if dynamics_id:
        for name in ([dynamics_type] if dynamics_type else list(config.entities)):
            entity = config.entity(name)
            record = read_record(config, dynamics_client, entity, dynamics_id)
            if not record.empty:
                dynamics_type = name
                break
        if record.empty and dynamics_type is None:
            entity = None
    if entity is None:  # an unlinked person: the entity type it would be created as
        entity = config.entity(_sync_as(config, person) if _sync_as(config, person) in config.entities
                               else config.marketo.sync_marker.default_type)
        if dynamics_id is None:
            dynamics_type = None
    m_values, m_problems = _canonical_one(person, entity, Side.MARKETO)
    d_values, d_problems = _canonical_one(record, entity, Side.DYNAMICS)
    problems = {**d_problems, **m_problems}
    for name in set(m_problems) & set(d_problems):
        problems[name] = f"{m_problems[name]}; {d_problems[name]}"
    rows = _pair_rows(entity, m_values, d_values, problems, baselines, not person.empty, not record.empty)
    dropped = access.entities.get(entity.name) if access is not None else None
    for r in rows:
        why_dropped = [d["reason"] for d in (dropped.dropped if dropped else []) if d["field"] == r.field]
        r.dropped = "; ".join(why_dropped) or None
    link_fields = config.marketo.link_fields
    out = PairValues(
        person_id=person_id, dynamics_type=dynamics_type, dynamics_id=dynamics_id,
        email=_text(person["email"].iloc[0]) if not person.empty and "email" in person else
        (_text(record[entity.email_field.dynamics].iloc[0]) if not record.empty else None),
        link=_link_info(link), rows=rows,
        marketo_missing=person_id is not None and person.empty, dynamics_missing=bool(dynamics_id) and record.empty,
        marketo_updated_at=_when(person["updatedAt"].iloc[0]) if not person.empty and "updatedAt" in person else None,
        dynamics_modified_on=_when(record["modifiedon"].iloc[0]) if not record.empty and "modifiedon" in record else None,
        dynamics_in_filter=bool(in_filter(entity, record)[0]) if not record.empty else None,
        dynamics_statecode=int(record["statecode"].iloc[0]) if not record.empty and _none(record["statecode"].iloc[0])
        is not None else None,
        marked_for_sync=_marked(config, person), sync_as=_sync_as(config, person),
        marketo_link_field=(f"{_text(person[link_fields.dynamics_type].iloc[0]) or '?'}:"
                            f"{_text(person[link_fields.dynamics_id].iloc[0])}")
        if not person.empty and _text(person.get(link_fields.dynamics_id, pd.Series([None])).iloc[0]) else None,
        dynamics_link_column=_text(record[config.dynamics.marketo_id_column].iloc[0])
        if not record.empty and config.dynamics.marketo_id_column in record else None,
        dynamics_merged_into=_text(record[MASTER_ID].iloc[0]) if not record.empty and MASTER_ID in record
        and str(_none(record[MERGED].iloc[0]) if MERGED in record else "").lower() in ("true", "1") else None,
    )
    out._marketo_raw, out._dynamics_raw = person, record
    return out


# -- field access (the last schema refresh) ------------------------------------------------------------------------

def schema_cache_name(config: SyncConfig, marketo_client, dynamics_client) -> str:
    """The shared staging file the cycle's ``refresh_schema`` keeps its field access in (the same key as
    :meth:`mdsync.cycle.Cycle._refresh_schema`: both instances and the config)."""
    key = hashlib.sha1(repr((getattr(marketo_client, "base_url", ""), getattr(dynamics_client, "org_url", ""),
                             config.model_dump_json())).encode()).hexdigest()[:12]
    return f"field-access-{key}"


def field_access(config: SyncConfig, settings, marketo_client=None, dynamics_client=None, *, staging_root=None,
                 refresh: bool = False) -> tuple[access_stage.FieldAccess | None, str]:
    """The field access the sync uses now: the last schema refresh's (kept in the staging area for
    ``MDSYNC_SCHEMA_CACHE_MINUTES``), else a live refresh with the same describe and metadata calls.

    :param staging_root: the staging root path object (``ObjectStoragePath`` for a non-local staging URL); default
        the local folder of ``settings.staging_url``.
    :returns: ``(access, source)``: source ``cache <refreshed_at>``, ``live``, ``stale cache <refreshed_at>`` (no
        clients to refresh with), or ``none`` (access unknown).
    """
    import json

    root = staging_root
    if root is None and str(settings.staging_url).startswith("file://"):
        root = Path(str(settings.staging_url).removeprefix("file://"))
    cached = None
    if root is not None and not refresh:
        if marketo_client is not None and dynamics_client is not None:
            candidates = [root / f"{schema_cache_name(config, marketo_client, dynamics_client)}.json"]
        else:  # without the clients the key is unknown: one cache alone is this deployment's
            found = list(root.glob("field-access-*.json")) if hasattr(root, "glob") else []
            candidates = found if len(found) == 1 else []
        for path in candidates:
            try:
                with path.open("r") as fh:
                    data = json.load(fh)
                cached = (access_stage.FieldAccess.from_json(data), datetime.fromisoformat(data["refreshed_at"]))
            except (OSError, KeyError, ValueError):  # missing, or object storage that cannot be read now: refresh
                continue
    if cached is not None:
        acc, refreshed = cached
        fresh = datetime.now(timezone.utc) - refreshed < timedelta(minutes=settings.schema_cache_minutes)
        if fresh or marketo_client is None or dynamics_client is None:
            return acc, f"{'cache' if fresh else 'stale cache'} {refreshed.isoformat()}"
    if marketo_client is None or dynamics_client is None:
        return None, "none"
    describe = marketo_client.describe_leads()
    dyn = {}
    for name, entity in config.entities.items():
        logical = dynamics_client.logical_name(entity.entity_set)
        dyn[name] = {"entity_set": entity.entity_set, "logical_name": logical,
                     "attributes": dynamics_client.attributes(logical),
                     "permissions": dynamics_client.field_permissions(logical),
                     "keys": dynamics_client.alternate_keys(logical)}
    acc = access_stage.refresh_access(config, describe, dyn)
    acc.refreshed_at = datetime.now(timezone.utc).isoformat()
    return acc, "live"


# -- the facts one explanation is computed from (pure from here on) ------------------------------------------------

@dataclass
class Facts:
    """Everything :func:`explain` needs about one subject: state-store rows, the live read, field access."""

    subject: Subject
    entity: EntityConfig | None
    link: dict | None = None
    values: PairValues | None = None
    history: pd.DataFrame = dc_field(default_factory=lambda: _empty(schema.activity))
    errors: pd.DataFrame = dc_field(default_factory=lambda: _empty(schema.sync_errors))
    deletions: pd.DataFrame = dc_field(default_factory=lambda: _empty(schema.deletions))
    merged_away: dict | None = None
    watermarks: dict = dc_field(default_factory=dict)
    access: access_stage.FieldAccess | None = None
    held_runs: list[HeldRun] = dc_field(default_factory=list)
    #: newer activity per (field, collision id) -> whether a later run touched the field after the collision
    superseded: dict = dc_field(default_factory=dict)
    #: per one-way field (``to_dynamics`` / ``to_marketo``) of the pair: its newest write line when that write
    #: went to the field's target side (the activity row, or absent)
    one_way_writes: dict = dc_field(default_factory=dict)
    #: live records sharing the person's email (an unlinked person marked for sync): entity -> rows
    email_records: dict[str, pd.DataFrame] = dc_field(default_factory=dict)
    #: live Marketo persons sharing an unlinked record's email
    email_persons: pd.DataFrame | None = None
    now: datetime = dc_field(default_factory=lambda: datetime.now(timezone.utc))
    #: how far before its watermark each cycle reads again (``MDSYNC_OVERLAP_SECONDS``): a change stamped within it
    #: of the last read is still read by the next cycle (services stamp changes to the second)
    overlap: timedelta = timedelta(0)


def _reason(code: str, title: str, detail: str, action: str, **kw) -> Reason:
    return Reason(code=code, title=title, detail=detail, action=action, **kw)


def _who(s: Subject) -> str:
    parts = []
    if s.person_id is not None:
        parts.append(f"person {s.person_id}")
    if s.dynamics_id:
        parts.append(f"{s.dynamics_type or 'Dynamics record'} {s.dynamics_id}")
    text = " / ".join(parts) or "this record"
    return f"{text} <{s.email}>" if s.email else text


def _row_who(row: dict) -> str:
    """Who an activity line is about."""
    return _who(Subject(person_id=_none(row["person_id"]), dynamics_type=_text(row["dynamics_type"]),
                        dynamics_id=_text(row["dynamics_id"]), email=_text(row["email"])))


def _fields_in_question(facts: Facts, field: str | None) -> list[FieldMap]:
    """The fields to explain: the asked one, else those whose two sides differ now (or have an open error)."""
    entity = facts.entity
    if entity is None:
        return []
    if field is not None:
        f = _field_of(entity, field)
        return [f] if f is not None else []
    names = {r.field for r in facts.values.differing} if facts.values is not None else set()
    if not facts.errors.empty:
        names |= set(facts.errors["field"].dropna().astype(str))
    return [f for f in entity.fields if f.name in names]


def _row(facts: Facts, name: str) -> FieldRow | None:
    if facts.values is None:
        return None
    return next((r for r in facts.values.rows if r.field == name), None)


def _changed_sides(row: FieldRow | None, f: FieldMap) -> list[Side]:
    """Which sides hold a value other than the last synced one (no baseline: both sides that have a value)."""
    if row is None or not row.differs:
        return []
    sides = []
    for side, value in ((Side.MARKETO, row.marketo), (Side.DYNAMICS, row.dynamics)):
        if not _same(value, row.baseline, f):
            sides.append(side)
    return sides


def explain(config: SyncConfig, facts: Facts, field: str | None = None) -> list[Reason]:
    """Every reason that applies, from the gathered facts alone (pure: no service or database calls)."""
    reasons: list[Reason] = []
    for rule in (_missing, _merged, _deleted, _unlinked_person, _unlinked_record, _filter, _ambiguous, _refused,
                 _fields, _mass_change, _not_yet_reached):
        reasons += rule(config, facts, field)
    if not reasons and facts.values is not None and facts.link is None:
        reasons += _unexplained_unlinked(config, facts)
    if not reasons and facts.values is not None and facts.link is not None:
        asked = _field_of(facts.entity, field) if field is not None else None
        for r in (r for r in facts.values.differing if asked is None or r.field == asked.name):
            reasons.append(_reason(
                "unexplained", f"{r.field} differs and no reason was found",
                f"{r.field}: Marketo {_show(r.marketo)} vs Dynamics {_show(r.dynamics)} (last synced {_show(r.baseline)}"
                f"{' at ' + _at(r.baseline_synced_at) if r.baseline_synced_at else ''}); both changes are older than "
                "what the last cycle read, and no rejection, collision or filter applies",
                f"run the DAG with person_ids=[{facts.subject.person_id}] (or full_resync) to compare this pair again; "
                "if it still differs, look at the person's activity for the last run", field=r.field))
    return reasons


def _missing(config, facts: Facts, field) -> list[Reason]:
    v, s = facts.values, facts.subject
    out = []
    if v is None:
        return out
    gone_m = v.marketo_missing and facts.merged_away is None and not _deleted_in(facts, "marketo")
    gone_d = v.dynamics_missing and not _deleted_in(facts, "dynamics")
    if gone_m:
        out.append(_reason("record_not_found", f"Marketo person {s.person_id} does not exist",
                           f"Marketo has no person {s.person_id}"
                           + (f" (the state store links it to {facts.link['dynamics_type']} {facts.link['dynamics_id']})"
                              if facts.link else "") + "; no delete or merge of it is recorded",
                           "check the id; if it was deleted in Marketo, the next cycle reads the Delete Lead activity "
                           "and applies the delete policy (a delete older than Marketo keeps activities for is not seen: "
                           "run full_resync)"))
    if gone_d:
        out.append(_reason("record_not_found", f"Dynamics {s.dynamics_type or 'record'} {s.dynamics_id} does not exist",
                           f"Dataverse has no {s.dynamics_type or 'lead or contact'} {s.dynamics_id}"
                           + (f" (linked to person {s.person_id})" if facts.link else "")
                           + "; no delete of it is recorded",
                           "check the id; if it was deleted in Dynamics, the next cycle's change tracking reports it and "
                           "the delete policy is applied"))
    return out


def _deleted_in(facts: Facts, side: str) -> bool:
    d = facts.deletions
    return not d.empty and d["deleted_in"].eq(side).any()


def _merged(config, facts: Facts, field) -> list[Reason]:
    s, out = facts.subject, []
    m = facts.merged_away
    if m is not None:
        out.append(_reason("merged", f"person {m['loser_id']} was merged into person {m['winner_id']}",
                           f"Marketo person {m['loser_id']} was merged away into person {m['winner_id']} at "
                           f"{_at(_when(m.get('at')))}" + (f" (run {m['run_id']})" if m.get("run_id") else "")
                           + "; the survivor carries the pair from then on",
                           f"look at person {m['winner_id']} instead", run_id=_text(m.get("run_id")), at=_when(m.get("at"))))
    v = facts.values
    if v is not None and v.dynamics_merged_into:
        out.append(_reason("merged", f"the {s.dynamics_type} was merged into {v.dynamics_merged_into}",
                           f"Dynamics {s.dynamics_type} {s.dynamics_id} is the subordinate of a merge into "
                           f"{v.dynamics_merged_into}: its person follows the master (or is merged into the master's "
                           "person in Marketo)", f"look at Dynamics {s.dynamics_type} {v.dynamics_merged_into} instead"))
    h = facts.history
    if not h.empty:
        merges = h[h["action"].eq("merge").to_numpy()]
        held = merges[merges["detail"].fillna("").str.contains("held|dropped|may be wanted", regex=True).to_numpy()]
        if not held.empty and (facts.link is None or _after_link(held.iloc[0], facts)):
            row = held.iloc[0]
            out.append(_reason("merged", "a merge left this record without a partner",
                               f"{row['detail']} ({_at(row['at'])}, run {row['run_id']})",
                               "merge the two Dynamics records (or the two persons) so one pair remains, or clear the "
                               "link field on the one that should stay apart", run_id=_text(row["run_id"]), at=row["at"]))
    return out


def _after_link(row, facts: Facts) -> bool:
    linked_at = _when(facts.link.get("linked_at")) if facts.link else None
    return linked_at is None or (row["at"] is not None and row["at"] >= linked_at)


def _deleted(config, facts: Facts, field) -> list[Reason]:
    out = []
    d = facts.deletions
    if d.empty or facts.link is not None:
        return out  # a pair linked again is no longer held by an old deletion
    for row in d.sort_values("id", ascending=False).head(3).to_dict("records"):
        entity = config.entities.get(row["dynamics_type"])
        recreate = bool(entity and entity.deletes.recreate)
        if row["deleted_in"] == "marketo":
            what = (f"Marketo person {row['person_id']} was deleted; its {row['dynamics_type']} {row['dynamics_id']} "
                    f"was kept ({row['action']}, delete policy {row['policy']})")
            todo = ("the record is not linked again nor used to create a person again (deletes.recreate is false); "
                    "set deletes.recreate: true for this entity type to let it create a new person"
                    if not recreate else "deletes.recreate is true: its next change creates a new person")
        else:
            what = (f"Dynamics {row['dynamics_type']} {row['dynamics_id']} was deleted; Marketo person "
                    f"{row['person_id']} was kept ({row['action']}, delete policy {row['policy']})")
            todo = (f"the person is not linked again nor created in Dynamics again; trigger a manual run with "
                    f"person_ids=[{row['person_id']}] to push it anyway, or set deletes.recreate: true"
                    if not recreate else "deletes.recreate is true: its next change creates a new record")
        out.append(_reason("deleted", f"the pair was ended by a delete in {row['deleted_in'].capitalize()}",
                           f"{what} at {_at(_when(row['at']))} in run {row['run_id']}", todo,
                           run_id=_text(row["run_id"]), at=_when(row["at"])))
    return out


def _unlinked_person(config, facts: Facts, field) -> list[Reason]:
    s, v = facts.subject, facts.values
    if facts.link is not None or s.person_id is None or v is None or v.marketo_missing or not facts.deletions.empty \
            or facts.merged_away is not None:
        return []
    marker = config.marketo.sync_marker
    out = []
    if not v.marked_for_sync and not v.marketo_link_field:
        out.append(_reason("not_marked_for_sync", f"person {s.person_id} is not marked for sync",
                           f"person {s.person_id} <{v.email or 'no email'}> has no link and {marker.field} is not true, "
                           "so the sync does not create a Dynamics record for it (a Dynamics lead or contact with its "
                           "email would link it, but none in the sync filter has it)",
                           f"set {marker.field} = true in Marketo (and {marker.as_field or 'the type'} = lead or contact; "
                           f"empty means {marker.default_type}), or trigger a manual run with person_ids=[{s.person_id}]"))
        return out
    if not v.email:
        out.append(_reason("no_email", f"person {s.person_id} has no email",
                           f"person {s.person_id} is marked for sync ({marker.field} = true) but has no email, so no "
                           "Dynamics record can be looked up or created", "give the person an email in Marketo"))
    for entity, rows in facts.email_records.items():
        if rows.empty:
            continue
        ent = config.entity(entity)
        outside = rows[~in_filter(ent, rows)]
        for rid in outside[ent.id_column].astype(str).head(3):
            out.append(_reason("outside_sync_filter", f"the {entity} with this email is outside the sync filter",
                               f"person {s.person_id} is marked for sync, but Dynamics {entity} {rid} with its email "
                               f"<{v.email}> fails the sync filter ({ent.filter.describe()}): nothing is linked, and no "
                               "new record is created (it would be a duplicate)",
                               f"reactivate {entity} {rid} (or change entities.{entity}.filter) to link the person "
                               "to it"))
    return out


def _unlinked_record(config, facts: Facts, field) -> list[Reason]:
    s, v = facts.subject, facts.values
    if facts.link is not None or not s.dynamics_id or s.person_id is not None or v is None or v.dynamics_missing:
        return []
    entity = facts.entity
    out = []
    if entity is not None and not v.email:
        out.append(_reason("no_email", f"the {s.dynamics_type} has no email",
                           f"Dynamics {s.dynamics_type} {s.dynamics_id} has no {entity.email_field.dynamics}, so it "
                           "cannot be matched to a Marketo person nor created as one",
                           f"fill {entity.email_field.dynamics} on the {s.dynamics_type} in Dynamics"))
    return out


def _filter(config, facts: Facts, field) -> list[Reason]:
    s, v, entity = facts.subject, facts.values, facts.entity
    if entity is None or not s.dynamics_id:
        return []
    paused = _when(facts.link.get("out_of_filter_since")) if facts.link else None
    live_out = v is not None and v.dynamics_in_filter is False
    if not (paused or live_out):
        return []
    state = f" (statecode {v.dynamics_statecode})" if v is not None and v.dynamics_statecode is not None else ""
    since = f"; the link is paused since {_at(paused)}" if paused else ""
    if live_out:
        detail = (f"Dynamics {s.dynamics_type} {s.dynamics_id}{state} fails the sync filter of {entity.name}s "
                  f"({entity.filter.describe()}){since}: ")
    else:
        detail = (f"the link to {s.dynamics_type} {s.dynamics_id} is paused since {_at(paused)} (the record left the "
                  f"sync filter {entity.filter.describe()}); it passes the filter now, so the next cycle that reads it "
                  "resumes the pair: ")
    detail += ("the pair is not synced while the record is outside it" if facts.link is not None else
               "it is neither linked nor created in Marketo")
    return [_reason("outside_sync_filter", f"the {s.dynamics_type} is outside the sync filter", detail,
                    f"reactivate the {s.dynamics_type} in Dynamics (or change entities.{entity.name}.filter); it is "
                    "synced in full the cycle it enters the filter again", at=paused)]


def _ambiguous(config, facts: Facts, field) -> list[Reason]:
    h = facts.history
    if h.empty:
        return []
    rows = h[h["action"].eq("ambiguous").to_numpy()]
    if facts.link is not None and not rows.empty:
        rows = rows[[_after_link(r, facts) for r in rows.to_dict("records")]]
    out = []
    for row in rows.drop_duplicates("detail").head(3).to_dict("records"):
        who = _row_who(row)
        out.append(_reason("ambiguous_match", "several candidates: the sync did nothing",
                           f"{who}: {row['detail']} ({_at(row['at'])}, run {row['run_id']})",
                           "make the match unique: merge or fix the duplicate records (emails, or the link fields "
                           f"{config.marketo.link_fields.dynamics_id} / {config.dynamics.marketo_id_column}); the next "
                           "cycle that reads them links them", run_id=_text(row["run_id"]), at=row["at"]))
    return out


def _fields(config, facts: Facts, field) -> list[Reason]:
    entity, s = facts.entity, facts.subject
    out: list[Reason] = []
    if entity is None:
        return out
    if field is not None and _field_of(entity, field) is None:
        elsewhere = [e for e, ent in config.entities.items() if _field_of(ent, field) is not None]
        out.append(_reason("field_not_mapped", f"{field} is not mapped for {entity.name}s",
                           f"{field!r} is not a mapped field of entity type {entity.name} (mapped: "
                           f"{', '.join(entity.field_names)})" + (f"; it is mapped for {', '.join(elsewhere)}" if elsewhere
                                                                   else ""),
                           f"add it to entities.{entity.name}.fields in the sync config (Marketo REST name, Dataverse "
                           "logical name, type, direction)", field=field))
        return out
    if facts.link is None:
        return out
    for f in _fields_in_question(facts, field):
        row = _row(facts, f.name)
        changed = _changed_sides(row, f)
        out += _dropped(facts, f, changed)
        for side in changed:
            target = Side.DYNAMICS if side is Side.MARKETO else Side.MARKETO
            if not f.flows_to(target):
                here, there = side.value.capitalize(), target.value.capitalize()
                out.append(_reason("direction", f"{f.name} does not flow to {there}",
                                   f"{f.name} is mapped {f.direction.value}: its change in {here} "
                                   f"({_show(row.marketo if side is Side.MARKETO else row.dynamics)}, last synced "
                                   f"{_show(row.baseline)}) is not written to {there}; the next cycle writes {there}'s "
                                   f"value over it", _direction_action(f, there, entity), field=f.name))
        if row is not None and row.problem:
            out.append(_reason("value_unreadable", f"{f.name}: a value cannot be read", f"{f.name}: {row.problem}; the "
                               "sync leaves this field alone on that side",
                               "fix the value, or add it to the field's value map (entities."
                               f"{entity.name}.fields, {f.name}.values)", field=f.name))
        out += _rejected(facts, f)
        out += _collision(facts, f)
        out += _consent(facts, f)
    pending = {r.field for r in out if r.code == "direction"}
    return out + [r for r in _overwritten(facts, field) if r.field not in pending]


def _direction_action(f: FieldMap, source: str, entity: EntityConfig) -> str:
    return (f"change it in {source} (the field's source) instead, or set its direction to both "
            f"(entities.{entity.name}.fields, {f.name})")


def _overwritten(facts: Facts, field: str | None) -> list[Reason]:
    """The asked one-way field, when its last write overwrote a value on its target side: an edit made there does
    not flow back. (Only when asked: a write line does not say whether the target's old value was an edit there or
    the value before the source changed, so the direction is stated, with the write, as the likely answer.)"""
    out = []
    asked = _field_of(facts.entity, field) if field is not None else None
    for f in ([asked] if asked is not None else []):
        row = facts.one_way_writes.get(f.name)
        if row is None:
            continue
        source = "Marketo" if f.direction is Direction.TO_DYNAMICS else "Dynamics"
        target = "Dynamics" if source == "Marketo" else "Marketo"
        if _none(row["old_value"]) is None:
            continue  # a first fill of an empty field, not an edit that was overwritten
        out.append(_reason("direction", f"{f.name} flows only to {target}",
                           f"{f.name} is mapped {f.direction.value}: {target}'s {_show(_none(row['old_value']))} was "
                           f"overwritten with {source}'s {_show(_none(row['new_value']))} at {_at(row['at'])} in run "
                           f"{row['run_id']}; a change made in {target} never flows to {source}",
                           _direction_action(f, source, facts.entity), run_id=_text(row["run_id"]), field=f.name,
                           at=row["at"]))
    return out


def _dropped(facts: Facts, f: FieldMap, changed: list[Side]) -> list[Reason]:
    acc = facts.access.entities.get(facts.entity.name) if facts.access is not None else None
    if acc is None:
        return []
    out = []
    for d in (d for d in acc.dropped if d["field"] == f.name):
        side = d["side"]
        if "read" in d["reason"]:
            effect = f"its {side.capitalize()} value is not read, so a change there is not seen"
        else:
            effect = f"nothing is written to it in {side.capitalize()}"
        out.append(_reason("field_dropped", f"{f.name} is dropped on the {side.capitalize()} side",
                           f"{f.name}: {d['reason']}; {effect} (schema refresh of "
                           f"{facts.access.refreshed_at or 'unknown time'})",
                           "give the sync user read and update access to the field (Dataverse: a field security "
                           "profile with read/update on the column; Marketo: an API-updateable field); the next schema "
                           "refresh picks it up", field=f.name))
    return out


def _rejected(facts: Facts, f: FieldMap) -> list[Reason]:
    e = facts.errors
    if e.empty:
        return []
    out = []
    for row in e[e["field"].astype(object).eq(f.name).to_numpy()].to_dict("records"):
        target = str(row["target"]).capitalize()
        out.append(_reason(
            "value_rejected", f"{target} rejected the value of {f.name}",
            f"{target} rejected {f.name} = {_show(_none(row['value']))} for {_who(facts.subject)}: "
            + _message(row) + f" (first {_at(_when(row['first_seen_at']))}, last {_at(_when(row['last_seen_at']))}, "
              f"{row['occurrences']} time(s), run {row['run_id']}); not re-sent while the value stays the same",
            f"fix the value on the source side (or the rule in {target} that refuses it); or trigger a run with "
            "retry_failed to send it again", run_id=_text(row["run_id"]), field=f.name, at=_when(row["last_seen_at"])))
    return out


def _message(row: dict) -> str:
    """A sync error's code and message, without repeating the code the message already carries."""
    code, message = _text(row.get("code")), str(row.get("message") or "rejected without a message")
    return message if not code or code in message else f"{code} {message}"


#: what a sync error on a pseudo-field refused (:mod:`mdsync.constants`, :mod:`mdsync.load`)
_PSEUDO = {"(link)": "the link fields", "(deleted flag)": "the deleted flag", "(delete)": "the delete (policy "
           "propagate)", "(merge)": "the merge of two persons"}


def _refused(config, facts: Facts, field) -> list[Reason]:
    """Rejections not of a mapped field: a refused create (no field), a refused write of a pseudo-field or of an
    account field; and, for a record without a person, a refused Marketo create (an ``error`` line only)."""
    out, s = [], facts.subject
    mapped = set(facts.entity.field_names) if facts.entity is not None else set()
    e = facts.errors
    for row in (e.to_dict("records") if not e.empty else []):
        name, target = _text(row["field"]), str(row["target"]).capitalize()
        when = (f"first {_at(_when(row['first_seen_at']))}, last {_at(_when(row['last_seen_at']))}, "
                f"{row['occurrences']} time(s), run {row['run_id']}")
        if name in mapped:
            continue
        if name is None:
            if facts.link is not None:
                continue  # a create refused before the pair was linked some other way
            out.append(_reason("create_refused", f"{target} refused to create the {row['dynamics_type'] or 'record'}",
                               f"{_who(s)}: {_message(row)} ({when}); tried again every cycle",
                               f"fix what {target} refuses on the record (the message names the field or rule), or the "
                               f"rule in {target}; the next cycle creates it", run_id=_text(row["run_id"]),
                               at=_when(row["last_seen_at"])))
            continue
        what = _PSEUDO.get(name, f"the account field {name.split('.', 1)[-1]}" if name.startswith("account.") else name)
        out.append(_reason("value_rejected", f"{target} refused {what}",
                           f"{target} refused {what} for {_who(s)}" + (f" (value {_show(_none(row['value']))})"
                                                                        if _none(row["value"]) is not None else "")
                           + f": {_message(row)} ({when})",
                           f"fix what {target} refuses (the message says what), then trigger a run with retry_failed",
                           run_id=_text(row["run_id"]), field=name, at=_when(row["last_seen_at"])))
    h = facts.history
    if facts.link is None and s.person_id is None and s.dynamics_id and not h.empty:
        errors = h[h["action"].eq("error").to_numpy() & h["detail"].fillna("").str.startswith("Marketo refused to create")
                   .to_numpy()]
        if not errors.empty:
            row = errors.iloc[0]
            out.append(_reason("create_refused", "Marketo refused to create the person",
                               f"Dynamics {s.dynamics_type} {s.dynamics_id}: {row['detail']} ({_at(row['at'])}, run "
                               f"{row['run_id']})", "fix the record's values Marketo refuses (the message says which); "
                               "the next cycle tries again", run_id=_text(row["run_id"]), at=row["at"]))
    return out


def _unexplained_unlinked(config, facts: Facts) -> list[Reason]:
    """A person marked for sync, or a record in scope, with no partner and no reason found."""
    s, v = facts.subject, facts.values
    if v is None or v.marketo_missing or v.dynamics_missing:
        return []
    if s.person_id is not None and not (v.marked_for_sync or v.marketo_link_field):
        return []
    if s.person_id is None and not (s.dynamics_id and v.dynamics_in_filter and v.email):
        return []
    h = facts.history
    if not h.empty:  # identity's last word on it, when it said something no rule above reads
        said = h[h["action"].isin(["skip", "error"]).to_numpy()]
        if not said.empty:
            row = said.iloc[0]
            return [_reason("skipped", "the last cycle that read it skipped it",
                            f"{_who(s)}: {row['detail']} ({_at(row['at'])}, run {row['run_id']})",
                            "fix what the line names (the record it names, its email or link fields); the next cycle "
                            "that reads the record decides again", run_id=_text(row["run_id"]), at=row["at"])]
    return [_reason("unexplained", "not linked, and no reason was found",
                    f"{_who(s)} is in scope (marked for sync, or inside the sync filter with an email) and older than "
                    "what the last cycle read, but has no partner and the state store records no decision about it",
                    "trigger a run with full_resync (or a manual run with its person_ids) to decide it again")]


def _collision(facts: Facts, f: FieldMap) -> list[Reason]:
    h = facts.history
    if h.empty:
        return []
    rows = h[h["action"].eq("collision").to_numpy() & h["field"].astype(object).eq(f.name).to_numpy()]
    if rows.empty:
        return []
    row = rows.iloc[0]  # the newest
    if facts.superseded.get((f.name, int(row["id"]))):
        return []
    winner, loser = str(row["winner"]), "dynamics" if str(row["winner"]) == "marketo" else "marketo"
    return [_reason("collision_lost", f"{f.name} changed on both sides; {winner.capitalize()} won",
                    f"{f.name} of {_who(facts.subject)}: {row['detail']}; {winner.capitalize()}'s "
                    f"{_show(_none(row['new_value']))} was kept and {loser.capitalize()}'s {_show(_none(row['old_value']))} "
                    f"was overwritten ({_at(row['at'])}, run {row['run_id']})",
                    f"{winner.capitalize()} wins collisions for {facts.entity.name}s (collision_winner); to keep "
                    f"{loser.capitalize()}'s value, enter it again in {loser.capitalize()} (alone it flows across), "
                    f"or in {winner.capitalize()}", run_id=_text(row["run_id"]), field=f.name, at=row["at"])]


def _consent(facts: Facts, f: FieldMap) -> list[Reason]:
    h = facts.history
    if h.empty or not f.opt_out_wins:
        return []
    rows = h[h["action"].eq("consent").to_numpy() & h["field"].astype(object).eq(f.name).to_numpy()]
    rows = rows[rows["detail"].fillna("").str.contains("not propagated").to_numpy()]
    if rows.empty or facts.superseded.get((f.name, int(rows.iloc[0]["id"]))):
        return []
    row = rows.iloc[0]
    return [_reason("consent_held", f"{f.name}: the re-opt-in was held (an opt-out wins)",
                    f"{f.name} of {_who(facts.subject)}: {row['detail']} ({_at(row['at'])}, run {row['run_id']})",
                    "clear the opt-out on both sides to opt the person back in", run_id=_text(row["run_id"]),
                    field=f.name, at=row["at"])]


#: the services stamp changes to the second (Marketo's updatedAt; Dataverse's modifiedon as read here)
STAMP_RESOLUTION = timedelta(seconds=1)


def _decided_since(facts: Facts, when: datetime) -> bool:
    """Whether a cycle recorded a decision about the subject surely after a change stamped ``when`` (so it had
    read the change): at least one stamp resolution later."""
    history = facts.history
    if history is None or history.empty:
        return False
    return bool((pd.to_datetime(history["at"], utc=True) >= when + STAMP_RESOLUTION).any())


def _pending(config, facts: Facts, field) -> tuple[list[str], list[str]]:
    """Changes newer than what the last cycle read: ``(what, sides)`` lines, e.g. ``Marketo updatedAt ... is after
    the watermark ...``."""
    v, s = facts.values, facts.subject
    if v is None:
        return [], []
    wm_m = facts.watermarks.get(("marketo", "persons"))
    wm_d = facts.watermarks.get(("dynamics", s.dynamics_type)) if s.dynamics_type else None
    changed: set[Side] = set()
    if facts.link is not None and facts.entity is not None:
        fields = [f for f in facts.entity.fields if field is None or f is _field_of(facts.entity, field)]
        for f in fields:
            row = _row(facts, f.name)
            for side in _changed_sides(row, f):
                if not _cannot_flow(facts, f, side, row):
                    changed.add(side)
    elif facts.link is None and s.person_id is not None and (v.marked_for_sync or v.marketo_link_field):
        changed.add(Side.MARKETO)  # a marked person waiting for its record
    elif facts.link is None and s.dynamics_id and s.person_id is None and v.dynamics_in_filter:
        changed.add(Side.DYNAMICS)  # a record waiting for its person
    lines, sides = [], []
    for side, when, wm, label in ((Side.MARKETO, v.marketo_updated_at, wm_m, "Marketo updatedAt"),
                                  (Side.DYNAMICS, v.dynamics_modified_on, wm_d, "Dynamics modifiedon")):
        if side not in changed or when is None:
            continue
        high = _when(wm["high_water"]) if wm else None
        if high is None or when > high:
            lines.append(f"{label} {_at(when)} is after the last cycle's read of that side "
                         f"({_at(high) if high else 'never read'})")
        elif facts.link is not None and when > high - facts.overlap and not _decided_since(facts, when):
            # a linked field differs from its baseline and nothing was decided about the pair since the change:
            # the cycle that read up to ``high`` did not see it (stamped to the second), the next one, reading
            # again from the overlap, will. An unlinked record's own decision (skipped, waiting) is in its history.
            lines.append(f"{label} {_at(when)} is within the {facts.overlap.total_seconds():.0f} s before the last "
                         f"cycle's read of that side ({_at(high)}) that the next cycle reads again")
        else:
            continue
        sides.append(side.value)
    return lines, sides


def _cannot_flow(facts: Facts, f: FieldMap, side: Side, row: FieldRow) -> bool:
    """Whether a change of ``f`` on ``side`` is explained as one that does not flow (rejected, dropped for access, a
    one-way field's target, an unreadable value), so waiting for a cycle would not bring it across."""
    target = Side.DYNAMICS if side is Side.MARKETO else Side.MARKETO
    acc = facts.access.entities.get(facts.entity.name) if facts.access is not None else None
    dropped = acc is not None and any(d["field"] == f.name for d in acc.dropped)
    value = row.marketo if side is Side.MARKETO else row.dynamics
    return dropped or not f.flows_to(target) or bool(row.problem) or _read_and_rejected(facts, f, value)


def _read_and_rejected(facts: Facts, f: FieldMap, value) -> bool:
    """Whether the sync read this value already: the other side rejected exactly it (an open sync error)."""
    e = facts.errors
    if e.empty:
        return False
    mine = e[e["field"].astype(object).eq(f.name).to_numpy()]
    return bool((mine["value"].map(_text) == _text(value)).any())


def _last_commit(facts: Facts) -> tuple[datetime | None, str | None]:
    rows = [w for w in facts.watermarks.values() if w.get("updated_at") is not None]
    if not rows:
        return None, None
    last = max(rows, key=lambda w: _when(w["updated_at"]))
    return _when(last["updated_at"]), _text(last.get("run_id"))


def _mass_change(config, facts: Facts, field) -> list[Reason]:
    if not facts.held_runs:
        return []
    lines, _ = _pending(config, facts, field)
    waiting = bool(lines) or (facts.values is not None and bool(facts.values.differing) and facts.link is not None)
    if not waiting:
        return []
    out = []
    for run in facts.held_runs[:3]:
        named = _in_sample(run, facts.subject)
        out.append(_reason(
            "mass_change_held", f"run {run.run_id} was held by the mass-change guard",
            f"run {run.run_id} planned more writes than the mass-change guard allows and was "
            f"{run.outcome.replace('_', ' ')}{' at ' + _at(run.at) if run.at else ''}: it wrote nothing, so "
            f"{_who(facts.subject)} waits with every other change of that run"
            + ("; this record is in the approval request's sample" if named else ""),
            "approve the next run's request on the Required Actions page (approve_mass_change) if the change is "
            "wanted, or fix the upstream data that made it a mass change; a manual run with person_ids and "
            "allow_mass_change pushes this record alone", run_id=run.run_id, at=run.at))
    return out


def _in_sample(run: HeldRun, s: Subject) -> bool:
    sides = (run.decision or {}).get("sides") or {}
    for side in sides.values():
        for item in side.get("sample") or []:
            if (s.person_id is not None and item.get("person_id") == s.person_id) or (
                    s.dynamics_id and str(item.get("dynamics_id") or "").lower() == s.dynamics_id.lower()):
                return True
    return False


def _not_yet_reached(config, facts: Facts, field) -> list[Reason]:
    last, run = _last_commit(facts)
    if last is None:
        return [_reason("not_yet_reached", "no cycle has committed yet",
                        "the state store has no watermark: no sync cycle has finished against it yet",
                        "run the DAG (make sync, or trigger marketo_dynamics_sync); the first cycle is a full reconcile")]
    lines, sides = _pending(config, facts, field)
    if not lines:
        return []
    age = facts.now - last
    stale = (f"; no cycle has committed for {int(age.total_seconds() // 60)} minutes: runs may be failing, paused, "
             "or held for approval: check the DAG in Airflow") if age > STALE_AFTER else ""
    return [_reason("not_yet_reached", "the change is newer than the last cycle's read",
                    f"{_who(facts.subject)}: {'; '.join(lines)}; the last cycle committed at {_at(last)} (run {run})"
                    + stale, "wait for the next cycle (every 5 minutes), or trigger a manual run"
                    + (f" with person_ids=[{facts.subject.person_id}]" if facts.subject.person_id is not None else ""),
                    run_id=run, at=last)]


# -- why ------------------------------------------------------------------------------------------------------------

def _held(items) -> list[HeldRun]:
    out = []
    for item in items or []:
        if isinstance(item, HeldRun):
            out.append(item)
        elif isinstance(item, str):
            out.append(HeldRun(run_id=item))
        elif isinstance(item, dict):
            out.append(HeldRun(run_id=str(item.get("run_id")), outcome=str(item.get("outcome") or "rejected"),
                               at=_when(item.get("at")), decision=item.get("decision") or
                               ({k: item[k] for k in ("sides",) if k in item} or None)))
        else:
            raise TypeError(f"guard_held_runs: {item!r} is not a run id, a dict or a HeldRun")
    return out


def _subjects_live(config, marketo_client, dynamics_client, email: str) -> list[Subject]:
    """Persons and records with this email, read live (for emails the state store never saw)."""
    out = []
    if marketo_client is not None:
        persons = marketo_client.get_leads("email", [email], ["id", "email"])
        out += [Subject(person_id=int(p), email=_text(e), linked=False, known=False)
                for p, e in zip(persons.get("id", []), persons.get("email", []))]
    if dynamics_client is not None:
        for name, rows in _records_by_email(config, dynamics_client, email).items():
            ent = config.entity(name)
            out += [Subject(dynamics_type=name, dynamics_id=str(r), email=email, linked=False, known=False)
                    for r in rows[ent.id_column]]
    return out


def _merge_subjects(known: list[Subject], live: list[Subject], store, config) -> list[Subject]:
    out = list(known)
    persons = {s.person_id for s in out if s.person_id is not None}
    records = {str(s.dynamics_id).lower() for s in out if s.dynamics_id}
    with store.engine.connect() as conn:
        for s in live:
            if s.person_id is not None and s.person_id not in persons:
                link = _link_of(conn, s.person_id)
                if link:
                    s = Subject(person_id=s.person_id, dynamics_type=link["dynamics_type"], dynamics_id=link["dynamics_id"],
                                email=s.email, linked=True)
                    records.add(str(link["dynamics_id"]).lower())
                persons.add(s.person_id)
                out.append(s)
            elif s.dynamics_id and str(s.dynamics_id).lower() not in records:
                found = _link_rows(conn, config, dynamics_id=s.dynamics_id, dynamics_type=s.dynamics_type)
                if not found.empty and int(found.iloc[0]["person_id"]) in persons:
                    continue
                records.add(str(s.dynamics_id).lower())
                out.append(s)
    return out


def why(config: SyncConfig, store, settings, *, marketo_client=None, dynamics_client=None, person_id: int | None = None,
        dynamics_type: str | None = None, dynamics_id: str | None = None, email: str | None = None,
        field: str | None = None, guard_held_runs: Sequence | None = None, staging_root=None) -> Explanation:
    """Why a person, a Dynamics record, or the records of an email are not (yet) in sync: every reason that applies.

    Computed from the state store (links, baselines, watermarks, activity, open errors, deletions, merges), the
    config, the field access of the last schema refresh (:func:`field_access`) and, when the clients are given, a
    live read of the pair (:func:`side_by_side`). Without clients only the state store's reasons are found.

    :param field: one field (canonical name, Marketo REST name or Dataverse logical name); default every field
        whose two sides differ.
    :param guard_held_runs: runs whose mass change was held (run ids, :class:`HeldRun`, or the ``guard`` XCom dicts
        of ``approve_mass_change`` with a ``run_id``): Airflow keeps that outcome, not the state store.
    :param staging_root: the staging root (``ObjectStoragePath``) when ``settings.staging_url`` is not local.
    :raises ValueError: no subject given, or an id that cannot be one.
    """
    if person_id is None and not dynamics_id and not email:
        raise ValueError("why() needs a person_id, a dynamics_id (with dynamics_type) or an email")
    if dynamics_id and not is_guid(dynamics_id):
        raise ValueError(f"Dynamics id {dynamics_id!r} is not a GUID (e.g. 3f2504e0-4f89-11d3-9a0c-0305e82c3301)")
    if person_id is not None:
        subject = find_subject(store, str(int(person_id)))[0]
        if dynamics_id and not subject.linked:
            subject = Subject(person_id=int(person_id), dynamics_type=dynamics_type, dynamics_id=_guid(dynamics_id),
                              email=subject.email, linked=False, known=subject.known)
    elif dynamics_id:
        subject = find_subject(store, dynamics_id)[0]
        if dynamics_type and not subject.dynamics_type:
            subject = subject.model_copy(update={"dynamics_type": dynamics_type})
    else:
        subjects = find_subject(store, email)
        if marketo_client is not None or dynamics_client is not None:
            subjects = _merge_subjects(subjects, _subjects_live(config, marketo_client, dynamics_client, email), store,
                                       config)
        if not subjects:
            return Explanation(status="unknown", summary=f"nothing is known about {email}: no activity in the state "
                               "store" + ("" if marketo_client else " (give the clients to look it up live)"),
                               reasons=[])
        if len(subjects) > 1:
            return _several(store, email, subjects)
        subject = subjects[0]
    return _explain_subject(config, store, settings, subject, marketo_client, dynamics_client, field,
                            _held(guard_held_runs), staging_root)


def _several(store, email: str, subjects: list[Subject]) -> Explanation:
    with store.engine.connect() as conn:
        h = _activity(conn, email=email, actions=["ambiguous"], limit=ROW_LIMIT)
    listed = "; ".join(_who(s) + (" (linked)" if s.linked else "") for s in subjects)
    reasons = [_reason("several_matches", f"{len(subjects)} records have {email}",
                       f"{email} names several records: {listed}",
                       "choose one by its Marketo person id or Dynamics id to see why it did not sync")]
    for row in h.drop_duplicates("detail").head(3).to_dict("records"):
        reasons.append(_reason("ambiguous_match", "several candidates: the sync did nothing",
                               f"{_row_who(row)}: "
                               f"{row['detail']} ({_at(_when(row['at']))}, run {row['run_id']})",
                               "make the match unique (merge or fix the duplicates); the next cycle links them",
                               run_id=_text(row["run_id"]), at=_when(row["at"])))
    return Explanation(status="choose", summary=f"{len(subjects)} records have {email}: choose one", reasons=reasons,
                       candidates=subjects)


def _explain_subject(config: SyncConfig, store, settings, subject: Subject, marketo_client, dynamics_client,
                     field: str | None, held: list[HeldRun], staging_root) -> Explanation:
    values = None
    acc, source = field_access(config, settings, marketo_client, dynamics_client, staging_root=staging_root)
    if marketo_client is not None and dynamics_client is not None:
        values = side_by_side(config, marketo_client, dynamics_client, store, person_id=subject.person_id,
                              dynamics_type=subject.dynamics_type, dynamics_id=subject.dynamics_id, access=acc)
        subject = subject.model_copy(update={
            "person_id": values.person_id, "dynamics_type": values.dynamics_type, "dynamics_id": values.dynamics_id,
            "email": values.email or subject.email, "linked": values.link is not None})
    entity = _entity_of(config, subject.dynamics_type) or (_entity_of(config, values.sync_as) if values else None) \
        or config.entity(config.marketo.sync_marker.default_type)
    emails = [e for e in (subject.email, values.email if values else None) if e]
    if values is not None and values._dynamics_raw is not None and not values._dynamics_raw.empty:
        d_email = _text(values._dynamics_raw[entity.email_field.dynamics].iloc[0])
        emails += [d_email] if d_email else []
    with store.engine.connect() as conn:
        found = _link_rows(conn, config, person_id=subject.person_id) if subject.person_id is not None else (
            _link_rows(conn, config, dynamics_id=subject.dynamics_id, dynamics_type=subject.dynamics_type)
            if subject.dynamics_id else pd.DataFrame())
        link = found.iloc[0].to_dict() if not found.empty else None
        if link is not None and subject.dynamics_id and str(link["dynamics_id"]).lower() != subject.dynamics_id.lower():
            link = None
        facts = Facts(subject=subject, entity=entity, link=link, values=values, history=_history(conn, subject, emails),
                      errors=_open_errors(conn, subject.person_id, subject.dynamics_id),
                      deletions=_deletions(conn, subject.person_id, subject.dynamics_id),
                      merged_away=_merged_away(conn, subject.person_id), watermarks=_watermarks(conn), access=acc,
                      overlap=timedelta(seconds=settings.overlap_seconds))
        last, _ = _last_commit(facts)
        facts.held_runs = held + [r for r in _held_runs_in_store(conn, last) if r.run_id not in {h.run_id for h in held}]
        facts.superseded = _superseded(conn, facts)
        facts.one_way_writes = _one_way_writes(conn, facts) if link is not None else {}
        baselines = _baselines(conn, subject.person_id) if link is not None else pd.DataFrame()
    if values is not None and link is None and subject.person_id is not None and values.email and values.marked_for_sync \
            and dynamics_client is not None:
        facts.email_records = _records_by_email(config, dynamics_client, values.email)
    reasons = explain(config, facts, field)
    last_at, last_run = _last_synced(baselines, facts.history)
    return Explanation(subject=subject, status="not_synced" if reasons else ("in_sync" if values is not None else "unknown"),
                       summary=_summary(subject, reasons, values, last_at, last_run), reasons=reasons, values=values,
                       last_synced_at=last_at, last_run_id=last_run, field_access=source)


def _superseded(conn, facts: Facts) -> dict:
    """For the newest collision and consent line of each field: whether a later run wrote or decided that field."""
    h, out = facts.history, {}
    if h.empty or facts.subject.person_id is None:
        return out
    rows = h[h["action"].isin(["collision", "consent"]).to_numpy()].drop_duplicates("field")
    for row in rows.to_dict("records"):
        later = _activity(conn, person_id=facts.subject.person_id, field=row["field"], after_id=int(row["id"]), limit=20)
        out[(row["field"], int(row["id"]))] = bool((later["run_id"].astype(object) != row["run_id"]).any()) \
            if not later.empty else False
    return out


def _one_way_writes(conn, facts: Facts) -> dict:
    """The newest write line of each one-way field of the pair, when it wrote the field's target side."""
    from mdsync.activity import written_side

    out = {}
    if facts.subject.person_id is None or facts.entity is None:
        return out
    for f in facts.entity.fields:
        if f.direction is Direction.BOTH:
            continue
        rows = _activity(conn, person_id=facts.subject.person_id, field=f.name, actions=["update"], limit=1)
        if rows.empty:
            continue
        target = "dynamics" if f.direction is Direction.TO_DYNAMICS else "marketo"
        if written_side(rows["detail"]).iloc[0] == target:
            out[f.name] = {**rows.iloc[0].to_dict(), "at": _when(rows.iloc[0]["at"])}
    return out


def _last_synced(baselines: pd.DataFrame, history: pd.DataFrame) -> tuple[datetime | None, str | None]:
    if not baselines.empty:
        synced = baselines.assign(at=baselines["synced_at"].map(_when)).dropna(subset=["at"])
        if not synced.empty:
            row = synced.sort_values("at").iloc[-1]
            return row["at"], _text(row["run_id"])
    if not history.empty:
        writes = history[history["action"].isin(["update", "create", "link", "consent"]).to_numpy()]
        if not writes.empty:
            return writes.iloc[0]["at"], _text(writes.iloc[0]["run_id"])
    return None, None


def _summary(subject: Subject, reasons: list[Reason], values: PairValues | None, last_at, last_run) -> str:
    who = _who(subject)
    if reasons:
        codes = ", ".join(dict.fromkeys(r.code for r in reasons))
        return f"{who} is not in sync: {len(reasons)} reason(s) ({codes})"
    when = f"; last synced at {_at(last_at)} in run {last_run}" if last_at else ""
    if values is None:
        return f"no reason found in the state store for {who}{when} (no live read: give the clients to compare values)"
    return f"{who} is in sync: every mapped field agrees on both sides{when}"

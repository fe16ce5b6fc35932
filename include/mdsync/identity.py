"""Stage 3 of the cycle: identity (DESIGN §3), a pure stage on frames.

Frames in (links from the state store, extracted persons and Dynamics rows, deletions) -> typed decisions
out (:class:`IdentityDecisions`: links kept, rebuilt, made and dropped; creates wanted on each side;
ambiguities and record-level errors as activity rows). Nothing here calls a service: the cycle first asks
:func:`plan_lookups` which records it must read so that every decision can be made from frames, reads
them, then calls :func:`decide`. Creates and link-field writes are done by the load stage.

- Deleted on either side: the link is dropped and the entity type's delete policy decides what happens to the
  other side (``flag``: it is flagged; ``propagate``: it is deleted or deactivated, unless it changed on its own
  side since the last sync; ``unlink``: nothing). The load stage carries the flags and deletes out. Every ended
  pair is recorded (:attr:`IdentityDecisions.deletions`), so its survivor is neither re-linked nor used to create
  the deleted record again (unless ``deletes.recreate``, or a manual run names the person).
- The sync filter: a Dynamics record outside its entity type's filter is neither linked (by email or a push) nor
  created in Marketo; a linked record that leaves it pauses its pair (link kept, one line logged) and is synced in
  full the cycle it enters it again (its person is read for that).
- Merges: a Marketo merge's winner takes over its loser's link when it has none (both link fields rewritten, the
  pair's baselines follow), else keeps its own and the loser's is dropped (its record held, a Dynamics merge may
  be wanted); a loser id in a Dataverse link column stands for its winner. A Dataverse merge's subordinate hands
  its person to the master, or, when the master has a person already, the two persons are merged in Marketo (the
  master's wins), as for a lead qualified into an existing contact. Merged-away persons are never deletes.
- Links lost from the state store are rebuilt from the link fields on the records: the Dataverse
  ``mdsync_marketopersonid`` column, the Marketo ``dynamicsRecordId`` / ``dynamicsRecordType`` fields.
- An unlinked Dynamics record links by email to exactly one Marketo person (case-insensitive), or becomes a
  new Marketo person; several matches are logged as ambiguous and nothing is done. When a contact and a lead
  share an email, the contact gets the person. A contact whose person follows a lead that was qualified
  takes the person over.
- An unlinked Marketo person gets a Dynamics record only when marked for sync (or named by a manual run): an
  existing contact, then lead, with that email is linked instead; otherwise a create is wanted (upserted by
  the alternate key in the load stage, so a retried create can never duplicate). An empty or unknown
  ``dynamicsSyncAs`` means the marker's default type.

Every step is column-wise over the frames (no per-row Python), so a first sync of a whole database is
decided in seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mdsync.activity import activity_frame
from mdsync.config import (ENTITY_TYPES, BoolOp, Column, Comparison, DeletePolicy, EntityConfig, Literal, Not, Side,
                           SyncConfig)
from mdsync.extract import MASTER_ID, MERGED, ORIGINATING_LEAD, QUALIFIED_CONTACT

log = logging.getLogger("mdsync.identity")

LINK_COLUMNS = ["dynamics_type", "dynamics_id", "method", "new", "paused"]
MARKETO_CREATE_COLUMNS = ["entity_type", "dynamics_id", "email"]
DYNAMICS_CREATE_COLUMNS = ["person_id", "entity_type", "email"]
#: what the load stage does to the surviving side of a deleted pair: ``target`` (the side written), ``action``
#: (``flag``, ``delete`` or ``deactivate``), the pair
DELETE_COLUMNS = ["target", "action", "person_id", "entity_type", "dynamics_id"]
#: the pairs a delete ended, for the state store (:meth:`mdsync.state.StateStore.save_deletions`)
DELETION_COLUMNS = ["deleted_in", "person_id", "dynamics_type", "dynamics_id", "policy", "action"]
#: persons the load stage merges in Marketo (the loser into the winner), and the record the winner follows
MARKETO_MERGE_COLUMNS = ["winner_id", "loser_id", "entity_type", "dynamics_id", "detail"]
#: pairs a merge handed to another person or record: their baselines follow (``from_person`` -> ``to_person``)
MOVED_COLUMNS = ["from_person", "to_person"]
#: linked Dynamics records whose person follows another record (:func:`handover_candidates`)
HANDOVER_COLUMNS = ["person_id", "from_type", "from_id", "to_type", "to_id", "reason"]
_TRUE = ("true", "1", "yes")


# -- small column helpers --------------------------------------------------------------------------------

def _text(series: pd.Series) -> pd.Series:
    """Stripped text with NA kept (object dtype, so mixed inputs compare as strings)."""
    s = series.astype(object)
    return s.where(s.isna(), s.astype(str).str.strip())


def _lower(series: pd.Series) -> pd.Series:
    return _text(series).str.lower()


def _blank(series: pd.Series) -> np.ndarray:
    s = _text(series)
    return (s.isna() | s.eq("")).to_numpy(dtype=bool)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series(None, index=frame.index, dtype=object)


def _record_key(entity, ids: pd.Series) -> pd.Series:
    """``entity:lowercased id`` keys (entity a scalar or a series aligned with ``ids``)."""
    return (entity if isinstance(entity, str) else entity.astype(str)) + ":" + ids.astype(str).str.lower()


def empty_links() -> pd.DataFrame:
    return pd.DataFrame({"dynamics_type": pd.Series(dtype=object), "dynamics_id": pd.Series(dtype=object),
                         "method": pd.Series(dtype=object), "new": pd.Series(dtype=bool),
                         "paused": pd.Series(dtype=bool)},
                        index=pd.Index([], dtype="int64", name="person_id"))


def _paused(links: pd.DataFrame) -> np.ndarray:
    """Links whose record is outside the sync filter (state-store links without the column: none)."""
    if "paused" not in links:
        return np.zeros(len(links), dtype=bool)
    return links["paused"].fillna(False).astype(bool).to_numpy()


# -- the sync filter: an OData condition evaluated on frames, as Dataverse would ---------------------------------

_FLIP = {"eq": "eq", "ne": "ne", "gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}
_COMPARE = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "gt": lambda a, b: a > b,
            "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b}


def _as_boolean(values: pd.Series) -> pd.Series:
    """Yes/No values (bool, 0/1, "true"/"false") as a nullable boolean series."""
    text = values.astype(object).where(values.notna(), None).astype(str).str.strip().str.lower()
    out = pd.Series(pd.NA, index=values.index, dtype="boolean")
    out[text.isin(["true", "1", "1.0"]).to_numpy()] = True
    out[text.isin(["false", "0", "0.0"]).to_numpy()] = False
    return out


def _as_number(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values.astype(object).where(values.notna(), None), errors="coerce").astype("Float64")


def _as_text(values: pd.Series) -> pd.Series:
    # Dataverse compares strings case-insensitively (filter-rows: "All filters using string values are case
    # insensitive")
    return values.astype("string").str.lower()


def _numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)


def _truth(node, rows: pd.DataFrame) -> pd.Series:
    """A condition's value per row, in three-valued logic (NA where a compared value is null)."""
    if isinstance(node, BoolOp):
        left, right = _truth(node.left, rows), _truth(node.right, rows)
        return left & right if node.op == "and" else left | right
    if isinstance(node, Not):
        return ~_truth(node.operand, rows)
    assert isinstance(node, Comparison)
    left, right, op = node.left, node.right, node.op
    if isinstance(left, Literal):
        left, right, op = right, left, _FLIP[op]
    values = _column(rows, left.name)
    if isinstance(right, Column):
        other = _column(rows, right.name)
        if _numeric(values) and _numeric(other):
            return _COMPARE[op](_as_number(values), _as_number(other))
        return _COMPARE[op](_as_text(values), _as_text(other))
    value = right.value
    if value is None:  # eq null / ne null: never unknown
        missing = values.isna()
        return (missing if op == "eq" else ~missing).astype("boolean")
    if isinstance(value, bool):
        return _COMPARE[op](_as_boolean(values), value)
    if isinstance(value, (int, float)):
        return _COMPARE[op](_as_number(values), float(value))
    return _COMPARE[op](_as_text(values), value.lower())


def in_filter(entity: EntityConfig, rows: pd.DataFrame) -> np.ndarray:
    """Which rows pass the entity type's sync filter: its condition holds (a null comparison does not, as in
    Dataverse) and its ``dynamics_column``, when set, is true. Vectorised; a column absent from ``rows`` is null."""
    keep = np.ones(len(rows), dtype=bool)
    condition, column = entity.filter.condition, entity.filter.dynamics_column
    if condition is not None and len(rows):
        keep &= _truth(condition, rows).fillna(False).to_numpy(dtype=bool)
    if column:
        keep &= _as_boolean(_column(rows, column)).fillna(False).to_numpy(dtype=bool)
    return keep


def outside_filter(config: SyncConfig, records: dict[str, pd.DataFrame]) -> pd.Index:
    """``entity:id`` keys of the rows outside their entity type's sync filter."""
    parts = []
    for entity, rows in records.items():
        if rows.empty or entity not in config.entities:
            continue
        ent = config.entity(entity)
        out = ~in_filter(ent, rows)
        parts.append(_record_key(entity, rows[ent.id_column][out]))
    return pd.Index(pd.concat(parts).unique() if parts else [], dtype=object)


def _notes(action: str, detail, **columns) -> pd.DataFrame:
    """Activity rows for one kind of decision (columns are equal-length arrays or scalars)."""
    size = max((len(v) for v in columns.values() if hasattr(v, "__len__") and not isinstance(v, str)), default=0)
    if size == 0:
        return activity_frame([])
    data = {k: (np.asarray(v, dtype=object) if hasattr(v, "__len__") and not isinstance(v, str) else v)
            for k, v in columns.items()}
    detail = np.asarray(detail, dtype=object) if hasattr(detail, "__len__") and not isinstance(detail, str) else detail
    frame = pd.DataFrame({**data, "action": action, "detail": detail}, index=range(size))
    if "entity_type" in frame and "dynamics_type" not in frame:
        frame["dynamics_type"] = frame["entity_type"]
    return activity_frame(frame)


def _normal_persons(persons: pd.DataFrame) -> pd.DataFrame:
    if persons.empty or "id" not in persons:
        return pd.DataFrame({"id": pd.Series(dtype="int64"), "email": pd.Series(dtype=object)})
    out = persons[persons["id"].notna()]
    out = out.assign(id=out["id"].astype("int64"))
    return out.drop_duplicates("id", keep="last")


# -- lookups: what must be read before deciding --------------------------------------------------------

@dataclass
class Lookups:
    """Records the cycle reads before :func:`decide`, so every decision can be made from frames."""

    #: emails to look up among Marketo persons (unlinked Dynamics records wanting a person)
    marketo_emails: list[str] = field(default_factory=list)
    #: Marketo person ids named by Dynamics link columns or a manual run, not extracted
    marketo_ids: list[int] = field(default_factory=list)
    #: emails to look up among Dynamics contacts and leads (persons wanting a Dynamics record)
    dynamics_emails: list[str] = field(default_factory=list)
    #: per entity type, Dynamics ids named by Marketo link fields, not extracted
    dynamics_ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.marketo_emails or self.marketo_ids or self.dynamics_emails
                    or any(self.dynamics_ids.values()))

    def counts(self) -> dict[str, int]:
        return {"marketo_emails": len(self.marketo_emails), "marketo_ids": len(self.marketo_ids),
                "dynamics_emails": len(self.dynamics_emails),
                "dynamics_ids": sum(len(v) for v in self.dynamics_ids.values())}


def plan_lookups(config: SyncConfig, links: pd.DataFrame, persons: pd.DataFrame, records: dict[str, pd.DataFrame],
                 *, marketo_complete: bool = False, dynamics_complete: bool = False,
                 push_ids=(), deletions: pd.DataFrame | None = None, merges: pd.DataFrame | None = None) -> Lookups:
    """Which records to read so that :func:`decide` sees everything it decides about.

    :param marketo_complete: ``persons`` holds every Marketo person (a bulk export of all): no Marketo lookups.
    :param dynamics_complete: every Dynamics row is in ``records`` (full reads): no Dynamics lookups.
    :param deletions: recorded deletions (:data:`DELETION_COLUMNS`): a deleted id a link field names is not read.
    :param merges: Marketo persons merged away (``loser_id, winner_id``): the winner is read instead of a loser a
        link column names, and the records of moved links are read (see :func:`merge_lookups`).
    """
    persons = _normal_persons(persons)
    link_col = config.dynamics.marketo_id_column
    mlink = config.marketo.link_fields
    marker = config.marketo.sync_marker
    linked_persons = links.index
    linked_records = _record_key(links["dynamics_type"], links["dynamics_id"]) if not links.empty else pd.Series([], dtype=str)
    outside = outside_filter(config, records)
    out = Lookups()
    named_persons, emails = [], []
    for entity, rows in records.items():
        if rows.empty:
            continue
        ent = config.entity(entity)
        unlinked = rows[~_record_key(entity, rows[ent.id_column]).isin(linked_records).to_numpy()]
        named = pd.to_numeric(_text(_column(unlinked, link_col)), errors="coerce").dropna()
        named_persons.append(named[named % 1 == 0].astype("int64"))
        in_scope = unlinked[~_record_key(entity, unlinked[ent.id_column]).isin(outside).to_numpy()]
        email = _text(_column(in_scope, ent.email_field.dynamics))
        emails.append(email[~_blank(email)])
    # paused pairs whose record is back inside the filter are synced in full: their persons are read too
    back = _paused(links) & linked_records.isin(_record_keys(config, records)).to_numpy() \
        & ~linked_records.isin(outside).to_numpy() if not links.empty else np.zeros(0, dtype=bool)
    named_persons.append(pd.Series(links.index[back], dtype="int64"))
    named = pd.concat(named_persons) if named_persons else pd.Series([], dtype="int64")
    wanted_ids = pd.Index(named).union(pd.Index([int(i) for i in push_ids], dtype="int64"))
    merge_ids, merge_records = merge_lookups(config, links, records, merges)
    wanted_ids = _winners_of(wanted_ids, merges).union(merge_ids)
    dead = deletions if deletions is not None and not deletions.empty else None
    if dead is not None:
        wanted_ids = wanted_ids.difference(pd.Index(dead.loc[dead["deleted_in"].eq("marketo"), "person_id"], dtype="int64"))
    if not marketo_complete:
        out.marketo_ids = sorted(int(i) for i in wanted_ids.difference(pd.Index(persons["id"])))
    if not marketo_complete and emails:
        out.marketo_emails = sorted(set(pd.concat(emails).str.lower()))

    unlinked_p = persons[~persons["id"].isin(linked_persons)]
    if not dynamics_complete and not unlinked_p.empty:
        wants = unlinked_p["id"].isin([int(i) for i in push_ids]).to_numpy() | _flag(_column(unlinked_p, marker.field))
        email = _text(_column(unlinked_p[wants], "email"))
        out.dynamics_emails = sorted(set(email[~_blank(email)].str.lower()))
    if not dynamics_complete and not unlinked_p.empty and mlink.dynamics_id in unlinked_p:
        did = _text(unlinked_p[mlink.dynamics_id])
        kind = _lower(_column(unlinked_p, mlink.dynamics_type))
        for entity in config.entities:
            ent = config.entity(entity)
            mine = did[(kind == entity).to_numpy() & ~_blank(did)]
            have = records.get(entity)
            have_ids = _lower(have[ent.id_column]) if have is not None and not have.empty else pd.Series([], dtype=str)
            missing = mine[~mine.str.lower().isin(have_ids).to_numpy()]
            if dead is not None:
                gone = dead.loc[dead["deleted_in"].eq("dynamics") & dead["dynamics_type"].eq(entity), "dynamics_id"]
                missing = missing[~missing.str.lower().isin(gone.str.lower()).to_numpy()]
            if len(missing):
                out.dynamics_ids[entity] = sorted(set(missing))
    if not dynamics_complete:
        for entity, ids in merge_records.items():
            rows = records.get(entity)
            have = _lower(rows[config.entity(entity).id_column]) if rows is not None and not rows.empty else pd.Series([], dtype=object)
            more = ids[~ids.str.lower().isin(have).to_numpy()]
            if len(more):
                out.dynamics_ids[entity] = sorted(set(out.dynamics_ids.get(entity, [])) | set(more))
    return out


def _record_keys(config: SyncConfig, records: dict[str, pd.DataFrame]) -> pd.Index:
    """``entity:id`` keys of every row in ``records``."""
    parts = [_record_key(entity, rows[config.entity(entity).id_column]) for entity, rows in records.items()
             if not rows.empty and entity in config.entities]
    return pd.Index(pd.concat(parts, ignore_index=True) if parts else [], dtype=object)


def _flag(series: pd.Series) -> np.ndarray:
    return _lower(series).isin(_TRUE).to_numpy(dtype=bool)


# -- decisions -----------------------------------------------------------------------------------------

@dataclass
class ChangedSince:
    """Persons whose pair changed since the last sync, per side (a mapped field differs from its baseline): the
    guard of the ``propagate`` delete policy, which never deletes a record that changed on its own side."""

    marketo: pd.Index = field(default_factory=lambda: pd.Index([], dtype="int64"))
    dynamics: pd.Index = field(default_factory=lambda: pd.Index([], dtype="int64"))


def _frame_of(columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return frame.astype({"person_id": "int64"})


def _merge_frame(parts=()) -> pd.DataFrame:
    parts = [p for p in parts if not p.empty]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({c: pd.Series(dtype=object)
                                                                            for c in MARKETO_MERGE_COLUMNS})
    return frame.astype({"winner_id": "int64", "loser_id": "int64"})


def _moved_frame(parts=()) -> pd.DataFrame:
    parts = [p for p in parts if not p.empty]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({c: pd.Series(dtype="int64")
                                                                            for c in MOVED_COLUMNS})
    return frame.astype("int64")


@dataclass
class IdentityDecisions:
    """What identity decided for one cycle."""

    #: every link after this stage: index person_id; dynamics_type, dynamics_id, method, new, paused (outside the
    #: sync filter: not synced)
    links: pd.DataFrame
    #: person ids whose link was dropped (deleted on a side, or merged away)
    unlinked: list[int]
    #: Dynamics rows to create as Marketo persons: entity_type, dynamics_id, email
    marketo_creates: pd.DataFrame
    #: Marketo persons to create in Dynamics: person_id, entity_type, email
    dynamics_creates: pd.DataFrame
    #: one activity row per decision (links, unlinks, ambiguities, skips, errors)
    activity: pd.DataFrame
    #: flags, deletes and deactivations of the surviving side of deleted pairs (:data:`DELETE_COLUMNS`)
    deletes: pd.DataFrame = field(default_factory=lambda: _frame_of(DELETE_COLUMNS))
    #: the pairs a delete ended (:data:`DELETION_COLUMNS`), recorded so their survivors stay apart
    deletions: pd.DataFrame = field(default_factory=lambda: _frame_of(DELETION_COLUMNS))
    #: kept links whose record left (``paused`` true) or entered (false) the sync filter this cycle
    paused: pd.DataFrame = field(default_factory=lambda: _frame_of(["person_id", "paused"]))
    #: persons the load stage merges in Marketo (:data:`MARKETO_MERGE_COLUMNS`): a merge or a qualified lead in
    #: Dynamics left two persons on one record
    marketo_merges: pd.DataFrame = field(default_factory=lambda: _merge_frame())
    #: pairs a merge handed to another person or record (:data:`MOVED_COLUMNS`): their baselines follow
    moved: pd.DataFrame = field(default_factory=lambda: _moved_frame())
    #: Dynamics records whose Marketo-id column is emptied before the link columns are written (``entity_type,
    #: dynamics_id, person_id``): a merged subordinate hands its person to a master of its own table, and the
    #: column is an alternate key (two rows of a table cannot name one person)
    link_clears: pd.DataFrame = field(default_factory=lambda: _frame_of(["entity_type", "dynamics_id", "person_id"]))

    @property
    def new_links(self) -> pd.DataFrame:
        return self.links[self.links["new"].astype(bool)]


class _Decider:
    """Holds the taken persons and records while the steps of :func:`decide` add links."""

    def __init__(self, config: SyncConfig, links: pd.DataFrame, outside: pd.Index,
                 merges: pd.DataFrame | None = None) -> None:
        self.config = config
        self.links = links
        #: Marketo persons merged away -> the person each survives as
        self.merged_into = merged_into(merges)
        self.moved: list[pd.DataFrame] = []
        self.marketo_merges: list[pd.DataFrame] = []
        self.link_clears = _frame_of(["entity_type", "dynamics_id", "person_id"])
        #: ``entity:id`` keys of the records read that are outside their sync filter
        self.outside = outside
        #: links dropped by a deletion: the record kept on the other side is neither re-matched nor re-created
        self.kept = links.iloc[:0]
        self.new: list[pd.DataFrame] = []
        self.notes: list[pd.DataFrame] = []
        self.deletes = _frame_of(DELETE_COLUMNS)
        self.deletions = _frame_of(DELETION_COLUMNS)
        self.paused = _frame_of(["person_id", "paused"])

    @property
    def taken_persons(self) -> pd.Index:
        return self.links.index

    @property
    def taken_records(self) -> pd.Series:
        return _record_key(self.links["dynamics_type"], self.links["dynamics_id"])

    @property
    def kept_records(self) -> pd.Series:
        return _record_key(self.kept["dynamics_type"], self.kept["dynamics_id"])

    def note(self, frame: pd.DataFrame) -> None:
        if not frame.empty:
            self.notes.append(frame)

    def add(self, person_ids, entity, dynamics_ids, method: str) -> None:
        frame = pd.DataFrame({"dynamics_type": np.asarray(entity, dtype=object) if not isinstance(entity, str) else entity,
                              "dynamics_id": np.asarray(dynamics_ids, dtype=object), "method": method, "new": True,
                              "paused": False},
                             index=pd.Index(np.asarray(person_ids, dtype="int64"), name="person_id"))
        if frame.empty:
            return
        self.links = pd.concat([self.links[~self.links.index.isin(frame.index)], frame])
        self.new.append(frame)

    def hold(self, person_ids, entity, dynamics_ids) -> None:
        """Persons and records a link field ties to a pair that cannot be made (ambiguous, or deleted on the other
        side): nothing is done for them this cycle -- no email match, no create."""
        frame = pd.DataFrame({"dynamics_type": np.asarray(entity, dtype=object) if not isinstance(entity, str) else entity,
                              "dynamics_id": np.asarray(dynamics_ids, dtype=object), "method": "held", "new": False,
                              "paused": False},
                             index=pd.Index(np.asarray(person_ids, dtype="int64"), name="person_id"))
        if not frame.empty:
            self.kept = pd.concat([self.kept, frame])


def decide(config: SyncConfig, links: pd.DataFrame, persons: pd.DataFrame, records: dict[str, pd.DataFrame],
           marketo_deleted=(), dynamics_deleted: dict[str, list[str]] | None = None, *,
           push_ids=(), push_as: str | None = None, deletions: pd.DataFrame | None = None,
           changed: ChangedSince | None = None, note_held: bool = True,
           merges: pd.DataFrame | None = None) -> IdentityDecisions:
    """Decide this cycle's links and creates from frames alone.

    :param links: the state store's links (index person_id; dynamics_type, dynamics_id, method, paused).
    :param persons: Marketo persons (raw API columns): extracted plus looked up.
    :param records: Dynamics rows per entity type (raw API columns): extracted plus looked up.
    :param marketo_deleted: / :param dynamics_deleted: ids deleted this window on each side.
    :param push_ids: persons to sync now (a manual run): they get a Dynamics record when unlinked.
    :param push_as: ``lead`` or ``contact`` for ``push_ids`` (default: the marker's default type).
    :param deletions: the state store's recorded deletions of the persons and records in the frames
        (:data:`DELETION_COLUMNS`): their survivors are held unless ``deletes.recreate``.
    :param changed: the pairs that changed since the last sync (:func:`changed_since`), for ``propagate``.
    :param note_held: log a line for each held survivor read this cycle (not on a full reconcile: they all are).
    :param merges: Marketo persons merged away (``loser_id, winner_id``, chains followed): this window's and those
        the state store remembers for the persons named here. A loser's link moves to its winner or is dropped,
        and a loser id in a Dynamics row's link column stands for its winner.
    """
    persons = _normal_persons(persons)
    records = {e: r for e, r in records.items() if e in config.entities}
    paused = _paused(links)
    links = links[["dynamics_type", "dynamics_id", "method"]].copy() if not links.empty else empty_links()
    links = links.assign(new=False, paused=paused if len(links) else np.zeros(0, dtype=bool),
                         dynamics_id=links["dynamics_id"].astype(str))
    links.index = links.index.astype("int64").rename("person_id")
    dec = _Decider(config, links, outside_filter(config, records), merges)
    m_deleted = pd.Index([int(i) for i in marketo_deleted], dtype="int64")
    d_deleted = pd.Index([f"{e}:{str(i).lower()}" for e, ids in (dynamics_deleted or {}).items() for i in ids])

    unlinked = _drop_deleted(dec, m_deleted, d_deleted, changed or ChangedSince())
    dead_persons, dead_records = _hold_survivors(dec, deletions, persons, records, [int(i) for i in push_ids], note_held)
    unlinked += _follow_marketo_merges(dec)
    live = _unmerged(records)  # merged subordinates are followed by their links only (never matched nor rebuilt)
    _rebuild_from_dynamics(dec, live, m_deleted, dead_persons)
    _rebuild_from_marketo(dec, persons, d_deleted, dead_records)
    unlinked += _hand_over(dec, records)
    marketo_creates = _match_dynamics_records(dec, persons, live)
    default = push_as or config.marketo.sync_marker.default_type
    dynamics_creates = _push_marketo_persons(dec, persons, live, [int(i) for i in push_ids], default)
    _drop_dangling(dec, persons, records)

    new = pd.concat(dec.new) if dec.new else empty_links()
    new = new[new.index.isin(dec.links.index)]
    # a link made and then moved again this cycle (rebuilt, then handed over by a merge) is logged as it ends
    new = new[dec.links["dynamics_id"].reindex(new.index).to_numpy() == new["dynamics_id"].to_numpy()]
    new = new[~new.index.duplicated(keep="last")]
    if not new.empty:
        dec.note(_notes("link", "linked (" + new["method"].str.replace("_", " ") + ")",
                        person_id=new.index.to_numpy(), entity_type=new["dynamics_type"].to_numpy(),
                        dynamics_id=new["dynamics_id"].to_numpy()))
    _filter_states(dec, records)
    activity = pd.concat(dec.notes, ignore_index=True) if dec.notes else activity_frame([])
    return IdentityDecisions(links=dec.links.sort_index(), unlinked=sorted(set(unlinked)), marketo_creates=marketo_creates,
                             dynamics_creates=dynamics_creates, activity=activity, deletes=dec.deletes,
                             deletions=dec.deletions, paused=dec.paused, marketo_merges=_merge_frame(dec.marketo_merges),
                             moved=_moved_frame(dec.moved), link_clears=dec.link_clears)


def _unmerged(records: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """``records`` without the subordinates of Dataverse merges (``merged`` true)."""
    return {e: (r[~_as_boolean(_column(r, MERGED)).fillna(False).to_numpy(dtype=bool)] if MERGED in r else r)
            for e, r in records.items()}


def _policies(config: SyncConfig, attr: str) -> dict:
    return {e: getattr(ent.deletes, attr) for e, ent in config.entities.items()}


def _drop_deleted(dec: _Decider, m_deleted: pd.Index, d_deleted: pd.Index, changed: ChangedSince) -> list[int]:
    """Links whose person or record was deleted this window: dropped, and the delete policy applied to the other
    side (flag, delete or deactivate it, or leave it); a paused pair (outside the sync filter) is only unlinked."""
    links = dec.links
    keys = dec.taken_records
    gone_m = links.index.isin(m_deleted)
    gone_d = keys.isin(d_deleted).to_numpy()
    gone = gone_m | gone_d
    dec.kept = links[gone]
    dec.links = links[~gone]
    if not gone.any():
        return []
    hit = links[gone]
    cfg = dec.config
    in_m, both = gone_m[gone], gone_m[gone] & gone_d[gone]
    entity = hit["dynamics_type"].astype(str)
    policy = entity.map({e: p.value for e, p in _policies(cfg, "policy").items()}).fillna(DeletePolicy.UNLINK.value)
    paused = _paused(hit) | keys[gone].isin(dec.outside).to_numpy()
    other_changed = np.where(in_m, hit.index.isin(changed.dynamics), hit.index.isin(changed.marketo))
    dyn_action = entity.map({e: a.value for e, a in _policies(cfg, "dynamics_action").items()}).fillna("delete")
    action = np.select([both, paused, policy.eq("unlink").to_numpy(), policy.eq("flag").to_numpy(), other_changed],
                       ["gone", "paused", "unlink", "flag", "kept"],
                       default=np.where(in_m, dyn_action.to_numpy(dtype=object), "delete")).astype(object)

    who = pd.Series(np.where(in_m, "person deleted in Marketo", entity + " deleted in Dynamics"), index=hit.index)
    other = pd.Series(np.where(in_m, "the " + entity, "the Marketo person"), index=hit.index)
    where = pd.Series(np.where(in_m, "Dynamics", "Marketo"), index=hit.index)
    flag = pd.Series(np.where(in_m, str(cfg.dynamics.deleted_flag_column), str(cfg.marketo.deleted_flag_field)),
                     index=hit.index)
    texts = {
        "gone": pd.Series("deleted in Marketo and in Dynamics; link dropped", index=hit.index),
        "paused": who + "; " + other + " is kept: the pair was outside the sync filter, so the delete policy is not "
                                       "applied",
        "unlink": who + "; " + other + " is kept (deletes: unlink)",
        "flag": who + "; " + other + " is kept and flagged (" + flag + " = true) (deletes: flag)",
        "kept": who + ", but " + other + " changed in " + where + " since the last sync: not deleted, kept unlinked "
                                                                  "(deletes: propagate)",
        "delete": who + "; deleting " + other + " in " + where + " (deletes: propagate)",
        "deactivate": who + "; deactivating " + other + " in Dynamics (deletes: propagate, dynamics_action: "
                                                        "deactivate)",
    }
    detail = pd.Series(None, index=hit.index, dtype=object)
    for name, text in texts.items():
        detail = detail.where(action != name, text)
    verbs = {"gone": "unlink", "paused": "unlink", "unlink": "unlink", "flag": "flag", "kept": "skip",
             "delete": "delete", "deactivate": "delete"}
    verb = pd.Series(action, index=hit.index).map(verbs)
    for name in dict.fromkeys(verb):
        mine = (verb == name).to_numpy()
        dec.note(_notes(name, detail[mine].to_numpy(), person_id=hit.index[mine].to_numpy(),
                        entity_type=entity[mine].to_numpy(), dynamics_id=hit["dynamics_id"][mine].to_numpy()))
    work = np.isin(action, ["flag", "delete", "deactivate"])
    dec.deletes = pd.DataFrame({"target": np.where(in_m, "dynamics", "marketo")[work], "action": action[work],
                                "person_id": hit.index[work].astype("int64"), "entity_type": entity[work].to_numpy(),
                                "dynamics_id": hit["dynamics_id"][work].to_numpy()}, columns=DELETE_COLUMNS)
    ended = action != "gone"
    dec.deletions = pd.DataFrame({
        "deleted_in": np.where(in_m, "marketo", "dynamics")[ended], "person_id": hit.index[ended].astype("int64"),
        "dynamics_type": entity[ended].to_numpy(), "dynamics_id": hit["dynamics_id"][ended].str.lower().to_numpy(),
        "policy": policy[ended].to_numpy(), "action": np.where(action == "paused", "unlink", action)[ended]},
        columns=DELETION_COLUMNS)
    return sorted(int(i) for i in hit.index)


def _hold_survivors(dec: _Decider, deletions: pd.DataFrame | None, persons: pd.DataFrame,
                    records: dict[str, pd.DataFrame], push_ids: list[int], note: bool) -> tuple[pd.Index, pd.Index]:
    """Survivors of earlier deletions (the record of a deleted person, the person of a deleted record) are held:
    not re-linked and not used to create the deleted side again, unless the entity type's ``deletes.recreate``
    says so, a manual run names the person, or the survivor is linked again already.

    :returns: the deleted person ids and deleted ``entity:id`` record keys (a link field naming one is stale).
    """
    if deletions is None or deletions.empty:
        return pd.Index([], dtype="int64"), pd.Index([], dtype=object)
    t = deletions.reset_index(drop=True)
    pid = t["person_id"].astype("int64")
    keys = _record_key(t["dynamics_type"], t["dynamics_id"])
    in_m = t["deleted_in"].eq("marketo").to_numpy()
    dead_persons = pd.Index(pid[in_m].unique(), dtype="int64")
    dead_records = pd.Index(keys[~in_m].unique(), dtype=object)
    recreate = t["dynamics_type"].map(_policies(dec.config, "recreate")).fillna(False).astype(bool).to_numpy()
    again = np.where(in_m, keys.isin(dec.taken_records).to_numpy(), pid.isin(dec.taken_persons).to_numpy())
    held = t[~recreate & ~again & ~(~in_m & pid.isin(push_ids).to_numpy())]
    dec.hold(held["person_id"], held["dynamics_type"], held["dynamics_id"])
    if note and not held.empty:
        h_in_m = held["deleted_in"].eq("marketo").to_numpy()
        record_read = _record_key(held["dynamics_type"], held["dynamics_id"]).isin(_record_keys(dec.config, records))
        read = np.where(h_in_m, record_read, held["person_id"].isin(persons["id"]))
        shown = held[read]
        s_in_m = h_in_m[read]
        entity = shown["dynamics_type"].astype(str)
        detail = np.where(s_in_m, "not synced: its Marketo person " + shown["person_id"].astype(str) + " was deleted; "
                          "the " + entity + " is not linked again nor used to create the person again "
                          "(deletes.recreate is false)",
                          "not synced: its Dynamics " + entity + " " + shown["dynamics_id"].astype(str) + " was deleted; "
                          "the person is not linked again nor created in Dynamics again (deletes.recreate is false; a "
                          "manual run naming the person pushes it)")
        dec.note(_notes("skip", detail, person_id=shown["person_id"].to_numpy(), entity_type=entity.to_numpy(),
                        dynamics_id=shown["dynamics_id"].to_numpy()))
    return dead_persons, dead_records


def _rebuild_from_dynamics(dec: _Decider, records: dict[str, pd.DataFrame], m_deleted: pd.Index,
                           dead: pd.Index) -> None:
    """Unlinked Dynamics rows that carry a Marketo person id (state store lost, or set by hand); an id of a person
    deleted in an earlier cycle (``dead``) is stale and ignored."""
    column = dec.config.dynamics.marketo_id_column
    parts = []
    for entity, rows in records.items():
        if rows.empty or column not in rows:
            continue
        idc = dec.config.entity(entity).id_column
        carrying = rows[~_blank(rows[column])]
        carrying = carrying[~_record_key(entity, carrying[idc]).isin(dec.taken_records).to_numpy()]
        parts.append(pd.DataFrame({"entity": entity, "dynamics_id": carrying[idc].astype(str).to_numpy(),
                                   "named": _text(carrying[column]).to_numpy()}))
    if not parts:
        return
    cand = pd.concat(parts, ignore_index=True).drop_duplicates(["entity", "dynamics_id"])
    number = pd.to_numeric(cand["named"], errors="coerce")
    bad = (number.isna() | (number % 1 != 0)).to_numpy()
    dec.note(_notes("error", column + " holds " + cand["named"][bad].map(repr).astype(str) + ", which is not a Marketo person id; not linked",
                    entity_type=cand["entity"][bad].to_numpy(), dynamics_id=cand["dynamics_id"][bad].to_numpy()))
    cand = cand[~bad].assign(person_id=number[~bad].astype("int64"))
    cand = _repoint_merged(dec, cand)  # a person merged away stands for its winner
    cand = cand[~cand["person_id"].isin(dead).to_numpy()]
    gone = cand["person_id"].isin(m_deleted).to_numpy()  # the person was deleted in Marketo this window
    dec.hold(cand["person_id"][gone], cand["entity"][gone], cand["dynamics_id"][gone])
    cand = cand[~gone]
    taken = cand["person_id"].isin(dec.taken_persons).to_numpy() | cand["person_id"].duplicated(keep=False).to_numpy()
    dec.note(_notes("ambiguous", column + " names person " + cand["person_id"][taken].astype(str)
                    + ", who is already linked to another record; nothing done (fix the column or merge the records)",
                    person_id=cand["person_id"][taken].to_numpy(), entity_type=cand["entity"][taken].to_numpy(),
                    dynamics_id=cand["dynamics_id"][taken].to_numpy()))
    dec.hold(cand["person_id"][taken], cand["entity"][taken], cand["dynamics_id"][taken])
    ok = cand[~taken]
    dec.add(ok["person_id"], ok["entity"], ok["dynamics_id"], "marketo_id_column")


def _rebuild_from_marketo(dec: _Decider, persons: pd.DataFrame, d_deleted: pd.Index, dead: pd.Index) -> None:
    """Unlinked persons whose Marketo link fields name a Dynamics record; a record deleted in an earlier cycle
    (``dead``) is stale and ignored."""
    link = dec.config.marketo.link_fields
    if persons.empty or link.dynamics_id not in persons:
        return
    unl = persons[~persons["id"].isin(dec.taken_persons)]
    unl = unl[~_blank(unl[link.dynamics_id])]
    if unl.empty:
        return
    did = _text(unl[link.dynamics_id])
    kind = _lower(_column(unl, link.dynamics_type)).fillna("")
    bad = ~kind.isin([e for e in ENTITY_TYPES if e in dec.config.entities]).to_numpy()
    dec.note(_notes("error", link.dynamics_type + " is " + kind[bad].map(repr).astype(str) + ", expected lead or contact; not linked",
                    person_id=unl["id"][bad].to_numpy()))
    unl, did, kind = unl[~bad], did[~bad], kind[~bad]
    key = _record_key(kind, did)
    stale = key.isin(dead).to_numpy()
    unl, did, kind, key = unl[~stale], did[~stale], kind[~stale], key[~stale]
    fresh = ~key.isin(d_deleted).to_numpy()  # a record deleted this window: nothing to link to
    dec.hold(unl["id"][~fresh], kind[~fresh], did[~fresh])
    unl, did, kind, key = unl[fresh], did[fresh], kind[fresh], key[fresh]
    held = key.isin(dec.kept_records).to_numpy()
    taken = key.isin(dec.taken_records).to_numpy() | held | key.duplicated(keep=False).to_numpy()
    dec.note(_notes("ambiguous", link.dynamics_id + " names a " + kind[taken] + " that is linked to another person; nothing done",
                    person_id=unl["id"][taken].to_numpy(), entity_type=kind[taken].to_numpy(),
                    dynamics_id=did[taken].to_numpy()))
    dec.hold(unl["id"][taken], kind[taken], did[taken])
    dec.add(unl["id"][~taken], kind[~taken], did[~taken], "dynamics_id_field")


def _match_dynamics_records(dec: _Decider, persons: pd.DataFrame, records: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Unlinked Dynamics rows inside the sync filter: link by email to one Marketo person, or want the person
    created."""
    parts = []
    for entity, rows in records.items():
        if rows.empty:
            continue
        ent = dec.config.entity(entity)
        key = _record_key(entity, rows[ent.id_column])
        # in the sync filter, not linked, not held
        active = rows[~(key.isin(dec.outside) | key.isin(dec.taken_records) | key.isin(dec.kept_records)).to_numpy()]
        parts.append(pd.DataFrame({"entity": entity, "dynamics_id": active[ent.id_column].astype(str).to_numpy(),
                                   "email": _text(_column(active, ent.email_field.dynamics)).to_numpy()}))
    if not parts:
        return pd.DataFrame(columns=MARKETO_CREATE_COLUMNS)
    cand = pd.concat(parts, ignore_index=True).drop_duplicates(["entity", "dynamics_id"])
    no_email = _blank(cand["email"])
    blanks = cand[no_email]
    email_cols = {e: dec.config.entity(e).email_field.dynamics for e in records}
    dec.note(_notes("skip", "unlinked " + blanks["entity"] + " has no email (" + blanks["entity"].map(email_cols).astype(str)
                    + "); cannot match or create a Marketo person",
                    entity_type=blanks["entity"].to_numpy(), dynamics_id=blanks["dynamics_id"].to_numpy()))
    cand = cand[~no_email].assign(key=lambda f: f["email"].str.lower())
    # One Marketo person per email: a contact takes precedence over a lead with the same email.
    has_contact = cand["key"].isin(cand.loc[cand["entity"] == "contact", "key"])
    in_pool = (cand["entity"].eq("contact") | ~has_contact).to_numpy()
    pool, others = cand[in_pool], cand[~in_pool]
    size = pool.groupby("key")["key"].transform("size")
    crowded = pool[(size > 1).to_numpy()]
    dec.note(_notes("ambiguous", size[size > 1].astype(str) + " unlinked Dynamics " + crowded["entity"] + "s share this email; none is linked",
                    entity_type=crowded["entity"].to_numpy(), dynamics_id=crowded["dynamics_id"].to_numpy(),
                    email=crowded["email"].to_numpy()))
    chosen = pool[(size == 1).to_numpy()]
    winner = chosen.set_index("key")
    lost = others[others["key"].isin(winner.index)]
    dec.note(_notes("skip", "the " + lost["key"].map(winner["entity"]).astype(str) + " " + lost["key"].map(winner["dynamics_id"]).astype(str)
                    + " with the same email is linked instead",
                    entity_type=lost["entity"].to_numpy(), dynamics_id=lost["dynamics_id"].to_numpy(),
                    email=lost["email"].to_numpy()))

    p_key = _lower(_column(persons, "email"))
    p = pd.DataFrame({"id": persons["id"].to_numpy(), "key": p_key.to_numpy()}).dropna(subset=["key"])
    p = p[p["key"] != ""]
    count = p["key"].value_counts()
    n = chosen["key"].map(count).fillna(0).astype(int).to_numpy()
    creates = chosen[n == 0]
    many = chosen[n > 1]
    if not many.empty:
        ids = p[p["key"].isin(many["key"])].groupby("key")["id"].agg(lambda s: ", ".join(map(str, sorted(s))))
        dec.note(_notes("ambiguous", many["key"].map(count).astype(str) + " Marketo persons have this email (ids "
                        + many["key"].map(ids).astype(str) + "); none is linked",
                        entity_type=many["entity"].to_numpy(), dynamics_id=many["dynamics_id"].to_numpy(),
                        email=many["email"].to_numpy()))
    one = chosen[n == 1]
    pid = one["key"].map(p.drop_duplicates("key").set_index("key")["id"]).astype("int64")
    one = one.assign(person_id=pid.to_numpy())
    qualified = _follows_qualified_lead(dec, one, records)
    relink = one[qualified]
    if not relink.empty:
        previous = dec.links["dynamics_id"].reindex(relink["person_id"]).to_numpy()
        dec.note(_notes("link", "lead " + pd.Series(previous, dtype=object).astype(str)
                        + " was qualified: the person now follows the contact created from it",
                        person_id=relink["person_id"].to_numpy(), entity_type=relink["entity"].to_numpy(),
                        dynamics_id=relink["dynamics_id"].to_numpy(), email=relink["email"].to_numpy()))
        dec.add(relink["person_id"], relink["entity"], relink["dynamics_id"], "lead_qualified")
    one = one[~qualified]
    taken = (one["person_id"].isin(dec.taken_persons).to_numpy() | one["person_id"].isin(dec.kept.index).to_numpy()
             | one["person_id"].duplicated().to_numpy())
    busy = one[taken]
    dec.note(_notes("ambiguous", "the Marketo person with this email is already linked to another record; nothing done",
                    person_id=busy["person_id"].to_numpy(), entity_type=busy["entity"].to_numpy(),
                    dynamics_id=busy["dynamics_id"].to_numpy(), email=busy["email"].to_numpy()))
    ok = one[~taken]
    dec.add(ok["person_id"], ok["entity"], ok["dynamics_id"], "email")
    return pd.DataFrame({"entity_type": creates["entity"].to_numpy(), "dynamics_id": creates["dynamics_id"].to_numpy(),
                         "email": creates["email"].to_numpy()}, columns=MARKETO_CREATE_COLUMNS)


def _follows_qualified_lead(dec: _Decider, matches: pd.DataFrame, records: dict[str, pd.DataFrame]) -> np.ndarray:
    """Contacts whose matched person is linked to a lead now qualified (lead ``statecode`` 1)."""
    if matches.empty or "lead" not in records or records["lead"].empty or "statecode" not in records["lead"]:
        return np.zeros(len(matches), dtype=bool)
    leads = records["lead"]
    idc = dec.config.entity("lead").id_column
    state = pd.Series(pd.to_numeric(leads["statecode"], errors="coerce").to_numpy(),
                      index=leads[idc].astype(str).str.lower().to_numpy())
    state = state[~state.index.duplicated(keep="last")]
    current = dec.links.reindex(matches["person_id"].to_numpy())
    on_lead = current["dynamics_type"].eq("lead").to_numpy()
    lead_state = current["dynamics_id"].astype(str).str.lower().map(state).to_numpy()
    return matches["entity"].eq("contact").to_numpy() & on_lead & (lead_state == 1)


def _push_marketo_persons(dec: _Decider, persons: pd.DataFrame, records: dict[str, pd.DataFrame],
                          push_ids: list[int], default: str) -> pd.DataFrame:
    """Unlinked persons marked for sync (or named by a manual run) -> an existing or a new Dynamics record."""
    marker = dec.config.marketo.sync_marker
    empty = pd.DataFrame(columns=DYNAMICS_CREATE_COLUMNS)
    if persons.empty:
        return empty
    unl = persons[~persons["id"].isin(dec.taken_persons) & ~persons["id"].isin(dec.kept.index)]
    pushed = unl["id"].isin(push_ids).to_numpy()
    want = unl[pushed | _flag(_column(unl, marker.field))]
    if want.empty:
        return empty
    asked = _lower(_column(want, marker.as_field)) if marker.as_field else pd.Series(None, index=want.index, dtype=object)
    kind = asked.where(asked.isin(ENTITY_TYPES), marker.default_type)  # empty or unknown: the marker's default
    kind = kind.where(~want["id"].isin(push_ids), default)  # a manual run's persons: as the run asks
    unknown = ~kind.isin(list(dec.config.entities)).to_numpy()
    dec.note(_notes("error", "cannot sync as " + kind[unknown].map(repr).astype(str) + ": that entity type is not configured",
                    person_id=want["id"][unknown].to_numpy()))
    want, kind = want[~unknown], kind[~unknown]
    email = _text(_column(want, "email"))
    no_email = _blank(email)
    dec.note(_notes("skip", "marked for sync but has no email; cannot look up or create a Dynamics record",
                    person_id=want["id"][no_email].to_numpy()))
    left = pd.DataFrame({"person_id": want["id"][~no_email].to_numpy(), "kind": kind[~no_email].to_numpy(),
                         "email": email[~no_email].to_numpy()})
    left["key"] = left["email"].str.lower()
    for entity in ("contact", "lead"):  # DESIGN §3: an existing contact, then lead
        rows = records.get(entity)
        if rows is None or rows.empty or left.empty:
            continue
        ent = dec.config.entity(entity)
        key = _record_key(entity, rows[ent.id_column])
        free = rows[~(key.isin(dec.taken_records) | key.isin(dec.kept_records) | key.isin(dec.outside)).to_numpy()]
        keys = _lower(_column(free, ent.email_field.dynamics))
        hits = pd.DataFrame({"key": keys.to_numpy(), "dynamics_id": free[ent.id_column].astype(str).to_numpy()}).dropna()
        count = hits["key"].value_counts()
        n = left["key"].map(count).fillna(0).astype(int).to_numpy()
        many = left[n > 1]
        dec.note(_notes("ambiguous", many["key"].map(count).astype(str) + f" Dynamics {entity}s have this email; none is linked",
                        person_id=many["person_id"].to_numpy(), email=many["email"].to_numpy(), entity_type=entity))
        one = left[n == 1].assign(dynamics_id=lambda f: f["key"].map(hits.drop_duplicates("key").set_index("key")["dynamics_id"]))
        dup = one["dynamics_id"].duplicated(keep=False).to_numpy()
        dec.note(_notes("ambiguous", f"another person with this email is linked to the same {entity}; nothing done",
                        person_id=one["person_id"][dup].to_numpy(), email=one["email"][dup].to_numpy(),
                        entity_type=entity, dynamics_id=one["dynamics_id"][dup].to_numpy()))
        ok = one[~dup]
        dec.add(ok["person_id"], entity, ok["dynamics_id"], "email")
        left = left[n == 0]
    left = _not_over_excluded(dec, left, records)
    return pd.DataFrame({"person_id": left["person_id"].astype("int64").to_numpy(), "entity_type": left["kind"].to_numpy(),
                         "email": left["email"].to_numpy()}, columns=DYNAMICS_CREATE_COLUMNS)


def _not_over_excluded(dec: _Decider, left: pd.DataFrame, records: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Persons about to get a new Dynamics record whose email already has one that the sync leaves alone (outside
    the sync filter, or the survivor of a deleted pair): nothing is created (it would be a duplicate), logged."""
    parts = []
    for entity, rows in records.items():
        if rows.empty or left.empty:
            continue
        ent = dec.config.entity(entity)
        key = _record_key(entity, rows[ent.id_column])
        outside, held = key.isin(dec.outside).to_numpy(), key.isin(dec.kept_records).to_numpy()
        mine = (outside | held) & ~key.isin(dec.taken_records).to_numpy()
        parts.append(pd.DataFrame({
            "key": _lower(_column(rows, ent.email_field.dynamics))[mine].to_numpy(), "entity": entity,
            "dynamics_id": rows[ent.id_column][mine].astype(str).to_numpy(),
            "why": np.where(outside[mine], "is outside the sync filter",
                            "is held (its partner was deleted, or a link field naming it is ambiguous)")}))
    if not parts:
        return left
    blockers = pd.concat(parts, ignore_index=True).dropna(subset=["key"])
    blockers = blockers.sort_values(["key", "entity", "dynamics_id"]).drop_duplicates("key")
    blockers = blockers.set_index("key")
    blocked = left["key"].isin(blockers.index).to_numpy()
    hit, by = left[blocked], blockers.reindex(left["key"][blocked])
    dec.note(_notes("skip", "marked for sync, but the Dynamics " + by["entity"].to_numpy() + " with this email "
                    + by["why"].to_numpy() + ": not linked, and no new record is created",
                    person_id=hit["person_id"].to_numpy(), email=hit["email"].to_numpy(),
                    entity_type=by["entity"].to_numpy(), dynamics_id=by["dynamics_id"].to_numpy()))
    return left[~blocked]


def _drop_dangling(dec: _Decider, persons: pd.DataFrame, records: dict[str, pd.DataFrame]) -> None:
    """New links whose record could not be read on one side (a stale link field) are not made."""
    if not dec.new:
        return
    new = pd.concat(dec.new)
    new = new[new.index.isin(dec.links.index)]
    have_person = new.index.isin(persons["id"])
    have_record = np.zeros(len(new), dtype=bool)
    for entity, rows in records.items():
        if rows.empty:
            continue
        ids = rows[dec.config.entity(entity).id_column].astype(str).str.lower()
        have_record |= new["dynamics_type"].eq(entity).to_numpy() & new["dynamics_id"].str.lower().isin(ids).to_numpy()
    bad = ~(have_person & have_record)
    if not bad.any():
        return
    gone = new[bad]
    missing = np.where(have_person[bad], "Dynamics " + gone["dynamics_type"], "Marketo person")
    dec.note(_notes("skip", "link field (" + gone["method"].str.replace("_", " ") + ") names a " + missing
                    + " that does not exist; not linked",
                    person_id=gone.index.to_numpy(), entity_type=gone["dynamics_type"].to_numpy(),
                    dynamics_id=gone["dynamics_id"].to_numpy()))
    dec.links = dec.links.drop(index=gone.index)
    dec.new = [new[~bad]]


def _filter_states(dec: _Decider, records: dict[str, pd.DataFrame]) -> None:
    """Pause the links whose record is read outside its sync filter, resume those read inside it again: one line
    each when the state changes (never again while it stays), and the changes for the state store."""
    links = dec.links
    if links.empty:
        return
    keys = dec.taken_records
    seen = keys.isin(_record_keys(dec.config, records)).to_numpy()
    out_now = keys.isin(dec.outside).to_numpy()
    was = _paused(links)
    new = links["new"].fillna(False).astype(bool).to_numpy()
    paused = np.where(seen, out_now, was)
    left, back, fresh = seen & out_now & ~was & ~new, seen & ~out_now & was & ~new, new & out_now
    entity = links["dynamics_type"].astype(str)
    describe = entity.map({e: ent.filter.describe() for e, ent in dec.config.entities.items()}).astype(str)
    for mask, action, text in (
            (left, "skip", "the " + entity + " left the sync filter (" + describe + "): not synced while it is outside "
                           "it; the link is kept"),
            (back, "link", "the " + entity + " is inside the sync filter again: synced in full this cycle"),
            (fresh, "skip", "the " + entity + " is outside the sync filter (" + describe + "): linked, but not synced "
                            "until it enters it")):
        dec.note(_notes(action, text[mask].to_numpy(), person_id=links.index[mask].to_numpy(),
                        entity_type=entity[mask].to_numpy(), dynamics_id=links["dynamics_id"][mask].to_numpy()))
    dec.links = links.assign(paused=paused)
    changed = left | back
    dec.paused = pd.DataFrame({"person_id": links.index[changed].astype("int64"), "paused": paused[changed]})


# -- merges (DESIGN §3): a link follows the record that survives a merge on either side -------------------------

def _winners_of(ids: pd.Index, merges: pd.DataFrame | None) -> pd.Index:
    """``ids`` with each Marketo person merged away replaced by the person it survives as."""
    if merges is None or merges.empty or ids.empty:
        return ids
    into = merged_into(merges)
    return pd.Index(pd.Series(ids, dtype="int64").map(into).fillna(pd.Series(ids, dtype="int64")).astype("int64")
                    .unique(), dtype="int64")


def merged_into(merges: pd.DataFrame | None) -> pd.Series:
    """Loser id -> winner id of Marketo merges (``loser_id, winner_id`` rows, chains already followed)."""
    if merges is None or merges.empty:
        return pd.Series([], dtype="int64", index=pd.Index([], dtype="int64"))
    m = merges.drop_duplicates("loser_id", keep="last")
    return pd.Series(m["winner_id"].astype("int64").to_numpy(), index=pd.Index(m["loser_id"].astype("int64")))


def handover_candidates(config: SyncConfig, links: pd.DataFrame, records: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Linked Dynamics records whose person must follow another record (:data:`HANDOVER_COLUMNS`):

    - ``dynamics_merge``: the subordinate of a Dataverse ``Merge`` (``merged`` true): its master (a master merged
      in turn is followed to the record that survives);
    - ``lead_qualified``: a lead qualified (``statecode`` 1) into a contact (``_parentcontactid_value``: the contact
      created from it, or an existing one).
    """
    parts = []
    if links.empty:
        return pd.DataFrame(columns=HANDOVER_COLUMNS)
    owner = pd.Series(links.index.to_numpy(dtype="int64"),
                      index=_record_key(links["dynamics_type"], links["dynamics_id"]).to_numpy())
    owner = owner[~owner.index.duplicated()]
    for entity, rows in records.items():
        if rows.empty or entity not in config.entities:
            continue
        rows = rows.drop_duplicates(config.entity(entity).id_column, keep="last")
        ids = rows[config.entity(entity).id_column].astype(str)
        person = owner.reindex(_record_key(entity, ids).to_numpy()).to_numpy()
        linked = ~pd.isna(person)
        merged = _as_boolean(_column(rows, MERGED)).fillna(False).to_numpy(dtype=bool) & ~_blank(_column(rows, MASTER_ID))
        master = _final_masters(ids, _text(_column(rows, MASTER_ID)), merged)
        mine = linked & merged
        parts.append(pd.DataFrame({"person_id": person[mine], "from_type": entity, "from_id": ids[mine].to_numpy(),
                                   "to_type": entity, "to_id": master[mine], "reason": "dynamics_merge"}))
        if entity == "lead" and "contact" in config.entities:
            state = pd.to_numeric(_column(rows, "statecode"), errors="coerce").to_numpy()
            contact = _text(_column(rows, QUALIFIED_CONTACT))
            mine = linked & ~merged & (state == 1) & ~_blank(contact)
            parts.append(pd.DataFrame({"person_id": person[mine], "from_type": entity, "from_id": ids[mine].to_numpy(),
                                       "to_type": "contact", "to_id": contact[mine].to_numpy(),
                                       "reason": "lead_qualified"}))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=HANDOVER_COLUMNS)
    return out.astype({"person_id": "int64"}) if not out.empty else pd.DataFrame(columns=HANDOVER_COLUMNS)


def _final_masters(ids: pd.Series, masters: pd.Series, merged: np.ndarray) -> np.ndarray:
    """Each merged row's master, followed while that master was merged in turn (among the rows read)."""
    if not merged.any():
        return masters.to_numpy(dtype=object)
    step = pd.Series(masters[merged].str.lower().to_numpy(), index=ids[merged].str.lower().to_numpy())
    step = step[~step.index.duplicated(keep="last")]
    spelled = pd.Series(masters[merged].to_numpy(), index=masters[merged].str.lower().to_numpy())
    spelled = spelled[~spelled.index.duplicated()]
    final = pd.Series(masters.str.lower().to_numpy(dtype=object), index=ids.index, dtype=object)
    for _ in range(len(step)):  # one hop per round: a chain is never longer than the merged rows
        nxt = final.map(step)
        hop = nxt.notna() & nxt.ne(final)
        if not hop.any():
            break
        final = final.where(~hop, nxt)
    spelt = final.map(spelled)
    return spelt.where(spelt.notna(), masters).to_numpy(dtype=object)


def merge_lookups(config: SyncConfig, links: pd.DataFrame, records: dict[str, pd.DataFrame],
                  merges: pd.DataFrame | None) -> tuple[pd.Index, dict[str, pd.Series]]:
    """What merges need read besides the extracts: the persons that take a link over (a Marketo merge's winner, the
    person of a merged or qualified Dynamics record), and the records links move to or from (a loser's record, a
    merge's master, the contact a lead was qualified into).

    :returns: (person ids, per entity type the Dynamics ids).
    """
    pids, dids = [], {}
    if merges is not None and not merges.empty and not links.empty:
        hit = merges[merges["loser_id"].isin(links.index)]
        pids.append(hit["winner_id"].astype("int64"))
        moved = links.loc[hit["loser_id"].astype("int64").unique()]
        for entity, part in moved.groupby("dynamics_type"):
            dids.setdefault(str(entity), []).append(part["dynamics_id"].astype(str))
    h = handover_candidates(config, links, records)
    if not h.empty:
        pids.append(h["person_id"].astype("int64"))
        for entity, part in h.groupby("to_type"):
            dids.setdefault(str(entity), []).append(part["to_id"].astype(str))
    ids = pd.Index(pd.concat(pids, ignore_index=True).unique(), dtype="int64") if pids else pd.Index([], dtype="int64")
    return ids, {e: pd.concat(v, ignore_index=True).drop_duplicates() for e, v in dids.items()}


def _follow_marketo_merges(dec: _Decider) -> list[int]:
    """Persons merged away in Marketo whose link is still held: a winner without a link takes one over (a contact
    before a lead, the system of record), with both link fields rewritten to it and the pair's baselines; a
    winner that has its own keeps it, and the loser's link is dropped (its record is held: not matched again nor
    used to create the person again), with a line saying a Dynamics merge of the two records may be wanted.

    :returns: the losers whose link was dropped or moved (removed from the state store).
    """
    links, into = dec.links, dec.merged_into
    hit = links[links.index.isin(into.index)]
    if hit.empty:
        return []
    m = pd.DataFrame({"loser": hit.index.to_numpy(dtype="int64"), "winner": into.reindex(hit.index).to_numpy(dtype="int64"),
                      "entity": hit["dynamics_type"].astype(str).to_numpy(), "did": hit["dynamics_id"].astype(str).to_numpy(),
                      "paused": _paused(hit), "rank": hit["dynamics_type"].ne("contact").to_numpy()})
    m = m.sort_values(["winner", "rank"], kind="stable")
    own = links.reindex(m["winner"].to_numpy())  # the winner's own link, if any
    free = own["dynamics_id"].isna().to_numpy()
    mover = ~m["winner"].duplicated().to_numpy() & free
    moved = m[mover]
    # what each winner ends up with: its own link, or the one it takes over
    took = moved.set_index("winner")
    kept_type = np.where(free, m["winner"].map(took["entity"]).to_numpy(dtype=object), own["dynamics_type"].to_numpy(dtype=object))
    kept_id = np.where(free, m["winner"].map(took["did"]).to_numpy(dtype=object), own["dynamics_id"].to_numpy(dtype=object))
    dec.links = links.drop(index=m["loser"].to_numpy())
    dec.add(moved["winner"], moved["entity"].to_numpy(), moved["did"].to_numpy(), "marketo_merge")
    if moved["paused"].any():  # a pair outside the sync filter stays paused when its person changes
        dec.links.loc[moved.loc[moved["paused"], "winner"].to_numpy(), "paused"] = True
    dec.moved.append(pd.DataFrame({"from_person": moved["loser"].to_numpy(), "to_person": moved["winner"].to_numpy()}))
    lost = m[~mover]
    dec.hold(lost["loser"], lost["entity"].to_numpy(), lost["did"].to_numpy())
    who = "merged in Marketo: person " + m["loser"].astype(str) + " into " + m["winner"].astype(str) + "; "
    text = np.where(mover, who + "link moved: the " + m["entity"] + " " + m["did"] + " now follows person "
                    + m["winner"].astype(str),
                    who + "person " + m["winner"].astype(str) + " keeps its link to the " + kept_type.astype(str)
                    + " " + kept_id.astype(str) + "; the link of person " + m["loser"].astype(str)
                    + " to the " + m["entity"] + " " + m["did"] + " is dropped (a Dynamics merge of those two records "
                    "may be wanted)")
    dec.note(_notes("merge", text, person_id=m["winner"].to_numpy(), entity_type=m["entity"].to_numpy(),
                    dynamics_id=m["did"].to_numpy()))
    return sorted(int(i) for i in m["loser"])


def _hand_over(dec: _Decider, records: dict[str, pd.DataFrame]) -> list[int]:
    """Persons of merged and qualified Dynamics records (:func:`handover_candidates`) follow the surviving record: a
    record without a person takes this one over (its link fields and the baselines follow); when it already has
    one, the two persons are merged in Marketo (the surviving record's person wins; the load stage calls Merge
    Leads) and the other link is dropped. A record that could not be read is left as it is (logged).

    :returns: the persons whose link was dropped (merged away in Marketo by the load stage).
    """
    h = handover_candidates(dec.config, dec.links, records)
    if h.empty:
        return []
    h = h.drop_duplicates("person_id").reset_index(drop=True)
    to_key = _record_key(h["to_type"], h["to_id"])
    read = to_key.isin(_record_keys(dec.config, records)).to_numpy()
    gone = h[~read]
    dec.note(_notes("skip", np.where(gone["reason"].eq("dynamics_merge"),
                                     "merged in Dynamics into the " + gone["to_type"] + " " + gone["to_id"],
                                     "qualified into the contact " + gone["to_id"])
                    + ", which could not be read; the link stays as it is",
                    person_id=gone["person_id"].to_numpy(), entity_type=gone["from_type"].to_numpy(),
                    dynamics_id=gone["from_id"].to_numpy()))
    h, to_key = h[read].reset_index(drop=True), to_key[read].reset_index(drop=True)
    if h.empty:
        return []
    owner = pd.Series(dec.links.index.to_numpy(dtype="int64"), index=dec.taken_records.to_numpy())
    owner = owner[~owner.index.duplicated()]
    has = pd.Series(owner.reindex(to_key.to_numpy()).to_numpy(), index=h.index)
    # a record without a person: the first handed over takes it, the others are merged into that one
    first = h["person_id"].groupby(to_key.to_numpy()).transform("first")
    winner = has.fillna(first).astype("int64")
    move = (has.isna() & winner.eq(h["person_id"])).to_numpy()
    merge = winner.ne(h["person_id"]).to_numpy()
    subordinate = h["reason"].eq("dynamics_merge").to_numpy()
    created = _created_from(dec.config, h, records)
    moved, merged = h[move], h[merge]
    for reason, part in moved.groupby("reason", sort=False):
        dec.add(part["person_id"], part["to_type"].to_numpy(), part["to_id"].to_numpy(), str(reason))
    dec.moved.append(pd.DataFrame({"from_person": moved["person_id"].to_numpy(), "to_person": moved["person_id"].to_numpy()}))
    same = moved[moved["from_type"].eq(moved["to_type"]).to_numpy()]  # the subordinate lets go of the person first
    dec.link_clears = pd.DataFrame({"entity_type": same["from_type"].to_numpy(), "dynamics_id": same["from_id"].to_numpy(),
                                    "person_id": same["person_id"].to_numpy(dtype="int64")})
    losers = merged["person_id"].to_numpy(dtype="int64")
    dec.links = dec.links.drop(index=losers)
    dec.hold(merged["person_id"], merged["from_type"].to_numpy(), merged["from_id"].to_numpy())
    w = winner.astype(str)
    sub = "merged in Dynamics: " + h["from_type"] + " " + h["from_id"] + " into " + h["to_id"] + "; "
    qual = "lead " + h["from_id"] + " was qualified"
    text = np.select(
        [subordinate & move, created & move, move, subordinate],
        [sub + "person " + h["person_id"].astype(str) + " now follows " + h["to_id"],
         qual + ": the person now follows the contact created from it",
         qual + " into the existing contact " + h["to_id"] + ": the person now follows it",
         sub + "persons " + h["person_id"].astype(str) + " and " + w + " merged in Marketo (" + w + ", who follows "
         + h["to_id"] + ", wins)"],
        default="persons " + h["person_id"].astype(str) + " and " + w + " merged in Marketo (lead qualified into an "
                "existing contact: lead " + h["from_id"] + " into contact " + h["to_id"] + "; " + w
                + ", who follows it, wins)")
    # a person moved by a merge is a "merge" line; one moved by a qualified lead a "link" line, as before
    action = np.where(move & ~subordinate, "link", "merge")
    shown = move | merge
    person = np.where(move, h["person_id"].to_numpy(), winner.to_numpy())
    for name in ("merge", "link"):
        mine = shown & (action == name)
        dec.note(_notes(name, text[mine], person_id=person[mine], entity_type=h["to_type"][mine].to_numpy(),
                        dynamics_id=h["to_id"][mine].to_numpy()))
    dec.marketo_merges.append(pd.DataFrame({
        "winner_id": winner[merge].to_numpy(dtype="int64"), "loser_id": losers,
        "entity_type": merged["to_type"].to_numpy(), "dynamics_id": merged["to_id"].to_numpy(),
        "detail": text[merge]}, columns=MARKETO_MERGE_COLUMNS))
    return sorted(int(i) for i in losers)


def _created_from(config: SyncConfig, h: pd.DataFrame, records: dict[str, pd.DataFrame]) -> np.ndarray:
    """Which handovers of qualified leads go to the contact created from the lead (its originating lead)."""
    rows = records.get("contact")
    if rows is None or rows.empty or ORIGINATING_LEAD not in rows:
        return np.zeros(len(h), dtype=bool)
    origin = pd.Series(_lower(rows[ORIGINATING_LEAD]).to_numpy(),
                       index=rows[config.entity("contact").id_column].astype(str).str.lower().to_numpy())
    origin = origin[~origin.index.duplicated(keep="last")]
    return (h["reason"].eq("lead_qualified").to_numpy()
            & (h["to_id"].str.lower().map(origin).to_numpy() == h["from_id"].str.lower().to_numpy()))


def _repoint_merged(dec: _Decider, cand: pd.DataFrame) -> pd.DataFrame:
    """Dynamics rows whose Marketo-id column names a person merged away in Marketo: the winner takes its place
    (the column is rewritten to it with the link), or, when the winner follows another record, the row is held
    (not linked to a person that no longer exists, nor used to create it again) and logged."""
    into = dec.merged_into
    hit = cand["person_id"].isin(into.index).to_numpy()
    if not hit.any():
        return cand
    key = _record_key(cand["entity"], cand["dynamics_id"])
    winner = cand["person_id"].map(into)
    held = key.isin(dec.kept_records).to_numpy()  # held by this cycle's merge already (logged there)
    busy = hit & ~held & (winner.isin(dec.taken_persons) | winner.isin(dec.kept.index)).to_numpy()
    column = dec.config.dynamics.marketo_id_column
    b = cand[busy]
    dec.note(_notes("skip", column + " names person " + b["person_id"].astype(str) + ", merged into "
                    + winner[busy].astype(str) + " in Marketo, which follows another record: not linked, and no person "
                    "is created (a Dynamics merge of the two records may be wanted)",
                    person_id=winner[busy].to_numpy(), entity_type=b["entity"].to_numpy(),
                    dynamics_id=b["dynamics_id"].to_numpy()))
    dec.hold(b["person_id"], b["entity"].to_numpy(), b["dynamics_id"].to_numpy())
    free = hit & ~held & ~busy
    f = cand[free]
    dec.note(_notes("merge", column + " names person " + f["person_id"].astype(str) + ", merged into "
                    + winner[free].astype(str) + " in Marketo: linked to " + winner[free].astype(str)
                    + " instead (the column is rewritten)",
                    person_id=winner[free].to_numpy(), entity_type=f["entity"].to_numpy(),
                    dynamics_id=f["dynamics_id"].to_numpy()))
    out = cand.assign(person_id=cand["person_id"].where(~free, winner).astype("int64"))
    return out[~(hit & ~free)]


def carry_baselines(baseline: pd.DataFrame, moved: pd.DataFrame | None, load) -> pd.DataFrame:
    """Baselines of the pairs a merge moved to another person (``from_person, to_person``), for the plan: the
    ``to_person`` compares against the ``from_person``'s baselines (the commit moves them in the store).

    :param load: reads baselines of person ids (``StateStore.load_baselines`` with the plan's fields).
    """
    if moved is None or moved.empty:
        return baseline
    moved = moved[moved["from_person"].ne(moved["to_person"]).to_numpy()]
    if moved.empty:
        return baseline
    carried = load(moved["from_person"].astype("int64").tolist())
    to = pd.Series(moved["to_person"].astype("int64").to_numpy(), index=moved["from_person"].astype("int64").to_numpy())
    carried.index = pd.Index(carried.index.map(to), dtype="int64", name=baseline.index.name)
    return pd.concat([baseline[~baseline.index.isin(carried.index)], carried])


# -- the propagate guard: did the surviving side change since the last sync? ------------------------------------

def deletion_keys(config: SyncConfig, persons: pd.DataFrame, records: dict[str, pd.DataFrame],
                  push_ids=()) -> tuple[pd.Index, pd.Index]:
    """The person ids and Dynamics ids whose recorded deletions :func:`decide` needs: the persons and records read,
    and those their link fields name."""
    persons = _normal_persons(persons)
    link = config.marketo.link_fields
    pids = [persons["id"], pd.Series([int(i) for i in push_ids], dtype="int64")]
    dids = [_text(_column(persons, link.dynamics_id)).dropna()]
    for entity, rows in records.items():
        if rows.empty or entity not in config.entities:
            continue
        named = pd.to_numeric(_text(_column(rows, config.dynamics.marketo_id_column)), errors="coerce").dropna()
        pids.append(named[named % 1 == 0].astype("int64"))
        dids.append(rows[config.entity(entity).id_column].astype(str))
    return (pd.Index(pd.concat(pids, ignore_index=True).unique(), dtype="int64"),
            pd.Index(pd.concat(dids, ignore_index=True).str.lower().unique(), dtype=object))


def guard_ids(config: SyncConfig, links: pd.DataFrame, marketo_deleted=(),
              dynamics_deleted: dict[str, list[str]] | None = None) -> pd.Index:
    """Persons of the linked pairs whose one side was deleted this window under the ``propagate`` policy: their
    baselines are read so :func:`changed_since` can tell whether the other side changed."""
    if links.empty:
        return pd.Index([], dtype="int64")
    propagate = links["dynamics_type"].map({e: ent.deletes.policy is DeletePolicy.PROPAGATE
                                            for e, ent in config.entities.items()}).fillna(False).astype(bool)
    d_keys = pd.Index([f"{e}:{str(i).lower()}" for e, ids in (dynamics_deleted or {}).items() for i in ids])
    gone = links.index.isin([int(i) for i in marketo_deleted]) | \
        _record_key(links["dynamics_type"], links["dynamics_id"]).isin(d_keys).to_numpy()
    return pd.Index(links.index[gone & propagate.to_numpy()], dtype="int64")


def records_by_person(rows: pd.DataFrame, links: pd.DataFrame, id_column: str) -> pd.DataFrame:
    """Dynamics rows of linked records (one entity type's rows and links), indexed by their person id."""
    if rows.empty or links.empty:
        return pd.DataFrame(index=pd.Index([], dtype="int64", name="person_id"))
    by_record = pd.Series(links.index, index=links["dynamics_id"].astype(str).str.lower())
    by_record = by_record[~by_record.index.duplicated()]
    pid = by_record.reindex(rows[id_column].astype(str).str.lower().to_numpy())
    out = rows[pid.notna().to_numpy()].copy()
    out.index = pd.Index(pid.dropna().astype("int64").to_numpy(), name="person_id")
    return out[~out.index.duplicated(keep="last")]


def changed_since(config: SyncConfig, access, links: pd.DataFrame, persons: pd.DataFrame,
                  records: dict[str, pd.DataFrame], baseline: pd.DataFrame, person_ids) -> ChangedSince:
    """Which of ``person_ids``' pairs changed on each side since the last sync: a readable mapped field of the
    person (or record) read this cycle differs from its baseline (the sync's own writes, already in the baseline,
    do not count). A side not read this cycle did not change.

    :param access: the run's :class:`mdsync.access.FieldAccess` (only readable fields are compared).
    """
    from mdsync.canonical import canonical_frame
    from mdsync.diff import three_way_diff

    ids = pd.Index([int(i) for i in person_ids], dtype="int64")
    out = ChangedSince()
    if ids.empty:
        return out
    persons = _normal_persons(persons)
    empty = pd.DataFrame(index=pd.Index([], dtype="int64", name="person_id"))
    for name, entity in config.entities.items():
        mine = links[(links["dynamics_type"] == name).to_numpy() & links.index.isin(ids)]
        if mine.empty:
            continue
        acc = access.entities[name]
        m_raw = persons[persons["id"].isin(mine.index)].set_index("id")
        m_raw.index = m_raw.index.astype("int64").rename("person_id")
        d_raw = records_by_person(records.get(name, pd.DataFrame()), mine, entity.id_column)
        marketo, _ = canonical_frame(m_raw, [f for f in entity.fields if f.name in acc.marketo_read], Side.MARKETO)
        dynamics, _ = canonical_frame(d_raw, [f for f in entity.fields if f.name in acc.dynamics_read], Side.DYNAMICS)
        base = baseline[baseline.index.isin(mine.index)]
        for side, frame, attr in (("marketo", marketo, "marketo_changed"), ("dynamics", dynamics, "dynamics_changed")):
            if frame.empty:
                continue
            diff = three_way_diff(entity, base, frame if side == "marketo" else empty,
                                  frame if side == "dynamics" else empty, keys=frame.index)
            hit = np.zeros(len(frame), dtype=bool)
            for f in diff.fields:
                hit |= getattr(f, attr)
            setattr(out, side, getattr(out, side).union(frame.index[hit]))
    return out


# -- link fields --------------------------------------------------------------------------------------

def link_field_writes(config: SyncConfig, links: pd.DataFrame, persons: pd.DataFrame,
                      records: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Link fields that do not yet name the partner record, on both sides (DESIGN §3).

    Pairs outside the sync filter (``paused``) are left as they are.

    :returns: (Marketo writes: person_id, dynamics_id, dynamics_type; per entity type Dynamics writes:
        dynamics_id, person_id).
    """
    links = links[~_paused(links)]
    link = config.marketo.link_fields
    m_writes = pd.DataFrame({"person_id": pd.Series(dtype="int64"), "dynamics_id": pd.Series(dtype=object),
                             "dynamics_type": pd.Series(dtype=object)})
    persons = _normal_persons(persons)
    if not persons.empty:
        p = persons.set_index("id")
        on = links.index.intersection(p.index)
        current_id = _lower(_column(p, link.dynamics_id).reindex(on)).fillna("")
        current_type = _text(_column(p, link.dynamics_type).reindex(on)).fillna("")
        want_id, want_type = links.loc[on, "dynamics_id"].astype(str), links.loc[on, "dynamics_type"].astype(str)
        stale = (current_id.to_numpy() != want_id.str.lower().to_numpy()) | (current_type.to_numpy() != want_type.to_numpy())
        m_writes = pd.DataFrame({"person_id": on[stale].astype("int64"), "dynamics_id": want_id[stale].to_numpy(),
                                 "dynamics_type": want_type[stale].to_numpy()})
    d_writes = {}
    column = config.dynamics.marketo_id_column
    for entity, rows in records.items():
        idc = config.entity(entity).id_column
        mine = links[links["dynamics_type"] == entity]
        by_record = pd.Series(mine.index.astype(str), index=mine["dynamics_id"].astype(str).str.lower())
        by_record = by_record[~by_record.index.duplicated()]
        if rows.empty:
            d_writes[entity] = pd.DataFrame({"dynamics_id": pd.Series(dtype=object), "person_id": pd.Series(dtype="int64")})
            continue
        rows = rows.drop_duplicates(idc, keep="last")
        want = by_record.reindex(rows[idc].astype(str).str.lower().to_numpy())
        have = _text(_column(rows, column)).fillna("").to_numpy()
        stale = want.notna().to_numpy() & (have != want.fillna("").to_numpy())
        d_writes[entity] = pd.DataFrame({"dynamics_id": rows.loc[stale, idc].astype(str).to_numpy(),
                                         "person_id": want[stale].astype("int64").to_numpy()})
    return m_writes, d_writes

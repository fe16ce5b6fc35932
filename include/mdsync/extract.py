"""Stage 2 of the cycle: extract what changed on each side since the watermark (DESIGN §4.2).

Marketo: a paging token from the window start (minus the overlap), then lead-change activities (type 12/13)
and the Merge Leads and Delete Lead activities (32, 37: one call a page) from it; the changed persons and the
merges' winners are then read in full by id (300 per call). A merge's losers are deleted too: they are told
apart from persons deleted on their own and never treated as deletes. A full reconcile
also re-reads every linked person and every person updated in the look-back period (bulk export).
Dynamics: change tracking per entity set (a delta link kept as the watermark; a full read when there is none,
it expired, or a full reconcile is asked for).

Frames keep each API's own column names and types; :mod:`mdsync.canonical` turns them into canonical
values per entity type in the plan stage. Re-reading a change twice is harmless: the diff is idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd

from mdsync.access import EntityAccess, FieldAccess
from mdsync.config import EntityConfig, SyncConfig
from mdsync.errors import ServiceError

log = logging.getLogger("mdsync.extract")


def marketo_fields(config: SyncConfig) -> list[str]:
    """Every Marketo field a cycle reads: mapped fields of all entity types, link and sync-marker fields."""
    names = ["email", "updatedAt"]
    for entity in config.entities.values():
        names += [f.marketo for f in entity.fields]
    link, marker = config.marketo.link_fields, config.marketo.sync_marker
    names += [link.dynamics_id, link.dynamics_type, marker.field] + ([marker.as_field] if marker.as_field else [])
    return list(dict.fromkeys(names))


def change_fields(config: SyncConfig) -> list[str]:
    """The Marketo fields whose changes are work: mapped fields and the sync marker, never the link fields
    (the sync writes those itself, so asking for them would bring its own writes back every cycle)."""
    link = config.marketo.link_fields
    return [f for f in marketo_fields(config) if f not in (link.dynamics_id, link.dynamics_type, "updatedAt")]


#: Dataverse columns of a merged record: ``merged`` (true on the subordinate of a ``Merge``) and its master
MERGED, MASTER_ID = "merged", "_masterid_value"
#: the contact a lead was qualified into (``QualifyLead`` sets it: the new contact, or an existing one), and the
#: lead a contact was created from
QUALIFIED_CONTACT, ORIGINATING_LEAD = "_parentcontactid_value", "_originatingleadid_value"


def lifecycle_columns(entity: EntityConfig) -> list[str]:
    """The columns identity follows merges and qualified leads by (standard columns of contacts and leads)."""
    return [MERGED, MASTER_ID, *{"lead": [QUALIFIED_CONTACT], "contact": [ORIGINATING_LEAD]}.get(entity.name, [])]


def dynamics_columns(config: SyncConfig, entity: EntityConfig, access: EntityAccess) -> list[str]:
    """The Dataverse columns a cycle reads for one entity type (``$select`` of mapped, readable columns only, the
    columns of the entity type's sync filter, and those of merges and qualified leads)."""
    readable = set(access.dynamics_read)
    mapped = [f.dynamics for f in entity.fields if f.name in readable]
    parent = [config.accounts.contact_lookup] if config.accounts and entity.name == "contact" else []
    return list(dict.fromkeys([entity.id_column, *mapped, config.dynamics.marketo_id_column, "statecode", "modifiedon",
                               *entity.filter.columns, *parent, *lifecycle_columns(entity)]))


def _selected(delta_link: str) -> set[str]:
    """The columns a stored delta link reads (its ``$select``, lower-cased)."""
    from urllib.parse import parse_qs, urlsplit

    select = parse_qs(urlsplit(delta_link).query).get("$select", [""])[0]
    return {c.strip().lower() for c in select.split(",") if c.strip()}


@dataclass
class MarketoExtract:
    persons: pd.DataFrame
    deleted: list[int]
    high_water: datetime
    changed: int
    #: ``changes``, ``bulk_window`` or ``bulk_all`` (see :class:`mdsync.results.MarketoExtracted`)
    mode: str = "changes"
    #: asked-for persons (a manual run's ``person_ids``) that Marketo does not have (deleted or never existed)
    missing_ids: list[int] = field(default_factory=list)
    #: persons merged away in the window: ``loser_id``, ``winner_id`` (the surviving person, chains followed)
    merges: pd.DataFrame = field(default_factory=lambda: empty_merges())

    @property
    def complete(self) -> bool:
        """Every Marketo person is in :attr:`persons`."""
        return self.mode == "bulk_all"


@dataclass
class DynamicsExtract:
    entity: str
    rows: pd.DataFrame
    deleted: list[str]
    delta_link: str
    full_read: bool
    high_water: datetime


#: Marketo activity types: New Lead, Change Data Value (activities.md)
NEW_LEAD, CHANGE_DATA_VALUE = 12, 13
#: Marketo's founding year: no subscription holds a person created before it
MARKETO_EPOCH = datetime(2006, 1, 1, tzinfo=timezone.utc)


def oldest_person_created(client) -> datetime:
    """When the oldest Marketo person was created, to start a bulk export of every person there.

    Lead ids grow with creation, so the lowest ids hold the oldest persons. One lookup of ids 1-300; when none
    of them exists (deleted, or a subscription that numbers from elsewhere), one lookup of 300 ids spread
    geometrically up to 2^31 finds the lowest existing id, and a lookup of the 300 ids up to it gives the
    oldest creation date. Set ``MDSYNC_BOOTSTRAP_SINCE`` to start elsewhere. An empty database exports
    nothing older than a day.
    """
    def created(ids) -> pd.DataFrame:
        found = client.get_leads("id", ids, ["createdAt"])
        if found.empty:
            return found
        return found.assign(createdAt=pd.to_datetime(found["createdAt"], utc=True, errors="coerce"))

    found = created(range(1, 301))
    if found.empty:
        probe = sorted(set(np.unique(np.geomspace(301, 2**31, 300).astype("int64")).tolist()))
        hits = created(probe)
        if hits.empty:
            log.info("marketo: no persons found by id: the database looks empty")
            return datetime.now(timezone.utc) - timedelta(days=1)
        lowest = int(hits["id"].min())
        found = pd.concat([hits, created(range(max(1, lowest - 299), lowest))], ignore_index=True)
    oldest = found["createdAt"].dropna().min()
    if pd.isna(oldest):
        log.warning("marketo: the oldest persons have no createdAt; exporting every person created since %s",
                    MARKETO_EPOCH.date())
        return MARKETO_EPOCH
    return oldest.to_pydatetime() - timedelta(days=1)


def extract_marketo(
    client, config: SyncConfig, *, since: datetime, extra_ids: list[int] = (),
    lookback_days: float = 0, bulk_poll_seconds: float = 5, full: bool = False,
    bootstrap_since: datetime | None = None, max_change_pages: int = 10, bulk_read_over: int = 3000,
) -> MarketoExtract:
    """Persons changed in Marketo since ``since`` (or every person, for a full reconcile), read in full.

    - ``full``: a bulk lead export of every person (``createdAt`` in 31-day windows from the oldest person);
    - a window with few changes: lead-change activities for the mapped fields, then those persons by id;
    - a window with many (more than ``max_change_pages`` pages of activities): a bulk activity export of the
      window, then the changed persons by a bulk lead export (``updatedAt``) or by id.

    :param since: window start, already moved back by the overlap (deleted leads are read from there too).
    :param extra_ids: persons to read whatever changed (a manual run's ``person_ids``).
    :param lookback_days: also bulk-export persons updated in this many days.
    :param bulk_poll_seconds: how often a bulk job's status is polled.
    """
    started = datetime.now(timezone.utc)
    fields = marketo_fields(config)
    token = client.get_paging_token(since)
    deleted_frame, merge_frame, _ = client.get_merges_and_deletions(token)
    merges, deleted = merged_and_deleted(merge_frame, deleted_frame)
    frames, mode, changed_ids = [], "changes", set()
    if full:
        start = bootstrap_since or oldest_person_created(client)
        log.info("marketo: full reconcile: bulk export of every person created since %s", start.isoformat())
        frames.append(client.export_leads(fields, created_at=(start, started), poll_interval_s=bulk_poll_seconds))
        mode = "bulk_all"
        log.info("marketo: bulk export read %d persons", len(frames[-1]))
    else:
        changes, next_token = client.get_lead_changes(token, change_fields(config), max_pages=max_change_pages)
        if changes.attrs.get("more_result"):
            log.info("marketo: more than %d pages of lead changes since %s: reading the window in bulk instead",
                     max_change_pages, since.isoformat())
            try:
                bulk = client.export_activities([NEW_LEAD, CHANGE_DATA_VALUE], created_at=(since, started),
                                                poll_interval_s=bulk_poll_seconds)
                changes, mode = _mapped_changes(bulk, config, client), "bulk_window"
            except ServiceError as exc:
                if exc.code != "1029":  # only a full export queue or the daily export quota: page on instead
                    raise
                log.warning("marketo: bulk activity export refused (%s); paging the rest of the lead changes", exc)
                rest, _ = client.get_lead_changes(next_token, change_fields(config))
                changes = pd.concat([changes, rest], ignore_index=True)
        changed_ids = set(int(i) for i in changes.get("lead_id", pd.Series(dtype="Int64")).dropna())
        log.info("marketo: %d change activities for %d persons since %s", len(changes), len(changed_ids),
                 since.isoformat())
    # a merge's winner is read in full: it may take over its losers' links (and its values may have changed)
    winners = set(merges["winner_id"].astype("int64"))
    wanted = (changed_ids | winners | {int(i) for i in extra_ids}) - set(deleted) - set(merges["loser_id"])
    if lookback_days:
        frames.append(client.export_leads(fields, updated_at=(started - timedelta(days=lookback_days), started),
                                          poll_interval_s=bulk_poll_seconds))
    have = set(pd.concat(frames)["id"].astype("int64")) if frames else set()
    wanted -= have
    if len(wanted) > bulk_read_over:
        frames.append(_read_window_in_bulk(client, fields, since, started, wanted, bulk_poll_seconds))
        wanted -= set(frames[-1]["id"].astype("int64"))
    if wanted:
        frames.append(client.get_leads("id", sorted(wanted), fields))
    persons = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", *fields])
    if not persons.empty:
        persons = persons.drop_duplicates("id", keep="last")
        persons = persons[~persons["id"].isin(deleted) & ~persons["id"].isin(merges["loser_id"])].reset_index(drop=True)
    log.info("marketo: %d deleted and %d merged away since %s; read %d persons in full (%s)", len(deleted),
             len(merges), since.isoformat(), len(persons), mode)
    missing = _missing(extra_ids, persons, deleted)
    return MarketoExtract(persons=persons, deleted=deleted, high_water=started, changed=len(changed_ids), mode=mode,
                          missing_ids=missing, merges=merges)


def empty_merges() -> pd.DataFrame:
    """A frame of merged-away persons: ``loser_id``, ``winner_id``."""
    return pd.DataFrame({"loser_id": pd.Series(dtype="int64"), "winner_id": pd.Series(dtype="int64")})


def final_winners(merges: pd.DataFrame) -> pd.DataFrame:
    """``loser_id, winner_id`` with each winner followed to the person that survives (a winner merged away in turn
    into another person: 12 into 34, then 34 into 56 gives 12 -> 56 and 34 -> 56); the last merge of a loser counts."""
    if merges.empty:
        return empty_merges()
    pairs = merges[["loser_id", "winner_id"]].dropna().astype("int64").drop_duplicates("loser_id", keep="last")
    winner = pd.Series(pairs["winner_id"].to_numpy(), index=pairs["loser_id"].to_numpy())
    final = winner.copy()
    for _ in range(len(winner)):  # one hop per round; a chain is never longer than the merges
        step = final.map(winner)
        moved = step.notna() & step.ne(final) & step.ne(final.index.to_series(index=final.index))
        if not moved.any():
            break
        final = final.where(~moved, step).astype("int64")
    return pd.DataFrame({"loser_id": final.index.astype("int64"), "winner_id": final.to_numpy(dtype="int64")})


def merged_and_deleted(merge_frame: pd.DataFrame, deleted_frame: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    """Tell merged-away persons from deleted ones (a merge deletes its losers, with a Delete Lead activity each).

    :returns: ``(merges, deleted)``: the losers with their surviving winner (:func:`final_winners`), and the ids
        deleted on their own; a loser whose winner was itself deleted in the window counts as deleted.
    """
    merges = final_winners(merge_frame)
    gone = {int(i) for i in deleted_frame.get("lead_id", pd.Series(dtype="Int64")).dropna()}
    lost = merges["winner_id"].isin(gone).to_numpy()  # merged into a person deleted since: gone with it
    deleted = (gone - set(merges["loser_id"])) | set(merges["loser_id"][lost])
    return merges[~lost].reset_index(drop=True), sorted(deleted)


def _missing(asked, persons: pd.DataFrame, deleted: list[int]) -> list[int]:
    """The asked-for person ids Marketo did not return, logged (a typo in ``person_ids`` must not go unseen)."""
    asked = list(dict.fromkeys(int(i) for i in asked))
    found = set(persons["id"].dropna().astype("int64")) if not persons.empty else set()
    missing = [i for i in asked if i not in found]
    if missing:
        gone = [i for i in missing if i in set(deleted)]
        log.warning("marketo: %d of the %d person_ids asked for do not exist in Marketo and are not synced: %s%s",
                    len(missing), len(asked), ", ".join(map(str, missing[:50])) + (" ..." if len(missing) > 50 else ""),
                    f" ({', '.join(map(str, gone))} deleted since the window start)" if gone else
                    " (deleted, merged away or never created; check the ids)")
    return missing



def _mapped_changes(changes: pd.DataFrame, config: SyncConfig, client) -> pd.DataFrame:
    """Keep New Lead activities and value changes of the fields that are work (see :func:`change_fields`)."""
    if changes.empty or "primary_attribute_value" not in changes:
        return changes
    describe = client.describe_leads()
    wanted = set(change_fields(config))
    names = set(describe.loc[describe["rest_name"].isin(wanted), "display_name"].dropna()) | wanted
    keep = changes["activity_type_id"].eq(NEW_LEAD).to_numpy() | changes["primary_attribute_value"].isin(names).to_numpy()
    return changes[keep]


def _read_window_in_bulk(client, fields, since, until, wanted: set[int], poll_seconds: float) -> pd.DataFrame:
    """Many changed persons: one bulk lead export of the window (``updatedAt``) instead of ids 300 at a time;
    subscriptions without the ``updatedAt`` filter (or past the daily export quota) read by id."""
    try:
        exported = client.export_leads(fields, updated_at=(since, until), poll_interval_s=poll_seconds)
    except ServiceError as exc:
        log.info("marketo: bulk export by updatedAt not available (%s); reading %d persons by id", exc, len(wanted))
        return client.get_leads("id", sorted(wanted), fields)
    return exported[exported["id"].astype("int64").isin(wanted)]


def extract_dynamics(
    client, config: SyncConfig, entity: EntityConfig, access: FieldAccess, *, delta_link: str | None, full: bool,
) -> DynamicsExtract:
    """Rows of one entity set changed (and deleted) since the stored delta link."""
    started = datetime.now(timezone.utc)
    columns = dynamics_columns(config, entity, access.entities[entity.name])
    if delta_link and not full:
        # A delta link reads the columns of the query that started it: when the cycle now reads more (a newly
        # mapped field, a sync-filter column), read the table once in full so no row is judged without them.
        added = {c.lower() for c in columns} - _selected(delta_link)
        if added and _selected(delta_link):
            log.info("dynamics: %s: the stored delta link does not read %s; reading the table in full once",
                     entity.entity_set, ", ".join(sorted(added)))
            delta_link = None
    changes = client.track_changes(entity.entity_set, columns, delta_link=None if full else delta_link)
    log.info("dynamics: %s: %d changed, %d deleted%s", entity.entity_set, len(changes.changed), len(changes.deleted_ids),
             " (full read)" if changes.full_read else "")
    return DynamicsExtract(
        entity=entity.name, rows=changes.changed, deleted=[str(i) for i in changes.deleted_ids],
        delta_link=changes.delta_link, full_read=changes.full_read, high_water=started,
    )


# -- accounts (account fields on the persons of the account's contacts) ----------------------------------------

#: values per ``$filter`` of ``column eq <value> or ...`` (about 80 characters each once encoded: URLs stay
#: under 10 KB, well inside the service's 32 KB)
VALUES_PER_FILTER = 100
#: contacts of more changed accounts than this many filters hold are read in one paged query of every contact
#: with a parent instead
MAX_PARENT_FILTERS = 20


@dataclass
class AccountsExtract:
    #: accounts changed (or, on a full read, every account): raw rows of :func:`account_columns`
    accounts: pd.DataFrame
    deleted: list[str]
    #: ``<contact id>, <contact lookup>`` of the contacts of changed accounts (empty when the contacts' own extract
    #: read every contact: their rows carry the lookup)
    contacts: pd.DataFrame
    delta_link: str
    full_read: bool
    high_water: datetime


def account_columns(config: SyncConfig, access: FieldAccess) -> list[str]:
    """The account columns a cycle reads: id, name and the columns of the account fields the sync may use."""
    accounts = config.accounts
    usable = set(access.accounts.fields) if access.accounts is not None else set()
    return list(dict.fromkeys([accounts.id_column, accounts.name_column,
                               *(f.dynamics for f in accounts.fields if f.name in usable)]))


def query_chunked(client, entity_set: str, columns: list[str], values: list, per_query: int, condition
                  ) -> pd.DataFrame:
    """Rows of ``entity_set`` matching ``condition(chunk)`` for each chunk of ``per_query`` values (all pages of
    each), so a long list of values never makes a URL too long."""
    parts = [client.query(entity_set, columns, filter=condition(values[i:i + per_query]))
             for i in range(0, len(values), per_query)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def query_any(client, entity_set: str, columns: list[str], column: str, values, per_query: int = VALUES_PER_FILTER
              ) -> pd.DataFrame:
    """Rows of ``entity_set`` whose ``column`` is one of ``values``: ``$filter=column eq 'a' or column eq 'b' ...``,
    each literal escaped, :data:`VALUES_PER_FILTER` values a query (all pages of each)."""
    from mdsync.dynamics import eq, or_

    return query_chunked(client, entity_set, columns, list(dict.fromkeys(str(v) for v in values)), per_query,
                         lambda chunk: or_(*(eq(column, v) for v in chunk)))


def extract_accounts(client, config: SyncConfig, access: FieldAccess, *, delta_link: str | None, full: bool,
                     contacts_complete: bool) -> AccountsExtract:
    """Accounts changed since the stored delta link (change tracking, as for contacts and leads; a full read when
    there is none, it expired, it reads other columns, or a full reconcile is asked for), and the parent lookup of
    their contacts.

    :param contacts_complete: the contacts' extract read every contact, so it holds each one's parent already.
    """
    started = datetime.now(timezone.utc)
    accounts, contact = config.accounts, config.entity("contact")
    columns = account_columns(config, access)
    if delta_link and not full and {c.lower() for c in columns} - _selected(delta_link) and _selected(delta_link):
        log.info("dynamics: %s: the stored delta link does not read %s; reading the table in full once",
                 accounts.entity_set, ", ".join(sorted({c.lower() for c in columns} - _selected(delta_link))))
        delta_link = None
    changes = client.track_changes(accounts.entity_set, columns, delta_link=None if full else delta_link)
    ids = changes.changed[accounts.id_column].dropna().astype(str).tolist() if not changes.changed.empty else []
    parent_columns = [contact.id_column, accounts.contact_lookup]
    if contacts_complete or not ids:
        contacts = pd.DataFrame(columns=parent_columns)
    elif changes.full_read or len(ids) > MAX_PARENT_FILTERS * VALUES_PER_FILTER:
        from mdsync.dynamics import compare

        contacts = client.query(contact.entity_set, parent_columns, filter=compare(accounts.contact_lookup, "ne", None))
    else:
        contacts = query_any(client, contact.entity_set, parent_columns, accounts.contact_lookup, ids)
    log.info("dynamics: %s: %d changed, %d deleted%s; %d contacts of changed accounts read", accounts.entity_set,
             len(changes.changed), len(changes.deleted_ids), " (full read)" if changes.full_read else "", len(contacts))
    return AccountsExtract(accounts=changes.changed, deleted=[str(i) for i in changes.deleted_ids], contacts=contacts,
                           delta_link=changes.delta_link, full_read=changes.full_read, high_water=started)

"""Stage 2 of the cycle: extract what changed on each side since the watermark (DESIGN §4.2).

Marketo: a paging token from the window start (minus the overlap), then lead-change activities (type 12/13)
and deleted leads from it; the changed persons are then read in full by id (300 per call). A full reconcile
also re-reads every linked person and every person updated in the look-back period (bulk export).
Dynamics: change tracking per entity set (a delta link kept as the watermark; a full read when there is none,
it expired, or a full reconcile is asked for).

Frames keep each API's own column names and types; :mod:`mdsync.canonical` turns them into canonical
values per entity type in the plan stage. Re-reading a change twice is harmless: the diff is idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pandas as pd

from mdsync.access import EntityAccess, FieldAccess
from mdsync.config import EntityConfig, SyncConfig

log = logging.getLogger("mdsync.extract")


def marketo_fields(config: SyncConfig) -> list[str]:
    """Every Marketo field a cycle reads: mapped fields of all entity types, link and sync-marker fields."""
    names = ["email", "updatedAt"]
    for entity in config.entities.values():
        names += [f.marketo for f in entity.fields]
    link, marker = config.marketo.link_fields, config.marketo.sync_marker
    names += [link.dynamics_id, link.dynamics_type, marker.field] + ([marker.as_field] if marker.as_field else [])
    return list(dict.fromkeys(names))


def dynamics_columns(config: SyncConfig, entity: EntityConfig, access: EntityAccess) -> list[str]:
    """The Dataverse columns a cycle reads for one entity type (``$select`` of mapped, readable columns only)."""
    readable = set(access.dynamics_read)
    mapped = [f.dynamics for f in entity.fields if f.name in readable]
    return list(dict.fromkeys([entity.id_column, *mapped, config.dynamics.marketo_id_column, "statecode", "modifiedon"]))


@dataclass
class MarketoExtract:
    persons: pd.DataFrame
    deleted: list[int]
    high_water: datetime
    changed: int


@dataclass
class DynamicsExtract:
    entity: str
    rows: pd.DataFrame
    deleted: list[str]
    delta_link: str
    full_read: bool
    high_water: datetime


def extract_marketo(
    client, config: SyncConfig, *, since: datetime, extra_ids: list[int] = (), known_ids: list[int] = (),
    lookback_days: float = 0, bulk_poll_seconds: float = 60,
) -> MarketoExtract:
    """Persons changed in Marketo since ``since``, read in full.

    :param since: window start, already moved back by the overlap.
    :param extra_ids: persons to read whatever changed (a manual run's ``person_ids``).
    :param known_ids: for a full reconcile: every linked person.
    :param lookback_days: for a full reconcile: also bulk-export persons updated in this many days.
    :param bulk_poll_seconds: how often a bulk export job's status is polled.
    """
    started = datetime.now(timezone.utc)
    fields = marketo_fields(config)
    token = client.get_paging_token(since)
    changes, _ = client.get_lead_changes(token, fields)
    deleted_frame, _ = client.get_deleted_leads(token)
    deleted = sorted({int(i) for i in deleted_frame.get("lead_id", pd.Series(dtype="Int64")).dropna()})
    changed_ids = set(int(i) for i in changes.get("lead_id", pd.Series(dtype="Int64")).dropna())
    wanted = (changed_ids | {int(i) for i in extra_ids} | {int(i) for i in known_ids}) - set(deleted)
    frames = []
    if lookback_days:
        exported = client.export_leads(fields, updated_at=(started - timedelta(days=lookback_days), started),
                                      poll_interval_s=bulk_poll_seconds)
        frames.append(exported)
        wanted -= set(exported["id"].astype("int64"))
    if wanted:
        frames.append(client.get_leads("id", sorted(wanted), fields))
    persons = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", *fields])
    if not persons.empty:
        persons = persons.drop_duplicates("id", keep="last")
        persons = persons[~persons["id"].isin(deleted)].reset_index(drop=True)
    log.info("marketo: %d change activities for %d persons since %s, %d deleted; read %d persons in full",
             len(changes), len(changed_ids), since.isoformat(), len(deleted), len(persons))
    return MarketoExtract(persons=persons, deleted=deleted, high_water=started, changed=len(changed_ids))


def extract_dynamics(
    client, config: SyncConfig, entity: EntityConfig, access: FieldAccess, *, delta_link: str | None, full: bool,
) -> DynamicsExtract:
    """Rows of one entity set changed (and deleted) since the stored delta link."""
    started = datetime.now(timezone.utc)
    columns = dynamics_columns(config, entity, access.entities[entity.name])
    changes = client.track_changes(entity.entity_set, columns, delta_link=None if full else delta_link)
    log.info("dynamics: %s: %d changed, %d deleted%s", entity.entity_set, len(changes.changed), len(changes.deleted_ids),
             " (full read)" if changes.full_read else "")
    return DynamicsExtract(
        entity=entity.name, rows=changes.changed, deleted=[str(i) for i in changes.deleted_ids],
        delta_link=changes.delta_link, full_read=changes.full_read, high_water=started,
    )

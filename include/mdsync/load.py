"""Stage 5 of the cycle: load (DESIGN §4.4): creates, updates and link fields, batched, one outcome per field.

Dynamics first (``UpsertMultiple`` for creates by the alternate key, ``UpdateMultiple`` in chunks of 1000,
``$batch`` continue-on-error when a chunk fails), then Marketo (Sync Leads, 300 per call; above a threshold
the Bulk Lead Import, which the reference architecture prefers for volume). A value longer than the target
column allows is not sent and not truncated: it is reported. A record the target rejects is re-sent one
field at a time, so its other fields still sync and the rejection is pinned on the field that caused it.

Writes are long frames (one row per record and field). They become API records once per (side, entity,
field set): rows are pivoted per record and records with the same fields are built together; outcomes come
back as frames joined to the rows by record key. No per-row ``.loc`` anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd

from mdsync.activity import activity_frame
from mdsync.canonical import canonical_frame, to_dynamics, to_marketo
from mdsync.config import Direction, DynamicsDeleteAction, EntityConfig, FieldMap, FieldType, Side, SyncConfig
from mdsync.constants import DELETE_RECORD, DELETED_FLAG, LINK_FIELD
from mdsync.progress import Progress

log = logging.getLogger("mdsync.load")

RESULT_COLUMNS = ["person_id", "dynamics_id", "field", "value", "ok", "error_code", "error_message"]
#: Marketo writes above this many records go through the Bulk Lead Import (one job instead of n/300 calls)
MARKETO_BULK_THRESHOLD = 3000

#: records handed to a sender at a time: a multiple of Marketo's 300 and Dataverse's 1000 per call
SEND_CHUNK = 30_000
#: sends API records; returns one ``(ok, error_code, error_message)`` per record, in order
Sender = Callable[[list[dict]], list[tuple[bool, str | None, str | None]]]


# -- building API records from long writes ----------------------------------------------------------------

def api_records(api: pd.DataFrame, group: str, key_columns: dict[str, str]) -> tuple[list[dict], np.ndarray]:
    """One API record per ``group`` value from long API cells, built once per field set.

    :param api: long cells: ``group``, ``api_field``, ``api_value`` and the key columns.
    :param key_columns: frame column -> API name of the record key (e.g. ``{"person_id": "id"}``).
    :returns: (records, the group value of each record, in the same order).
    """
    if api.empty:
        return [], np.array([], dtype=object)
    cells = api.drop_duplicates([group, "api_field"], keep="last")
    wide = cells.pivot(index=group, columns="api_field", values="api_value")
    present = cells.assign(_p=1).pivot(index=group, columns="api_field", values="_p").notna()
    keys = cells.drop_duplicates(group).set_index(group, drop=False)[list(key_columns)].reindex(wide.index)
    # a signature of the field set of each record (few distinct sets: one build each)
    signature = pd.Series([hash(tuple(r)) for r in present.to_numpy()], index=wide.index) if present.shape[1] > 62 \
        else pd.Series(present.to_numpy() @ (1 << np.arange(present.shape[1], dtype=np.int64)), index=wide.index)
    records: list[dict] = []
    order: list = []
    for _, idx in signature.groupby(signature, sort=False).groups.items():
        cols = present.columns[present.loc[idx].iloc[0].to_numpy()]
        part = wide.loc[idx, cols].astype(object)
        part = part.where(part.notna(), None)
        ids = keys.loc[idx].rename(columns=key_columns)
        records += pd.concat([ids, part], axis=1).to_dict("records")
        order += list(idx)
    return records, np.asarray(order, dtype=object)


def api_cells(rows: pd.DataFrame, fields: dict[str, FieldMap], side: Side) -> pd.DataFrame:
    """Long canonical writes -> long API cells (``api_field``, ``api_value``), one vectorised pass per field.

    Link writes (:data:`LINK_FIELD`) are left for the caller, which knows the side's link fields; deleted-flag
    writes (:data:`DELETED_FLAG`) convert through the map :func:`deleted_flag_map` puts in ``fields``.
    """
    name = np.empty(len(rows), dtype=object)
    value = np.empty(len(rows), dtype=object)
    convert = to_marketo if side is Side.MARKETO else to_dynamics
    for fname, idx in rows.groupby("field", sort=False).indices.items():
        if fname == LINK_FIELD:
            continue
        f = fields[fname]
        name[idx] = f.marketo if side is Side.MARKETO else f.dynamics
        value[idx] = convert(rows["value"].iloc[idx].reset_index(drop=True), f).to_numpy()
    return rows.assign(api_field=name, api_value=value)


def write_records(rows: pd.DataFrame, api: pd.DataFrame, key: str, key_columns: dict[str, str], send: Sender,
                  progress: Progress | None = None, chunk: int | None = SEND_CHUNK) -> pd.DataFrame:
    """Send long writes as one record per ``key``; re-send rejected records one field at a time.

    :param chunk: records handed to ``send`` at a time (a multiple of both services' batch sizes), so progress
        is logged as a long write goes; None sends everything at once (a bulk import queues its own files).

    :param rows: long writes (``key``, ``field``, ``value``, …), index = row id.
    :param api: their API cells (``row`` = the row id, ``api_field``, ``api_value``, key columns).
    :returns: ``rows`` with ``ok``, ``error_code``, ``error_message``.
    """
    out = rows.assign(ok=False, error_code=None, error_message=None)
    if rows.empty:
        return out
    records, order = api_records(api, key, key_columns)
    results: list = []
    step = chunk or len(records)
    for start in range(0, len(records), step):  # chunks, so a long write logs its progress
        results += send(records[start:start + step])
        if progress:
            progress.advance(min(step, len(records) - start))
    outcome = _outcomes(results, order)
    ok = rows[key].map(outcome["ok"]).fillna(False).astype(bool)
    fields_per_record = rows.groupby(key)[key].transform("size")
    retry = ~ok & (fields_per_record > 1)
    single = ~ok & ~retry
    out["ok"] = ok.to_numpy()
    out.loc[single, "error_code"] = rows.loc[single, key].map(outcome["code"]).to_numpy()
    out.loc[single, "error_message"] = rows.loc[single, key].map(outcome["message"]).to_numpy()
    if retry.any():
        again = api[api["row"].isin(rows.index[retry.to_numpy()])]
        log.info("re-sending %d fields of %d rejected records one at a time", int(retry.sum()),
                 rows.loc[retry, key].nunique())
        records, order = api_records(again, "row", key_columns)
        outcome = _outcomes(send(records), order)
        idx = rows.index[retry.to_numpy()]
        out.loc[idx, "ok"] = pd.Series(idx, index=idx).map(outcome["ok"]).fillna(False).astype(bool).to_numpy()
        failed = idx[~out.loc[idx, "ok"].to_numpy(dtype=bool)]
        out.loc[failed, "error_code"] = pd.Series(failed, index=failed).map(outcome["code"]).to_numpy()
        out.loc[failed, "error_message"] = pd.Series(failed, index=failed).map(outcome["message"]).to_numpy()
    return out


def _outcomes(results: list[tuple[bool, str | None, str | None]], order: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(results, columns=["ok", "code", "message"], index=pd.Index(order))
    return frame[~frame.index.duplicated(keep="last")]


def _too_long(writes: pd.DataFrame, max_length: dict[str, int], where: str) -> pd.Series:
    """Per write row: an error message when the value is longer than the target allows, else None."""
    limits = pd.to_numeric(writes["field"].astype(object).map(max_length), errors="coerce").to_numpy(dtype=float)
    lengths = writes["value"].astype("str").str.len().to_numpy(dtype=float, na_value=0)
    over = lengths > limits  # NaN limits (no MaxLength) compare False
    messages = pd.Series(None, index=writes.index, dtype=object)
    if over.any():
        messages[over] = ("value is " + pd.Series(lengths[over].astype(int)).astype(str) + f" characters but {where} allows "
                          + pd.Series(limits[over].astype(int)).astype(str)
                          + " ; not sent (values are never truncated)").str.replace(" ;", ";").to_numpy()
    return messages


def _dry(rows: pd.DataFrame, refused: pd.Series, dry_run: bool) -> pd.DataFrame:
    out = rows.assign(ok=False, error_code=None, error_message=refused.to_numpy())
    if dry_run:
        out["error_code"] = np.where(out["error_message"].notna(), "too_long", "dry_run")
    return out


def _with_refused(result: pd.DataFrame, rows: pd.DataFrame, refused: pd.Series) -> pd.DataFrame:
    bad = rows[refused.notna().to_numpy()].assign(ok=False, error_code="too_long", error_message=refused.dropna().to_numpy())
    return pd.concat([result, bad]).sort_index() if not bad.empty else result


def deleted_flag_map(config: SyncConfig) -> FieldMap:
    """The deleted flags (delete policy ``flag``) as a boolean field map, so their writes convert and batch like a
    mapped field's (built without validation: :data:`DELETED_FLAG` is not a config field name)."""
    return FieldMap.model_construct(name=DELETED_FLAG, marketo=config.marketo.deleted_flag_field or "",
                                    dynamics=config.dynamics.deleted_flag_column or "", type=FieldType.BOOLEAN,
                                    direction=Direction.BOTH, values=None, rule=None)


def _flag_rows(flags: pd.DataFrame | None, **columns) -> pd.DataFrame:
    """Deleted-flag writes (value true) as long write rows."""
    if flags is None or flags.empty:
        return pd.DataFrame(columns=["person_id", "dynamics_id", "field", "value", *columns])
    return flags.assign(field=DELETED_FLAG, value="true", **{k: flags[v] for k, v in columns.items()})


# -- updates --------------------------------------------------------------------------------------------

def load_dynamics(config: SyncConfig, entity: EntityConfig, writes: pd.DataFrame, link_writes: pd.DataFrame,
                  max_length: dict[str, int], client, *, dry_run: bool = False,
                  flag_writes: pd.DataFrame | None = None, link_clears: pd.DataFrame | None = None) -> pd.DataFrame:
    """Write one entity type's planned updates, link columns and deleted flags to Dataverse (one batched write).

    :param writes: the plan's Dynamics writes (canonical values, long).
    :param link_writes: ``dynamics_id, person_id`` rows whose Marketo-id column must be (re)set.
    :param flag_writes: ``dynamics_id, person_id`` rows whose ``dynamics.deleted_flag_column`` is set to true
        (their Marketo person was deleted; delete policy ``flag``).
    :param link_clears: ``dynamics_id, person_id`` rows whose Marketo-id column is emptied first, in calls of their
        own (merged subordinates whose person moved to their master: the column is an alternate key).
    :returns: one row per write: :data:`RESULT_COLUMNS`.
    """
    if link_clears is not None and not link_clears.empty:
        cleared = clear_link_columns(config, entity, link_clears, client, dry_run=dry_run)
        rest = load_dynamics(config, entity, writes, link_writes, max_length, client, dry_run=dry_run,
                             flag_writes=flag_writes)
        return pd.concat([cleared, rest], ignore_index=True)
    rows = writes[["person_id", "dynamics_id", "field", "value"]].copy()
    if not link_writes.empty:
        rows = pd.concat([rows, link_writes.assign(field=LINK_FIELD, value=link_writes["person_id"].astype(str))],
                         ignore_index=True)
    if flag_writes is not None and not flag_writes.empty:
        rows = pd.concat([rows, _flag_rows(flag_writes[["person_id", "dynamics_id"]])], ignore_index=True)
    rows = rows.reset_index(drop=True)
    rows["dynamics_id"] = rows["dynamics_id"].astype(str)
    refused = _too_long(rows, max_length, f"Dataverse column {entity.entity_set}")
    if dry_run or rows.empty:
        return _dry(rows, refused, dry_run)
    ok_rows = rows[refused.isna().to_numpy()]
    api = api_cells(ok_rows, {**{f.name: f for f in entity.fields}, DELETED_FLAG: deleted_flag_map(config)}, Side.DYNAMICS)
    link = api["field"].eq(LINK_FIELD).to_numpy()
    api.loc[link, "api_field"] = config.dynamics.marketo_id_column
    api.loc[link, "api_value"] = api.loc[link, "value"].astype(str)
    api = api.assign(row=api.index)
    progress = Progress.for_client(log, f"dynamics: {entity.entity_set} updated", ok_rows["dynamics_id"].nunique(), client)

    def send(records: list[dict]):
        res = client.update_multiple(entity.entity_set, records)
        return list(zip(res["ok"].astype(bool), res["error_code"], res["error_message"]))

    result = write_records(ok_rows, api, "dynamics_id", {"dynamics_id": entity.id_column}, send, progress)
    progress.finish()
    return _with_refused(result, rows, refused)


def clear_link_columns(config: SyncConfig, entity: EntityConfig, clears: pd.DataFrame, client, *,
                       dry_run: bool = False) -> pd.DataFrame:
    """Empty the Marketo-id column of ``clears`` (``dynamics_id, person_id``), 1000 records an UpdateMultiple call.

    :returns: one row per record: :data:`RESULT_COLUMNS` (field :data:`LINK_FIELD`, value None).
    """
    rows = clears[["person_id", "dynamics_id"]].assign(field=LINK_FIELD, value=None).reset_index(drop=True)
    rows["dynamics_id"] = rows["dynamics_id"].astype(str)
    if dry_run:
        return _dry(rows, pd.Series(None, index=rows.index, dtype=object), dry_run)
    api = rows.assign(api_field=config.dynamics.marketo_id_column, api_value=None, row=rows.index)
    log.info("dynamics: %s: emptying %s on %d merged records first (their persons moved to the master)",
             entity.entity_set, config.dynamics.marketo_id_column, len(rows))

    def send(records: list[dict]):
        res = client.update_multiple(entity.entity_set, records)
        return list(zip(res["ok"].astype(bool), res["error_code"], res["error_message"]))

    return write_records(rows, api, "dynamics_id", {"dynamics_id": entity.id_column}, send)


def load_marketo(config: SyncConfig, entities: dict[str, EntityConfig], writes: pd.DataFrame, link_writes: pd.DataFrame,
                 max_length: dict[str, int], client, *, dry_run: bool = False,
                 bulk_threshold: int = MARKETO_BULK_THRESHOLD, flag_writes: pd.DataFrame | None = None
                 ) -> tuple[pd.DataFrame, str]:
    """Write planned person updates, link fields and deleted flags to Marketo (by id).

    :param writes: the plans' Marketo writes of every entity type, with an ``entity_type`` column.
    :param link_writes: ``person_id, dynamics_id, dynamics_type`` rows whose link fields must be (re)set.
    :param flag_writes: ``person_id, dynamics_id, entity_type`` rows whose ``marketo.deleted_flag_field`` is set to
        true (their Dynamics record was deleted; delete policy ``flag``).
    :param bulk_threshold: above this many records, records without clears go through the Bulk Lead Import.
    :returns: (one row per write: :data:`RESULT_COLUMNS` + ``entity_type``, the method used).
    """
    rows = writes[["person_id", "dynamics_id", "field", "value", "entity_type"]].copy()
    if not link_writes.empty:
        encoded = link_writes["dynamics_type"].astype(str) + ":" + link_writes["dynamics_id"].astype(str)
        rows = pd.concat([rows, link_writes[["person_id", "dynamics_id"]].assign(
            field=LINK_FIELD, value=encoded, entity_type=link_writes["dynamics_type"])], ignore_index=True)
    if flag_writes is not None and not flag_writes.empty:
        rows = pd.concat([rows, _flag_rows(flag_writes[["person_id", "dynamics_id", "entity_type"]])],
                         ignore_index=True)
    rows = rows.reset_index(drop=True)
    rows["person_id"] = rows["person_id"].astype("int64")
    refused = _too_long(rows, max_length, "the Marketo field")
    if dry_run or rows.empty:
        return _dry(rows, refused, dry_run), "sync"
    ok_rows = rows[refused.isna().to_numpy()]
    api = _marketo_cells(config, entities, ok_rows).assign(row=lambda f: f.index)
    n_records = ok_rows["person_id"].nunique()
    progress = Progress.for_client(log, "marketo: persons updated", n_records, client)
    method = "sync"
    parts = []
    if n_records > bulk_threshold and hasattr(client, "import_leads"):
        # Clears cannot go through a bulk import (a blank cell leaves the value as it is): those records stay sync.
        clears = set(api.loc[api["api_value"].isna(), "person_id"])
        bulk = ~ok_rows["person_id"].isin(clears)
        if bulk.any():
            method = "bulk_import"
            log.info("marketo: %d persons to update: using the Bulk Lead Import (%d records with clears go "
                     "through Sync Leads)", n_records, len(clears))
            sub = ok_rows[bulk.to_numpy()]
            parts.append(write_records(sub, api[api["row"].isin(sub.index)], "person_id", {"person_id": "id"},
                                       lambda recs: _person_outcomes(client.import_leads(recs, lookup_field="id")),
                                       progress, chunk=None))
            ok_rows = ok_rows[~bulk.to_numpy()]
    if not ok_rows.empty:
        parts.append(write_records(ok_rows, api[api["row"].isin(ok_rows.index)], "person_id", {"person_id": "id"},
                                   lambda recs: _person_outcomes(client.sync_leads(recs, action="updateOnly", lookup_field="id")),
                                   progress))
    progress.finish()
    result = pd.concat(parts).sort_index() if parts else ok_rows.assign(ok=False, error_code=None, error_message=None)
    return _with_refused(result, rows, refused), method


def _marketo_cells(config: SyncConfig, entities: dict[str, EntityConfig], rows: pd.DataFrame) -> pd.DataFrame:
    """API cells of Marketo writes (each entity type's field maps; a link write is two cells)."""
    link = config.marketo.link_fields
    flag = deleted_flag_map(config)
    parts = []
    for etype, idx in rows.groupby("entity_type", sort=False).indices.items():
        part = rows.iloc[idx]
        parts.append(api_cells(part, {**{f.name: f for f in entities[etype].fields}, DELETED_FLAG: flag}, Side.MARKETO))
    cells = pd.concat(parts) if parts else rows.assign(api_field=None, api_value=None)
    is_link = cells["field"].eq(LINK_FIELD).to_numpy()
    links = cells[is_link]
    if links.empty:
        return cells
    kind_id = links["value"].astype(str).str.split(":", n=1, expand=True)
    return pd.concat([cells[~is_link], links.assign(api_field=link.dynamics_id, api_value=kind_id[1].to_numpy()),
                      links.assign(api_field=link.dynamics_type, api_value=kind_id[0].to_numpy())])


def _person_outcomes(res: pd.DataFrame):
    """Sync Leads or Bulk Lead Import results (by id) as ``(ok, code, message)`` per record."""
    return list(zip(res["status"].isin(["updated", "created"]), res["reason_code"], res["reason_message"]))


# -- creates --------------------------------------------------------------------------------------------

@dataclass
class CreateOutcome:
    """What the creates of one load did."""

    #: new links: person_id, dynamics_type, dynamics_id, method
    links: pd.DataFrame
    #: the values written by the creates: person_id, field, value (canonical) — the pairs' first baseline
    values: pd.DataFrame
    #: create / error activity rows
    activity: pd.DataFrame
    #: sync errors of refused creates
    errors: pd.DataFrame

    @classmethod
    def empty(cls) -> "CreateOutcome":
        return cls(links=_links_frame([], [], [], ""), values=pd.DataFrame(columns=["person_id", "field", "value"]),
                   activity=activity_frame([]), errors=pd.DataFrame())


def _links_frame(person_ids, types, ids, method: str) -> pd.DataFrame:
    return pd.DataFrame({"person_id": np.asarray(person_ids, dtype="int64"), "dynamics_type": np.asarray(types, dtype=object),
                         "dynamics_id": np.asarray(ids, dtype=object), "method": method})


def _long_values(keys: np.ndarray, canon: pd.DataFrame) -> pd.DataFrame:
    """Wide canonical values -> long ``person_id, field, value`` (non-null cells only)."""
    if canon.empty or not len(canon.columns):
        return pd.DataFrame(columns=["person_id", "field", "value"])
    frame = canon.set_axis(pd.Index(keys, name="person_id"))
    frame.columns.name = "field"
    long = frame.stack().rename("value").reset_index()
    return long[long["value"].notna()]


def create_in_dynamics(config: SyncConfig, access, creates: pd.DataFrame, persons: pd.DataFrame, client, *,
                       dry_run: bool = False) -> CreateOutcome:
    """Create (upsert by the alternate key) the Dynamics records of persons marked for sync.

    :param creates: ``person_id, entity_type, email`` (identity's ``dynamics_creates``).
    :param persons: the cycle's Marketo persons (raw API columns), holding every person in ``creates``.
    """
    out = CreateOutcome.empty()
    if creates.empty:
        return out
    link_col = config.dynamics.marketo_id_column
    by_id = persons.assign(id=persons["id"].astype("int64")).drop_duplicates("id", keep="last").set_index("id")
    links, values, notes, errors = [], [], [], []
    for entity, part in creates.groupby("entity_type", sort=False):
        ent = config.entity(entity)
        acc = access.entities[entity]
        allowed = set(acc.dynamics_create) & set(acc.marketo_read)
        fields = [f for f in ent.fields if f.flows_to_dynamics and f.name in allowed]
        pids = part["person_id"].astype("int64").to_numpy()
        canon, _ = canonical_frame(by_id.reindex(pids), fields, Side.MARKETO)
        if dry_run:
            notes.append(activity_frame(pd.DataFrame({"person_id": pids, "email": part["email"].to_numpy(),
                                                      "entity_type": entity, "dynamics_type": entity, "action": "create",
                                                      "detail": f"would create a {entity} in Dynamics [dry run]"})))
            continue
        api = pd.DataFrame({f.dynamics: to_dynamics(canon[f.name], f).to_numpy() for f in fields if f.name in canon})
        api[link_col] = pids.astype(str)
        rows = [{k: v for k, v in r.items() if v is not None} for r in api.to_dict("records")]
        log.info("dynamics: creating %d %ss for persons marked for sync (UpsertMultiple by %s)", len(rows), entity, link_col)
        res = client.upsert_multiple(ent.entity_set, rows, key=link_col)
        ok = res["ok"].astype(bool).to_numpy() & res["id"].notna().to_numpy()
        links.append(_links_frame(pids[ok], entity, res["id"][ok].astype(str), "created_in_dynamics"))
        values.append(_long_values(pids[ok], canon[ok]))
        notes.append(activity_frame(pd.DataFrame({
            "person_id": pids[ok], "email": part["email"].to_numpy()[ok], "entity_type": entity, "dynamics_type": entity,
            "dynamics_id": res["id"][ok].astype(str).to_numpy(), "action": "create",
            "detail": f"marked for sync: created the {entity} in Dynamics"})))
        message = (f"Dynamics refused to create the {entity}: " + res["error_code"].fillna("").astype(str) + " "
                   + res["error_message"].fillna("").astype(str)).str.strip()
        notes.append(activity_frame(pd.DataFrame({
            "person_id": pids[~ok], "email": part["email"].to_numpy()[~ok], "entity_type": entity, "dynamics_type": entity,
            "action": "error", "detail": (message[~ok] + "; retried next cycle").to_numpy()})))
        errors.append(pd.DataFrame({"person_id": pids[~ok], "dynamics_type": entity, "dynamics_id": None,
                                    "target": "dynamics", "field": None, "value": None,
                                    "code": res["error_code"][~ok].astype(object).to_numpy(),
                                    "message": message[~ok].to_numpy()}))
    return _gather(out, links, values, notes, errors)


def _gather(out: CreateOutcome, links, values, notes, errors) -> CreateOutcome:
    if links:
        out.links = pd.concat(links, ignore_index=True)
    if values:
        out.values = pd.concat(values, ignore_index=True)
    if notes:
        out.activity = pd.concat(notes, ignore_index=True)
    errors = [e for e in errors if not e.empty]
    if errors:
        out.errors = pd.concat(errors, ignore_index=True)
    return out


def create_in_marketo(config: SyncConfig, access, creates: pd.DataFrame, records: dict[str, pd.DataFrame], client,
                      dynamics_client, *, dry_run: bool = False, bulk_threshold: int = MARKETO_BULK_THRESHOLD,
                      poll_seconds: float = 5.0) -> CreateOutcome:
    """Create the Marketo persons of new Dynamics leads and contacts, with their link fields, then set the
    Marketo-id column on those Dynamics records.

    :param creates: ``entity_type, dynamics_id, email`` (identity's ``marketo_creates``).
    :param records: the cycle's Dynamics rows per entity type (raw API columns).
    """
    out = CreateOutcome.empty()
    if creates.empty:
        return out
    link = config.marketo.link_fields
    links, values, notes, errors = [], [], [], []
    batches, recs = [], []
    for entity, part in creates.groupby("entity_type", sort=False):
        ent = config.entity(entity)
        acc = access.entities[entity]
        allowed = set(acc.marketo_write) & set(acc.dynamics_read)
        fields = [f for f in ent.fields if f.flows_to_marketo and f.name in allowed]
        rows = records[entity]
        by_id = rows.assign(_k=rows[ent.id_column].astype(str).str.lower()).drop_duplicates("_k", keep="last").set_index("_k")
        dids = part["dynamics_id"].astype(str).to_numpy()
        canon, _ = canonical_frame(by_id.reindex(pd.Series(dids).str.lower().to_numpy()), fields, Side.DYNAMICS)
        emails = part["email"].to_numpy()
        if dry_run:
            notes.append(activity_frame(pd.DataFrame({"email": emails, "entity_type": entity, "dynamics_type": entity,
                                                      "dynamics_id": dids, "action": "create",
                                                      "detail": "would create the person in Marketo [dry run]"})))
            continue
        api = pd.DataFrame({f.marketo: to_marketo(canon[f.name], f).to_numpy() for f in fields if f.name in canon})
        api[link.dynamics_id] = dids
        api[link.dynamics_type] = entity
        batches.append((entity, ent, dids, emails, canon, len(recs)))
        recs += [{k: v for k, v in r.items() if v is not None} for r in api.to_dict("records")]
    if not recs:
        return _gather(out, links, values, notes, errors)
    # every entity type's new persons in one series of calls (300 per Sync Leads call, or one bulk import)
    all_dids = np.concatenate([b[2] for b in batches])
    if len(recs) > bulk_threshold and hasattr(client, "import_leads"):
        pids, codes, messages = _import_creates(client, recs, all_dids, link.dynamics_id, poll_seconds)
    else:
        log.info("marketo: creating %d persons for new Dynamics records (Sync Leads createOnly)", len(recs))
        res = client.sync_leads(recs, action="createOnly", lookup_field="email")
        good = res["status"].isin(["created", "updated"]).to_numpy() & res["id"].notna().to_numpy()
        pids = pd.array(res["id"].where(good), dtype="Int64")
        codes, messages = res["reason_code"].to_numpy().copy(), res["reason_message"].to_numpy().copy()
        _made_already(client, recs, all_dids, link.dynamics_id, ~good & (res["reason_code"].astype(str) == "1005"),
                      pids, codes, messages)
    for entity, ent, dids, emails, canon, start in batches:
        mine = slice(start, start + len(dids))
        e_pids, e_codes, e_messages = pids[mine], codes[mine], messages[mine]
        ok = ~pd.isna(np.asarray(e_pids, dtype=object))
        pid_ok = np.asarray(e_pids[ok], dtype="int64")
        links.append(_links_frame(pid_ok, entity, dids[ok], "created_in_marketo"))
        values.append(_long_values(pid_ok, canon[ok]))
        notes.append(activity_frame(pd.DataFrame({
            "person_id": pid_ok, "email": emails[ok], "entity_type": entity, "dynamics_type": entity,
            "dynamics_id": dids[ok], "action": "create", "detail": f"new {entity} in Dynamics: created the person in Marketo"})))
        msg = ("Marketo refused to create the person: " + pd.Series(e_codes[~ok], dtype=object).fillna("").astype(str) + " "
               + pd.Series(e_messages[~ok], dtype=object).fillna("").astype(str) + "; retried next cycle")
        notes.append(activity_frame(pd.DataFrame({"email": emails[~ok], "entity_type": entity, "dynamics_type": entity,
                                                  "dynamics_id": dids[~ok], "action": "error", "detail": msg.to_numpy()})))
        if ok.any():  # the Dynamics records now name their person (link column)
            link_rows = [{ent.id_column: d, config.dynamics.marketo_id_column: str(p)} for d, p in zip(dids[ok], pid_ok)]
            res = dynamics_client.update_multiple(ent.entity_set, link_rows)
            bad = ~res["ok"].astype(bool).to_numpy()
            if bad.any():
                log.warning("dynamics: could not set %s on %d new %ss (%s); the next cycle sets it",
                            config.dynamics.marketo_id_column, int(bad.sum()), entity,
                            res.loc[bad, "error_message"].head(3).tolist())
    return _gather(out, links, values, notes, errors)


def _made_already(client, recs: list[dict], dids: np.ndarray, link_field: str, exists: np.ndarray, pids, codes,
                  messages) -> None:
    """Creates Marketo skipped as "1005 Lead already exists" whose person names the very Dynamics record: made by an
    earlier try of this task (or by a slow first request that landed after its retry). They count as created, so a
    retried create ends as the first try did; a person with that email who names another record stays refused."""
    at = [i for i in np.flatnonzero(np.asarray(exists, dtype=bool)) if recs[i].get("email")]
    if not at:
        return
    found = client.get_leads("email", [recs[i]["email"] for i in at], ["id", link_field])
    if found.empty:
        return
    mine = pd.Series(found["id"].to_numpy(), index=found[link_field].astype(str).str.lower().to_numpy())
    mine = mine[~mine.index.duplicated(keep=False)]
    for i in at:
        pid = mine.get(str(dids[i]).lower())
        if pid is not None and not pd.isna(pid):
            pids[i], codes[i], messages[i] = int(pid), None, None


def _import_creates(client, recs: list[dict], dids: np.ndarray, link_field: str, poll_seconds: float):
    """Creates through the Bulk Lead Import (by email); the new ids come from one bulk export of persons created
    since the import started, matched by the Dynamics id they carry."""
    started = datetime.now(timezone.utc) - timedelta(seconds=5)
    log.info("marketo: creating %d persons through the Bulk Lead Import", len(recs))
    res = client.import_leads(recs, lookup_field="email")
    went_in = res["status"].isin(["created", "updated", "imported"]).to_numpy()  # by email: no id comes back
    created = client.export_leads(["id", link_field], created_at=(started, datetime.now(timezone.utc) + timedelta(seconds=5)),
                                  poll_interval_s=poll_seconds)
    by_did = pd.Series(created["id"].to_numpy(), index=created[link_field].astype(str).str.lower().to_numpy())
    by_did = by_did[~by_did.index.duplicated(keep="last")]
    pids = pd.array(pd.Series(dids).str.lower().map(by_did).where(went_in), dtype="Int64")
    codes = res["reason_code"].to_numpy().copy()
    messages = res["reason_message"].to_numpy().copy()
    lost = went_in & pd.isna(np.asarray(pids, dtype=object))
    messages[lost] = "imported, but the new person was not found by its Dynamics id; linked by the next cycle"
    return pids, codes, messages


# -- deletes (delete policy propagate) --------------------------------------------------------------------

#: the inactive state a ``deactivate`` sets (entity references: contact statecode 1 Inactive / statuscode 2 Inactive;
#: lead statecode 2 Disqualified / statuscode 7 Canceled)
INACTIVE_STATE = {"contact": {"statecode": 1, "statuscode": 2}, "lead": {"statecode": 2, "statuscode": 7}}


@dataclass
class DeleteOutcome:
    """What the deletes of one load did: error lines and sync errors of those refused, how many went through."""

    activity: pd.DataFrame
    errors: pd.DataFrame
    done: int = 0


def _refused_deletes(part: pd.DataFrame, ok: np.ndarray, codes, messages, where: str, what: str, kept: str) -> tuple:
    """Activity and sync-error rows for deletes a service refused."""
    bad = part[~ok]
    message = (f"{where} refused to {what}: " + pd.Series(codes, dtype=object)[~ok].fillna("").astype(str) + " "
               + pd.Series(messages, dtype=object)[~ok].fillna("").astype(str)).str.strip()
    notes = activity_frame(pd.DataFrame({
        "person_id": bad["person_id"].to_numpy(), "entity_type": bad["entity_type"].to_numpy(),
        "dynamics_type": bad["entity_type"].to_numpy(), "dynamics_id": bad["dynamics_id"].to_numpy(),
        "action": "error", "detail": (message + "; " + kept).to_numpy()}))
    errors = pd.DataFrame({"person_id": bad["person_id"].to_numpy(), "dynamics_type": bad["entity_type"].to_numpy(),
                           "dynamics_id": bad["dynamics_id"].to_numpy(), "target": where.lower(),
                           "field": DELETE_RECORD, "value": None,
                           "code": pd.Series(codes, dtype=object)[~ok].to_numpy(), "message": message.to_numpy()})
    return notes, errors


def delete_in_dynamics(config: SyncConfig, deletes: pd.DataFrame, client, *, dry_run: bool = False) -> DeleteOutcome:
    """Delete, or deactivate, the Dynamics records of persons deleted in Marketo (delete policy ``propagate``).

    :param deletes: identity's deletes with target ``dynamics`` and action ``delete`` or ``deactivate``.
    """
    out = DeleteOutcome(activity_frame([]), pd.DataFrame())
    work = deletes[deletes["action"].isin([DynamicsDeleteAction.DELETE.value, DynamicsDeleteAction.DEACTIVATE.value])]
    if work.empty or dry_run:
        return out
    notes, errors = [], []
    for (entity, action), part in work.groupby(["entity_type", "action"], sort=False):
        ent = config.entity(entity)
        ids = part["dynamics_id"].astype(str).to_numpy()
        if action == DynamicsDeleteAction.DELETE.value:
            log.info("dynamics: deleting %d %ss whose Marketo person was deleted", len(ids), entity)
            res = client.delete_multiple(ent.entity_set, ids)
        else:
            log.info("dynamics: deactivating %d %ss whose Marketo person was deleted", len(ids), entity)
            res = client.update_multiple(ent.entity_set, pd.DataFrame({ent.id_column: ids, **INACTIVE_STATE[entity]}))
        ok = res["ok"].astype(bool).to_numpy()
        out.done += int(ok.sum())
        n, e = _refused_deletes(part, ok, res["error_code"].to_numpy(), res["error_message"].to_numpy(), "Dynamics",
                                f"{action} the {entity}", f"the {entity} is kept, unlinked")
        notes.append(n)
        errors.append(e)
    out.activity = pd.concat(notes, ignore_index=True)
    out.errors = pd.concat([e for e in errors if not e.empty], ignore_index=True) if any(not e.empty for e in errors) \
        else pd.DataFrame()
    return out


def delete_in_marketo(deletes: pd.DataFrame, client, *, dry_run: bool = False) -> DeleteOutcome:
    """Delete the Marketo persons of records deleted in Dynamics (delete policy ``propagate``): Delete Leads,
    300 ids per call. A person Marketo no longer has (1004) counts as deleted.

    :param deletes: identity's deletes with target ``marketo`` and action ``delete``.
    """
    out = DeleteOutcome(activity_frame([]), pd.DataFrame())
    work = deletes[deletes["action"].eq("delete")]
    if work.empty or dry_run:
        return out
    log.info("marketo: deleting %d persons whose Dynamics record was deleted", len(work))
    res = client.delete_leads(work["person_id"].astype("int64").tolist())
    ok = (res["status"].eq("deleted") | res["reason_code"].astype(str).eq("1004")).to_numpy()
    out.done = int(ok.sum())
    out.activity, out.errors = _refused_deletes(work, ok, res["reason_code"].to_numpy(), res["reason_message"].to_numpy(),
                                                "Marketo", "delete the person", "the person is kept, unlinked")
    return out


# -- merges in Marketo (a Dynamics merge or a lead qualified into an existing contact left two persons) ------

#: the pseudo-field of a refused Merge Leads call in sync errors
MERGE_PERSONS = "(merge)"


@dataclass
class MergeOutcome(DeleteOutcome):
    """What the Marketo merges of one load did: the error lines and sync errors of those refused, and every merge's
    outcome (``winner_id, loser_id, ok``), so the commit remembers the persons merged away."""

    results: pd.DataFrame = None


def merge_in_marketo(merges: pd.DataFrame, client, *, dry_run: bool = False) -> MergeOutcome:
    """Merge the persons identity decided to merge (``winner_id, loser_id, entity_type, dynamics_id, detail``): one
    Merge Leads call per winner and 25 losers (:meth:`~mdsync.marketo.MarketoClient.merge_persons`). A refused
    merge is an ``error`` line and a sync error naming both persons and what Marketo said; the persons stay apart.
    """
    out = MergeOutcome(activity_frame([]), pd.DataFrame(),
                       results=pd.DataFrame(columns=["winner_id", "loser_id", "ok"]))
    if merges.empty or dry_run:
        return out
    log.info("marketo: merging %d persons into %d (Merge Leads)", len(merges), merges["winner_id"].nunique())
    res = client.merge_persons(merges[["winner_id", "loser_id"]])
    ok = res["ok"].fillna(False).astype(bool).to_numpy()
    out.done, out.results = int(ok.sum()), res[["winner_id", "loser_id"]].assign(ok=ok)
    bad = merges.reset_index(drop=True)[~ok]
    message = ("Marketo refused to merge person " + bad["loser_id"].astype(str) + " into " + bad["winner_id"].astype(str)
               + ": " + (res["error_code"][~ok].fillna("").astype(str) + " " + res["error_message"][~ok].fillna("")
                         .astype(str)).str.strip().to_numpy() + "; both persons are kept")
    out.activity = activity_frame(pd.DataFrame({
        "person_id": bad["winner_id"].to_numpy(), "entity_type": bad["entity_type"].to_numpy(),
        "dynamics_type": bad["entity_type"].to_numpy(), "dynamics_id": bad["dynamics_id"].to_numpy(),
        "action": "error", "detail": message.to_numpy()}))
    out.errors = pd.DataFrame({"person_id": bad["loser_id"].to_numpy(), "dynamics_type": bad["entity_type"].to_numpy(),
                               "dynamics_id": bad["dynamics_id"].to_numpy(), "target": "marketo",
                               "field": MERGE_PERSONS, "value": bad["winner_id"].astype(str).to_numpy(),
                               "code": res["error_code"][~ok].to_numpy(), "message": message.to_numpy()})
    if not bad.empty:
        log.warning("marketo: %d of %d merges refused: %s", len(bad), len(merges), message.head(3).tolist())
    return out


# -- rejections in Marketo's activity log ------------------------------------------------------------------

def record_rejections_in_marketo(config: SyncConfig, rejected: pd.DataFrame, client) -> int:
    """Add a custom activity per Dynamics rejection to the person's Marketo activity log.

    :param rejected: Dynamics results that failed (person_id, dynamics_id, field, value, error_code, error_message).
    :returns: how many activities were added.
    """
    if rejected.empty:
        return 0
    type_id = client.ensure_custom_activity_type(
        config.marketo.error_activity_type, "Dynamics Sync Error",
        primary_attribute={"apiName": "dynamicsField", "name": "Dynamics Field", "dataType": "string"},
        attributes=[
            {"apiName": "dynamicsRecordId", "name": "Dynamics Record Id", "dataType": "string"},
            {"apiName": "rejectedValue", "name": "Rejected Value", "dataType": "string"},
            {"apiName": "errorMessage", "name": "Error Message", "dataType": "string"},
        ],
        description="A value the Marketo-Dynamics sync could not write to Dynamics 365",
    )
    now = datetime.now(timezone.utc)
    value = rejected["value"].astype(object)
    value = value.where(value.isna(), value.astype(str).str.slice(0, 255))
    message = (rejected["error_code"].fillna("").astype(str) + " " + rejected["error_message"].fillna("").astype(str)
               ).str.strip().str.slice(0, 255)
    records = [{"leadId": int(pid), "activityDate": now, "activityTypeId": type_id, "primaryAttributeValue": str(f),
                "attributes": {"dynamicsRecordId": str(did), "rejectedValue": None if pd.isna(v) else v, "errorMessage": m}}
               for pid, f, did, v, m in zip(rejected["person_id"], rejected["field"], rejected["dynamics_id"], value, message)]
    result = client.add_custom_activities(records)
    added = int((result["status"] == "added").sum())
    if added < len(records):
        log.warning("marketo: %d of %d sync-error activities were not added: %s", len(records) - added, len(records),
                    result.loc[result["status"] != "added", "reason_message"].head(3).tolist())
    return added

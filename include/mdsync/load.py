"""Stage 5 of the cycle: load (DESIGN §4.4): batched writes with a result per record and field.

Dynamics first (``UpdateMultiple`` in chunks of 1000, ``$batch`` continue-on-error when a chunk fails), then
Marketo (Sync Leads ``updateOnly`` by id, 300 per call). A value longer than the target column allows is not
sent and not truncated: it is reported. A record the target rejects is re-sent one field at a time, so its
other fields still sync and the rejection is pinned on the field that caused it. Dynamics rejections are
also written to the person's Marketo activity log as a custom activity, as the native sync does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone

import pandas as pd

from mdsync.canonical import to_dynamics, to_marketo
from mdsync.config import EntityConfig, SyncConfig

log = logging.getLogger("mdsync.load")

RESULT_COLUMNS = ["person_id", "dynamics_id", "field", "value", "ok", "error_code", "error_message"]
#: the pseudo-field of link-field writes in results
LINK_FIELD = "(link)"

Sender = Callable[[list[dict]], list[tuple[bool, str | None, str | None]]]


def _too_long(writes: pd.DataFrame, max_length: dict[str, int], where: str) -> pd.Series:
    """Per write row: an error message when the value is longer than the target allows, else None."""
    limits = pd.to_numeric(writes["field"].astype(object).map(max_length), errors="coerce").to_numpy(dtype=float)
    lengths = writes["value"].astype("str").str.len().to_numpy(dtype=float, na_value=0)
    over = lengths > limits  # NaN limits (no MaxLength) compare False
    messages = pd.Series(None, index=writes.index, dtype=object)
    for i in writes.index[over]:
        pos = writes.index.get_loc(i)
        messages[i] = (f"value is {int(lengths[pos])} characters but {where} allows {int(limits[pos])}; "
                       "not sent (values are never truncated)")
    return messages


def write_records(writes: pd.DataFrame, key_column: str, to_api: Callable[[pd.DataFrame], dict],
                  send: Sender) -> pd.DataFrame:
    """Send long writes grouped per record; re-send rejected records one field at a time.

    :param writes: long writes (``key_column``, ``field``, ``value``, …).
    :param to_api: turns one record's write rows into the API record.
    :param send: sends API records, returns ``(ok, error_code, error_message)`` per record in order.
    :returns: ``writes`` with ``ok``, ``error_code``, ``error_message`` per row.
    """
    out = writes.assign(ok=False, error_code=None, error_message=None)
    if writes.empty:
        return out
    groups = list(writes.groupby(key_column, sort=False).groups.items())
    outcomes = send([to_api(writes.loc[idx]) for _, idx in groups])
    retry = []
    for (_, idx), (ok, code, message) in zip(groups, outcomes):
        if ok:
            out.loc[idx, "ok"] = True
        elif len(idx) > 1:
            retry += [[i] for i in idx]
        else:
            out.loc[idx, ["error_code", "error_message"]] = [code, message]
    if retry:
        log.info("re-sending %d fields of rejected records one at a time", len(retry))
        for idx, (ok, code, message) in zip(retry, send([to_api(writes.loc[idx]) for idx in retry])):
            out.loc[idx, "ok"] = ok
            if not ok:
                out.loc[idx, ["error_code", "error_message"]] = [code, message]
    return out


def load_dynamics(config: SyncConfig, entity: EntityConfig, writes: pd.DataFrame, link_writes: pd.DataFrame,
                  max_length: dict[str, int], client, *, dry_run: bool = False) -> pd.DataFrame:
    """Write one entity type's planned updates and link columns to Dataverse.

    :param writes: the plan's Dynamics writes (canonical values, long).
    :param link_writes: ``dynamics_id, person_id`` rows whose Marketo-id column must be (re)set.
    :returns: one row per write: :data:`RESULT_COLUMNS`.
    """
    fields = {f.name: f for f in entity.fields}
    rows = writes[["person_id", "dynamics_id", "field", "value"]].copy()
    if not link_writes.empty:
        rows = pd.concat([rows, link_writes.assign(field=LINK_FIELD, value=link_writes["person_id"].astype(str))],
                         ignore_index=True)
    rows = rows.reset_index(drop=True)
    refused = _too_long(rows, max_length, f"Dataverse column {entity.entity_set}")
    if dry_run or rows.empty:
        return _dry(rows, refused, dry_run)
    api_names = {n: f.dynamics for n, f in fields.items()}
    link_column = config.dynamics.marketo_id_column

    def to_api(part: pd.DataFrame) -> dict:
        record = {entity.id_column: str(part["dynamics_id"].iloc[0])}
        for name, chunk in part.groupby("field", sort=False):
            if name == LINK_FIELD:
                record[link_column] = str(chunk["value"].iloc[0])
            else:
                record[api_names[name]] = to_dynamics(chunk["value"], fields[name]).iloc[0]
        return record

    def send(records: list[dict]):
        res = client.update_multiple(entity.entity_set, records)
        return [(bool(r["ok"]), r.get("error_code"), r.get("error_message")) for r in res.to_dict("records")]

    ok_rows = rows[refused.isna().to_numpy()]
    result = write_records(ok_rows, "dynamics_id", to_api, send)
    return _with_refused(result, rows, refused)


def load_marketo(config: SyncConfig, entities: dict[str, EntityConfig], writes: pd.DataFrame, link_writes: pd.DataFrame,
                 max_length: dict[str, int], client, *, dry_run: bool = False) -> pd.DataFrame:
    """Write planned person updates and link fields to Marketo (``updateOnly`` by id).

    :param writes: the plans' Marketo writes of every entity type, with an ``entity_type`` column.
    :param link_writes: ``person_id, dynamics_id, dynamics_type`` rows whose link fields must be (re)set.
    """
    link = config.marketo.link_fields
    rows = writes[["person_id", "dynamics_id", "field", "value", "entity_type"]].copy()
    if not link_writes.empty:
        encoded = link_writes["dynamics_type"].astype(str) + ":" + link_writes["dynamics_id"].astype(str)
        rows = pd.concat([rows, link_writes[["person_id", "dynamics_id"]].assign(
            field=LINK_FIELD, value=encoded, entity_type=link_writes["dynamics_type"])], ignore_index=True)
    rows = rows.reset_index(drop=True)
    refused = _too_long(rows, max_length, "the Marketo field")
    if dry_run or rows.empty:
        return _dry(rows, refused, dry_run)

    def to_api(part: pd.DataFrame) -> dict:
        record = {"id": int(part["person_id"].iloc[0])}
        for (name, etype), chunk in part.groupby(["field", "entity_type"], sort=False):
            if name == LINK_FIELD:
                kind, did = str(chunk["value"].iloc[0]).split(":", 1)
                record[link.dynamics_id], record[link.dynamics_type] = did, kind
            else:
                f = entities[etype].field(name)
                record[f.marketo] = to_marketo(chunk["value"], f).iloc[0]
        return record

    def send(records: list[dict]):
        res = client.sync_leads(records, action="updateOnly", lookup_field="id")
        return [(r["status"] in ("updated", "created"), r.get("reason_code"), r.get("reason_message"))
                for r in res.to_dict("records")]

    ok_rows = rows[refused.isna().to_numpy()]
    result = write_records(ok_rows, "person_id", to_api, send)
    return _with_refused(result, rows, refused)


def _dry(rows: pd.DataFrame, refused: pd.Series, dry_run: bool) -> pd.DataFrame:
    out = rows.assign(ok=False, error_code=None, error_message=refused.to_numpy())
    if dry_run:
        out["error_code"] = out["error_message"].map(lambda m: "too_long" if m else "dry_run")
    return out


def _with_refused(result: pd.DataFrame, rows: pd.DataFrame, refused: pd.Series) -> pd.DataFrame:
    bad = rows[refused.notna().to_numpy()].assign(ok=False, error_code="too_long", error_message=refused.dropna().to_numpy())
    return pd.concat([result, bad]).sort_index() if not bad.empty else result


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
    records = [{
        "leadId": int(r["person_id"]), "activityDate": now, "activityTypeId": type_id,
        "primaryAttributeValue": str(r["field"]),
        "attributes": {"dynamicsRecordId": str(r["dynamics_id"]), "rejectedValue": None if pd.isna(r["value"]) else str(r["value"])[:255],
                       "errorMessage": f"{r['error_code'] or ''} {r['error_message'] or ''}".strip()[:255]},
    } for r in rejected.to_dict("records")]
    result = client.add_custom_activities(records)
    added = int((result["status"] == "added").sum())
    if added < len(records):
        log.warning("marketo: %d of %d sync-error activities were not added: %s", len(records) - added, len(records),
                    result.loc[result["status"] != "added", "reason_message"].head(3).tolist())
    return added

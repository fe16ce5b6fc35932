"""SQLite storage of the Marketo sandbox: leads, activities, custom activity types, bulk export and import jobs.

Designed for a million leads: one wide, indexed ``leads`` table, keyset paging on ``id``, bulk inserts via
``executemany``. One connection guarded by a lock: SQLite serialises writers anyway, and the lock keeps a
sync (read old values, write new ones, record activities) atomic.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from .fields import FIELDS_BY_NAME, LEAD_FIELDS, UNSUPPORTED_LOOKUPS, LeadField
from .values import InvalidValue, format_datetime, from_db, parse_datetime, to_db, to_text, utc_now

NEW_LEAD = 12
CHANGE_DATA_VALUE = 13
MERGE_LEADS = 32
DELETE_LEAD = 37
API_SOURCE = "Web service API"
#: Standard activity types the sandbox records (id, name, primary attribute, secondary attributes).
STANDARD_ACTIVITY_TYPES = [
    (NEW_LEAD, "New Lead", ("Lead ID", "integer"), [("Created Date", "date"), ("Source Type", "string")]),
    (
        CHANGE_DATA_VALUE,
        "Change Data Value",
        ("Lead Field", "integer"),
        [("New Value", "string"), ("Old Value", "string"), ("Reason", "string"), ("Source", "string")],
    ),
    (MERGE_LEADS, "Merge Leads", ("Lead ID", "integer"),
     [("Merge IDs", "string"), ("Merge Source", "string"), ("Merged in Sales", "boolean"),
      ("Master Updated", "boolean")]),
    (DELETE_LEAD, "Delete Lead", ("Lead ID", "integer"), [("Remove from CRM", "boolean")]),
]
CUSTOM_TYPE_FIRST_ID = 100001
MAX_CUSTOM_TYPES = 10
MAX_CUSTOM_ATTRIBUTES = 20
EXPORT_QUEUE_LIMIT = 10
EXPORT_MAX_PROCESSING = 2
EXPORT_DAILY_BYTES = 500 * 1024 * 1024
EXPORT_MAX_RANGE = timedelta(days=31)
#: Columns of a bulk activity export file, in the default order (bulk-activity-extract.md "fields").
ACTIVITY_EXPORT_FIELDS = ("marketoGUID", "leadId", "activityDate", "activityTypeId", "campaignId",
                          "primaryAttributeValueId", "primaryAttributeValue", "attributes")
ACTIVITY_EXPORT_OPTIONAL = ("actionResult",)
#: primaryAttributeValueIds / primaryAttributeValues take at most 50 entries each (bulk-activity-extract.md).
ACTIVITY_EXPORT_MAX_PRIMARY = 50
ACTIVITY_TYPE_FIELDS = ("string", "boolean", "integer", "float", "link", "email", "currency", "date", "datetime",
                        "phone", "text")


class ApiError(Exception):
    """A response-level Marketo error (``success: false``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


def encode_token(kind: str, value: str) -> str:
    """A paging token: base32 like Marketo's, carrying either a date (``d``) or a position (``p``)."""
    return base64.b32encode(f"{kind}:{value}".encode()).decode()


def decode_token(token: str) -> tuple[str, str]:
    """Inverse of :func:`encode_token`; a malformed token is Marketo's 1003 "Invalid paging token"."""
    try:
        kind, value = base64.b32decode(token.strip() + "=" * (-len(token.strip()) % 8)).decode().split(":", 1)
    except Exception:
        raise ApiError("1003", "Invalid paging token") from None
    if kind not in ("d", "p", "l"):
        raise ApiError("1003", "Invalid paging token")
    return kind, value


def _q(name: str) -> str:
    return '"' + name + '"'


@dataclass
class SyncResult:
    """One record's outcome in Sync Leads / Delete Leads / Add Custom Activities."""

    status: str
    id: int | None = None
    reasons: list[dict] = field(default_factory=list)
    echo: dict = field(default_factory=dict)

    def as_json(self, reason_key: str = "reasons") -> dict:
        out: dict = {}
        if self.id is not None:
            out["id"] = self.id
        out["status"] = self.status
        if self.reasons:
            out[reason_key] = self.reasons
        out.update(self.echo)
        return out


class MarketoStore:
    """All sandbox data in one SQLite file under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.export_dir = self.data_dir / "exports"
        self.export_dir.mkdir(exist_ok=True)
        self.import_dir = self.data_dir / "imports"
        self.import_dir.mkdir(exist_ok=True)
        #: While set, queued bulk jobs (exports and imports) are not started (admin ``/_sandbox/bulk/hold``).
        self.bulk_hold = threading.Event()
        self.lock = threading.RLock()
        self.db = sqlite3.connect(self.data_dir / "marketo.sqlite3", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA cache_size=-200000")
        self._create_schema()

    # ------------------------------------------------------------------ schema
    def _create_schema(self) -> None:
        cols = ", ".join(
            f"{_q(f.name)} {f.sql_type}" + (" COLLATE NOCASE" if f.data_type == "email" else "")
            for f in LEAD_FIELDS
            if f.name != "id"
        )
        self.db.executescript(
            f"""
            CREATE TABLE IF NOT EXISTS leads (id INTEGER PRIMARY KEY AUTOINCREMENT, {cols});
            CREATE INDEX IF NOT EXISTS leads_email ON leads(email COLLATE NOCASE);
            CREATE INDEX IF NOT EXISTS leads_created ON leads(createdAt);
            CREATE INDEX IF NOT EXISTS leads_updated ON leads(updatedAt);
            CREATE INDEX IF NOT EXISTS leads_dynamics_id ON leads(dynamicsRecordId);
            CREATE TABLE IF NOT EXISTS activities (
                id INTEGER PRIMARY KEY AUTOINCREMENT, leadId INTEGER NOT NULL, activityDate TEXT NOT NULL,
                activityTypeId INTEGER NOT NULL, primaryAttributeValueId INTEGER, primaryAttributeValue TEXT,
                field TEXT, oldValue TEXT, newValue TEXT, attributes TEXT NOT NULL, insertedAt TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS activities_type ON activities(activityTypeId, id);
            CREATE INDEX IF NOT EXISTS activities_inserted ON activities(insertedAt);
            CREATE TABLE IF NOT EXISTS activity_types (
                id INTEGER PRIMARY KEY, apiName TEXT UNIQUE NOT NULL, status TEXT NOT NULL,
                approved TEXT, draft TEXT, createdAt TEXT NOT NULL, updatedAt TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS exports (
                exportId TEXT PRIMARY KEY, status TEXT NOT NULL, request TEXT NOT NULL, format TEXT NOT NULL,
                createdAt TEXT NOT NULL, queuedAt TEXT, startedAt TEXT, finishedAt TEXT, numberOfRecords INTEGER,
                fileSize INTEGER, fileChecksum TEXT, errorMsg TEXT);
            CREATE TABLE IF NOT EXISTS imports (
                batchId INTEGER PRIMARY KEY AUTOINCREMENT, status TEXT NOT NULL, format TEXT NOT NULL,
                lookupField TEXT NOT NULL, createdAt TEXT NOT NULL, startedAt TEXT, finishedAt TEXT,
                numOfLeadsProcessed INTEGER NOT NULL DEFAULT 0, numOfRowsFailed INTEGER NOT NULL DEFAULT 0,
                numOfRowsWithWarning INTEGER NOT NULL DEFAULT 0, message TEXT);
            CREATE INDEX IF NOT EXISTS activities_date ON activities(activityDate);
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
            """
        )
        # Lead and activity exports share one queue (bulk-extract.md "Queue"); ``kind`` tells them apart.
        # Databases written before activity exports existed get the column, their jobs being lead exports.
        if "kind" not in {r[1] for r in self.db.execute("PRAGMA table_info(exports)")}:
            self.db.execute("ALTER TABLE exports ADD COLUMN kind TEXT NOT NULL DEFAULT 'leads'")
        # Keep activity and custom type ids in Marketo's ranges.
        self.db.execute(
            "INSERT OR IGNORE INTO sqlite_sequence(name, seq) SELECT 'activities', 1000 "
            "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name='activities')"
        )

    def reset(self) -> None:
        """Wipe all data (leads, activities, custom types, exports, quota counters)."""
        with self.lock:
            self.db.executescript(
                "DELETE FROM leads; DELETE FROM activities; DELETE FROM activity_types; DELETE FROM exports;"
                "DELETE FROM imports; DELETE FROM meta; DELETE FROM sqlite_sequence WHERE name IN ('leads', 'imports');"
            )
            for folder in (self.export_dir, self.import_dir):
                for f in folder.glob("*"):
                    f.unlink()

    @contextmanager
    def transaction(self):
        """One locked write transaction: all of it or none of it."""
        with self.lock:
            self.db.execute("BEGIN")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # ------------------------------------------------------------------ meta / quotas
    def increment_counter(self, key: str, by: int = 1) -> int:
        """Add ``by`` to a persistent counter (daily quota, export bytes) and return the new value."""
        with self.lock:
            row = self.db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                "SET value = CAST(value AS INTEGER) + excluded.value RETURNING value",
                (key, by),
            ).fetchone()
            return int(row[0])

    def counter(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ leads: read
    def _select(self, fields: list[LeadField]) -> str:
        return ", ".join("id" if f.name == "id" else _q(f.name) for f in fields)

    @staticmethod
    def _row_to_lead(fields: list[LeadField], row) -> dict:
        return {f.name: from_db(f, v) for f, v in zip(fields, row)}

    def resolve_fields(self, names: list[str] | None, default: tuple[str, ...]) -> list[LeadField]:
        """Field objects for a ``fields`` parameter; unknown names are ignored like Marketo does."""
        wanted = names or list(default)
        out = [FIELDS_BY_NAME["id"]]
        out += [FIELDS_BY_NAME[n] for n in wanted if n in FIELDS_BY_NAME and n != "id"]
        return out

    def leads_by_filter(self, filter_type: str, values: list[str], fields: list[LeadField], after_id: int,
                        batch_size: int) -> tuple[list[dict], bool]:
        """Leads whose ``filter_type`` field matches one of ``values``, in id order after ``after_id``."""
        if filter_type not in FIELDS_BY_NAME:
            raise ApiError("1006", f"Field '{filter_type}' not found")
        if filter_type in UNSUPPORTED_LOOKUPS:
            raise ApiError("1011", f"Field '{filter_type}' not supported")
        fobj = FIELDS_BY_NAME[filter_type]
        try:
            params = [to_db(fobj, v) for v in values]
        except InvalidValue as exc:
            raise ApiError("1003", f"Invalid filterValues: {exc.message}") from None
        params = [p for p in params if p is not None]
        if not params:
            return [], False
        col = "id" if filter_type == "id" else _q(filter_type)
        collate = " COLLATE NOCASE" if fobj.data_type == "email" else ""
        sql = (
            f"SELECT {self._select(fields)} FROM leads WHERE {col}{collate} IN ({','.join('?' * len(params))})"
            f" AND id > ? ORDER BY id LIMIT ?"
        )
        with self.lock:
            rows = self.db.execute(sql, [*params, after_id, batch_size + 1]).fetchall()
        more = len(rows) > batch_size
        return [self._row_to_lead(fields, r) for r in rows[:batch_size]], more

    def lead_by_id(self, lead_id: int, fields: list[LeadField]) -> dict | None:
        with self.lock:
            row = self.db.execute(f"SELECT {self._select(fields)} FROM leads WHERE id = ?", (lead_id,)).fetchone()
        return self._row_to_lead(fields, row) if row else None

    def count_leads(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM leads").fetchone()[0]

    # ------------------------------------------------------------------ leads: write
    def seed_leads(self, leads: list[dict]) -> tuple[int, int]:
        """Bulk insert without activities (admin seeding). Returns (first id, last id).

        :raises ValueError: naming the record index, field and value that is invalid.
        """
        now = format_datetime(utc_now())
        names = [f.name for f in LEAD_FIELDS if f.name != "id"]
        position = {n: i for i, n in enumerate(names)}
        created_i, updated_i = position["createdAt"], position["updatedAt"]
        rows = []
        for i, lead in enumerate(leads):
            row = [None] * len(names)
            # Only the fields a lead carries are converted: seeding a million leads stays fast.
            for n, value in lead.items():
                if n not in position:
                    raise ValueError(f"lead #{i}: unknown field {n!r}")
                try:
                    row[position[n]] = to_db(FIELDS_BY_NAME[n], value)
                except InvalidValue as exc:
                    raise ValueError(f"lead #{i}: field {n!r} value {value!r}: {exc.message}") from None
            row[created_i] = row[created_i] or now
            row[updated_i] = row[updated_i] or row[created_i]
            rows.append(row)
        sql = f"INSERT INTO leads ({', '.join(_q(n) for n in names)}) VALUES ({', '.join('?' * len(names))})"
        with self.transaction():
            start = self.last_lead_id()
            self.db.executemany(sql, rows)
            end = self.last_lead_id()
        return start + 1, end

    def last_lead_id(self) -> int:
        """The highest lead id ever given (AUTOINCREMENT never reuses the id of a deleted lead)."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'leads'").fetchone()
        return max(row[0] if row else 0, self.db.execute("SELECT COALESCE(MAX(id), 0) FROM leads").fetchone()[0])

    def _record_activity(self, lead_id: int, type_id: int, when: str, **kwargs) -> int:
        return self.db.execute(ACTIVITY_INSERT, activity_row(lead_id, type_id, when, **kwargs)).lastrowid

    def _validate_record(self, record: dict) -> dict[str, object]:
        values = {}
        for name, raw in record.items():
            f = FIELDS_BY_NAME.get(name)
            if f is None:
                raise InvalidValue("1006", f"Field '{name}' not found")
            if f.read_only and name != "id":
                raise InvalidValue("1003", f"Field '{name}' is not updateable")
            values[name] = to_db(f, raw)
        return values

    def _apply_changes(self, lead_id: int, current: dict, values: dict, when: str, reason: str) -> bool:
        changed = {n: v for n, v in values.items() if n != "id" and current.get(n) != v}
        if not changed:
            return False
        sets = ", ".join(f"{_q(n)} = ?" for n in changed)
        self.db.execute(f"UPDATE leads SET {sets}, updatedAt = ? WHERE id = ?", [*changed.values(), when, lead_id])
        self.db.executemany(ACTIVITY_INSERT, [change_activity(lead_id, FIELDS_BY_NAME[n], current.get(n), v, when,
                                                              reason) for n, v in changed.items()])
        return True

    def _create_lead(self, values: dict, when: str) -> int:
        values = {n: v for n, v in values.items() if n != "id" and v is not None}
        cols = [*values, "createdAt", "updatedAt"]
        cur = self.db.execute(
            f"INSERT INTO leads ({', '.join(_q(c) for c in cols)}) VALUES ({', '.join('?' * len(cols))})",
            [*values.values(), when, when],
        )
        lead_id = cur.lastrowid
        self.db.execute(ACTIVITY_INSERT, new_lead_activity(lead_id, when))
        return lead_id

    def _full_row(self, where: str, params) -> list[dict]:
        names = [f.name for f in LEAD_FIELDS]
        rows = self.db.execute(f"SELECT {self._select(LEAD_FIELDS)} FROM leads WHERE {where}", params).fetchall()
        return [dict(zip(names, r)) for r in rows]

    def sync_leads(self, action: str, lookup_field: str, records: list[dict]) -> list[SyncResult]:
        """Create and/or update leads one by one, in input order; each record gets its own status."""
        if lookup_field not in FIELDS_BY_NAME:
            raise ApiError("1006", f"Field '{lookup_field}' not found")
        if lookup_field in UNSUPPORTED_LOOKUPS:
            raise ApiError("1011", f"Field '{lookup_field}' not supported")
        if lookup_field == "id" and action != "updateOnly":
            raise ApiError("1003", "Lookup field 'id' is only valid with action 'updateOnly'")
        results = []
        with self.transaction():
            for record in records:
                results.append(self._sync_one(action, lookup_field, record))
        return results

    def _sync_one(self, action: str, lookup_field: str, record) -> SyncResult:
        def skipped(code: str, message: str) -> SyncResult:
            return SyncResult("skipped", reasons=[{"code": code, "message": message}])

        if not isinstance(record, dict):
            return skipped("1003", "Invalid data: each input record must be a JSON object")
        try:
            values = self._validate_record(record)
        except InvalidValue as exc:
            return skipped(exc.code, exc.message)
        if "id" in record and action != "updateOnly":
            return skipped("1003", "Invalid data: 'id' may only be sent with action 'updateOnly'")
        when = format_datetime(utc_now())
        if action == "createDuplicate":
            return SyncResult("created", id=self._create_lead(values, when))
        key = values.get(lookup_field)
        if key is None:
            return skipped("1003", f"Value for lookup field '{lookup_field}' not specified")
        col = "id" if lookup_field == "id" else _q(lookup_field)
        collate = " COLLATE NOCASE" if FIELDS_BY_NAME[lookup_field].data_type == "email" else ""
        matches = self._full_row(f"{col}{collate} = ? LIMIT 2", (key,))
        if len(matches) > 1 and action != "createOnly":
            return skipped("1007", "Multiple leads match the lookup criteria")
        if matches:
            if action == "createOnly":
                return skipped("1005", "Lead already exists")
            current = matches[0]
            self._apply_changes(current["id"], current, values, when, "API sync")
            return SyncResult("updated", id=current["id"])
        if action == "updateOnly":
            return skipped("1004", "Lead not found")
        return SyncResult("created", id=self._create_lead(values, when))

    def delete_leads(self, ids: list) -> list[SyncResult]:
        """Delete leads by id, recording a Delete Lead activity for each."""
        results = []
        with self.transaction():
            for raw in ids:
                lead_id = raw.get("id") if isinstance(raw, dict) else raw
                row = self._full_row("id = ?", (lead_id,)) if isinstance(lead_id, int) else []
                if not row:
                    results.append(SyncResult("skipped", id=lead_id if isinstance(lead_id, int) else None,
                                              reasons=[{"code": "1004", "message": "Lead not found"}]))
                    continue
                self._delete_one(row[0], [{"name": "Remove from CRM", "value": False}])
                results.append(SyncResult("deleted", id=lead_id))
        return results

    def _delete_one(self, lead: dict, attributes: list[dict]) -> None:
        name = " ".join(p for p in (lead.get("firstName"), lead.get("lastName")) if p) or lead.get("email") or ""
        self.db.execute("DELETE FROM leads WHERE id = ?", (lead["id"],))
        self._record_activity(lead["id"], DELETE_LEAD, format_datetime(utc_now()), primary_id=lead["id"],
                              primary=name, attributes=attributes)

    def merge_leads(self, winner_id: int, loser_ids: list[int], merge_in_crm: bool = False) -> None:
        """Merge losers into the winner (Merge Leads, leads.md "Merge"), all or nothing.

        Field values: the winner's, except where it has none and a loser has one (the first loser with one, in
        the order given). Activity logs are combined: the losers' activities become the winner's. The losers are
        deleted from the lead database (a Delete Lead activity each, as for a deletion; their ids are never
        given again) and the winner gets one Merge Leads activity (32) naming them in ``Merge IDs``
        (``[id,id]``), with ``Merge Source`` "Web service API", ``Merged in Sales`` (the sandbox syncs no CRM,
        so ``mergeInCRM`` merges nothing there: always false) and ``Master Updated`` (whether the winner's
        fields changed). Unknown ids are 1004 "Lead not found" and nothing is merged.
        """
        losers_given = list(dict.fromkeys(loser_ids))
        if winner_id in losers_given:
            raise ApiError("1003", f"Invalid leadIds: {winner_id} is the winning lead and cannot also be a "
                                   "losing lead")
        with self.transaction():
            winner = self._full_row("id = ?", (winner_id,))
            rows = {r["id"]: r for r in self._full_row(f"id IN ({','.join('?' * len(losers_given))})",
                                                         losers_given)}
            missing = ([] if winner else [winner_id]) + [i for i in losers_given if i not in rows]
            if missing:
                raise ApiError("1004", f"Lead not found: {', '.join(map(str, missing))}")
            winner = winner[0]
            losers = [rows[i] for i in losers_given]
            fill = {}
            for loser in losers:
                for f in LEAD_FIELDS:
                    if f.read_only or f.name in fill or winner.get(f.name) not in (None, ""):
                        continue
                    if loser.get(f.name) not in (None, ""):
                        fill[f.name] = loser[f.name]
            when = format_datetime(utc_now())
            marks = ",".join("?" * len(losers_given))
            self.db.execute(f"UPDATE activities SET leadId = ? WHERE leadId IN ({marks})", [winner_id, *losers_given])
            for loser in losers:
                self._delete_one(loser, [{"name": "Remove from CRM", "value": False}])
            updated = self._apply_changes(winner_id, winner, fill, when, "Merge leads")
            self._record_activity(winner_id, MERGE_LEADS, when, primary_id=winner_id, primary=str(winner_id),
                                  attributes=[{"name": "Merge IDs", "value": f"[{','.join(map(str, losers_given))}]"},
                                              {"name": "Merge Source", "value": API_SOURCE},
                                              {"name": "Merged in Sales", "value": False},
                                              {"name": "Master Updated", "value": updated}])

    # ------------------------------------------------------------------ activities
    def paging_token(self, since: datetime) -> str:
        """A date-based token for activities that occur at or after ``since``."""
        return encode_token("d", format_datetime(since))

    def _after_id(self, token: str) -> int:
        kind, value = decode_token(token)
        if kind == "p":
            return int(value)
        if kind != "d":
            raise ApiError("1003", "Invalid paging token")
        row = self.db.execute("SELECT MIN(id) FROM activities WHERE insertedAt >= ?", (value,)).fetchone()
        if row[0] is not None:
            return row[0] - 1
        return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM activities").fetchone()[0]

    def activities_page(self, token: str, where: str, params: list, batch_size: int) -> tuple[list[tuple], str, bool]:
        """One page of activities after the token's position, matching ``where``; returns rows, token, more."""
        cols = ("id, leadId, activityDate, activityTypeId, primaryAttributeValueId, primaryAttributeValue, field,"
                " oldValue, newValue, attributes")
        with self.lock:
            after = self._after_id(token)
            rows = self.db.execute(
                f"SELECT {cols} FROM activities WHERE id > ? AND ({where}) ORDER BY id LIMIT ?",
                [after, *params, batch_size + 1],
            ).fetchall()
            more = len(rows) > batch_size
            rows = rows[:batch_size]
            if rows:
                position = rows[-1][0]
            else:
                # Nothing matched after the position: everything up to the newest activity has been seen.
                position = max(after, self.db.execute("SELECT COALESCE(MAX(id), 0) FROM activities").fetchone()[0])
        return rows, encode_token("p", str(position)), more

    # ------------------------------------------------------------------ custom activity types
    def activity_types(self, *, custom_only: bool = False) -> list[dict]:
        rows = self.db.execute("SELECT id, apiName, status, approved, draft, createdAt, updatedAt FROM activity_types"
                               " ORDER BY id").fetchall()
        out = []
        for rid, api, status, approved, draft, created, updated in rows:
            body = json.loads(approved or draft)
            out.append({"id": rid, "apiName": api, **body, "createdAt": created, "updatedAt": updated,
                        "status": status})
        return out

    def activity_type(self, api_name: str, *, draft: bool = False) -> dict:
        row = self.db.execute("SELECT id, status, approved, draft, createdAt, updatedAt FROM activity_types "
                              "WHERE apiName = ?", (api_name,)).fetchone()
        if row is None:
            raise ApiError("1013", f"Activity type '{api_name}' not found")
        rid, status, approved, dr, created, updated = row
        body = json.loads((dr if draft or approved is None else approved) or approved)
        return {"id": rid, "apiName": api_name, **body, "createdAt": created, "updatedAt": updated, "status": status}

    def create_activity_type(self, body: dict) -> dict:
        for key in ("apiName", "name", "triggerName", "filterName", "primaryAttribute"):
            if not body.get(key):
                raise ApiError("701", f"{key} cannot be blank")
        api = body["apiName"]
        _check_api_name(api, "activity type")
        primary = body["primaryAttribute"]
        if not isinstance(primary, dict) or not primary.get("apiName") or not primary.get("name"):
            raise ApiError("701", "primaryAttribute.apiName and primaryAttribute.name cannot be blank")
        _check_api_name(primary["apiName"], "primary attribute")
        with self.lock:
            if self.db.execute("SELECT 1 FROM activity_types WHERE apiName = ?", (api,)).fetchone():
                raise ApiError("1017", f"Activity type '{api}' already exists")
            taken = self.db.execute("SELECT COUNT(*) FROM activity_types WHERE status != 'deleted'").fetchone()[0]
            if taken >= MAX_CUSTOM_TYPES:
                raise ApiError("1027", "Max Activity Type Limit Reached")
            new_id = max(CUSTOM_TYPE_FIRST_ID - 1,
                         self.db.execute("SELECT COALESCE(MAX(id), 0) FROM activity_types").fetchone()[0]) + 1
            doc = {k: body.get(k) for k in ("name", "description", "triggerName", "filterName") if body.get(k)}
            doc["primaryAttribute"] = {"apiName": primary["apiName"], "name": primary["name"],
                                       "description": primary.get("description", ""),
                                       "dataType": primary.get("dataType", "string")}
            doc["attributes"] = []
            now = format_datetime(utc_now())
            self.db.execute("INSERT INTO activity_types (id, apiName, status, approved, draft, createdAt, updatedAt)"
                            " VALUES (?, ?, 'draft', NULL, ?, ?, ?)", (new_id, api, json.dumps(doc), now, now))
        return self.activity_type(api, draft=True)

    def create_activity_type_attributes(self, api_name: str, attributes: list[dict]) -> dict:
        with self.lock:
            current = self.activity_type(api_name, draft=True)
            attrs = list(current.get("attributes", []))
            known = {a["apiName"] for a in attrs} | {current["primaryAttribute"]["apiName"]}
            for a in attributes:
                if not isinstance(a, dict) or not a.get("apiName") or not a.get("name") or not a.get("dataType"):
                    raise ApiError("701", "attribute apiName, name and dataType cannot be blank")
                _check_api_name(a["apiName"], "attribute")
                if a["dataType"] not in ACTIVITY_TYPE_FIELDS:
                    raise ApiError("1003", f"Invalid dataType '{a['dataType']}' for attribute '{a['apiName']}'")
                if a["apiName"] in known:
                    raise ApiError("1017", f"Attribute '{a['apiName']}' already exists")
                known.add(a["apiName"])
                attrs.append({"apiName": a["apiName"], "name": a["name"], "description": a.get("description", ""),
                              "dataType": a["dataType"]})
            if len(attrs) > MAX_CUSTOM_ATTRIBUTES:
                raise ApiError("1028", "Max field limit reached")
            doc = {k: v for k, v in current.items() if k not in ("id", "apiName", "createdAt", "updatedAt", "status")}
            doc["attributes"] = attrs
            status = "draft" if current["status"] == "draft" else "approved with draft"
            self.db.execute("UPDATE activity_types SET draft = ?, status = ?, updatedAt = ? WHERE apiName = ?",
                            (json.dumps(doc), status, format_datetime(utc_now()), api_name))
        return self.activity_type(api_name, draft=True)

    def approve_activity_type(self, api_name: str) -> dict:
        with self.lock:
            row = self.db.execute("SELECT draft FROM activity_types WHERE apiName = ?", (api_name,)).fetchone()
            if row is None:
                raise ApiError("1013", f"Activity type '{api_name}' not found")
            if row[0] is None:
                raise ApiError("709", f"Activity type '{api_name}' has no draft to approve")
            self.db.execute("UPDATE activity_types SET approved = draft, draft = NULL, status = 'approved', "
                            "updatedAt = ? WHERE apiName = ?", (format_datetime(utc_now()), api_name))
        return self.activity_type(api_name)

    def add_custom_activities(self, records: list) -> list[SyncResult]:
        types = {t["id"]: t for t in self.activity_types() if t["status"] in ("approved", "approved with draft")}
        results = []
        with self.transaction():
            for rec in records:
                results.append(self._add_custom_activity(rec, types))
        return results

    def _add_custom_activity(self, rec, types: dict) -> SyncResult:
        def skipped(code, message):
            return SyncResult("skipped", reasons=[{"code": code, "message": message}])

        if not isinstance(rec, dict):
            return skipped("1003", "Invalid data: each input record must be a JSON object")
        for key in ("leadId", "activityDate", "activityTypeId", "primaryAttributeValue"):
            if rec.get(key) in (None, ""):
                return skipped("1002", f"Missing value for the required parameter '{key}'")
        atype = types.get(rec["activityTypeId"])
        if atype is None:
            return skipped("1003", f"Invalid activityTypeId {rec['activityTypeId']}: not an approved custom type")
        try:
            when = format_datetime(parse_datetime(str(rec["activityDate"])))
        except ValueError:
            return skipped("1001", f"Invalid value '{rec['activityDate']}'. Required of type 'datetime'")
        if not self.db.execute("SELECT 1 FROM leads WHERE id = ?", (rec["leadId"],)).fetchone():
            return skipped("1004", "Lead not found")
        by_key = {}
        for a in atype.get("attributes", []):
            by_key[a["apiName"]] = a
            by_key[a["name"]] = a
        attrs = []
        for a in rec.get("attributes") or []:
            key = a.get("apiName") or a.get("name")
            if key not in by_key:
                return skipped("1006", f"Field '{key}' not found")
            attrs.append({"name": by_key[key]["name"], "apiName": by_key[key]["apiName"], "value": a.get("value")})
        if len(json.dumps(attrs)) > 65536:
            return skipped("1049", "Failed to Create Activity: attributes array too long")
        act_id = self._record_activity(rec["leadId"], rec["activityTypeId"], when,
                                       primary=str(rec["primaryAttributeValue"]), attributes=attrs)
        # The Swagger CustomActivity result carries the activity's own members next to its status.
        echo = {"leadId": rec["leadId"], "activityDate": when, "activityTypeId": rec["activityTypeId"],
                "primaryAttributeValue": str(rec["primaryAttributeValue"]), "attributes": attrs, "errors": []}
        return SyncResult("added", id=act_id, echo=echo)

    # ------------------------------------------------------------------ bulk export (leads and activities)
    def create_export(self, body: dict) -> dict:
        """Create a lead export job (Create Export Lead Job)."""
        fields = body.get("fields")
        if not isinstance(fields, list) or not fields:
            raise ApiError("1003", "fields cannot be blank")
        unknown = [f for f in fields if f not in FIELDS_BY_NAME]
        if unknown:
            raise ApiError("1003", f"Invalid fields: {', '.join(map(str, unknown))}")
        fmt = _export_format(body)
        flt = body.get("filter") or {}
        date_filters = [k for k in ("createdAt", "updatedAt") if k in flt]
        if len(flt) != 1 or not date_filters:
            raise ApiError("1003", "Exactly one filter is required: createdAt or updatedAt "
                                   "(static and smart list filters are not emulated)")
        _date_range(flt, date_filters[0])
        return self._new_export("leads", body, fmt)

    def create_activity_export(self, body: dict) -> dict:
        """Create an activity export job (Create Export Activity Job, bulk-activity-extract.md)."""
        fmt = _export_format(body)
        fields = body.get("fields")
        if fields is not None:
            if not isinstance(fields, list) or not fields:
                raise ApiError("1003", "fields must be a non-empty array")
            unknown = [f for f in fields if f not in ACTIVITY_EXPORT_FIELDS + ACTIVITY_EXPORT_OPTIONAL]
            if unknown:
                raise ApiError("1003", f"Invalid fields: {', '.join(map(str, unknown))}; allowed: "
                                       f"{', '.join(ACTIVITY_EXPORT_FIELDS + ACTIVITY_EXPORT_OPTIONAL)}")
        flt = body.get("filter")
        if not isinstance(flt, dict) or "createdAt" not in flt:
            raise ApiError("1003", "filter.createdAt is required")
        extra = set(flt) - {"createdAt", "activityTypeIds", "primaryAttributeValueIds", "primaryAttributeValues"}
        if extra:
            raise ApiError("1003", f"Invalid filter: {', '.join(sorted(extra))}")
        _date_range(flt, "createdAt")
        types = flt.get("activityTypeIds")
        if types is not None:
            if not isinstance(types, list) or not types or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                   for t in types):
                raise ApiError("1003", "activityTypeIds must be a non-empty array of integers")
            if DELETE_LEAD in types:
                raise ApiError("1003", f"Activity type {DELETE_LEAD} (Delete Lead) is not supported by bulk "
                                       "activity export; use Get Deleted Leads")
        ids, names = flt.get("primaryAttributeValueIds"), flt.get("primaryAttributeValues")
        if ids is not None and names is not None:
            raise ApiError("1003", "primaryAttributeValueIds and primaryAttributeValues cannot be used together")
        for key, kind in (("primaryAttributeValueIds", int), ("primaryAttributeValues", str)):
            given = flt.get(key)
            if given is None:
                continue
            if types is None:
                raise ApiError("1003", f"{key} requires the activityTypeIds filter")
            if not isinstance(given, list) or not given or not all(isinstance(v, kind) for v in given):
                raise ApiError("1003", f"{key} must be a non-empty array of {kind.__name__} values")
            if len(given) > ACTIVITY_EXPORT_MAX_PRIMARY:
                raise ApiError("1003", f"{key} accepts at most {ACTIVITY_EXPORT_MAX_PRIMARY} values, "
                                       f"{len(given)} given")
        return self._new_export("activities", body, fmt)

    def _new_export(self, kind: str, body: dict, fmt: str) -> dict:
        self._check_export_quota()
        now = format_datetime(utc_now())
        export_id = str(uuid.uuid4())
        with self.lock:
            self.db.execute("INSERT INTO exports (exportId, kind, status, request, format, createdAt) "
                            "VALUES (?, ?, 'Created', ?, ?, ?)", (export_id, kind, json.dumps(body), fmt, now))
        return self.export_status(export_id, kind)

    def _check_export_quota(self) -> None:
        if self.counter(f"export-bytes:{quota_day()}") >= EXPORT_DAILY_BYTES:
            raise ApiError("1029", "Export daily quota exceeded")

    def export_status(self, export_id: str, kind: str = "leads") -> dict:
        """A job of ``kind`` (``leads`` or ``activities``) as the status endpoints return it."""
        row = self.db.execute("SELECT exportId, status, format, createdAt, queuedAt, startedAt, finishedAt, "
                              "numberOfRecords, fileSize, fileChecksum, errorMsg FROM exports "
                              "WHERE exportId = ? AND kind = ?", (export_id, kind)).fetchone()
        if row is None:
            raise ApiError("1029", f"Export job '{export_id}' not found")
        keys = ("exportId", "status", "format", "createdAt", "queuedAt", "startedAt", "finishedAt",
                "numberOfRecords", "fileSize", "fileChecksum", "errorMsg")
        return {k: v for k, v in zip(keys, row) if v is not None}

    def list_exports(self, statuses: list[str] | None, kind: str = "leads") -> list[dict]:
        ids = [r[0] for r in self.db.execute("SELECT exportId, status FROM exports WHERE kind = ? ORDER BY createdAt",
                                             (kind,)).fetchall()
               if not statuses or r[1] in statuses]
        return [self.export_status(i, kind) for i in ids]

    def enqueue_export(self, export_id: str, kind: str = "leads") -> dict:
        with self.lock:
            job = self.export_status(export_id, kind)
            if job["status"] != "Created":
                raise ApiError("1029", "Job already queued")
            self._check_export_quota()
            # One queue for every export kind (bulk-extract.md "Queue").
            queued = self.db.execute("SELECT COUNT(*) FROM exports WHERE status IN ('Queued', 'Processing')"
                                     ).fetchone()[0]
            if queued >= EXPORT_QUEUE_LIMIT:
                raise ApiError("1029", "Too many jobs in queue")
            self.db.execute("UPDATE exports SET status = 'Queued', queuedAt = ? WHERE exportId = ?",
                            (format_datetime(utc_now()), export_id))
        return self.export_status(export_id, kind)

    def cancel_export(self, export_id: str, kind: str = "leads") -> dict:
        with self.lock:
            job = self.export_status(export_id, kind)
            if job["status"] in ("Created", "Queued", "Processing"):
                self.db.execute("UPDATE exports SET status = 'Cancelled' WHERE exportId = ?", (export_id,))
        return self.export_status(export_id, kind)

    def next_export(self) -> str | None:
        """Move the oldest queued job to Processing if a slot is free (2 run at once) and return its id."""
        if self.bulk_hold.is_set():
            return None
        with self.lock:
            running = self.db.execute("SELECT COUNT(*) FROM exports WHERE status = 'Processing'").fetchone()[0]
            if running >= EXPORT_MAX_PROCESSING:
                return None
            row = self.db.execute("SELECT exportId FROM exports WHERE status = 'Queued' ORDER BY queuedAt, createdAt"
                                  " LIMIT 1").fetchone()
            if row is None:
                return None
            self.db.execute("UPDATE exports SET status = 'Processing', startedAt = ? WHERE exportId = ?",
                            (format_datetime(utc_now()), row[0]))
            return row[0]

    def export_file(self, export_id: str) -> Path:
        return self.export_dir / f"{export_id}.csv"

    def run_export(self, export_id: str) -> None:
        """Write the job's file (streamed from SQLite, nulls as ``null``) and mark it Completed."""
        kind, request = self.db.execute("SELECT kind, request FROM exports WHERE exportId = ?",
                                        (export_id,)).fetchone()
        body = json.loads(request)
        headers = body.get("columnHeaderNames") or {}
        delimiter = {"CSV": ",", "TSV": "\t", "SSV": " "}[body.get("format") or "CSV"]
        if kind == "activities":
            names, sql, params, render = _activity_export_query(body)
        else:
            fields = [FIELDS_BY_NAME[n] for n in body["fields"]]
            names = [f.name for f in fields]
            (key, rng), = body["filter"].items()
            sql = f"SELECT {self._select(fields)} FROM leads WHERE {_q(key)} >= ? AND {_q(key)} <= ? ORDER BY id"
            params = (format_datetime(parse_datetime(rng["startAt"])), format_datetime(parse_datetime(rng["endAt"])))

            def render(row):
                return ["null" if v is None else to_text(f, v) for f, v in zip(fields, row)]
        path = self.export_file(export_id)
        digest = hashlib.sha256()
        count = 0
        # A separate read connection: the export must not hold the lock other calls need.
        reader = sqlite3.connect(self.data_dir / "marketo.sqlite3")
        try:
            with open(path, "wb") as out:
                buf = io.StringIO()
                writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
                writer.writerow([headers.get(n, n) for n in names])
                for row in reader.execute(sql, params):
                    writer.writerow(render(row))
                    count += 1
                    if buf.tell() > 1 << 20:
                        data = buf.getvalue().encode()
                        out.write(data)
                        digest.update(data)
                        buf.seek(0)
                        buf.truncate()
                data = buf.getvalue().encode()
                out.write(data)
                digest.update(data)
        finally:
            reader.close()
        size = path.stat().st_size
        with self.lock:
            status = self.db.execute("SELECT status FROM exports WHERE exportId = ?", (export_id,)).fetchone()[0]
            if status != "Processing":  # cancelled meanwhile
                path.unlink(missing_ok=True)
                return
            self.db.execute("UPDATE exports SET status = 'Completed', finishedAt = ?, numberOfRecords = ?, "
                            "fileSize = ?, fileChecksum = ? WHERE exportId = ?",
                            (format_datetime(utc_now()), count, size, "sha256:" + digest.hexdigest(), export_id))
        self.increment_counter(f"export-bytes:{quota_day()}", size)

    def fail_export(self, export_id: str, message: str) -> None:
        with self.lock:
            self.db.execute("UPDATE exports SET status = 'Failed', finishedAt = ?, errorMsg = ? WHERE exportId = ?",
                            (format_datetime(utc_now()), message, export_id))


def _export_format(body: dict) -> str:
    fmt = body.get("format") or "CSV"
    if fmt not in ("CSV", "TSV", "SSV"):
        raise ApiError("1003", f"Invalid format '{fmt}': must be CSV, TSV or SSV")
    return fmt


def _date_range(flt: dict, key: str) -> tuple[datetime, datetime]:
    """A filter's ``{startAt, endAt}``: ISO 8601, in order, at most 31 days apart (1003 otherwise)."""
    rng = flt[key]
    try:
        start, end = parse_datetime(rng["startAt"]), parse_datetime(rng["endAt"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ApiError("1003", f"Invalid {key} filter: startAt and endAt must be ISO-8601") from None
    if end < start or end - start > EXPORT_MAX_RANGE:
        raise ApiError("1003", f"{key} filter date range must be between 0 and 31 days")
    return start, end


def _activity_export_query(body: dict):
    """Columns, SQL, parameters and row renderer of an activity export (attributes as a JSON object)."""
    names = list(body.get("fields") or ACTIVITY_EXPORT_FIELDS)
    flt = body["filter"]
    start, end = _date_range(flt, "createdAt")
    where = ["activityDate >= ?", "activityDate <= ?"]
    params: list = [format_datetime(start), format_datetime(end)]
    types = flt.get("activityTypeIds")
    if types:
        where.append(f"activityTypeId IN ({','.join('?' * len(types))})")
        params += types
    else:  # Delete Lead is never exported (bulk-activity-extract.md)
        where.append(f"activityTypeId != {DELETE_LEAD}")
    for key, col in (("primaryAttributeValueIds", "primaryAttributeValueId"),
                     ("primaryAttributeValues", "primaryAttributeValue")):
        if flt.get(key):
            where.append(f"{col} IN ({','.join('?' * len(flt[key]))})")
            params += flt[key]
    sql = ("SELECT id, leadId, activityDate, activityTypeId, primaryAttributeValueId, primaryAttributeValue, "
           f"attributes FROM activities WHERE {' AND '.join(where)} ORDER BY id")

    def render(row):
        act_id, lead_id, date, type_id, prim_id, prim, attrs = row
        values = {"marketoGUID": act_id, "leadId": lead_id, "activityDate": date, "activityTypeId": type_id,
                  "campaignId": None, "primaryAttributeValueId": prim_id, "primaryAttributeValue": prim,
                  "attributes": json.dumps({a["name"]: a.get("value") for a in json.loads(attrs)},
                                           separators=(",", ":"), ensure_ascii=False),
                  "actionResult": "succeeded"}
        return ["null" if values[n] is None else values[n] for n in names]

    return names, sql, params, render


ACTIVITY_INSERT = ("INSERT INTO activities (leadId, activityDate, activityTypeId, primaryAttributeValueId,"
                   " primaryAttributeValue, field, oldValue, newValue, attributes, insertedAt)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def activity_row(lead_id: int, type_id: int, when: str, *, primary_id=None, primary=None, attributes=(),
                 field_name=None, old=None, new=None, inserted: str | None = None) -> tuple:
    """The parameters of :data:`ACTIVITY_INSERT` for one activity (``inserted`` defaults to now)."""
    attrs = attributes if isinstance(attributes, str) else json.dumps(list(attributes))
    return (lead_id, when, type_id, primary_id, primary, field_name, old, new, attrs,
            inserted or format_datetime(utc_now()))


def change_activity(lead_id: int, f: LeadField, old, new, when: str, reason: str, inserted: str | None = None
                    ) -> tuple:
    """A Change Data Value activity (13) for ``f`` going from stored value ``old`` to ``new``."""
    old, new = to_text(f, old), to_text(f, new)
    # The attributes JSON written by hand: a bulk import records millions of these.
    attrs = [f'{{"name": "New Value", "value": {_json_str(new)}}}'] if new is not None else []
    if old is not None:
        attrs.append(f'{{"name": "Old Value", "value": {_json_str(old)}}}')
    attrs.append(f'{{"name": "Reason", "value": {_json_str(reason)}}}, {_API_SOURCE_JSON}')
    return activity_row(lead_id, CHANGE_DATA_VALUE, when, primary_id=f.id, primary=f.display_name,
                        attributes="[" + ", ".join(attrs) + "]", field_name=f.name, old=old, new=new,
                        inserted=inserted)


def new_lead_activity(lead_id: int, when: str, inserted: str | None = None) -> tuple:
    """A New Lead activity (12) for a lead created at ``when``."""
    return activity_row(lead_id, NEW_LEAD, when, primary_id=lead_id, primary=str(lead_id),
                        attributes=[{"name": "Created Date", "value": when[:10]},
                                    {"name": "Source Type", "value": API_SOURCE}], inserted=inserted)


_json_str = json.encoder.encode_basestring_ascii
_API_SOURCE_JSON = f'{{"name": "Source", "value": {_json_str(API_SOURCE)}}}'


def quota_day() -> str:
    """The quota day: Marketo's daily quotas reset at midnight US Central time."""
    from zoneinfo import ZoneInfo

    return datetime.now(ZoneInfo("America/Chicago")).date().isoformat()


def _check_api_name(name, what: str) -> None:
    # Custom activity API names: alphanumeric, at least one letter, at most 255 characters (activities.md).
    if not isinstance(name, str) or not name.isascii() or not name.isalnum() or not any(c.isalpha() for c in name) \
            or len(name) > 255:
        raise ApiError("1003", f"Invalid apiName '{name}' for {what}: must be alphanumeric with at least one letter"
                               " and at most 255 characters")

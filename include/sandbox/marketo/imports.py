"""Bulk Lead Import jobs of the Marketo sandbox (bulk-import.md, bulk-lead-import.md).

A job reads an uploaded CSV/TSV/SSV file whose header names REST fields, and inserts or updates one lead
per row ("insert or update"; lookup by ``id`` is update only). Rows are checked with the rules Sync Leads
applies to a record (unknown field 1006, read-only field 1003, type/length/email 1001, lookup 1004/1007),
and each rejected row is written to the job's failure file: the row's own cells plus one reason column.

**Blank cells.** The reference documents no way for an import to clear a field, and says nothing about
blank cells; the sandbox treats an empty cell as "no value given for this field": the lead keeps its
current value. (Only Lead Database JSON writes document that null or "" is written as null.) Clears go
through Sync Leads.

Warnings (the job's warning file) are rows that were imported but deserve a look: the same lookup value on
an earlier row of the same file (both rows are applied, in file order).

Processing is set-based: validation in Python, existing leads read in chunks, then one ``executemany`` each
for new leads, updated leads and activities (New Lead 12, Change Data Value 13, as Sync Leads records them).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .fields import FIELDS_BY_NAME, UNSUPPORTED_LOOKUPS
from .store import ACTIVITY_INSERT, ApiError, MarketoStore, _q, change_activity, new_lead_activity
from .values import InvalidValue, format_datetime, to_db, utc_now

IMPORT_MAX_FILE = 10 * 1024 * 1024
IMPORT_QUEUE_LIMIT = 10  # queued jobs, the two importing included (bulk-lead-import.md)
IMPORT_MAX_PROCESSING = 2
#: ``format`` values and their delimiters: comma, tab, semicolon (bulk-import.md "Common Parameters").
DELIMITERS = {"csv": ",", "tsv": "\t", "ssv": ";"}
FAILURE_COLUMN = "Import Failure Reason"
WARNING_COLUMN = "Import Warning Reason"
IMPORT_REASON = "Bulk lead import"
PARTITIONS = ("Default",)
_LOOKUP_CHUNK = 900
_STATUS_KEYS = ("batchId", "status", "numOfLeadsProcessed", "numOfRowsFailed", "numOfRowsWithWarning", "message")


class ImportJobs:
    """Create, run and report Bulk Lead Import jobs on a :class:`~sandbox.marketo.store.MarketoStore`."""

    def __init__(self, store: MarketoStore) -> None:
        self.store = store
        self.db = store.db
        self.peak_importing = 0

    # ------------------------------------------------------------------ API
    def create(self, data: bytes | None, fmt: str | None, lookup: str | None, list_id: str | None,
               partition: str | None) -> dict:
        """Queue a job for an uploaded file (Import Leads); the file is kept beside the database."""
        fmt = (fmt or "csv").lower()
        if fmt not in DELIMITERS:
            raise ApiError("1003", f"Invalid format '{fmt}': must be csv, tsv or ssv")
        lookup = lookup or "email"
        if lookup not in FIELDS_BY_NAME:
            raise ApiError("1006", f"Field '{lookup}' not found")
        if lookup in UNSUPPORTED_LOOKUPS:
            raise ApiError("1011", f"Field '{lookup}' not supported")
        if list_id not in (None, ""):
            if not str(list_id).isdigit():
                raise ApiError("1003", f"Invalid listId '{list_id}'")
            raise ApiError("1013", f"Static list {list_id} not found (the sandbox has no static lists)")
        if partition not in (None, "") and partition.lower() not in (p.lower() for p in PARTITIONS):
            raise ApiError("1003", f"Partition '{partition}' not found: the sandbox has one partition, 'Default'")
        if not data:
            raise ApiError("701", "file cannot be blank")
        with self.store.lock:
            queued = self.db.execute("SELECT COUNT(*) FROM imports WHERE status IN ('Queued', 'Importing')"
                                     ).fetchone()[0]
            if queued >= IMPORT_QUEUE_LIMIT:
                raise ApiError("1016", "Too many imports")
            batch_id = self.db.execute("INSERT INTO imports (status, format, lookupField, createdAt) "
                                       "VALUES ('Queued', ?, ?, ?)",
                                       (fmt, lookup, format_datetime(utc_now()))).lastrowid
            self._path(batch_id, "input").write_bytes(data)
        return self.status(batch_id)

    def status(self, batch_id: int) -> dict:
        """The job as Get Import Lead Status returns it."""
        row = self.db.execute(f"SELECT {', '.join(_STATUS_KEYS)} FROM imports WHERE batchId = ?",
                              (batch_id,)).fetchone()
        if row is None:
            raise ApiError("1013", f"Import batch {batch_id} not found")
        out = {k: v for k, v in zip(_STATUS_KEYS, row) if v is not None}
        out["importId"] = str(batch_id)
        return out

    def report(self, batch_id: int, which: str) -> tuple[bytes, str]:
        """The failure or warning file of a finished job, and its media type."""
        job = self.status(batch_id)
        if job["status"] not in ("Complete", "Failed"):
            raise ApiError("1003", f"Import batch {batch_id} is {job['status']}: its {which} file is available "
                                   "once it is Complete")
        path = self._path(batch_id, which)
        fmt = self.db.execute("SELECT format FROM imports WHERE batchId = ?", (batch_id,)).fetchone()[0]
        media = "text/tab-separated-values" if fmt == "tsv" else "text/csv"
        return (path.read_bytes() if path.exists() else b""), media

    # ------------------------------------------------------------------ worker
    def next_job(self) -> int | None:
        """Move the oldest queued job to Importing when fewer than two are importing; return its id."""
        if self.store.bulk_hold.is_set():
            return None
        with self.store.lock:
            running = self.db.execute("SELECT COUNT(*) FROM imports WHERE status = 'Importing'").fetchone()[0]
            if running >= IMPORT_MAX_PROCESSING:
                return None
            row = self.db.execute("SELECT batchId FROM imports WHERE status = 'Queued' ORDER BY batchId LIMIT 1"
                                  ).fetchone()
            if row is None:
                return None
            self.db.execute("UPDATE imports SET status = 'Importing', startedAt = ? WHERE batchId = ?",
                            (format_datetime(utc_now()), row[0]))
            self.peak_importing = max(self.peak_importing, running + 1)
            return row[0]

    def fail(self, batch_id: int, message: str) -> None:
        """Mark a job Failed with ``message`` (nothing of it was imported)."""
        with self.store.lock:
            self.db.execute("UPDATE imports SET status = 'Failed', finishedAt = ?, message = ? WHERE batchId = ?",
                            (format_datetime(utc_now()), message, batch_id))

    def run(self, batch_id: int) -> None:
        """Import the job's file and mark it Complete, or Failed when the file as a whole is unusable."""
        fmt, lookup = self.db.execute("SELECT format, lookupField FROM imports WHERE batchId = ?",
                                      (batch_id,)).fetchone()
        delimiter = DELIMITERS[fmt]
        try:
            text = self._path(batch_id, "input").read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            self.fail(batch_id, f"Import file is not UTF-8 text (byte {exc.start}): nothing imported")
            return
        try:
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
            header = next(reader, None)
            problem = _header_problem(header, lookup)
            if problem:
                self.fail(batch_id, f"{problem}: nothing imported")
                return
            header = [h.strip() for h in header]
            rows = [(n, cells) for n, cells in enumerate(reader, start=2) if cells]
        except csv.Error as exc:
            self.fail(batch_id, f"Import file is not valid {fmt.upper()}: {exc} (line {reader.line_num}): "
                                "nothing imported")
            return
        outcome = _Import(self.store, header, lookup)
        outcome.validate(rows)
        with self.store.transaction():
            outcome.apply()
        ok, failed, warned = len(outcome.imported), len(outcome.failures), len(outcome.warnings)
        self._write_report(batch_id, "failures", header + [FAILURE_COLUMN], outcome.failures, delimiter)
        self._write_report(batch_id, "warnings", header + [WARNING_COLUMN], outcome.warnings, delimiter)
        message = (f"Import completed with errors, {ok} records imported ({ok} members), {failed} failed" if failed
                   else f"Import succeeded, {ok} records imported ({ok} members)")
        with self.store.lock:
            self.db.execute("UPDATE imports SET status = 'Complete', finishedAt = ?, numOfLeadsProcessed = ?, "
                            "numOfRowsFailed = ?, numOfRowsWithWarning = ?, message = ? WHERE batchId = ?",
                            (format_datetime(utc_now()), ok, failed, warned, message, batch_id))

    def _path(self, batch_id: int, which: str) -> Path:
        return self.store.import_dir / f"{batch_id}.{which}"

    def _write_report(self, batch_id: int, which: str, header: list[str], rows: list[tuple[list[str], str]],
                      delimiter: str) -> None:
        if not rows:
            return
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(cells + [reason] for cells, reason in rows)
        self._path(batch_id, which).write_bytes(buf.getvalue().encode())


def _header_problem(header: list[str] | None, lookup: str) -> str | None:
    if not header or not any(h.strip() for h in header):
        return "Import file is empty: its first row must be a header of REST field names"
    names = [h.strip() for h in header]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        return f"Column(s) {', '.join(repr(d) for d in dupes)} appear more than once in the header"
    if lookup not in names:
        return f"The lookup field '{lookup}' is not a column of the file (header: {', '.join(names)})"
    return None


class _Import:
    """One file's rows: validated, matched to leads, applied in file order."""

    def __init__(self, store: MarketoStore, header: list[str], lookup: str) -> None:
        self.store = store
        self.header = header
        self.lookup = lookup
        self.lookup_field = FIELDS_BY_NAME[lookup]
        self.by_email = self.lookup_field.data_type == "email"
        # Columns whose non-blank cells make a row fail, with the Sync Leads reason.
        self.refused: list[tuple[int, str, str]] = []
        self.columns: list[tuple[int, object]] = []
        for i, name in enumerate(header):
            f = FIELDS_BY_NAME.get(name)
            if f is None:
                self.refused.append((i, "1006", f"Field '{name}' not found"))
            elif name == "id" and lookup != "id":
                self.refused.append((i, "1003", "Invalid data: 'id' may only be sent as the lookup field "
                                                "(lookupField=id, update only)"))
            elif f.read_only and name != "id":
                self.refused.append((i, "1003", f"Field '{name}' is not updateable"))
            else:
                self.columns.append((i, f))
        self.written = [f.name for _, f in self.columns if f.name != "id"]
        self.valid: list[tuple[int, list[str], object, dict]] = []
        self.imported: list[int] = []
        self.failures: list[tuple[list[str], str]] = []
        self.warnings: list[tuple[list[str], str]] = []

    def validate(self, rows: list[tuple[int, list[str]]]) -> None:
        """Convert each row's non-blank cells; rows that break a rule go to the failures."""
        width = len(self.header)
        for line, cells in rows:
            if len(cells) != width:
                self.failures.append((cells, f"Invalid data: line {line} has {len(cells)} values, the header "
                                             f"has {width}"))
                continue
            reason = next((msg for i, _code, msg in self.refused if cells[i] != ""), None)
            values = {}
            if reason is None:
                try:
                    for i, f in self.columns:
                        if cells[i] != "":  # a blank cell gives no value: the field keeps what it holds
                            value = to_db(f, cells[i])
                            if value is not None:
                                values[f.name] = value
                except InvalidValue as exc:
                    reason = exc.message
            key = values.get(self.lookup)
            if reason is None and key is None:
                reason = f"Value for lookup field '{self.lookup}' not specified"
            if reason is not None:
                self.failures.append((cells, reason))
                continue
            self.valid.append((line, cells, key.lower() if self.by_email else key, values))

    def _existing(self) -> dict:
        """Leads matching the file's lookup values: normalised key -> list of rows (id + written columns)."""
        keys = list(dict.fromkeys(k for _, _, k, _ in self.valid))
        names = ["id", *[n for n in self.written if n != self.lookup]]
        if self.lookup != "id":
            names.append(self.lookup)
        col = "id" if self.lookup == "id" else _q(self.lookup)
        collate = " COLLATE NOCASE" if self.by_email else ""
        found: dict = {}
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start:start + _LOOKUP_CHUNK]
            sql = (f"SELECT {', '.join('id' if n == 'id' else _q(n) for n in names)} FROM leads "
                   f"WHERE {col}{collate} IN ({','.join('?' * len(chunk))})")
            for row in self.store.db.execute(sql, chunk):
                lead = dict(zip(names, row))
                key = lead[self.lookup]
                found.setdefault(key.lower() if self.by_email else key, []).append(lead)
        return found

    def apply(self) -> None:
        """Create and update leads with their activities; call inside the store's write transaction."""
        when = format_datetime(utc_now())
        existing = self._existing()
        state: dict = {}  # key -> the lead as this file has left it so far
        first_line: dict = {}
        created: dict[int, dict] = {}
        updated: dict[int, dict] = {}
        activities: list[tuple] = []
        next_id = self.store.last_lead_id() + 1
        for line, cells, key, values in self.valid:
            lead = state.get(key)
            if lead is None:
                matches = existing.get(key, [])
                if len(matches) > 1:
                    self.failures.append((cells, "Multiple leads match the lookup criteria"))
                    continue
                lead = matches[0] if matches else None
            if lead is None:
                if self.lookup == "id":
                    self.failures.append((cells, "Lead not found"))
                    continue
                lead = {**values, "id": next_id}
                next_id += 1
                created[lead["id"]] = lead
                activities.append(new_lead_activity(lead["id"], when, when))
            else:
                for name, value in values.items():
                    if name != "id" and lead.get(name) != value:
                        activities.append(change_activity(lead["id"], FIELDS_BY_NAME[name], lead.get(name), value,
                                                          when, IMPORT_REASON, when))
                        lead[name] = value
                        if lead["id"] not in created:
                            updated[lead["id"]] = lead
            if key in state:
                self.warnings.append((cells, f"The lookup value '{cells[self._lookup_index]}' is also on line "
                                             f"{first_line[key]} of this file; both rows were applied in order"))
            else:
                first_line[key] = line
            state[key] = lead
            self.imported.append(lead["id"])
        db = self.store.db
        cols = self.written
        if created:
            names = ["id", *cols, "createdAt", "updatedAt"]
            db.executemany(f"INSERT INTO leads ({', '.join(_q(n) for n in names)}) "
                           f"VALUES ({', '.join('?' * len(names))})",
                           [[lid, *[lead.get(c) for c in cols], when, when] for lid, lead in created.items()])
        if updated:
            sets = ", ".join(f"{_q(c)} = ?" for c in cols)
            db.executemany(f"UPDATE leads SET {sets}, updatedAt = ? WHERE id = ?",
                           [[*[lead.get(c) for c in cols], when, lid] for lid, lead in updated.items()])
        db.executemany(ACTIVITY_INSERT, activities)

    @property
    def _lookup_index(self) -> int:
        return self.header.index(self.lookup)

"""Bulk lead import: records -> CSV files under 10 MB -> import jobs -> one outcome per record
(bulk-import.md, bulk-lead-import.md).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlencode

import pandas as pd

from mdsync.errors import ServiceError

from .frames import records_of, typed_frame

log = logging.getLogger("mdsync.marketo")

IMPORT_PATH = "/bulk/v1/leads.json"
MAX_FILE_BYTES = 10 * 1024 * 1024  # Marketo's limit per import file (bulk-import.md "Limits")
FILE_BYTES = 9_900_000  # what a file is cut at: the multipart envelope must fit under the 10 MB request too
MAX_QUEUED = 10  # import jobs queued per subscription, the two importing included (bulk-lead-import.md)
TOO_MANY_IMPORTS = "1016"
_QUOTE_CHARS = (",", '"', "\n", "\r")
_SHOWN = 20


@dataclass
class _File:
    """One import file: which records it holds, its bytes and each record's rendered cells."""

    number: int
    seqs: list[int] = field(default_factory=list)
    lines: list[list[str]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


@dataclass
class _Job:
    file: _File
    batch_id: int
    submitted: float


def _cell(value) -> str:
    """A JSON-ready value as CSV cell text (booleans true/false, whole floats without ``.0``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _csv_line(cells: list[str]) -> str:
    """One RFC 4180 line: cells with a comma, quote or line break are quoted, quotes doubled."""
    return ",".join('"' + c.replace('"', '""') + '"' if any(q in c for q in _QUOTE_CHARS) else c
                    for c in cells) + "\n"


def _check_records(rows: list[dict], lookup_field: str) -> None:
    """Refuse what a bulk import cannot carry, naming each record: clears (None or ""), no lookup value, objects."""
    clears, no_key, objects = [], [], []
    for seq, rec in enumerate(rows):
        if rec.get(lookup_field) is None:
            no_key.append(f"#{seq}")
        for name, value in rec.items():
            if value is None or value == "":
                clears.append(f"#{seq} {name}")
            elif isinstance(value, (dict, list, tuple, set)):
                objects.append(f"#{seq} {name} ({type(value).__name__})")
    problems = []
    if no_key:
        problems.append(f"{len(no_key)} records without a {lookup_field!r} value (the lookup field), e.g. "
                        f"{', '.join(no_key[:_SHOWN])}")
    if clears:
        problems.append(f"{len(clears)} None/empty values, e.g. {', '.join(clears[:_SHOWN])}: a blank cell in an "
                        "import file leaves the field as it is, so a bulk import cannot clear a field; send clears "
                        "through sync_leads")
    if objects:
        problems.append(f"{len(objects)} values that are not scalars, e.g. {', '.join(objects[:_SHOWN])}")
    if problems:
        raise ValueError("import_leads refused the records (record numbers are input positions): "
                         + "; ".join(problems))


def _files(rows: list[dict], columns: list[str], max_bytes: int) -> list[_File]:
    """The records as CSV files of at most ``max_bytes`` each (header included), in input order."""
    header = _csv_line(columns).encode()
    files: list[_File] = []
    current = None
    for seq, rec in enumerate(rows):
        cells = ["" if rec.get(c) is None else _cell(rec[c]) for c in columns]
        data = _csv_line(cells).encode()
        if len(header) + len(data) > MAX_FILE_BYTES:
            raise ValueError(f"import_leads: record #{seq} alone is {len(data):,} bytes of CSV, over Marketo's "
                             f"10 MB import file limit")
        if current is None or (current.seqs and current.size + len(data) > max_bytes):
            current = _File(len(files) + 1, chunks=[header], size=len(header))
            files.append(current)
        current.seqs.append(seq)
        current.lines.append(cells)
        current.chunks.append(data)
        current.size += len(data)
    return files


class BulkImportMixin:
    """Bulk lead import for :class:`~mdsync.marketo.client.MarketoClient`."""

    def import_leads(self, records, *, lookup_field: str = "id", poll_interval_s: float = 5.0,
                     timeout_s: float = 4 * 3600, max_file_bytes: int = FILE_BYTES) -> pd.DataFrame:
        """Insert or update any number of leads through Bulk Lead Import jobs.

        The records become CSV files of under 10 MB (UTF-8, RFC 4180 quoting, so commas, quotes, line breaks
        and non-ASCII text go through intact). At most 10 jobs are kept queued (Marketo's limit, the two it
        imports at a time included); the next file is submitted as one finishes, and a 1016 "Too many imports"
        answer (other users' jobs) is waited out and the file resubmitted. Each job's status is polled every
        ``poll_interval_s`` (the docs suggest 5-30 s); a round stops at the first job still Queued, as those
        behind it cannot have started. Failure and warning files are downloaded when their counts are above
        zero and their rows mapped back to the input records by the lookup field's value.

        **Blank cells and None.** Import files carry values only: the reference gives no way for a cell to
        clear a field, and the sandbox (like the import it emulates) leaves a field as it is when its cell is
        blank. So a record may leave fields out (a blank cell), but a None or empty-string value, which means
        "clear the field" in :meth:`sync_leads`, is refused: the call raises :class:`ValueError` listing those
        records and fields before anything is sent. Send clears through :meth:`sync_leads`.

        :param records: a frame or an iterable of mappings of REST field names to values; each must carry
            the lookup field.
        :param lookup_field: the dedupe key: ``id`` (update only, the default), ``email`` or a searchable
            custom field (insert or update).
        :param poll_interval_s: seconds between status poll rounds.
        :param timeout_s: give up (:class:`~mdsync.errors.ServiceError` naming the unfinished batches) after this
            long in all.
        :param max_file_bytes: cut files at this size (Marketo's limit is 10 MB; smaller only for testing).
        :returns: one row per input record, in input order, with :meth:`sync_leads`' columns ``seq, id, status,
            reason_code, reason_message``: ``updated`` (lookup by ``id``; ``id`` is the record's) or ``imported``
            (other lookups: the import does not say whether a lead was created or updated, nor its id) for rows
            that went in, with any warning in ``reason_message``; ``skipped`` with the failure file's reason in
            ``reason_message`` for rows that did not (``reason_code`` is None: failure files carry no codes).
        :raises ValueError: for records a bulk import cannot carry (see above).
        :raises ServiceError: when a whole job fails (naming its batch id and Marketo's message) or time runs out.
        """
        rows = records_of(records)
        _check_records(rows, lookup_field)
        columns = list(dict.fromkeys([lookup_field, *(k for rec in rows for k in rec)]))
        files = _files(rows, columns, max_file_bytes)
        outcomes: list[dict] = [{} for _ in rows]
        pending = deque(files)
        active: list[_Job] = []
        query = urlencode({"format": "csv", "lookupField": lookup_field})
        started = time.monotonic()
        deadline = started + timeout_s
        done = 0
        while pending or active:
            while pending and len(active) < MAX_QUEUED:
                f = pending[0]
                try:
                    body = self._call("POST", f"{IMPORT_PATH}?{query}",
                                      files={"file": (f"leads-{f.number}.csv", b"".join(f.chunks), "text/csv")})
                except ServiceError as exc:
                    if exc.code != TOO_MANY_IMPORTS:
                        raise
                    log.info("Marketo bulk import: queue full (1016 %s); file %d/%d waits for a slot",
                             exc.service_message, f.number, len(files))
                    break
                pending.popleft()
                active.append(_Job(f, int(body["result"][0]["batchId"]), time.monotonic()))
            if time.monotonic() > deadline:
                waiting = ", ".join(str(j.batch_id) for j in active) or "none"
                raise self._error(None, f"bulk import not finished after {timeout_s:.0f} s: "
                                  f"{done} of {len(files)} files imported, batches {waiting} still running, "
                                  f"{len(pending)} files not submitted", request=f"GET /bulk/v1/leads/batch/{{id}}.json",
                                  next_step="the running batches go on in Marketo; check them before re-running",
                                  retryable=True)
            time.sleep(poll_interval_s)
            for job in list(active):
                status = self._get(f"/bulk/v1/leads/batch/{job.batch_id}.json")["result"][0]
                if status["status"] == "Complete":
                    self._import_outcomes(job, status, lookup_field, columns, outcomes)
                    active.remove(job)
                    done += 1
                    log.info("Marketo bulk import batch %s (file %d/%d): %d rows, %d failed, %d with warnings; "
                             "waited %.1f s", job.batch_id, job.file.number, len(files), len(job.file.seqs),
                             int(status.get("numOfRowsFailed") or 0), int(status.get("numOfRowsWithWarning") or 0),
                             time.monotonic() - job.submitted)
                elif status["status"] == "Failed":
                    others = [str(j.batch_id) for j in active if j is not job]
                    raise self._error(None, f"import batch {job.batch_id} (file {job.file.number}/"
                                      f"{len(files)}, {len(job.file.seqs)} records from #{job.file.seqs[0]}) "
                                      f"failed: {status.get('message') or 'no message'}",
                                      request=f"POST {IMPORT_PATH}?{query}",
                                      next_step=f"{done} files were imported before it"
                                                + (f"; batches {', '.join(others)} are still running"
                                                   if others else "") + "; fix the file's records and re-run",
                                      retryable=True)
                elif status["status"] == "Queued":
                    break  # FIFO: the jobs submitted after it are queued behind it
        frame = typed_frame([{"seq": seq, **o} for seq, o in enumerate(outcomes)],
                            ["seq", "id", "status", "reason_code", "reason_message"], {"seq": "integer", "id": "integer"})
        return frame.set_index("seq", drop=False).rename_axis(None)

    def _import_outcomes(self, job: _Job, status: dict, lookup_field: str, columns: list[str],
                         outcomes: list[dict]) -> None:
        """Fill the outcome of each record of a Complete job from its failure and warning files."""
        ok = "updated" if lookup_field == "id" else "imported"
        for seq, cells in zip(job.file.seqs, job.file.lines):
            outcomes[seq] = {"id": int(cells[0]) if lookup_field == "id" and cells[0].isdigit() else None, "status": ok,
                             "reason_code": None, "reason_message": None}
        for which, count_key in (("failures", "numOfRowsFailed"), ("warnings", "numOfRowsWithWarning")):
            expected = int(status.get(count_key) or 0)
            if not expected:
                continue
            path = f"/bulk/v1/leads/batch/{job.batch_id}/{which}.json"
            text = self._call("GET", path, raw=True).content.decode("utf-8-sig")
            reported = list(csv.reader(io.StringIO(text, newline="")))
            header, reported = (reported[0], reported[1:]) if reported else ([], [])
            if lookup_field not in header or len(reported) != expected:
                raise self._error(None, f"import batch {job.batch_id} reports {expected} {which} "
                                  f"but its {which} file has {len(reported)} rows"
                                  + ("" if lookup_field in header else f" and no {lookup_field!r} column"),
                                  request=f"GET {path}", next_step="the records' outcomes are unknown; re-run",
                                  retryable=True)
            for seq, reason in self._match_rows(job, header, reported, lookup_field, columns, path):
                if which == "failures":
                    outcomes[seq].update(id=None if lookup_field != "id" else outcomes[seq]["id"],
                                         status="skipped", reason_message=reason)
                else:
                    outcomes[seq]["reason_message"] = reason

    def _match_rows(self, job: _Job, header: list[str], reported: list[list[str]], lookup_field: str,
                    columns: list[str], path: str):
        """(input position, reason) for each row of a failure/warning file, matched by the lookup value.

        Several records with the same lookup value are told apart by their cells, in file order.
        """
        key_at = header.index(lookup_field)
        positions = [header.index(c) if c in header else None for c in columns]
        by_key: dict[str, list[int]] = {}
        for i, cells in enumerate(job.file.lines):
            by_key.setdefault(cells[0], []).append(i)
        for row in reported:
            candidates = by_key.get(row[key_at] if key_at < len(row) else None)
            if not candidates:
                raise self._error(None, f"import batch {job.batch_id}: a reported row has "
                                  f"{lookup_field} {row[key_at:key_at + 1]} which is not in the file sent",
                                  request=f"GET {path}", next_step="the records' outcomes are unknown; re-run",
                                  retryable=True)
            cells_of = [row[p] if p is not None and p < len(row) else "" for p in positions]
            pick = next((i for i in candidates if job.file.lines[i] == cells_of), candidates[0])
            candidates.remove(pick)
            yield job.file.seqs[pick], row[-1]

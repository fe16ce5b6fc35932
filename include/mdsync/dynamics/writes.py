"""Bulk writes: ``UpsertMultiple`` / ``CreateMultiple`` / ``UpdateMultiple`` with a ``$batch`` fallback.

Bulk messages on standard tables are all-or-nothing per request, so one bad record fails its chunk.
When that happens (or the table doesn't support the message) the chunk is re-sent as a ``$batch`` with
``Prefer: odata.continue-on-error``: the good records land, each bad one comes back with the service's
code and message. Upserts address rows by the alternate key on the Marketo-id column (DESIGN §3), so a
retried create updates the row it already made instead of duplicating it.

Chunks go in parallel (send-parallel-requests.md: the way to throughput with bulk messages), up to
``max_parallel_requests`` requests at once (default :data:`DEFAULT_PARALLEL`), lowered to the service's
``x-ms-dop-hint`` (its recommended degree of parallelism, read from the first response), and never more
than the client's ``max_concurrent``. Results come back in input order whatever the order the requests
finish in; a chunk that fails as a whole falls back to ``$batch`` on its own, without touching the other
chunks; each request keeps its own 429 / ``Retry-After`` and 5xx retries. An error that no retry or
fallback can fix stops the write: chunks not yet sent are not sent, those in flight finish, and the error
of the earliest failed chunk is raised.
"""

from __future__ import annotations

import concurrent.futures
import email.parser
import email.policy
import json
import logging
import re
import uuid
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pandas as pd

from mdsync.errors import ServiceError

from . import odata

log = logging.getLogger(__name__)
CHUNK = 1000
_ENTITY_ID = re.compile(r"\(([0-9a-fA-F-]{36})\)\s*$")
_STATUS_LINE = re.compile(r"^HTTP/1\.[01] (\d{3})")
RESULT_COLUMNS = ["index", "id", "ok", "status", "error_code", "error_message"]
#: bulk requests in flight at once when the connection doesn't say (``max_parallel_requests``)
DEFAULT_PARALLEL = 4
#: the response header with the service's recommended degree of parallelism
DOP_HINT_HEADER = "x-ms-dop-hint"
_ISO = "%Y-%m-%dT%H:%M:%SZ"
#: value types that go into a JSON body as they are (checked by exact type: a numpy or pandas scalar isn't one)
_PLAIN = frozenset({str, int, bool, type(None), list, dict})
T = TypeVar("T")


def _clean(v):
    """One value as JSON takes it: missing (None, NaN, NA, NaT) -> None, timestamps -> ISO UTC, numpy -> Python."""
    if type(v) in _PLAIN or isinstance(v, (list, dict, str)):
        return v
    if pd.isna(v):
        return None
    if isinstance(v, pd.Timestamp):
        return v.tz_convert("UTC").strftime(_ISO) if v.tzinfo else v.strftime(_ISO)
    if hasattr(v, "item"):  # numpy scalar -> Python
        return v.item()
    return v


def _records(rows) -> list[dict]:
    """Rows as plain dicts, missing values as None (pandas NA/NaT are not JSON).

    A frame is converted column by column; a dict whose values are all plain already (what the load
    stage hands over) is used as it is, the others are copied with their values cleaned.
    """
    if isinstance(rows, pd.DataFrame):
        return _frame_records(rows)
    plain = _PLAIN.issuperset
    return [row if plain(map(type, row.values())) else {k: _clean(v) for k, v in row.items()} for row in rows]


def _frame_records(frame: pd.DataFrame) -> list[dict]:
    names = list(frame.columns)
    if not names:
        return [{} for _ in range(len(frame))]
    columns = []
    for name in names:
        col = frame[name]
        if isinstance(col.dtype, pd.DatetimeTZDtype):
            col = col.dt.tz_convert("UTC").dt.strftime(_ISO)
        elif pd.api.types.is_datetime64_dtype(col.dtype):
            col = col.dt.strftime(_ISO)
        missing = col.isna().to_numpy()
        values = col.tolist()  # numpy/arrow scalars -> Python
        if missing.any():
            for i in np.flatnonzero(missing):
                values[i] = None
        if col.dtype == object:
            values = [v if type(v) in _PLAIN else _clean(v) for v in values]
        columns.append(values)
    return [dict(zip(names, row)) for row in zip(*columns)]


def _result_frame(results: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(results, columns=RESULT_COLUMNS)
    return frame.astype({"index": "int64", "id": "str", "ok": "bool", "status": "Int64", "error_code": "str",
                         "error_message": "str"})


class WritesMixin:
    """Write operations of :class:`~mdsync.dynamics.client.DynamicsClient`."""

    _bulk_unsupported: set
    #: most bulk requests in flight at once (None: :data:`DEFAULT_PARALLEL`); the service's ``x-ms-dop-hint``
    #: lowers it, the client's ``max_concurrent`` caps it
    max_parallel_requests: int | None = None
    _dop_hint: int | None = None
    _dop_known = False

    def upsert_multiple(self, entity_set: str, rows, key: str = "mdsync_marketopersonid") -> pd.DataFrame:
        """Create-or-update rows by the alternate key ``key`` (``UpsertMultiple``, chunks of 1000, in parallel).

        :param rows: dicts / a DataFrame of Web API column values, each with a value for ``key``.
        :returns: one row per input row, in order: ``index``, ``id``, ``ok``, ``status``, ``error_code``,
            ``error_message``.
        """
        return self._bulk(entity_set, "UpsertMultiple", _records(rows), key)

    def create_multiple(self, entity_set: str, rows) -> pd.DataFrame:
        """Create rows (``CreateMultiple``, chunks of 1000); same result frame as :meth:`upsert_multiple`.
        Prefer :meth:`upsert_multiple` for records that carry a Marketo id: a retried create can't duplicate."""
        return self._bulk(entity_set, "CreateMultiple", _records(rows), None)

    def update_multiple(self, entity_set: str, rows) -> pd.DataFrame:
        """Update existing rows by primary id (``UpdateMultiple``, chunks of 1000); never creates."""
        return self._bulk(entity_set, "UpdateMultiple", _records(rows), None)

    def delete_multiple(self, entity_set: str, ids) -> pd.DataFrame:
        """Delete rows by primary id: ``$batch`` requests of 1000 ``DELETE`` operations, continue-on-error
        (``DeleteMultiple`` is for elastic tables only). A row that is already gone (404) counts as deleted.

        :returns: one row per id, in order: ``index``, ``id``, ``ok``, ``status``, ``error_code``, ``error_message``.
        """
        ids = [str(uuid.UUID(str(i))) for i in ids]
        outcomes = self.batch([{"method": "DELETE", "url": f"{entity_set}({i})", "body": None} for i in ids])
        return _result_frame([{"index": n, "id": i, "ok": o["ok"] or o["status"] == 404, "status": o["status"],
                               "error_code": None if o["status"] == 404 else o["error_code"],
                               "error_message": None if o["status"] == 404 else o["error_message"]}
                              for n, (i, o) in enumerate(zip(ids, outcomes))])

    # parallel requests ------------------------------------------------------------------------------
    def parallel_requests(self) -> int:
        """How many bulk requests this client sends at once: ``max_parallel_requests`` (default
        :data:`DEFAULT_PARALLEL`), lowered to the service's ``x-ms-dop-hint`` once a response carried one."""
        cap = self.max_parallel_requests or DEFAULT_PARALLEL
        hint = self._dop_hint
        return max(1, min(cap, hint) if hint else cap)

    def _note_dop_hint(self, resp) -> None:
        raw = resp.headers.get(DOP_HINT_HEADER)
        try:
            hint = int(raw) if raw is not None else None
        except ValueError:
            hint = None
        if hint is not None and hint > 0 and hint != self._dop_hint:
            log.info("dynamics: the service recommends %d requests in parallel (x-ms-dop-hint)", hint)
            self._dop_hint = hint
        self._dop_known = True

    def _in_parallel(self, jobs: list[Callable[[], T]], what: str) -> list[T]:
        """Run ``jobs`` (one request each, with its retries and fallback) up to :meth:`parallel_requests` at
        a time; their results in job order.

        While no response has told the service's degree of parallelism, the first job runs alone. A job
        that raises stops the rest: jobs not started are dropped, running ones finish, and the error of the
        earliest failed job is raised.
        """
        results: list = [None] * len(jobs)
        start = 0
        if jobs and not self._dop_known:
            results[0] = jobs[0]()
            self._dop_known = True
            start = 1
        workers = min(self.parallel_requests(), len(jobs) - start)
        if workers <= 1:
            for i in range(start, len(jobs)):
                results[i] = jobs[i]()
            return results
        log.debug("dynamics: %s in %d requests, %d at a time", what, len(jobs) - start, workers)
        failed: dict[int, BaseException] = {}
        pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dynamics-write")
        try:
            queue = iter(range(start, len(jobs)))
            running: dict[concurrent.futures.Future, int] = {}

            def submit_next() -> None:
                i = next(queue, None)
                if i is not None:
                    running[pool.submit(jobs[i])] = i

            for _ in range(workers):
                submit_next()
            while running:
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    i = running.pop(future)
                    error = future.exception()
                    if error is not None:
                        failed[i] = error
                    else:
                        results[i] = future.result()
                    if not failed:
                        submit_next()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if failed:
            first = min(failed)
            log.warning("dynamics: %s stopped at request %d of %d (%s); %d not sent", what, first + 1, len(jobs),
                        failed[first], len(jobs) - len(failed) - sum(r is not None for r in results))
            raise failed[first]
        return results

    # bulk messages ----------------------------------------------------------------------------------
    def _bulk(self, entity_set: str, message: str, rows: list[dict], key: str | None) -> pd.DataFrame:
        logical = self.logical_name(entity_set)
        pid = logical + "id"
        if getattr(self, "_bulk_unsupported", None) is None:
            self._bulk_unsupported = set()
        results: list[dict] = []
        jobs = []
        for start in range(0, len(rows), CHUNK):
            ready = []
            for i, row in enumerate(rows[start:start + CHUNK], start):
                problem = self._precheck(message, row, key, pid)
                if problem:
                    results.append({"index": i, "id": None, "ok": False, "status": None, "error_code": None,
                                    "error_message": problem})
                else:
                    ready.append((i, row, None))
            if ready:
                jobs.append(lambda ready=ready: self._write_chunk(entity_set, logical, message, ready, key, pid))
        for chunk_results in self._in_parallel(jobs, f"{message} of {len(rows)} {entity_set}"):
            results += chunk_results
        results.sort(key=lambda r: r["index"])
        return _result_frame(results)

    @staticmethod
    def _precheck(message: str, row: dict, key: str | None, pid: str) -> str | None:
        if message == "UpsertMultiple" and row.get(key) in (None, ""):
            return f"no value for the alternate key column '{key}': the row can't be upserted"
        if message == "UpdateMultiple" and not row.get(pid):
            return f"no '{pid}': the row can't be updated"
        return None

    def _write_chunk(self, entity_set, logical, message, ready, key, pid) -> list[dict]:
        unsupported = self._bulk_unsupported
        if (entity_set, message) not in unsupported:
            targets = []
            for _i, row, _p in ready:
                target = {"@odata.type": f"Microsoft.Dynamics.CRM.{logical}", **row}
                if message == "UpsertMultiple":
                    target["@odata.id"] = odata.key_segment(entity_set, key, row[key])
                targets.append(target)
            try:
                resp = self.request("POST", f"{entity_set}/Microsoft.Dynamics.CRM.{message}", json={"Targets": targets},
                                    what=f"{len(targets)} {entity_set}")
                ids = (resp.json().get("Ids") if resp.status_code == 200 and resp.content else None) or \
                    [row.get(pid) for _i, row, _p in ready]
                return [{"index": i, "id": rid, "ok": True, "status": resp.status_code, "error_code": None,
                         "error_message": None} for (i, _r, _p), rid in zip(ready, ids)]
            except ServiceError as exc:
                if exc.status in (404, 405, 501):
                    if (entity_set, message) not in unsupported:
                        log.info("dynamics: %s not available for %s (%s); using $batch", message, entity_set,
                                 exc.service_message)
                    unsupported.add((entity_set, message))
                elif exc.status not in (400, 403, 409, 412):
                    raise
                else:
                    log.info("dynamics: %s of %d %s failed as a whole (%s); re-sending as $batch "
                             "continue-on-error", message, len(ready), entity_set, exc)
        operations = [self._operation(entity_set, message, row, key, pid) for _i, row, _p in ready]
        outcomes = self.batch(operations)
        return [{**{k: o[k] for k in RESULT_COLUMNS if k != "index"}, "index": i}
                for (i, _r, _p), o in zip(ready, outcomes)]

    @staticmethod
    def _operation(entity_set: str, message: str, row: dict, key: str | None, pid: str) -> dict:
        if message == "UpsertMultiple":
            return {"method": "PATCH", "url": odata.key_segment(entity_set, key, row[key]), "body": row}
        if message == "UpdateMultiple":
            body = {k: v for k, v in row.items() if k != pid}
            return {"method": "PATCH", "url": f"{entity_set}({uuid.UUID(str(row[pid]))})", "body": body,
                    "headers": {"If-Match": "*"}}
        return {"method": "POST", "url": entity_set, "body": row}

    def batch(self, operations: list[dict]) -> list[dict]:
        """Run operations as ``$batch`` requests (1000 per request, continue-on-error, sent in parallel like
        the bulk messages).

        :param operations: ``{"method", "url" (below /api/data/v9.2/), "body" (dict or None), "headers"}``.
        :returns: per operation, in order: ``ok``, ``status``, ``id`` (from ``OData-EntityId``), ``body``,
            ``error_code``, ``error_message``.
        """
        jobs = [lambda chunk=operations[start:start + CHUNK]: self._batch_chunk(chunk)
                for start in range(0, len(operations), CHUNK)]
        out: list[dict] = []
        for parsed in self._in_parallel(jobs, f"$batch of {len(operations)} operations"):
            out += parsed
        return out

    def _batch_chunk(self, chunk: list[dict]) -> list[dict]:
        boundary = f"batch_{uuid.uuid4()}"
        payload = _render_batch(boundary, self.base, chunk)
        resp = self.request("POST", "$batch", data=payload.encode("utf-8"),
                            headers={"Content-Type": f"multipart/mixed; boundary={boundary}",
                                     "Prefer": "odata.continue-on-error"},
                            what=f"{len(chunk)} operations")
        parsed = _parse_batch(resp.headers.get("Content-Type", ""), resp.content)
        if len(parsed) != len(chunk):
            raise ServiceError("dynamics", None, f"$batch answered {len(parsed)} responses for {len(chunk)} "
                               "operations", request="POST $batch", next_step="retry the run; nothing is "
                               "assumed written for the missing responses")
        return parsed


def _render_batch(boundary: str, base: str, operations: list[dict]) -> str:
    api_path = "/" + base.split("/", 3)[3]  # /api/data/v9.2/
    parts = []
    for op in operations:
        lines = [f"{op['method']} {api_path}{op['url']} HTTP/1.1"]
        headers = {"Content-Type": "application/json; type=entry", **(op.get("headers") or {})}
        lines += [f"{k}: {v}" for k, v in headers.items()]
        body = json.dumps(op["body"], ensure_ascii=False) if op.get("body") is not None else ""
        parts.append(f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
                     + "\r\n".join(lines) + "\r\n\r\n" + body + "\r\n")
    return "".join(parts) + f"--{boundary}--\r\n"


def _parse_batch(content_type: str, content: bytes) -> list[dict]:
    """Per-operation outcomes from a ``multipart/mixed`` batch response (change sets flattened)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + content)
    outcomes: list[dict] = []

    def walk(part) -> None:
        if part.is_multipart():
            for sub in part.iter_parts():
                walk(sub)
            return
        text = part.get_payload(decode=True).decode("utf-8")
        head, _, body = text.replace("\r\n", "\n").partition("\n\n")
        lines = head.split("\n")
        m = _STATUS_LINE.match(lines[0])
        if not m:
            return
        status = int(m.group(1))
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        data = None
        if body.strip():
            try:
                data = json.loads(body)
            except ValueError:
                data = {"raw": body.strip()}
        entity_id = _ENTITY_ID.search(headers.get("odata-entityid", ""))
        err = (data or {}).get("error", {}) if status >= 400 else {}
        outcomes.append({"ok": status < 400, "status": status, "id": entity_id.group(1) if entity_id else None,
                         "body": data, "error_code": err.get("code") or None,
                         "error_message": err.get("message") if status >= 400 else None})

    for part in message.iter_parts():
        walk(part)
    return outcomes

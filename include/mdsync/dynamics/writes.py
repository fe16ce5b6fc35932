"""Bulk writes: ``UpsertMultiple`` / ``CreateMultiple`` / ``UpdateMultiple`` with a ``$batch`` fallback.

Bulk messages on standard tables are all-or-nothing per request, so one bad record fails its chunk.
When that happens (or the table doesn't support the message) the chunk is re-sent as a ``$batch`` with
``Prefer: odata.continue-on-error``: the good records land, each bad one comes back with the service's
code and message. Upserts address rows by the alternate key on the Marketo-id column (DESIGN §3), so a
retried create updates the row it already made instead of duplicating it.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import logging
import re
import uuid

import pandas as pd

from mdsync.errors import ServiceError

from . import odata

log = logging.getLogger(__name__)
CHUNK = 1000
_ENTITY_ID = re.compile(r"\(([0-9a-fA-F-]{36})\)\s*$")
_STATUS_LINE = re.compile(r"^HTTP/1\.[01] (\d{3})")
RESULT_COLUMNS = ["index", "id", "ok", "status", "error_code", "error_message"]


def _records(rows) -> list[dict]:
    """Rows as plain dicts with missing values dropped (pandas NA/NaT are not JSON)."""
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    out = []
    for row in rows:
        clean = {}
        for k, v in row.items():
            if v is None or (not isinstance(v, (list, dict, str)) and pd.isna(v)):
                clean[k] = None
                continue
            if isinstance(v, pd.Timestamp):
                v = v.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ") if v.tzinfo else v.strftime("%Y-%m-%dT%H:%M:%SZ")
            elif hasattr(v, "item"):  # numpy scalar -> Python
                v = v.item()
            clean[k] = v
        out.append(clean)
    return out


def _result_frame(results: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(results, columns=RESULT_COLUMNS)
    return frame.astype({"index": "int64", "id": "str", "ok": "bool", "status": "Int64", "error_code": "str",
                         "error_message": "str"})


class WritesMixin:
    """Write operations of :class:`~mdsync.dynamics.client.DynamicsClient`."""

    _bulk_unsupported: set

    def upsert_multiple(self, entity_set: str, rows, key: str = "mdsync_marketopersonid") -> pd.DataFrame:
        """Create-or-update rows by the alternate key ``key`` (``UpsertMultiple``, chunks of 1000).

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

    def _bulk(self, entity_set: str, message: str, rows: list[dict], key: str | None) -> pd.DataFrame:
        logical = self.logical_name(entity_set)
        pid = logical + "id"
        results: list[dict] = []
        for start in range(0, len(rows), CHUNK):
            chunk = list(enumerate(rows[start:start + CHUNK], start))
            ready, refused = [], []
            for i, row in chunk:
                problem = self._precheck(message, row, key, pid)
                (refused if problem else ready).append((i, row, problem))
            results += [{"index": i, "id": None, "ok": False, "status": None, "error_code": None,
                         "error_message": problem} for i, _row, problem in refused]
            if ready:
                results += self._write_chunk(entity_set, logical, message, ready, key, pid)
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
        unsupported = getattr(self, "_bulk_unsupported", None)
        if unsupported is None:
            unsupported = self._bulk_unsupported = set()
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
        """Run operations as ``$batch`` requests (1000 per request, continue-on-error).

        :param operations: ``{"method", "url" (below /api/data/v9.2/), "body" (dict or None), "headers"}``.
        :returns: per operation, in order: ``ok``, ``status``, ``id`` (from ``OData-EntityId``), ``body``,
            ``error_code``, ``error_message``.
        """
        out: list[dict] = []
        for start in range(0, len(operations), CHUNK):
            chunk = operations[start:start + CHUNK]
            boundary = f"batch_{uuid.uuid4()}"
            payload = _render_batch(boundary, self.base, chunk)
            resp = self.request("POST", "$batch", data=payload.encode("utf-8"),
                                headers={"Content-Type": f"multipart/mixed; boundary={boundary}",
                                         "Prefer": "odata.continue-on-error"},
                                what=f"{len(chunk)} operations")
            parsed = _parse_batch(resp.headers.get("Content-Type", ""), resp.content)
            if len(parsed) != len(chunk):
                raise self._error(None, f"$batch answered {len(parsed)} responses for {len(chunk)} operations",
                                  request="POST $batch", retryable=True,
                                  next_step="retry the run; nothing is assumed written for the missing responses")
            out += parsed
        return out


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

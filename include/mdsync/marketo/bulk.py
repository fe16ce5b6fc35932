"""Bulk lead and activity export: create, enqueue, poll, download (resumable, checksum-verified) and parse
(bulk-extract.md, bulk-lead-extract.md, bulk-activity-extract.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections import deque
from datetime import datetime, timedelta
from typing import Iterable

import pandas as pd

from mdsync.errors import ServiceError

from .activities import DELETE_LEAD
from .frames import json_value, typed_frame

log = logging.getLogger("mdsync.marketo")

MAX_RANGE = timedelta(days=31)  # the createdAt/updatedAt filter may span 31 days at most
DONE = {"Completed", "Failed", "Cancelled", "Canceled"}
EXPORT_QUEUE = 10  # jobs queued or processing at once, shared by lead and activity exports (bulk-extract.md)
LEAD_EXPORT = "/bulk/v1/leads/export"
ACTIVITY_EXPORT = "/bulk/v1/activities/export"
ACTIVITY_FILE_COLUMNS = ("marketoGUID", "leadId", "activityDate", "activityTypeId", "primaryAttributeValueId",
                         "primaryAttributeValue", "attributes")
ACTIVITY_COLUMNS = ["marketo_guid", "lead_id", "activity_date", "activity_type_id", "primary_attribute_value_id",
                    "primary_attribute_value", "attributes"]
ACTIVITY_COLUMN_TYPES = {"lead_id": "integer", "activity_date": "datetime", "activity_type_id": "integer",
                         "primary_attribute_value_id": "integer"}


def split_range(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """``[start, end]`` as consecutive windows of at most 31 days (Marketo's datetimes have 1 s resolution)."""
    start, end = pd.Timestamp(start), pd.Timestamp(end)
    start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
    end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
    if end < start:
        raise ValueError(f"export range ends ({end}) before it starts ({start})")
    out = []
    while True:
        stop = min(end, start + MAX_RANGE)
        out.append((start.to_pydatetime(), stop.to_pydatetime()))
        if stop >= end:
            return out
        start = stop + timedelta(seconds=1)


class BulkExportMixin:
    """Bulk lead and activity export for :class:`~mdsync.marketo.client.MarketoClient`.

    Window jobs are created and enqueued up to the export queue's size (10, shared by lead and activity
    exports) and polled together; a job still Queued means the ones enqueued after it are too (FIFO), so a
    poll round stops there. A full queue (1029 "Too many jobs in queue", e.g. other users' jobs) is waited out.
    """

    def export_leads(self, fields: list[str], created_at=None, updated_at=None, poll_interval_s: float = 5.0,
                     timeout_s: float = 4 * 3600) -> pd.DataFrame:
        """All leads created (or updated) in a time range, via bulk export jobs (one per 31 days of range).

        :param fields: REST field names to export (``id`` is always included).
        :param created_at: / :param updated_at: ``(start, end)``; exactly one is required (Marketo demands a filter).
        :param poll_interval_s: seconds between status poll rounds (bulk-extract.md notes a job's status
            changes at most once a minute, so longer intervals cost fewer calls; 5 s finishes sooner).
        :param timeout_s: give up when the jobs have not all completed after this long.
        :returns: one row per lead, typed per describe.
        """
        if (created_at is None) == (updated_at is None):
            raise ValueError("export_leads needs exactly one of created_at=(start, end) or updated_at=(start, end): "
                             "Marketo's bulk lead export requires a date filter")
        key, (start, end) = ("createdAt", created_at) if created_at is not None else ("updatedAt", updated_at)
        columns = ["id", *[f for f in fields if f != "id"]]
        types = self.field_types()
        bodies = [{"fields": columns, "format": "CSV",
                   "filter": {key: {"startAt": json_value(win_start), "endAt": json_value(win_end)}}}
                  for win_start, win_end in split_range(start, end)]

        def parse(raw: pd.DataFrame, export_id: str) -> pd.DataFrame:
            _require_columns(self, raw, columns, LEAD_EXPORT, export_id)
            # Marketo writes empty values as the word null.
            return typed_frame(raw[columns].replace({"null": None, "": None}), columns, types)

        frames = self._run_export_jobs(LEAD_EXPORT, bodies, parse, poll_interval_s, timeout_s)
        if not frames:
            return typed_frame([], columns, types)
        out = pd.concat(frames, ignore_index=True)
        return out.drop_duplicates(subset="id", keep="last").reset_index(drop=True)

    def export_activities(self, activity_type_ids: Iterable[int], created_at, *, poll_interval_s: float = 5.0,
                          timeout_s: float = 4 * 3600) -> pd.DataFrame:
        """Activities of the given types created in a time range, via bulk activity export jobs (31-day windows).

        :param activity_type_ids: activity type ids (e.g. 12 New Lead, 13 Change Data Value, custom types).
            Delete Lead (37) cannot be exported in bulk (bulk-activity-extract.md); use
            :meth:`get_deleted_leads` or :meth:`get_merges_and_deletions`.
        :param created_at: ``(start, end)`` of the activities' dates; any length, split into 31-day jobs.
        :param poll_interval_s: seconds between status poll rounds.
        :param timeout_s: give up when the jobs have not all completed after this long.
        :returns: one row per activity, oldest window first: ``marketo_guid`` (string), ``lead_id``,
            ``activity_date`` (UTC), ``activity_type_id``, ``primary_attribute_value_id`` (Int64; the lead field
            id for Change Data Value), ``primary_attribute_value`` (string) and ``attributes``: the file's JSON
            attributes decoded to a ``dict`` per row (``{}`` when the file says null), e.g.
            ``{"New Value": "B", "Old Value": "A", "Reason": ..., "Source": ...}``.
        """
        types = [int(t) for t in activity_type_ids]
        if not types:
            raise ValueError("export_activities needs at least one activity type id")
        if DELETE_LEAD in types:
            raise ValueError(f"activity type {DELETE_LEAD} (Delete Lead) cannot be bulk-exported: Marketo refuses "
                             "it; read deletions with get_deleted_leads")
        start, end = created_at
        bodies = [{"format": "CSV", "fields": list(ACTIVITY_FILE_COLUMNS),
                   "filter": {"createdAt": {"startAt": json_value(win_start), "endAt": json_value(win_end)},
                              "activityTypeIds": types}}
                  for win_start, win_end in split_range(start, end)]

        def parse(raw: pd.DataFrame, export_id: str) -> pd.DataFrame:
            _require_columns(self, raw, ACTIVITY_FILE_COLUMNS, ACTIVITY_EXPORT, export_id)
            raw = raw[list(ACTIVITY_FILE_COLUMNS)].replace({"null": None, "": None})
            frame = raw.rename(columns=dict(zip(ACTIVITY_FILE_COLUMNS, ACTIVITY_COLUMNS)))
            attributes = [json.loads(a) if a is not None else {} for a in frame["attributes"]]
            frame = typed_frame(frame, ACTIVITY_COLUMNS, ACTIVITY_COLUMN_TYPES)
            frame["attributes"] = pd.Series(attributes, index=frame.index, dtype=object)
            return frame

        frames = self._run_export_jobs(ACTIVITY_EXPORT, bodies, parse, poll_interval_s, timeout_s)
        out = pd.concat(frames, ignore_index=True)
        return out.drop_duplicates(subset="marketo_guid", keep="first").reset_index(drop=True)

    def _run_export_jobs(self, prefix: str, bodies: list[dict], parse, poll_interval_s: float,
                         timeout_s: float) -> list[pd.DataFrame]:
        """Run one export job per body, up to the queue's size at a time; the parsed files in body order."""
        deadline = time.monotonic() + timeout_s
        results: list[pd.DataFrame | None] = [None] * len(bodies)
        waiting = deque(range(len(bodies)))
        created: dict[int, str] = {}
        active: list[tuple[int, str]] = []
        while waiting or active:
            while waiting and len(active) < EXPORT_QUEUE:
                i = waiting[0]
                if i not in created:
                    created[i] = self._post_json(f"{prefix}/create.json", bodies[i])["result"][0]["exportId"]
                try:
                    self._call("POST", f"{prefix}/{created[i]}/enqueue.json")
                except ServiceError as exc:
                    # A full queue (10 jobs, other users' included) clears as jobs finish: enqueue later.
                    if exc.code != "1029" or "too many" not in exc.service_message.lower():
                        raise
                    break
                waiting.popleft()
                active.append((i, created.pop(i)))
                log.info("Marketo bulk export %s queued (%s)", active[-1][1], bodies[i]["filter"])
            if time.monotonic() > deadline:
                jobs = ", ".join(export_id for _, export_id in active) or "none queued yet"
                raise self._error(None, f"{len(active) + len(waiting)} export jobs not completed after "
                                  f"{timeout_s:.0f} s (queued: {jobs})", request=f"GET {prefix}/{{id}}/status.json",
                                  next_step="the jobs are left in Marketo; re-run later", retryable=True)
            time.sleep(poll_interval_s)
            for i, export_id in list(active):
                job = self._get(f"{prefix}/{export_id}/status.json")["result"][0]
                if job["status"] == "Completed":
                    results[i] = parse(self._download_export(prefix, export_id, job), export_id)
                    active.remove((i, export_id))
                elif job["status"] in DONE:
                    raise self._error(None, f"export job {export_id} ended {job['status']}: "
                                      f"{job.get('errorMsg') or 'no reason given'}",
                                      request=f"POST {prefix}/create.json {bodies[i]['filter']}",
                                      next_step="a failed job must be recreated; re-run the export", retryable=True)
                elif job["status"] != "Processing":
                    break  # still queued: the jobs enqueued after it are waiting behind it
        return results  # type: ignore[return-value]

    def _download_export(self, prefix: str, export_id: str, job: dict) -> pd.DataFrame:
        """The completed job's file (resumed with Range when cut off, checksum-verified), every cell a string."""
        size = int(job.get("fileSize") or 0)
        expected = (job.get("fileChecksum") or "").removeprefix("sha256:")
        path = f"{prefix}/{export_id}/file.json"
        digest = hashlib.sha256()
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as buf:
            got = 0
            for _ in range(5):
                headers = {"Range": f"bytes={got}-{size - 1}"} if got else {}
                resp = self._call("GET", path, raw=True, headers=headers, stream=True)
                try:
                    for chunk in resp.iter_content(1 << 20):
                        buf.write(chunk)
                        digest.update(chunk)
                        got += len(chunk)
                except Exception as exc:  # a cut-off transfer: resume from the bytes we have (Range)
                    log.warning("Marketo export %s download interrupted at %d/%d bytes (%s); resuming",
                                export_id, got, size, type(exc).__name__)
                    continue
                finally:
                    resp.close()
                if got >= size:
                    break
            if got != size or (expected and digest.hexdigest() != expected):
                raise self._error(None, f"export {export_id} file is {got} bytes with checksum "
                                  f"{digest.hexdigest()}, expected {size} bytes and {expected}",
                                  request=f"GET {path}", next_step="the export is not used; re-run it", retryable=True)
            buf.seek(0)
            return pd.read_csv(buf, dtype=str, keep_default_na=False)


def _require_columns(client, raw: pd.DataFrame, columns, prefix: str, export_id: str) -> None:
    missing = [c for c in columns if c not in raw.columns]
    if missing:
        raise client._error(None, f"export {export_id} file lacks columns {missing}",
                          request=f"GET {prefix}/{export_id}/file.json")

"""Bulk lead export: create, enqueue, poll, download (resumable, checksum-verified) and parse (bulk-extract.md)."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from datetime import datetime, timedelta

import pandas as pd

from mdsync.errors import ServiceError

from .frames import json_value, typed_frame

log = logging.getLogger("mdsync.marketo")

MAX_RANGE = timedelta(days=31)  # the createdAt/updatedAt filter may span 31 days at most
DONE = {"Completed", "Failed", "Cancelled", "Canceled"}


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
    """Bulk lead export for :class:`~mdsync.marketo.client.MarketoClient`."""

    def export_leads(self, fields: list[str], created_at=None, updated_at=None, poll_interval_s: float = 60.0,
                     timeout_s: float = 4 * 3600) -> pd.DataFrame:
        """All leads created (or updated) in a time range, via bulk export jobs (one per 31 days of range).

        :param fields: REST field names to export (``id`` is always included).
        :param created_at: / :param updated_at: ``(start, end)``; exactly one is required (Marketo demands a filter).
        :param poll_interval_s: seconds between status polls (Marketo updates status at most once a minute).
        :param timeout_s: give up on a job after this long.
        :returns: one row per lead, typed per describe.
        """
        if (created_at is None) == (updated_at is None):
            raise ValueError("export_leads needs exactly one of created_at=(start, end) or updated_at=(start, end): "
                             "Marketo's bulk lead export requires a date filter")
        key, (start, end) = ("createdAt", created_at) if created_at is not None else ("updatedAt", updated_at)
        columns = ["id", *[f for f in fields if f != "id"]]
        types = self.field_types()
        frames = []
        for win_start, win_end in split_range(start, end):
            body = {"fields": columns, "format": "CSV",
                    "filter": {key: {"startAt": json_value(win_start), "endAt": json_value(win_end)}}}
            frames.append(self._run_export(body, columns, types, poll_interval_s, timeout_s))
        if not frames:
            return typed_frame([], columns, types)
        out = pd.concat(frames, ignore_index=True)
        return out.drop_duplicates(subset="id", keep="last").reset_index(drop=True)

    def _run_export(self, body: dict, columns: list[str], types: dict, poll_interval_s: float,
                    timeout_s: float) -> pd.DataFrame:
        job = self._post_json("/bulk/v1/leads/export/create.json", body)["result"][0]
        export_id = job["exportId"]
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                job = self._call("POST", f"/bulk/v1/leads/export/{export_id}/enqueue.json")["result"][0]
                break
            except ServiceError as exc:
                # A full queue (10 jobs) clears as other jobs finish: wait for a slot, up to the timeout.
                if exc.code != "1029" or "queue" not in exc.service_message.lower() or time.monotonic() > deadline:
                    raise
                time.sleep(poll_interval_s)
        log.info("Marketo bulk export %s queued (%s)", export_id, body["filter"])
        while job["status"] not in DONE:
            if time.monotonic() > deadline:
                raise ServiceError(self.service, None, f"export job {export_id} still {job['status']} after "
                                   f"{timeout_s:.0f} s", request="GET /bulk/v1/leads/export/{id}/status.json",
                                   next_step="the job is left running in Marketo; re-run later")
            time.sleep(poll_interval_s)
            job = self._get(f"/bulk/v1/leads/export/{export_id}/status.json")["result"][0]
        if job["status"] != "Completed":
            raise ServiceError(self.service, None, f"export job {export_id} ended {job['status']}: "
                               f"{job.get('errorMsg') or 'no reason given'}",
                               request=f"POST /bulk/v1/leads/export/create.json {body['filter']}",
                               next_step="a failed job must be recreated; re-run the export")
        return self._download_export(export_id, job, columns, types)

    def _download_export(self, export_id: str, job: dict, columns: list[str], types: dict) -> pd.DataFrame:
        size = int(job.get("fileSize") or 0)
        expected = (job.get("fileChecksum") or "").removeprefix("sha256:")
        path = f"/bulk/v1/leads/export/{export_id}/file.json"
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
                raise ServiceError(self.service, None, f"export {export_id} file is {got} bytes with checksum "
                                   f"{digest.hexdigest()}, expected {size} bytes and {expected}",
                                   request=f"GET {path}", next_step="the export is not used; re-run it")
            buf.seek(0)
            raw = pd.read_csv(buf, dtype=str, keep_default_na=False)
        missing = [c for c in columns if c not in raw.columns]
        if missing:
            raise ServiceError(self.service, None, f"export {export_id} file lacks columns {missing}",
                               request=f"GET {path}")
        # Marketo writes empty values as the word null.
        raw = raw[columns].replace({"null": None, "": None})
        return typed_frame(raw, columns, types)


"""Bulk extract (bulk-extract.md, bulk-lead-extract.md, bulk-activity-extract.md): lead and activity exports.

Both kinds share the same job paths below their prefix and one queue of 10 (1029 "Too many jobs in queue").
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from ..context import SandboxDep
from ..store import ApiError
from .common import csv_param, envelope, read_json


def file_range(path: Path, rng: str | None) -> Response:
    """A file, whole or the byte range a ``Range: bytes=a-b`` header asks for (206), as bulk-extract.md says."""
    size = path.stat().st_size
    start, end = 0, size - 1
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip()) if rng else None
    if rng and not match:
        return PlainTextResponse("Invalid Range", status_code=416)
    if match:
        if match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        else:
            start = max(0, size - int(match.group(2)))
        if start > end:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start + 1)
    headers = {"Accept-Ranges": "bytes"}
    if match:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return Response(data, status_code=206 if match else 200, media_type="text/csv", headers=headers)


def export_router(prefix: str, kind: str, create: str) -> APIRouter:
    """The job paths of one export kind; ``create`` names the store method that creates its jobs."""
    router = APIRouter()

    @router.post(f"{prefix}/create.json", name=f"{kind}_export_create")
    async def export_create(request: Request, sb: SandboxDep):
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError("1003", "Invalid export request")
        return envelope([await run_in_threadpool(getattr(sb.store, create), body)])

    @router.post(f"{prefix}/{{export_id}}/enqueue.json", name=f"{kind}_export_enqueue")
    async def export_enqueue(export_id: str, sb: SandboxDep):
        return envelope([await run_in_threadpool(sb.store.enqueue_export, export_id, kind)])

    @router.post(f"{prefix}/{{export_id}}/cancel.json", name=f"{kind}_export_cancel")
    async def export_cancel(export_id: str, sb: SandboxDep):
        return envelope([await run_in_threadpool(sb.store.cancel_export, export_id, kind)])

    @router.get(f"{prefix}/{{export_id}}/status.json", name=f"{kind}_export_status")
    async def export_status(export_id: str, sb: SandboxDep):
        return envelope([await run_in_threadpool(sb.store.export_status, export_id, kind)])

    @router.get(f"{prefix}.json", name=f"{kind}_export_list")
    async def export_list(sb: SandboxDep, status: str | None = None):
        return envelope(await run_in_threadpool(sb.store.list_exports, csv_param(status), kind))

    @router.get(f"{prefix}/{{export_id}}/file.json", name=f"{kind}_export_file")
    async def export_file(export_id: str, request: Request, sb: SandboxDep):
        try:
            job = sb.store.export_status(export_id, kind)
        except ApiError:
            job = {}
        if job.get("status") != "Completed":
            return PlainTextResponse("Export file not found: the job does not exist or is not completed",
                                     status_code=404)
        return file_range(sb.store.export_file(export_id), request.headers.get("range"))

    return router


router = APIRouter()
router.include_router(export_router("/bulk/v1/leads/export", "leads", "create_export"))
router.include_router(export_router("/bulk/v1/activities/export", "activities", "create_activity_export"))

"""Bulk lead import (bulk-import.md, bulk-lead-import.md): submit a file, job status, failure/warning files."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from ..context import SandboxDep
from ..imports import IMPORT_MAX_FILE
from ..store import ApiError
from .common import envelope

router = APIRouter()


@router.post("/bulk/v1/leads.json")
async def import_leads(request: Request, sb: SandboxDep):
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise ApiError("612", "Invalid Content Type: Import Leads takes multipart/form-data")
    try:
        form = await request.form(max_files=1)
    except Exception:
        raise ApiError("613", "Invalid Multipart Request") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError("701", "file cannot be blank")
    data = await upload.read()
    if len(data) > IMPORT_MAX_FILE:
        return PlainTextResponse("Request Entity Too Large", status_code=413)

    def param(name: str):
        value = request.query_params.get(name)
        return value if value is not None else form.get(name)

    return envelope([await run_in_threadpool(sb.imports.create, data, param("format"), param("lookupField"),
                                             param("listId"), param("partitionName"))])


@router.get("/bulk/v1/leads/batch/{batch_id:int}.json")
async def import_status(batch_id: int, sb: SandboxDep):
    return envelope([await run_in_threadpool(sb.imports.status, batch_id)])


@router.get("/bulk/v1/leads/batch/{batch_id:int}/{which}.json")
async def import_report(batch_id: int, which: str, sb: SandboxDep):
    if which not in ("failures", "warnings"):
        raise ApiError("610", "Requested resource not found")
    data, media = await run_in_threadpool(sb.imports.report, batch_id, which)
    return Response(data, media_type=media)

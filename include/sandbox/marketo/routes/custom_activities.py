"""Custom activity types and custom activities (activities.md "Custom Activities")."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..context import SandboxDep
from ..store import ApiError
from .common import envelope, read_input, read_json

router = APIRouter()


@router.get("/rest/v1/activities/external/types.json")
async def custom_types(sb: SandboxDep):
    types = await run_in_threadpool(sb.store.activity_types)
    return envelope([{k: v for k, v in t.items() if k not in ("primaryAttribute", "attributes")} for t in types])


@router.post("/rest/v1/activities/external/type.json")
async def create_custom_type(request: Request, sb: SandboxDep):
    body = await read_json(request)
    return envelope([await run_in_threadpool(sb.store.create_activity_type, body or {})])


@router.get("/rest/v1/activities/external/type/{api_name}/describe.json")
async def describe_custom_type(api_name: str, sb: SandboxDep, draft: bool = False):
    return envelope([await run_in_threadpool(lambda: sb.store.activity_type(api_name, draft=draft))])


@router.post("/rest/v1/activities/external/type/{api_name}/approve.json")
async def approve_custom_type(api_name: str, sb: SandboxDep):
    return envelope([await run_in_threadpool(sb.store.approve_activity_type, api_name)])


@router.post("/rest/v1/activities/external/type/{api_name}/attributes/create.json")
async def create_custom_type_attributes(api_name: str, request: Request, sb: SandboxDep):
    body = await read_json(request)
    attrs = body.get("attributes") if isinstance(body, dict) else None
    if not attrs:
        raise ApiError("701", "attributes cannot be blank")
    return envelope([await run_in_threadpool(sb.store.create_activity_type_attributes, api_name, attrs)])


@router.post("/rest/v1/activities/external.json")
async def add_custom_activities(request: Request, sb: SandboxDep):
    _, records = await read_input(request)
    results = await run_in_threadpool(sb.store.add_custom_activities, records)
    out = []
    for r in results:
        item = r.as_json(reason_key="errors")
        if r.id is not None:
            item["marketoGUID"] = str(r.id)
        out.append(item)
    return envelope(out)

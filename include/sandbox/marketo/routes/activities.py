"""Lead Database, activities (activities.md): paging tokens, lead changes, deleted leads, activities, types."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..context import SandboxDep
from ..store import CHANGE_DATA_VALUE, DELETE_LEAD, NEW_LEAD, STANDARD_ACTIVITY_TYPES, ApiError
from ..values import parse_datetime
from .common import batch_size, envelope, list_param, request_id

router = APIRouter()


def render_activity(row, *, lead_change: bool = False) -> dict:
    """An activities table row as Get Lead Activities / Get Lead Changes / Get Deleted Leads return it."""
    act_id, lead_id, date, type_id, prim_id, prim, field, old, new, attrs = row
    out = {"id": act_id, "marketoGUID": str(act_id), "leadId": lead_id, "activityDate": date,
           "activityTypeId": type_id}
    attributes = [a for a in json.loads(attrs) if a.get("value") is not None]
    if lead_change:
        fields = []
        if type_id == CHANGE_DATA_VALUE:
            change = {"id": prim_id, "name": field, "newValue": "" if new is None else new}
            if old is not None:
                change["oldValue"] = old
            fields.append(change)
            attributes = [a for a in attributes if a["name"] not in ("New Value", "Old Value")]
        out["fields"] = fields
    else:
        if prim_id is not None:
            out["primaryAttributeValueId"] = prim_id
        if prim is not None:
            out["primaryAttributeValue"] = prim
    out["attributes"] = attributes
    return out


@router.get("/rest/v1/activities/pagingtoken.json")
async def paging_token(sb: SandboxDep, sinceDatetime: str | None = None):
    if not sinceDatetime:
        raise ApiError("701", "sinceDatetime cannot be blank")
    try:
        since = parse_datetime(sinceDatetime)
    except ValueError:
        raise ApiError("1001", f"Invalid value '{sinceDatetime}'. Required of type 'datetime'") from None
    return Response(json.dumps({"requestId": request_id(), "success": True, "errors": [], "warnings": [],
                                "nextPageToken": sb.store.paging_token(since)}), media_type="application/json")


def _lead_ids(params) -> tuple[str, list]:
    ids = list_param(params, "leadIds")
    if not ids:
        return "", []
    if len(ids) > 30 or not all(i.isdigit() for i in ids):
        raise ApiError("1003", "Invalid leadIds: at most 30 integer ids")
    return f" AND leadId IN ({','.join('?' * len(ids))})", [int(i) for i in ids]


async def activity_page(sb, params, where: str, args: list, lead_change: bool = False) -> Response:
    token = params.get("nextPageToken")
    if not token:
        raise ApiError("701", "nextPageToken cannot be blank")
    if params.get("listId"):
        raise ApiError("1003", "listId is not supported by the sandbox")
    lead_where, lead_args = _lead_ids(params)
    rows, next_token, more = await run_in_threadpool(
        sb.store.activities_page, token, where + lead_where, args + lead_args, batch_size(params.get("batchSize")))
    return envelope([render_activity(r, lead_change=lead_change) for r in rows], nextPageToken=next_token,
                    moreResult=more)


@router.get("/rest/v1/activities/leadchanges.json")
async def lead_changes(request: Request, sb: SandboxDep):
    params = request.query_params
    fields = list_param(params, "fields")
    if not fields:
        raise ApiError("701", "fields cannot be blank")
    where = (f"activityTypeId = {NEW_LEAD} OR (activityTypeId = {CHANGE_DATA_VALUE} AND field IN "
             f"({','.join('?' * len(fields))}))")
    return await activity_page(sb, params, where, fields, lead_change=True)


@router.get("/rest/v1/activities/deletedleads.json")
async def deleted_leads(request: Request, sb: SandboxDep):
    return await activity_page(sb, request.query_params, f"activityTypeId = {DELETE_LEAD}", [])


@router.get("/rest/v1/activities.json")
async def activities(request: Request, sb: SandboxDep):
    type_ids = list_param(request.query_params, "activityTypeIds")
    if not type_ids:
        raise ApiError("701", "activityTypeIds cannot be blank")
    if len(type_ids) > 10 or not all(t.isdigit() for t in type_ids):
        raise ApiError("1003", "Invalid activityTypeIds: at most 10 integer ids")
    return await activity_page(sb, request.query_params, f"activityTypeId IN ({','.join('?' * len(type_ids))})",
                               [int(t) for t in type_ids])


@router.get("/rest/v1/activities/types.json")
async def activity_types(sb: SandboxDep):
    store = sb.store
    result = [{"id": tid, "name": name, "description": name,
               "primaryAttribute": {"name": prim[0], "dataType": prim[1]},
               "attributes": [{"name": n, "dataType": t} for n, t in attrs]}
              for tid, name, prim, attrs in STANDARD_ACTIVITY_TYPES]
    for t in await run_in_threadpool(store.activity_types):
        if t["status"] in ("approved", "approved with draft"):
            approved = store.activity_type(t["apiName"])
            result.append({"id": approved["id"], "apiName": approved["apiName"], "name": approved["name"],
                           "description": approved.get("description", ""),
                           "primaryAttribute": {"apiName": approved["primaryAttribute"]["apiName"],
                                                "name": approved["primaryAttribute"]["name"],
                                                "dataType": approved["primaryAttribute"]["dataType"]},
                           "attributes": [{"apiName": a["apiName"], "name": a["name"], "dataType": a["dataType"]}
                                          for a in approved.get("attributes", [])]})
    return envelope(result)

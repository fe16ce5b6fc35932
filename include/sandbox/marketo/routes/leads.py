"""Lead Database, leads (leads.md): describe, get by id / by filter type, sync, delete, merge."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..context import SandboxDep
from ..fields import DEFAULT_LEAD_FIELDS, LEAD_FIELDS
from ..store import ApiError, decode_token, encode_token
from .common import MAX_BATCH, batch_size, csv_param, envelope, list_param, read_input, request_id

router = APIRouter()


@router.get("/rest/v1/leads/describe.json")
async def describe():
    return envelope([{**f.described({"id": f.id}), "rest": {"name": f.name, "readOnly": f.read_only},
                      "soap": {"name": f.soap_name, "readOnly": f.read_only}} for f in LEAD_FIELDS])


@router.get("/rest/v1/leads/describe2.json")
async def describe2():
    fields = [{**f.described({"name": f.name}), "updateable": not f.read_only, "crmManaged": False}
              for f in LEAD_FIELDS]
    searchable = [[f.name] for f in LEAD_FIELDS if f.searchable]
    return envelope([{"name": "API Lead", "searchableFields": searchable, "fields": fields}])


async def leads_by_filter(sb, params) -> Response:
    store = sb.store
    filter_type = params.get("filterType")
    values = list_param(params, "filterValues")
    if not filter_type:
        raise ApiError("701", "filterType cannot be blank")
    if not values:
        raise ApiError("701", "filterValues cannot be blank")
    if len(values) > MAX_BATCH:
        raise ApiError("1003", f"Invalid filterValues: {len(values)} values given, at most {MAX_BATCH} allowed")
    batch = batch_size(params.get("batchSize"))
    after = 0
    if params.get("nextPageToken"):
        kind, value = decode_token(params["nextPageToken"])
        if kind != "l":
            raise ApiError("1003", "Invalid paging token")
        after = int(value)
    fields = store.resolve_fields(list_param(params, "fields"), DEFAULT_LEAD_FIELDS)
    rows, more = await run_in_threadpool(store.leads_by_filter, filter_type, values, fields, after, batch)
    extra = {}
    if more:
        extra = {"moreResult": True, "nextPageToken": encode_token("l", str(rows[-1]["id"]))}
    return envelope(rows, **extra)


@router.get("/rest/v1/leads.json")
async def get_leads(request: Request, sb: SandboxDep):
    return await leads_by_filter(sb, request.query_params)


@router.post("/rest/v1/leads.json")
async def sync_leads(request: Request, sb: SandboxDep):
    body, records = await read_input(request)
    action = body.get("action") or "createOrUpdate"
    if action not in ("createOnly", "updateOnly", "createOrUpdate", "createDuplicate"):
        raise ApiError("1003", f"Invalid action '{action}'")
    lookup = body.get("lookupField") or "email"
    results = await run_in_threadpool(sb.store.sync_leads, action, lookup, records)
    return envelope([r.as_json() for r in results])


@router.get("/rest/v1/lead/{lead_id:int}.json")
async def get_lead(lead_id: int, request: Request, sb: SandboxDep):
    fields = sb.store.resolve_fields(list_param(request.query_params, "fields"), DEFAULT_LEAD_FIELDS)
    lead = await run_in_threadpool(sb.store.lead_by_id, lead_id, fields)
    return envelope([lead] if lead else [])


@router.post("/rest/v1/leads/delete.json")
async def delete_leads(request: Request, sb: SandboxDep):
    if request.query_params.get("id"):
        ids = [int(x) for x in csv_param(request.query_params["id"]) if x.isdigit()][:MAX_BATCH + 1]
        if len(ids) > MAX_BATCH:
            raise ApiError("1003", f"Too many records: more than {MAX_BATCH} ids per call")
    else:
        _, ids = await read_input(request)
    results = await run_in_threadpool(sb.store.delete_leads, ids)
    return envelope([r.as_json() for r in results])


@router.post("/rest/v1/leads/{lead_id:int}/merge.json")
async def merge_leads(lead_id: int, request: Request, sb: SandboxDep):
    """Merge Leads: the path's lead wins; ``leadId`` (one id) and/or ``leadIds`` (up to 25, comma-separated or
    repeated) lose; ``mergeInCRM`` is a boolean (no CRM is synced here, so it merges nothing more)."""
    params = request.query_params
    losers = []
    for raw in params.getlist("leadId"):
        if not raw.strip().isdigit():
            raise ApiError("1003", f"Invalid value '{raw}' for leadId: one lead id (use leadIds for several)")
        losers.append(int(raw))
    for v in list_param(params, "leadIds"):
        if not v.isdigit():
            raise ApiError("1003", f"Invalid lead id '{v}' in leadIds")
        losers.append(int(v))
    if not losers:
        raise ApiError("701", "leadId cannot be blank")
    if len(losers) > 25:
        raise ApiError("1080", f"Too many leads to merge: {len(losers)} given, at most 25")
    crm = params.get("mergeInCRM", "false").strip().lower()
    if crm not in ("true", "false"):
        raise ApiError("1003", f"Invalid value '{params['mergeInCRM']}' for mergeInCRM: true or false")
    await run_in_threadpool(sb.store.merge_leads, lead_id, losers, crm == "true")
    return Response(json.dumps({"requestId": request_id(), "success": True}), media_type="application/json")

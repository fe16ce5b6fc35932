"""The Marketo sandbox HTTP API: identity, Lead Database REST paths, bulk lead and activity export, bulk
lead import, and the admin path.

Paths, parameters, envelopes, record statuses and error codes follow ``reference/marketo`` (Swagger spec and
developer docs). Marketo answers most errors with HTTP 200 and ``success: false``; so does the sandbox.

Bulk jobs run in background threads, two at a time per kind: lead and activity exports share one queue of 10
(1029 "Too many jobs in queue"), imports have their own queue of 10 (1016 "Too many imports") and a 10 MB file
limit (HTTP 413).

Admin calls (not part of Marketo; never under ``/rest``, ``/bulk`` or ``/identity``):

- ``GET /_sandbox/health``: ``{"status": "ok", "service": "marketo"}``.
- ``POST /_sandbox/leads`` ``{"leads": [...]}``: insert leads without activities; ``{"ids": [...]}`` (or
  ``{"count", "first_id", "last_id"}`` above 10,000 leads).
- ``GET /_sandbox/calls``: calls by endpoint, limited (606/615/607) and injected counts, peak concurrency.
- ``POST /_sandbox/calls/reset``: zero the call counters.
- ``POST /_sandbox/faults`` ``{"kind", "count", "path_prefix", "seconds", "status"}``: inject faults
  (kinds: rate_limit, concurrency, server_error, delay, expire_tokens, quota_exhausted, access_denied (603:
  the API user's role lacks a permission), and job_failure:
  the next ``count`` bulk jobs created through a path under ``path_prefix`` end Failed when they start,
  e.g. ``/bulk/v1/leads.json`` for imports, ``/bulk/v1/activities/export`` for activity exports);
  ``DELETE /_sandbox/faults`` clears them.
- ``POST /_sandbox/reset``: wipe all data, counters, faults and bulk jobs.
- ``GET /_sandbox/bulk``: ``{"hold": bool, "peak_importing": n}`` (the most imports seen importing at once).
- ``POST /_sandbox/bulk/hold`` ``{"hold": true|false}``: while held, queued bulk jobs (exports and imports)
  are not started, so queue limits can be observed; returns the same body as ``GET /_sandbox/bulk``.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from .fields import DEFAULT_LEAD_FIELDS, LEAD_FIELDS
from .guard import FAULT_KINDS, Fault, Guard
from .imports import IMPORT_MAX_FILE, ImportJobs
from .store import (CHANGE_DATA_VALUE, DELETE_LEAD, NEW_LEAD, STANDARD_ACTIVITY_TYPES, ApiError, MarketoStore,
                    decode_token, encode_token, quota_day)
from .values import parse_datetime

MAX_BATCH = 300
MAX_URI = 8 * 1024
MAX_BODY_REST = 1024 * 1024
MAX_BODY_BULK = 10 * 1024 * 1024
_ID_SEGMENT = re.compile(r"/(\d+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?=[/.]|$)")


def request_id() -> str:
    """A request id in Marketo's ``hex#hex`` form."""
    return f"{secrets.token_hex(2)}#{int(time.time() * 1000):x}"


def envelope(result=None, **extra) -> Response:
    """A successful Marketo response."""
    body = {"requestId": request_id(), "result": result if result is not None else [], "success": True,
            "errors": [], "warnings": [], **extra}
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


def failure(code: str, message: str) -> Response:
    """A response-level error: HTTP 200, ``success: false``. ``result``/``warnings`` keep the Swagger shape."""
    body = {"requestId": request_id(), "success": False, "errors": [{"code": str(code), "message": message}],
            "warnings": [], "result": []}
    return Response(json.dumps(body), media_type="application/json")


def endpoint_name(method: str, path: str) -> str:
    """``METHOD path`` with ids folded to ``{id}`` so counts group by operation."""
    return f"{method} {_ID_SEGMENT.sub('/{id}', path)}"


async def read_json(request: Request):
    """The JSON body; Marketo answers 612 for a non-JSON content type and 609 for malformed JSON."""
    ctype = request.headers.get("content-type", "")
    if "json" not in ctype:
        raise ApiError("612", "Invalid Content Type")
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        raise ApiError("609", "Invalid JSON") from None


async def read_input(request: Request) -> tuple[dict, list]:
    """The JSON body and its ``input`` array: required, at most 300 records (lead-database.md)."""
    body = await read_json(request)
    records = body.get("input") if isinstance(body, dict) else None
    if not records:
        raise ApiError("701", "input cannot be blank")
    if not isinstance(records, list):
        raise ApiError("1003", "Invalid data: input must be an array")
    if len(records) > MAX_BATCH:
        raise ApiError("1003", f"Too many records: {len(records)} given, at most {MAX_BATCH} per call")
    return body, records


def _csv_param(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _batch_size(value) -> int:
    if value in (None, ""):
        return MAX_BATCH
    try:
        size = int(value)
    except ValueError:
        raise ApiError("1003", f"Invalid batchSize '{value}'") from None
    if not 1 <= size <= MAX_BATCH:
        raise ApiError("1003", f"Invalid batchSize {size}: must be between 1 and {MAX_BATCH}")
    return size


def load_or_create_credentials(data_dir: Path, client_id: str | None = None,
                               client_secret: str | None = None) -> tuple[str, str]:
    """The custom service's credentials, kept in ``data_dir`` so a restarted sandbox accepts the same connection.

    Given values replace stored ones; missing ones are generated once.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "credentials.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    cid = client_id or stored.get("client_id") or f"{secrets.token_hex(4)}-{secrets.token_hex(2)}-sandbox"
    secret = client_secret or stored.get("client_secret") or secrets.token_urlsafe(24)
    if stored != {"client_id": cid, "client_secret": secret}:
        path.write_text(json.dumps({"client_id": cid, "client_secret": secret}))
        path.chmod(0o600)
    return cid, secret


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


def create_app(data_dir: Path, *, client_id: str | None = None, client_secret: str | None = None,
               token_ttl_s: int = 3600, daily_quota: int = 50000, rate_limit=(100, 20), max_concurrent: int = 10,
               export_delay_s: float = 0.0) -> FastAPI:
    """Build the sandbox app on the SQLite database in ``data_dir``."""
    store = MarketoStore(Path(data_dir))
    imports = ImportJobs(store)
    cid, secret = load_or_create_credentials(Path(data_dir), client_id, client_secret)
    guard = Guard(tuple(rate_limit), max_concurrent, token_ttl_s)
    stop = threading.Event()

    def run_export(job_id: str) -> None:
        if export_delay_s:
            time.sleep(export_delay_s)
        try:
            kind = store.db.execute("SELECT kind FROM exports WHERE exportId = ?", (job_id,)).fetchone()[0]
            if guard.take_faults(f"/bulk/v1/{kind}/export", job=True):
                raise RuntimeError("injected job failure")
            store.run_export(job_id)
        except Exception as exc:  # recorded on the job, as Marketo reports a Failed export
            store.fail_export(job_id, f"{type(exc).__name__}: {exc}")

    def run_import(batch_id: int) -> None:
        try:
            if guard.take_faults("/bulk/v1/leads.json", job=True):
                raise RuntimeError("injected job failure")
            imports.run(batch_id)
        except Exception as exc:  # recorded on the job, as Marketo reports a Failed import
            imports.fail(batch_id, f"{type(exc).__name__}: {exc}")

    def bulk_worker() -> None:
        # Starts queued export and import jobs, two of each kind at a time at most, like Marketo's bulk services.
        while not stop.is_set():
            started = False
            for take, run in ((store.next_export, run_export), (imports.next_job, run_import)):
                job = take()
                if job is not None:
                    started = True
                    threading.Thread(target=run, args=(job,), daemon=True).start()
            if not started:
                stop.wait(0.05)

    @asynccontextmanager
    async def lifespan(_app):
        worker = threading.Thread(target=bulk_worker, name="marketo-bulk", daemon=True)
        worker.start()
        yield
        stop.set()

    app = FastAPI(title="Marketo Engage sandbox", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.store = store
    app.state.guard = guard

    # ------------------------------------------------------------------ limits, auth, faults
    @app.middleware("http")
    async def service_front(request: Request, call_next):
        path = request.url.path
        is_api = path.startswith(("/rest/", "/bulk/"))
        if not (is_api or path.startswith("/identity/")):
            return await call_next(request)
        guard.count(endpoint_name(request.method, path))
        if len(str(request.url)) - len(str(request.base_url)) + 1 > MAX_URI:
            return PlainTextResponse("Request-URI Too Long", status_code=414)
        limit = MAX_BODY_BULK if path.startswith("/bulk/") else MAX_BODY_REST
        if int(request.headers.get("content-length") or 0) > limit:
            return PlainTextResponse("Request Entity Too Large", status_code=413)
        if is_api:
            auth = request.headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            problem = guard.tokens.check(token)
            if problem:
                # 601/602 calls are not counted against the rate limit or the quota (error-codes.md).
                if token is None and "access_token" in request.query_params:
                    return failure("601", "Access token invalid: the access_token query parameter is no longer"
                                          " supported, send an Authorization: Bearer header")
                return failure(*problem)
        if request.method == "POST" and request.query_params.get("_method", "").upper() == "GET":
            # Long queries: POST with _method=GET and the query string in a form body (lead-database.md).
            query = [(k, v) for k, v in request.query_params.multi_items() if k != "_method"]
            query += parse_qsl((await request.body()).decode())
            request.scope["method"] = "GET"
            request.scope["query_string"] = urlencode(query).encode()
        if not guard.enter():
            return failure("615", "Concurrent access limit reached")
        try:
            for fault in guard.take_faults(path):
                if fault.kind == "delay":
                    await asyncio.sleep(fault.seconds)
                elif fault.kind == "server_error":
                    return PlainTextResponse("Bad Gateway", status_code=fault.status)
                elif fault.kind == "rate_limit":
                    return failure("606", f"Max rate limit '{guard.rate_limit[0]}' exceeded with in "
                                          f"'{guard.rate_limit[1]}' secs")
                elif fault.kind == "concurrency":
                    return failure("615", "Concurrent access limit reached")
                elif fault.kind == "quota_exhausted":
                    return failure("607", "Daily quota reached")
                elif fault.kind == "access_denied":  # the API user's role lacks the permission (error-codes.md)
                    return failure("603", "Access denied")
            if is_api:
                if not guard.admit_rate():
                    return failure("606", f"Max rate limit '{guard.rate_limit[0]}' exceeded with in "
                                          f"'{guard.rate_limit[1]}' secs")
                used = await run_in_threadpool(store.increment_counter, f"api:{quota_day()}")
                if used > daily_quota:
                    guard.note_quota_exhausted()
                    return failure("607", "Daily quota reached")
            return await call_next(request)
        finally:
            guard.leave()

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return failure(exc.code, exc.message)

    @app.exception_handler(404)
    async def not_found(request: Request, _exc):
        if request.url.path.startswith(("/rest/", "/bulk/")):
            return failure("610", "Requested resource not found")
        return JSONResponse({"error": "not found"}, status_code=404)

    @app.exception_handler(405)
    async def bad_method(request: Request, _exc):
        return failure("605", "HTTP Method not supported")

    @app.exception_handler(Exception)
    async def system_error(_request, exc: Exception):
        return failure("611", f"System error: {type(exc).__name__}")

    # ------------------------------------------------------------------ identity
    @app.api_route("/identity/oauth/token", methods=["GET", "POST"])
    async def identity(request: Request):
        params = dict(request.query_params)
        if request.method == "POST" and "form" in request.headers.get("content-type", ""):
            params.update({k: v[0] for k, v in parse_qs((await request.body()).decode()).items()})
        if params.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "invalid_request", "error_description": "Missing or unsupported grant type"},
                                status_code=400)
        if not (secrets.compare_digest(params.get("client_id", ""), cid)
                and secrets.compare_digest(params.get("client_secret", ""), secret)):
            return JSONResponse({"error": "unauthorized", "error_description": "Bad client credentials"},
                                status_code=401)
        token, expires_in = guard.tokens.issue()
        return JSONResponse({"access_token": token, "token_type": "bearer", "expires_in": expires_in,
                             "scope": "sync-api@sandbox.marketo"})

    # ------------------------------------------------------------------ describe
    @app.get("/rest/v1/leads/describe.json")
    async def describe():
        return envelope([{**f.described({"id": f.id}), "rest": {"name": f.name, "readOnly": f.read_only},
                          "soap": {"name": f.soap_name, "readOnly": f.read_only}} for f in LEAD_FIELDS])

    @app.get("/rest/v1/leads/describe2.json")
    async def describe2():
        fields = [{**f.described({"name": f.name}), "updateable": not f.read_only, "crmManaged": False}
                  for f in LEAD_FIELDS]
        searchable = [[f.name] for f in LEAD_FIELDS if f.searchable]
        return envelope([{"name": "API Lead", "searchableFields": searchable, "fields": fields}])

    # ------------------------------------------------------------------ leads
    async def leads_by_filter(params: dict) -> Response:
        filter_type = params.get("filterType")
        values = _csv_param(params.get("filterValues"))
        if not filter_type:
            raise ApiError("701", "filterType cannot be blank")
        if not values:
            raise ApiError("701", "filterValues cannot be blank")
        if len(values) > MAX_BATCH:
            raise ApiError("1003", f"Invalid filterValues: {len(values)} values given, at most {MAX_BATCH} allowed")
        batch = _batch_size(params.get("batchSize"))
        after = 0
        if params.get("nextPageToken"):
            kind, value = decode_token(params["nextPageToken"])
            if kind != "l":
                raise ApiError("1003", "Invalid paging token")
            after = int(value)
        fields = store.resolve_fields(_csv_param(params.get("fields")), DEFAULT_LEAD_FIELDS)
        rows, more = await run_in_threadpool(store.leads_by_filter, filter_type, values, fields, after, batch)
        extra = {}
        if more:
            extra = {"moreResult": True, "nextPageToken": encode_token("l", str(rows[-1]["id"]))}
        return envelope(rows, **extra)

    @app.get("/rest/v1/leads.json")
    async def get_leads(request: Request):
        return await leads_by_filter(dict(request.query_params))

    @app.post("/rest/v1/leads.json")
    async def sync_leads(request: Request):
        body, records = await read_input(request)
        action = body.get("action") or "createOrUpdate"
        if action not in ("createOnly", "updateOnly", "createOrUpdate", "createDuplicate"):
            raise ApiError("1003", f"Invalid action '{action}'")
        lookup = body.get("lookupField") or "email"
        results = await run_in_threadpool(store.sync_leads, action, lookup, records)
        return envelope([r.as_json() for r in results])

    @app.get("/rest/v1/lead/{lead_id:int}.json")
    async def get_lead(lead_id: int, request: Request):
        fields = store.resolve_fields(_csv_param(request.query_params.get("fields")), DEFAULT_LEAD_FIELDS)
        lead = await run_in_threadpool(store.lead_by_id, lead_id, fields)
        return envelope([lead] if lead else [])

    @app.post("/rest/v1/leads/delete.json")
    async def delete_leads(request: Request):
        if request.query_params.get("id"):
            ids = [int(x) for x in _csv_param(request.query_params["id"]) if x.isdigit()][:MAX_BATCH + 1]
            if len(ids) > MAX_BATCH:
                raise ApiError("1003", f"Too many records: more than {MAX_BATCH} ids per call")
        else:
            _, ids = await read_input(request)
        results = await run_in_threadpool(store.delete_leads, ids)
        return envelope([r.as_json() for r in results])

    @app.post("/rest/v1/leads/{lead_id:int}/merge.json")
    async def merge_leads(lead_id: int, request: Request):
        raw = request.query_params.getlist("leadIds") + request.query_params.getlist("leadId")
        losers = []
        for chunk in raw:
            for v in _csv_param(chunk):
                if not v.isdigit():
                    raise ApiError("1003", f"Invalid lead id '{v}'")
                losers.append(int(v))
        if not losers:
            raise ApiError("701", "leadId cannot be blank")
        if len(losers) > 25:
            raise ApiError("1080", f"Too many leads to merge: {len(losers)} given, at most 25")
        await run_in_threadpool(store.merge_leads, lead_id, losers)
        return Response(json.dumps({"requestId": request_id(), "success": True}), media_type="application/json")

    # ------------------------------------------------------------------ activities
    @app.get("/rest/v1/activities/pagingtoken.json")
    async def paging_token(sinceDatetime: str | None = None):
        if not sinceDatetime:
            raise ApiError("701", "sinceDatetime cannot be blank")
        try:
            since = parse_datetime(sinceDatetime)
        except ValueError:
            raise ApiError("1001", f"Invalid value '{sinceDatetime}'. Required of type 'datetime'") from None
        return Response(json.dumps({"requestId": request_id(), "success": True, "errors": [], "warnings": [],
                                    "nextPageToken": store.paging_token(since)}), media_type="application/json")

    def _lead_ids(params) -> tuple[str, list]:
        ids = _csv_param(params.get("leadIds"))
        if not ids:
            return "", []
        if len(ids) > 30 or not all(i.isdigit() for i in ids):
            raise ApiError("1003", "Invalid leadIds: at most 30 integer ids")
        return f" AND leadId IN ({','.join('?' * len(ids))})", [int(i) for i in ids]

    async def activity_page(params, where: str, args: list, lead_change: bool = False) -> Response:
        token = params.get("nextPageToken")
        if not token:
            raise ApiError("701", "nextPageToken cannot be blank")
        if params.get("listId"):
            raise ApiError("1003", "listId is not supported by the sandbox")
        lead_where, lead_args = _lead_ids(params)
        rows, next_token, more = await run_in_threadpool(
            store.activities_page, token, where + lead_where, args + lead_args, _batch_size(params.get("batchSize")))
        return envelope([render_activity(r, lead_change=lead_change) for r in rows], nextPageToken=next_token,
                        moreResult=more)

    @app.get("/rest/v1/activities/leadchanges.json")
    async def lead_changes(request: Request):
        params = request.query_params
        fields = [f for f in _csv_param(params.get("fields")) if f]
        if not fields:
            raise ApiError("701", "fields cannot be blank")
        where = (f"activityTypeId = {NEW_LEAD} OR (activityTypeId = {CHANGE_DATA_VALUE} AND field IN "
                 f"({','.join('?' * len(fields))}))")
        return await activity_page(params, where, fields, lead_change=True)

    @app.get("/rest/v1/activities/deletedleads.json")
    async def deleted_leads(request: Request):
        return await activity_page(request.query_params, f"activityTypeId = {DELETE_LEAD}", [])

    @app.get("/rest/v1/activities.json")
    async def activities(request: Request):
        type_ids = _csv_param(request.query_params.get("activityTypeIds"))
        if not type_ids:
            raise ApiError("701", "activityTypeIds cannot be blank")
        if len(type_ids) > 10 or not all(t.isdigit() for t in type_ids):
            raise ApiError("1003", "Invalid activityTypeIds: at most 10 integer ids")
        return await activity_page(request.query_params, f"activityTypeId IN ({','.join('?' * len(type_ids))})",
                                   [int(t) for t in type_ids])

    @app.get("/rest/v1/activities/types.json")
    async def activity_types():
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

    @app.get("/rest/v1/activities/external/types.json")
    async def custom_types():
        types = await run_in_threadpool(store.activity_types)
        return envelope([{k: v for k, v in t.items() if k not in ("primaryAttribute", "attributes")} for t in types])

    @app.post("/rest/v1/activities/external/type.json")
    async def create_custom_type(request: Request):
        body = await read_json(request)
        return envelope([await run_in_threadpool(store.create_activity_type, body or {})])

    @app.get("/rest/v1/activities/external/type/{api_name}/describe.json")
    async def describe_custom_type(api_name: str, draft: bool = False):
        return envelope([await run_in_threadpool(lambda: store.activity_type(api_name, draft=draft))])

    @app.post("/rest/v1/activities/external/type/{api_name}/approve.json")
    async def approve_custom_type(api_name: str):
        return envelope([await run_in_threadpool(store.approve_activity_type, api_name)])

    @app.post("/rest/v1/activities/external/type/{api_name}/attributes/create.json")
    async def create_custom_type_attributes(api_name: str, request: Request):
        body = await read_json(request)
        attrs = body.get("attributes") if isinstance(body, dict) else None
        if not attrs:
            raise ApiError("701", "attributes cannot be blank")
        return envelope([await run_in_threadpool(store.create_activity_type_attributes, api_name, attrs)])

    @app.post("/rest/v1/activities/external.json")
    async def add_custom_activities(request: Request):
        _, records = await read_input(request)
        results = await run_in_threadpool(store.add_custom_activities, records)
        out = []
        for r in results:
            item = r.as_json(reason_key="errors")
            if r.id is not None:
                item["marketoGUID"] = str(r.id)
            out.append(item)
        return envelope(out)

    # ------------------------------------------------------------------ bulk export (leads, activities)
    def export_routes(prefix: str, kind: str, create) -> None:
        @app.post(f"{prefix}/create.json", name=f"{kind}_export_create")
        async def export_create(request: Request):
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ApiError("1003", "Invalid export request")
            return envelope([await run_in_threadpool(create, body)])

        @app.post(f"{prefix}/{{export_id}}/enqueue.json", name=f"{kind}_export_enqueue")
        async def export_enqueue(export_id: str):
            return envelope([await run_in_threadpool(store.enqueue_export, export_id, kind)])

        @app.post(f"{prefix}/{{export_id}}/cancel.json", name=f"{kind}_export_cancel")
        async def export_cancel(export_id: str):
            return envelope([await run_in_threadpool(store.cancel_export, export_id, kind)])

        @app.get(f"{prefix}/{{export_id}}/status.json", name=f"{kind}_export_status")
        async def export_status(export_id: str):
            return envelope([await run_in_threadpool(store.export_status, export_id, kind)])

        @app.get(f"{prefix}.json", name=f"{kind}_export_list")
        async def export_list(status: str | None = None):
            return envelope(await run_in_threadpool(store.list_exports, _csv_param(status), kind))

        @app.get(f"{prefix}/{{export_id}}/file.json", name=f"{kind}_export_file")
        async def export_file(export_id: str, request: Request):
            try:
                job = store.export_status(export_id, kind)
            except ApiError:
                job = {}
            if job.get("status") != "Completed":
                return PlainTextResponse("Export file not found: the job does not exist or is not completed",
                                         status_code=404)
            return file_range(store.export_file(export_id), request.headers.get("range"))

    export_routes("/bulk/v1/leads/export", "leads", store.create_export)
    export_routes("/bulk/v1/activities/export", "activities", store.create_activity_export)

    # ------------------------------------------------------------------ bulk lead import
    @app.post("/bulk/v1/leads.json")
    async def import_leads(request: Request):
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

        return envelope([await run_in_threadpool(imports.create, data, param("format"), param("lookupField"),
                                                 param("listId"), param("partitionName"))])

    @app.get("/bulk/v1/leads/batch/{batch_id:int}.json")
    async def import_status(batch_id: int):
        return envelope([await run_in_threadpool(imports.status, batch_id)])

    @app.get("/bulk/v1/leads/batch/{batch_id:int}/{which}.json")
    async def import_report(batch_id: int, which: str):
        if which not in ("failures", "warnings"):
            raise ApiError("610", "Requested resource not found")
        data, media = await run_in_threadpool(imports.report, batch_id, which)
        return Response(data, media_type=media)

    # ------------------------------------------------------------------ admin (not part of Marketo)
    @app.get("/_sandbox/health")
    async def health():
        return {"status": "ok", "service": "marketo"}

    @app.post("/_sandbox/leads")
    async def seed(request: Request):
        body = json.loads(await request.body() or b"{}")
        leads = body.get("leads")
        if not isinstance(leads, list):
            return JSONResponse({"error": "body must be {\"leads\": [...]}"}, status_code=400)
        try:
            first, last = await run_in_threadpool(store.seed_leads, leads)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        count = last - first + 1 if leads else 0
        if count > 10000:
            return {"count": count, "first_id": first, "last_id": last}
        return {"ids": list(range(first, last + 1)) if leads else []}

    @app.get("/_sandbox/calls")
    async def calls():
        return guard.stats()

    @app.post("/_sandbox/calls/reset")
    async def calls_reset():
        guard.reset_counts()
        return {"status": "ok"}

    @app.post("/_sandbox/faults")
    async def add_fault(request: Request):
        body = json.loads(await request.body() or b"{}")
        kind = body.get("kind")
        if kind not in FAULT_KINDS:
            return JSONResponse({"error": f"kind must be one of {FAULT_KINDS}"}, status_code=400)
        guard.add_fault(Fault(kind=kind, count=int(body.get("count", 1)), path_prefix=body.get("path_prefix") or "/",
                              seconds=float(body.get("seconds", 0)), status=int(body.get("status", 502))))
        return {"status": "ok", "faults": len(guard.faults)}

    @app.delete("/_sandbox/faults")
    async def clear_faults():
        guard.clear_faults()
        return {"status": "ok"}

    def bulk_state() -> dict:
        return {"hold": store.bulk_hold.is_set(), "peak_importing": imports.peak_importing}

    @app.get("/_sandbox/bulk")
    async def bulk_info():
        return bulk_state()

    @app.post("/_sandbox/bulk/hold")
    async def bulk_hold(request: Request):
        body = json.loads(await request.body() or b"{}")
        if not isinstance(body, dict) or not isinstance(body.get("hold"), bool):
            return JSONResponse({"error": "body must be {\"hold\": true|false}"}, status_code=400)
        (store.bulk_hold.set if body["hold"] else store.bulk_hold.clear)()
        return bulk_state()

    @app.post("/_sandbox/reset")
    async def reset():
        await run_in_threadpool(store.reset)
        store.bulk_hold.clear()
        imports.peak_importing = 0
        guard.reset()
        return {"status": "ok"}

    return app

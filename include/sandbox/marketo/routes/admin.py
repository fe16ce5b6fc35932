"""The admin API under ``/_sandbox`` (not part of Marketo; see :mod:`sandbox.marketo.app` for the list)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..context import SandboxDep
from ..guard import FAULT_KINDS, Fault

router = APIRouter(prefix="/_sandbox")


@router.get("/health")
async def health():
    return {"status": "ok", "service": "marketo"}


@router.post("/leads")
async def seed(request: Request, sb: SandboxDep):
    body = json.loads(await request.body() or b"{}")
    leads = body.get("leads")
    if not isinstance(leads, list):
        return JSONResponse({"error": "body must be {\"leads\": [...]}"}, status_code=400)
    try:
        first, last = await run_in_threadpool(sb.store.seed_leads, leads)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    count = last - first + 1 if leads else 0
    if count > 10000:
        return {"count": count, "first_id": first, "last_id": last}
    return {"ids": list(range(first, last + 1)) if leads else []}


@router.get("/calls")
async def calls(sb: SandboxDep):
    return sb.guard.stats()


@router.post("/calls/reset")
async def calls_reset(sb: SandboxDep):
    sb.guard.reset_counts()
    return {"status": "ok"}


@router.post("/faults")
async def add_fault(request: Request, sb: SandboxDep):
    body = json.loads(await request.body() or b"{}")
    kind = body.get("kind")
    if kind not in FAULT_KINDS:
        return JSONResponse({"error": f"kind must be one of {FAULT_KINDS}"}, status_code=400)
    sb.guard.add_fault(Fault(kind=kind, count=int(body.get("count", 1)), path_prefix=body.get("path_prefix") or "/",
                             seconds=float(body.get("seconds", 0)), status=int(body.get("status", 502))))
    return {"status": "ok", "faults": len(sb.guard.faults)}


@router.delete("/faults")
async def clear_faults(sb: SandboxDep):
    sb.guard.clear_faults()
    return {"status": "ok"}


def bulk_state(sb) -> dict:
    return {"hold": sb.store.bulk_hold.is_set(), "peak_importing": sb.imports.peak_importing}


@router.get("/bulk")
async def bulk_info(sb: SandboxDep):
    return bulk_state(sb)


@router.post("/bulk/hold")
async def bulk_hold(request: Request, sb: SandboxDep):
    body = json.loads(await request.body() or b"{}")
    if not isinstance(body, dict) or not isinstance(body.get("hold"), bool):
        return JSONResponse({"error": "body must be {\"hold\": true|false}"}, status_code=400)
    (sb.store.bulk_hold.set if body["hold"] else sb.store.bulk_hold.clear)()
    return bulk_state(sb)


@router.post("/reset")
async def reset(sb: SandboxDep):
    await run_in_threadpool(sb.store.reset)
    sb.store.bulk_hold.clear()
    sb.imports.peak_importing = 0
    sb.guard.reset()
    return {"status": "ok"}

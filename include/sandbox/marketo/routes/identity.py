"""Identity: ``/identity/oauth/token`` (authentication.md), the client credentials grant only."""

from __future__ import annotations

import secrets
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..context import SandboxDep

router = APIRouter()


@router.api_route("/identity/oauth/token", methods=["GET", "POST"])
async def identity(request: Request, sb: SandboxDep):
    params = dict(request.query_params)
    if request.method == "POST" and "form" in request.headers.get("content-type", ""):
        params.update({k: v[0] for k, v in parse_qs((await request.body()).decode()).items()})
    if params.get("grant_type") != "client_credentials":
        return JSONResponse({"error": "invalid_request", "error_description": "Missing or unsupported grant type"},
                            status_code=400)
    if not (secrets.compare_digest(params.get("client_id", ""), sb.client_id)
            and secrets.compare_digest(params.get("client_secret", ""), sb.client_secret)):
        return JSONResponse({"error": "unauthorized", "error_description": "Bad client credentials"},
                            status_code=401)
    token, expires_in = sb.guard.tokens.issue()
    return JSONResponse({"access_token": token, "token_type": "bearer", "expires_in": expires_in,
                         "scope": "sync-api@sandbox.marketo"})

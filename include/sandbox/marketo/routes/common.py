"""Envelopes, request limits and parameter parsing shared by the API areas.

Marketo answers most errors with HTTP 200 and ``success: false`` (error-codes.md); so does the sandbox.
"""

from __future__ import annotations

import json
import re
import secrets
import time

from fastapi import Request
from fastapi.responses import Response

from ..store import ApiError

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


def csv_param(value: str | None) -> list[str]:
    """A comma-separated parameter as its non-blank items."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def list_param(params, name: str) -> list[str]:
    """An array parameter, comma-separated or repeated (the Swagger spec's ``collectionFormat: multi``) or both."""
    return [v for raw in params.getlist(name) for v in csv_param(raw)]


def batch_size(value) -> int:
    """``batchSize``: 1 to 300, 300 when absent (paging-tokens.md)."""
    if value in (None, ""):
        return MAX_BATCH
    try:
        size = int(value)
    except ValueError:
        raise ApiError("1003", f"Invalid batchSize '{value}'") from None
    if not 1 <= size <= MAX_BATCH:
        raise ApiError("1003", f"Invalid batchSize {size}: must be between 1 and {MAX_BATCH}")
    return size

"""Usage (usage.md): daily and last-7-days API usage and errors, answered from the sandbox's own call counting.

- ``GET /rest/v1/stats/usage.json``, ``GET /rest/v1/stats/usage/last7days.json``: ``total`` is the calls the
  front middleware (:mod:`sandbox.marketo.front`) counted against the daily quota that day, the persistent
  ``api:<day>`` counter behind 607. That is every ``/rest`` and ``/bulk`` call that got past the token check,
  the concurrency cap, injected faults and the rate window, the Usage calls themselves included (as on Marketo);
  a call refused with 607 was counted before it was refused, so past the quota ``total`` exceeds it by the
  refused calls. ``users`` has the one API user the sandbox knows, :data:`API_USER` (the identity service's
  ``scope``: the user owning the custom service).
- ``GET /rest/v1/stats/errors.json``, ``GET /rest/v1/stats/errors/last7days.json``: every response-level error
  the sandbox answered on ``/rest`` and ``/bulk`` that day (``success: false``: 601/602, 603, 604, 606, 607,
  608, 610, 611, 615, 1003, 1029...), counted by :class:`ErrorCounter` per code. Record-level outcomes (a
  skipped record's reasons inside ``result``) are not call errors and are not counted; neither are plain HTTP
  refusals without a Marketo code (413, 414, an injected 5xx).

Days are quota days: Marketo resets its quota at 12:00 AM US Central time (rest-api.md says CST); the sandbox's
quota uses ``America/Chicago`` midnight (:func:`sandbox.marketo.store.quota_day`, so CDT in summer) and so do
these counts. A last-7-days answer lists today and the six days before, newest first, every day present (a day
without calls as ``total`` 0 and no users or error codes). Counts persist in the sandbox database across
restarts and are wiped by ``POST /_sandbox/reset`` (not by ``/_sandbox/calls/reset``, which zeroes only the
in-memory per-endpoint counters).
"""

from __future__ import annotations

import json
from datetime import date, timedelta

from fastapi import APIRouter, FastAPI
from starlette.concurrency import run_in_threadpool

from ..context import SandboxDep
from ..store import MarketoStore, quota_day
from .common import envelope

router = APIRouter()

#: The API-only user owning the sandbox's custom service: the ``scope`` the identity route gives every token.
API_USER = "sync-api@sandbox.marketo"
#: The meta-table counter the front middleware counts quota calls under (``api:<day>``).
USAGE_KEY = "api"
#: Errors are counted under ``api-errors:<day>:<code>``.
ERROR_KEY = "api-errors"
#: Failures are small envelopes; a JSON body larger than this is a result, streamed on without being read.
INSPECT_LIMIT = 64 * 1024
_FAILED = (b'"success": false', b'"success":false')


def _days(count: int) -> list[str]:
    """Today's quota day and the ``count - 1`` days before it, newest first (``YYYY-MM-DD``)."""
    today = date.fromisoformat(quota_day())
    return [(today - timedelta(days=i)).isoformat() for i in range(count)]


def _read_counts(store: MarketoStore, days: list[str]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Calls per day and errors per day and code for ``days`` (newest first), in one locked read."""
    usage_keys = [f"{USAGE_KEY}:{d}" for d in days]
    with store.lock:
        usage = dict(store.db.execute(
            f"SELECT key, CAST(value AS INTEGER) FROM meta WHERE key IN ({','.join('?' * len(usage_keys))})",
            usage_keys).fetchall())
        # Keys of a day sort between "<prefix>:<day>:" and "<prefix>:<day>;" (';' follows ':').
        error_rows = store.db.execute(
            "SELECT key, CAST(value AS INTEGER) FROM meta WHERE key >= ? AND key < ?",
            (f"{ERROR_KEY}:{days[-1]}:", f"{ERROR_KEY}:{days[0]};")).fetchall()
    calls = {d: usage.get(f"{USAGE_KEY}:{d}", 0) for d in days}
    errors: dict[str, dict[str, int]] = {d: {} for d in days}
    for key, value in error_rows:
        _, day, code = key.split(":", 2)
        if day in errors:
            errors[day][code] = value
    return calls, errors


def _usage(store: MarketoStore, count: int) -> list[dict]:
    calls, _ = _read_counts(store, _days(count))
    return [{"date": day, "total": total, "users": [{"userId": API_USER, "count": total}] if total else []}
            for day, total in calls.items()]


def _errors(store: MarketoStore, count: int) -> list[dict]:
    _, errors = _read_counts(store, _days(count))
    return [{"date": day, "total": sum(codes.values()),
             "errors": [{"errorCode": code, "count": codes[code]} for code in sorted(codes, key=_code_order)]}
            for day, codes in errors.items()]


def _code_order(code: str) -> tuple[int, str]:
    return (int(code), code) if code.isdigit() else (10 ** 9, code)


@router.get("/rest/v1/stats/usage.json")
async def daily_usage(sb: SandboxDep):
    """Get Daily Usage: today's calls (this one included) and the API user's share."""
    return envelope(await run_in_threadpool(_usage, sb.store, 1))


@router.get("/rest/v1/stats/usage/last7days.json")
async def weekly_usage(sb: SandboxDep):
    """Get Weekly Usage: one entry per quota day, today and the six before, newest first."""
    return envelope(await run_in_threadpool(_usage, sb.store, 7))


@router.get("/rest/v1/stats/errors.json")
async def daily_errors(sb: SandboxDep):
    """Get Daily Errors: today's response-level errors by code."""
    return envelope(await run_in_threadpool(_errors, sb.store, 1))


@router.get("/rest/v1/stats/errors/last7days.json")
async def weekly_errors(sb: SandboxDep):
    """Get Weekly Errors: one entry per quota day, today and the six before, newest first."""
    return envelope(await run_in_threadpool(_errors, sb.store, 7))


def failed_codes(body: bytes) -> list[str]:
    """The error codes of a ``success: false`` envelope (empty for anything else)."""
    if not any(marker in body for marker in _FAILED):
        return []
    try:
        parsed = json.loads(body)
    except ValueError:
        return []
    if not isinstance(parsed, dict) or parsed.get("success") is not False:
        return []
    return [str(e.get("code")) for e in parsed.get("errors") or [] if isinstance(e, dict) and e.get("code")]


def record_errors(store: MarketoStore, codes: list[str]) -> None:
    """Count ``codes`` against today's quota day."""
    day = quota_day()
    for code in codes:
        store.increment_counter(f"{ERROR_KEY}:{day}:{code}")


class ErrorCounter:
    """ASGI middleware counting the response-level errors answered on ``/rest`` and ``/bulk`` (for the Usage
    error endpoints), whoever answered them: the front middleware (601, 606, 607, 615, injected faults), the
    error handlers (610, 605, 611) or a route (1003, 1029...).

    A JSON body is held until it is complete and its errors are counted before it is sent, so a client that has
    read an error and asks for today's errors next sees it counted. Bodies over :data:`INSPECT_LIMIT` (results,
    never failures) are passed on as they come.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(("/rest/", "/bulk/")):
            await self.app(scope, receive, send)
            return
        store: MarketoStore = scope["app"].state.sandbox.store
        held: list[dict] = []
        state = {"inspect": False, "size": 0}

        async def tap(message) -> None:
            if message["type"] == "http.response.start":
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                state["inspect"] = ctype.startswith(b"application/json")
            elif message["type"] == "http.response.body" and state["inspect"]:
                held.append(message)
                state["size"] += len(message.get("body", b""))
                if message.get("more_body") and state["size"] <= INSPECT_LIMIT:
                    return
                state["inspect"] = False
                if not message.get("more_body"):
                    codes = failed_codes(b"".join(m.get("body", b"") for m in held))
                    if codes:
                        await run_in_threadpool(record_errors, store, codes)
                for m in held:
                    await send(m)
                held.clear()
                return
            await send(message)

        try:
            await self.app(scope, receive, tap)
        except Exception:
            # The app's catch-all handler answers this with 611 "System error" outside this middleware.
            await run_in_threadpool(record_errors, store, ["611"])
            raise


def install(app: FastAPI) -> None:
    """Count errors for the Usage endpoints on ``app``: call after :func:`sandbox.marketo.front.install`, so the
    counter wraps the front middleware and sees the errors it answers too."""
    app.add_middleware(ErrorCounter)

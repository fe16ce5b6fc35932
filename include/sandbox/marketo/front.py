"""What stands in front of every Marketo call: URI and body limits, the bearer token, long queries sent as
``POST ... _method=GET``, concurrency (615), injected faults, the rate window (606) and the daily quota (607);
and the error handlers that turn unknown paths, wrong methods and crashes into Marketo envelopes.

Calls under ``/rest``, ``/bulk`` and ``/identity`` are counted by endpoint; admin calls (``/_sandbox``) pass
straight through.
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from .context import Sandbox
from .routes.common import MAX_BODY_BULK, MAX_BODY_REST, MAX_URI, endpoint_name, failure
from .guard import ENVELOPE_FAULTS
from .store import ApiError, quota_day


FORM = "application/x-www-form-urlencoded"


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """``text/x; charset=UTF-8`` -> (``text/x``, ``{"charset": "UTF-8"}``), the type lower-cased."""
    main, _, rest = content_type.partition(";")
    params = {}
    for part in rest.split(";"):
        key, _, value = part.strip().partition("=")
        if key:
            params[key.strip().lower()] = value.strip().strip('"')
    return main.strip().lower(), params


async def _long_query_form(request: Request) -> list[tuple[str, str]] | None:
    """The form body of a ``POST`` that is a GET sent the long way, else None.

    That is a POST with ``_method=GET`` in its query string, in its ``application/x-www-form-urlencoded`` body,
    or in both (widely used clients do each). The body is decoded in the ``charset`` its Content-Type names
    (UTF-8 when none) and its blank values are kept, as in a GET. A body of another content type is 612, as are
    an unknown charset and a body that is not in it.
    """
    in_query = request.query_params.get("_method", "").upper() == "GET"
    media, params = _media_type(request.headers.get("content-type", ""))
    if not in_query and media != FORM:
        return None
    body = await request.body()
    if media not in (FORM, "") and body:
        raise ApiError("612", f"Invalid Content Type: a _method=GET body must be {FORM}")
    charset = params.get("charset") or "utf-8"
    try:
        form = parse_qsl(body.decode(charset), keep_blank_values=True, encoding=charset, errors="strict")
    except (LookupError, UnicodeDecodeError):
        raise ApiError("612", f"Invalid Content Type: the body is not {FORM} in charset {charset!r}") from None
    if not in_query and not any(k == "_method" and v.upper() == "GET" for k, v in form):
        return None
    return form


async def service_front(request: Request, call_next):
    """The HTTP middleware (installed by :func:`install`)."""
    sb: Sandbox = request.app.state.sandbox
    guard = sb.guard
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
    url_query = list(request.query_params.multi_items())
    body_token = None
    if is_api and request.method == "POST":
        try:
            form = await _long_query_form(request)
        except ApiError as exc:
            return failure(exc.code, exc.message)
        if form is not None:
            # Long queries (lead-database.md "Long URIs"): the call is the GET that the URL's parameters and
            # the form body's spell out, and answers as that GET would. A token in the body authenticates it
            # (clients put the whole query there, access_token included); one in the URL is refused below.
            body_token = next((v for k, v in reversed(form) if k == "access_token"), None)
            query = [(k, v) for k, v in url_query + form if k not in ("_method", "access_token")]
            request.scope["method"] = "GET"
            request.scope["query_string"] = urlencode(query).encode()
    if is_api:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else body_token
        problem = guard.tokens.check(token)
        if problem:
            # 601/602 calls are not counted against the rate limit or the quota (error-codes.md).
            if token is None and any(k == "access_token" for k, _ in url_query):
                return failure("601", "Access token invalid: the access_token query parameter is no longer"
                                      " supported, send an Authorization: Bearer header")
            return failure(*problem)
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
            elif fault.kind in ENVELOPE_FAULTS:  # 604, 608, 713: the call failed and was not executed
                if fault.seconds:
                    await asyncio.sleep(fault.seconds)
                return failure(*ENVELOPE_FAULTS[fault.kind])
        if is_api:
            if not guard.admit_rate():
                return failure("606", f"Max rate limit '{guard.rate_limit[0]}' exceeded with in "
                                      f"'{guard.rate_limit[1]}' secs")
            used = await run_in_threadpool(sb.store.increment_counter, f"api:{quota_day()}")
            if used > sb.daily_quota:
                guard.note_quota_exhausted()
                return failure("607", "Daily quota reached")
        return await call_next(request)
    finally:
        guard.leave()


async def _api_error(_request, exc: ApiError):
    return failure(exc.code, exc.message)


async def _not_found(request: Request, _exc):
    if request.url.path.startswith(("/rest/", "/bulk/")):
        return failure("610", "Requested resource not found")
    return JSONResponse({"error": "not found"}, status_code=404)


async def _bad_method(_request: Request, _exc):
    return failure("605", "HTTP Method not supported")


async def _system_error(_request, exc: Exception):
    return failure("611", f"System error: {type(exc).__name__}")


def install(app: FastAPI) -> None:
    """Put the front middleware and the Marketo error handlers on ``app``."""
    app.middleware("http")(service_front)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(404, _not_found)
    app.add_exception_handler(405, _bad_method)
    app.add_exception_handler(Exception, _system_error)

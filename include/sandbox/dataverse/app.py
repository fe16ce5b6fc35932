"""The sandbox HTTP server: Entra ID endpoints, the Web API, service protection, faults and admin routes."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import re
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pyrate_limiter import InMemoryBucket, Rate, RateItem

from . import errors as E
from .errors import DataverseError
from .identity import Identity, TokenService
from .schema import LINK_KEY_COLUMN
from .store import Store
from .webapi import API, Reply, WebApi


class Protection:
    """Service protection per user: requests per sliding window (pyrate-limiter) and concurrent requests.

    It also keeps the most requests that were in flight at once (all users) since :meth:`reset_peak`, which
    the admin API reports, and the degree of parallelism the service recommends (``x-ms-dop-hint``), and counts
    every 429 the sandbox answers (:attr:`throttled`, by reason: the limit's error code, or :attr:`INJECTED`).
    """

    #: the ``throttled`` reason of a 429 sent by an injected ``throttle`` fault (Web API or Entra ID), kept
    #: apart from the limits' codes because the Web API's injected 429 carries ``0x80072322`` too
    INJECTED = "injected"

    def __init__(self, requests_per_window: int, window_s: int, max_concurrent: int,
                 dop_hint: int | None = None) -> None:
        self.rate = Rate(requests_per_window, window_s * 1000)
        self.max_concurrent = max_concurrent
        self.buckets: dict[str, InMemoryBucket] = {}
        self.in_flight: Counter = Counter()
        self.peak = 0
        self.default_dop_hint = self.dop_hint = dop_hint
        #: 429s answered since the last reset, by reason; a reason appears once it has refused a request
        self.throttled: Counter = Counter()
        self.lock = threading.Lock()

    def enter(self, user: str) -> None:
        """Admit one request or raise the 429 the real service sends."""
        with self.lock:
            bucket = self.buckets.setdefault(user, InMemoryBucket([self.rate]))
            item = RateItem(user, int(time.time() * 1000))
            if not bucket.put(item):
                wait = math.ceil(bucket.waiting(item) / 1000) or 1
                self.throttled[E.THROTTLE_REQUESTS] += 1
                raise DataverseError(429, E.THROTTLE_REQUESTS, f"Number of requests exceeded the limit of "
                                     f"{self.rate.limit} over time window of {self.rate.interval // 1000} seconds.",
                                     {"Retry-After": str(wait)})
            if self.in_flight[user] >= self.max_concurrent:
                self.throttled[E.THROTTLE_CONCURRENCY] += 1
                raise DataverseError(429, E.THROTTLE_CONCURRENCY, f"Number of concurrent requests exceeded the "
                                     f"limit of {self.max_concurrent}.", {"Retry-After": "1"})
            self.in_flight[user] += 1
            self.peak = max(self.peak, sum(self.in_flight.values()))

    def leave(self, user: str) -> None:
        with self.lock:
            self.in_flight[user] -= 1

    def note_injected(self) -> None:
        """Count a 429 that an injected ``throttle`` fault answered (not one of the limits)."""
        with self.lock:
            self.throttled[self.INJECTED] += 1

    def throttled_counts(self) -> dict[str, int]:
        """The 429s answered since the last reset, by reason (``{}``: none)."""
        with self.lock:
            return dict(self.throttled)

    def reset_throttled(self) -> None:
        with self.lock:
            self.throttled.clear()

    def concurrency(self) -> dict:
        with self.lock:
            return {"in_flight": sum(self.in_flight.values()), "peak": self.peak,
                    "max_concurrent": self.max_concurrent, "dop_hint": self.dop_hint}

    def reset_peak(self) -> None:
        with self.lock:
            self.peak = sum(self.in_flight.values())

    def reset(self) -> None:
        with self.lock:
            self.buckets.clear()
            self.peak = sum(self.in_flight.values())
            self.dop_hint = self.default_dop_hint
            self.throttled.clear()


class Faults:
    """Faults injected through the admin API, consumed by matching requests in order.

    A fault's ``path_prefix`` says which requests it hits. Empty (the default) means every Web API request,
    as before; a prefix outside ``/api/data`` (``/<tenant>/oauth2/v2.0/token``, ``/<tenant>/v2.0/.well-known``,
    ``/common/discovery/instance``, ``/common/userrealm``) targets the Entra ID endpoints, and ``/`` both.
    """

    KINDS = ("throttle", "server_error", "unavailable", "delay", "expire_tokens", "expire_delta_tokens")

    def __init__(self) -> None:
        self.queue: list[dict] = []
        self.lock = threading.Lock()

    def add(self, fault: dict) -> dict:
        if fault.get("kind") not in self.KINDS:
            raise DataverseError(400, E.PAYLOAD, f"fault kind must be one of {self.KINDS}, got {fault.get('kind')!r}")
        prefix = fault.get("path_prefix") or ""
        if not isinstance(prefix, str) or (prefix and not prefix.startswith("/")):
            raise DataverseError(400, E.PAYLOAD, f"fault path_prefix must be a path starting with '/', got {prefix!r}")
        entry = {"kind": fault["kind"], "count": int(fault.get("count", 1)), "seconds": float(fault.get("seconds", 1)),
                 "path_prefix": prefix}
        with self.lock:
            self.queue.append(entry)
        return entry

    def take(self, path: str, identity: bool = False) -> dict | None:
        """The next throttle / server_error / unavailable / delay fault that applies to ``path`` (and use one
        of its count). ``identity``: an Entra ID endpoint, which only a fault naming a prefix reaches."""
        with self.lock:
            for fault in self.queue:
                prefix = fault["path_prefix"]
                if fault["count"] > 0 and path.startswith(prefix) and (prefix or not identity):
                    fault["count"] -= 1
                    if fault["count"] == 0:
                        self.queue.remove(fault)
                    return dict(fault)
        return None

    def clear(self) -> None:
        with self.lock:
            self.queue.clear()


def entra_error(status: int, error: str, code: int, text: str, headers: dict | None = None) -> JSONResponse:
    """An Entra ID (v2.0 endpoints) error answer: ``error``, ``error_description`` starting ``AADSTS<code>:``,
    ``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id`` and ``error_uri``.

    Real descriptions also end with ``\r\nTrace ID: ...`` lines; they are left out so a client's one-line
    error messages stay one line (the ids are in their own fields).
    """
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    body = {"error": error, "error_description": f"AADSTS{code}: {text}", "error_codes": [code],
            "timestamp": stamp, "trace_id": str(uuid.uuid4()), "correlation_id": str(uuid.uuid4()),
            "error_uri": f"https://login.microsoftonline.com/error?code={code}"}
    return JSONResponse(body, status_code=status, headers=headers)


def _retry_after(fault: dict) -> dict:
    return {"Retry-After": str(max(0, math.ceil(fault["seconds"])))}


def entra_fault(fault: dict) -> JSONResponse | None:
    """The answer Entra ID gives in place of a request hit by an injected fault (None: serve it)."""
    if fault["kind"] == "throttle":  # Entra ID throttles token requests with 429 and Retry-After
        return entra_error(429, "temporarily_unavailable", 90024, "A transient error has occurred. Try again "
                           "(too many requests; injected fault).", _retry_after(fault))
    if fault["kind"] == "unavailable":
        return entra_error(503, "temporarily_unavailable", 90033, "A transient error has occurred. Please try "
                           "again (injected fault).", _retry_after(fault))
    if fault["kind"] == "server_error":
        return entra_error(500, "server_error", 50000, "There was an error issuing a token or an issue with our "
                           "sign-in service (injected fault).")
    return None


#: the sandbox's recommended degree of parallelism (``x-ms-dop-hint``): one SQLite writer, so a few requests
#: in flight keep it busy (one parsing while another writes) and more only queue
DEFAULT_DOP_HINT = 4


def _endpoint(method: str, path: str) -> str:
    """Counter key: keys in parentheses dropped (``PATCH /api/data/v9.2/contacts``)."""
    return method + " " + re.sub(r"\([^)]*\)", "", path)


def create_app(data_dir: Path, identity: Identity, org_url: str, *, token_ttl_s: int = 3600,
               requests_per_window: int = 6000, window_s: int = 300, max_concurrent: int = 52,
               dop_hint: int | None = DEFAULT_DOP_HINT) -> FastAPI:
    """Build the FastAPI application of one sandbox organisation.

    :param dop_hint: the ``x-ms-dop-hint`` header of Web API responses (None: not sent).
    """
    store = Store(data_dir / "dataverse.sqlite3", identity.field_security_profile_id)
    tokens = TokenService(identity, org_url, token_ttl_s)
    webapi = WebApi(store, identity, org_url)
    protection = Protection(requests_per_window, window_s, max_concurrent, dop_hint)
    faults = Faults()
    calls: Counter = Counter()
    calls_lock = threading.Lock()
    app = FastAPI(title="Dataverse sandbox", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store

    def count(method: str, path: str) -> None:
        with calls_lock:
            calls[_endpoint(method, path)] += 1

    def error(err: DataverseError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    # Entra ID ---------------------------------------------------------------------------------------------
    async def identity_fault(path: str) -> JSONResponse | None:
        """Apply an injected fault to an Entra ID request: its error answer, or None once a delay is over."""
        fault = faults.take(path, identity=True)
        if fault and fault["kind"] == "delay":
            await asyncio.sleep(fault["seconds"])
            return None
        if fault and fault["kind"] == "throttle":  # a 429 the client sees, so it is counted like the limits'
            protection.note_injected()
        return entra_fault(fault) if fault else None

    @app.get("/{tenant}/v2.0/.well-known/openid-configuration")
    async def openid_configuration(tenant: str):
        failed = await identity_fault(f"/{tenant}/v2.0/.well-known/openid-configuration")
        if failed is not None:
            return failed
        if tenant != identity.tenant_id:
            return entra_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found. Check to make sure you "
                               "have the correct tenant ID and are signing into the correct cloud.")
        base = f"{org_url}/{tenant}"
        return {"token_endpoint": f"{base}/oauth2/v2.0/token", "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "issuer": f"{base}/v2.0", "jwks_uri": f"{base}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
                "grant_types_supported": ["client_credentials", "password", "refresh_token"],
                "response_types_supported": ["code", "id_token", "token id_token"], "tenant_region_scope": "EU"}

    @app.get("/common/discovery/instance")
    async def instance_discovery(request: Request):
        # What MSAL asks when told to validate the authority (instance_discovery=<this URL>): the sandbox's
        # own host is the one instance it knows.
        failed = await identity_fault("/common/discovery/instance")
        if failed is not None:
            return failed
        endpoint = request.query_params.get("authorization_endpoint", "")
        parts = urllib.parse.urlsplit(endpoint)
        host = urllib.parse.urlsplit(org_url).netloc
        m = re.fullmatch(r"/([^/]+)/oauth2(?:/v2\.0)?/authorize", parts.path)
        # MSAL names the instance by host name only (the port dropped, as for the user realm)
        if parts.scheme != "https" or parts.hostname != urllib.parse.urlsplit(org_url).hostname or not m:
            return entra_error(400, "invalid_instance", 50049, "Unknown or invalid instance.")
        return {"tenant_discovery_endpoint": f"{org_url}/{m.group(1)}/v2.0/.well-known/openid-configuration",
                "api-version": request.query_params.get("api-version", "1.1"),
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}]}

    @app.get("/common/userrealm/{username}")
    async def user_realm(username: str):
        failed = await identity_fault(f"/common/userrealm/{username}")
        if failed is not None:
            return failed
        # A managed (not federated) domain: MSAL continues with a plain password grant.
        domain = username.rpartition("@")[2]
        return {"ver": "1.0", "account_type": "Managed", "domain_name": domain,
                "cloud_instance_name": "microsoftonline.com", "cloud_audience_urn": "urn:federation:MicrosoftOnline"}

    @app.post("/{tenant}/oauth2/v2.0/token")
    async def token(tenant: str, request: Request):
        count("POST", f"/{tenant}/oauth2/v2.0/token")
        failed = await identity_fault(f"/{tenant}/oauth2/v2.0/token")
        if failed is not None:
            return failed
        form = dict(urllib.parse.parse_qsl((await request.body()).decode()))
        return _token_response(tenant, form, request.headers.get("authorization"))

    def _token_response(tenant: str, form: dict, basic: str | None):
        def fail(error: str, code: int, text: str, status: int = 400):
            return entra_error(status, error, code, text)

        if tenant != identity.tenant_id:
            return fail("invalid_request", 90002, f"Tenant '{tenant}' not found.")
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if client_id != identity.client_id:
            return fail("unauthorized_client", 700016, f"Application with identifier '{client_id}' was not "
                        "found in the directory.")
        if secret != identity.client_secret:
            return fail("invalid_client", 7000215, "Invalid client secret provided.", 401)
        scopes = form.get("scope", "").split()
        resource = next((s[: -len("/.default")] for s in scopes if s.endswith("/.default")), None)
        grant = form.get("grant_type")
        if grant != "refresh_token" and resource != org_url:
            return fail("invalid_scope", 500011, f"The resource principal named {resource} was not found in "
                        f"the tenant. Use scope '{org_url}/.default'.")
        if grant == "client_credentials":
            return tokens.issue(audience=org_url, subject=identity.application_user_id, app_id=client_id,
                                scope=form.get("scope", ""), with_user=False)
        if grant == "password":
            if form.get("username", "").lower() != identity.username or form.get("password") != identity.user_password:
                return fail("invalid_grant", 50126, "Error validating credentials due to invalid username or "
                            "password.")
            return tokens.issue(audience=org_url, subject=identity.interactive_user_id, app_id=client_id,
                                scope=form.get("scope", ""), with_user=True)
        if grant == "refresh_token":
            subject = tokens.refresh_tokens.pop(form.get("refresh_token", ""), None)
            if subject is None:
                return fail("invalid_grant", 70008, "The provided refresh token has expired or is invalid.")
            return tokens.issue(audience=org_url, subject=subject, app_id=client_id, scope=form.get("scope", ""),
                                with_user=True)
        return fail("unsupported_grant_type", 70003, f"grant_type '{grant}' is not supported.")

    # Web API ----------------------------------------------------------------------------------------------
    @app.api_route(API + "{path:path}", methods=["GET", "POST", "PATCH", "DELETE"])
    async def web_api(path: str, request: Request):
        response = await _web_api(path, request)
        hint = protection.dop_hint
        if hint is not None:  # every Web API response carries the recommended degree of parallelism
            response.headers["x-ms-dop-hint"] = str(hint)
        return response

    async def _web_api(path: str, request: Request):
        method = request.method
        count(method, API + path)
        fault = faults.take(API + path)
        if fault and fault["kind"] == "throttle":
            protection.note_injected()
            return error(DataverseError(429, E.THROTTLE_REQUESTS, "Number of requests exceeded the limit of 6000 "
                                        "over time window of 300 seconds.", _retry_after(fault)))
        elif fault and fault["kind"] == "server_error":
            return error(DataverseError(500, E.SERVER, "An unexpected error occurred (injected fault)."))
        elif fault and fault["kind"] == "unavailable":
            return error(DataverseError(503, E.SERVER, "The service is temporarily unavailable (injected fault).",
                                        _retry_after(fault)))
        try:
            user = tokens.check(request.headers.get("authorization"), org_url)
            protection.enter(user)
        except DataverseError as err:
            return error(err)
        try:
            if fault and fault["kind"] == "delay":  # a slow response: it occupies a concurrency slot
                await asyncio.sleep(fault["seconds"])
            body = await request.body()
            query = dict(urllib.parse.parse_qsl(request.url.query, keep_blank_values=True))
            reply: Reply = await anyio.to_thread.run_sync(
                webapi.handle, method, path, query, dict(request.headers), body, user)
        finally:
            protection.leave(user)
        headers = {"OData-Version": "4.0", **{k: v for k, v in reply.headers.items() if not k.startswith("_")}}
        if "_raw" in reply.headers:
            return Response(reply.headers["_raw"], status_code=reply.status, headers=headers)
        if reply.body is None:
            return Response(status_code=reply.status, headers=headers)
        return JSONResponse(reply.body, status_code=reply.status, headers=headers)

    # admin ------------------------------------------------------------------------------------------------
    @app.get("/_sandbox/health")
    def health():
        return {"status": "ok", "org_url": org_url, "tenant_id": identity.tenant_id}

    @app.post("/_sandbox/rows/{entity_set}")
    async def seed(entity_set: str, request: Request):
        payload = await request.json()
        try:
            entity = store.entity(entity_set)
            ids = await anyio.to_thread.run_sync(store.seed, entity, payload.get("rows") or [])
        except DataverseError as err:
            return error(err)
        if len(ids) > 10000 or payload.get("return_ids") is False:
            return {"count": len(ids)}
        return {"count": len(ids), "ids": ids}

    @app.get("/_sandbox/calls")
    def get_calls():
        with calls_lock:
            counts = {"total": sum(calls.values()), "by_endpoint": dict(calls)}
        # every 429 answered, by what refused it; the refused requests are in total / by_endpoint as well
        return {**counts, "throttled": protection.throttled_counts()}

    @app.post("/_sandbox/calls/reset")
    def reset_calls():
        with calls_lock:
            calls.clear()
        protection.reset_throttled()
        return {"total": 0}

    @app.get("/_sandbox/concurrency")
    def get_concurrency():
        return protection.concurrency()

    @app.post("/_sandbox/concurrency/reset")
    def reset_concurrency():
        protection.reset_peak()
        return protection.concurrency()

    @app.put("/_sandbox/concurrency")
    async def put_concurrency(request: Request):
        body = await request.json()
        hint = body.get("dop_hint") if isinstance(body, dict) else None
        if not isinstance(body, dict) or "dop_hint" not in body or not (
                hint is None or (isinstance(hint, int) and not isinstance(hint, bool) and hint > 0)):
            return error(DataverseError(400, E.PAYLOAD, "concurrency: give {\"dop_hint\": a positive integer or "
                                        "null}"))
        with protection.lock:
            protection.dop_hint = hint
        return protection.concurrency()

    @app.post("/_sandbox/faults")
    async def add_fault(request: Request):
        body = await request.json()
        try:
            if body.get("kind") == "expire_tokens":
                tokens.revoked_before = time.time()
                return {"applied": "expire_tokens"}
            if body.get("kind") == "expire_delta_tokens":
                store.expire_delta_tokens()
                return {"applied": "expire_delta_tokens"}
            return faults.add(body)
        except DataverseError as err:
            return error(err)

    @app.delete("/_sandbox/faults")
    def clear_faults():
        faults.clear()
        return {"faults": 0}

    @app.put("/_sandbox/security")
    async def put_security(request: Request):
        try:
            store.set_security(await request.json())
        except DataverseError as err:
            return error(err)
        return store.security

    @app.get("/_sandbox/security")
    def get_security():
        return store.security

    @app.get("/_sandbox/keys")
    def get_keys():
        return {e.logical_name: e.link_key_status for e in store.entities.values() if LINK_KEY_COLUMN in e.columns}

    @app.put("/_sandbox/keys")
    async def put_keys(request: Request):
        """``{"<table>": "Active" | "Pending" | "InProgress" | "Failed" | null}``: the state of the alternate key on
        the link column (null: the table has no such key), as a deployment that lacks or is still building it."""
        body = await request.json()
        known = {e.logical_name: e for e in store.entities.values() if LINK_KEY_COLUMN in e.columns}
        states = ("Active", "Pending", "InProgress", "Failed", None)
        if not isinstance(body, dict) or any(t not in known or v not in states for t, v in body.items()):
            return error(DataverseError(400, E.PAYLOAD, f"keys: a JSON object of table -> one of {states} for the "
                                        f"tables {sorted(known)}, got {body!r}"))
        for table, status in body.items():
            known[table].link_key_status = status
        return get_keys()

    @app.put("/_sandbox/rules")
    async def put_rules(request: Request):
        body = await request.json()
        try:
            store.set_rules(body if isinstance(body, list) else body.get("rules", []))
        except DataverseError as err:
            return error(err)
        return {"rules": store.rules}

    @app.put("/_sandbox/messages")
    async def put_messages(request: Request):
        body = await request.json()
        try:
            store.set_unsupported_messages(body.get("unsupported", {}))
        except DataverseError as err:
            return error(err)
        return {"unsupported": store.unsupported_messages}

    @app.post("/_sandbox/reset")
    def reset():
        store.reset()
        faults.clear()
        protection.reset()
        for entity in store.entities.values():
            entity.link_key_status = "Active"
        tokens.revoked_before = 0.0
        with calls_lock:
            calls.clear()
        return {"reset": True}

    return app

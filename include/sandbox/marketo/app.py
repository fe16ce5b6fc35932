"""The Marketo sandbox HTTP API: identity, Lead Database REST paths, bulk lead and activity export, bulk
lead import, and the admin path.

Paths, parameters, envelopes, record statuses and error codes follow ``reference/marketo`` (Swagger spec and
developer docs). Marketo answers most errors with HTTP 200 and ``success: false``; so does the sandbox.

Bulk jobs run in background threads, two at a time per kind: lead and activity exports share one queue of 10
(1029 "Too many jobs in queue"), imports have their own queue of 10 (1016 "Too many imports") and a 10 MB file
limit (HTTP 413).

The app is assembled from one router per API area (:mod:`sandbox.marketo.routes`: identity, leads,
activities, custom activities, bulk export, bulk import, usage, admin), the front middleware (:mod:`.front`:
limits, tokens, faults), the error counter behind the Usage endpoints (:mod:`.routes.stats`) and the bulk job
worker (:mod:`.jobs`); they share one :class:`~sandbox.marketo.context.Sandbox` on ``app.state.sandbox``.

Admin calls (not part of Marketo; never under ``/rest``, ``/bulk`` or ``/identity``):

- ``GET /_sandbox/health``: ``{"status": "ok", "service": "marketo"}``.
- ``POST /_sandbox/leads`` ``{"leads": [...]}``: insert leads without activities; ``{"ids": [...]}`` (or
  ``{"count", "first_id", "last_id"}`` above 10,000 leads).
- ``GET /_sandbox/calls``: calls by endpoint, limited (606/615/607) and injected counts, peak concurrency.
- ``POST /_sandbox/calls/reset``: zero the call counters.
- ``POST /_sandbox/faults`` ``{"kind", "count", "path_prefix", "seconds", "status"}``: inject faults
  (kinds: rate_limit, concurrency, server_error, delay, expire_tokens, quota_exhausted, access_denied (603:
  the API user's role lacks a permission), request_timeout (604 "Request time-out", after ``seconds``),
  api_unavailable (608 "API Temporarily Unavailable"), transient_error (713 "Transient Error"), and job_failure:
  the next ``count`` bulk jobs created through a path under ``path_prefix`` end Failed when they start,
  e.g. ``/bulk/v1/leads.json`` for imports, ``/bulk/v1/activities/export`` for activity exports);
  ``DELETE /_sandbox/faults`` clears them.
- ``POST /_sandbox/reset``: wipe all data, counters, faults and bulk jobs.
- ``GET /_sandbox/bulk``: ``{"hold": bool, "peak_importing": n}`` (the most imports seen importing at once).
- ``POST /_sandbox/bulk/hold`` ``{"hold": true|false}``: while held, queued bulk jobs (exports and imports)
  are not started, so queue limits can be observed; returns the same body as ``GET /_sandbox/bulk``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from . import front
from .context import Sandbox
from .credentials import load_or_create_credentials
from .guard import Guard
from .imports import ImportJobs
from .jobs import BulkRunner
from .routes import ROUTERS, stats
from .routes.activities import render_activity
from .routes.bulk_export import file_range
from .routes.common import (MAX_BATCH, MAX_BODY_BULK, MAX_BODY_REST, MAX_URI, endpoint_name, envelope, failure,
                            read_input, read_json, request_id)
from .store import MarketoStore

__all__ = ["create_app", "load_or_create_credentials", "envelope", "failure", "request_id", "endpoint_name",
           "read_json", "read_input", "render_activity", "file_range", "MAX_BATCH", "MAX_URI", "MAX_BODY_REST",
           "MAX_BODY_BULK"]


def create_app(data_dir: Path, *, client_id: str | None = None, client_secret: str | None = None,
               token_ttl_s: int = 3600, daily_quota: int = 50000, rate_limit=(100, 20), max_concurrent: int = 10,
               export_delay_s: float = 0.0) -> FastAPI:
    """Build the sandbox app on the SQLite database in ``data_dir``."""
    store = MarketoStore(Path(data_dir))
    imports = ImportJobs(store)
    cid, secret = load_or_create_credentials(Path(data_dir), client_id, client_secret)
    guard = Guard(tuple(rate_limit), max_concurrent, token_ttl_s)
    runner = BulkRunner(store, imports, guard, export_delay_s)

    @asynccontextmanager
    async def lifespan(_app):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="Marketo Engage sandbox", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.sandbox = Sandbox(store=store, guard=guard, imports=imports, client_id=cid, client_secret=secret,
                                daily_quota=daily_quota)
    app.state.store = store
    app.state.guard = guard
    front.install(app)
    stats.install(app)  # after front: the error counter wraps it, so it sees the errors front answers too
    for router in ROUTERS:
        app.include_router(router)
    return app

"""Dataverse sandbox: a faithful local emulator of the Dataverse Web API and its Entra ID token endpoint.

A real HTTPS server on loopback (CA made with trustme on first start and kept in ``data_dir``) backed by
SQLite, answering what unmodified MSAL and the sync's client use:

- Entra ID: ``GET /<tenant>/v2.0/.well-known/openid-configuration``, ``POST /<tenant>/oauth2/v2.0/token``
  (client credentials, password and refresh-token grants; expiring tokens), ``GET /common/userrealm/<user>``
  (a managed domain, so MSAL's password grant goes straight to the token endpoint) and ``GET
  /common/discovery/instance`` (MSAL's ``instance_discovery=<url>``: the sandbox host is the one known
  instance, others get ``invalid_instance``). Errors carry Entra ID's body: ``error``, ``error_description``
  (``AADSTS<n>: ...``), ``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``, ``error_uri``.
- ``/api/data/v9.2/`` for ``contacts``, ``leads`` and ``accounts``, each with every feature below (columns,
  types, MaxLength, ranges, money precision and option sets generated from the entity reference into
  ``schema.json``): ``$select``, ``$filter`` (odata-query -> SQLAlchemy), ``$orderby``, ``$top``,
  ``$count``, ``Prefer: odata.maxpagesize`` with paging cookies in ``@odata.nextLink``; change tracking
  (``Prefer: odata.track-changes``, ``$deltatoken``, ``$deletedEntity`` rows, expired tokens); create,
  PATCH update/upsert by id or by the alternate key ``mdsync_marketopersonid_key`` (contacts, leads) with
  ``If-Match`` / ``If-None-Match``; delete; ``CreateMultiple`` / ``UpdateMultiple`` / ``UpsertMultiple``
  (all-or-nothing); ``$batch`` (change sets, continue-on-error); ``EntityDefinitions`` attribute metadata
  (with type casts and option sets); ``WhoAmI``, the sync user's field security profile
  (``systemusers(<id>)/systemuserprofiles_association``) and ``fieldpermissions``; ``QualifyLead`` and
  ``Merge``. Money columns (account ``revenue``, ...) are numbers rounded to their precision. Lookups are
  bound with ``<navigation>@odata.bind`` (``parentcustomerid_account@odata.bind: "/accounts(<id>)"``) and
  read and filtered as ``_<lookup>_value`` (``$filter=_parentcustomerid_value eq <id>``).
- ``$expand`` of single-valued navigation properties: one per lookup, ``<lookup>_<table>`` for a lookup
  that can point at several tables (``parentcustomerid_account($select=name,revenue)``,
  ``parentcustomerid_contact``, ``parentaccountid``, ``primarycontactid``, ``masterid``, ...), on
  collections, pages, single rows and creates (an update ignores it, as documented); the related row is
  nested with its etag and id, or null. The related rows of a page are read with one query per 500 ids.
  With change tracking it is refused with the documented error.
- ``Merge`` as documented: ``UpdateContent`` validated and applied to the target (whose version and
  ``modifiedon`` move even without content); the subordinate deactivated (contact and account statecode 1
  / statuscode 2; lead 2 / 7 "Canceled") with ``_masterid_value`` = the target and ``merged`` true (both
  read-only; ``merged`` is false on every other row); the rows pointing at the subordinate moved to the
  target where the relationship's merge cascades (an account's contacts and leads, a contact's leads and
  child contacts, a lead's originated contacts and accounts; not ``masterid``), each a change in delta
  reads. ``PerformParentingChecks`` (required) refuses a subordinate whose parent (contact
  ``parentcustomerid``, lead ``parentaccountid`` / ``parentcontactid``) is set and differs from the
  target's. Inactive, identical or mixed-type records are refused with the platform's messages.
- ``statecode`` / ``statuscode`` by PATCH, upsert or bulk update: a new state alone takes its default status
  reason (as SetState does); a status reason must belong to the new (or unchanged) state per the entity
  reference's options, else 400 ``0x80048408`` "<status> is not a valid status code for state code
  ContactState.Active on contact with Id <id>." A deactivation is a change in delta reads and leaves
  ``$filter=statecode eq 0``; a lead disqualified by PATCH and reactivated can be qualified again.
- Deleting a row applies its relationships' delete behaviour to the rows pointing at it: ``Cascade``
  deletes them too (an account's contacts), ``RemoveLink`` clears the lookup (a change in delta reads). The
  merge and delete behaviours come from the entity reference's relationships (``schema.json``).
- Validation with the real error shape: MaxLength, types, ranges and option values, read-only columns,
  SystemRequired columns, state / status pairs, and business rules; field-level security (a secured column
  the sync user may not read is absent from results and expansions, and 403 in a filter; an update to one
  it may not update is a 403).
- Service protection: 429 with ``Retry-After`` past ``requests_per_window`` per ``window_s`` per user
  (pyrate-limiter sliding window) or past ``max_concurrent`` requests in flight; each 429 is counted (the
  ``throttled`` key of ``GET /_sandbox/calls``), so a run can show it was never throttled. Every Web API response
  carries ``x-ms-dop-hint``, the recommended degree of parallelism (``dop_hint``, default 4; 0 sends none).
- Concurrent requests are served side by side (reads in parallel; writes, like SQLite, one transaction at a
  time). A bulk message reads all the rows its targets name in one query and writes them by executemany.

Admin API (JSON, no auth, under ``/_sandbox``):

- ``POST /_sandbox/rows/{entity_set}`` ``{"rows": [...]}`` bulk seed (executemany); returns ``count`` and
  ``ids`` (ids omitted above 10,000 rows or with ``"return_ids": false``). Seeded rows get row versions,
  so a later delta read reports them.
- ``GET /_sandbox/calls`` / ``POST /_sandbox/calls/reset``: call counts by ``"METHOD /path"`` (keys in
  parentheses dropped), Web API and token calls, and ``throttled``: every 429 the sandbox answered, by what
  refused it: ``{"0x80072322": n}`` (requests per window), ``{"0x80072326": n}`` (concurrent requests) and
  ``{"injected": n}`` (an injected ``throttle`` fault, Web API or Entra ID, although the Web API's carries
  ``0x80072322``); a reason appears once it has refused a request, so ``{}`` means no 429 at all.
  (``0x80072321``, the execution-time limit, is not emulated and never appears.) The refused requests are
  counted in ``total`` / ``by_endpoint`` too.
- ``GET /_sandbox/concurrency``: ``in_flight`` (Web API requests being served now, all users), ``peak``
  (the most at once since the last reset), ``max_concurrent`` and ``dop_hint``. ``POST
  /_sandbox/concurrency/reset`` starts a new peak; ``PUT /_sandbox/concurrency`` ``{"dop_hint": n | null}``
  changes the hint (until ``/_sandbox/reset``).
- ``POST /_sandbox/faults`` ``{"kind", "count", "path_prefix", "seconds"}``: ``throttle`` (429,
  ``Retry-After: seconds``), ``server_error`` (500), ``unavailable`` (503, ``Retry-After``), ``delay`` (sleep
  ``seconds`` then serve) for the next ``count`` matching calls; ``expire_tokens`` (every token issued so far
  now answers 401) and ``expire_delta_tokens`` (every delta link issued so far is expired) apply at once.
  Without ``path_prefix`` a fault hits Web API calls only; a prefix (starting with ``/``) picks the calls it
  hits, Entra ID endpoints included (``/<tenant>/oauth2/v2.0/token``, ``/<tenant>/v2.0/.well-known/``,
  ``/common/discovery/instance``, ``/common/userrealm/``; ``/`` is every call). There the faults answer as
  Entra ID does: 429 ``temporarily_unavailable`` (AADSTS90024), 503 ``temporarily_unavailable``
  (AADSTS90033), 500 ``server_error`` (AADSTS50000). ``DELETE`` clears.
- ``PUT /_sandbox/security`` ``{"secured_columns": {"contact": ["jobtitle"]}, "readable": {"contact": [...]},
  "updatable": {...}, "creatable": {...}}``: secured columns, and which of them the sync user's field
  security profile allows (create defaults to update). Nothing is secured by default. ``GET`` reads it.
- ``PUT /_sandbox/rules`` ``[{"entity": "contact", "column": "jobtitle", "op": "forbid", "values": [...],
  "message": "..."}]``; ops ``forbid`` (values), ``require`` (non-empty), ``match`` (``pattern`` regex).
  A violating write gets 400 with code ``0x80040265`` and the rule's message, as a plug-in would.
- ``PUT /_sandbox/messages`` ``{"unsupported": {"contact": ["UpsertMultiple"]}}``: bulk messages a table
  does not support (404 "Resource not found for the segment ..."), as for some standard tables.
- ``PUT /_sandbox/keys`` ``{"contact": "Pending"}``: the ``EntityKeyIndexStatus`` of the alternate key on the
  link column (``Active``, the default; ``Pending``, ``InProgress``, ``Failed``; ``null``: no such key), as
  ``EntityDefinitions(LogicalName='contact')/Keys`` reports it; a key that is not active cannot address rows.
  ``GET`` reads them.
- ``POST /_sandbox/reset`` wipes rows, counters, faults, rules, security and message settings (and the
  concurrency peak and hint; keys become active again). ``GET /_sandbox/health``.

The ROPC user is ``sb.username`` / ``sb.user_password``. Not emulated: the combined execution-time limit,
opportunities (``QualifyLead`` with ``CreateOpportunity``), ``$expand`` of collection-valued navigation
properties and query options other than ``$select`` inside an expansion, filters across navigation
properties (``parentcustomerid_account/name``), the ``SetState`` message (PATCH ``statecode`` instead),
account hierarchies (``parentaccountid`` of accounts), FetchXML, metadata ``$filter``, ``Content-ID``
references in ``$batch``, and formatted-value and lookup annotations.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import requests

from sandbox import process

from .identity import Identity


class DataverseSandbox:
    """Runs the sandbox in a child process (``python -m sandbox.dataverse``) for tests, demos and benches."""

    def __init__(self, data_dir: Path, port: int = 0, host: str = "127.0.0.1", client_id: str | None = None,
                 client_secret: str | None = None, tenant_id: str | None = None, token_ttl_s: int = 3600,
                 requests_per_window: int = 6000, window_s: int = 300, max_concurrent: int = 52,
                 dop_hint: int | None = 4) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.token_ttl_s = token_ttl_s
        self.requests_per_window = requests_per_window
        self.window_s = window_s
        self.max_concurrent = max_concurrent
        self.dop_hint = dop_hint
        self.identity = Identity.ensure(self.data_dir, tenant_id=tenant_id, client_id=client_id,
                                        client_secret=client_secret)
        self._process: subprocess.Popen | None = None

    # identity -------------------------------------------------------------------------------------------
    tenant_id = property(lambda self: self.identity.tenant_id)
    client_id = property(lambda self: self.identity.client_id)
    client_secret = property(lambda self: self.identity.client_secret)
    username = property(lambda self: self.identity.username)
    user_password = property(lambda self: self.identity.user_password)

    @property
    def org_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def authority(self) -> str:
        return f"{self.org_url}/{self.tenant_id}"

    @property
    def admin_url(self) -> str:
        return f"{self.org_url}/_sandbox"

    @property
    def ca_bundle(self) -> str:
        return str(self.data_dir / "ca.pem")

    def connection_json(self) -> str:
        """The ``AIRFLOW_CONN_DYNAMICS_DEFAULT`` value that points a sync at this sandbox."""
        return json.dumps({"conn_type": "http", "host": self.org_url, "login": self.client_id,
                           "password": self.client_secret,
                           "extra": {"tenant_id": self.tenant_id, "authority": self.authority,
                                     "verify": self.ca_bundle}})

    # lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 60) -> "DataverseSandbox":
        """Start the child process and return once it answers on ``/_sandbox/health``."""
        if self._process is not None:
            return self
        info = self.data_dir / "server.json"
        info.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "sandbox.dataverse", "--port", str(self.port), "--host", self.host,
               "--data-dir", str(self.data_dir), "--token-ttl", str(self.token_ttl_s),
               "--requests-per-window", str(self.requests_per_window), "--window", str(self.window_s),
               "--max-concurrent", str(self.max_concurrent), "--dop-hint", str(self.dop_hint or 0)]
        self._process = process.spawn(cmd, self.data_dir / "server.log")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Dataverse sandbox exited with {self._process.returncode}; see "
                                   f"{self.data_dir / 'server.log'}")
            if info.exists():
                self.port = json.loads(info.read_text())["port"]
                try:
                    requests.get(f"{self.admin_url}/health", verify=self.ca_bundle, timeout=2).raise_for_status()
                    return self
                except requests.RequestException:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Dataverse sandbox did not answer within {timeout_s}s; see {self.data_dir / 'server.log'}")

    def stop(self) -> None:
        """Terminate the child process and wait for it; no process is left behind."""
        proc, self._process = self._process, None
        process.stop(proc)

    def __enter__(self) -> "DataverseSandbox":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # admin helpers --------------------------------------------------------------------------------------
    def admin(self, method: str, path: str, payload=None):
        """Call the admin API (``path`` below ``/_sandbox``); returns the decoded JSON answer."""
        with requests.Session() as s:
            s.trust_env = False
            resp = s.request(method, f"{self.admin_url}/{path.lstrip('/')}", json=payload, verify=self.ca_bundle,
                             timeout=300)
        resp.raise_for_status()
        return resp.json()

    def seed(self, entity_set: str, rows: list[dict]) -> list[str]:
        """Bulk-insert rows; returns their ids."""
        return self.admin("POST", f"rows/{entity_set}", {"rows": rows}).get("ids", [])

    def reset(self) -> None:
        self.admin("POST", "reset")

    def calls(self) -> dict:
        """``total``, ``by_endpoint`` and ``throttled`` (the 429s answered, by reason) since the last reset."""
        return self.admin("GET", "calls")

    def throttled(self) -> dict[str, int]:
        """The 429s answered since the last :meth:`reset` or ``calls/reset``, by reason: ``0x80072322``
        (requests per window), ``0x80072326`` (concurrent requests), ``injected`` (throttle faults); ``{}``:
        none."""
        return self.calls()["throttled"]

    def concurrency(self) -> dict:
        """``in_flight``, ``peak`` (since the last :meth:`reset` or ``concurrency/reset``), ``max_concurrent``
        and ``dop_hint`` of the Web API."""
        return self.admin("GET", "concurrency")

    def fault(self, kind: str, count: int = 1, seconds: float = 1, path_prefix: str | None = None) -> dict:
        return self.admin("POST", "faults", {"kind": kind, "count": count, "seconds": seconds,
                                             "path_prefix": path_prefix})

"""Dataverse Web API client: transport (auth, retries, service protection), queries, change tracking,
metadata, field permissions and the lead lifecycle. Bulk writes and ``$batch`` are in :mod:`.writes`.

Logs carry the method and path of each call, never the Authorization header, tokens or query values.
Errors name the connection (id and org URL): a refused token is an :class:`~mdsync.errors.AuthError`, a
missing privilege (403 outside per-record writes) an :class:`~mdsync.errors.AccessDenied`, and 429, 5xx,
time-outs and refused connections that outlast the backoff a :class:`~mdsync.errors.ServiceUnavailable`.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
import uuid
from dataclasses import dataclass

import pandas as pd
import requests
import tenacity

from mdsync.errors import AccessDenied, AuthError, ServiceError, ServiceUnavailable, connection_label, transport_problem
from mdsync.limits import FROM_SETTINGS, LimitsUnavailable

from . import odata
from .auth import TokenProvider
from .limits import client_limits
from .writes import WritesMixin

log = logging.getLogger(__name__)
API = "/api/data/v9.2/"
_PANDAS_TYPES = {"String": "str", "Memo": "str", "Uniqueidentifier": "str", "Lookup": "str", "Customer": "str",
                 "Owner": "str", "EntityName": "str", "Integer": "Int64", "BigInt": "Int64", "Picklist": "Int64",
                 "State": "Int64", "Status": "Int64", "Boolean": "boolean", "Double": "Float64",
                 "Decimal": "Float64", "Money": "Float64"}
_STANDARD_TABLES = {"contacts": "contact", "leads": "lead", "accounts": "account"}
_METADATA_CASTS = ("StringAttributeMetadata", "MemoAttributeMetadata", "PicklistAttributeMetadata",
                   "StateAttributeMetadata", "StatusAttributeMetadata")


class _Retryable(Exception):
    """A response or transport failure worth another attempt (429, 5xx, connection errors, an unreachable
    authority); ``error`` is the readable error to raise if it persists."""

    def __init__(self, what: str, retry_after: float | None = None, response=None,
                 error: ServiceError | None = None) -> None:
        super().__init__(what)
        self.retry_after = retry_after
        self.response = response
        self.error = error


@dataclass
class ChangeSet:
    """What changed in a table since a delta link.

    :ivar changed: created or updated rows (all rows when ``full_read``).
    :ivar deleted_ids: ids of rows deleted since the delta link.
    :ivar delta_link: pass this to the next :meth:`DynamicsClient.track_changes`.
    :ivar full_read: True when no (or an expired) delta link was given and every row was read.
    """

    changed: pd.DataFrame
    deleted_ids: list[str]
    delta_link: str
    full_read: bool


class DynamicsClient(WritesMixin):
    """Client of one Dataverse organisation's Web API.

    :param org_url: ``https://<org>.crm.dynamics.com`` (the sandbox's ``org_url``).
    :param authority: Entra ID authority, default ``https://login.microsoftonline.com/<tenant_id>``.
    :param verify: TLS verification (True or a CA bundle path), passed on every request so
        ``REQUESTS_CA_BUNDLE`` can't override it.
    :param username: with ``password``, authenticate with the username/password grant.
    :param session: a ``requests.Session`` to reuse (its ``verify`` is not relied upon).
    :param max_concurrent: cap of requests in flight from this client (service protection allows 52/user).
    :param limits_url: ``redis://host:port/db`` to also keep the deployment under a shared request window and
        concurrency cap per org and user (:mod:`.limits`), None for this client's cap alone; by default
        ``MDSYNC_LIMITS_URL``.
    :param timeout: (connect, read) seconds per request.
    :param token_listener: called with every new access token (e.g. Airflow's ``mask_secret``).
    :param max_attempts: attempts per request on 429 / 5xx / transport errors before giving up.
    :param backoff_s: first backoff for 5xx and transport errors (doubles per attempt, max 30 s).
    :param connection_id: the Airflow connection the client was built from, named in every error.
    :param max_parallel_requests: bulk-write requests sent at once (default 4, see :mod:`.writes`); lowered to
        the service's ``x-ms-dop-hint``, capped by ``max_concurrent``.
    """

    def __init__(self, org_url: str, client_id: str, client_secret: str, tenant_id: str, *, authority=None,
                 verify=True, username=None, password=None, session: requests.Session | None = None,
                 max_concurrent: int = 8, timeout=(10, 120), token_listener=None, max_attempts: int = 8,
                 backoff_s: float = 1.0, connection_id: str | None = None,
                 max_parallel_requests: int | None = None, limits_url=FROM_SETTINGS) -> None:
        self.org_url = org_url.rstrip("/")
        self.base = self.org_url + API
        self.verify = verify
        self.timeout = timeout
        self.connection_id = connection_id
        #: how errors name this client's connection
        self.where = connection_label("dynamics", connection_id, self.org_url)
        self.session = session or requests.Session()
        self.tokens = TokenProvider(self.org_url, client_id, client_secret, tenant_id, authority=authority,
                                    verify=verify, username=username, password=password,
                                    token_listener=token_listener, timeout=timeout, where=self.where)
        #: the pacing (:mod:`.limits`), shared by every client of this process for the org and user
        self.limits = client_limits(self.org_url, client_id, username, max_concurrent, limits_url)
        self.max_parallel_requests = max_parallel_requests
        self._count_lock = threading.Lock()
        self.calls_made = 0
        #: seconds this client's requests waited for the pacing (progress lines and the rate-limit waits metric)
        self.waited_s = 0.0
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._attributes: dict[str, pd.DataFrame] = {}
        # Standard tables the sync uses need no lookup; others are resolved through EntityDefinitions.
        self._logical_names: dict[str, str] = dict(_STANDARD_TABLES)
        #: ``{logical name: {column: AttributeType}}`` used to type frames. Filled on first use with one
        #: call per table; a caller may pre-fill it (e.g. from the cycle's schema refresh) to save the call.
        self.column_types: dict[str, dict[str, str]] = {}

    # transport ------------------------------------------------------------------------------------------
    def request(self, method: str, path_or_url: str, *, json=None, data=None, headers=None, params=None,
                what: str | None = None) -> requests.Response:
        """Send one Web API call with auth, retries and service-protection handling.

        :param path_or_url: a path below ``/api/data/v9.2/`` or an absolute ``@odata.nextLink``.
        :param what: the record or operation this call is about, for error messages.
        :returns: the 2xx response.
        :raises ServiceError: a non-retryable error answer (with the service's code and message), or a
            retryable one that persisted for ``max_attempts``.
        """
        url = path_or_url if path_or_url.startswith("https://") or path_or_url.startswith("http://") \
            else self.base + path_or_url
        if params:
            url += ("&" if "?" in url else "?") + odata.query_string(params)
        label = f"{method} {urllib.parse.urlsplit(url).path}"
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Retryable), stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=self._wait, reraise=True,
            before_sleep=lambda rs: log.warning("dynamics: %s failed (%s); retry %d of %d", label,
                                                rs.outcome.exception(), rs.attempt_number, self.max_attempts - 1))
        try:
            return retrying(self._send_once, method, url, label, json, data, headers or {}, what)
        except _Retryable as exc:
            resp, step = exc.response, f"gave up after {self.max_attempts} attempts; the task is retried later"
            if exc.error is not None:  # an unreachable host or authority: its own readable error
                err = exc.error
                raise ServiceUnavailable("dynamics", err.code, f"{err.service_message} (still failing after "
                                         f"{self.max_attempts} attempts)", request=err.request, where=self.where,
                                         next_step=f"{err.next_step}; {step}") from None
            code, message = _error_of(resp) if resp is not None else (None, str(exc))
            raise ServiceUnavailable("dynamics", code, message, request=label,
                                     status=getattr(resp, "status_code", None), where=self.where,
                                     next_step=f"{step} (Airflow retries)") from None
        except ServiceError as exc:
            exc.where = exc.where or self.where
            raise

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception()
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        return min(30.0, self.backoff_s * 2 ** (state.attempt_number - 1))

    def _token(self) -> str:
        try:
            return self.tokens.token()
        except ServiceUnavailable as exc:  # the authority is unreachable or down for now: back off and retry
            raise _Retryable(exc.service_message, error=exc) from None

    def _send_once(self, method, url, label, json, data, headers, what) -> requests.Response:
        renewed = False
        while True:
            token = self._token()
            hdrs = {"Accept": "application/json", "OData-Version": "4.0", "OData-MaxVersion": "4.0", **headers,
                    "Authorization": f"Bearer {token}"}
            held = self._acquire_limits(label)
            try:
                with self._count_lock:
                    self.calls_made += 1
                    self.waited_s += held.waited_s
                log.debug("dynamics: %s", label)
                try:
                    resp = self.session.request(method, url, json=json, data=data, headers=hdrs, verify=self.verify,
                                                timeout=self.timeout)
                except (requests.ConnectionError, requests.Timeout) as exc:
                    reason, retryable = transport_problem(exc, self.org_url, self.timeout)
                    if not retryable:  # a host name that does not resolve, an untrusted certificate: setup
                        raise ServiceError("dynamics", "transport", reason, request=label, where=self.where,
                                           next_step="check the connection's host (the organisation URL) and "
                                                     "extra.verify (True or a CA bundle path); not retried") from None
                    err = ServiceUnavailable("dynamics", "transport", reason, request=label, where=self.where,
                                             next_step="check the connection's host (the organisation URL) and "
                                                       "that this machine can reach it")
                    raise _Retryable(reason, error=err) from None
            finally:
                self.limits.release(held)
            if resp.status_code == 401 and not renewed:
                # The token expired or was revoked mid-run: renew once and send again.
                log.info("dynamics: %s answered 401; renewing the access token", label)
                # Requests in parallel: the first 401 renews, the others send again with its new token.
                renewed = self.tokens.renew(refused=token)
                continue
            if resp.status_code == 429:
                retry_after = _retry_after(resp)
                self._pause(retry_after, label)
                raise _Retryable(f"HTTP 429 {_error_of(resp)[1]}", retry_after, resp)
            if resp.status_code >= 500:
                raise _Retryable(f"HTTP {resp.status_code}", None, resp)
            if resp.status_code >= 400:
                code, message = _error_of(resp)
                cls = {401: AuthError, 403: AccessDenied}.get(resp.status_code, ServiceError)
                raise cls("dynamics", code, message, request=label + (f" ({what})" if what else ""),
                          status=resp.status_code, next_step=_next_step(resp.status_code), where=self.where)
            self._note_dop_hint(resp)  # the service's recommended parallelism, for bulk writes
            return resp

    def _error(self, code: str | None, message: str, **kw) -> ServiceError:
        """A :class:`ServiceError` naming this client's connection."""
        return ServiceError("dynamics", code, message, where=self.where, **kw)

    def _acquire_limits(self, label: str):
        """Wait for the pacing (a slot, room in the window, the end of a pause); shared limits whose Redis is
        away fail closed: the request is not sent, and is retried like a transport failure."""
        try:
            return self.limits.acquire()
        except LimitsUnavailable as exc:
            err = ServiceUnavailable("dynamics", "limits", str(exc), request=label, where=self.where,
                                     next_step=f"check that the Redis of {exc.url} runs and this machine reaches it")
            raise _Retryable(str(exc), error=err) from None

    def _pause(self, seconds: float, label: str) -> None:
        """The service refuses this user's requests for ``seconds``: hold back the others too."""
        try:
            self.limits.pause(seconds)
        except LimitsUnavailable as exc:  # the next acquire fails closed anyway
            log.warning("dynamics: %s answered 429; could not pause the shared limits: %s", label, exc)

    # metadata -------------------------------------------------------------------------------------------
    def logical_name(self, entity_set: str) -> str:
        """The table's logical name for an entity set (``contacts`` -> ``contact``), from EntityDefinitions."""
        if entity_set not in self._logical_names:
            resp = self.request("GET", "EntityDefinitions", params={
                "$select": "LogicalName,EntitySetName", "$filter": odata.eq("EntitySetName", entity_set)})
            found = resp.json().get("value", [])
            if not found:
                raise self._error(None, f"no table has the entity set name '{entity_set}'",
                                  request="GET EntityDefinitions",
                                  next_step="fix entities.<type>.entity_set in the sync config")
            self._logical_names[entity_set] = found[0]["LogicalName"]
        return self._logical_names[entity_set]

    def attributes(self, entity_logical_name: str, refresh: bool = False) -> pd.DataFrame:
        """Column metadata of a table (DESIGN §4.1).

        :returns: one row per column: ``logical_name``, ``type``, ``max_length``, ``is_valid_for_read``,
            ``is_valid_for_update``, ``is_valid_for_create``, ``is_secured``, ``required_level``,
            ``options`` (``{value: label}`` for choice columns, else None).
        """
        if entity_logical_name in self._attributes and not refresh:
            return self._attributes[entity_logical_name]
        base = f"EntityDefinitions(LogicalName={odata.odata_literal(entity_logical_name)})/Attributes"
        items = self.request("GET", base, params={"$select": "LogicalName,AttributeType,IsValidForRead,"
                                                  "IsValidForUpdate,IsValidForCreate,IsSecured,RequiredLevel"}).json()["value"]
        max_length: dict[str, int] = {}
        options: dict[str, dict] = {}
        for cast in _METADATA_CASTS:
            params = {"$select": "LogicalName,MaxLength"} if "String" in cast or "Memo" in cast else \
                {"$select": "LogicalName", "$expand": "OptionSet($select=Options)"}
            for item in self.request("GET", f"{base}/Microsoft.Dynamics.CRM.{cast}", params=params).json()["value"]:
                if item.get("MaxLength") is not None:
                    max_length[item["LogicalName"]] = item["MaxLength"]
                if "OptionSet" in item:
                    options[item["LogicalName"]] = {
                        o["Value"]: ((o.get("Label") or {}).get("UserLocalizedLabel") or {}).get("Label")
                        for o in item["OptionSet"].get("Options", [])}
        frame = pd.DataFrame({
            "logical_name": pd.Series([i["LogicalName"] for i in items], dtype="str"),
            "type": pd.Series([i["AttributeType"] for i in items], dtype="str"),
            "max_length": pd.Series([max_length.get(i["LogicalName"]) for i in items], dtype="Int64"),
            "is_valid_for_read": pd.Series([bool(i.get("IsValidForRead")) for i in items], dtype="boolean"),
            "is_valid_for_update": pd.Series([bool(i.get("IsValidForUpdate")) for i in items], dtype="boolean"),
            "is_valid_for_create": pd.Series([bool(i.get("IsValidForCreate")) for i in items], dtype="boolean"),
            "is_secured": pd.Series([bool(i.get("IsSecured")) for i in items], dtype="boolean"),
            "required_level": pd.Series([(i.get("RequiredLevel") or {}).get("Value") for i in items], dtype="str"),
            "options": [options.get(i["LogicalName"]) for i in items],
        })
        self._attributes[entity_logical_name] = frame
        self.column_types[entity_logical_name] = dict(zip(frame["logical_name"], frame["type"]))
        return frame

    def alternate_keys(self, entity_logical_name: str) -> list[dict]:
        """The table's alternate keys (``EntityDefinitions(...)/Keys``), e.g.
        ``[{"name": "mdsync_marketopersonid_key", "columns": ["mdsync_marketopersonid"], "status": "Active"}]``;
        a key's index must be ``Active`` before rows can be addressed (and upserted) by it."""
        items = self.request("GET", f"EntityDefinitions(LogicalName={odata.odata_literal(entity_logical_name)})/Keys",
                             params={"$select": "LogicalName,KeyAttributes,EntityKeyIndexStatus"}).json()["value"]
        return [{"name": i.get("LogicalName"), "columns": list(i.get("KeyAttributes") or []),
                 "status": i.get("EntityKeyIndexStatus")} for i in items]

    def preload_metadata(self, entity_set: str, logical_name: str, attributes: pd.DataFrame) -> None:
        """Reuse column metadata read earlier (e.g. by another task's schema refresh), so reading and typing
        rows of ``entity_set`` needs no metadata call (DESIGN §8: an idle cycle costs at most 3 calls).

        :param attributes: a frame as returned by :meth:`attributes`.
        """
        self._logical_names[entity_set] = logical_name
        self._attributes[logical_name] = attributes
        self.column_types[logical_name] = dict(zip(attributes["logical_name"], attributes["type"]))

    def _column_types(self, entity_logical_name: str) -> dict[str, str]:
        """Column -> AttributeType for typing frames: one metadata call per table, then cached."""
        if entity_logical_name not in self.column_types:
            items = self.request("GET", f"EntityDefinitions(LogicalName={odata.odata_literal(entity_logical_name)})"
                                 "/Attributes", params={"$select": "LogicalName,AttributeType"}).json()["value"]
            self.column_types[entity_logical_name] = {i["LogicalName"]: i["AttributeType"] for i in items}
        return self.column_types[entity_logical_name]

    def field_permissions(self, entity_logical_name: str) -> pd.DataFrame:
        """Which columns the sync user may read / update / create (DESIGN §4.1).

        Unsecured columns are open to every user with table access. For secured ones (``IsSecured``) the
        user's field security profiles decide: ``WhoAmI`` -> ``systemusers(id)/systemuserprofiles_association``
        -> ``fieldpermissions`` of those profiles for this table (``canread``/``canupdate``/``cancreate`` = 4).

        :returns: ``logical_name``, ``is_secured``, ``can_read``, ``can_update``, ``can_create``.
        """
        attrs = self.attributes(entity_logical_name)
        secured = set(attrs.loc[attrs["is_secured"], "logical_name"])
        granted: dict[str, dict[str, bool]] = {}
        if secured:
            user_id = self.request("GET", "WhoAmI").json()["UserId"]
            profiles = self.request("GET", f"systemusers({user_id})/systemuserprofiles_association",
                                    params={"$select": "fieldsecurityprofileid"}).json()["value"]
            ids = [p["fieldsecurityprofileid"] for p in profiles]
            if ids:
                flt = odata.and_(odata.eq("entityname", entity_logical_name),
                                 odata.or_(*[f"_fieldsecurityprofileid_value eq {odata.odata_literal(_uuid(i))}"
                                             for i in ids]))
                for perm in self._all_pages("fieldpermissions", {
                        "$select": "attributelogicalname,canread,canupdate,cancreate", "$filter": flt}, {}):
                    g = granted.setdefault(perm["attributelogicalname"], {"read": False, "update": False,
                                                                          "create": False})
                    for action in g:
                        g[action] = g[action] or perm.get(f"can{action}") == 4
        names = list(attrs["logical_name"])

        def allowed(name: str, action: str, base_col: str) -> bool:
            base = bool(attrs.loc[attrs["logical_name"] == name, base_col].iloc[0])
            return base and (name not in secured or granted.get(name, {}).get(action, False))

        return pd.DataFrame({
            "logical_name": pd.Series(names, dtype="str"),
            "is_secured": pd.Series([n in secured for n in names], dtype="boolean"),
            "can_read": pd.Series([allowed(n, "read", "is_valid_for_read") for n in names], dtype="boolean"),
            "can_update": pd.Series([allowed(n, "update", "is_valid_for_update") for n in names], dtype="boolean"),
            "can_create": pd.Series([allowed(n, "create", "is_valid_for_create") for n in names], dtype="boolean"),
        })

    # reads ----------------------------------------------------------------------------------------------
    def _pages(self, path: str, params: dict | None, headers: dict):
        """Yield every page body, following ``@odata.nextLink`` to the end."""
        url, page_params = path, params
        while url:
            body = self.request("GET", url, params=page_params, headers=headers).json()
            yield body
            url, page_params = body.get("@odata.nextLink"), None

    def _all_pages(self, path: str, params: dict | None, headers: dict):
        """Yield the rows of every page."""
        for body in self._pages(path, params, headers):
            yield from body.get("value", [])

    def query(self, entity_set: str, select, filter: str | None = None, orderby: str | None = None,
              top: int | None = None, page_size: int = 5000) -> pd.DataFrame:
        """Read every matching row (all pages) into a frame typed per the table's metadata.

        :param select: column names (``$select``: only what the sync maps).
        :param filter: an OData ``$filter``; build it with :mod:`mdsync.dynamics.odata` so values are escaped.
        """
        columns = [odata.column(c) for c in select]
        params = {"$select": ",".join(columns), "$filter": filter, "$orderby": orderby,
                  "$top": str(top) if top is not None else None}
        rows = list(self._all_pages(entity_set, params, {"Prefer": f"odata.maxpagesize={int(page_size)}"}))
        return self._frame(entity_set, rows, columns)

    def track_changes(self, entity_set: str, select, delta_link: str | None = None,
                      page_size: int = 5000) -> ChangeSet:
        """Rows changed and deleted since ``delta_link`` (change tracking); a full read when it is None or
        expired. Returns the new delta link to store for the next call."""
        columns = [odata.column(c) for c in select]
        headers = {"Prefer": f"odata.track-changes,odata.maxpagesize={int(page_size)}"}
        full = delta_link is None
        if not full:
            try:
                return self._read_changes(entity_set, columns, delta_link, None, headers, full_read=False)
            except ServiceError as exc:
                if not _is_expired_token(exc):
                    raise
                log.warning("dynamics: delta link for %s expired (%s); falling back to a full read", entity_set,
                            exc.service_message)
        return self._read_changes(entity_set, columns, entity_set, {"$select": ",".join(columns)}, headers,
                                  full_read=True)

    def _read_changes(self, entity_set, columns, url, params, headers, full_read) -> ChangeSet:
        from mdsync.progress import Progress

        changed, deleted, last = [], [], {}
        progress = Progress.for_client(log, f"dynamics: {entity_set} read", None, self)
        for last in self._pages(url, params, headers):
            progress.advance(len(last.get("value", [])))
            for item in last.get("value", []):
                if "$deletedEntity" in item.get("@odata.context", "") or item.get("reason") == "deleted":
                    deleted.append(item["id"])
                else:
                    changed.append(item)
        progress.finish()
        link = last.get("@odata.deltaLink")
        if not link:
            raise self._error(None, "the last page of a change-tracking read had no @odata.deltaLink",
                              request=f"GET {API}{entity_set}",
                              next_step=f"enable change tracking on the table of {entity_set} (Power Apps > Tables "
                                        "> Properties > Advanced options > Track changes)")
        # A row changed then deleted within the window is reported only as deleted.
        gone = set(deleted)
        pid = self._primary_id(entity_set)
        changed = [r for r in changed if r.get(pid) not in gone]
        return ChangeSet(self._frame(entity_set, changed, columns), deleted, link, full_read)

    def _primary_id(self, entity_set: str) -> str:
        return self.logical_name(entity_set) + "id"

    def _frame(self, entity_set: str, rows: list[dict], columns: list[str]) -> pd.DataFrame:
        """Rows -> DataFrame with the primary id first and dtypes from metadata (datetimes UTC)."""
        pid = self._primary_id(entity_set)
        names = [pid] + [c for c in columns if c != pid]
        types = self._column_types(self.logical_name(entity_set))
        data = {}
        for name in names:
            logical = name[1:-6] if name.startswith("_") and name.endswith("_value") else name
            kind = "Uniqueidentifier" if name == pid else types.get(logical, "String")
            values = [r.get(name) for r in rows]
            if kind == "DateTime":
                data[name] = pd.to_datetime(pd.Series(values, dtype="object"), utc=True, format="ISO8601")
            else:
                data[name] = pd.Series(values, dtype=_PANDAS_TYPES.get(kind, "object"))
        return pd.DataFrame(data)

    def states(self, entity_set: str, ids) -> pd.DataFrame:
        """``statecode`` / ``statuscode`` of the given rows (lead lifecycle reads), 100 ids per call."""
        pid = self._primary_id(entity_set)
        ids = [str(i) for i in ids]
        frames = [self.query(entity_set, [pid, "statecode", "statuscode"],
                             filter=odata.or_(*[f"{pid} eq {odata.odata_literal(_uuid(i))}" for i in ids[n:n + 100]]))
                  for n in range(0, len(ids), 100)]
        return pd.concat(frames, ignore_index=True) if frames else self._frame(entity_set, [], [pid, "statecode",
                                                                                                 "statuscode"])

    # lead lifecycle -------------------------------------------------------------------------------------
    def qualify_lead(self, lead_id: str, create_contact: bool = True, create_account: bool = False,
                     create_opportunity: bool = False, status: int = 3) -> list[dict]:
        """Qualify a lead (``QualifyLead``): returns the created records as ``{"entity", "id"}``."""
        body = {"CreateContact": create_contact, "CreateAccount": create_account,
                "CreateOpportunity": create_opportunity, "Status": status}
        resp = self.request("POST", f"leads({_uuid(lead_id)})/Microsoft.Dynamics.CRM.QualifyLead", json=body,
                            what=f"lead {lead_id}")
        created = []
        for rec in resp.json().get("value", []):
            entity = rec.get("@odata.type", "").lstrip("#").rsplit(".", 1)[-1]
            created.append({"entity": entity, "id": rec.get(f"{entity}id")})
        return created

    def merge(self, entity: str, target_id: str, subordinate_id: str, update_content: dict | None = None,
              perform_parenting_checks: bool = False) -> None:
        """Merge ``subordinate_id`` into ``target_id`` (``Merge``); the subordinate is deactivated."""
        kind = f"Microsoft.Dynamics.CRM.{odata.column(entity)}"
        body = {"Target": {"@odata.type": kind, f"{entity}id": _uuid(target_id)},
                "Subordinate": {"@odata.type": kind, f"{entity}id": _uuid(subordinate_id)},
                "UpdateContent": {"@odata.type": kind, **(update_content or {})},
                "PerformParentingChecks": perform_parenting_checks}
        self.request("POST", "Merge", json=body, what=f"merge {entity} {subordinate_id} into {target_id}")


def _uuid(value) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValueError(f"not a Dataverse id (GUID): {value!r}") from None


def _retry_after(resp: requests.Response) -> float:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def _error_of(resp: requests.Response) -> tuple[str | None, str]:
    """The service's ``(code, message)`` from an error answer, or the HTTP reason when it has none."""
    try:
        err = resp.json().get("error", {})
        return err.get("code") or None, err.get("message") or resp.reason
    except ValueError:
        return None, f"{resp.status_code} {resp.reason}: {resp.text[:200]}"


def _next_step(status: int) -> str:
    return {400: "the record is rejected as sent; fix the value named in the message",
            401: "the token was refused twice; check that the app registration has an application user in this "
                 "environment (Power Platform admin center > Users + permissions > Application users); not retried",
            403: "grant the sync user's security role the missing privilege (or its field security profile the "
                 "column); not retried",
            404: "the row or resource does not exist",
            412: "the row changed or already exists; re-read it and retry"}.get(status, "see the service message")


def _is_expired_token(exc: ServiceError) -> bool:
    text = (exc.service_message or "").lower()
    return exc.status in (400, 410) and ("expired" in text or "version stamp" in text)

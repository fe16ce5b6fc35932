"""The ``/api/data/v9.2/`` resource paths, independent of the HTTP server so ``$batch`` parts reuse them.

:meth:`WebApi.handle` takes a method, a path below ``/api/data/v9.2/``, the query options, headers and
body, and returns a :class:`Reply`. Write operations run in one SQLite transaction (the caller's, for a
``$batch`` change set; their own otherwise).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import urllib.parse
import uuid
from dataclasses import dataclass, field

from . import errors as E
from .errors import DataverseError
from .schema import CHOICE_TYPES, LINK_KEY_COLUMN, LINK_KEY_NAME, Entity
from .store import BulkRows, Store, decode_cookie, encode_cookie, utcnow

API = "/api/data/v9.2/"
MAX_PAGE = 5000
_KEY = re.compile(r"^(\w+)\((.*)\)$", re.S)
_BULK = re.compile(r"^(\w+)/Microsoft\.Dynamics\.CRM\.(CreateMultiple|UpdateMultiple|UpsertMultiple)$")
_ATTR_CAST = {"StringAttributeMetadata": ("String",), "MemoAttributeMetadata": ("Memo",),
              "PicklistAttributeMetadata": ("Picklist",), "StateAttributeMetadata": ("State",),
              "StatusAttributeMetadata": ("Status",), "BooleanAttributeMetadata": ("Boolean",),
              "IntegerAttributeMetadata": ("Integer",), "DateTimeAttributeMetadata": ("DateTime",),
              "MoneyAttributeMetadata": ("Money",),
              "LookupAttributeMetadata": ("Lookup", "Customer")}
_TYPE_NAMES = {"String": "StringType", "Memo": "MemoType", "Picklist": "PicklistType", "State": "StateType",
               "Status": "StatusType", "Boolean": "BooleanType", "Integer": "IntegerType",
               "DateTime": "DateTimeType", "BigInt": "BigIntType", "Money": "MoneyType", "Lookup": "LookupType",
               "Customer": "CustomerType", "Uniqueidentifier": "UniqueidentifierType"}


@dataclass
class Reply:
    """A Web API response: status, headers and a JSON body (or None for 204)."""

    status: int
    body: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(err: DataverseError) -> Reply:
    return Reply(err.status, err.body(), dict(err.headers))


def _metadata_id(*parts: str) -> str:
    """A stable ``MetadataId`` for a metadata item."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(parts)))


def _parse_key(entity: Entity, raw: str) -> dict:
    """``<guid>`` or ``mdsync_marketopersonid='x'`` (quotes doubled inside) -> ``{column: value}``."""
    raw = raw.strip()
    m = re.fullmatch(r"(\w+)='((?:[^']|'')*)'", raw, re.S)
    if m:
        if m.group(1) != LINK_KEY_COLUMN or not entity.has_link_key:
            keys = f"{LINK_KEY_NAME} on {LINK_KEY_COLUMN}" if entity.has_link_key else "none"
            raise DataverseError(400, E.QUERY, f"The key attribute '{m.group(1)}' is not part of an alternate key "
                                 f"of '{entity.logical_name}' (keys: {keys}).")
        return {LINK_KEY_COLUMN: m.group(2).replace("''", "'")}
    try:
        return {entity.primary_id: str(uuid.UUID(raw))}
    except ValueError:
        raise DataverseError(400, E.QUERY, f"Invalid key '{raw}' for '{entity.entity_set}'.") from None


def _prefer(headers: dict) -> dict:
    """Parse ``Prefer`` into ``{name: value}`` (``odata.maxpagesize=500`` -> ``{"odata.maxpagesize": "500"}``)."""
    out = {}
    for part in headers.get("prefer", "").split(","):
        name, _, value = part.strip().partition("=")
        if name:
            out[name.strip()] = value.strip().strip('"')
    return out


class WebApi:
    """Dispatches Web API requests to the :class:`Store`."""

    def __init__(self, store: Store, identity, org_url: str) -> None:
        self.store = store
        self.identity = identity
        self.org_url = org_url

    # entry point ----------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict, headers: dict, body: bytes, user: str,
               conn=None) -> Reply:
        """Serve one request; errors become the service's error reply."""
        try:
            return self._route(method, path, query, {k.lower(): v for k, v in headers.items()}, body, user, conn)
        except DataverseError as err:
            return error_reply(err)

    def _route(self, method, path, query, headers, body, user, conn) -> Reply:
        if path == "$batch" and method == "POST":
            return self.batch(headers, body, user)
        if path == "WhoAmI" and method == "GET":
            return Reply(200, {"@odata.context": f"{self.org_url}{API}$metadata#Microsoft.Dynamics.CRM."
                                                 "WhoAmIResponse", "BusinessUnitId": self.identity.business_unit_id,
                               "UserId": user, "OrganizationId": self.identity.organization_id})
        if path == "Merge" and method == "POST":
            return self._write(conn, lambda c: self.merge(self._json(body), c))
        if path.startswith("EntityDefinitions(") and method == "GET":
            return self.metadata(path, query)
        if path == "EntityDefinitions" and method == "GET":
            return self.entity_definitions(query)
        m = re.fullmatch(r"systemusers\(([0-9a-fA-F-]{36})\)/systemuserprofiles_association", path)
        if m and method == "GET":
            return self.user_profiles(m.group(1), user)
        m = _BULK.match(path)
        if m and method == "POST":
            entity = self.store.entity(m.group(1))
            payload = self._json(body)
            plan = self.prepare_bulk(entity, m.group(2), payload)  # before the write lock is taken
            return self._write(conn, lambda c: self.bulk(entity, m.group(2), payload, c, plan))
        m = re.fullmatch(r"leads\(([^)]*)\)/Microsoft\.Dynamics\.CRM\.QualifyLead", path)
        if m and method == "POST":
            return self._write(conn, lambda c: self.qualify_lead(m.group(1), self._json(body), c))
        m = _KEY.match(path)
        if m:
            entity = self.store.entity(m.group(1))
            key = _parse_key(entity, m.group(2))
            if method == "GET":
                return self.retrieve(entity, key, query)
            if method == "PATCH":
                return self._write(conn, lambda c: self.patch(entity, key, self._json(body), headers, query, c))
            if method == "DELETE":
                return self._write(conn, lambda c: self.delete(entity, key, headers, c))
        elif "/" not in path and path:
            entity = self.store.entity(path)
            if method == "GET":
                return self.collection(entity, query, headers)
            if method == "POST":
                return self._write(conn, lambda c: self.create(entity, self._json(body), headers, query, c))
        raise DataverseError(405 if path else 404, E.QUERY, f"{method} is not supported on '{API}{path}'.")

    def _write(self, conn, op) -> Reply:
        if conn is not None:
            return op(conn)
        with self.store.lock, self.store.engine.begin() as c:
            return op(c)

    @staticmethod
    def _json(body: bytes) -> dict:
        try:
            data = json.loads(body or b"{}")
        except ValueError as exc:
            raise DataverseError(400, E.PAYLOAD, f"The request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DataverseError(400, E.PAYLOAD, "The request body must be a JSON object.")
        return data

    def _entity_id_url(self, entity: Entity, row_id: str) -> str:
        return f"{self.org_url}{API}{entity.entity_set}({row_id})"

    # reads ----------------------------------------------------------------------------------------------
    def collection(self, entity: Entity, query: dict, headers: dict) -> Reply:
        """``GET <set>``: query options, paging, and change tracking."""
        prefer = _prefer(headers)
        try:
            page_size = min(int(prefer.get("odata.maxpagesize", MAX_PAGE)), MAX_PAGE)
        except ValueError:
            raise DataverseError(400, E.QUERY, f"Invalid odata.maxpagesize '{prefer['odata.maxpagesize']}'.") from None
        cookie, tracking = ({}, False)
        if query.get("$skiptoken"):
            cookie, tracking = decode_cookie(query["$skiptoken"])
        tracking = tracking or "odata.track-changes" in prefer or "$deltatoken" in query
        applied = [f"odata.maxpagesize={page_size}"] if "odata.maxpagesize" in prefer else []
        base = {k: v for k, v in query.items() if k not in ("$skiptoken",)}
        if tracking:
            for option in ("$filter", "$orderby", "$expand", "$top"):
                if option in query:
                    raise DataverseError(400, E.QUERY, f'The "{option[1:]}" query parameter isn\'t supported when '
                                                       "Change Tracking is enabled.")
            since = self._delta_version(query.get("$deltatoken"))
            with self.store.lock:  # writers hold the lock until commit: no half-committed version is handed out
                upto = int(cookie.get("upto", self.store.current_version))
            items, nxt = self.store.changes(entity, select=query.get("$select"), since=since, upto=upto,
                                            cursor=cookie, page_size=page_size)
            context = f"{self.org_url}{API}$metadata#{entity.entity_set}" + ("/$delta" if since else "")
            out = {"@odata.context": context, "value": items}
            if nxt:
                out["@odata.nextLink"] = self._link(entity, base, {"$skiptoken": encode_cookie(
                    {**nxt, "upto": upto, "page": int(cookie.get("page", 1)) + 1}, True)})
            else:
                token = f"{upto}!{utcnow().strftime('%m/%d/%Y %H:%M:%S')}"
                delta = {k: v for k, v in base.items() if k != "$deltatoken"}
                out["@odata.deltaLink"] = self._link(entity, delta, {"$deltatoken": token})
            return Reply(200, out, {"Preference-Applied": ",".join(applied + ["odata.track-changes"])})
        rows, nxt, total = self.store.query(
            entity, select=query.get("$select"), filter=query.get("$filter"), orderby=query.get("$orderby"),
            top=query.get("$top"), page_size=page_size, cookie=cookie,
            count=query.get("$count", "").lower() == "true", expand=query.get("$expand"))
        out = {"@odata.context": f"{self.org_url}{API}$metadata#{entity.entity_set}", "value": rows}
        if total is not None:
            out["@odata.count"] = total
        if nxt:
            out["@odata.nextLink"] = self._link(entity, base, {"$skiptoken": encode_cookie(nxt, False)})
        return Reply(200, out, {"Preference-Applied": ",".join(applied)} if applied else {})

    def _delta_version(self, token: str | None) -> int:
        if not token:
            return 0
        m = re.fullmatch(r"(\d+)!(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d)", token)
        if not m:
            raise DataverseError(400, E.QUERY, f"Invalid $deltatoken '{token}'.")
        version = int(m.group(1))
        if version < self.store.delta_floor:
            raise DataverseError(400, E.CHANGE_TOKEN_EXPIRED, "Version stamp associated with the client has "
                                 "expired. Please perform a full sync.")
        return version

    def _link(self, entity: Entity, base: dict, extra: dict) -> str:
        params = {**base, **extra}
        return f"{self.org_url}{API}{entity.entity_set}?" + urllib.parse.urlencode(
            params, quote_via=urllib.parse.quote, safe="$,")

    def retrieve(self, entity: Entity, key: dict, query: dict) -> Reply:
        with self.store.engine.connect() as conn:
            row = self.store.get(entity, key, conn)
            if row is None:
                raise self._missing(entity, key)
            body = {"@odata.context": f"{self.org_url}{API}$metadata#{entity.entity_set}/$entity",
                    **self._representation(entity, row, query, conn)}
        return Reply(200, body, {"ETag": body["@odata.etag"]})

    def _representation(self, entity: Entity, row, query: dict, conn) -> dict:
        """One row as returned: its ``$select`` columns and ``$expand`` navigation properties."""
        columns = self.store.select_columns(entity, query.get("$select"))
        out = self.store.format_row(entity, row, columns)
        if query.get("$expand"):
            self.store.expand_rows(self.store.parse_expand(entity, query["$expand"]), [row], [out], conn)
        return out

    @staticmethod
    def _missing(entity: Entity, key: dict) -> DataverseError:
        (name, value), = key.items()
        what = f"Id = {value}" if name == entity.primary_id else f"{name} = {value}"
        return DataverseError(404, E.NOT_FOUND, f"{entity.logical_name} With {what} Does Not Exist")

    # single-row writes ----------------------------------------------------------------------------------
    def create(self, entity: Entity, body: dict, headers: dict, query: dict, conn) -> Reply:
        row_id = self.store.create(entity, body, conn)
        return self._written(entity, row_id, 201, headers, query, conn)

    def _written(self, entity, row_id, created_status, headers, query, conn) -> Reply:
        hdrs = {"OData-EntityId": self._entity_id_url(entity, row_id)}
        if "return=representation" in headers.get("prefer", ""):
            row = self.store.get(entity, {entity.primary_id: row_id}, conn)
            if created_status == 200:  # an update ignores $expand (update-delete-entities-using-web-api.md)
                query = {k: v for k, v in query.items() if k != "$expand"}
            return Reply(created_status, self._representation(entity, row, query, conn), hdrs)
        return Reply(204, None, hdrs)

    def patch(self, entity: Entity, key: dict, body: dict, headers: dict, query: dict, conn) -> Reply:
        """Update, or upsert by primary or alternate key, honouring ``If-Match`` / ``If-None-Match``."""
        current = self.store.get(entity, key, conn)
        if_match, if_none = headers.get("if-match"), headers.get("if-none-match")
        if current is None:
            if if_match:
                raise self._missing(entity, key)
            row_id = self.store.create(entity, {**body, **key}, conn)
            return self._written(entity, row_id, 201, headers, query, conn)
        if if_none == "*":
            raise DataverseError(412, E.DUPLICATE_KEY, "A record with matching key values already exists.")
        if if_match and if_match != "*" and if_match != f'W/"{current["versionnumber"]}"':
            raise DataverseError(412, E.DUPLICATE_KEY, "The version of the existing record doesn't match the "
                                 "RowVersion property provided.")
        row_id = self.store.update(entity, current, body, conn)
        return self._written(entity, row_id, 200, headers, query, conn)

    def delete(self, entity: Entity, key: dict, headers: dict, conn) -> Reply:
        current = self.store.get(entity, key, conn)
        if current is None:
            raise self._missing(entity, key)
        if_match = headers.get("if-match")
        if if_match and if_match != "*" and if_match != f'W/"{current["versionnumber"]}"':
            raise DataverseError(412, E.DUPLICATE_KEY, "The version of the existing record doesn't match the "
                                 "RowVersion property provided.")
        self.store.delete(entity, current[entity.primary_id], conn)
        return Reply(204)

    # bulk messages --------------------------------------------------------------------------------------
    def prepare_bulk(self, entity: Entity, message: str, body: dict) -> "_BulkPlan":
        """The part of a bulk message that needs no stored row, done before the write lock is taken (so a
        request validates while another one writes): the message and ``Targets`` checks, each target's key
        and payload, and for ``CreateMultiple`` / ``UpdateMultiple`` its validation. Targets are checked in
        order; an error is kept for its target's turn in :meth:`bulk` (an earlier target may fail first)."""
        if message in self.store.unsupported_messages.get(entity.logical_name, []):
            raise DataverseError(404, E.NO_SEGMENT, f"Resource not found for the segment "
                                 f"'Microsoft.Dynamics.CRM.{message}'.")
        targets = body.get("Targets")
        if not isinstance(targets, list) or not targets:
            raise DataverseError(400, E.PAYLOAD, f"{message}: 'Targets' must be a non-empty array.")
        expected = f"Microsoft.Dynamics.CRM.{entity.logical_name}"
        parsed: list = []
        for i, target in enumerate(targets):
            try:
                if str(target.get("@odata.type", "")).lstrip("#") != expected:
                    raise DataverseError(400, E.PAYLOAD, f"{message}: Targets[{i}] must set @odata.type to "
                                         f"'{expected}'.")
                key = self._target_key(entity, target)
            except DataverseError as err:
                parsed.append(err)
                break
            parsed.append((key, {k: v for k, v in target.items() if not k.startswith("@odata.")}))
        values: list = []  # an upsert validates as a create or an update: known once the row is looked up
        if message != "UpsertMultiple":
            for item in parsed:
                if isinstance(item, DataverseError):
                    break
                try:
                    values.append(self.store.coerce(entity, item[1], creating=message == "CreateMultiple"))
                except DataverseError as err:
                    values.append(err)
                    break
        return _BulkPlan(entity, message, parsed, values)

    def bulk(self, entity: Entity, message: str, body: dict, conn, plan: "_BulkPlan | None" = None) -> Reply:
        """CreateMultiple / UpdateMultiple / UpsertMultiple: all-or-nothing, like standard tables.

        A failure raises out of the caller's transaction, which rolls the whole request back. The rows the
        targets name are read in one SELECT per key column and written by executemany (:class:`BulkRows`).
        """
        plan = plan or self.prepare_bulk(entity, message, body)
        rows = BulkRows(entity, conn)
        rows.prefetch(*_lookups(entity, message, plan.parsed))
        ids = []
        for i, item in enumerate(plan.parsed):
            if isinstance(item, DataverseError):
                raise item
            key, data = item
            checked = plan.values[i] if i < len(plan.values) else None
            if message == "CreateMultiple":
                if isinstance(checked, DataverseError):
                    raise checked
                ids.append(self.store.create(entity, data, conn, values=checked, rows=rows))
                continue
            current = rows.get(key) if key else None
            if current is None and message == "UpdateMultiple":
                raise self._missing(entity, key or {entity.primary_id: None})
            if current is None:
                ids.append(self.store.create(entity, {**data, **(key or {})}, conn, rows=rows))
            else:
                if isinstance(checked, DataverseError):
                    raise checked
                ids.append(self.store.update(entity, current, data, conn, values=checked, rows=rows))
        rows.flush()
        if message == "UpdateMultiple":
            return Reply(204)
        return Reply(200, {"@odata.context": f"{self.org_url}{API}$metadata#Microsoft.Dynamics.CRM.{message}Response",
                           "Ids": ids})

    def _target_key(self, entity: Entity, target: dict) -> dict | None:
        ref = target.get("@odata.id")
        if ref:
            # @odata.id is a URL: percent-escapes in the key value are decoded like in a request path.
            m = _KEY.match(urllib.parse.unquote(urllib.parse.urlsplit(str(ref)).path).rsplit("/", 1)[-1])
            if not m or self.store.entity(m.group(1)) is not entity:
                raise DataverseError(400, E.PAYLOAD, f"Invalid @odata.id '{ref}' for {entity.entity_set}.")
            return _parse_key(entity, m.group(2))
        if target.get(entity.primary_id):
            return {entity.primary_id: str(target[entity.primary_id]).lower()}
        if target.get(LINK_KEY_COLUMN) is not None and entity.has_link_key:
            return {LINK_KEY_COLUMN: target[LINK_KEY_COLUMN]}
        return None

    # lead lifecycle -------------------------------------------------------------------------------------
    _LEAD_TO_CONTACT = ("firstname", "lastname", "middlename", "emailaddress1", "emailaddress2", "jobtitle",
                        "telephone1", "mobilephone", "fax", "websiteurl", "salutation", "address1_line1",
                        "address1_line2", "address1_city", "address1_stateorprovince", "address1_postalcode",
                        "address1_country", "donotemail", "donotbulkemail", "donotphone")

    def qualify_lead(self, raw_id: str, body: dict, conn) -> Reply:
        """``QualifyLead``: create the contact (and account), close the lead as qualified, link them."""
        leads, contacts, accounts = (self.store.entities[n] for n in ("lead", "contact", "account"))
        key = _parse_key(leads, raw_id)
        lead = self.store.get(leads, key, conn)
        if lead is None:
            raise self._missing(leads, key)
        if lead["statecode"] != 0:
            raise DataverseError(400, E.VALIDATION, f"The lead {lead['leadid']} is closed (statecode "
                                 f"{lead['statecode']}). You cannot convert or qualify a lead that is already closed.")
        if body.get("CreateOpportunity"):
            raise DataverseError(400, E.PAYLOAD, "CreateOpportunity: the sandbox has no opportunity table.")
        status = body.get("Status", 3)
        status_col = leads.columns["statuscode"]
        if not any(v == status and s == 1 for v, _l, s in status_col.options):
            raise DataverseError(400, E.VALIDATION, f"Status {status} is not a status reason of the Qualified state.")
        created = []
        account_id = None
        if body.get("CreateAccount"):
            account_id = self.store.create(accounts, {}, conn, values={
                "name": lead["companyname"] or lead["fullname"], "_originatingleadid_value": lead["leadid"],
                "emailaddress1": lead["emailaddress1"], "telephone1": lead["telephone1"]})
            created.append({"@odata.type": "#Microsoft.Dynamics.CRM.account", "accountid": account_id})
        contact_id = None
        if body.get("CreateContact", True):
            values = {c: lead[c] for c in self._LEAD_TO_CONTACT if c in lead.keys()}
            values["_originatingleadid_value"] = lead["leadid"]
            values["_parentcustomerid_value"] = account_id
            contact_id = self.store.create(contacts, {}, conn, values=values)
            created.append({"@odata.type": "#Microsoft.Dynamics.CRM.contact", "contactid": contact_id})
        # the lead's parents point at what was created; without a create they stay as they were (a lead qualified
        # into an existing contact keeps its parentcontactid)
        self.store.update(leads, lead, {}, conn, values={
            "statecode": 1, "statuscode": status,
            "_parentcontactid_value": contact_id or lead["_parentcontactid_value"],
            "_parentaccountid_value": account_id or lead["_parentaccountid_value"]})
        return Reply(200, {"@odata.context": f"{self.org_url}{API}$metadata#Collection(Microsoft.Dynamics.CRM."
                                             "crmbaseentity)", "value": created})

    #: what a merged subordinate becomes (statecode, statuscode): an inactive contact or account; a lead
    #: disqualified as "Canceled" (the entity reference lists it under Disqualified; it names no merge state)
    MERGED_STATE = {"contact": (1, 2), "account": (1, 2), "lead": (2, 7)}
    #: the parent columns ``PerformParentingChecks`` compares
    PARENTS = {"contact": ("_parentcustomerid_value",), "lead": ("_parentaccountid_value", "_parentcontactid_value"),
               "account": ()}

    def merge(self, body: dict, conn) -> Reply:
        """``Merge`` (merge-entity-using-web-api.md): ``UpdateContent`` applied to the target (whose
        ``modifiedon`` moves even without content), the rows pointing at the subordinate moved to the target
        where the relationship cascades merges, and the subordinate deactivated with ``masterid`` set to the
        target and ``merged`` true. Both records must be active, distinct and of one mergeable type."""
        target, sub = body.get("Target") or {}, body.get("Subordinate") or {}
        kind = self._merge_type(target)
        if not kind or self._merge_type(sub) != kind:
            raise DataverseError(400, E.PAYLOAD, "Merge: Target and Subordinate must be entity references of the "
                                 "same type (account, contact or lead) with @odata.type.")
        if kind not in self.MERGED_STATE:
            raise DataverseError(400, E.PAYLOAD, f"This type: {kind} is not supported with merge operation")
        checks = body.get("PerformParentingChecks")
        if not isinstance(checks, bool):
            raise DataverseError(400, E.PAYLOAD, "Merge: the parameter 'PerformParentingChecks' is required and "
                                 f"must be a Boolean, got {checks!r}.")
        entity = self.store.entities[kind]
        content = body.get("UpdateContent") or {}
        if content.get("@odata.type") and self._merge_type(content) != kind:
            raise DataverseError(400, E.PAYLOAD, f"Merge: UpdateContent must be a {kind} (@odata.type "
                                 f"Microsoft.Dynamics.CRM.{kind}), got {content['@odata.type']!r}.")
        rows = []
        for role, ref in (("master entity", target), ("sub-entity", sub)):
            key = {entity.primary_id: self.store._guid(ref.get(entity.primary_id), entity.primary_id)}
            row = self.store.get(entity, key, conn)
            if row is None:
                raise self._missing(entity, key)
            if row["statecode"] != 0:
                raise DataverseError(400, E.VALIDATION, f"{role}:{kind}-{row[entity.primary_id]} is deactive")
            rows.append(row)
        master, subordinate = rows
        master_id, sub_id = master[entity.primary_id], subordinate[entity.primary_id]
        if master_id == sub_id:
            raise DataverseError(400, E.VALIDATION, "Merge cannot be performed on master and sub-entities that are "
                                 "identical.")
        if checks:
            for name in self.PARENTS[kind]:
                if subordinate[name] is not None and subordinate[name] != master[name]:
                    raise DataverseError(400, E.VALIDATION, f"Merge: the parent of the subordinate {kind} {sub_id} "
                                         f"({name} {subordinate[name]}) differs from the master's ({master[name]}); "
                                         "send PerformParentingChecks false to merge and keep the master's.")
        values = self.store.coerce(entity, {k: v for k, v in content.items() if not k.startswith("@odata.")},
                                   creating=False)
        self.store.update(entity, master, {}, conn, values=values)
        self.store.merge_children(entity, sub_id, master_id, conn)
        state, status = self.MERGED_STATE[kind]
        self.store.update(entity, subordinate, {}, conn, values={
            "statecode": state, "statuscode": status, "_masterid_value": master_id, "merged": True})
        return Reply(204)

    @staticmethod
    def _merge_type(ref: dict) -> str:
        """``contact`` from ``{"@odata.type": "Microsoft.Dynamics.CRM.contact"}`` ('' without one)."""
        return str(ref.get("@odata.type", "")).lstrip("#").rsplit(".", 1)[-1] if isinstance(ref, dict) else ""

    # metadata -------------------------------------------------------------------------------------------
    def metadata(self, path: str, query: dict) -> Reply:
        """``EntityDefinitions(LogicalName='x')`` and its ``Attributes`` (optionally cast to a type)."""
        keys = re.fullmatch(r"EntityDefinitions\(LogicalName='(\w+)'\)/Keys", path)
        if keys and keys.group(1) in self.store.entities:
            return self.entity_keys(self.store.entities[keys.group(1)], query)
        m = re.fullmatch(r"EntityDefinitions\(LogicalName='(\w+)'\)(?:/Attributes(?:/Microsoft\.Dynamics\.CRM\."
                         r"(\w+))?)?", path)
        if not m or m.group(1) not in self.store.entities:
            raise DataverseError(404, E.QUERY, f"Resource not found for the segment '{path}'.")
        entity = self.store.entities[m.group(1)]
        meta_id = _metadata_id
        if "/Attributes" not in path:
            body = {"LogicalName": entity.logical_name, "EntitySetName": entity.entity_set,
                    "PrimaryIdAttribute": entity.primary_id, "PrimaryNameAttribute": entity.primary_name,
                    "ChangeTrackingEnabled": True, "MetadataId": meta_id(entity.logical_name)}
            return Reply(200, self._select(body, query))
        if query.get("$filter"):
            raise DataverseError(400, E.QUERY, "The sandbox does not filter attribute metadata; select and filter "
                                 "client-side.")
        cast = m.group(2)
        if cast and cast not in _ATTR_CAST:
            raise DataverseError(400, E.QUERY, f"Unsupported attribute metadata type '{cast}'.")
        expand = query.get("$expand", "")
        out = []
        for col in entity.columns.values():
            if cast and col.type not in _ATTR_CAST[cast]:
                continue
            item = {
                "@odata.type": f"#Microsoft.Dynamics.CRM.{_cast_name(col.type)}",
                "LogicalName": col.logical_name, "MetadataId": meta_id(entity.logical_name, col.logical_name),
                "AttributeType": col.type, "AttributeTypeName": {"Value": _TYPE_NAMES.get(col.type, col.type)},
                "IsValidForRead": col.valid_for_read, "IsValidForCreate": col.valid_for_create,
                "IsValidForUpdate": col.valid_for_update, "IsCustomAttribute": col.custom,
                "IsSecured": self.store.is_secured(entity.logical_name, col.logical_name),
                "RequiredLevel": {"Value": col.required_level, "CanBeChanged": True,
                                  "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings"},
            }
            if col.max_length is not None and cast in ("StringAttributeMetadata", "MemoAttributeMetadata"):
                item["MaxLength"] = col.max_length
            if cast in ("IntegerAttributeMetadata", "MoneyAttributeMetadata"):
                item["MinValue"], item["MaxValue"] = col.min_value, col.max_value
            if cast == "MoneyAttributeMetadata":
                item["Precision"] = col.precision
            if cast == "DateTimeAttributeMetadata":
                item["Format"] = col.format or "DateAndTime"
            if cast == "LookupAttributeMetadata":
                item["Targets"] = col.targets
            if "OptionSet" in expand and col.type in CHOICE_TYPES:
                item["OptionSet"] = {"Options": [_option(v, label, state, col.type) for v, label, state in col.options]}
            if "OptionSet" in expand and col.type == "Boolean":
                opts = {v: label for v, label, _s in col.options}
                item["OptionSet"] = {"TrueOption": _option(1, opts.get(1, "Yes"), None, "Boolean"),
                                     "FalseOption": _option(0, opts.get(0, "No"), None, "Boolean")}
            out.append(self._select(item, query, keep=("@odata.type", "OptionSet")))
        context = f"{self.org_url}{API}$metadata#EntityDefinitions('{entity.logical_name}')/Attributes"
        return Reply(200, {"@odata.context": context, "value": out})

    def entity_keys(self, entity: Entity, query: dict) -> Reply:
        """``EntityDefinitions(LogicalName='x')/Keys``: the table's alternate keys (``EntityKeyMetadata``)."""
        out = []
        if LINK_KEY_COLUMN in entity.columns and entity.link_key_status is not None:
            out.append(self._select({
                "LogicalName": LINK_KEY_NAME, "SchemaName": LINK_KEY_NAME, "EntityLogicalName": entity.logical_name,
                "KeyAttributes": [LINK_KEY_COLUMN], "EntityKeyIndexStatus": entity.link_key_status,
                "IsManaged": False, "MetadataId": _metadata_id(entity.logical_name, "keys", LINK_KEY_NAME),
                "DisplayName": {"UserLocalizedLabel": {"Label": "Marketo person id", "LanguageCode": 1033}},
            }, query))
        context = f"{self.org_url}{API}$metadata#EntityDefinitions('{entity.logical_name}')/Keys"
        return Reply(200, {"@odata.context": context, "value": out})

    def entity_definitions(self, query: dict) -> Reply:
        """``EntityDefinitions`` with an optional ``$filter=LogicalName|EntitySetName eq '<name>'``."""
        flt = query.get("$filter")
        m = re.fullmatch(r"\s*(LogicalName|EntitySetName) eq '(\w+)'\s*", flt or "")
        if flt and not m:
            raise DataverseError(400, E.QUERY, "The sandbox filters EntityDefinitions only by "
                                 "LogicalName/EntitySetName eq '<name>'.")
        out = []
        for entity in self.store.entities.values():
            value = entity.logical_name if m and m.group(1) == "LogicalName" else entity.entity_set
            if not m or value == m.group(2):
                out.append(self._select(self.metadata(f"EntityDefinitions(LogicalName='{entity.logical_name}')",
                                                      {}).body, query))
        return Reply(200, {"@odata.context": f"{self.org_url}{API}$metadata#EntityDefinitions", "value": out})

    @staticmethod
    def _select(item: dict, query: dict, keep=()) -> dict:
        if not query.get("$select"):
            return item
        wanted = {s.strip() for s in query["$select"].split(",")} | set(keep) | {"MetadataId"}
        return {k: v for k, v in item.items() if k in wanted}

    def user_profiles(self, user_id: str, caller: str) -> Reply:
        """The field security profiles of a user: the sync user has the sandbox's one profile."""
        ids = {self.identity.application_user_id, self.identity.interactive_user_id}
        if user_id.lower() not in ids:
            raise DataverseError(404, E.NOT_FOUND, f"systemuser With Id = {user_id} Does Not Exist")
        return Reply(200, {"@odata.context": f"{self.org_url}{API}$metadata#fieldsecurityprofiles",
                           "value": [{"fieldsecurityprofileid": self.identity.field_security_profile_id,
                                      "name": "mdsync sync user"}]})

    # $batch ---------------------------------------------------------------------------------------------
    def batch(self, headers: dict, body: bytes, user: str) -> Reply:
        """``$batch``: up to 1000 operations, change sets atomic, ``odata.continue-on-error`` honoured."""
        parts = _multipart(headers.get("content-type", ""), body)
        ops = sum(len(p) if isinstance(p, list) else 1 for p in parts)
        if ops > 1000:
            raise DataverseError(400, E.PAYLOAD, f"The batch has {ops} requests; the maximum is 1000.")
        keep_going = "odata.continue-on-error" in _prefer(headers)
        replies: list = []
        failed = False
        for part in parts:
            if isinstance(part, list):  # change set: all or nothing
                group: list[Reply] = []
                try:
                    with self.store.lock, self.store.engine.begin() as conn:
                        for method, path, query, hdrs, payload in part:
                            reply = self.handle(method, path, query, hdrs, payload, user, conn)
                            group.append(reply)
                            if reply.status >= 400:
                                raise _Rollback(reply)
                except _Rollback as rb:
                    group = [rb.reply]
                replies.append(group)
                failed = group[-1].status >= 400
            else:
                method, path, query, hdrs, payload = part
                reply = self.handle(method, path, query, hdrs, payload, user)
                replies.append(reply)
                failed = reply.status >= 400
            if failed and not keep_going:
                break
        status = 400 if failed and not keep_going else 200
        boundary = f"batchresponse_{uuid.uuid4()}"
        return Reply(status, None, {"Content-Type": f"multipart/mixed; boundary={boundary}",
                                    "_raw": _render_batch(boundary, replies)})


def _lookups(entity: Entity, message: str, parsed: list) -> tuple[list, list]:
    """The primary ids and alternate-key values a bulk request's targets will look up: their keys as
    given, and the ids (as validation normalises them) and keys their payloads set (duplicate checks)."""
    ids, keys = [], []
    for item in parsed:
        if isinstance(item, DataverseError):
            break
        key, data = item
        for name, value in (key or {}).items():
            (ids if name == entity.primary_id else keys).append(value)
        if data.get(LINK_KEY_COLUMN) is not None:
            keys.append(data[LINK_KEY_COLUMN])
        if data.get(entity.primary_id) is not None:
            try:
                ids.append(Store._guid(data[entity.primary_id], entity.primary_id))
            except DataverseError:
                pass  # not an id: the target fails its validation on its turn
    return ids, keys


@dataclass
class _BulkPlan:
    """A bulk message's targets as :meth:`WebApi.prepare_bulk` read them: per target ``(key, payload)`` (or
    the error that stops the request there) and, except for upserts, its validated values (or error)."""

    entity: Entity
    message: str
    parsed: list
    values: list


class _Rollback(Exception):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply


def _cast_name(kind: str) -> str:
    for name, kinds in _ATTR_CAST.items():
        if kind in kinds:
            return name
    return "AttributeMetadata" if kind != "BigInt" else "BigIntAttributeMetadata"


def _option(value: int, label: str, state, kind: str) -> dict:
    out = {"Value": value, "Label": {"LocalizedLabels": [{"Label": label, "LanguageCode": 1033}],
                                     "UserLocalizedLabel": {"Label": label, "LanguageCode": 1033}}}
    if kind == "Status":
        out["State"] = state
    if kind == "State":
        out["DefaultStatus"] = state
    return out


def _split_request(text: str):
    """``POST /api/data/v9.2/contacts HTTP/1.1`` + headers + body -> (method, path, query, headers, body)."""
    head, _, payload = text.partition("\r\n\r\n") if "\r\n\r\n" in text else text.partition("\n\n")
    lines = head.replace("\r\n", "\n").split("\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        raise DataverseError(400, E.PAYLOAD, f"Invalid request line in batch: {lines[0]!r}") from None
    hdrs = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        hdrs[name.strip().lower()] = value.strip()
    parsed = urllib.parse.urlsplit(target)
    path = parsed.path
    idx = path.find(API)
    if idx < 0:
        raise DataverseError(400, E.PAYLOAD, f"Batch request target must be under {API}: {target}")
    query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
    return method.upper(), urllib.parse.unquote(path[idx + len(API):]), query, hdrs, payload.strip().encode()


def _multipart(content_type: str, body: bytes) -> list:
    """Parse a ``multipart/mixed`` batch body into requests (and lists of requests for change sets)."""
    if "multipart/mixed" not in content_type or "boundary" not in content_type:
        raise DataverseError(400, E.PAYLOAD, "A $batch request needs Content-Type multipart/mixed with a boundary.")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise DataverseError(400, E.PAYLOAD, "The $batch body is not a valid multipart/mixed document.")
    out: list = []
    for part in message.iter_parts():
        if part.get_content_type() == "multipart/mixed":
            out.append([_split_request(p.get_payload(decode=True).decode("utf-8")) for p in part.iter_parts()])
        else:
            out.append(_split_request(part.get_payload(decode=True).decode("utf-8")))
    return out


_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 412: "Precondition Failed",
            429: "Too Many Requests", 500: "Internal Server Error"}


def _render_one(reply: Reply) -> str:
    lines = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, '')}", "OData-Version: 4.0"]
    lines += [f"{k}: {v}" for k, v in reply.headers.items() if not k.startswith("_")]
    if reply.body is not None:
        lines.append("Content-Type: application/json; odata.metadata=minimal")
        return "\r\n".join(lines) + "\r\n\r\n" + json.dumps(reply.body, ensure_ascii=False) + "\r\n"
    return "\r\n".join(lines) + "\r\n\r\n"


def _render_batch(boundary: str, replies: list) -> bytes:
    chunks = []
    for reply in replies:
        if isinstance(reply, list):
            inner = f"changesetresponse_{uuid.uuid4()}"
            body = "".join(f"--{inner}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
                           f"{_render_one(r)}" for r in reply) + f"--{inner}--\r\n"
            chunks.append(f"--{boundary}\r\nContent-Type: multipart/mixed; boundary={inner}\r\n\r\n{body}")
        else:
            chunks.append(f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary"
                          f"\r\n\r\n{_render_one(reply)}")
    return ("".join(chunks) + f"--{boundary}--\r\n").encode("utf-8")


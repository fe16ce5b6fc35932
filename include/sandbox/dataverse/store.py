"""SQLite storage of the Dataverse sandbox: rows, row versions, tombstones, validation and security.

Every create/update stamps the row with the next ``versionnumber`` (one counter for the database, like
Dataverse's row version); deletes leave a tombstone with their own version. Change tracking is then a
range read over versions: ``(since, upto]`` for rows, then tombstones. Plain queries page by keyset on the
primary id (fast at a million rows); with ``$orderby`` they page by page number like the real paging cookie.
``$expand`` reads the related rows of a whole page at once. Merges and deletes follow the relationships'
cascade rules (``Column.cascade``): the rows they move or unlink get versions of their own, as changes.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import string
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import sqlalchemy as sa
from odata_query import exceptions as odata_errors
from odata_query.grammar import ODataLexer, ODataParser
from odata_query.sqlalchemy.core import AstToSqlAlchemyCoreVisitor

from . import errors as E
from .errors import DataverseError
from .schema import CHOICE_TYPES, LINK_KEY_COLUMN, LOOKUP_TYPES, STRING_TYPES, Column, Entity, iso_utc, load_schema


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


_ASCII_FOLD = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_CANONICAL_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: values per ``IN (...)`` of a bulk request's lookups
_LOOKUP_CHUNK = 500


def nocase(value: str) -> str:
    """``value`` as SQLite's NOCASE collation compares it: ASCII letters folded, nothing else."""
    return value.lower() if value.isascii() else value.translate(_ASCII_FOLD)


class _FilterVisitor(AstToSqlAlchemyCoreVisitor):
    """odata-query's Core visitor, adjusted to how the sandbox stores values."""

    def __init__(self, entity: Entity, readable) -> None:
        super().__init__(entity.table)
        self.entity = entity
        self.readable = readable

    def visit_Identifier(self, node):
        col = self.entity.column_by_storage(node.name) or (
            self.entity.columns.get(node.name) if node.name == self.entity.primary_id else None)
        if col is None:
            raise DataverseError(400, E.QUERY, f"Could not find a property named '{node.name}' on type "
                                 f"'Microsoft.Dynamics.CRM.{self.entity.logical_name}'.")
        if not self.readable(col.logical_name):
            raise DataverseError(403, E.READ_SECURED, "The user does not have read permissions to a secured "
                                 f"field '{col.logical_name}' of '{self.entity.logical_name}'.")
        return self.table.c[col.storage_name if col.logical_name != self.entity.primary_id else col.logical_name]

    def visit_GUID(self, node):
        return sa.literal(str(node.val).lower())

    def visit_DateTime(self, node):
        return sa.literal(iso_utc(node.py_val))

    def _substr_function(self, field, substr, func):
        # LIKE wildcards in the searched value are data, not patterns.
        return getattr(self.visit(field), func)(substr.py_val, autoescape=True)


def parse_filter(entity: Entity, text: str, readable) -> sa.ColumnElement:
    """Translate an OData ``$filter`` to a SQLAlchemy clause; bad syntax is a 400 with the parser's message."""
    try:
        ast = ODataParser().parse(ODataLexer().tokenize(text))
        return _FilterVisitor(entity, readable).visit(ast)
    except DataverseError:
        raise
    except (odata_errors.ODataException, NotImplementedError, ValueError, TypeError) as exc:
        raise DataverseError(400, E.QUERY, f"Invalid $filter '{text}': {exc}") from exc


class Store:
    """All rows of the sandbox organisation, plus its security settings and business rules."""

    def __init__(self, db_path: Path, field_security_profile_id: str = "00000000-0000-0000-0000-000000000000") -> None:
        self.profile_id = field_security_profile_id
        self.engine = sa.create_engine(f"sqlite:///{db_path}", connect_args={"check_same_thread": False,
                                                                             "timeout": 30})
        sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.metadata = sa.MetaData()
        self.entities = load_schema(self.metadata)
        self.by_set = {e.entity_set: e for e in self.entities.values()}
        self.settings = sa.Table("sandbox_settings", self.metadata, sa.Column("key", sa.String, primary_key=True),
                                 sa.Column("value", sa.String))
        self.metadata.create_all(self.engine)
        self._add_missing_columns()
        self.lock = threading.RLock()  # one writer at a time, like SQLite itself
        self._get_stmt: dict[tuple[str, str], sa.Select] = {}
        self._referencing: dict[str, list] = {}
        self._navigation: dict[str, dict] = {}
        self._now_cache: tuple[int, str] = (0, "")
        with self.engine.connect() as conn:
            versions = [conn.execute(sa.select(sa.func.max(t.c.versionnumber))).scalar() or 0
                        for e in self.entities.values() for t in (e.table, e.deleted)]
        self._version = max(versions)
        self.security = self._load_setting("security", {"secured_columns": {}, "readable": {}, "updatable": {},
                                                        "creatable": {}})
        self.rules = self._load_setting("rules", [])
        self.delta_floor = self._load_setting("delta_floor", 0)
        self.unsupported_messages: dict[str, list[str]] = self._load_setting("unsupported_messages", {})

    def _add_missing_columns(self) -> None:
        """Give a database made by an older sandbox the columns the schema has gained since (``create_all``
        makes missing tables only), so a kept data directory keeps working."""
        inspector = sa.inspect(self.engine)
        with self.engine.begin() as conn:
            for table in self.metadata.sorted_tables:
                have = {c["name"] for c in inspector.get_columns(table.name)}
                for col in table.columns:
                    if col.name not in have:
                        kind = col.type.compile(self.engine.dialect)
                        conn.execute(sa.text(f'ALTER TABLE "{table.name}" ADD COLUMN "{col.name}" {kind}'))

    # settings -------------------------------------------------------------------------------------------
    def _load_setting(self, key: str, default):
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(self.settings.c.value).where(self.settings.c.key == key)).scalar()
        return json.loads(value) if value is not None else default

    def _save_setting(self, key: str, value) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.settings.delete().where(self.settings.c.key == key))
            conn.execute(self.settings.insert(), {"key": key, "value": json.dumps(value)})

    def set_security(self, config: dict) -> None:
        """Replace field-level security: ``secured_columns`` per entity, and which of them the sync user's
        profile may ``readable`` / ``updatable`` / ``creatable`` (create defaults to update)."""
        for part in ("secured_columns", "readable", "updatable", "creatable"):
            for entity, cols in (config.get(part) or {}).items():
                spec = self.entity(entity)
                unknown = [c for c in cols if c not in spec.columns]
                if unknown:
                    raise DataverseError(400, E.QUERY, f"security.{part}.{entity}: unknown columns {unknown}")
        self.security = {p: {k: sorted(v) for k, v in (config.get(p) or {}).items()}
                         for p in ("secured_columns", "readable", "updatable", "creatable")}
        self._save_setting("security", self.security)
        # Mirror the settings as the sync user's field security profile (fieldpermissions rows).
        perms = self.entities["fieldpermission"]
        rows = [{"fieldpermissionid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{e}.{c}")), "entityname": e,
                 "attributelogicalname": c, "_fieldsecurityprofileid_value": self.profile_id,
                 **{f"can{a}": 4 if self.can(a, e, c) else 0 for a in ("read", "update", "create")}}
                for e, cols in self.security["secured_columns"].items() for c in cols]
        with self.lock, self.engine.begin() as conn:
            conn.execute(perms.table.delete())
        self.seed(perms, rows)

    def set_rules(self, rules: list[dict]) -> None:
        """Replace the business rules (see the package docstring for their shape)."""
        for i, rule in enumerate(rules):
            spec = self.entity(rule.get("entity", ""))
            if rule.get("column") not in spec.columns or rule.get("op") not in ("forbid", "require", "match"):
                raise DataverseError(400, E.QUERY, f"rules[{i}]: need entity, a known column and op "
                                     f"forbid|require|match, got {rule}")
        self.rules = rules
        self._save_setting("rules", rules)

    def set_unsupported_messages(self, config: dict) -> None:
        """Mark bulk messages a table doesn't support (``{"contact": ["UpsertMultiple"]}``), as some
        standard tables don't (bulk-operations.md); such requests get the real 404."""
        allowed = {"CreateMultiple", "UpdateMultiple", "UpsertMultiple"}
        for entity, messages in config.items():
            self.entity(entity)
            if not set(messages) <= allowed:
                raise DataverseError(400, E.QUERY, f"messages.{entity}: only {sorted(allowed)} can be switched off")
        self.unsupported_messages = {self.entity(k).logical_name: list(v) for k, v in config.items()}
        self._save_setting("unsupported_messages", self.unsupported_messages)

    def expire_delta_tokens(self) -> None:
        """Make every delta token issued so far expired (the organisation's retention has passed)."""
        with self.lock:
            # Skip a version so links issued from now on (upto >= floor) stay valid and older ones don't.
            self._version += 1
            self.delta_floor = self._version
            self._save_setting("delta_floor", self.delta_floor)

    def reset(self) -> None:
        """Wipe rows, tombstones, rules and security (versions keep counting up, as in a real org)."""
        with self.lock, self.engine.begin() as conn:
            for e in self.entities.values():
                conn.execute(e.table.delete())
                conn.execute(e.deleted.delete())
            conn.execute(self.settings.delete())
        self.security = {"secured_columns": {}, "readable": {}, "updatable": {}, "creatable": {}}
        self.rules = []
        self.delta_floor = 0
        self.unsupported_messages = {}

    # security -------------------------------------------------------------------------------------------
    def is_secured(self, entity: str, column: str) -> bool:
        return column in self.security["secured_columns"].get(entity, [])

    def can(self, action: str, entity: str, column: str) -> bool:
        """Whether the sync user may ``read`` / ``update`` / ``create`` a column (unsecured: always)."""
        if not self.is_secured(entity, column):
            return True
        part = {"read": "readable", "update": "updatable", "create": "creatable"}[action]
        allowed = self.security[part].get(entity)
        if action == "create" and allowed is None:
            allowed = self.security["updatable"].get(entity)
        return column in (allowed or [])

    # lookup ---------------------------------------------------------------------------------------------
    def entity(self, name: str) -> Entity:
        """An entity by logical name or entity set name; unknown ones are a 404 like the real service."""
        spec = self.entities.get(name) or self.by_set.get(name)
        if spec is None:
            raise DataverseError(404, E.QUERY, f"Resource not found for the segment '{name}'.")
        return spec

    def next_version(self, count: int = 1) -> int:
        """Reserve ``count`` row versions; returns the first."""
        with self.lock:
            first = self._version + 1
            self._version += count
            return first

    @property
    def current_version(self) -> int:
        return self._version

    # reads ----------------------------------------------------------------------------------------------
    def select_columns(self, entity: Entity, select: str | None) -> list[str]:
        """Payload names to return for ``$select`` (all readable columns when absent); the id always."""
        if not select:
            names = [c.logical_name for c in entity.columns.values()]
        else:
            names = [s.strip() for s in select.split(",") if s.strip()]
        out = []
        for name in names:
            col = entity.column_by_storage(name) or entity.columns.get(name)
            if col is None:
                raise DataverseError(400, E.QUERY, f"Could not find a property named '{name}' on type "
                                     f"'Microsoft.Dynamics.CRM.{entity.logical_name}'.")
            if col.logical_name != entity.primary_id and self.can("read", entity.logical_name, col.logical_name):
                out.append(col.logical_name)
        return [entity.primary_id] + [n for n in dict.fromkeys(out)]

    def format_row(self, entity: Entity, row, columns: list[str]) -> dict:
        """A row as the Web API returns it: etag, selected values, lookups as ``_x_value``."""
        out = {"@odata.etag": f'W/"{row["versionnumber"]}"'}
        for name in columns:
            col = entity.columns[name]
            key = col.storage_name if name != entity.primary_id else name
            value = row[key]
            if col.type == "Boolean" and value is not None:
                value = bool(value)
            out[key] = value
        return out

    def query(self, entity: Entity, *, select=None, filter=None, orderby=None, top=None, page_size=5000,
              cookie: dict | None = None, count=False, expand=None):
        """One page of a query. Returns ``(rows, next_cookie or None, total or None)``.

        :param expand: a ``$expand`` of single-valued navigation properties (see :meth:`parse_expand`); the
            related rows of the whole page are read with one ``IN (...)`` query per 500 ids.
        """
        columns = self.select_columns(entity, select)
        expands = self.parse_expand(entity, expand) if expand else []
        table = entity.table
        stmt = sa.select(table)
        readable = lambda c: self.can("read", entity.logical_name, c)  # noqa: E731
        if filter:
            stmt = stmt.where(parse_filter(entity, filter, readable))
        total = None
        with self.engine.connect() as conn:
            if count:
                total = conn.execute(sa.select(sa.func.count()).select_from(stmt.subquery())).scalar()
            page = int((cookie or {}).get("page", 1))
            limit = page_size
            if top is not None:
                limit = min(page_size, int(top) - (page - 1) * page_size)
            if orderby:
                stmt = stmt.order_by(*self._order(entity, orderby), table.c[entity.primary_id])
                stmt = stmt.offset((page - 1) * page_size)
            else:
                stmt = stmt.order_by(table.c[entity.primary_id])
                if cookie and cookie.get("last"):
                    stmt = stmt.where(table.c[entity.primary_id] > cookie["last"])
            rows = conn.execute(stmt.limit(limit + 1)).mappings().all()
            more = len(rows) > limit
            rows = rows[:limit]
            out = [self.format_row(entity, r, columns) for r in rows]
            if expands:
                self.expand_rows(expands, rows, out, conn)
        if top is not None and page * page_size >= int(top):
            more = False
        next_cookie = {"page": page + 1, "last": rows[-1][entity.primary_id]} if more and rows else None
        return out, next_cookie, total

    def navigation(self, entity: Entity) -> dict[str, tuple[Column, Entity]]:
        """The single-valued navigation properties of an entity: one per lookup (named after it) or, for a
        lookup that can point at several tables (``Customer``), one per table (``parentcustomerid_account``,
        ``parentcustomerid_contact``); each with its lookup column and the table it leads to."""
        found = self._navigation.get(entity.logical_name)
        if found is None:
            found = {}
            for col in entity.columns.values():
                targets = [t for t in col.targets if t in self.entities] if col.type in LOOKUP_TYPES else []
                for target in targets:
                    name = col.logical_name if len(col.targets) == 1 else f"{col.logical_name}_{target}"
                    found[name] = (col, self.entities[target])
            self._navigation[entity.logical_name] = found
        return found

    def parse_expand(self, entity: Entity, text: str) -> list[tuple[str, Column, Entity, list[str]]]:
        """``parentcustomerid_account($select=name,revenue),originatingleadid`` -> per navigation property
        its name, lookup column, related table and the columns to return (``$select`` inside, or all)."""
        out = []
        for item in _top_level_split(text):
            m = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", item, re.S)
            if not m:
                raise DataverseError(400, E.QUERY, f"Invalid $expand '{text}': cannot read '{item}'.")
            name, options = m.group(1), m.group(2)
            nav = self.navigation(entity).get(name)
            if nav is None:
                raise DataverseError(400, E.QUERY, f"Could not find a property named '{name}' on type "
                                     f"'Microsoft.Dynamics.CRM.{entity.logical_name}'.")
            col, target = nav
            if not self.can("read", entity.logical_name, col.logical_name):
                raise DataverseError(403, E.READ_SECURED, "The user does not have read permissions to a secured "
                                     f"field '{col.logical_name}' of '{entity.logical_name}'.")
            select = None
            for option in (options or "").split(";"):
                key, _, value = option.partition("=")
                if key.strip() == "$select":
                    select = value
                elif option.strip():
                    raise DataverseError(400, E.QUERY, f"$expand={name}(...): the sandbox supports only $select "
                                         f"inside an expansion, got '{option.strip()}'.")
            out.append((name, col, target, self.select_columns(target, select)))
        return out

    def expand_rows(self, expands: list, rows: list, out: list[dict], conn) -> None:
        """Add each expansion to the formatted rows ``out`` (the related row as the Web API nests it, or None
        when the lookup is empty or points at another table), reading the related rows of all ``rows`` (the
        stored mappings behind ``out``) with one ``IN (...)`` query per 500 ids."""
        for name, col, target, columns in expands:
            t, pid = target.table, target.primary_id
            wanted = [t.c[c if c == pid else target.columns[c].storage_name] for c in columns] + [t.c.versionnumber]
            ids = list({r[col.storage_name] for r in rows if r[col.storage_name] is not None})
            related: dict[str, dict] = {}
            for start in range(0, len(ids), _LOOKUP_CHUNK):
                for found in conn.execute(sa.select(*wanted).where(t.c[pid].in_(ids[start:start + _LOOKUP_CHUNK]))
                                          ).mappings():
                    related[found[pid]] = self.format_row(target, found, columns)
            for row, item in zip(rows, out):
                item[name] = related.get(row[col.storage_name])

    def _order(self, entity: Entity, orderby: str):
        clauses = []
        for part in orderby.split(","):
            bits = part.strip().split()
            col = entity.column_by_storage(bits[0]) or entity.columns.get(bits[0])
            if col is None or len(bits) > 2 or (len(bits) == 2 and bits[1].lower() not in ("asc", "desc")):
                raise DataverseError(400, E.QUERY, f"Invalid $orderby clause '{part.strip()}' for "
                                     f"'{entity.logical_name}'.")
            c = entity.table.c[col.storage_name if col.logical_name != entity.primary_id else col.logical_name]
            clauses.append(c.desc() if len(bits) == 2 and bits[1].lower() == "desc" else c.asc())
        return clauses

    def changes(self, entity: Entity, *, select, since: int, upto: int, cursor: dict, page_size: int):
        """One page of a change-tracking read over versions ``(since, upto]``: changed rows, then deletions.

        ``cursor`` is ``{"phase": "rows"|"deleted", "after": version}``. Returns ``(items, next_cursor)``.
        """
        columns = self.select_columns(entity, select)
        phase, after = cursor.get("phase", "rows"), int(cursor.get("after", since))
        items: list[dict] = []
        with self.engine.connect() as conn:
            if phase == "rows":
                t = entity.table
                rows = conn.execute(sa.select(t).where(t.c.versionnumber > after, t.c.versionnumber <= upto)
                                    .order_by(t.c.versionnumber).limit(page_size + 1)).mappings().all()
                if len(rows) > page_size:
                    rows = rows[:page_size]
                    return [self.format_row(entity, r, columns) for r in rows], {
                        "phase": "rows", "after": rows[-1]["versionnumber"]}
                items = [self.format_row(entity, r, columns) for r in rows]
                phase, after = "deleted", since
            if since == 0:
                return items, None  # an initial read has nothing deleted to report
            d = entity.deleted
            room = page_size - len(items)
            gone = conn.execute(sa.select(d).where(d.c.versionnumber > after, d.c.versionnumber <= upto)
                                .order_by(d.c.versionnumber).limit(room + 1)).mappings().all()
        more = len(gone) > room
        gone = gone[:room]
        items += [{"@odata.context": f"$metadata#{entity.entity_set}/$deletedEntity", "id": g["id"],
                   "reason": "deleted"} for g in gone]
        return items, ({"phase": "deleted", "after": gone[-1]["versionnumber"]} if more and gone else None)

    def get(self, entity: Entity, key: dict, conn=None):
        """The stored row for a key (``{primary_id: id}`` or ``{mdsync_marketopersonid: value}``), or None."""
        (name, value), = key.items()
        stmt = self._get_stmt.get((entity.logical_name, name))
        if stmt is None:  # built once per (table, key column); SQLAlchemy caches its compiled form
            stmt = self._get_stmt[entity.logical_name, name] = sa.select(entity.table).where(
                entity.table.c[name] == sa.bindparam("key_value"))
        if conn is not None:
            return conn.execute(stmt, {"key_value": value}).mappings().first()
        with self.engine.connect() as c:
            return c.execute(stmt, {"key_value": value}).mappings().first()

    def _find(self, entity: Entity, key: dict, conn, rows: "BulkRows | None"):
        """:meth:`get` in a transaction, or from a bulk request's :class:`BulkRows` when there is one."""
        return rows.get(key) if rows is not None else self.get(entity, key, conn)

    # validation -----------------------------------------------------------------------------------------
    def coerce(self, entity: Entity, body: dict, *, creating: bool) -> dict:
        """Validate a write payload and turn it into storage values; raises the service's 400/403."""
        values: dict = {}
        ename = entity.logical_name
        for key, value in body.items():
            if key.startswith("@odata.") or "@" in key and not key.endswith("@odata.bind"):
                continue
            if key.endswith("@odata.bind"):
                col, bound = self._bind(entity, key[: -len("@odata.bind")], value)
                self._check_writable(entity, col, col.logical_name, creating)
                values.update(bound)
                continue
            col = entity.column_by_storage(key)
            if col is None or col.type in LOOKUP_TYPES:
                raise DataverseError(400, E.UNKNOWN_PROPERTY, f"An undeclared property '{key}' which only has "
                                     "property annotations in the payload but no property value was found in "
                                     f"the payload. The property does not exist on type "
                                     f"'Microsoft.Dynamics.CRM.{ename}'.")
            if col.logical_name == entity.primary_id:
                values[key] = self._guid(value, key)
                continue
            self._check_writable(entity, col, key, creating)
            if not self.can("create" if creating else "update", ename, col.logical_name):
                raise DataverseError(403, E.UPDATE_SECURED, "The user does not have "
                                     f"{'create' if creating else 'update'} permissions to a secured field "
                                     f"'{col.logical_name}' of '{ename}'. The requested operation could not "
                                     "be completed.")
            values[key] = self._value(entity, col, value)
        for rule in self.rules:
            self._check_rule(entity, rule, values, creating)
        return values

    @staticmethod
    def _check_writable(entity: Entity, col, key: str, creating: bool) -> None:
        """A read-only column (``IsValidForCreate`` / ``IsValidForUpdate`` false) in a write is a 400."""
        if not (col.valid_for_create if creating else col.valid_for_update):
            raise DataverseError(400, E.PAYLOAD, f"The '{key}' attribute of the '{entity.logical_name}' entity is "
                                 f"not valid for {'create' if creating else 'update'}.")

    def _value(self, entity: Entity, col, value):
        ename, name = entity.logical_name, col.logical_name
        if value is None:
            if col.required_level == "SystemRequired":
                raise DataverseError(400, E.VALIDATION, f"A validation error occurred. The value of '{name}' "
                                     f"on record of type '{ename}' is required.")
            return None

        def bad() -> DataverseError:  # made only when raised (this runs for every value written)
            return DataverseError(400, E.PAYLOAD, f"Error identified in Payload provided by the user for Entity "
                                  f":'{entity.entity_set}', Cannot convert the literal '{value}' to the expected "
                                  f"type of '{name}' ({col.type}).")

        if col.type in STRING_TYPES:
            if not isinstance(value, str):
                raise bad()
            if col.max_length is not None and len(value) > col.max_length:
                raise DataverseError(400, E.VALIDATION, f"A validation error occurred.  The length of the "
                                     f"'{name}' attribute of the '{ename}' entity exceeded the maximum allowed "
                                     f"length of '{col.max_length}'.")
            return value
        if col.type == "Boolean":
            if not isinstance(value, bool):
                raise bad()
            return value
        if col.type in CHOICE_TYPES or col.type in ("Integer", "BigInt"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad()
            lo, hi = col.min_value, col.max_value
            if col.type in CHOICE_TYPES and col.options and value not in col.option_values:
                accepted = ". Accepted Values: " + ",".join(str(v) for v in sorted(col.option_values))
            elif (lo is not None and value < lo) or (hi is not None and value > hi):
                accepted = f" ({lo} to {hi})."
            else:
                return value
            raise DataverseError(400, E.VALIDATION, f"A validation error occurred. The value {value} of '{name}' "
                                 f"on record of type '{ename}' is outside the valid range{accepted}")
        if col.type == "Money":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad()
            if (col.min_value is not None and value < col.min_value) or (
                    col.max_value is not None and value > col.max_value):
                raise DataverseError(400, E.VALIDATION, f"A validation error occurred. The value {value} of "
                                     f"'{name}' on record of type '{ename}' is outside the valid range "
                                     f"({col.min_value} to {col.max_value}).")
            return round(float(value), col.precision if col.precision is not None else 4)
        if col.type == "DateTime":
            if not isinstance(value, str):
                raise bad()
            try:
                parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise bad() from None
            return parsed.isoformat() if col.format == "DateOnly" else iso_utc(parsed)
        return value

    @staticmethod
    def _guid(value, name: str) -> str:
        if isinstance(value, str) and _CANONICAL_GUID.fullmatch(value):
            return value  # what str(UUID(value)) gives back
        try:
            return str(uuid.UUID(str(value)))
        except ValueError:
            raise DataverseError(400, E.PAYLOAD, f"Cannot convert the literal '{value}' to the expected type "
                                 f"'Edm.Guid' for '{name}'.") from None

    def _bind(self, entity: Entity, nav: str, value) -> tuple[Column, dict]:
        """``parentcustomerid_account@odata.bind: "/accounts(<id>)"`` -> the lookup column and
        ``{_parentcustomerid_value: id}``."""
        m = re.fullmatch(r"/?(\w+)\(([0-9a-fA-F-]{36})\)", str(value or ""))
        base = nav.split("_")[0] if nav not in entity.columns else nav
        col = entity.columns.get(nav) or entity.columns.get(base)
        if col is None or col.type not in LOOKUP_TYPES or not m:
            raise DataverseError(400, E.UNKNOWN_PROPERTY, f"Invalid navigation property binding '{nav}@odata.bind'"
                                 f" = '{value}' on '{entity.logical_name}'.")
        target = self.entity(m.group(1))
        if self.get(target, {target.primary_id: m.group(2).lower()}) is None:
            raise DataverseError(404, E.NOT_FOUND, f"{target.logical_name} With Id = {m.group(2)} Does Not Exist")
        return col, {col.storage_name: m.group(2).lower()}

    def _check_rule(self, entity: Entity, rule: dict, values: dict, creating: bool) -> None:
        if rule["entity"] not in (entity.logical_name, entity.entity_set):
            return
        col = rule["column"]
        present = col in values
        value = values.get(col)
        message = rule.get("message")
        if rule["op"] == "forbid" and present and value in rule.get("values", []):
            raise DataverseError(400, E.PLUGIN, message or f"Business rule: '{col}' may not be '{value}'.")
        if rule["op"] == "require" and (creating or present) and value in (None, ""):
            raise DataverseError(400, E.PLUGIN, message or f"Business rule: '{col}' is required.")
        if rule["op"] == "match" and present and value is not None and not re.fullmatch(rule["pattern"], str(value)):
            raise DataverseError(400, E.PLUGIN, message or f"Business rule: '{col}' value '{value}' does not match "
                                 f"{rule['pattern']}.")

    # writes ---------------------------------------------------------------------------------------------
    def _now(self) -> str:
        """``modifiedon`` / ``createdon`` of a write now (second resolution, formatted once a second)."""
        second = int(time.time())
        if self._now_cache[0] != second:
            self._now_cache = (second, iso_utc(dt.datetime.fromtimestamp(second, dt.timezone.utc)))
        return self._now_cache[1]

    def _stamp(self, entity: Entity, values: dict, current=None) -> dict:
        now = self._now()
        values["versionnumber"] = self.next_version()
        values["modifiedon"] = now
        if current is None:
            values.setdefault("createdon", now)
            values.setdefault("statecode", 0)
            values.setdefault("statuscode", _default_status(entity, values["statecode"]))
            if "merged" in entity.columns:  # DefaultValue False in the entity reference
                values.setdefault("merged", False)
        if entity.primary_name == "fullname" and ("firstname" in values or "lastname" in values):
            def merged(name):
                if name in values:
                    return values[name]
                return current[name] if current is not None and name in current else None
            values["fullname"] = " ".join(p for p in (merged("firstname"), merged("lastname")) if p)
        return values

    def create(self, entity: Entity, body: dict, conn, *, values: dict | None = None,
               rows: "BulkRows | None" = None) -> str:
        """Insert one row in an open transaction; returns its id. With ``rows`` (a bulk request), the
        duplicate checks read from it and the insert is queued there."""
        values = values if values is not None else self.coerce(entity, body, creating=True)
        row_id = values.get(entity.primary_id)
        if not row_id:
            row_id = str(uuid.uuid4())  # a new id: nothing can have it yet
        elif self._find(entity, {entity.primary_id: row_id}, conn, rows) is not None:
            raise DataverseError(412, E.DUPLICATE_KEY, "A record with matching key values already exists.")
        values[entity.primary_id] = row_id
        key = values.get(LINK_KEY_COLUMN)
        if key is not None and self._find(entity, {LINK_KEY_COLUMN: key}, conn, rows) is not None:
            raise DataverseError(412, E.DUPLICATE_KEY, "A record with matching key values already exists.")
        if "statecode" in values or "statuscode" in values:
            _check_state(entity, values, None, row_id)
        stamped = self._stamp(entity, values)
        if rows is not None:
            rows.insert(stamped)
        else:
            conn.execute(entity.table.insert(), stamped)
        return row_id

    def update(self, entity: Entity, current, body: dict, conn, *, values: dict | None = None,
               rows: "BulkRows | None" = None) -> str:
        """Update one existing row (``current`` is its stored mapping) in an open transaction. With ``rows``
        (a bulk request), the duplicate check reads from it and the update is queued there."""
        values = values if values is not None else self.coerce(entity, body, creating=False)
        values.pop(entity.primary_id, None)
        key = values.get(LINK_KEY_COLUMN)
        if key is not None and key != current[LINK_KEY_COLUMN]:
            other = self._find(entity, {LINK_KEY_COLUMN: key}, conn, rows)
            if other is not None and other[entity.primary_id] != current[entity.primary_id]:
                raise DataverseError(412, E.DUPLICATE_KEY, "A record with matching key values already exists.")
        row_id = current[entity.primary_id]
        if "statecode" in values or "statuscode" in values:
            _check_state(entity, values, current, row_id)
        stamped = self._stamp(entity, values, current)
        if rows is not None:
            rows.update(row_id, stamped)
        else:
            conn.execute(entity.table.update().where(entity.table.c[entity.primary_id] == row_id), stamped)
        return row_id

    def delete(self, entity: Entity, row_id: str, conn) -> None:
        """Delete a row and leave a tombstone for delta reads; rows pointing at it follow their relationship's
        delete behaviour (``Cascade``: deleted too, e.g. an account's contacts; ``RemoveLink``: the lookup
        cleared, which changes them)."""
        self._delete_rows(entity, [row_id], conn)

    def _delete_rows(self, entity: Entity, ids: list[str], conn) -> None:
        t, pid = entity.table, entity.primary_id
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            conn.execute(t.delete().where(t.c[pid].in_(ids[start:start + _LOOKUP_CHUNK])))
        first = self.next_version(len(ids))
        conn.execute(entity.deleted.insert(), [{"id": i, "versionnumber": first + n} for n, i in enumerate(ids)])
        for other, col, rule in self.referencing(entity):
            children = self._pointing_at(other, col, ids, conn)
            if children and rule["delete"] == "Cascade":
                self._delete_rows(other, children, conn)
            elif children:
                self.relink(other, col, children, None, conn)

    def referencing(self, entity: Entity) -> list[tuple[Entity, Column, dict]]:
        """The lookups that can point at rows of ``entity``, with their relationship's cascade rules."""
        found = self._referencing.get(entity.logical_name)
        if found is None:
            found = self._referencing[entity.logical_name] = [
                (other, col, col.cascade[entity.logical_name]) for other in self.entities.values()
                for col in other.columns.values() if entity.logical_name in col.cascade]
        return found

    def _pointing_at(self, entity: Entity, col: Column, ids: list[str], conn) -> list[str]:
        """Ids of the rows of ``entity`` whose lookup ``col`` names one of ``ids`` (but not those rows
        themselves: a record's link to itself moves or goes with it)."""
        t, pid = entity.table, entity.primary_id
        out: list[str] = []
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start:start + _LOOKUP_CHUNK]
            out += conn.execute(sa.select(t.c[pid]).where(t.c[col.storage_name].in_(chunk),
                                                          t.c[pid].not_in(chunk))).scalars().all()
        return out

    def relink(self, entity: Entity, col: Column, ids: list[str], value: str | None, conn) -> None:
        """Point the lookup ``col`` of rows ``ids`` at ``value`` (None: clear it); each row gets a new version
        and ``modifiedon``, so delta reads report it changed, as the platform's own cascades do."""
        if not ids:
            return
        t = entity.table
        first, now = self.next_version(len(ids)), self._now()
        conn.execute(t.update().where(t.c[entity.primary_id] == sa.bindparam("_sandbox_row_id")),
                     [{"_sandbox_row_id": i, col.storage_name: value, "versionnumber": first + n, "modifiedon": now}
                      for n, i in enumerate(ids)])

    def merge_children(self, entity: Entity, subordinate_id: str, target_id: str, conn) -> None:
        """Move the rows pointing at a merged subordinate to its target, for each relationship whose merge
        behaviour is ``Cascade`` (a merged account's contacts, a merged contact's leads ...)."""
        for other, col, rule in self.referencing(entity):
            if rule["merge"] == "Cascade":
                moved = [i for i in self._pointing_at(other, col, [subordinate_id], conn) if i != target_id]
                self.relink(other, col, moved, target_id, conn)

    def seed(self, entity: Entity, rows: list[dict]) -> list[str]:
        """Bulk insert (executemany) trusting the admin caller; each row still gets a version, so seeded rows
        appear in a later delta read like any create."""
        if not rows:
            return []
        names = {k for r in rows for k in r}
        unknown = sorted(n for n in names if entity.column_by_storage(n) is None and n != entity.primary_id)
        if unknown:
            raise DataverseError(400, E.UNKNOWN_PROPERTY, f"seed {entity.entity_set}: unknown columns {unknown}")
        now = iso_utc(utcnow())
        with self.lock:
            first = self.next_version(len(rows))
            prepared = []
            for i, r in enumerate(rows):
                v = {n: r.get(n) for n in names}
                v[entity.primary_id] = str(r.get(entity.primary_id) or uuid.uuid4())
                v["versionnumber"] = first + i
                v["createdon"] = r.get("createdon") or now
                v["modifiedon"] = r.get("modifiedon") or now
                v["statecode"] = r.get("statecode", 0)
                v["statuscode"] = r.get("statuscode") or _default_status(entity, v["statecode"])
                if "merged" in entity.columns:
                    v["merged"] = bool(r.get("merged", False))
                if entity.primary_name == "fullname" and "fullname" not in r:
                    v["fullname"] = " ".join(p for p in (r.get("firstname"), r.get("lastname")) if p) or None
                prepared.append(v)
            with self.engine.begin() as conn:
                conn.execute(entity.table.insert(), prepared)
        return [p[entity.primary_id] for p in prepared]

    def count(self, entity: Entity) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(entity.table)).scalar()


class BulkRows:
    """Row lookups and writes of one bulk request (``CreateMultiple`` / ``UpdateMultiple`` / ``UpsertMultiple``).

    Row by row, a 1000-target request costs one SELECT per target (two when it sets the alternate key) and
    one INSERT/UPDATE per row. Here the request's keys are read up front with one ``IN (...)`` SELECT per key
    column (:meth:`prefetch`), and writes are queued and sent in order at the end (:meth:`flush`), one
    executemany per run of writes of the same kind and column set. Lookups see the request's own queued
    writes (a later target finds the row an earlier one created or re-keyed), so outcomes, errors and row
    versions are those of writing row by row. Alternate keys compare as SQLite's NOCASE index does. A key
    that was not prefetched is read from the database after the queue is flushed. Runs inside the request's
    transaction and the store's write lock.
    """

    def __init__(self, entity: Entity, conn) -> None:
        self.entity, self.conn = entity, conn
        self.pid = entity.primary_id
        self.by_id: dict[str, dict | None] = {}  # primary id -> row (None: no such row)
        self.by_key: dict[str, str | None] = {}  # NOCASE alternate key -> primary id (None: no such row)
        self.pending: list[tuple[str, dict]] = []
        #: the columns a bulk write consults of an existing row (ids, key, version, state, what the full
        #: name is made of): rows are read with these only, not all hundred-odd columns
        t = entity.table
        self.columns = [t.c[n] for n in dict.fromkeys([self.pid, LINK_KEY_COLUMN, "versionnumber", "statecode",
                                                       "statuscode", "firstname", "lastname"]) if n in t.c]
        self._blank = {c.name: None for c in self.columns}

    def prefetch(self, ids, keys) -> None:
        """Read the rows with these primary ids and alternate-key values (one SELECT per 500 values)."""
        ids = [v for v in dict.fromkeys(ids) if isinstance(v, str) and v not in self.by_id]
        keys = [v for v in dict.fromkeys(keys) if isinstance(v, str) and nocase(v) not in self.by_key] \
            if self.entity.has_link_key else []
        self._read(self.pid, ids)
        self._read(LINK_KEY_COLUMN, keys)

    def _read(self, name: str, values: list[str]) -> None:
        t = self.entity.table
        for start in range(0, len(values), _LOOKUP_CHUNK):
            chunk = values[start:start + _LOOKUP_CHUNK]
            result = self.conn.execute(sa.select(*self.columns).where(t.c[name].in_(chunk)))
            names = list(result.keys())
            for found in result:
                self._remember(dict(zip(names, found)))
            for value in chunk:  # what the SELECT did not return does not exist
                if name == self.pid:
                    self.by_id.setdefault(value, None)
                else:
                    self.by_key.setdefault(nocase(value), None)

    def _remember(self, row: dict) -> None:
        if self.by_id.get(row[self.pid]) is not None:
            return  # already known (and possibly changed by this request)
        self.by_id[row[self.pid]] = row
        key = row.get(LINK_KEY_COLUMN)
        if isinstance(key, str):
            self.by_key[nocase(key)] = row[self.pid]

    def get(self, key: dict) -> dict | None:
        """The row for ``{primary_id: id}`` or ``{mdsync_marketopersonid: value}`` as this request left it."""
        (name, value), = key.items()
        if name == self.pid and isinstance(value, str):
            if value not in self.by_id:
                self.flush()
                self._read(name, [value])
            return self.by_id[value]
        if name == LINK_KEY_COLUMN and isinstance(value, str):
            if nocase(value) not in self.by_key:
                self.flush()
                self._read(name, [value])
            row_id = self.by_key[nocase(value)]
            return self.by_id[row_id] if row_id is not None else None
        self.flush()  # an unusual key (not text): ask the database, as a single write would
        t = self.entity.table
        found = self.conn.execute(sa.select(*self.columns).where(t.c[name] == value)).mappings().first()
        if found is None:
            return None
        self._remember(dict(found))
        return self.by_id[found[self.pid]]

    def insert(self, values: dict) -> None:
        self.pending.append(("insert", values))
        self.by_id[values[self.pid]] = row = {**self._blank, **{k: values.get(k) for k in self._blank}}
        if isinstance(row.get(LINK_KEY_COLUMN), str):
            self.by_key[nocase(row[LINK_KEY_COLUMN])] = row[self.pid]

    def update(self, row_id: str, values: dict) -> None:
        self.pending.append(("update", {**values, "_sandbox_row_id": row_id}))
        row = self.by_id.get(row_id)
        if row is None:  # not looked up through this object (callers do): read it before it changes
            self.flush()
            self._read(self.pid, [row_id])
            row = self.by_id[row_id]
        if LINK_KEY_COLUMN in values:
            old = row.get(LINK_KEY_COLUMN)
            if isinstance(old, str) and self.by_key.get(nocase(old)) == row_id:
                self.by_key[nocase(old)] = None
            if isinstance(values[LINK_KEY_COLUMN], str):
                self.by_key[nocase(values[LINK_KEY_COLUMN])] = row_id
        row.update((k, v) for k, v in values.items() if k in self._blank)

    def flush(self) -> None:
        """Send the queued writes in order: one executemany per run of the same kind and column set."""
        t = self.entity.table
        pending, self.pending = self.pending, []
        start = 0
        for end in range(1, len(pending) + 1):
            kind, params = pending[start]
            if end < len(pending) and pending[end][0] == kind and pending[end][1].keys() == params.keys():
                continue
            run = [p for _k, p in pending[start:end]]
            if kind == "insert":
                self.conn.execute(t.insert(), run)
            else:
                self.conn.execute(t.update().where(t.c[self.pid] == sa.bindparam("_sandbox_row_id")), run)
            start = end


def _top_level_split(text: str) -> list[str]:
    """Split on the commas that are not inside parentheses (``a($select=x,y),b`` -> ``a($select=x,y)``, ``b``)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _check_state(entity: Entity, values: dict, current, row_id: str) -> None:
    """Complete and check a write's state / status pair against the entity's State and Status options: a
    new ``statecode`` alone takes its default status reason (as SetState does), and a ``statuscode`` must be
    one of its state's (the new one, or the row's current one when the write leaves the state alone)."""
    state = values.get("statecode", current["statecode"] if current is not None else 0)
    status = values.get("statuscode")
    if status is None:
        values["statuscode"] = _default_status(entity, state)
        return
    status_col, state_col = entity.columns.get("statuscode"), entity.columns.get("statecode")
    owner = next((s for v, _label, s in (status_col.options if status_col else []) if v == status), None)
    if owner is not None and owner != state:
        label = next((lab for v, lab, _d in (state_col.options if state_col else []) if v == state), str(state))
        kind = entity.logical_name[:1].upper() + entity.logical_name[1:]
        raise DataverseError(400, E.INVALID_STATE, f"{status} is not a valid status code for state code "
                             f"{kind}State.{label.replace(' ', '')} on {entity.logical_name} with Id {row_id}.")


def _default_status(entity: Entity, state: int) -> int | None:
    """The default status reason of a state, from the entity reference's State options."""
    col = entity.columns.get("statecode")
    for value, _label, default_status in (col.options if col else []):
        if value == state and default_status is not None:
            return default_status
    return 1 if state == 0 else None


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA cache_size=-65536")
    cur.close()


def encode_cookie(data: dict, tracking: bool) -> str:
    """A paging cookie shaped like Dataverse's ``$skiptoken`` (``<cookie pagenumber=... pagingcookie=...>``)."""
    inner = urllib.parse.quote(json.dumps(data, separators=(",", ":")))
    return f'<cookie pagenumber="{data.get("page", 1)}" pagingcookie="{inner}" istracking="{tracking}" />'


def decode_cookie(token: str) -> tuple[dict, bool]:
    """Read back a cookie made by :func:`encode_cookie`; anything else is a 400."""
    m = re.fullmatch(r'<cookie pagenumber="\d+" pagingcookie="([^"]*)" istracking="(True|False)" />', token or "")
    if not m:
        raise DataverseError(400, E.QUERY, f"Invalid $skiptoken: {token!r}")
    try:
        return json.loads(urllib.parse.unquote(m.group(1))), m.group(2) == "True"
    except ValueError:
        raise DataverseError(400, E.QUERY, f"Invalid $skiptoken: {token!r}") from None

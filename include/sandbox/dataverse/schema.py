"""The sandbox's tables: column catalogue (``schema.json``) turned into SQLAlchemy Core tables.

Each entity gets its row table (lookups stored as ``_<name>_value`` like the Web API names them, a
``versionnumber`` index for change tracking, a unique alternate-key index on ``mdsync_marketopersonid``)
and a tombstone table ``<entity>_deleted`` so deletions show up in delta reads as ``$deletedEntity`` rows.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

LINK_KEY_COLUMN = "mdsync_marketopersonid"
LINK_KEY_NAME = "mdsync_marketopersonid_key"
STRING_TYPES = {"String", "Memo"}
CHOICE_TYPES = {"Picklist", "State", "Status"}
LOOKUP_TYPES = {"Lookup", "Customer", "Owner"}


def iso_utc(value: dt.datetime) -> str:
    """Format a datetime as the Web API does: UTC, second resolution, ``Z`` suffix."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class UtcText(sa.types.TypeDecorator):
    """Datetimes stored as sortable ISO-8601 UTC text so range filters and ``$orderby`` work in SQLite."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if isinstance(value, dt.datetime):
            return iso_utc(value)
        if isinstance(value, dt.date):
            return value.isoformat()
        return value


@dataclass
class Column:
    """One column of an entity, as the entity reference describes it."""

    logical_name: str
    type: str
    required_level: str = "None"
    valid_for_create: bool = True
    valid_for_update: bool = True
    valid_for_read: bool = True
    max_length: int | None = None
    min_value: int | None = None
    max_value: int | None = None
    precision: int | None = None  # Money: decimal places kept
    options: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    format: str | None = None
    custom: bool = False
    #: for lookups: per referenced entity, what a ``merge`` / ``delete`` of the referenced row does to rows
    #: pointing at it (``Cascade``, ``NoCascade``, ``RemoveLink``, ``Restrict``), from the relationships
    cascade: dict = field(default_factory=dict)

    @property
    def storage_name(self) -> str:
        """Name of the SQL column and of the property in Web API payloads (``_x_value`` for lookups)."""
        return f"_{self.logical_name}_value" if self.type in LOOKUP_TYPES else self.logical_name

    @functools.cached_property
    def option_values(self) -> set[int]:
        return {int(o[0]) for o in self.options}


@dataclass
class Entity:
    """One table: its names, its columns and its SQLAlchemy tables."""

    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str | None
    columns: dict[str, Column]
    table: sa.Table
    deleted: sa.Table
    #: ``EntityKeyIndexStatus`` of the alternate key on the link column (``Active``, ``Pending``, ``InProgress``,
    #: ``Failed``), or ``None`` when the table has no such key (admin ``PUT /_sandbox/keys``)
    link_key_status: str | None = "Active"

    @property
    def has_link_key(self) -> bool:
        """Whether the link column exists and its alternate key is usable (its index active)."""
        return LINK_KEY_COLUMN in self.columns and self.link_key_status == "Active"

    def column_by_storage(self, name: str) -> Column | None:
        """Find a column by its payload name (``_parentcustomerid_value`` or ``firstname``)."""
        col = self.columns.get(name)
        if col is not None and col.type not in LOOKUP_TYPES:
            return col
        if name.startswith("_") and name.endswith("_value"):
            col = self.columns.get(name[1:-6])
            if col is not None and col.type in LOOKUP_TYPES:
                return col
        return None


def _sql_type(col: Column):
    if col.type in STRING_TYPES:
        return sa.String(collation="NOCASE")  # Dataverse compares text case-insensitively
    if col.type in CHOICE_TYPES or col.type in ("Integer", "BigInt"):
        return sa.Integer
    if col.type == "Boolean":
        return sa.Boolean(create_constraint=False)
    if col.type == "DateTime":
        return UtcText
    if col.type == "Money":
        return sa.Float
    return sa.String  # Uniqueidentifier, lookups


def _system_column(name: str, kind: str, **extra) -> dict:
    return {"logical_name": name, "type": kind, "valid_for_create": True, "valid_for_update": True, **extra}


_PERMISSION = [[0, "Not Allowed", None], [4, "Allowed", None]]
# Field security tables (column-level-security.md): the sync user's profile and its field permissions.
SYSTEM_ENTITIES = {
    "fieldpermission": {
        "entity_set": "fieldpermissions", "primary_id": "fieldpermissionid", "primary_name": None,
        "columns": [
            _system_column("fieldpermissionid", "Uniqueidentifier"),
            _system_column("entityname", "String", max_length=128),
            _system_column("attributelogicalname", "String", max_length=128),
            _system_column("canread", "Picklist", options=_PERMISSION),
            _system_column("canupdate", "Picklist", options=_PERMISSION),
            _system_column("cancreate", "Picklist", options=_PERMISSION),
            _system_column("fieldsecurityprofileid", "Lookup", targets=["fieldsecurityprofile"]),
            _system_column("versionnumber", "BigInt", valid_for_create=False, valid_for_update=False),
            _system_column("createdon", "DateTime", valid_for_create=False, valid_for_update=False),
            _system_column("modifiedon", "DateTime", valid_for_create=False, valid_for_update=False),
            _system_column("statecode", "State", valid_for_create=False, options=[[0, "Active", 1]]),
            _system_column("statuscode", "Status", options=[[1, "Active", 0]]),
        ],
    },
}


def load_schema(metadata: sa.MetaData, path: Path | None = None) -> dict[str, Entity]:
    """Build the entities from ``schema.json`` plus the field-security tables; keyed by logical name."""
    raw = json.loads((path or Path(__file__).with_name("schema.json")).read_text(encoding="utf-8"))
    raw.update(SYSTEM_ENTITIES)
    entities: dict[str, Entity] = {}
    for name, spec in raw.items():
        columns = {c["logical_name"]: Column(**c) for c in spec["columns"]}
        sql_cols = []
        for col in columns.values():
            if col.logical_name == spec["primary_id"]:
                sql_cols.append(sa.Column(col.logical_name, sa.String, primary_key=True))
            else:
                sql_cols.append(sa.Column(col.storage_name, _sql_type(col)))
        table = sa.Table(name, metadata, *sql_cols)
        sa.Index(f"ix_{name}_versionnumber", table.c.versionnumber, unique=True)
        sa.Index(f"ix_{name}_modifiedon", table.c.modifiedon)
        if "emailaddress1" in table.c:
            sa.Index(f"ix_{name}_emailaddress1", table.c.emailaddress1)
        if LINK_KEY_COLUMN in table.c:
            sa.Index(f"ix_{name}_{LINK_KEY_NAME}", table.c[LINK_KEY_COLUMN], unique=True)
        deleted = sa.Table(
            f"{name}_deleted", metadata,
            sa.Column("id", sa.String, nullable=False),
            sa.Column("versionnumber", sa.Integer, primary_key=True),
        )
        entities[name] = Entity(name, spec["entity_set"], spec["primary_id"], spec.get("primary_name"),
                                columns, table, deleted)
    return entities

"""Load and validate the sync config (entities, field maps, directions, value maps, value rules, collision policy,
delete policy, record-level sync filter).

The config is read in one place: :func:`load_config`. Every problem is reported as a
:class:`~mdsync.errors.ConfigError` that names the file, the entry and the problem, e.g.
``sync.yaml: entities.lead.fields[3] (first_name): direction 'sideways' is not one of both, to_marketo, to_dynamics``.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mdsync.errors import ConfigError

#: The shipped config; ``MDSYNC_CONFIG`` points elsewhere.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "config" / "sync.yaml"

ENTITY_TYPES = ("lead", "contact")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Direction(str, Enum):
    BOTH = "both"
    TO_MARKETO = "to_marketo"
    TO_DYNAMICS = "to_dynamics"


class FieldType(str, Enum):
    STRING = "string"
    EMAIL = "email"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    DATETIME = "datetime"
    PICKLIST = "picklist"


class ValueRule(str, Enum):
    """A rule on a field's values that overrides the three-way diff and the collision winner."""

    #: consent flags (true = opted out, on both sides): an opt-out on either side wins over an opt-in
    #: (see :mod:`mdsync.resolve`); boolean fields that sync both ways only.
    OPT_OUT_WINS = "opt_out_wins"


class Side(str, Enum):
    MARKETO = "marketo"
    DYNAMICS = "dynamics"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class FieldMap(_Strict):
    """One synced field: its canonical name, both sides' names, type, direction and value map."""

    name: str = Field(min_length=1, pattern=r"^[a-z][a-z0-9_]*$")
    marketo: str = Field(min_length=1)
    dynamics: str = Field(min_length=1)
    type: FieldType = FieldType.STRING
    direction: Direction = Direction.BOTH
    #: picklists: Dataverse option value -> Marketo label
    values: dict[int, str] | None = None
    #: a value rule, e.g. ``opt_out_wins`` on consent flags
    rule: ValueRule | None = None

    @model_validator(mode="after")
    def _rule(self) -> "FieldMap":
        if self.rule is ValueRule.OPT_OUT_WINS:
            if self.type is not FieldType.BOOLEAN:
                raise ValueError(
                    f"rule 'opt_out_wins' is only for boolean fields (true = opted out on both sides), "
                    f"not on type {self.type.value!r}"
                )
            if self.direction is not Direction.BOTH:
                raise ValueError(
                    f"rule 'opt_out_wins' syncs an opt-out both ways: direction must be 'both', "
                    f"not {self.direction.value!r}"
                )
        return self

    @property
    def opt_out_wins(self) -> bool:
        """Whether this is a consent flag whose opt-out (true) on either side wins."""
        return self.rule is ValueRule.OPT_OUT_WINS

    @model_validator(mode="after")
    def _value_map(self) -> "FieldMap":
        if self.type is FieldType.PICKLIST:
            if not self.values:
                raise ValueError("a picklist needs a 'values' map (Dataverse option value -> Marketo label)")
            seen: dict[str, int] = {}
            for option, label in self.values.items():
                if label in seen:
                    raise ValueError(
                        f"value map is not one-to-one: label {label!r} is mapped from both "
                        f"{seen[label]} and {option}"
                    )
                seen[label] = option
        elif self.values is not None:
            raise ValueError(f"'values' is only allowed on picklist fields, not on type {self.type.value!r}")
        return self

    def flows_to(self, side: Side) -> bool:
        """Whether values of this field may be written to ``side``."""
        if self.direction is Direction.BOTH:
            return True
        return (self.direction is Direction.TO_MARKETO) == (side is Side.MARKETO)

    @property
    def flows_to_marketo(self) -> bool:
        return self.flows_to(Side.MARKETO)

    @property
    def flows_to_dynamics(self) -> bool:
        return self.flows_to(Side.DYNAMICS)


# -- the record-level sync filter: an OData condition evaluated on extracted frames ------------------------

@dataclass(frozen=True)
class Column:
    """A column named in a sync-filter condition."""

    name: str


@dataclass(frozen=True)
class Literal:
    """A literal in a sync-filter condition: None (``null``), bool, int, float or str."""

    value: Any


@dataclass(frozen=True)
class Comparison:
    """``left op right``; ``op`` is one of :data:`COMPARISONS`."""

    op: str
    left: Union[Column, Literal]
    right: Union[Column, Literal]


@dataclass(frozen=True)
class BoolOp:
    """``left and right`` / ``left or right``."""

    op: str
    left: "Condition"
    right: "Condition"


@dataclass(frozen=True)
class Not:
    operand: "Condition"


Condition = Union[Comparison, BoolOp, Not]
#: the comparison operators a sync-filter condition may use
COMPARISONS = ("eq", "ne", "gt", "ge", "lt", "le")


def condition_columns(node: Condition) -> list[str]:
    """The columns a condition reads, in the order they appear (each once)."""
    if isinstance(node, Comparison):
        found = [side.name for side in (node.left, node.right) if isinstance(side, Column)]
    elif isinstance(node, BoolOp):
        found = condition_columns(node.left) + condition_columns(node.right)
    else:
        found = condition_columns(node.operand)
    return list(dict.fromkeys(found))


def condition_literals(node: Condition) -> list[tuple[str, Literal]]:
    """``(column, literal)`` for every comparison of a column with a literal (for type checks on metadata)."""
    if isinstance(node, BoolOp):
        return condition_literals(node.left) + condition_literals(node.right)
    if isinstance(node, Not):
        return condition_literals(node.operand)
    pairs = [(node.left, node.right), (node.right, node.left)]
    return [(c.name, v) for c, v in pairs if isinstance(c, Column) and isinstance(v, Literal)]


@functools.lru_cache(maxsize=64)
def parse_condition(text: str) -> Condition:
    """Parse a sync-filter condition: the documented subset of OData ``$filter``.

    Supported: ``eq ne gt ge lt le``, ``and or not``, parentheses, ``null``, string (``'O''Brien'``), number
    and ``true``/``false`` literals, and plain column names on either side. Anything else (functions such as
    ``contains``, ``in``, arithmetic, navigation ``a/b``, GUID and date literals, lambdas) is refused.

    :raises ValueError: naming what is wrong and where, so the config error points at it.
    """
    from odata_query import ast
    from odata_query.exceptions import ODataException, ParsingException, TokenizingException
    from odata_query.grammar import ODataLexer, ODataParser

    try:
        tree = ODataParser().parse(ODataLexer().tokenize(text))
    except (TokenizingException, ParsingException) as exc:
        token = getattr(exc, "token", None)
        if token is None:
            raise ValueError(f"condition {text!r} is not a valid OData condition: it ends too early") from None
        raise ValueError(f"condition {text!r} is not a valid OData condition: unexpected {token.value!r} at "
                         f"character {token.index + 1}") from None
    except ODataException as exc:
        raise ValueError(f"condition {text!r} is not a valid OData condition: {exc}") from None
    if tree is None:
        raise ValueError("the condition is empty; write one (e.g. statecode eq 0) or set it to null")

    comparators = {ast.Eq: "eq", ast.NotEq: "ne", ast.Gt: "gt", ast.GtE: "ge", ast.Lt: "lt", ast.LtE: "le"}
    literals = {ast.Null: None, ast.Boolean: bool, ast.Integer: int, ast.Float: float, ast.String: str}

    def unsupported(node) -> ValueError:
        what = {ast.Call: lambda n: f"the function {n.func.full_name()}()",
                ast.Attribute: lambda n: "navigation (a/b)",
                ast.BinOp: lambda n: f"arithmetic ({type(n.op).__name__.lower()})",
                ast.CollectionLambda: lambda n: "any()/all()",
                ast.List: lambda n: "a list"}.get(type(node))
        if isinstance(node, ast.Compare) and isinstance(node.comparator, ast.In):
            name = "'in' (write a eq 1 or a eq 2)"
        elif what is not None:
            name = what(node)
        elif isinstance(node, ast._Literal):
            name = f"{type(node).__name__} literals ({getattr(node, 'val', '')})"
        else:
            name = type(node).__name__
        return ValueError(f"condition {text!r} uses {name}, which the sync filter does not support; supported are "
                          "eq ne gt ge lt le, and or not, parentheses, null, strings, numbers, true/false and "
                          "column names")

    def operand(node) -> Column | Literal:
        if isinstance(node, ast.Identifier):
            if node.namespace:
                raise unsupported(node)
            return Column(node.name)
        if type(node) in literals:
            kind = literals[type(node)]
            return Literal(None if kind is None else node.py_val)
        if isinstance(node, (ast.Compare, ast.BoolOp, ast.UnaryOp)):
            raise ValueError(f"condition {text!r}: a comparison cannot compare a condition; put parentheses "
                             "around each comparison (e.g. not (statecode eq 1))")
        raise unsupported(node)

    def convert(node) -> Condition:
        if isinstance(node, ast.BoolOp):
            return BoolOp("and" if isinstance(node.op, ast.And) else "or", convert(node.left), convert(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return Not(convert(node.operand))
        if isinstance(node, ast.Compare):
            if type(node.comparator) not in comparators:
                raise unsupported(node)
            op, left, right = comparators[type(node.comparator)], operand(node.left), operand(node.right)
            if isinstance(left, Literal) and isinstance(right, Literal):
                raise ValueError(f"condition {text!r} compares two literals; compare a column")
            for side in (left, right):
                if isinstance(side, Literal) and op not in ("eq", "ne") and (side.value is None or isinstance(side.value, bool)):
                    raise ValueError(f"condition {text!r}: {'null' if side.value is None else 'true/false'} can "
                                     f"only be compared with eq or ne, not {op}")
            return Comparison(op, left, right)
        if isinstance(node, (ast.Identifier, ast._Literal)):
            raise ValueError(f"condition {text!r} is not a comparison; compare the column (e.g. donotemail eq true)")
        raise unsupported(node)

    return convert(tree)


class DeletePolicy(str, Enum):
    """What a delete on one side of a linked pair does to the other side (DESIGN §3)."""

    #: the link is dropped and the other side's record is flagged (the native sync's "Deleted in ..." flag)
    FLAG = "flag"
    #: the other side's record is deleted too (Dataverse: or deactivated), unless it changed since the last sync
    PROPAGATE = "propagate"
    #: the link is dropped, the other side's record is left as it is
    UNLINK = "unlink"


class DynamicsDeleteAction(str, Enum):
    """How ``propagate`` removes a Dataverse record whose Marketo person was deleted."""

    DELETE = "delete"
    #: statecode/statuscode set to inactive (contact: Inactive; lead: Disqualified / Canceled)
    DEACTIVATE = "deactivate"


class DeleteSettings(_Strict):
    """``entities.<type>.deletes``: the delete policy of one entity type."""

    policy: DeletePolicy = DeletePolicy.FLAG
    dynamics_action: DynamicsDeleteAction = DynamicsDeleteAction.DELETE
    #: a record whose partner was deleted may get a new partner created from it again (default: never)
    recreate: bool = False

    @model_validator(mode="after")
    def _action(self) -> "DeleteSettings":
        if self.dynamics_action is DynamicsDeleteAction.DEACTIVATE and self.policy is not DeletePolicy.PROPAGATE:
            raise ValueError(f"dynamics_action 'deactivate' applies to policy 'propagate' only, not to "
                             f"{self.policy.value!r}")
        return self


#: the shipped filter: inactive (``statecode`` != 0) leads and contacts are out of scope
DEFAULT_CONDITION = "statecode eq 0"


class SyncFilter(_Strict):
    """``entities.<type>.filter``: which Dynamics records are in scope (the native sync's sync filter).

    A record is in scope when ``dynamics_condition`` holds (``null``: no condition) and, when set, the boolean
    ``dynamics_column`` is true. The Marketo side's filter is ``marketo.sync_marker``.
    """

    dynamics_condition: str | None = DEFAULT_CONDITION
    dynamics_column: str | None = None

    @field_validator("dynamics_condition")
    @classmethod
    def _parses(cls, v: str | None) -> str | None:
        if v is not None:
            parse_condition(v)
        return v

    @field_validator("dynamics_column")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        if v is not None and not _IDENTIFIER.match(v):
            raise ValueError(f"dynamics_column {v!r} is not a column name")
        return v

    @property
    def condition(self) -> Condition | None:
        """The parsed condition (None: every record passes it)."""
        return parse_condition(self.dynamics_condition) if self.dynamics_condition is not None else None

    @property
    def columns(self) -> list[str]:
        """Every column the filter reads (they are added to the extract's ``$select``)."""
        cols = condition_columns(self.condition) if self.condition is not None else []
        return list(dict.fromkeys(cols + ([self.dynamics_column] if self.dynamics_column else [])))

    def describe(self) -> str:
        """The filter as one phrase for activity lines."""
        parts = ([self.dynamics_condition] if self.dynamics_condition else []) + (
            [f"{self.dynamics_column} eq true"] if self.dynamics_column else [])
        return " and ".join(parts) or "(none)"


class EntityConfig(_Strict):
    """Sync settings of one Dynamics entity type (``lead`` or ``contact``)."""

    name: str = ""
    entity_set: str
    id_column: str
    collision_winner: Side
    fields: list[FieldMap] = Field(min_length=1)
    #: what a delete on either side of a linked pair does (DESIGN §3)
    deletes: DeleteSettings = DeleteSettings()
    #: which Dynamics records are in scope at all
    filter: SyncFilter = SyncFilter()

    @model_validator(mode="after")
    def _unique(self) -> "EntityConfig":
        for attr in ("name", "marketo", "dynamics"):
            seen: dict[str, int] = {}
            for i, f in enumerate(self.fields):
                key = getattr(f, attr)
                if attr != "name":
                    key = key.lower()
                if key in seen:
                    raise ValueError(
                        f"fields[{i}] ({f.name}): {attr} field {getattr(f, attr)!r} is mapped twice "
                        f"(also at fields[{seen[key]}])"
                    )
                seen[key] = i
        emails = [f.name for f in self.fields if f.type is FieldType.EMAIL]
        if len(emails) != 1:
            raise ValueError(
                f"exactly one field of type 'email' is needed to match records by email, found {len(emails)}"
                + (f" ({', '.join(emails)})" if emails else "")
            )
        return self

    @property
    def email_field(self) -> FieldMap:
        return next(f for f in self.fields if f.type is FieldType.EMAIL)

    def field(self, name: str) -> FieldMap:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"entity {self.name!r} has no field {name!r}")

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]


class MarketoLinkFields(_Strict):
    dynamics_id: str
    dynamics_type: str


class SyncMarker(_Strict):
    field: str
    as_field: str | None = None
    default_type: str = "lead"

    @field_validator("default_type")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in ENTITY_TYPES:
            raise ValueError(f"default_type {v!r} is not one of {', '.join(ENTITY_TYPES)}")
        return v


class MarketoSettings(_Strict):
    link_fields: MarketoLinkFields
    sync_marker: SyncMarker
    error_activity_type: str
    #: Boolean field set to true on a person whose linked Dynamics record was deleted (delete policy ``flag``)
    deleted_flag_field: str | None = None


class DynamicsSettings(_Strict):
    marketo_id_column: str
    alternate_key: str
    #: Boolean column set to true on a record whose linked Marketo person was deleted (delete policy ``flag``)
    deleted_flag_column: str | None = None


class ScheduleSettings(_Strict):
    full_reconcile_every_hours: float = Field(default=24, gt=0)


def _identifier(entry: str, value: str) -> str:
    if not _IDENTIFIER.match(value):
        raise ValueError(f"{entry} {value!r} is not a table or column name")
    return value


class AccountSettings(_Strict):
    """``accounts``: account columns copied one way to the Marketo persons of the account's contacts (the
    persons' company fields, see :mod:`mdsync.accounts`). Fields are the usual :class:`FieldMap` entries; their
    direction is ``to_marketo`` (the default here) and nothing else."""

    entity_set: str = "accounts"
    id_column: str = "accountid"
    #: the account's name, for activity lines ("company fields from account 'Contoso'")
    name_column: str = "name"
    #: the contact's lookup of its parent account, as the Web API reads it
    contact_lookup: str = "_parentcustomerid_value"
    fields: list[FieldMap] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _one_way(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("fields"), list):
            return data
        fields = []
        for i, f in enumerate(data["fields"]):
            if isinstance(f, dict):
                label = f"fields[{i}] ({f.get('name')})"
                direction = f.get("direction", Direction.TO_MARKETO.value)
                if direction != Direction.TO_MARKETO.value:
                    raise ValueError(f"{label}: account fields flow one way, from the Dynamics account to the Marketo "
                                     f"persons of its contacts: direction must be 'to_marketo' (or left out), not "
                                     f"{direction!r}")
                if f.get("rule") is not None:
                    raise ValueError(f"{label}: account fields take no value rule ({f['rule']!r} is for fields that "
                                     "sync both ways)")
                f = {**f, "direction": Direction.TO_MARKETO.value}
            fields.append(f)
        return {**data, "fields": fields}

    @field_validator("entity_set", "id_column", "name_column", "contact_lookup")
    @classmethod
    def _names(cls, v: str, info) -> str:
        return _identifier(info.field_name, v)

    @model_validator(mode="after")
    def _unique(self) -> "AccountSettings":
        for attr in ("name", "marketo"):
            seen: dict[str, int] = {}
            for i, f in enumerate(self.fields):
                key = getattr(f, attr) if attr == "name" else f.marketo.lower()
                if key in seen:
                    raise ValueError(f"fields[{i}] ({f.name}): {attr} field {getattr(f, attr)!r} is mapped twice "
                                     f"(also at fields[{seen[key]}])")
                seen[key] = i
        return self


class SyncConfig(_Strict):
    """The whole sync config."""

    version: int
    marketo: MarketoSettings
    dynamics: DynamicsSettings
    schedule: ScheduleSettings = ScheduleSettings()
    entities: dict[str, EntityConfig]
    #: account fields on the persons of the account's contacts (one way; optional)
    accounts: AccountSettings | None = None

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"unsupported config version {v}; this release reads version 1")
        return v

    @model_validator(mode="before")
    @classmethod
    def _name_entities(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("entities"), dict):
            for name, entity in data["entities"].items():
                if isinstance(entity, dict):
                    entity.setdefault("name", name)
        return data

    @model_validator(mode="after")
    def _entities(self) -> "SyncConfig":
        unknown = sorted(set(self.entities) - set(ENTITY_TYPES))
        if unknown:
            raise ValueError(f"unknown entity type {unknown[0]!r}; known: {', '.join(ENTITY_TYPES)}")
        if not self.entities:
            raise ValueError("no entity types configured; configure lead and/or contact")
        reserved = {
            self.marketo.link_fields.dynamics_id.lower(): "marketo.link_fields.dynamics_id",
            self.marketo.link_fields.dynamics_type.lower(): "marketo.link_fields.dynamics_type",
            self.marketo.sync_marker.field.lower(): "marketo.sync_marker.field",
        }
        if self.marketo.sync_marker.as_field:
            reserved[self.marketo.sync_marker.as_field.lower()] = "marketo.sync_marker.as_field"
        flag_field, flag_column = self.marketo.deleted_flag_field, self.dynamics.deleted_flag_column
        if flag_field:
            if flag_field.lower() in reserved:
                raise ValueError(f"marketo.deleted_flag_field {flag_field!r} is already {reserved[flag_field.lower()]}")
            reserved[flag_field.lower()] = "marketo.deleted_flag_field"
        reserved_columns = {self.dynamics.marketo_id_column.lower(): "the link column (dynamics.marketo_id_column)"}
        if flag_column:
            if flag_column.lower() in reserved_columns:
                raise ValueError(f"dynamics.deleted_flag_column {flag_column!r} is the link column "
                                 "(dynamics.marketo_id_column)")
            reserved_columns[flag_column.lower()] = "the deleted flag (dynamics.deleted_flag_column)"
        for ename, entity in self.entities.items():
            for i, f in enumerate(entity.fields):
                if f.marketo.lower() in reserved:
                    raise ValueError(
                        f"entities.{ename}.fields[{i}] ({f.name}): Marketo field {f.marketo!r} is reserved "
                        f"for {reserved[f.marketo.lower()]} and cannot also be synced as data"
                    )
                if f.dynamics.lower() in reserved_columns:
                    raise ValueError(
                        f"entities.{ename}.fields[{i}] ({f.name}): Dataverse column {f.dynamics!r} is "
                        f"{reserved_columns[f.dynamics.lower()]} and cannot also be synced as data"
                    )
            if entity.deletes.policy is DeletePolicy.FLAG and not (flag_field and flag_column):
                missing = " and ".join(name for name, value in (("marketo.deleted_flag_field", flag_field),
                                                                ("dynamics.deleted_flag_column", flag_column))
                                       if not value)
                raise ValueError(
                    f"entities.{ename}.deletes.policy is 'flag' (the default), which needs {missing}: the Marketo "
                    "boolean field set on a person whose Dynamics record was deleted, and the Dataverse boolean "
                    "column set on a record whose Marketo person was deleted; set them, or choose policy "
                    "'unlink' or 'propagate'"
                )
            column = entity.filter.dynamics_column
            if column and column.lower() in reserved_columns:
                raise ValueError(f"entities.{ename}.filter.dynamics_column {column!r} is "
                                 f"{reserved_columns[column.lower()]}, not a sync-filter column")
        return self

    @model_validator(mode="after")
    def _accounts_fit(self) -> "SyncConfig":
        if self.accounts is None:
            return self
        if "contact" not in self.entities:
            raise ValueError("accounts: account fields reach persons through their contacts; configure "
                             "entities.contact too, or remove the accounts section")
        link, marker = self.marketo.link_fields, self.marketo.sync_marker
        reserved = {name.lower(): entry for entry, name in (
            ("marketo.link_fields.dynamics_id", link.dynamics_id), ("marketo.link_fields.dynamics_type", link.dynamics_type),
            ("marketo.sync_marker.field", marker.field), ("marketo.sync_marker.as_field", marker.as_field),
            ("marketo.deleted_flag_field", self.marketo.deleted_flag_field)) if name}
        by_contact = {f.marketo.lower(): f.name for f in self.entities["contact"].fields}
        for i, f in enumerate(self.accounts.fields):
            where = f"accounts.fields[{i}] ({f.name}): Marketo field {f.marketo!r}"
            if f.marketo.lower() in reserved:
                raise ValueError(f"{where} is reserved for {reserved[f.marketo.lower()]} and cannot take account values")
            if f.marketo.lower() in by_contact:
                # two sources for one field would overwrite each other every cycle
                raise ValueError(f"{where} is also mapped for contacts (entities.contact field "
                                 f"{by_contact[f.marketo.lower()]!r}); a person's field takes its value from the "
                                 "contact or from its account, not both")
        return self

    def entity(self, name: str) -> EntityConfig:
        try:
            return self.entities[name]
        except KeyError:
            raise ConfigError(f"entity type {name!r} is not configured (configured: {', '.join(self.entities)})") from None


def _format_location(loc: tuple[Any, ...], data: Any) -> str:
    """Turn a pydantic error location into ``entities.lead.fields[3] (first_name)``."""
    parts: list[str] = []
    node = data
    label = ""
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
        try:
            node = node[item]
            if isinstance(node, dict) and "name" in node and isinstance(node["name"], str):
                label = node["name"]
        except (KeyError, IndexError, TypeError):
            node = None
    where = "".join(parts) or "(top level)"
    return f"{where} ({label})" if label and not where.endswith(f"({label})") else where


def parse_config(data: Any, source: str = "<config>") -> SyncConfig:
    """Validate an already-parsed config mapping.

    :param data: the mapping read from YAML.
    :param source: file name used in error messages.
    :raises ConfigError: naming the source, the entry and the problem.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping at the top level, got {type(data).__name__}")
    try:
        return SyncConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "enum":
                got = err.get("input")
                msg = f"{got!r} is not one of {err['ctx']['expected']}"
            elif err["type"] == "missing":
                msg = "is required but missing"
            elif err["type"] == "extra_forbidden":
                msg = "is not a known setting (typo?)"
            problems.append(f"{source}: {_format_location(loc, data)}: {msg}")
        raise ConfigError("invalid sync config:\n  " + "\n  ".join(problems)) from None


def load_config(path: str | os.PathLike[str] | None = None) -> SyncConfig:
    """Load and validate the sync config.

    :param path: a YAML file; defaults to ``$MDSYNC_CONFIG`` or the shipped ``include/config/sync.yaml``.
    :raises ConfigError: when the file is missing, is not YAML, or fails validation.
    """
    path = Path(path or os.environ.get("MDSYNC_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the sync config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(path))

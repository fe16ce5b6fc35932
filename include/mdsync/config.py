"""Load and validate the sync config (entities, field maps, directions, value maps, value rules, collision policy).

The config is read in one place: :func:`load_config`. Every problem is reported as a
:class:`~mdsync.errors.ConfigError` that names the file, the entry and the problem, e.g.
``sync.yaml: entities.lead.fields[3] (first_name): direction 'sideways' is not one of both, to_marketo, to_dynamics``.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mdsync.errors import ConfigError

#: The shipped config; ``MDSYNC_CONFIG`` points elsewhere.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "config" / "sync.yaml"

ENTITY_TYPES = ("lead", "contact")


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


class EntityConfig(_Strict):
    """Sync settings of one Dynamics entity type (``lead`` or ``contact``)."""

    name: str = ""
    entity_set: str
    id_column: str
    collision_winner: Side
    fields: list[FieldMap] = Field(min_length=1)

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


class DynamicsSettings(_Strict):
    marketo_id_column: str
    alternate_key: str


class ScheduleSettings(_Strict):
    full_reconcile_every_hours: float = Field(default=24, gt=0)


class SyncConfig(_Strict):
    """The whole sync config."""

    version: int
    marketo: MarketoSettings
    dynamics: DynamicsSettings
    schedule: ScheduleSettings = ScheduleSettings()
    entities: dict[str, EntityConfig]

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
        for ename, entity in self.entities.items():
            for i, f in enumerate(entity.fields):
                if f.marketo.lower() in reserved:
                    raise ValueError(
                        f"entities.{ename}.fields[{i}] ({f.name}): Marketo field {f.marketo!r} is reserved "
                        f"for {reserved[f.marketo.lower()]} and cannot also be synced as data"
                    )
                if f.dynamics.lower() == self.dynamics.marketo_id_column.lower():
                    raise ValueError(
                        f"entities.{ename}.fields[{i}] ({f.name}): Dataverse column {f.dynamics!r} is the "
                        "link column (dynamics.marketo_id_column) and cannot also be synced as data"
                    )
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

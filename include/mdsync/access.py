"""Stage 1 of the cycle: refresh schema (DESIGN §4.1).

Describe both sides and decide, per entity type and mapped field, whether the sync user may read it and
write it on each side. A mapped field that exists but the sync user cannot read or update (field-level
security, a read-only Marketo field) is dropped for the run and logged (it is then treated as unchanged on that
side). A mapped field or column that does not exist on its side is a config error (a typo such as
``adress1_city`` must fail the run, not give a green one), naming the config entry, the unknown name and the
closest real one. The link fields of DESIGN §3 must exist too: without them the sync cannot keep links.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import asdict, dataclass, field

import pandas as pd

from mdsync.config import FieldMap, SyncConfig
from mdsync.errors import ConfigError

log = logging.getLogger("mdsync.access")


@dataclass
class EntityAccess:
    """Which mapped fields of one entity type the sync may use this run (canonical names)."""

    marketo_read: list[str]
    marketo_write: list[str]
    dynamics_read: list[str]
    dynamics_write: list[str]
    dynamics_create: list[str]
    #: Dataverse MaxLength per canonical field (string columns), for checks before writing
    dynamics_max_length: dict[str, int] = field(default_factory=dict)
    #: Marketo field length per canonical field (string fields)
    marketo_max_length: dict[str, int] = field(default_factory=dict)
    #: ``{"field", "side", "reason"}`` for every field dropped from a side
    dropped: list[dict] = field(default_factory=list)


@dataclass
class FieldAccess:
    entities: dict[str, EntityAccess]
    #: Dataverse metadata handed to later tasks so they need no metadata calls:
    #: entity set -> {"logical_name": ..., "attributes": [records of DynamicsClient.attributes]}
    dynamics_metadata: dict[str, dict]
    #: Marketo describe records (rest_name, data_type, length, updateable, ...)
    marketo_describe: list[dict]
    refreshed_at: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "FieldAccess":
        return cls(
            entities={k: EntityAccess(**v) for k, v in data["entities"].items()},
            dynamics_metadata=data["dynamics_metadata"],
            marketo_describe=data["marketo_describe"],
            refreshed_at=data.get("refreshed_at", ""),
        )


def closest(name: str, names) -> str | None:
    """The real name closest to a misspelt one (case-insensitive), or None when nothing is close."""
    by_lower = {str(n).lower(): str(n) for n in names}
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.75)
    return by_lower[match[0]] if match else None


def _unknown(entry: str, what: str, name: str, names, hint: str = "") -> str:
    near = closest(name, names)
    return f"{entry}: {what} has no {'field' if 'Marketo' in what else 'column'} '{name}'" + (
        f" (did you mean '{near}'?)" if near else "") + (f"; {hint}" if hint else "")


def missing_names(config: SyncConfig, marketo_describe: pd.DataFrame, dynamics: dict[str, dict]) -> list[str]:
    """One line per config entry naming a Marketo field or Dataverse column its side does not have."""
    m_names = list(marketo_describe["rest_name"])
    have_m = {str(n).lower() for n in m_names}
    problems = []
    link, marker = config.marketo.link_fields, config.marketo.sync_marker
    create_m = "create it in Marketo Admin > Field Management (README: 'Pointing it at real Marketo and Dynamics')"
    for entry, name in (("marketo.link_fields.dynamics_id", link.dynamics_id),
                        ("marketo.link_fields.dynamics_type", link.dynamics_type),
                        ("marketo.sync_marker.field", marker.field), ("marketo.sync_marker.as_field", marker.as_field)):
        if name and name.lower() not in have_m:
            problems.append(_unknown(f"{entry}", "Marketo's lead schema", name, m_names, create_m))
    for ename, entity in config.entities.items():
        meta = dynamics[ename]
        d_names = list(meta["attributes"]["logical_name"])
        have_d = {str(n).lower() for n in d_names}
        table = f"Dataverse table '{meta['logical_name']}'"
        if config.dynamics.marketo_id_column.lower() not in have_d:
            problems.append(_unknown(f"dynamics.marketo_id_column ({ename})", table, config.dynamics.marketo_id_column,
                                     d_names, f"create the column and an alternate key "
                                              f"'{config.dynamics.alternate_key}' on it (README)"))
        for i, f in enumerate(entity.fields):
            if f.marketo.lower() not in have_m:
                problems.append(_unknown(f"entities.{ename}.fields[{i}].marketo ({f.name})", "Marketo's lead schema",
                                         f.marketo, m_names))
            if f.dynamics.lower() not in have_d:
                problems.append(_unknown(f"entities.{ename}.fields[{i}].dynamics ({f.name})", table, f.dynamics,
                                         d_names))
    return problems


def refresh_access(config: SyncConfig, marketo_describe: pd.DataFrame, dynamics: dict[str, dict],
                   source: str = "sync config") -> FieldAccess:
    """Decide field access from both sides' metadata.

    :param marketo_describe: :meth:`MarketoClient.describe_leads` (rest_name, data_type, length, updateable).
    :param dynamics: per entity type ``{"entity_set", "logical_name", "attributes", "permissions"}`` from
        :meth:`DynamicsClient.attributes` and :meth:`DynamicsClient.field_permissions`.
    :param source: how messages name the config (its file).
    :raises ConfigError: a mapped field, column or link field does not exist on its side (every such entry
        named, with the closest real name).
    """
    problems = missing_names(config, marketo_describe, dynamics)
    if problems:
        raise ConfigError(f"{source} names fields that do not exist (fix the names, or create the fields):\n  "
                          + "\n  ".join(problems))
    mk = marketo_describe.assign(key=marketo_describe["rest_name"].str.lower()).set_index("key")
    entities: dict[str, EntityAccess] = {}
    metadata: dict[str, dict] = {}
    for name, entity in config.entities.items():
        meta = dynamics[name]
        attrs = meta["attributes"].assign(key=meta["attributes"]["logical_name"].str.lower()).set_index("key")
        perms = meta["permissions"].assign(key=meta["permissions"]["logical_name"].str.lower()).set_index("key")
        access = EntityAccess([], [], [], [], [])
        for f in entity.fields:
            _decide(f, mk, attrs, perms, access)
        for d in access.dropped:
            log.warning("field access: %s.%s dropped on the %s side for this run: %s", name, d["field"], d["side"], d["reason"])
        entities[name] = access
        metadata[entity.entity_set] = {
            "logical_name": meta["logical_name"],
            "attributes": meta["attributes"].astype(object).where(meta["attributes"].notna(), None).to_dict("records"),
        }
    return FieldAccess(entities, metadata, marketo_describe.astype(object).where(marketo_describe.notna(), None).to_dict("records"))


def _decide(f: FieldMap, mk: pd.DataFrame, attrs: pd.DataFrame, perms: pd.DataFrame, access: EntityAccess) -> None:
    def drop(side: str, reason: str) -> None:
        access.dropped.append({"field": f.name, "side": side, "reason": reason})

    m_key, d_key = f.marketo.lower(), f.dynamics.lower()  # both exist (missing_names checked)
    access.marketo_read.append(f.name)
    length = mk.loc[m_key, "length"]
    if pd.notna(length) and str(mk.loc[m_key, "data_type"]) in ("string", "email", "phone", "url", "text"):
        access.marketo_max_length[f.name] = int(length)
    if bool(mk.loc[m_key, "updateable"]):
        access.marketo_write.append(f.name)
    elif f.flows_to_marketo:
        drop("marketo", f"Marketo field '{f.marketo}' is not updateable through the API")
    can = perms.loc[d_key] if d_key in perms.index else None
    if can is None or not bool(can["can_read"]):
        drop("dynamics", f"the sync user cannot read Dataverse column '{f.dynamics}' (field-level security)")
    else:
        access.dynamics_read.append(f.name)
    if can is not None and bool(can["can_update"]):
        access.dynamics_write.append(f.name)
    elif f.flows_to_dynamics:
        drop("dynamics", f"the sync user cannot update Dataverse column '{f.dynamics}'")
    if can is not None and bool(can["can_create"]):
        access.dynamics_create.append(f.name)
    max_length = attrs.loc[d_key, "max_length"]
    if pd.notna(max_length):
        access.dynamics_max_length[f.name] = int(max_length)

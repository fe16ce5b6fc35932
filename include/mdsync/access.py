"""Stage 1 of the cycle: refresh schema (DESIGN §4.1).

Describe both sides and decide, per entity type and mapped field, whether the sync user may read it and
write it on each side. A mapped field that one side does not have, or that the sync user cannot read or
update, is dropped for the run and logged (it is then treated as unchanged on that side). The link fields of
DESIGN §3 must exist: without them the sync cannot keep links, so that is a setup error, not a drop.
"""

from __future__ import annotations

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


def _require(names: set[str], wanted: list[str], where: str, hint: str) -> None:
    missing = [w for w in wanted if w.lower() not in names]
    if missing:
        raise ConfigError(f"{where} has no field {', '.join(repr(m) for m in missing)}; {hint}")


def refresh_access(config: SyncConfig, marketo_describe: pd.DataFrame, dynamics: dict[str, dict]) -> FieldAccess:
    """Decide field access from both sides' metadata.

    :param marketo_describe: :meth:`MarketoClient.describe_leads` (rest_name, data_type, length, updateable).
    :param dynamics: per entity type ``{"entity_set", "logical_name", "attributes", "permissions"}`` from
        :meth:`DynamicsClient.attributes` and :meth:`DynamicsClient.field_permissions`.
    """
    mk = marketo_describe.assign(key=marketo_describe["rest_name"].str.lower()).set_index("key")
    link = config.marketo.link_fields
    marker = config.marketo.sync_marker
    _require(set(mk.index), [link.dynamics_id, link.dynamics_type, marker.field] + ([marker.as_field] if marker.as_field else []),
             "Marketo's lead schema", "create these custom fields in Marketo Admin > Field Management (README: "
             "'Pointing it at real Marketo and Dynamics')")
    entities: dict[str, EntityAccess] = {}
    metadata: dict[str, dict] = {}
    for name, entity in config.entities.items():
        meta = dynamics[name]
        attrs = meta["attributes"].assign(key=meta["attributes"]["logical_name"].str.lower()).set_index("key")
        perms = meta["permissions"].assign(key=meta["permissions"]["logical_name"].str.lower()).set_index("key")
        _require(set(attrs.index), [config.dynamics.marketo_id_column], f"Dataverse table '{meta['logical_name']}'",
                 f"create the column and an alternate key '{config.dynamics.alternate_key}' on it (README)")
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

    m_key, d_key = f.marketo.lower(), f.dynamics.lower()
    if m_key not in mk.index:
        drop("marketo", f"Marketo has no field '{f.marketo}'")
    else:
        access.marketo_read.append(f.name)
        length = mk.loc[m_key, "length"]
        if pd.notna(length) and str(mk.loc[m_key, "data_type"]) in ("string", "email", "phone", "url", "text"):
            access.marketo_max_length[f.name] = int(length)
        if bool(mk.loc[m_key, "updateable"]):
            access.marketo_write.append(f.name)
        elif f.flows_to_marketo:
            drop("marketo", f"Marketo field '{f.marketo}' is not updateable through the API")
    if d_key not in attrs.index:
        drop("dynamics", f"Dataverse column '{f.dynamics}' does not exist")
        return
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

"""Stage 1 of the cycle: refresh schema (DESIGN §4.1).

Describe both sides and decide, per entity type and mapped field, whether the sync user may read it and
write it on each side. A mapped field that exists but the sync user cannot read or update (field-level
security, a read-only Marketo field) is dropped for the run and logged (it is then treated as unchanged on that
side). A mapped field or column that does not exist on its side is a config error (a typo such as
``adress1_city`` must fail the run, not give a green one), naming the config entry, the unknown name and the
closest real one. The link fields of DESIGN §3 must exist too: without them the sync cannot keep links. So must
the columns of each sync filter (readable by the sync user, compared with literals of their type) and the
deleted flags of the ``flag`` delete policy (Yes/No, writable by the sync user).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import asdict, dataclass, field

import pandas as pd

from mdsync.config import DeletePolicy, FieldMap, SyncConfig, condition_literals
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
class AccountAccess:
    """Which account fields (``accounts.fields``, canonical names) the sync may use this run: their Dataverse
    column readable by the sync user and their Marketo field updateable."""

    fields: list[str]
    #: Marketo field length per account write field (``account.<name>``, string fields)
    marketo_max_length: dict[str, int] = field(default_factory=dict)
    #: ``{"field", "side", "reason"}`` for every account field dropped this run
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
    #: the account fields the sync may use (None: no ``accounts`` section)
    accounts: "AccountAccess | None" = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "FieldAccess":
        return cls(
            entities={k: EntityAccess(**v) for k, v in data["entities"].items()},
            dynamics_metadata=data["dynamics_metadata"],
            marketo_describe=data["marketo_describe"],
            refreshed_at=data.get("refreshed_at", ""),
            accounts=AccountAccess(**data["accounts"]) if data.get("accounts") else None,
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
        elif "keys" in meta:
            problems.extend(_key_problem(config, ename, table, meta["keys"]))
        for i, f in enumerate(entity.fields):
            if f.marketo.lower() not in have_m:
                problems.append(_unknown(f"entities.{ename}.fields[{i}].marketo ({f.name})", "Marketo's lead schema",
                                         f.marketo, m_names))
            if f.dynamics.lower() not in have_d:
                problems.append(_unknown(f"entities.{ename}.fields[{i}].dynamics ({f.name})", table, f.dynamics,
                                         d_names))
        flag_column = config.dynamics.deleted_flag_column
        if flag_column and flag_column.lower() not in have_d:
            problems.append(_unknown(f"dynamics.deleted_flag_column ({ename})", table, flag_column, d_names,
                                     "create it as a Yes/No column on lead and contact"))
        for column in entity.filter.columns:
            if _logical(column).lower() not in have_d:
                problems.append(_unknown(f"entities.{ename}.filter", table, column, d_names))
    flag_field = config.marketo.deleted_flag_field
    if flag_field and flag_field.lower() not in have_m:
        problems.append(_unknown("marketo.deleted_flag_field", "Marketo's lead schema", flag_field, m_names,
                                 "create it as a Boolean field in Marketo Admin > Field Management"))
    return problems + account_missing_names(config, m_names, dynamics)


def _key_problem(config: SyncConfig, ename: str, table: str, keys: list[dict]) -> list[str]:
    """The alternate key on the link column must exist and be active: creates are upserts by it, and without
    it a retried create would make a second record."""
    column, name = config.dynamics.marketo_id_column.lower(), config.dynamics.alternate_key
    entry = f"dynamics.alternate_key ({ename})"
    on_column = [k for k in keys if [c.lower() for c in k["columns"]] == [column]]
    named = [k for k in keys if str(k["name"]).lower() == name.lower()]
    listed = ", ".join(f"{k['name']} on {'+'.join(k['columns'])} ({k['status']})" for k in keys) or "none"
    if not named:
        hint = f" (did you mean '{on_column[0]['name']}'?)" if on_column else ""
        return [f"{entry}: {table} has no alternate key '{name}'{hint}; its keys: {listed}. Create it on "
                f"'{config.dynamics.marketo_id_column}' alone (Power Apps > Tables > {ename} > Keys; README), or name "
                "the existing one: without it creates are not idempotent and are not attempted"]
    key = named[0]
    if [c.lower() for c in key["columns"]] != [column]:
        return [f"{entry}: alternate key '{key['name']}' of {table} is on {', '.join(key['columns'])}, not on "
                f"'{config.dynamics.marketo_id_column}' alone (dynamics.marketo_id_column); point the config at a key "
                "on that column"]
    if key["status"] != "Active":
        return [f"{entry}: alternate key '{key['name']}' of {table} is {key['status']}, not Active: Dataverse builds "
                "its index in the background after the key is created ('Pending'/'InProgress': wait and run again; "
                "'Failed': duplicate values in the column stop it, fix them and reactivate the key in Power Apps)"]
    return []


def _logical(column: str) -> str:
    """A Web API column name's logical name (``_parentcustomerid_value`` -> ``parentcustomerid``)."""
    return column[1:-6] if column.startswith("_") and column.endswith("_value") else column


#: Dataverse attribute types by the kind of literal they compare with in a sync-filter condition
_LITERAL_KINDS = {
    "string": {"String", "Memo", "EntityName", "Lookup", "Customer", "Owner", "Uniqueidentifier"},
    "number": {"Integer", "BigInt", "Decimal", "Double", "Money", "Picklist", "State", "Status"},
    "bool": {"Boolean"},
}


def _literal_kind(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else "string"


def lifecycle_problems(config: SyncConfig, marketo_describe: pd.DataFrame, dynamics: dict[str, dict]) -> list[str]:
    """One line per sync-filter column or deleted flag the sync could not use as configured (they all exist:
    :func:`missing_names` checked): a filter column the sync user cannot read or compared with a literal of
    another type, a ``dynamics_column`` that is not Yes/No, a deleted flag that is not boolean or not writable."""
    problems = []
    flagged = [e for e in config.entities.values() if e.deletes.policy is DeletePolicy.FLAG]
    flag_field = config.marketo.deleted_flag_field
    if flagged and flag_field:
        row = marketo_describe[marketo_describe["rest_name"].str.lower() == flag_field.lower()].iloc[0]
        if str(row["data_type"]) != "boolean":
            problems.append(f"marketo.deleted_flag_field: Marketo field '{flag_field}' is a {row['data_type']} field; "
                            "the deleted flag must be Boolean")
        if not bool(row["updateable"]):
            problems.append(f"marketo.deleted_flag_field: Marketo field '{flag_field}' is not updateable through "
                            "the API")
    for ename, entity in config.entities.items():
        meta = dynamics[ename]
        attrs = meta["attributes"].assign(key=meta["attributes"]["logical_name"].str.lower()).set_index("key")
        perms = meta["permissions"].assign(key=meta["permissions"]["logical_name"].str.lower()).set_index("key")
        table = f"Dataverse table '{meta['logical_name']}'"

        def kind_of(column: str) -> str:
            return str(attrs.loc[_logical(column).lower(), "type"])

        def can(column: str, action: str) -> bool:
            key = _logical(column).lower()
            return key in perms.index and bool(perms.loc[key, f"can_{action}"])

        where = f"entities.{ename}.filter"
        for column in entity.filter.columns:
            if not can(column, "read"):
                problems.append(f"{where}: the sync user cannot read column '{column}' of {table} (field-level "
                                "security), so the filter cannot be evaluated")
        if entity.filter.condition is not None:
            for column, literal in condition_literals(entity.filter.condition):
                kind, have = _literal_kind(literal.value), kind_of(column)
                if kind is not None and have not in _LITERAL_KINDS[kind]:
                    problems.append(f"{where}.dynamics_condition: column '{column}' of {table} is a {have} column "
                                    f"but is compared with the {kind} {literal.value!r}")
        column = entity.filter.dynamics_column
        if column and kind_of(column) != "Boolean":
            problems.append(f"{where}.dynamics_column: column '{column}' of {table} is a {kind_of(column)} column; "
                            "it must be Yes/No (Boolean)")
        flag_column = config.dynamics.deleted_flag_column
        if entity.deletes.policy is DeletePolicy.FLAG and flag_column:
            if kind_of(flag_column) != "Boolean":
                problems.append(f"dynamics.deleted_flag_column ({ename}): column '{flag_column}' of {table} is a "
                                f"{kind_of(flag_column)} column; the deleted flag must be Yes/No (Boolean)")
            if not can(flag_column, "update"):
                problems.append(f"dynamics.deleted_flag_column ({ename}): the sync user cannot update column "
                                f"'{flag_column}' of {table}")
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
    problems = lifecycle_problems(config, marketo_describe, dynamics)
    if problems:
        raise ConfigError(f"{source}: the sync filter or the deleted flags cannot be used as configured:\n  "
                          + "\n  ".join(problems))
    problems = account_problems(config, dynamics)
    if problems:
        raise ConfigError(f"{source}: the accounts section cannot be used as configured:\n  " + "\n  ".join(problems))
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
    accounts = account_access(config, marketo_describe, dynamics, metadata)
    return FieldAccess(entities, metadata, marketo_describe.astype(object).where(marketo_describe.notna(), None).to_dict("records"),
                       accounts=accounts)


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


# -- the accounts section (account fields on the persons of the account's contacts) -------------------------

#: the key of the account table's metadata in the ``dynamics`` argument of :func:`refresh_access`
ACCOUNT_META = "account"
#: Dataverse attribute types of a lookup that can name a contact's parent account
_LOOKUP_TYPES = {"Lookup", "Customer"}


def _web_api_names(attrs: pd.DataFrame) -> list[str]:
    """A table's column names as the Web API reads them (``_<lookup>_value`` for lookups), for suggestions."""
    lookups = attrs.loc[attrs["type"].isin(_LOOKUP_TYPES | {"Owner"}), "logical_name"]
    return list(attrs["logical_name"]) + [f"_{n}_value" for n in lookups]


def account_missing_names(config: SyncConfig, m_names: list, dynamics: dict[str, dict]) -> list[str]:
    """One line per entry of the ``accounts`` section naming a column or Marketo field that does not exist (the
    account table's metadata is ``dynamics["account"]``)."""
    accounts = config.accounts
    if accounts is None or ACCOUNT_META not in dynamics:
        return []
    have_m = {str(n).lower() for n in m_names}
    meta, contact = dynamics[ACCOUNT_META], dynamics["contact"]
    d_names = list(meta["attributes"]["logical_name"])
    have_d = {str(n).lower() for n in d_names}
    table = f"Dataverse table '{meta['logical_name']}'"
    problems = [_unknown(f"accounts.{entry}", table, column, d_names)
                for entry, column in (("id_column", accounts.id_column), ("name_column", accounts.name_column))
                if column.lower() not in have_d]
    c_names = {str(n).lower() for n in contact["attributes"]["logical_name"]}
    if _logical(accounts.contact_lookup).lower() not in c_names:
        problems.append(_unknown("accounts.contact_lookup", f"Dataverse table '{contact['logical_name']}'",
                                 accounts.contact_lookup, _web_api_names(contact["attributes"]),
                                 "name the contact's parent lookup as the Web API reads it (_<lookup>_value)"))
    for i, f in enumerate(accounts.fields):
        if f.marketo.lower() not in have_m:
            problems.append(_unknown(f"accounts.fields[{i}].marketo ({f.name})", "Marketo's lead schema", f.marketo,
                                     m_names))
        if f.dynamics.lower() not in have_d:
            problems.append(_unknown(f"accounts.fields[{i}].dynamics ({f.name})", table, f.dynamics, d_names))
    return problems


def account_problems(config: SyncConfig, dynamics: dict[str, dict]) -> list[str]:
    """One line per column of the ``accounts`` section the sync could not use (they all exist): a contact lookup
    that is not a lookup, or columns the sync user cannot read that the stage needs whole (the lookup, the
    account's id and name)."""
    accounts = config.accounts
    if accounts is None or ACCOUNT_META not in dynamics:
        return []
    problems = []
    for entry, meta, column in (("contact_lookup", dynamics["contact"], accounts.contact_lookup),
                                ("id_column", dynamics[ACCOUNT_META], accounts.id_column),
                                ("name_column", dynamics[ACCOUNT_META], accounts.name_column)):
        key = _logical(column).lower()
        attrs = meta["attributes"].assign(key=meta["attributes"]["logical_name"].str.lower()).set_index("key")
        perms = meta["permissions"].assign(key=meta["permissions"]["logical_name"].str.lower()).set_index("key")
        table = f"Dataverse table '{meta['logical_name']}'"
        kind = str(attrs.loc[key, "type"])
        if entry == "contact_lookup" and kind not in _LOOKUP_TYPES:
            problems.append(f"accounts.contact_lookup: column '{column}' of {table} is a {kind} column; it must be "
                            "the lookup of the contact's parent account (Customer or Lookup, e.g. "
                            "_parentcustomerid_value)")
        elif key not in perms.index or not bool(perms.loc[key, "can_read"]):
            problems.append(f"accounts.{entry}: the sync user cannot read column '{column}' of {table} (field-level "
                            "security), so account fields cannot reach persons")
    return problems


def account_access(config: SyncConfig, marketo_describe: pd.DataFrame, dynamics: dict[str, dict],
                   metadata: dict[str, dict]) -> AccountAccess | None:
    """Decide which account fields the sync may use this run (a field whose Dataverse column the sync user cannot
    read, or whose Marketo field is not updateable, is dropped and logged, as mapped fields are), and add the
    account table's metadata to ``metadata`` (by entity set) so later tasks type account rows without a call."""
    from mdsync.accounts import write_field

    accounts = config.accounts
    if accounts is None or ACCOUNT_META not in dynamics:
        return None
    meta = dynamics[ACCOUNT_META]
    metadata[accounts.entity_set] = {
        "logical_name": meta["logical_name"],
        "attributes": meta["attributes"].astype(object).where(meta["attributes"].notna(), None).to_dict("records")}
    mk = marketo_describe.assign(key=marketo_describe["rest_name"].str.lower()).set_index("key")
    perms = meta["permissions"].assign(key=meta["permissions"]["logical_name"].str.lower()).set_index("key")
    out = AccountAccess(fields=[])
    for f in accounts.fields:
        m_key, d_key = f.marketo.lower(), f.dynamics.lower()
        if d_key not in perms.index or not bool(perms.loc[d_key, "can_read"]):
            out.dropped.append({"field": f.name, "side": "dynamics", "reason": f"the sync user cannot read Dataverse "
                                f"column '{f.dynamics}' of {meta['logical_name']} (field-level security)"})
        elif not bool(mk.loc[m_key, "updateable"]):
            out.dropped.append({"field": f.name, "side": "marketo",
                                "reason": f"Marketo field '{f.marketo}' is not updateable through the API"})
        else:
            out.fields.append(f.name)
            length = mk.loc[m_key, "length"]
            if pd.notna(length) and str(mk.loc[m_key, "data_type"]) in ("string", "email", "phone", "url", "text"):
                out.marketo_max_length[write_field(f.name)] = int(length)
    for d in out.dropped:
        log.warning("field access: account field %s dropped for this run: %s", d["field"], d["reason"])
    return out

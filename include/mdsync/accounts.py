"""Accounts to persons, one way (issue 10.5): a contact's parent account fills its Marketo person's company fields.

For each linked contact whose parent (``_parentcustomerid_value``) is an account read this cycle, every
configured account field (``accounts.fields`` of the sync config) is compared with its **baseline**: the value
the sync last wrote to (or found on) that person for it, kept in the state store as the baseline field
``account.<name>``; ``account.id`` holds the account whose values the person last took.

- account value = baseline: nothing is written, whatever Marketo holds. So an unchanged account writes nothing,
  and a Marketo-side edit of a company field stays until the account's value changes (one way: it is never
  synced back, and never overwritten by a cycle that has nothing new to say);
- the account's value changed (or the contact moved to another account): the new value is written, a cleared
  value clears the field;
- a first link (no ``account.id`` yet: a new link, a contact that just got an account): the account's values
  are written, its blanks are not (a first link never blanks a value);
- Marketo already holds the value (the person was read this cycle): nothing is written, the baseline follows.

Writes have the load stage's shape (:data:`mdsync.plan.WRITE_COLUMNS` plus ``entity_type``) with the fields named
``account.<name>``, so they batch with the contact plan's writes (one Sync Leads record per person) and their
baselines advance only when the write went through (:func:`mdsync.commit.succeeded_baselines`). Everything here
is a pure function on frames; :meth:`mdsync.cycle.Cycle.plan` reads what they need and stages what they return.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mdsync.activity import activity_frame
from mdsync.canonical import CANONICAL_DTYPE, canonical_frame, canonical_series
from mdsync.config import AccountSettings, EntityConfig, FieldMap, Side
from mdsync.plan import BASELINE_COLUMNS, REQUIRES_MARKETO, REQUIRES_NOTHING, UPDATE, WRITE_COLUMNS

#: the entity type whose persons take account values
CONTACT = "contact"
#: baseline field of the account a person last took values from
ACCOUNT_ID = "account.id"
#: the watermark (delta link) of the accounts read, and the key of their metadata
ACCOUNT = "account"
PREFIX = "account."
PAIR_COLUMNS = ["person_id", "dynamics_id", "contact_id", "account_id"]


def write_field(name: str) -> str:
    """The name of an account field in writes, results, baselines and activity (``account.company``): apart from
    the contact's own canonical fields, whose baselines describe the pair."""
    return PREFIX + name


def baseline_fields(fields: list[FieldMap]) -> list[str]:
    """The baseline fields the account stage reads: ``account.id`` and one per account field."""
    return [ACCOUNT_ID, *(write_field(f.name) for f in fields)]


def marketo_maps(fields: list[FieldMap]) -> list[FieldMap]:
    """The account fields as field maps named like their writes (``account.<name>``), for the load stage."""
    return [f.model_copy(update={"name": write_field(f.name)}) for f in fields]


def with_account_fields(entities: dict[str, EntityConfig], fields: list[FieldMap]) -> dict[str, EntityConfig]:
    """``entities`` with the account fields' maps added to the contact's, so the load stage converts account writes
    (which go with the contact's writes) like any mapped field."""
    contact = entities[CONTACT]
    return {**entities, CONTACT: contact.model_copy(update={"fields": [*contact.fields, *marketo_maps(fields)]})}


def _keys(values: pd.Series) -> pd.Series:
    """Dataverse ids compared case-insensitively (GUIDs may come back in either case); NA stays NA."""
    text = values.astype(object).where(values.notna(), None)
    return pd.Series(text.to_numpy(), index=values.index, dtype=CANONICAL_DTYPE).str.lower()


def contact_parents(frames: list[pd.DataFrame], id_column: str, lookup: str) -> pd.DataFrame:
    """``contact_id, account_id`` (lower-cased; NA: no parent) of the contacts in ``frames`` (raw Dataverse rows
    that read ``lookup``); a contact in several frames keeps the row of the first."""
    parts = [pd.DataFrame({"contact_id": _keys(f[id_column]).to_numpy(), "account_id": _keys(f[lookup]).to_numpy()})
             for f in frames if not f.empty and id_column in f and lookup in f]
    if not parts:
        return pd.DataFrame({"contact_id": pd.Series(dtype=CANONICAL_DTYPE), "account_id": pd.Series(dtype=CANONICAL_DTYPE)})
    both = pd.concat(parts, ignore_index=True)
    return both[both["contact_id"].notna()].drop_duplicates("contact_id", keep="first").reset_index(drop=True)


def linked_pairs(parents: pd.DataFrame, links: pd.DataFrame) -> pd.DataFrame:
    """The persons of ``parents``' contacts: :data:`PAIR_COLUMNS` (``dynamics_id`` as the link spells it).

    :param links: identity's links (index person_id; ``dynamics_type``, ``dynamics_id``, optionally ``paused``):
        pairs outside the sync filter are not synced, so they take no account values either.
    """
    mine = links[links["dynamics_type"].eq(CONTACT).to_numpy()]
    if "paused" in mine:
        mine = mine[~mine["paused"].fillna(False).astype(bool).to_numpy()]
    by_contact = pd.DataFrame({"person_id": mine.index.to_numpy(dtype="int64"),
                               "dynamics_id": mine["dynamics_id"].astype(str).to_numpy(),
                               "contact_id": _keys(mine["dynamics_id"]).to_numpy()})
    pairs = by_contact.merge(parents, on="contact_id", how="inner")
    return pairs[PAIR_COLUMNS].reset_index(drop=True)


def _last_account(pairs: pd.DataFrame, baseline: pd.DataFrame) -> pd.Series:
    """Per pair (positionally): the account its person last took values from (lower-cased; NA: none yet)."""
    last = baseline[ACCOUNT_ID] if ACCOUNT_ID in baseline else pd.Series(dtype=CANONICAL_DTYPE)
    return _keys(last.reindex(pairs["person_id"].to_numpy())).reset_index(drop=True)


def accounts_to_read(pairs: pd.DataFrame, baseline: pd.DataFrame, have, force=()) -> list[str]:
    """The parent accounts to read by id: those of pairs whose person did not take its values from that account
    yet (a first link, a contact that moved), and of ``force``d persons (a retry of rejected values), minus the
    accounts in ``have`` (changed accounts, read already). An unchanged account of an unchanged pair is not read:
    it has nothing new."""
    account = pairs["account_id"].reset_index(drop=True)
    last = _last_account(pairs, baseline)
    new = account.notna().to_numpy() & ~_same(account, last)
    forced = pairs["person_id"].isin(list(force)).to_numpy() & account.notna().to_numpy()
    wanted = pd.Index(account[new | forced].unique())
    return sorted(wanted.difference(pd.Index(_keys(pd.Series(list(have), dtype=object)).dropna())).tolist())


def _same(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Positional equality of two canonical series, NA equal to NA."""
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    return (a == b).to_numpy(dtype=bool, na_value=False) | (a.isna().to_numpy() & b.isna().to_numpy())


@dataclass
class AccountPlan:
    """What the account stage decided for one cycle."""

    #: writes to Marketo persons: :data:`mdsync.plan.WRITE_COLUMNS` + ``entity_type`` (``contact``)
    writes: pd.DataFrame
    #: :data:`mdsync.plan.BASELINE_COLUMNS`: written values (requires the Marketo write), values Marketo already
    #: held and the persons' ``account.id`` (requires nothing)
    baseline_updates: pd.DataFrame
    #: ``skip`` rows for account values that could not be read (an option with no label in the value map)
    activity: pd.DataFrame
    #: accounts and persons compared
    accounts: int = 0
    persons: int = 0


def plan_accounts(settings: AccountSettings, fields: list[FieldMap], accounts: pd.DataFrame, pairs: pd.DataFrame,
                  baseline: pd.DataFrame, persons: pd.DataFrame | None = None) -> AccountPlan:
    """Decide the account-field writes of one cycle (the rule is in the module docstring).

    :param fields: the account fields to sync this run (readable in Dataverse, updateable in Marketo).
    :param accounts: raw account rows (Web API names: ``settings.id_column``, ``settings.name_column``, the fields'
        columns): changed accounts and those :func:`accounts_to_read` named.
    :param pairs: :func:`linked_pairs`; pairs whose account is not in ``accounts`` are left alone.
    :param baseline: baselines of :func:`baseline_fields` for the pairs' persons (wide, index person_id).
    :param persons: Marketo persons read this cycle (raw, ``id`` and the fields' Marketo names), to skip values
        they already hold; persons not in it are written whenever the account's value differs from the baseline.
    """
    acc = accounts.assign(_k=_keys(accounts[settings.id_column])).drop_duplicates("_k", keep="last").set_index("_k") \
        if not accounts.empty else pd.DataFrame(columns=[settings.id_column], index=pd.Index([], name="_k"))
    last_all = _last_account(pairs, baseline)
    detached = pairs["account_id"].isna().to_numpy() & last_all.notna().to_numpy()
    on_mask = pairs["account_id"].isin(acc.index).to_numpy()
    on = pairs[on_mask].reset_index(drop=True)
    keys = on["account_id"].to_numpy(dtype=object)
    pids = on["person_id"].to_numpy(dtype="int64")

    canon, problems = _account_values(acc, fields)
    values = canon.reindex(keys).reset_index(drop=True)
    base = baseline.reindex(pids).reset_index(drop=True)
    last = last_all[on_mask].reset_index(drop=True)
    first = last.isna().to_numpy()
    moved = ~first & ~_same(on["account_id"], last)
    current, known = _marketo_values(persons, fields, pids)

    names = acc[settings.name_column].reindex(keys) if settings.name_column in acc else pd.Series(None, index=keys)
    names = pd.Series(names.to_numpy(dtype=object), dtype=CANONICAL_DTYPE).replace("", None)
    shown = ("'" + names + "'").where(names.notna(), "with id " + on["account_id"].astype(str))
    reason = ("company fields from account " + shown
              + np.where(first, " (the contact's account, first sync)", np.where(moved, " (the contact's new account)", "")))

    def rows(mask: np.ndarray, **columns) -> pd.DataFrame:
        data = {"person_id": pids[mask], "dynamics_id": on["dynamics_id"].to_numpy(dtype=object)[mask]}
        data.update({k: (v[mask] if isinstance(v, np.ndarray) else v) for k, v in columns.items()})
        return pd.DataFrame(data)

    writes, updates, skipped = [], [], []
    for f in fields:
        name = write_field(f.name)
        v = values[f.name] if f.name in values else pd.Series(np.nan, index=values.index, dtype=CANONICAL_DTYPE)
        b = base[name] if name in base else pd.Series(np.nan, index=base.index, dtype=CANONICAL_DTYPE)
        bad = _unreadable(problems, f.name, keys)
        want = ~_same(v, b) & ~(first & v.isna().to_numpy()) & ~bad
        cur = current[f.name] if f.name in current else pd.Series(np.nan, index=current.index, dtype=CANONICAL_DTYPE)
        has = known & (f.name in current)
        held = want & has & _same(v, cur)  # Marketo has it already: no write, the baseline follows
        write = want & ~held
        vals, prev = v.to_numpy(dtype=object), np.where(has, cur.to_numpy(dtype=object), b.to_numpy(dtype=object))
        if write.any():
            writes.append(rows(write, field=name, value=vals, previous=prev, baseline=b.to_numpy(dtype=object),
                               reason=reason.to_numpy(dtype=object), action=UPDATE))
            updates.append(rows(write, field=name, value=vals, requires=REQUIRES_MARKETO))
        if held.any():
            updates.append(rows(held, field=name, value=vals, requires=REQUIRES_NOTHING))
        if bad.any():
            raw = acc[f.dynamics].reindex(keys).to_numpy(dtype=object)
            shown_raw = pd.Series(raw[bad]).astype(str)
            skipped.append(rows(bad, field=name, new_value=shown_raw.to_numpy(),
                                detail=("Dynamics value " + shown_raw + " of account "
                                        + shown[bad].reset_index(drop=True) + " left alone: "
                                        + _reason(problems, f.name)).to_numpy()))
    took = first | moved
    if took.any():  # the account whose values the person now has
        updates.append(rows(took, field=ACCOUNT_ID, value=on["account_id"].to_numpy(dtype=object),
                            requires=REQUIRES_NOTHING))
    if detached.any():  # the contact lost its account: its values stay; a later account is a first link again
        gone = pairs[detached]
        updates.append(pd.DataFrame({"person_id": gone["person_id"].to_numpy(dtype="int64"), "field": ACCOUNT_ID,
                                     "value": None, "requires": REQUIRES_NOTHING}))
    notes = activity_frame(pd.concat(skipped, ignore_index=True).assign(
        entity_type=CONTACT, dynamics_type=CONTACT, action="skip")) if skipped else activity_frame([])
    return AccountPlan(writes=_typed(writes, WRITE_COLUMNS).assign(entity_type=CONTACT),
                       baseline_updates=_typed(updates, BASELINE_COLUMNS), activity=notes,
                       accounts=int(len(pd.unique(keys))), persons=len(on))


def _account_values(accounts: pd.DataFrame, fields: list[FieldMap]) -> tuple[pd.DataFrame, list]:
    """Canonical account values per field (one column may feed several fields, so not :func:`canonical_frame`,
    which reads each column once)."""
    columns, problems = {}, []
    for f in fields:
        if f.dynamics in accounts.columns:
            columns[f.name], problem = canonical_series(accounts[f.dynamics], f, Side.DYNAMICS)
            problems += [problem] if problem is not None else []
    return pd.DataFrame(columns, index=accounts.index), problems


def _marketo_values(persons: pd.DataFrame | None, fields: list[FieldMap], pids: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Marketo's canonical values of the fields for ``pids`` (positionally) and whether each person was read."""
    if persons is None or persons.empty or "id" not in persons:
        return pd.DataFrame(index=pd.RangeIndex(len(pids))), np.zeros(len(pids), dtype=bool)
    p = persons[persons["id"].notna()]
    p = p.set_index(p["id"].astype("int64")).loc[lambda f: ~f.index.duplicated(keep="last")]
    canon, _ = canonical_frame(p, fields, Side.MARKETO)  # unreadable Marketo values count as unknown: written
    return canon.reindex(pids).reset_index(drop=True), pd.Index(pids).isin(p.index)


def _unreadable(problems, name: str, keys: np.ndarray) -> np.ndarray:
    hit = [p for p in problems if p.field == name]
    return pd.Index(keys).isin(hit[0].keys) if hit else np.zeros(len(keys), dtype=bool)


def _reason(problems, name: str) -> str:
    return next(p.reason for p in problems if p.field == name)


def _typed(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """Concatenated rows with the plan's dtypes (canonical text, person ids int64)."""
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    out = out.reindex(columns=columns)
    for col in columns:
        out[col] = out[col].astype("int64") if col == "person_id" else out[col].astype(CANONICAL_DTYPE)
    return out

"""Generated canonical populations for the engine demo and the benchmark (vectorised, seeded).

Nothing here is used by a sync cycle; it makes realistic-looking linked pairs and edits on both sides
fast enough to build a million of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mdsync.canonical import CANONICAL_DTYPE
from mdsync.config import EntityConfig, FieldMap, FieldType

FIRST = np.array(["Ann", "Bob", "Chloé", "Dmitri", "Eve", "Farah", "Gus", "Hana", "Ivan", "Jun", "Kai", "Lena",
                  "Mateo", "Nia", "Oskar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Vera", "Wei", "Zoë"])
LAST = np.array(["Smith", "O'Brien", "García", "Müller", "Nguyen", "Kowalski", "Okafor", "Rossi", "Tanaka",
                 "Johansson", "Dubois", "Silva", "Kim", "Novak", "Haddad", "Ivanova"])
TITLES = np.array(["Engineer", "Marketing Manager", "CTO", "VP Sales", "Analyst", "Director of Ops", "Consultant",
                   "Designer", "Product Owner", "Account Executive"])
CITIES = np.array(["Berlin", "Lisbon", "Toronto", "Austin", "Osaka", "Nairobi", "Lyon", "Kraków", "Dublin"])
COMPANIES = np.array(["Acme Corp", "Globex", "Initech", "Umbrella & Sons", "Hooli", "Stark Industries",
                      "Wayne Enterprises", "Soylent", "Tyrell"])


@dataclass
class Population:
    """Linked pairs of one entity type: baseline and both sides' current values (canonical)."""

    entity: EntityConfig
    links: pd.DataFrame
    baseline: pd.DataFrame
    marketo: pd.DataFrame
    dynamics: pd.DataFrame


def _values(field: FieldMap, ids: np.ndarray, rng: np.random.Generator, variant: int = 0) -> np.ndarray:
    n = len(ids)
    name = field.name
    if field.type is FieldType.EMAIL:
        return np.char.add(np.char.add("person", ids.astype(str)), f"@example{variant or ''}.com")
    if field.type is FieldType.BOOLEAN:
        return np.where(rng.random(n) < 0.1, "true", "false")
    if field.type is FieldType.PICKLIST:
        return rng.choice(np.array(list(field.values.values())), n)
    pool = {
        "first_name": FIRST, "last_name": LAST, "job_title": TITLES, "city": CITIES, "company": COMPANIES,
    }.get(name)
    if pool is not None:
        return rng.choice(pool, n)
    if "phone" in name:
        return np.char.add("+1 555 ", rng.integers(1_000_000, 9_999_999, n).astype(str))
    return np.char.add(f"{name} ", rng.integers(0, 100_000, n).astype(str))


def _frame(columns: dict[str, np.ndarray], ids: np.ndarray) -> pd.DataFrame:
    index = pd.Index(ids, name="person_id")
    return pd.DataFrame({k: pd.array(v, dtype=CANONICAL_DTYPE) for k, v in columns.items()}, index=index)


def linked_population(entity: EntityConfig, n: int, *, seed: int = 7, first_id: int = 1) -> Population:
    """``n`` linked pairs whose sides agree with the baseline."""
    rng = np.random.default_rng(seed)
    ids = np.arange(first_id, first_id + n, dtype="int64")
    columns = {f.name: _values(f, ids, rng) for f in entity.fields}
    baseline = _frame(columns, ids)
    dynamics_ids = np.char.add("00000000-0000-4000-8000-", np.char.zfill(ids.astype(str), 12))
    links = pd.DataFrame({"dynamics_id": dynamics_ids, "dynamics_type": entity.name},
                         index=pd.Index(ids, name="person_id"))
    return Population(entity, links, baseline, baseline.copy(), baseline.copy())


def edit(frame: pd.DataFrame, entity: EntityConfig, person_ids: np.ndarray, *, seed: int,
         fields: list[str] | None = None) -> pd.DataFrame:
    """Change one field (chosen per field list, round-robin) of each given person to a new value."""
    rng = np.random.default_rng(seed)
    names = fields or [f.name for f in entity.fields if f.type is not FieldType.EMAIL]
    out = frame.copy()
    for i, name in enumerate(names):
        who = person_ids[i :: len(names)]
        if len(who) == 0:
            continue
        field = entity.field(name)
        fresh = _values(field, who, rng, variant=seed)
        if field.type in (FieldType.STRING,):
            fresh = np.char.add(fresh, f" ({seed})")  # never equal to the old value by accident
        out.loc[who, name] = fresh
    return out


def changed_window(pop: Population, n_marketo: int, n_dynamics: int, n_both: int, *, seed: int = 11):
    """Edit both sides and return (marketo rows, dynamics rows) as a window would report them.

    ``n_both`` persons are edited on both sides in the same field (collisions).
    """
    rng = np.random.default_rng(seed)
    ids = pop.baseline.index.to_numpy()
    picked = rng.choice(ids, n_marketo + n_dynamics + n_both, replace=False)
    only_m, only_d, both = np.split(picked, [n_marketo, n_marketo + n_dynamics])
    fields = [f.name for f in pop.entity.fields if f.type is FieldType.STRING]
    marketo = edit(pop.marketo, pop.entity, np.concatenate([only_m, both]), seed=seed + 1, fields=fields)
    dynamics = edit(pop.dynamics, pop.entity, np.concatenate([only_d, both]), seed=seed + 2, fields=fields)
    # a collision needs the same field edited on both sides: re-edit "both" with aligned field order
    marketo = edit(marketo, pop.entity, both, seed=seed + 3, fields=fields)
    dynamics = edit(dynamics, pop.entity, both, seed=seed + 4, fields=fields)
    m_rows = np.sort(np.concatenate([only_m, both]))
    d_rows = np.sort(np.concatenate([only_d, both]))
    return marketo.loc[m_rows], dynamics.loc[d_rows]

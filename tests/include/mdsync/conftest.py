"""Engine test fixtures: the shipped config and a builder for small canonical frames."""

from __future__ import annotations

import pandas as pd
import pytest

from mdsync.canonical import CANONICAL_DTYPE
from mdsync.config import Side, load_config


@pytest.fixture(scope="session")
def config():
    return load_config()


@pytest.fixture(scope="session")
def lead(config):
    return config.entity("lead")


@pytest.fixture(scope="session")
def contact(config):
    return config.entity("contact")


def canonical(rows: dict[int, dict[str, str | None]]) -> pd.DataFrame:
    """``{person_id: {field: value}}`` -> a canonical frame indexed by person id."""
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index = pd.Index(frame.index.astype("int64"), name="person_id")
    return frame.astype(CANONICAL_DTYPE)


def links_for(person_ids) -> pd.DataFrame:
    ids = pd.Index(list(person_ids), dtype="int64", name="person_id")
    return pd.DataFrame({"dynamics_id": [f"00000000-0000-0000-0000-{p:012d}" for p in ids]}, index=ids)


def api_records_for(writes: pd.DataFrame, entity, side: Side) -> list[dict]:
    """The API records the load stage builds from a plan's writes (one per record, API names and values)."""
    from mdsync.load import api_cells, api_records

    cells = api_cells(writes, {f.name: f for f in entity.fields}, side)
    key = {"person_id": "id"} if side is Side.MARKETO else {"dynamics_id": entity.id_column}
    return api_records(cells, next(iter(key)), key)[0]

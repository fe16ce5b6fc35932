"""Engine test fixtures: the shipped config and a builder for small canonical frames."""

from __future__ import annotations

import pandas as pd
import pytest

from mdsync.canonical import CANONICAL_DTYPE
from mdsync.config import load_config


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

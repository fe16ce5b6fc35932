"""Test-wide set-up: an isolated AIRFLOW_HOME and the sandbox / PostgreSQL fixtures."""

from __future__ import annotations

import os
import tempfile

# Airflow reads its configuration at import time: point it at a throwaway home before anything imports it.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="mdsync-airflow-home-")
os.environ.setdefault("AIRFLOW_HOME", _AIRFLOW_HOME)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.marketo_sandbox",
    "tests.fixtures.dataverse_sandbox",
]

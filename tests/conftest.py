"""Test-wide set-up: an isolated AIRFLOW_HOME and the sandbox / PostgreSQL fixtures."""

from __future__ import annotations

import os
import tempfile

# Airflow reads its configuration at import time: point it at a throwaway home before anything imports it.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="mdsync-airflow-home-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
# a developer's own sync settings must not leak into the tests
for _name in ("MDSYNC_CONFIG", "MDSYNC_STATE_URL", "MDSYNC_STAGING_URL", "AIRFLOW_CONN_MARKETO_DEFAULT",
              "AIRFLOW_CONN_DYNAMICS_DEFAULT", "REQUESTS_CA_BUNDLE"):
    os.environ.pop(_name, None)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", os.path.join(_REPO, "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", os.path.join(_REPO, "plugins"))

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.marketo_sandbox",
    "tests.fixtures.dataverse_sandbox",
    "tests.fixtures.sync_env",
    "tests.fixtures.airflow_server",
    "tests.fixtures.redis_server",
    "tests.fixtures.celery_deployment",
]

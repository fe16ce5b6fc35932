"""Through Airflow (``dag.test()``, retries on): a run that no retry can fix fails at once, in one line naming the
connection or config entry; the task is not retried (counted in the sandboxes' calls)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import yaml

from tests.fixtures.sync_env import task_logs


@pytest.fixture
def retrying(monkeypatch):
    # read when the DAG file is parsed: were a task retried, the retry would run at once and show in the counts
    monkeypatch.setenv("MDSYNC_TASK_RETRIES", "2")
    monkeypatch.setenv("MDSYNC_RETRY_DELAY_SECONDS", "0")


def run_dag(conf: dict | None = None) -> str:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    assert bag.import_errors == {}
    run = bag.dags["marketo_dynamics_sync"].test(run_conf=conf or {})
    return str(getattr(run.state, "value", run.state))


def test_a_wrong_marketo_secret_fails_the_run_at_once_in_one_line(sync_world, airflow_db, retrying, monkeypatch,
                                                                 capfd, caplog):
    caplog.set_level(logging.INFO)
    broken = json.loads(sync_world.marketo_sandbox.connection_json())
    broken["password"] = "wrong-secret-for-the-test"
    monkeypatch.setenv("AIRFLOW_CONN_MARKETO_DEFAULT", json.dumps(broken))
    assert run_dag() == "failed"
    # refresh_schema asked for a token once: no client retry, no task retry
    assert sync_world.marketo_sandbox.calls()["by_endpoint"] == {"POST /identity/oauth/token": 1}
    logs = task_logs(capfd, caplog)
    assert (f"Marketo connection 'marketo_default' ({sync_world.marketo_sandbox.base_url}): error unauthorized "
            "(HTTP 401): identity refused the client credentials") in logs
    assert "not retried" in logs and "wrong-secret-for-the-test" not in logs


def test_the_daily_quota_stops_the_run_at_once_saying_when_it_resets(sync_world, airflow_db, retrying, capfd, caplog):
    caplog.set_level(logging.INFO)
    sync_world.marketo_sandbox.fault("quota_exhausted", count=50, path_prefix="/rest/")
    assert run_dag() == "failed"
    calls = sync_world.marketo_sandbox.calls()
    assert calls["injected"] == {"quota_exhausted": 1}  # one REST call, never retried
    logs = task_logs(capfd, caplog)
    assert "error 607: Daily quota reached: the subscription's daily API quota is used up" in logs
    assert "the quota resets at midnight US Central time" in logs and "Nothing is lost" in logs
    assert "check the client id" not in logs


def test_an_unknown_run_parameter_is_refused_before_any_call(sync_world, airflow_db, retrying, capfd, caplog):
    caplog.set_level(logging.INFO)
    assert run_dag({"person_id": [12]}) == "failed"
    assert sync_world.marketo_sandbox.calls()["total"] == 0
    logs = task_logs(capfd, caplog)
    assert "unknown run parameter 'person_id' (did you mean 'person_ids'?); the valid ones are dry_run" in logs


def test_a_misspelt_dataverse_column_fails_the_run_naming_the_entry(sync_world, airflow_db, retrying, monkeypatch,
                                                                   capfd, caplog):
    caplog.set_level(logging.INFO)
    from mdsync.config import DEFAULT_CONFIG_PATH

    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    fields = raw["entities"]["contact"]["fields"]
    i = next(n for n, f in enumerate(fields) if f["dynamics"] == "address1_city")
    fields[i]["dynamics"] = "adress1_city"
    path = sync_world.tmp / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MDSYNC_CONFIG", str(path))
    assert run_dag() == "failed"
    describes = sync_world.marketo_sandbox.calls()["by_endpoint"].get("GET /rest/v1/leads/describe2.json")
    assert describes == 1  # the schema refresh ran once
    logs = task_logs(capfd, caplog)
    assert (f"entities.contact.fields[{i}].dynamics (city): Dataverse table 'contact' has no column 'adress1_city' "
            "(did you mean 'address1_city'?)") in logs

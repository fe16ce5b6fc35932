"""DAG integrity: it imports cleanly, does no I/O and no heavy imports at parse time, and is configured as the
product promises (real 5-minute intervals, serialised runs, retries, typed params, docs)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"marketo_dynamics_sync"}
    return bag.dags["marketo_dynamics_sync"]


def test_schedule_gives_real_five_minute_windows(dag):
    from airflow.timetables.interval import CronDataIntervalTimetable

    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable._expression == "*/5 * * * *"
    assert dag.catchup is False and dag.max_active_runs == 1


def test_every_task_retries_with_backoff(dag):
    for task in dag.tasks:
        assert task.retries >= 3, task.task_id
        assert task.retry_exponential_backoff, task.task_id
        assert task.retry_delay >= timedelta(seconds=30)


def test_every_task_runs_in_the_pool_the_deployment_names(dag, airflow_db, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    assert {task.pool for task in dag.tasks} == {"default_pool"}  # MDSYNC_POOL unset: Airflow's default
    monkeypatch.setenv("MDSYNC_POOL", "mdsync")
    pooled = DagBag(dag_folder=str(DAGS)).dags["marketo_dynamics_sync"]
    assert {task.task_id: task.pool for task in pooled.tasks} == {task.task_id: "mdsync" for task in dag.tasks}


def test_tasks_read_like_the_cycle(dag):
    order = ["hold_lease", "refresh_schema", "extract_marketo", "extract_dynamics", "identify", "plan_lead",
             "plan_contact", "check_mass_change", "approve_mass_change", "load_dynamics", "load_marketo", "commit",
             "report", "release_lease"]
    assert sorted(dag.task_ids) == sorted(order)
    assert dag.get_task("refresh_schema").upstream_task_ids == {"hold_lease"}
    assert dag.get_task("extract_marketo").upstream_task_ids == {"refresh_schema"}
    assert dag.get_task("identify").upstream_task_ids == {"refresh_schema", "extract_marketo", "extract_dynamics"}
    assert "load_dynamics" in dag.get_task("load_marketo").upstream_task_ids
    assert {"load_dynamics", "load_marketo"} <= dag.get_task("commit").upstream_task_ids
    # the mass-change guard sits between the plans and the loads (tests/dags/test_mass_change_guard.py)
    assert {"plan_lead", "plan_contact"} <= dag.get_task("check_mass_change").upstream_task_ids
    assert dag.get_task("approve_mass_change").upstream_task_ids == {"check_mass_change"}
    assert "approve_mass_change" in dag.get_task("load_dynamics").upstream_task_ids


def test_the_cycle_lease_is_a_setup_and_teardown_around_every_stage(dag):
    """The first task takes the lease, a teardown gives it back whether the run succeeded or failed, and every
    other task is in between (so clearing any of them takes the lease again first)."""
    from airflow.sdk import TriggerRule

    hold, release = dag.get_task("hold_lease"), dag.get_task("release_lease")
    assert hold.is_setup and not hold.upstream_task_ids
    assert release.is_teardown and release.trigger_rule == TriggerRule.ALL_DONE_SETUP_SUCCESS
    assert hold.task_id in release.upstream_task_ids
    stages = set(dag.task_ids) - {"hold_lease", "release_lease"}
    assert stages <= hold.get_flat_relative_ids(upstream=False)
    assert stages <= release.get_flat_relative_ids(upstream=True)
    assert release.get_flat_relative_ids(upstream=False) == set()


def test_params_are_typed_for_the_trigger_form(dag):
    params = dag.params.dump()
    assert params == {"dry_run": False, "full_resync": False, "person_ids": [], "sync_as": "lead", "retry_failed": False,
                      "undo_run": None, "allow_mass_change": False}
    schema = {k: dag.params.get_param(k).schema for k in params}
    assert schema["dry_run"]["type"] == "boolean"
    assert schema["person_ids"]["type"] == "array" and schema["person_ids"]["items"] == {"type": "integer"}
    assert schema["sync_as"]["enum"] == ["lead", "contact"]
    assert schema["undo_run"]["type"] == ["null", "string"]


def test_documented(dag):
    text = dag.doc_md.replace("**", "")
    assert "Marketo for leads" in text and "Dynamics for contacts" in text and "backfill" in text
    assert {"marketo", "dynamics365"} <= set(dag.tags)


def test_parsing_does_no_io_and_no_heavy_imports():
    """Parse the DAG file with sockets and file writes forbidden; pandas, msal and the engine stay unimported."""
    probe = f"""
import builtins, socket, sys
import airflow.sdk  # Airflow itself may do I/O on import; the DAG file may not
def no_network(*a, **k): raise AssertionError("network I/O at DAG parse time")
socket.socket.connect = no_network
real_open = builtins.open
def guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+"): raise AssertionError(f"file write at DAG parse time: {{file}}")
    return real_open(file, mode, *a, **k)
builtins.open = guarded_open
import runpy
runpy.run_path({str(DAGS / 'marketo_dynamics_sync.py')!r})
heavy = [m for m in ("pandas", "msal", "pyarrow", "mdsync", "requests_toolbelt") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]

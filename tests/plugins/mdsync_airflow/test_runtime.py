"""The Airflow side of the cycle lease (mdsync_airflow.runtime) on a real SQLite state store: the first task
takes it or defers, every other task works only inside it, the teardown gives it back; the lease tasks start
without pandas."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from mdsync.lease import CycleLease
from mdsync.state.database import create_engine
from mdsync_airflow import runtime

DAG_ID = "marketo_dynamics_sync"
STARTED = datetime(2026, 12, 2, 8, 0, 3, tzinfo=timezone.utc)


class TaskInstance:
    """What the lease task uses of Airflow's task instance: ``xcom_push``."""

    def __init__(self) -> None:
        self.xcom: dict = {}

    def xcom_push(self, key: str, value) -> None:
        self.xcom[key] = value


def context(run_id: str, started: datetime = STARTED) -> dict:
    dag_run = SimpleNamespace(dag_id=DAG_ID, run_id=run_id, start_date=started, run_type="manual")
    return {"dag_run": dag_run, "run_id": run_id, "params": {}, "ti": TaskInstance()}


@pytest.fixture
def state_url(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    monkeypatch.setenv("MDSYNC_STATE_URL", url)
    monkeypatch.setenv("MDSYNC_STAGING_URL", f"file://{tmp_path / 'staging'}")
    monkeypatch.setenv("MDSYNC_LEASE_WAIT_SECONDS", "0")
    return url


def test_a_run_takes_the_lease_works_inside_it_and_gives_it_back(state_url):
    run = context("manual__2026-12-02T08:00:00+00:00")
    taken = runtime.hold_lease(run)
    assert taken["run_id"] == run["run_id"]
    with runtime.leased_cycle(run) as cycle:
        assert cycle.run.run_id == run["run_id"] and cycle.store.fence is not None
        cycle.store.save_watermark("marketo", "persons", STARTED, None, run["run_id"])  # fenced, and it holds it
    assert runtime.hold_lease(run)["acquired_at"] == taken["acquired_at"]  # its first task retried: kept
    assert runtime.release_lease(run) is True
    assert runtime.release_lease(run) is False  # a teardown retried: nothing left to give back
    with pytest.raises(AirflowFailException, match="does not hold the cycle lease .* free .* writes nothing"):
        with runtime.leased_cycle(run):
            pass


def test_a_run_that_finds_the_lease_held_defers_and_its_tasks_cannot_write(state_url):
    first, second = context("scheduled__2026-12-02T08:00:00+00:00"), context("manual__2026-12-02T08:01:00+00:00")
    runtime.hold_lease(first)
    with pytest.raises(AirflowSkipException) as skipped:
        runtime.hold_lease(second)
    line = str(skipped.value)
    assert line.startswith("deferred: the cycle lease of this state store is held by run "
                           "'scheduled__2026-12-02T08:00:00+00:00'") and "nothing is lost" in line
    assert second["ti"].xcom[runtime.DEFERRED_XCOM] == line  # for make sync's one line
    with pytest.raises(AirflowFailException, match="'manual__2026-12-02T08:01:00\\+00:00' does not hold"):
        with runtime.leased_cycle(second):
            pass
    assert runtime.release_lease(second) is False
    state = CycleLease(create_engine(state_url)).state()
    assert state.run_id == first["run_id"] and state.holder_key is not None


def test_a_run_cleared_after_it_ended_takes_the_lease_anew(state_url):
    run = context("scheduled__2026-12-02T08:00:00+00:00")
    runtime.hold_lease(run)  # its teardown never ran (the worker was lost)
    again = context(run["run_id"], started=datetime(2026, 12, 2, 9, 0, tzinfo=timezone.utc))
    assert runtime.holder_of(again).key != runtime.holder_of(run).key
    with pytest.raises(AirflowSkipException):  # it waits for the lapse of its own old lease like any other run
        runtime.hold_lease(again)
    CycleLease(create_engine(state_url)).force_release()
    assert runtime.hold_lease(again)["run_id"] == run["run_id"]


def test_the_lease_tasks_start_without_pandas_or_the_engine(state_url):
    probe = """
import sys
from datetime import datetime, timezone
from types import SimpleNamespace
from mdsync_airflow import runtime
run = SimpleNamespace(dag_id="marketo_dynamics_sync", run_id="manual__probe", start_date=datetime.now(timezone.utc))
ctx = {"dag_run": run, "run_id": "manual__probe", "params": {}}
runtime.hold_lease(ctx)
assert runtime.release_lease(ctx)
heavy = [m for m in ("pandas", "numpy", "pyarrow", "mdsync.cycle", "mdsync.state.store") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ.copy(),
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    state = CycleLease(create_engine(state_url)).state()
    assert state.run_id == "manual__probe" and state.holder_key is None


@pytest.mark.unit
@pytest.mark.parametrize("executor", ["LocalExecutor", "airflow.executors.local_executor.LocalExecutor",
                                      "LocalExecutor,my_local:airflow.executors.local_executor.LocalExecutor"])
def test_one_machine_executors_need_no_shared_settings(executor):
    from mdsync.settings import Settings

    local = dataclasses.replace(Settings.from_env(), state_url="sqlite:////tmp/s.sqlite",
                                staging_url="file:///tmp/staging", limits_url=None)
    assert runtime.deployment_warnings(local, executor) == []


@pytest.mark.unit
def test_a_distributed_executor_warns_about_each_setting_that_assumes_one_machine():
    from mdsync.settings import Settings

    base = Settings.from_env()
    local = dataclasses.replace(base, state_url="sqlite:////tmp/s.sqlite", staging_url="file:///tmp/staging",
                                limits_url=None)
    warnings = runtime.deployment_warnings(local, "LocalExecutor,airflow.providers.celery.executors."
                                                  "celery_executor.CeleryExecutor")
    assert [w.split(" but ")[0] for w in warnings] == \
        ["[core] executor is CeleryExecutor: a run's tasks may run on different machines,"] * 3
    assert "MDSYNC_STAGING_URL" in warnings[0] and "file:///tmp/staging" in warnings[0] and "s3://" in warnings[0]
    assert "MDSYNC_STATE_URL" in warnings[1] and "PostgreSQL" in warnings[1]
    assert "MDSYNC_LIMITS_URL" in warnings[2] and "redis://" in warnings[2]
    shared = dataclasses.replace(base, state_url="postgresql+psycopg://sync@db/mdsync",
                                 staging_url="s3://aws_default@bucket/staging", limits_url="redis://redis:6379/1")
    assert runtime.deployment_warnings(shared, "CeleryExecutor") == []

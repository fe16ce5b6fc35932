"""``make sync``'s runner (mdsync_airflow.run_once): bad CONF is one line, and beside a live scheduler on the same
metadata database the run is triggered through that scheduler (never also run here) and waited for.

The scheduler is the metadata database's view of one: a ``SchedulerJob`` row with a fresh heartbeat, which is
exactly what the runner looks at; the test then plays the scheduler's part by ending the queued run."""

from __future__ import annotations

import os
import threading

import pytest
import sqlalchemy as sa

from airflow.utils.types import DagRunTriggeredByType

from mdsync_airflow import run_once
from tests.fixtures.waiting import wait_for

@pytest.mark.parametrize("conf, why", [
    ('{"dry_run": tru}', "CONF is not valid JSON (Expecting value at character 13)"),
    ("{'dry_run': true}", "CONF is not valid JSON (Expecting property name enclosed in double quotes"),
    ('[1, 2]', "CONF must be a JSON object of run parameters, got list"),
])
def test_bad_conf_is_one_line_and_exit_status_2(conf, why, capsys):
    assert run_once.main(["--conf", conf]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1
    assert out.err.startswith(f"error: {why}") and """make sync CONF='{"dry_run": true}'""" in out.err


@pytest.mark.parametrize("conf, why", [
    ('{"person_id": [12]}', "unknown run parameter 'person_id' (did you mean 'person_ids'?); the valid ones are"),
    ('{"dry_run": "yes"}', "run parameter dry_run: 'yes' is not valid, expected true or false"),
    ('{"person_ids": ["a"]}', "run parameter person_ids[0]: 'a' is not valid, expected a whole number (person_ids = ['a'])"),
])
def test_bad_run_parameters_are_refused_before_any_run_is_made(conf, why, capsys, airflow_db):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        before = session.scalar(sa.select(sa.func.count()).select_from(DagRun).where(DagRun.dag_id == run_once.DAG_ID))
    assert run_once.main(["--conf", conf]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1
    assert out.err.startswith(f"error: {why}"), out.err
    with create_session() as session:
        after = session.scalar(sa.select(sa.func.count()).select_from(DagRun).where(DagRun.dag_id == run_once.DAG_ID))
    assert after == before  # refused up front: no failed run to find in the UI


@pytest.fixture
def scheduler(airflow_db):
    """A scheduler alive on the test metadata database (its job row, heartbeating now) and the DAG known to it."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.jobs.job import Job, JobState
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    manager = DagBundlesManager()  # as the scheduler's DAG processor (or dag.test()) records the DAG
    manager.sync_bundles_to_db()
    for bundle in manager.get_all_dag_bundles():
        bundle.initialize()
        sync_bag_to_db(BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name),
                       bundle.name, bundle.version)
    with create_session() as session:
        job = Job(job_type="SchedulerJob", state=JobState.RUNNING)
        session.add(job)
        session.flush()
        job_id = job.id
        paused = session.scalar(sa.select(DagModel.is_paused).where(DagModel.dag_id == run_once.DAG_ID))
    yield job_id
    with create_session() as session:
        session.execute(sa.delete(Job).where(Job.id == job_id))
        session.execute(sa.delete(DagRun).where(DagRun.dag_id == run_once.DAG_ID, DagRun.triggered_by == DagRunTriggeredByType.CLI))
        session.execute(sa.update(DagModel).where(DagModel.dag_id == run_once.DAG_ID).values(is_paused=paused))


def _pause(paused: bool) -> None:
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        session.execute(sa.update(DagModel).where(DagModel.dag_id == run_once.DAG_ID).values(is_paused=paused))


def test_beside_a_live_scheduler_the_run_is_triggered_through_it_and_waited_for(scheduler):
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState

    assert run_once.live_scheduler().id == scheduler
    _pause(False)
    said, ended = [], {}
    waiter = threading.Thread(target=lambda: ended.setdefault(
        "outcome", run_once.run_through_scheduler({"dry_run": True}, run_once.live_scheduler(), poll_s=0.05,
                                                  say=said.append)))
    waiter.start()

    def queued():
        with create_session() as session:
            return session.scalar(sa.select(DagRun).where(DagRun.dag_id == run_once.DAG_ID,
                                                          DagRun.triggered_by == DagRunTriggeredByType.CLI))
    run = wait_for(queued, "the triggered run")
    assert run.state == DagRunState.QUEUED and run.conf == {"dry_run": True} and run.run_type == "manual"
    with create_session() as session:  # nothing of it ran in this process: its tasks are the scheduler's
        ran = session.scalars(sa.select(TaskInstance.task_id).where(TaskInstance.run_id == run.run_id,
                                                                    TaskInstance.state.is_not(None))).all()
    assert ran == []
    assert said[0].startswith("a scheduler is running on this AIRFLOW_HOME") and f"triggered run {run.run_id}" in said[0]
    assert f"dag_id=marketo_dynamics_sync/run_id={run.run_id}" in said[1] and "task logs:" in said[1]

    with create_session() as session:  # the scheduler's part: the run ends
        session.execute(sa.update(DagRun).where(DagRun.run_id == run.run_id).values(state=DagRunState.SUCCESS))
    waiter.join(timeout=60)
    assert ended["outcome"].state == "success" and ended["outcome"].run_id == run.run_id


def test_beside_a_live_scheduler_a_paused_dag_is_one_line_and_nothing_runs(scheduler, capsys):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    _pause(True)
    assert run_once.main(["--conf", "{}"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "marketo_dynamics_sync is paused there" in err and "dags unpause" in err
    with create_session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(DagRun).where(
            DagRun.dag_id == run_once.DAG_ID, DagRun.triggered_by == DagRunTriggeredByType.CLI)) == 0


def test_no_scheduler_when_its_heartbeat_is_old(scheduler):
    from datetime import datetime, timedelta, timezone

    from airflow.jobs.job import Job
    from airflow.utils.session import create_session

    with create_session() as session:
        session.execute(sa.update(Job).where(Job.id == scheduler).values(
            latest_heartbeat=datetime.now(timezone.utc) - timedelta(minutes=10)))
    assert run_once.live_scheduler() is None  # a stopped scheduler: make sync runs in-process


def test_ctrl_c_in_process_gives_back_the_lease_this_process_holds(tmp_path, monkeypatch, capsys):
    """An in-process run stopped with Ctrl-C never reaches its teardown: make sync gives the lease back itself,
    and only when a task of this very process renewed it last."""
    from mdsync.lease import CycleLease, Holder
    from mdsync.state import open_store

    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    monkeypatch.setenv("MDSYNC_STATE_URL", url)
    lease = CycleLease(open_store(url).engine)
    other = Holder.of_run(run_once.DAG_ID, "scheduled__other", None)
    lease.try_acquire(Holder(other.run_id, other.key, pid=os.getpid() + 1))  # another process's run
    run_once._release_own_lease()
    assert lease.state().holder_key == other.key and capsys.readouterr().err == ""
    lease.release(other)
    lease.try_acquire(Holder.of_run(run_once.DAG_ID, "manual__mine", None))  # a task of this process took it
    run_once._release_own_lease()
    assert lease.state().holder_key is None
    assert "interrupted: gave back the cycle lease of run 'manual__mine'" in capsys.readouterr().err

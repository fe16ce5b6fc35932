"""Run one cycle of the sync DAG now (``make sync``); exit status 0 when it synced, 1 when the run failed or
deferred, 2 on bad input.

``python -m mdsync_airflow.run_once [--conf '{"dry_run": true}']``

When a scheduler is alive on this ``AIRFLOW_HOME`` (its metadata database), the run is triggered through that
scheduler and this command waits for its end: running it here as well (``dag.test()``) would create a run the
scheduler also picks up, so some tasks would run twice. With no scheduler, the run happens in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass

from mdsync_airflow.runtime import DEFERRED_XCOM, LEASE_TASK

DAG_ID = "marketo_dynamics_sync"
EXAMPLE = """make sync CONF='{"dry_run": true}'"""


class InputError(Exception):
    """Bad input to ``make sync``: one line, exit status 2."""


@dataclass
class Outcome:
    """How a run ended: ``success``, ``failed`` or ``deferred`` (it found the cycle lease held and wrote nothing)."""

    state: str
    run_id: str
    line: str = ""


def parse_conf(text: str) -> dict:
    """``--conf`` as run parameters: a JSON object, else :class:`InputError`."""
    try:
        conf = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise InputError(f"CONF is not valid JSON ({exc.msg} at character {exc.pos + 1}): {text!r}; "
                         f"write it as a JSON object, e.g. {EXAMPLE}") from None
    if not isinstance(conf, dict):
        raise InputError(f"CONF must be a JSON object of run parameters, got {type(conf).__name__} {text!r}; "
                         f"e.g. {EXAMPLE}")
    return conf


def _load_dag(dag_folder: str | None):
    from airflow.dag_processing.dagbag import DagBag

    folder = dag_folder or os.environ.get("AIRFLOW__CORE__DAGS_FOLDER")
    # "Filling up the DagBag" goes to stdout: noise in front of an input error's one line
    with contextlib.redirect_stdout(io.StringIO()):
        bag = DagBag(dag_folder=folder) if folder else DagBag()
    if bag.import_errors:
        raise RuntimeError(f"the DAG folder has import errors: {bag.import_errors}")
    dag = bag.get_dag(DAG_ID)
    if dag is None:
        raise RuntimeError(f"DAG {DAG_ID!r} not found in {folder}")
    return dag


def live_scheduler():
    """The scheduler job that is alive on this metadata database (heartbeat within its health threshold), if any."""
    from airflow.jobs.job import most_recent_job
    from airflow.utils.session import create_session

    with create_session() as session:
        job = most_recent_job("SchedulerJob", session=session)
        if job is not None and job.is_alive():
            session.expunge(job)
            return job
    return None


def _outcome(run_id: str) -> Outcome:
    """The finished run's outcome, from the metadata database; a skipped lease task means it deferred."""
    import sqlalchemy as sa
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.scalar(sa.select(DagRun).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id))
        state = str(getattr(run.state, "value", run.state))
        lease_state = session.scalar(sa.select(TaskInstance.state).where(
            TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id, TaskInstance.task_id == LEASE_TASK))
        if str(getattr(lease_state, "value", lease_state)) != "skipped":
            return Outcome(state, run_id)
        xcom = session.scalar(XComModel.get_many(run_id=run_id, key=DEFERRED_XCOM, task_ids=LEASE_TASK, dag_ids=DAG_ID))
        line = XComModel.deserialize_value(xcom) if xcom is not None else "deferred: the cycle lease was held by another run"
        return Outcome("deferred", run_id, line)


def check_conf(conf: dict, dag) -> None:
    """Refuse run parameters the DAG does not declare, or of the wrong kind, before any run is made (one line,
    exit status 2): the same check the tasks make, so a typo never becomes a failed run in the UI."""
    from mdsync.errors import ConfigError
    from mdsync_airflow.params import validate_conf

    try:
        validate_conf(conf, dag.params)
    except ConfigError as exc:
        raise InputError(f"{exc}; e.g. {EXAMPLE}") from None


def run_in_process(conf: dict, dag_folder: str | None = None, dag=None) -> Outcome:
    """The run in this process with ``dag.test()`` (no scheduler needed). Ctrl-C gives back the cycle lease
    this process holds (its teardown cannot run)."""
    dag = dag or _load_dag(dag_folder)
    try:
        run = dag.test(run_conf=conf)
    except KeyboardInterrupt:
        _release_own_lease()
        raise
    return _outcome(run.run_id)


def _release_own_lease() -> None:
    import socket

    from mdsync.lease import CycleLease
    from mdsync.state.database import create_engine, default_state_url

    try:
        before = CycleLease(create_engine(default_state_url())).release_process(socket.gethostname(), os.getpid())
    except Exception as exc:  # the store is unreachable: the lease lapses after its TTL
        print(f"could not give back the cycle lease ({exc}); it lapses by itself", file=sys.stderr)
        return
    if before is not None:
        print(f"interrupted: gave back the cycle lease of run {before.run_id!r}", file=sys.stderr)


def run_through_scheduler(conf: dict, scheduler, poll_s: float = 2.0, say=print) -> Outcome:
    """Trigger the run through the live ``scheduler`` and wait for its end (the scheduler runs its tasks, with
    the connections and settings of the scheduler's environment)."""
    import sqlalchemy as sa
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.configuration import conf as airflow_conf
    from airflow.exceptions import DagNotFound
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType

    where = f"a scheduler is running on this AIRFLOW_HOME ({os.environ.get('AIRFLOW_HOME', '~/airflow')}, " \
            f"host {scheduler.hostname})"
    with create_session() as session:
        model = session.scalar(sa.select(DagModel).where(DagModel.dag_id == DAG_ID))
        if model is None:
            raise InputError(f"{where}, but it does not know the DAG {DAG_ID!r} (is its DAG folder this checkout?)")
        if model.is_paused:
            raise InputError(
                f"{where} and {DAG_ID} is paused there, so it would not start this run (and running it here as well "
                f"could run its tasks twice): unpause it (.venv/bin/airflow dags unpause {DAG_ID}) and run make sync "
                f"again, or stop the scheduler")
    try:
        run = trigger_dag(DAG_ID, triggered_by=DagRunTriggeredByType.CLI, conf=conf,
                          triggering_user_name=os.environ.get("USER") or "make sync")
    except DagNotFound as exc:
        raise InputError(f"{where}, but it cannot run the DAG: {exc}") from None
    run_id = run.run_id
    logs = os.path.join(airflow_conf.get("logging", "base_log_folder"), f"dag_id={DAG_ID}", f"run_id={run_id}")
    ui = (airflow_conf.get("api", "base_url", fallback=None) or "http://localhost:8080").rstrip("/")
    say(f"{where}: triggered run {run_id} through it (its tasks use the scheduler's connections and settings); "
        f"waiting for it to end")
    say(f"  task logs: {logs}/  (UI: {ui}/dags/{DAG_ID}/runs/{run_id})")
    finished = {DagRunState.SUCCESS, DagRunState.FAILED}
    last = None
    try:
        while True:
            with create_session() as session:
                state = session.scalar(sa.select(DagRun.state).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id))
            if state in finished:
                return _outcome(run_id)
            if state != last:
                say(f"  run {run_id}: {getattr(state, 'value', state)}")
                last = state
            time.sleep(poll_s)
    except KeyboardInterrupt:
        say(f"stopped waiting; run {run_id} goes on in the scheduler (see its logs above)")
        raise


def run_once(conf: dict | None = None, dag_folder: str | None = None) -> str:
    """One run now, through the live scheduler if there is one, else in this process; returns how it ended:
    ``success``, ``failed`` or ``deferred``."""
    return run(conf or {}, dag_folder).state


def run(conf: dict, dag_folder: str | None = None, say=print) -> Outcome:
    """One run now; bad parameters are refused first (:class:`InputError`), whoever would run it."""
    dag = _load_dag(dag_folder)
    check_conf(conf, dag)
    scheduler = live_scheduler()
    if scheduler is not None:
        return run_through_scheduler(conf, scheduler, say=say)
    return run_in_process(conf, dag=dag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mdsync_airflow.run_once", description=__doc__.splitlines()[0])
    parser.add_argument("--conf", default="{}", help='run parameters as JSON, e.g. \'{"dry_run": true}\'')
    args = parser.parse_args(argv)
    try:
        outcome = run(parse_conf(args.conf))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if outcome.state == "deferred":
        print(f"{DAG_ID}: run {outcome.run_id} {outcome.line}")
        return 1
    print(f"{DAG_ID}: run {outcome.run_id} finished: {outcome.state}")
    return 0 if outcome.state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())

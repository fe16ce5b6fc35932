"""Run one cycle of the sync DAG now, in this process (``make sync``); exit status 1 when the run fails.

``python -m mdsync_airflow.run_once [--conf '{"dry_run": true}']``
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DAG_ID = "marketo_dynamics_sync"


def run_once(conf: dict | None = None, dag_folder: str | None = None) -> str:
    """Run the DAG once with ``dag.test()`` (a manual run, no scheduler needed); returns the run's state."""
    from airflow.dag_processing.dagbag import DagBag

    folder = dag_folder or os.environ.get("AIRFLOW__CORE__DAGS_FOLDER")
    bag = DagBag(dag_folder=folder) if folder else DagBag()
    if bag.import_errors:
        raise RuntimeError(f"the DAG folder has import errors: {bag.import_errors}")
    dag = bag.get_dag(DAG_ID)
    if dag is None:
        raise RuntimeError(f"DAG {DAG_ID!r} not found in {folder}")
    run = dag.test(run_conf=conf or {})
    state = getattr(run.state, "value", run.state)
    return str(state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mdsync_airflow.run_once", description=__doc__.splitlines()[0])
    parser.add_argument("--conf", default="{}", help='run parameters as JSON, e.g. \'{"dry_run": true}\'')
    args = parser.parse_args(argv)
    state = run_once(json.loads(args.conf))
    print(f"{DAG_ID}: run finished: {state}")
    return 0 if state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())

"""Tasks start warm: ``scripts/airflow-env.sh`` has the scheduler's LocalExecutor start its workers from a
forkserver that preloaded pandas and the engine, so a task forked from a worker does not import them again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Airflow's own start-up code (scheduler_command calls set_component_mp_start_method("scheduler")), then a
# worker process as the LocalExecutor makes one, reporting what it finds already imported.
PROBE = """
import json, multiprocessing, sys
from airflow.utils.process_utils import set_component_mp_start_method

def worker(queue):
    queue.put({"pandas": "pandas" in sys.modules, "engine": "mdsync.cycle" in sys.modules})

if __name__ == "__main__":
    set_component_mp_start_method("scheduler")
    queue = multiprocessing.SimpleQueue()
    process = multiprocessing.Process(target=worker, args=(queue,))
    process.start()
    process.join()
    print(json.dumps({"method": multiprocessing.get_start_method(), **queue.get()}))
"""


def airflow_env(home: Path) -> dict[str, str]:
    """The variables ``scripts/airflow-env.sh`` exports (sourced in bash, as the make targets do), for an
    ``AIRFLOW_HOME`` whose metadata database counts as migrated (only the variables matter here)."""
    (home / ".db-migrated").touch()
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__SCHEDULER__MP")}
    out = subprocess.run(["bash", "-c", "source scripts/airflow-env.sh >/dev/null && env -0"], cwd=ROOT,
                         capture_output=True, check=True, env={**base, "AIRFLOW_HOME": str(home)})
    pairs = (item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
    return dict(pairs)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return airflow_env(tmp_path_factory.mktemp("airflow-home"))


def test_the_scheduler_uses_a_forkserver_that_preloads_pandas_and_the_engine(env):
    assert env["AIRFLOW__SCHEDULER__MP_START_METHOD"] == "forkserver"
    preload = env["AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD"].split(",")
    assert {"pandas", "pyarrow.parquet", "mdsync.cycle"} <= set(preload)


def test_every_preloaded_module_imports_from_a_plain_interpreter(env):
    # the forkserver starts with the default sys.path (Python 3.11 drops the parent's): a module that only
    # imports from this checkout's folders would be skipped silently there
    modules = env["AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD"].split(",")
    clean = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", f"import {', '.join(modules)}"], cwd="/", env=clean,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.slow
def test_a_worker_started_the_way_the_scheduler_starts_it_has_the_engine_imported(env, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    run = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, env={k: v for k, v in env.items()
                                                                            if k != "PYTHONPATH"},
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found == {"method": "forkserver", "pandas": True, "engine": True}

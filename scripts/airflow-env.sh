# Sourced by the make targets that run Airflow: a project-local AIRFLOW_HOME (.airflow/) that reads the
# DAG and plugins from this checkout. Variables already set in the environment win.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# `airflow standalone` starts its components as `airflow …` from PATH
export PATH="$root/.venv/bin:$PATH"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$root/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$root/dags}"
export AIRFLOW__CORE__PLUGINS_FOLDER="${AIRFLOW__CORE__PLUGINS_FOLDER:-$root/plugins}"
export AIRFLOW__CORE__LOAD_EXAMPLES="${AIRFLOW__CORE__LOAD_EXAMPLES:-False}"
# Tasks start warm: the scheduler's LocalExecutor starts its workers from a forkserver that imported these
# modules once (Airflow 3.3 [scheduler] mp_start_method / mp_forkserver_preload), and each task is forked from a
# worker, so it does not import pandas and the engine again (about 5 s per task on a slow 2-core machine).
# The engine's code is loaded when the scheduler starts: restart it after upgrading the engine.
export AIRFLOW__SCHEDULER__MP_START_METHOD="${AIRFLOW__SCHEDULER__MP_START_METHOD:-forkserver}"
export AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD="${AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD:-airflow,airflow.executors.local_executor,pandas,pyarrow.parquet,mdsync.cycle}"
mkdir -p "$AIRFLOW_HOME"
if [ ! -f "$AIRFLOW_HOME/.db-migrated" ]; then
  "$root/.venv/bin/airflow" db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 \
    || { echo "error: 'airflow db migrate' failed; see $AIRFLOW_HOME/db-migrate.log" >&2; return 1 2>/dev/null || exit 1; }
  touch "$AIRFLOW_HOME/.db-migrated"
fi

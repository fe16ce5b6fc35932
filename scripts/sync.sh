#!/usr/bin/env bash
# `make sync`: one manual run of the DAG now (through the running scheduler when there is one on this
# AIRFLOW_HOME, else in-process). Uses AIRFLOW_CONN_MARKETO_DEFAULT and AIRFLOW_CONN_DYNAMICS_DEFAULT from the
# environment as given; only when neither is set, the running sandbox's (.sandbox/connections.env, or the file
# in MDSYNC_SANDBOX_ENV). Exit status: 0 synced, 1 the run failed or deferred, 2 bad input.
set -euo pipefail
cd "$(dirname "$0")/.."
sandbox_env="${MDSYNC_SANDBOX_ENV:-.sandbox/connections.env}"
marketo="${AIRFLOW_CONN_MARKETO_DEFAULT:-}"
dynamics="${AIRFLOW_CONN_DYNAMICS_DEFAULT:-}"
missing() {
  echo "error: $1 is set but $2 is not: set $2 as well (README: Pointing it at real Marketo and Dynamics), or unset $1 to use the sandbox's; a connection that is set is never replaced" >&2
  exit 2
}
if [ -n "$marketo" ] && [ -z "$dynamics" ]; then
  missing AIRFLOW_CONN_MARKETO_DEFAULT AIRFLOW_CONN_DYNAMICS_DEFAULT
elif [ -z "$marketo" ] && [ -n "$dynamics" ]; then
  missing AIRFLOW_CONN_DYNAMICS_DEFAULT AIRFLOW_CONN_MARKETO_DEFAULT
elif [ -z "$marketo" ]; then
  if [ -f "$sandbox_env" ]; then
    echo "neither AIRFLOW_CONN_MARKETO_DEFAULT nor AIRFLOW_CONN_DYNAMICS_DEFAULT is set: using the sandbox's ($sandbox_env)"
    # shellcheck disable=SC1090
    source "$sandbox_env"
  else
    echo "error: set AIRFLOW_CONN_MARKETO_DEFAULT and AIRFLOW_CONN_DYNAMICS_DEFAULT, or start 'make sandbox' first (no $sandbox_env)" >&2
    exit 2
  fi
fi
source scripts/airflow-env.sh
exec .venv/bin/python -m mdsync_airflow.run_once "$@"

#!/usr/bin/env bash
# `make sync`: one manual run of the DAG now. Uses AIRFLOW_CONN_MARKETO_DEFAULT / AIRFLOW_CONN_DYNAMICS_DEFAULT
# from the environment, or the running sandbox's connections when they are not set.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/airflow-env.sh
if [ -z "${AIRFLOW_CONN_MARKETO_DEFAULT:-}" ] || [ -z "${AIRFLOW_CONN_DYNAMICS_DEFAULT:-}" ]; then
  if [ -f .sandbox/connections.env ]; then
    echo "no connections in the environment: using the sandbox's (.sandbox/connections.env)"
    source .sandbox/connections.env
  else
    echo "error: set AIRFLOW_CONN_MARKETO_DEFAULT and AIRFLOW_CONN_DYNAMICS_DEFAULT, or start 'make sandbox' first" >&2
    exit 2
  fi
fi
exec .venv/bin/python -m mdsync_airflow.run_once "$@"

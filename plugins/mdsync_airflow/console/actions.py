"""Actions that start runs of the sync (retry selected errors, preview or start an undo), through Airflow's REST
API with the caller's own token: Airflow checks the permission again, records who triggered the run, and the run
is made exactly as one triggered from the UI.
"""

from __future__ import annotations

import logging
import os

import requests
from fastapi import HTTPException, Request

from mdsync_airflow.run_once import DAG_ID

log = logging.getLogger(__name__)

#: where the console reaches Airflow's REST API (default: the API server that serves the console, on loopback)
API_URL_ENV = "MDSYNC_CONSOLE_AIRFLOW_API"


def _token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get("_token", "")


def airflow_api(request: Request, airflow_root: str) -> str:
    """Airflow's REST API base: ``MDSYNC_CONSOLE_AIRFLOW_API`` or the server this request reached, on loopback."""
    if os.environ.get(API_URL_ENV):
        return os.environ[API_URL_ENV].rstrip("/")
    host, port = request.scope.get("server") or ("127.0.0.1", 8080)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{request.url.scheme}://{host}:{port}{airflow_root}"


def trigger_run(request: Request, airflow_root: str, conf: dict, note: str) -> dict:
    """Start a manual run of the sync with ``conf`` (its params) and a note; returns Airflow's answer.

    :raises HTTPException: Airflow refused (its status and message are passed on) or could not be reached (502).
    """
    url = f"{airflow_api(request, airflow_root)}/api/v2/dags/{DAG_ID}/dagRuns"
    try:
        response = requests.post(url, json={"logical_date": None, "conf": conf, "note": note}, timeout=30,
                                 headers={"Authorization": f"Bearer {_token(request)}"})
    except requests.RequestException as exc:
        raise HTTPException(502, f"could not reach Airflow's REST API at {url}: {type(exc).__name__}; set "
                                 f"{API_URL_ENV} to its address") from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:300]
        raise HTTPException(response.status_code, f"Airflow refused to start the run: {detail}")
    run = response.json()
    log.info("console started run %s of %s with %s", run.get("dag_run_id"), DAG_ID, conf)
    return run


def paused_note() -> str:
    """A sentence for a run just started while the DAG is paused (Airflow keeps it queued until it is unpaused)."""
    from mdsync_airflow.console import sources

    if sources.next_run().get("paused"):
        return f" The DAG {DAG_ID} is paused: the run stays queued until you unpause it."
    return ""

"""Where the console's data comes from: the state store, the sync config, Airflow's metadata and both services.

The API server is long-lived: the state store is opened (and its schema upgraded) once per URL, and the clients
are built once from the ``marketo_default`` / ``dynamics_default`` connections (Airflow reads them from its
metadata database, the environment or any secrets backend, as for the tasks).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

from mdsync_airflow.run_once import DAG_ID

log = logging.getLogger(__name__)

#: the tasks whose waiting states the console reports (the approval of a held mass change, the lease)
APPROVAL_TASK = "approve_mass_change"
LEASE_TASK = "hold_lease"


def settings():
    from mdsync.settings import Settings

    return Settings.from_env()


def staging_root():
    """The staging area as the cycle's tasks see it (an ``ObjectStoragePath``: a local folder or object storage,
    e.g. ``s3://<connection>@bucket/staging``), where the last schema refresh keeps the field access."""
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(settings().staging_url)


@functools.lru_cache(maxsize=4)
def _store(url: str):
    from mdsync.state import open_store

    return open_store(url)


def store():
    """The sync's state store (``MDSYNC_STATE_URL``, as the tasks use it), upgraded once per URL."""
    return _store(settings().state_url)


@functools.lru_cache(maxsize=4)
def _config(path: str | None):
    from mdsync.config import load_config

    return load_config(path)


def config():
    """The sync config (``MDSYNC_CONFIG`` or the shipped ``sync.yaml``)."""
    return _config(settings().config_path)


_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def marketo_client():
    """A Marketo client from the ``marketo_default`` connection (built once; tokens are cached by the client)."""
    with _clients_lock:
        if "marketo" not in _clients:
            from mdsync_airflow.hooks.marketo import MarketoHook

            _clients["marketo"] = MarketoHook().get_client()
        return _clients["marketo"]


def dynamics_client():
    """A Dataverse client from the ``dynamics_default`` connection (built once)."""
    with _clients_lock:
        if "dynamics" not in _clients:
            from mdsync_airflow.hooks.dynamics import DynamicsHook

            _clients["dynamics"] = DynamicsHook().get_client()
        return _clients["dynamics"]


def reset_clients() -> None:
    """Forget the built clients (after the connections changed; tests)."""
    with _clients_lock:
        _clients.clear()


class TTLCache:
    """One value per key for ``ttl_s`` seconds (Marketo's usage numbers cost an API call: not one per page view)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s, self._items, self._lock = ttl_s, {}, threading.Lock()

    def get(self, key, compute):
        now = time.monotonic()
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and now - hit[0] < self.ttl_s:
                return hit[1]
        value = compute()
        with self._lock:
            self._items[key] = (now, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# -- Airflow's metadata --------------------------------------------------------------------------------

def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def dag_runs(limit: int = 20, run_ids: list[str] | None = None, offset: int = 0) -> list[dict]:
    """The sync's latest DAG runs from Airflow (state, type, times, conf), newest first."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    query = select(DagRun).where(DagRun.dag_id == DAG_ID)
    if run_ids is not None:
        query = query.where(DagRun.run_id.in_(run_ids))
    query = query.order_by(DagRun.id.desc()).limit(limit).offset(offset)
    with create_session() as session:
        return [{"run_id": r.run_id, "state": str(getattr(r.state, "value", r.state)),
                 "run_type": str(getattr(r.run_type, "value", r.run_type)), "queued_at": _iso(r.queued_at),
                 "start_date": _iso(r.start_date), "end_date": _iso(r.end_date), "conf": r.conf or {},
                 "triggered_by": str(getattr(r.triggered_by, "value", r.triggered_by) or "") or None}
                for r in session.scalars(query)]


def waiting_tasks() -> dict[str, list[dict]]:
    """Runs waiting on someone or something: a held mass change (its approval task is deferred, waiting for an
    answer on the Required Actions page) and runs waiting for the cycle lease (their first task still running
    or deferred)."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    query = select(TaskInstance.run_id, TaskInstance.task_id, TaskInstance.state, TaskInstance.start_date).where(
        TaskInstance.dag_id == DAG_ID, TaskInstance.task_id.in_([APPROVAL_TASK, LEASE_TASK]),
        TaskInstance.state.in_(["deferred", "running", "up_for_reschedule", "up_for_retry"]))
    out: dict[str, list[dict]] = {"mass_change": [], "lease": []}
    with create_session() as session:
        for run_id, task_id, state, start in session.execute(query):
            state = str(getattr(state, "value", state))
            item = {"run_id": run_id, "state": state, "since": _iso(start)}
            if task_id == APPROVAL_TASK and state == "deferred":
                out["mass_change"].append(item)
            elif task_id == LEASE_TASK:
                out["lease"].append(item)
    return out


def next_run() -> dict:
    """When the scheduler makes the next run, and whether the DAG is paused (None when Airflow does not know
    the DAG yet)."""
    from airflow.models import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        dag = session.get(DagModel, DAG_ID)
        if dag is None:
            return {"known": False, "paused": None, "next_run_after": None}
        return {"known": True, "paused": bool(dag.is_paused), "next_run_after": _iso(dag.next_dagrun_create_after)}

"""Airflow-side wiring of a cycle: the run's context -> :class:`mdsync.cycle.Cycle` with hook-built clients."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mdsync.cycle import Cycle, RunInfo
from mdsync.results import RunManifest


def run_info(context: dict[str, Any]) -> RunInfo:
    """What the cycle needs from the task context.

    A manual run may have no logical date and no data interval (DESIGN §10): the window then starts at the
    state store's watermark.
    """
    dag_run = context["dag_run"]
    params = context.get("params") or {}
    run_type = getattr(dag_run, "run_type", "manual")
    run_type = getattr(run_type, "value", run_type)
    start: datetime | None = context.get("data_interval_start")
    end: datetime | None = context.get("data_interval_end")
    if run_type == "manual":
        start = end = None  # a manual run syncs from the watermark to now
    ids = params.get("person_ids") or []
    return RunInfo(
        run_id=context["run_id"], run_type=str(run_type), window_start=start, window_end=end,
        dry_run=bool(params.get("dry_run")), full_resync=bool(params.get("full_resync")),
        person_ids=[int(i) for i in ids], sync_as=params.get("sync_as") or None,
        retry_failed=bool(params.get("retry_failed")),
    )


def cycle_for(context: dict[str, Any]) -> Cycle:
    """A :class:`Cycle` for this task: clients from the ``marketo_default`` / ``dynamics_default`` connections,
    staging under ``MDSYNC_STAGING_URL`` as an ``ObjectStoragePath`` (local folder or object storage)."""
    from airflow.sdk import ObjectStoragePath

    from mdsync.settings import Settings
    from mdsync_airflow.hooks.dynamics import DynamicsHook
    from mdsync_airflow.hooks.marketo import MarketoHook

    settings = Settings.from_env()
    return Cycle(
        run_info(context),
        marketo_client=lambda: MarketoHook().get_client(),
        dynamics_client=lambda: DynamicsHook().get_client(),
        staging_root=ObjectStoragePath(settings.staging_url),
        settings=settings,
    )


def manifest_of(context: dict[str, Any], **results) -> RunManifest:
    """The run's :class:`~mdsync.results.RunManifest` from upstream tasks' XCom results (``plans`` may hold
    ``None`` for entity types the config does not sync)."""
    if "plans" in results:
        results["plans"] = [p for p in results["plans"] or [] if p]
    return RunManifest.model_validate({"run_id": context["run_id"], **results})

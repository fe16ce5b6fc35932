"""The console's JSON API (``/mdsync/api/...``): the same data as the pages, for scripts and dashboards.

Every route requires an Airflow user who may read the sync DAG's runs (:data:`.auth.can_read`); routes that start
runs require permission to trigger it (:data:`.auth.can_trigger`).
"""

from __future__ import annotations

from fastapi import APIRouter

from mdsync_airflow.console import health as health_data
from mdsync_airflow.console.auth import can_read

router = APIRouter()


@router.get("/health", dependencies=[can_read])
def health() -> dict:
    """Recent runs with counts per side, API calls today against the daily quotas, records synced and calls per
    run (last day) and per hour (last week), what is waiting, and the next run."""
    return health_data.health()

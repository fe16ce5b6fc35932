"""Runtime settings of a sync deployment, read in one place (environment variables, with defaults).

| variable | default | meaning |
| --- | --- | --- |
| ``MDSYNC_CONFIG`` | ``include/config/sync.yaml`` | the sync config (fields, directions, policies) |
| ``MDSYNC_STATE_URL`` | ``sqlite:///$AIRFLOW_HOME/mdsync/state.sqlite`` | the state store (use PostgreSQL across machines) |
| ``MDSYNC_STAGING_URL`` | ``file://$AIRFLOW_HOME/mdsync/staging`` | where tasks hand frames to each other (``s3://…`` etc.) |
| ``MDSYNC_OVERLAP_SECONDS`` | ``120`` | how far before the watermark extraction starts (clock skew, 1 s resolution) |
| ``MDSYNC_SCHEMA_CACHE_MINUTES`` | ``60`` | how long a field-access refresh (describe both sides) is reused |
| ``MDSYNC_FULL_LOOKBACK_DAYS`` | ``0`` | a full reconcile also bulk-exports Marketo persons updated in this many days |
| ``MDSYNC_BULK_POLL_SECONDS`` | ``5`` | how often a Marketo bulk export or import job is polled (docs: 5-30 s) |
| ``MDSYNC_BOOTSTRAP_SINCE`` | found | a full reconcile exports persons created since this date (default: the oldest person's) |
| ``MDSYNC_MARKETO_BULK_THRESHOLD`` | ``3000`` | Marketo writes of more records than this go through the Bulk Lead Import |
| ``MDSYNC_MAX_CHANGE_PAGES`` | ``10`` | pages of Marketo lead changes read before a window switches to a bulk activity export |
| ``MDSYNC_LOG_LIMIT`` | ``10000`` | activity lines a task writes to its log (all of them go to the state store) |
| ``MDSYNC_KEEP_STAGING`` | off | keep a successful run's staged frames (failed runs always keep theirs) |
| ``MDSYNC_GUARD_MAX_RECORDS`` | ``5000`` | mass-change guard: a run writing more records than this to one side … |
| ``MDSYNC_GUARD_MAX_PERCENT`` | ``10`` | … and more than this % of that side's linked records asks for approval (:mod:`mdsync.guard`) |
| ``MDSYNC_GUARD_TIMEOUT_MINUTES`` | ``10`` | how long it waits for an answer; then it writes nothing (the changes stay for the next cycle) |
| ``MDSYNC_LEASE_TTL_SECONDS`` | ``900`` | the cycle lease lapses this long after its holder last renewed it (:mod:`mdsync.lease`) |
| ``MDSYNC_LEASE_WAIT_SECONDS`` | ``300`` | how long a run waits for a lease another run holds before it defers |
| ``MDSYNC_LEASE_POLL_SECONDS`` | ``5`` | how often a waiting run tries to take the lease |
| ``MDSYNC_MARKETO_DAILY_QUOTA`` | ``50000`` | the subscription's daily API calls (the console's health page; Marketo's default) |
| ``MDSYNC_DYNAMICS_DAILY_REQUESTS`` | ``40000`` | the sync user's Power Platform requests per 24 h (the console's health page) |
| ``MDSYNC_LIMITS_URL`` | unset | ``redis://host:port/db``: the services' call limits are shared by every process using that Redis (:mod:`mdsync.limits`); unset: per process |
| ``MDSYNC_LIMITS_LEASE_SECONDS`` | ``30`` | with shared limits: a concurrency slot of a process that died frees itself this long after its last renewal |
| ``MDSYNC_DYNAMICS_REQUESTS_PER_WINDOW`` | ``5000`` | with shared limits: Dataverse requests per window per user for the deployment (service: 6,000 per 300 s) |
| ``MDSYNC_DYNAMICS_WINDOW_SECONDS`` | ``300`` | … that window (the service's sliding window is 300 s) |
| ``MDSYNC_DYNAMICS_MAX_CONCURRENT`` | ``40`` | with shared limits: Dataverse requests in flight per user for the deployment (service: 52) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mdsync.state.database import default_state_url


def _airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME", Path.home() / "airflow"))


@dataclass(frozen=True)
class Settings:
    config_path: str | None
    state_url: str
    staging_url: str
    overlap_seconds: int
    schema_cache_minutes: int
    full_lookback_days: float
    bulk_poll_seconds: float
    keep_staging: bool
    bootstrap_since: datetime | None = None
    marketo_bulk_threshold: int = 3000
    log_limit: int | None = 10000
    max_change_pages: int = 10
    guard_max_records: int = 5000
    guard_max_percent: float = 10.0
    guard_timeout_minutes: float = 10.0
    lease_ttl_seconds: float = 900.0
    lease_wait_seconds: float = 300.0
    lease_poll_seconds: float = 5.0
    marketo_daily_quota: int = 50000
    dynamics_daily_requests: int = 40000
    limits_url: str | None = None
    limits_lease_seconds: float = 30.0
    dynamics_requests_per_window: int = 5000
    dynamics_window_seconds: float = 300.0
    dynamics_max_concurrent: int = 40

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            config_path=os.environ.get("MDSYNC_CONFIG"),
            state_url=default_state_url(),
            staging_url=os.environ.get("MDSYNC_STAGING_URL") or f"file://{_airflow_home() / 'mdsync' / 'staging'}",
            overlap_seconds=int(os.environ.get("MDSYNC_OVERLAP_SECONDS", "120")),
            schema_cache_minutes=int(os.environ.get("MDSYNC_SCHEMA_CACHE_MINUTES", "60")),
            full_lookback_days=float(os.environ.get("MDSYNC_FULL_LOOKBACK_DAYS", "0")),
            bulk_poll_seconds=float(os.environ.get("MDSYNC_BULK_POLL_SECONDS", "5")),
            keep_staging=os.environ.get("MDSYNC_KEEP_STAGING", "").lower() in ("1", "true", "yes"),
            bootstrap_since=_datetime(os.environ.get("MDSYNC_BOOTSTRAP_SINCE")),
            marketo_bulk_threshold=int(os.environ.get("MDSYNC_MARKETO_BULK_THRESHOLD", "3000")),
            log_limit=int(os.environ.get("MDSYNC_LOG_LIMIT", "10000")) or None,
            max_change_pages=int(os.environ.get("MDSYNC_MAX_CHANGE_PAGES", "10")),
            guard_max_records=int(os.environ.get("MDSYNC_GUARD_MAX_RECORDS", "5000")),
            guard_max_percent=float(os.environ.get("MDSYNC_GUARD_MAX_PERCENT", "10")),
            guard_timeout_minutes=float(os.environ.get("MDSYNC_GUARD_TIMEOUT_MINUTES", "10")),
            lease_ttl_seconds=float(os.environ.get("MDSYNC_LEASE_TTL_SECONDS", "900")),
            lease_wait_seconds=float(os.environ.get("MDSYNC_LEASE_WAIT_SECONDS", "300")),
            lease_poll_seconds=float(os.environ.get("MDSYNC_LEASE_POLL_SECONDS", "5")),
            marketo_daily_quota=int(os.environ.get("MDSYNC_MARKETO_DAILY_QUOTA", "50000")),
            dynamics_daily_requests=int(os.environ.get("MDSYNC_DYNAMICS_DAILY_REQUESTS", "40000")),
            limits_url=os.environ.get("MDSYNC_LIMITS_URL") or None,
            limits_lease_seconds=float(os.environ.get("MDSYNC_LIMITS_LEASE_SECONDS", "30")),
            dynamics_requests_per_window=int(os.environ.get("MDSYNC_DYNAMICS_REQUESTS_PER_WINDOW", "5000")),
            dynamics_window_seconds=float(os.environ.get("MDSYNC_DYNAMICS_WINDOW_SECONDS", "300")),
            dynamics_max_concurrent=int(os.environ.get("MDSYNC_DYNAMICS_MAX_CONCURRENT", "40")),
        )


def _datetime(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)

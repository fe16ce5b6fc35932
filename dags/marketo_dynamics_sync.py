"""
# Marketo Engage ⇄ Dynamics 365 sync

Every 5 minutes this DAG keeps Marketo persons and Dynamics 365 (Dataverse) leads and contacts in sync, both
ways. Each run is one cycle:

1. **refresh_schema** — describe both sides; mapped fields the sync user cannot read or update are dropped
   for the run (and logged). Reused for an hour (`MDSYNC_SCHEMA_CACHE_MINUTES`).
2. **extract_marketo** ∥ **extract_dynamics** — what changed since the watermark: Marketo lead-change and
   deleted-lead activities (then the changed persons in full), Dataverse change tracking (delta links).
3. **identify** — keep links, rebuild lost ones from the link fields, match new records by email, create
   persons in Marketo for new Dynamics leads/contacts and Dynamics records for persons marked for sync.
4. **plan** (per entity type) — three-way diff against the last synced values; collisions go to
   **Marketo for leads** and **Dynamics for contacts**.
5. **load_dynamics** → **load_marketo** — batched writes; rejected values are kept per field, logged, and
   also written to the person's Marketo activity log.
6. **commit** — baselines, activity, errors and watermarks in one transaction.
7. **report** — a per-entity summary with API calls used.

Every decision is one line in the task logs and one row in the state store's `activity` table
(`make activity EMAIL=…`).

**Manual runs** take parameters: `dry_run` (plan and log, write nothing), `full_resync`, `person_ids`
(sync these persons now, creating them in Dynamics if unlinked), `sync_as` (`lead`/`contact`),
`retry_failed` (re-send values the target rejected before).

**Backfills** (`airflow backfill create --dag-id marketo_dynamics_sync --from-date … --to-date …`) replay
past 5-minute windows safely: runs are serialised and every cycle is idempotent.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

ENTITY_TYPES = ["lead", "contact"]
# Retries ride out outages longer than the clients' own backoff; overridable (e.g. in tests) by environment.
RETRIES = int(os.environ.get("MDSYNC_TASK_RETRIES", "3"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("MDSYNC_RETRY_DELAY_SECONDS", "30")))


@dag(
    dag_id="marketo_dynamics_sync",
    # Real 5-minute data intervals (a plain cron string gives zero-width intervals in Airflow 3).
    schedule=CronDataIntervalTimetable("*/5 * * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=60),
    default_args={
        "retries": RETRIES,
        "retry_delay": RETRY_DELAY,
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=5),
    },
    params={
        "dry_run": Param(False, type="boolean", title="Dry run", description="Plan and log everything, write nothing."),
        "full_resync": Param(False, type="boolean", title="Full resync",
                             description="Compare every linked record on both sides, not just recent changes."),
        "person_ids": Param([], type="array", items={"type": "integer"}, title="Marketo person ids",
                            description="Sync these persons now; unlinked ones are created in Dynamics."),
        "sync_as": Param("lead", type="string", enum=["lead", "contact"], title="Create as",
                         description="Dynamics record type for unlinked person_ids."),
        "retry_failed": Param(False, type="boolean", title="Retry failed",
                              description="Re-send values that Dynamics or Marketo rejected before."),
    },
    doc_md=__doc__,
    tags=["marketo", "dynamics365", "sync"],
)
def marketo_dynamics_sync():
    @task
    def refresh_schema(**context) -> dict:
        from mdsync_airflow.runtime import cycle_for

        return cycle_for(context).refresh_schema()

    @task
    def extract_marketo(schema: dict, **context) -> dict:
        from mdsync_airflow.runtime import cycle_for

        return cycle_for(context).extract_marketo(schema["access"])

    @task
    def extract_dynamics(schema: dict, **context) -> dict:
        from mdsync_airflow.runtime import cycle_for

        return cycle_for(context).extract_dynamics(schema["access"])

    @task
    def identify(schema: dict, marketo: dict, dynamics: dict, **context) -> dict:
        from mdsync_airflow.runtime import cycle_for

        return cycle_for(context).identify(schema["access"], marketo, dynamics)

    @task
    def plan(entity: str, schema: dict, identity: dict, **context) -> dict | None:
        from mdsync_airflow.runtime import cycle_for

        cycle = cycle_for(context)
        if entity not in cycle.config.entities:
            return None
        return cycle.plan(entity, schema["access"], identity)

    @task
    def load_dynamics(schema: dict, identity: dict, plans: list, **context) -> dict:
        from mdsync_airflow.runtime import cycle_for

        return cycle_for(context).load_dynamics(schema["access"], identity, [p for p in plans if p])

    @task
    def load_marketo(schema: dict, identity: dict, plans: list, dynamics_loaded: dict, **context) -> dict:
        from mdsync_airflow.runtime import cycle_for

        return cycle_for(context).load_marketo(schema["access"], identity, [p for p in plans if p], dynamics_loaded)

    @task
    def commit(marketo: dict, dynamics: dict, identity: dict, plans: list, dynamics_loaded: dict,
               marketo_loaded: dict, **context) -> dict:
        from mdsync_airflow.runtime import cycle_for

        return cycle_for(context).commit(marketo, dynamics, identity, [p for p in plans if p], dynamics_loaded,
                                         marketo_loaded)

    @task
    def report(schema: dict, marketo: dict, dynamics: dict, identity: dict, plans: list, dynamics_loaded: dict,
               marketo_loaded: dict, committed: dict, **context) -> dict:
        from mdsync_airflow.runtime import cycle_for

        cycle = cycle_for(context)
        calls = [schema["calls"], marketo["calls"], dynamics["calls"], identity["calls"], dynamics_loaded["calls"],
                 marketo_loaded["calls"]]
        summary = cycle.report(marketo, dynamics, identity, [p for p in plans if p], dynamics_loaded, marketo_loaded,
                               committed, calls)
        cycle.finish()
        return summary

    schema = refresh_schema()
    marketo = extract_marketo(schema)
    dynamics = extract_dynamics(schema)
    identity = identify(schema, marketo, dynamics)
    plans = [plan.override(task_id=f"plan_{entity}")(entity, schema, identity) for entity in ENTITY_TYPES]
    dynamics_loaded = load_dynamics(schema, identity, plans)
    marketo_loaded = load_marketo(schema, identity, plans, dynamics_loaded)
    committed = commit(marketo, dynamics, identity, plans, dynamics_loaded, marketo_loaded)
    report(schema, marketo, dynamics, identity, plans, dynamics_loaded, marketo_loaded, committed)


marketo_dynamics_sync()

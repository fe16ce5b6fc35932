"""
# Marketo Engage ⇄ Dynamics 365 sync

Every 5 minutes this DAG keeps Marketo persons and Dynamics 365 (Dataverse) leads and contacts in sync, both
ways. Each run is one cycle:

0. **hold_lease** — take the state store's **cycle lease**: one cycle at a time per state store, whatever
   starts it (scheduler, backfill, `make sync`, another deployment). While another run holds it, this run
   waits (`MDSYNC_LEASE_WAIT_SECONDS`, logging who holds it), then defers: the run is skipped with one line
   naming the holder; nothing was written and the next run picks up the window. Every task renews the lease
   and writes nothing without it.
1. **refresh_schema** — describe both sides; mapped fields the sync user cannot read or update are dropped
   for the run (and logged). Reused for an hour (`MDSYNC_SCHEMA_CACHE_MINUTES`).
2. **extract_marketo** ∥ **extract_dynamics** — what changed since the watermark: Marketo lead-change and
   deleted-lead activities for the mapped fields (then the changed persons in full; a large window in bulk),
   Dataverse change tracking (delta links). The first cycle and full reconciles read everything in bulk.
3. **identify** — keep links, rebuild lost ones from the link fields, match new records by email, and decide
   which persons and records to create (pure on frames; it only reads the few records it needs).
4. **plan** (per entity type) — three-way diff against the last synced values; collisions go to
   **Marketo for leads** and **Dynamics for contacts**.
4b. **check_mass_change** → **approve_mass_change** — the mass-change guard: a plan that would write more than
   `MDSYNC_GUARD_MAX_RECORDS` (5,000) records, or `MDSYNC_GUARD_MAX_PERCENT` (10 %) of the linked records if
   that is more, to one side writes nothing until someone approves on the Required Actions page; Reject or no
   answer in `MDSYNC_GUARD_TIMEOUT_MINUTES` (10) skips the loads and commit (the changes stay for the next
   cycle). Under the threshold, in a dry run or with `allow_mass_change`, the approval task just skips.
5. **load_dynamics** → **load_marketo** — creates and batched writes (large Marketo writes through the Bulk
   Lead Import); rejected values are kept per field, logged, and also written to the person's Marketo
   activity log.
6. **commit** — baselines, activity, errors and watermarks in one transaction.
7. **report** — a per-entity summary with API calls used (kept in the state store's `runs` table for the
   **Sync console**).
8. **release_lease** — a teardown: gives the lease back whether the run succeeded or failed.

Every decision is one line in the task logs and one row in the state store's `activity` table
(`make activity EMAIL=…`).

**Manual runs** take parameters: `dry_run` (plan and log, write nothing), `full_resync`, `person_ids`
(sync these persons now, creating them in Dynamics if unlinked), `sync_as` (`lead`/`contact`),
`retry_failed` (re-send values the target rejected before), `allow_mass_change` (write a mass change
without asking).

**Undo a run**: `undo_run` (an earlier run's id) restores, on both sides of each pair, the values that run wrote
where nobody changed them since (later changes are kept and listed; records it created are listed, not
deleted); with `dry_run` it only shows what it would restore.

**Backfills** (`airflow backfill create --dag-id marketo_dynamics_sync --max-active-runs 1 --from-date …
--to-date …`) replay past 5-minute windows one at a time (a backfill's own `max_active_runs` defaults to 10 and
ignores the DAG's; the lease keeps its runs, scheduled runs and `make sync` apart anyway), and every cycle is
idempotent.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

from mdsync_airflow.operators import MassChangeApprovalOperator

ENTITY_TYPES = ["lead", "contact"]
# Retries ride out outages longer than the clients' own backoff; overridable (e.g. in tests) by environment.
RETRIES = int(os.environ.get("MDSYNC_TASK_RETRIES", "3"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("MDSYNC_RETRY_DELAY_SECONDS", "30")))
# An Airflow pool for every task of the sync (create it first: `airflow pools set mdsync 2 "..."`): caps, or
# reserves, the worker slots the sync takes in a shared deployment. Unset: Airflow's default_pool.
POOL = os.environ.get("MDSYNC_POOL", "").strip() or None


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
        **({"pool": POOL} if POOL else {}),
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
                              description="Re-send values that Dynamics or Marketo rejected before (with Marketo "
                                          "person ids: only those persons' values)."),
        "undo_run": Param(None, type=["null", "string"], title="Undo a run",
                          description="The id of an earlier run: restore the values it wrote, on both sides, where "
                                      "nobody changed them since (with Dry run: show what it would restore)."),
        "allow_mass_change": Param(False, type="boolean", title="Allow a mass change",
                                   description="Write even when the plan is over the mass-change threshold, "
                                               "without asking for approval."),
    },
    doc_md=__doc__,
    tags=["marketo", "dynamics365", "sync"],
)
def marketo_dynamics_sync():
    # hold_lease (setup) -> the cycle's stages -> release_lease (teardown, also after a failure). Each stage
    # task runs one stage of mdsync.cycle.Cycle inside the run's cycle lease (mdsync_airflow.runtime.leased_cycle:
    # a task of a run that does not hold it writes nothing) and returns its typed result (mdsync.results) as
    # JSON; commit and report take the run's manifest (every result so far) instead of loose dicts.

    @task
    def hold_lease(**context) -> dict:
        from mdsync_airflow import runtime

        return runtime.hold_lease(context)

    @task
    def release_lease(**context) -> bool:
        from mdsync_airflow import runtime

        return runtime.release_lease(context)

    @task
    def refresh_schema(**context) -> dict:
        from mdsync_airflow.runtime import leased_cycle

        with leased_cycle(context) as cycle:
            return cycle.refresh_schema().dump()

    @task
    def extract_marketo(schema: dict, **context) -> dict:
        from mdsync_airflow.runtime import leased_cycle, manifest_of

        with leased_cycle(context) as cycle:
            return cycle.extract_marketo(manifest_of(context, schema=schema).schema_).dump()

    @task
    def extract_dynamics(schema: dict, **context) -> dict:
        from mdsync_airflow.runtime import leased_cycle, manifest_of

        with leased_cycle(context) as cycle:
            return cycle.extract_dynamics(manifest_of(context, schema=schema).schema_).dump()

    @task
    def identify(schema: dict, marketo: dict, dynamics: dict, **context) -> dict:
        from mdsync_airflow.runtime import leased_cycle, manifest_of

        m = manifest_of(context, schema=schema, marketo=marketo, dynamics=dynamics)
        with leased_cycle(context) as cycle:
            return cycle.identify(m.schema_, m.marketo, m.dynamics).dump()

    @task
    def plan(entity: str, schema: dict, identity: dict, **context) -> dict | None:
        from mdsync_airflow.runtime import leased_cycle, manifest_of

        with leased_cycle(context) as cycle:
            if entity not in cycle.config.entities:
                return None
            m = manifest_of(context, schema=schema, identity=identity)
            return cycle.plan(entity, m.schema_, m.identity).dump()

    @task
    def check_mass_change(run: dict, **context) -> dict:
        from mdsync_airflow.runtime import leased_cycle, manifest_of

        with leased_cycle(context) as cycle:
            allow = bool((context.get("params") or {}).get("allow_mass_change"))
            return cycle.check_guard(manifest_of(context, **run), allow).dump()

    # runs when approve_mass_change skipped (nothing to approve); a Reject skips it (and so the writes)
    @task(trigger_rule="none_failed_min_one_success")
    def load_dynamics(run: dict, **context) -> dict:
        from mdsync_airflow.runtime import leased_cycle, manifest_of

        with leased_cycle(context) as cycle:
            return cycle.load_dynamics(manifest_of(context, **run)).dump()

    @task
    def load_marketo(run: dict, **context) -> dict:
        from mdsync_airflow.runtime import leased_cycle, manifest_of

        with leased_cycle(context) as cycle:
            return cycle.load_marketo(manifest_of(context, **run)).dump()

    @task
    def commit(run: dict, **context) -> dict:
        from mdsync_airflow.runtime import leased_cycle, manifest_of

        with leased_cycle(context) as cycle:
            return cycle.commit(manifest_of(context, **run)).dump()

    @task(trigger_rule="none_failed_min_one_success")  # also when a rejected mass change skipped the writes
    def report(run: dict, **context) -> dict:
        from mdsync_airflow.operators import guard_outcome
        from mdsync_airflow.runtime import leased_cycle, manifest_of

        with leased_cycle(context) as cycle:
            summary = cycle.report(manifest_of(context, **{**run, "guard": guard_outcome(context, run["guard"])}))
            cycle.record_run(summary)
            cycle.finish()
            return summary

    lease = hold_lease()
    schema = refresh_schema()
    lease >> schema
    marketo = extract_marketo(schema)
    dynamics = extract_dynamics(schema)
    identity = identify(schema, marketo, dynamics)
    plans = [plan.override(task_id=f"plan_{entity}")(entity, schema, identity) for entity in ENTITY_TYPES]
    run = {"schema": schema, "marketo": marketo, "dynamics": dynamics, "identity": identity, "plans": plans}
    guard = check_mass_change(run)
    approval = MassChangeApprovalOperator(decision=guard)  # asks only when the guard says so
    dynamics_loaded = load_dynamics(run)
    approval >> dynamics_loaded
    run = {**run, "dynamics_loaded": dynamics_loaded}
    marketo_loaded = load_marketo(run)
    run = {**run, "marketo_loaded": marketo_loaded}
    committed = commit(run)
    summary = report({**run, "committed": committed, "guard": guard})
    summary >> release_lease().as_teardown(setups=lease)


marketo_dynamics_sync()

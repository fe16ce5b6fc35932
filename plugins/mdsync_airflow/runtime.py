"""Airflow-side wiring of a cycle: the run's context -> :class:`mdsync.cycle.Cycle` with hook-built clients,
inside the run's cycle lease (:mod:`mdsync.lease`).

- :func:`hold_lease` is the run's first task (a setup task): it brings the state store's schema up to date and
  takes the lease, waiting while another run holds it, or defers the run (the task is skipped, so is the run's
  work; nothing was written).
- :func:`leased_cycle` wraps every other task: it renews the lease (a task of a run that does not hold it fails
  at once and writes nothing), renews it every minute while the task runs, and fences the state store (every
  write transaction renews it first).
- :func:`release_lease` is the run's teardown: it gives the lease back whether the run succeeded or failed.

The lease tasks import neither pandas nor the engine's stages (each Airflow task is its own process).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mdsync.cycle import Cycle, RunInfo
    from mdsync.lease import CycleLease, Holder
    from mdsync.results import RunManifest
    from mdsync.settings import Settings
    from mdsync.state import StateStore

log = logging.getLogger("mdsync.lease")

#: the first task of a run, which takes the lease (``make sync`` reads a deferral from it)
LEASE_TASK = "hold_lease"
#: the XCom key under which a deferred run's first task leaves its one line (who holds the lease)
DEFERRED_XCOM = "deferred"


def run_info(context: dict[str, Any]) -> RunInfo:
    """What the cycle needs from the task context.

    A manual run may have no logical date and no data interval (DESIGN §10): the window then starts at the
    state store's watermark.
    """
    from mdsync.cycle import RunInfo
    from mdsync_airflow.params import run_params

    dag_run = context["dag_run"]
    params = run_params(context)  # unknown keys and values of the wrong kind: one line, no retries
    run_type = getattr(dag_run, "run_type", "manual")
    run_type = getattr(run_type, "value", run_type)
    start: datetime | None = context.get("data_interval_start")
    end: datetime | None = context.get("data_interval_end")
    if run_type == "manual":
        start = end = None  # a manual run syncs from the watermark to now
    return RunInfo(
        run_id=context["run_id"], run_type=str(run_type), window_start=start, window_end=end,
        dry_run=bool(params.get("dry_run")), full_resync=bool(params.get("full_resync")),
        person_ids=params["person_ids"], sync_as=params.get("sync_as") or None,
        retry_failed=bool(params.get("retry_failed")),
        undo_run=str(params.get("undo_run") or "").strip() or None,
    )


def cycle_for(context: dict[str, Any], store: StateStore | None = None, settings: Settings | None = None) -> Cycle:
    """A :class:`Cycle` for this task: clients from the ``marketo_default`` / ``dynamics_default`` connections,
    staging under ``MDSYNC_STAGING_URL`` as an ``ObjectStoragePath`` (local folder or object storage)."""
    from airflow.sdk import ObjectStoragePath

    from mdsync.cycle import Cycle
    from mdsync.settings import Settings
    from mdsync_airflow.hooks.dynamics import DynamicsHook
    from mdsync_airflow.hooks.marketo import MarketoHook

    settings = settings or Settings.from_env()
    return Cycle(
        run_info(context),
        marketo_client=lambda: MarketoHook().get_client(),
        dynamics_client=lambda: DynamicsHook().get_client(),
        staging_root=ObjectStoragePath(settings.staging_url),
        settings=settings,
        store=store,
    )


def manifest_of(context: dict[str, Any], **results) -> RunManifest:
    """The run's :class:`~mdsync.results.RunManifest` from upstream tasks' XCom results (``plans`` may hold
    ``None`` for entity types the config does not sync)."""
    from mdsync.results import RunManifest

    if "plans" in results:
        results["plans"] = [p for p in results["plans"] or [] if p]
    return RunManifest.model_validate({"run_id": context["run_id"], **results})


# -- the cycle lease ----------------------------------------------------------------------------------------


def holder_of(context: dict[str, Any]) -> Holder:
    """This run as the lease's holder: the same for every task and retry of the run."""
    from mdsync.lease import Holder

    dag_run = context["dag_run"]
    return Holder.of_run(dag_run.dag_id, context["run_id"], getattr(dag_run, "start_date", None))


def _lease(settings: Settings, engine=None) -> CycleLease:
    from mdsync.lease import CycleLease
    from mdsync.state.database import create_engine

    return CycleLease(engine if engine is not None else create_engine(settings.state_url),
                      ttl_s=settings.lease_ttl_seconds)


#: executors whose tasks all run on the scheduler's machine (one disk, one process tree)
ONE_MACHINE_EXECUTORS = {"LocalExecutor", "SequentialExecutor", "DebugExecutor"}


def deployment_warnings(settings: Settings, executors: str) -> list[str]:
    """What in the sync's settings assumes one machine while Airflow's executor spreads tasks over several.

    A CeleryExecutor or KubernetesExecutor deployment runs a run's tasks on different machines: staging on a
    local folder, a SQLite state store and per-process call limits then hold only on one of them. They still
    work on a single machine (or with a shared disk), so these are warnings, not errors.

    :param executors: ``[core] executor`` (one name, a comma-separated list, dotted paths or ``alias:path``).
    :returns: one line per setting that needs changing, naming the setting and what to set it to.
    """
    names = {part.split(":")[-1].rsplit(".", 1)[-1].strip() for part in executors.split(",") if part.strip()}
    distributed = sorted(names - ONE_MACHINE_EXECUTORS)
    if not distributed:
        return []
    where = f"[core] executor is {', '.join(distributed)}: a run's tasks may run on different machines, but"
    found = []
    if settings.staging_url.startswith("file://") or "://" not in settings.staging_url:
        found.append(f"{where} MDSYNC_STAGING_URL is a local folder ({settings.staging_url}); a task on another "
                     "machine will not find what the previous one staged. Set it to object storage, e.g. "
                     "s3://<connection id>@<bucket>/staging (README: Production deployment)")
    if settings.state_url.startswith("sqlite"):
        found.append(f"{where} the state store is SQLite (MDSYNC_STATE_URL unset or sqlite://); every worker "
                     "would keep its own. Set MDSYNC_STATE_URL to PostgreSQL (README: Production deployment)")
    if not settings.limits_url:
        found.append(f"{where} MDSYNC_LIMITS_URL is unset, so each worker keeps its own Marketo and Dataverse call "
                     "limits and two loading at once can trip 606/429. Set it to redis://<host>:<port>/<db>")
    return found


def hold_lease(context: dict[str, Any]) -> dict:
    """The run's first task: migrate the state store, then take the cycle lease, waiting up to
    ``MDSYNC_LEASE_WAIT_SECONDS`` while another run holds it; still held after that, the run defers (this task
    and all the run's work are skipped, with one line naming the holder)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from mdsync.lease import LeaseHeld
    from mdsync.settings import Settings
    from mdsync.state.database import create_engine, safe_url, upgrade

    from airflow.configuration import conf

    settings = Settings.from_env()
    for warning in deployment_warnings(settings, conf.get("core", "executor", fallback="LocalExecutor")):
        log.warning("%s", warning)
    engine = create_engine(settings.state_url)
    upgrade(engine, settings.state_url)
    _skip_while_quota_is_used_up(context, engine)
    lease = _lease(settings, engine)
    try:
        state = lease.acquire(holder_of(context), wait_s=settings.lease_wait_seconds,
                              poll_s=settings.lease_poll_seconds)
    except LeaseHeld as exc:
        log.warning("%s", exc)
        context["ti"].xcom_push(key=DEFERRED_XCOM, value=str(exc))
        raise AirflowSkipException(str(exc)) from None
    log.info("took the cycle lease of %s until %s (every task renews it; the teardown gives it back)",
             safe_url(settings.state_url), state.expires_at.isoformat(timespec="seconds"))
    return {"run_id": state.run_id, "acquired_at": state.acquired_at.isoformat(),
            "expires_at": state.expires_at.isoformat()}


def _skip_while_quota_is_used_up(context: dict[str, Any], engine) -> None:
    """A scheduled or backfill run started while a daily quota is known to be used up is skipped with one line
    (not failed: hundreds of red runs until midnight would bury a real failure). A manual run tries anyway."""
    from airflow.sdk.exceptions import AirflowSkipException

    from mdsync.lease import QuotaPauses

    run_type = getattr(context["dag_run"], "run_type", "manual")
    if str(getattr(run_type, "value", run_type)) == "manual":
        return
    pause = QuotaPauses(engine).active()
    if pause is not None:
        log.warning("%s", pause.line())
        context["ti"].xcom_push(key=DEFERRED_XCOM, value=pause.line())
        raise AirflowSkipException(pause.line())


def _remember_quota(exc: BaseException, store: StateStore, context: dict[str, Any]) -> None:
    from mdsync.errors import QuotaExhausted
    from mdsync.lease import QuotaPauses

    if isinstance(exc, QuotaExhausted) and exc.resets_at is not None:
        try:
            QuotaPauses(store.engine).record(exc.service, exc.resets_at, context["run_id"])
        except Exception as err:  # the store is unreachable: runs fail once each until the reset, as before
            log.warning("could not record the used-up quota in the state store (%s)", err)


@contextmanager
def leased_cycle(context: dict[str, Any]) -> Iterator[Cycle]:
    """The :class:`Cycle` for one task of a run that holds the lease: renewed now (a run that does not hold it
    fails this task at once, without retries, having written nothing), every minute while the task runs, and
    inside every state-store write transaction."""
    from airflow.sdk.exceptions import AirflowFailException

    from mdsync.lease import LeaseLost
    from mdsync.settings import Settings
    from mdsync.state import StateStore
    from mdsync_airflow.failfast import fail_fast

    settings = Settings.from_env()
    store = StateStore(settings.state_url)  # the first task migrated it
    lease, holder = _lease(settings, store.engine), holder_of(context)
    try:
        lease.renew(holder)
        store.fence = lease.fence(holder)
        with lease.heartbeat(holder):
            yield cycle_for(context, store=store, settings=settings)
    except LeaseLost as exc:
        raise AirflowFailException(str(exc)) from None
    except Exception as exc:  # bad credentials, config, quota...: fail at once, in one line (mdsync_airflow.failfast)
        _remember_quota(exc, store, context)
        if (failed := fail_fast(exc)) is not exc:
            raise failed from None
        raise


def release_lease(context: dict[str, Any]) -> bool:
    """The run's teardown: give the lease back (whether the run succeeded or failed); whether it was held."""
    from mdsync.settings import Settings
    from mdsync.state.database import safe_url

    settings = Settings.from_env()
    lease = _lease(settings)
    released = lease.release(holder_of(context))
    if released:
        log.info("gave back the cycle lease of %s", safe_url(settings.state_url))
    else:
        log.info("this run did not hold the cycle lease of %s (it is %s): nothing to give back",
                 safe_url(settings.state_url), lease.describe())
    return released

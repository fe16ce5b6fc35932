"""The sync's figures as Airflow metrics (StatsD, Datadog, OpenTelemetry), so the dashboards that watch Airflow
see them.

The report task turns the run's summary (:meth:`mdsync.cycle.Cycle.report`) into metrics and hands them to
Airflow's own ``Stats``: whatever the deployment's ``[metrics]`` section configures (``statsd_on``,
``statsd_datadog_enabled``, ``otel_on``, ``statsd_prefix``, allow and block lists) applies to them as to Airflow's
own metrics. This module never imports Airflow at import time: :func:`run_metrics` is a pure mapping, and
:func:`emit` takes the stats client as a parameter (:func:`airflow_stats` finds Airflow's in a task).

Names carry every dimension (plain StatsD has no tags: ``mdsync.values.written.dynamics``), and the same dimensions
also go as tags, which Datadog, StatsD with ``statsd_influxdb_enabled`` and OpenTelemetry (as attributes) keep.
A counter with a finer dimension than its name (the entity type of ``mdsync.records.read.dynamics``, the task of
``mdsync.api_calls.marketo``) is incremented once per value of that dimension: plain StatsD adds the increments
up into the name's total, tagged backends keep them apart.

Every name is under :data:`PREFIX`; Airflow puts its own prefix in front (``[metrics] statsd_prefix`` or
``otel_prefix``, default ``airflow``): ``airflow.mdsync.values.written.dynamics``.

Per run:

- ``mdsync.records.read.marketo`` (counter): Marketo persons read (those changed in the window, or all of them).
- ``mdsync.records.read.dynamics`` (counter): Dataverse rows read, per entity type (tag ``entity``).
- ``mdsync.records.created.<side>`` (counter): records the sync created on that side.
- ``mdsync.values.written.<side>`` (counter): field values written to that side (link fields included).
- ``mdsync.errors.<side>`` (counter): values and creates that side refused (each an open sync error).
- ``mdsync.collisions.<winner>`` (counter): fields changed on both sides, by the side that won (tag ``entity``).
- ``mdsync.values.held`` (counter): values not sent again because the target refused them before (tag ``entity``).
- ``mdsync.api_calls.<service>`` (counter): API calls, tokens included, per task (tag ``task``).
- ``mdsync.rate_limit.wait.<service>`` (timer, milliseconds): how long a task's calls waited for the service's
  call limits on our side (tag ``task``), for each service the task called (a task's ``waited_s``).
- ``mdsync.run.duration`` (gauge, seconds): how long the run's stages took end to end (stages that run side by
  side count once: their longest).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("mdsync.metrics")

#: every metric's name starts with this (Airflow adds its own prefix in front)
PREFIX = "mdsync"
SIDES = ("dynamics", "marketo")
#: stages of a cycle that run side by side (a run's duration counts the longest of each group)
PARALLEL_STAGES = ("extract_", "plan_")

COUNTER, GAUGE, TIMER = "counter", "gauge", "timer"


class StatsClient(Protocol):
    """What :func:`emit` needs of a stats client: Airflow's ``Stats`` (``airflow.sdk.observability.stats``)."""

    def incr(self, stat: str, count: int | None = None, rate: float | None = None, *,
             tags: dict[str, Any] | None = None) -> None: ...

    def gauge(self, stat: str, value: float, rate: float | None = None, delta: bool | None = None, *,
              tags: dict[str, Any] | None = None) -> None: ...

    def timing(self, stat: str, dt: float, *, tags: dict[str, Any] | None = None) -> None: ...


@dataclass(frozen=True)
class Metric:
    """One figure of a run, ready for a stats client.

    :param kind: :data:`COUNTER` (incremented by ``value``), :data:`GAUGE` (set to ``value``) or :data:`TIMER`
        (one observation of ``value`` milliseconds).
    """

    kind: str
    name: str
    value: float
    tags: dict[str, str] = field(default_factory=dict)


def name(*parts: str) -> str:
    """A metric name under :data:`PREFIX` (``name("errors", "marketo")`` is ``mdsync.errors.marketo``)."""
    return ".".join((PREFIX, *parts))


def run_metrics(summary: dict, *, collision_winners: dict[str, str] | None = None) -> list[Metric]:
    """The metrics of one run, from its summary (:meth:`mdsync.cycle.Cycle.report`).

    :param summary: the run's report (``entities``, ``written``, ``created_in``, ``errors``, ``tasks``...);
        figures it lacks count as 0 (a run whose loads were skipped, e.g. a rejected mass change). A task's
        entry in ``tasks`` may carry ``waited_s`` (service -> seconds the task waited for that service's call
        limits), which becomes the ``mdsync.rate_limit.wait.<service>`` timers.
    :param collision_winners: entity type -> the side its collisions go to (the config's ``collision_winner``);
        an entity type missing here has its collisions counted under ``unknown``.
    :returns: counters, timers and gauges, in a stable order.
    """
    entities: dict[str, dict] = summary.get("entities") or {}
    tasks: dict[str, dict] = summary.get("tasks") or {}
    winners = collision_winners or {}
    out = [Metric(COUNTER, name("records", "read", "marketo"), int(summary.get("extracted_marketo_persons") or 0),
                  {"side": "marketo", "entity": "person"})]
    out += [Metric(COUNTER, name("records", "read", "dynamics"), int(e.get("extracted_dynamics") or 0),
                   {"side": "dynamics", "entity": entity}) for entity, e in entities.items()]
    for figure, key in ((("records", "created"), "created_in"), (("values", "written"), "written"),
                        (("errors",), "errors")):
        per_side = summary.get(key) or {}
        out += [Metric(COUNTER, name(*figure, side), int(per_side.get(side) or 0), {"side": side}) for side in SIDES]
    for entity, e in entities.items():
        winner = str(winners.get(entity, "unknown"))
        out.append(Metric(COUNTER, name("collisions", winner), int(e.get("collisions") or 0),
                          {"winner": winner, "entity": entity}))
    out += [Metric(COUNTER, name("values", "held"), int(e.get("held_back") or 0), {"entity": entity})
            for entity, e in entities.items()]
    for task, figures in tasks.items():
        out += [Metric(COUNTER, name("api_calls", service), int(figures.get(service) or 0),
                       {"service": service, "task": task}) for service in SIDES]
    for task, figures in tasks.items():
        waited = figures.get("waited_s") or {}
        out += [Metric(TIMER, name("rate_limit", "wait", service), round(float(seconds) * 1000.0, 3),
                       {"service": service, "task": task}) for service, seconds in sorted(waited.items())]
    if tasks:
        out.append(Metric(GAUGE, name("run", "duration"), run_duration(tasks)))
    return out


def run_duration(tasks: dict[str, dict]) -> float:
    """Seconds a run's stages took end to end: stages that run side by side (:data:`PARALLEL_STAGES`) count once,
    their longest; the time tasks wait for a worker or an approval is not in it (Airflow's own
    ``dagrun.duration.success.<dag_id>`` has the wall time).

    :param tasks: the summary's ``tasks`` (task name -> ``{"seconds": ...}``).
    """
    longest: dict[str, float] = {}
    for task, figures in tasks.items():
        group = next((p for p in PARALLEL_STAGES if task.startswith(p)), task)
        longest[group] = max(longest.get(group, 0.0), float(figures.get("seconds") or 0.0))
    return round(sum(longest.values()), 3)


def emit(stats: StatsClient, metrics: Iterable[Metric]) -> int:
    """Hand metrics to a stats client (Airflow's ``Stats``, or anything with its ``incr``/``gauge``/``timing``).

    :returns: how many were handed over.
    :raises ValueError: a metric of an unknown kind (nothing after it is sent).
    """
    sent = 0
    for m in metrics:
        if m.kind == COUNTER:
            stats.incr(m.name, int(m.value), tags=m.tags or None)
        elif m.kind == GAUGE:
            stats.gauge(m.name, m.value, tags=m.tags or None)
        elif m.kind == TIMER:
            stats.timing(m.name, m.value, tags=m.tags or None)
        else:
            raise ValueError(f"metric {m.name!r} has kind {m.kind!r}; the kinds are {COUNTER}, {GAUGE}, {TIMER}")
        sent += 1
    return sent


def airflow_stats() -> StatsClient | None:
    """Airflow's ``Stats`` as task code sees it: the Task SDK's (``airflow.sdk.observability.stats``), which the task
    runner sets up from the deployment's ``[metrics]`` section when a task process starts. None outside Airflow.

    Where nothing set it up (e.g. the engine run outside Airflow), Airflow's ``Stats`` sends nothing.
    """
    # A task process has imported the Task SDK long before its report; a process that has not (the engine on its
    # own) has no metrics set up, and importing Airflow there would cost seconds to send nothing.
    if "airflow.sdk" not in sys.modules:
        return None
    try:
        from airflow.sdk.observability.stats import Stats
    except ImportError:
        return None
    return Stats


def collision_winners(config) -> dict[str, str]:
    """Entity type -> the side its collisions go to, from a :class:`~mdsync.config.SyncConfig`."""
    return {entity: getattr(e.collision_winner, "value", str(e.collision_winner))
            for entity, e in (getattr(config, "entities", None) or {}).items()}


def emit_run(summary: dict, *, config=None, stats: StatsClient | None = None) -> list[Metric]:
    """Emit one run's metrics; never raises (a metrics problem must not fail the run: it is logged as a warning).

    :param summary: the run's report (:meth:`mdsync.cycle.Cycle.report`).
    :param config: the sync config (for the collision winners); None counts collisions under ``unknown``.
    :param stats: the stats client; None uses :func:`airflow_stats`.
    :returns: the metrics handed over (empty when there was no stats client or emitting failed).
    """
    try:
        client = stats if stats is not None else airflow_stats()
        if client is None:
            log.debug("metrics: no Airflow in this process; the run's metrics are not sent")
            return []
        metrics = run_metrics(summary, collision_winners=collision_winners(config) if config is not None else None)
        emit(client, metrics)
        return metrics
    except Exception as exc:  # noqa: BLE001 - the run's data is committed; its metrics are a side show
        log.warning("metrics: the run's metrics were not (all) sent: %s: %s; the run itself is fine (its report is "
                    "in the state store). Check Airflow's [metrics] settings (statsd_host/statsd_port, otel_*), "
                    "and that the StatsD client package is installed when statsd_on is set",
                    type(exc).__name__, exc)
        return []

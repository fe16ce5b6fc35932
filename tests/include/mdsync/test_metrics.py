"""A run's summary -> the sync's metrics (:mod:`mdsync.metrics`), with a stats client that records what it is given.

The summaries are made by the real :meth:`mdsync.cycle.Cycle.report` from typed stage results, so the mapping is
tested against the report's real shape; the sums of the metrics are checked against the console's run counts
(:func:`mdsync.cycle.run_counts`), which are the same figures.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import pytest

from mdsync import metrics
from mdsync.cycle import Cycle, run_counts
from mdsync.metrics import TIMER, Metric
from mdsync.results import (Committed, DynamicsEntityExtracted, DynamicsExtracted, Identified, Loaded,
                            MarketoExtracted, Planned, RunManifest, SchemaResult)


class RecordingStats:
    """A stats client with Airflow's ``Stats`` calls (incr / gauge / timing) that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, dict | None]] = []

    def incr(self, stat, count=None, rate=None, *, tags=None):
        self.calls.append(("incr", stat, count, tags))

    def gauge(self, stat, value, rate=None, delta=None, *, tags=None):
        self.calls.append(("gauge", stat, value, tags))

    def timing(self, stat, dt, *, tags=None):
        self.calls.append(("timing", stat, dt, tags))

    def totals(self, kind: str = "incr") -> dict[str, float]:
        """What plain StatsD makes of the calls: counters added up per name (tags dropped)."""
        out: dict[str, float] = defaultdict(float)
        for k, stat, value, _ in self.calls:
            if k == kind:
                out[stat] += value
        return dict(out)


class UnreachableStats(RecordingStats):
    """A stats client whose sends fail (a StatsD host that does not resolve, a socket error)."""

    def incr(self, stat, count=None, rate=None, *, tags=None):
        raise OSError(f"cannot send {stat}: network is unreachable")


def _manifest(*, marketo_read=7, lead_read=3, contact_read=4, collisions=(2, 1), held=(1, 0), written=(5, 6),
              created=(1, 2), rejected=(1, 0), create_errors=(0, 1), task_calls=None, task_seconds=None) -> RunManifest:
    """A run's typed results, as the tasks return them (staged paths are names only: report reads none)."""
    calls = task_calls or {"refresh_schema": (2, 3), "extract_marketo": (3, 0), "extract_dynamics": (0, 2),
                           "load_dynamics": (0, 4), "load_marketo": (2, 1)}
    seconds = task_seconds or {"refresh_schema": 1.0, "extract_marketo": 2.5, "extract_dynamics": 1.5,
                               "identify": 0.5, "load_dynamics": 2.0, "load_marketo": 1.0}

    def timing(task: str) -> dict:
        m, d = calls.get(task, (0, 0))
        return {"calls": {"marketo": m, "dynamics": d}, "elapsed_s": seconds.get(task, 0.0)}

    identified = Identified(links="l", persons="p", records={}, unlinked="u", activity="a", marketo_creates="mc",
                            dynamics_creates="dc", marketo_link_writes="ml", dynamics_link_writes={}, new_links=2,
                            **timing("identify"))
    plans = [Planned(entity=entity, dynamics_writes="dw", marketo_writes="mw", baseline_updates="b", activity="a",
                     compared=10, to_dynamics=3, to_marketo=2, collisions=c, held=h,
                     **{"calls": {"marketo": 0, "dynamics": 0}, "elapsed_s": s})
             for entity, c, h, s in (("lead", collisions[0], held[0], 0.75), ("contact", collisions[1], held[1], 0.25))]
    return RunManifest(
        run_id="manual__2026-12-02T08:00:00+00:00",
        schema=SchemaResult(access="acc", **timing("refresh_schema")),
        marketo=MarketoExtracted(persons="mp", deleted="md", extracted=marketo_read, **timing("extract_marketo")),
        dynamics=DynamicsExtracted(entities={
            "lead": DynamicsEntityExtracted(rows="dl", deleted="dld", extracted=lead_read),
            "contact": DynamicsEntityExtracted(rows="dc", deleted="dcd", extracted=contact_read)},
            **timing("extract_dynamics")),
        identity=identified, plans=plans,
        dynamics_loaded=Loaded(side="dynamics", written=written[0], created=created[0], rejected=rejected[0],
                               create_errors=create_errors[0], **timing("load_dynamics")),
        marketo_loaded=Loaded(side="marketo", written=written[1], created=created[1], rejected=rejected[1],
                              create_errors=create_errors[1], **timing("load_marketo")),
        committed=Committed(baselines=4, activity=9))


WINNERS = {"lead": "marketo", "contact": "dynamics"}


def test_every_figure_of_the_report_becomes_a_metric_named_with_its_side_and_tagged():
    summary = Cycle.report(_manifest())
    stats = RecordingStats()

    sent = metrics.emit(stats, metrics.run_metrics(summary, collision_winners=WINNERS))

    assert sent == len(stats.calls)
    counters = {(stat, tuple(sorted((tags or {}).items()))): value for kind, stat, value, tags in stats.calls
                if kind == "incr"}
    assert counters == {
        ("mdsync.records.read.marketo", (("entity", "person"), ("side", "marketo"))): 7,
        ("mdsync.records.read.dynamics", (("entity", "lead"), ("side", "dynamics"))): 3,
        ("mdsync.records.read.dynamics", (("entity", "contact"), ("side", "dynamics"))): 4,
        ("mdsync.records.created.dynamics", (("side", "dynamics"),)): 1,
        ("mdsync.records.created.marketo", (("side", "marketo"),)): 2,
        ("mdsync.values.written.dynamics", (("side", "dynamics"),)): 5,
        ("mdsync.values.written.marketo", (("side", "marketo"),)): 6,
        # rejected values plus refused creates, per side
        ("mdsync.errors.dynamics", (("side", "dynamics"),)): 1,
        ("mdsync.errors.marketo", (("side", "marketo"),)): 1,
        ("mdsync.collisions.marketo", (("entity", "lead"), ("winner", "marketo"))): 2,
        ("mdsync.collisions.dynamics", (("entity", "contact"), ("winner", "dynamics"))): 1,
        ("mdsync.values.held", (("entity", "lead"),)): 1,
        ("mdsync.values.held", (("entity", "contact"),)): 0,
        **{("mdsync.api_calls.marketo", (("service", "marketo"), ("task", t))): m
           for t, m in (("refresh_schema", 2), ("extract_marketo", 3), ("extract_dynamics", 0), ("identify", 0),
                        ("plan_lead", 0), ("plan_contact", 0), ("load_dynamics", 0), ("load_marketo", 2),
                        ("commit", 0))},
        **{("mdsync.api_calls.dynamics", (("service", "dynamics"), ("task", t))): d
           for t, d in (("refresh_schema", 3), ("extract_marketo", 0), ("extract_dynamics", 2), ("identify", 0),
                        ("plan_lead", 0), ("plan_contact", 0), ("load_dynamics", 4), ("load_marketo", 1),
                        ("commit", 0))},
    }
    # counters are whole numbers (StatsD's |c), and nothing is sent twice under the same name and tags
    assert all(isinstance(value, int) for kind, _, value, _ in stats.calls if kind == "incr")
    assert len(counters) == len([c for c in stats.calls if c[0] == "incr"])
    # schema 1 + extracts max(2.5, 1.5) + identify 0.5 + plans max(0.75, 0.25) + loads 2 + 1 + commit 0
    assert [c for c in stats.calls if c[0] != "incr"] == [("gauge", "mdsync.run.duration", 7.75, None)]


def test_what_plain_statsd_adds_up_per_name_is_the_runs_figures_of_the_console():
    summary = Cycle.report(_manifest(marketo_read=120, lead_read=40, contact_read=60, collisions=(3, 4),
                                     held=(2, 5), written=(11, 13), created=(6, 8), rejected=(2, 3),
                                     create_errors=(1, 0)))
    counts = run_counts(summary)
    stats = RecordingStats()

    metrics.emit(stats, metrics.run_metrics(summary, collision_winners=WINNERS))

    totals = stats.totals()
    assert totals["mdsync.records.read.marketo"] == counts["read_marketo"] == 120
    assert totals["mdsync.records.read.dynamics"] == counts["read_dynamics"] == 100
    for side in ("dynamics", "marketo"):
        assert totals[f"mdsync.values.written.{side}"] == counts[f"written_{side}"]
        assert totals[f"mdsync.records.created.{side}"] == counts[f"created_{side}"]
        assert totals[f"mdsync.errors.{side}"] == counts[f"errors_{side}"]
        assert totals[f"mdsync.api_calls.{side}"] == counts[f"calls_{side}"] == summary["api_calls"][side]
    assert totals["mdsync.collisions.marketo"] + totals["mdsync.collisions.dynamics"] == counts["collisions"] == 7
    assert totals["mdsync.values.held"] == counts["held"] == 7


def test_the_config_names_each_entity_types_collision_winner(config):
    assert metrics.collision_winners(config) == {"lead": "marketo", "contact": "dynamics"}
    summary = Cycle.report(_manifest(collisions=(2, 0)))

    unknown = metrics.run_metrics(summary)  # without the config the winner is not guessed

    assert [(m.name, m.value, m.tags) for m in unknown if m.name.startswith("mdsync.collisions.")] == [
        ("mdsync.collisions.unknown", 2, {"winner": "unknown", "entity": "lead"}),
        ("mdsync.collisions.unknown", 0, {"winner": "unknown", "entity": "contact"})]


def test_rate_limit_waits_are_timers_per_task_in_milliseconds_when_the_summary_carries_them():
    summary = Cycle.report(_manifest())
    assert not [m for m in metrics.run_metrics(summary) if m.kind == TIMER]  # stages that waited nothing

    summary["tasks"]["load_marketo"]["waited_s"] = {"marketo": 12.5}
    summary["tasks"]["extract_dynamics"]["waited_s"] = {"dynamics": 0.25, "marketo": 0.0}

    timers = [m for m in metrics.run_metrics(summary) if m.kind == TIMER]

    assert timers == [
        Metric(TIMER, "mdsync.rate_limit.wait.dynamics", 250.0, {"service": "dynamics", "task": "extract_dynamics"}),
        Metric(TIMER, "mdsync.rate_limit.wait.marketo", 0.0, {"service": "marketo", "task": "extract_dynamics"}),
        Metric(TIMER, "mdsync.rate_limit.wait.marketo", 12500.0, {"service": "marketo", "task": "load_marketo"})]
    stats = RecordingStats()
    metrics.emit(stats, timers)
    assert stats.calls[-1] == ("timing", "mdsync.rate_limit.wait.marketo", 12500.0,
                               {"service": "marketo", "task": "load_marketo"})


def test_a_run_whose_loads_were_skipped_sends_zeros_for_what_it_did_not_do():
    manifest = _manifest()
    manifest.dynamics_loaded = manifest.marketo_loaded = manifest.committed = None  # a rejected mass change
    summary = Cycle.report(manifest)

    sent = {(m.name, m.value) for m in metrics.run_metrics(summary, collision_winners=WINNERS)
            if m.name.startswith(("mdsync.values.written", "mdsync.records.created", "mdsync.errors"))}

    assert sent == {(f"mdsync.{figure}.{side}", 0) for side in ("dynamics", "marketo")
                    for figure in ("values.written", "records.created", "errors")}


def test_a_run_duration_counts_stages_that_run_side_by_side_once():
    tasks = {"refresh_schema": {"seconds": 1.0}, "extract_marketo": {"seconds": 4.0},
             "extract_dynamics": {"seconds": 6.0}, "identify": {"seconds": 1.0}, "plan_lead": {"seconds": 2.0},
             "plan_contact": {"seconds": 3.0}, "check_mass_change": {"seconds": 0.5}, "load_dynamics": {"seconds": 2.0},
             "load_marketo": {"seconds": 2.0}, "commit": {"seconds": 0.25}}

    assert metrics.run_duration(tasks) == 1 + 6 + 1 + 3 + 0.5 + 2 + 2 + 0.25


def test_a_stats_client_that_cannot_send_never_fails_the_run_and_says_so(caplog):
    caplog.set_level(logging.WARNING, logger="mdsync.metrics")

    assert metrics.emit_run(Cycle.report(_manifest()), stats=UnreachableStats()) == []

    warning, = [r for r in caplog.records if r.name == "mdsync.metrics"]
    assert warning.levelno == logging.WARNING
    assert "OSError: cannot send mdsync.records.read.marketo: network is unreachable" in warning.getMessage()
    assert "[metrics]" in warning.getMessage() and "the run itself is fine" in warning.getMessage()


def test_emit_run_hands_every_metric_to_the_given_client(config):
    summary = Cycle.report(_manifest())
    stats = RecordingStats()

    sent = metrics.emit_run(summary, config=config, stats=stats)

    assert sent == metrics.run_metrics(summary, collision_winners=WINNERS)
    assert [(c[1], c[2]) for c in stats.calls] == [(m.name, m.value) for m in sent]


def test_an_unknown_kind_of_metric_is_refused_by_name():
    with pytest.raises(ValueError, match=r"metric 'mdsync.x' has kind 'histogram'; the kinds are counter, gauge, timer"):
        metrics.emit(RecordingStats(), [Metric("histogram", "mdsync.x", 1.0)])


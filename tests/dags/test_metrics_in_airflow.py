"""The sync's metrics through Airflow's own metrics, end to end: a real DAG run (``dag.test()``, as ``make sync``
runs it) against both sandboxes, with Airflow's ``[metrics]`` pointed at a receiver in this test on loopback,
and the packets it gets compared with the run's report in the state store.

``dag.test()`` runs each task in this process (no task runner ``main()``): a worker's task process sets up the
Task SDK's ``Stats`` from ``[metrics]`` when it starts (``task_runner.main`` calls ``stats.initialize`` with
``stats_utils.get_stats_factory()``). This process imported Airflow before the test set ``[metrics]``, so
:func:`airflow_metrics` makes the same call after setting it, which is what a worker does; the report task's
:func:`mdsync.metrics.airflow_stats` then finds that ``Stats`` like it does on a worker.

- StatsD: a UDP socket is the StatsD server (plain StatsD lines, ``airflow.mdsync.…:5|c``). Airflow's StatsD
  backend needs the ``statsd`` package (in requirements.in); without it Airflow sends nothing (it only logs
  "Could not configure StatsClient"), so the test imports it first to fail with that reason.
- OpenTelemetry: a small OTLP/HTTP server decodes the protobuf metrics Airflow's exporter posts.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
from collections import defaultdict
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mdsync import metrics
from mdsync.cycle import Cycle, RunInfo, run_counts
from mdsync_airflow.run_once import run_once
from tests.fixtures.sync_env import task_logs
from tests.fixtures.waiting import wait_for

#: Airflow's own prefix in front of every metric (``[metrics] statsd_prefix`` / ``otel_prefix``, default airflow)
AIRFLOW_PREFIX = "airflow."


@contextmanager
def airflow_metrics(**environment: str):
    """Airflow's ``[metrics]`` set by environment variables, and the Task SDK's ``Stats`` set up from them as a
    worker's task process does; afterwards the settings are gone and ``Stats`` is set up again without them."""
    from airflow.sdk.configuration import conf
    from airflow.sdk.observability import stats
    from airflow.sdk.observability.metrics import stats_utils

    def set_up() -> None:  # task_runner.main's own call
        stats.initialize(factory=stats_utils.get_stats_factory(),
                         export_legacy_names=conf.getboolean("metrics", "legacy_names_on"))

    with pytest.MonkeyPatch.context() as mp:
        for key, value in environment.items():
            mp.setenv(key, value)
        set_up()
        try:
            yield
        finally:
            if environment.get("AIRFLOW__METRICS__OTEL_ON") == "True":
                from opentelemetry import metrics as otel

                from airflow.sdk._shared.observability.metrics import otel_logger

                provider = otel.get_meter_provider()
                if hasattr(provider, "shutdown"):  # the SDK's provider (not the API's stand-in): stop its exports
                    provider.shutdown()
                    # and Airflow's flush at exit, which would only find the exporter shut down
                    atexit.unregister(otel_logger.flush_otel_metrics)
    set_up()


def _last_run(sync_world) -> dict:
    store = sync_world.store()
    run_id = store.runs(limit=1)["run_id"].iloc[0]
    return store.run_summary(run_id)


def _expected(summary: dict) -> dict[str, float]:
    """What the run's report says each counter must add up to (the console's run counts)."""
    counts = run_counts(summary)
    expected = {"mdsync.records.read.marketo": counts["read_marketo"],
                "mdsync.records.read.dynamics": counts["read_dynamics"], "mdsync.values.held": counts["held"]}
    for side in ("dynamics", "marketo"):
        expected[f"mdsync.values.written.{side}"] = counts[f"written_{side}"]
        expected[f"mdsync.records.created.{side}"] = counts[f"created_{side}"]
        expected[f"mdsync.errors.{side}"] = counts[f"errors_{side}"]
        expected[f"mdsync.api_calls.{side}"] = counts[f"calls_{side}"]
    return expected


# -- StatsD -------------------------------------------------------------------------------------------------


class StatsdServer:
    """A UDP socket on loopback that keeps the StatsD lines it receives (``name:value|type``)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []

    def receive(self) -> list[str]:
        """Every line received so far (reads what has arrived, never waits)."""
        while True:
            try:
                packet = self.sock.recv(65535)
            except BlockingIOError:
                return self.lines
            self.lines += [line for line in packet.decode().splitlines() if line]

    def values(self, kind: str) -> dict[str, list[float]]:
        """Values per metric name (without Airflow's prefix) of one StatsD type: ``c``, ``g`` or ``ms``."""
        out: dict[str, list[float]] = defaultdict(list)
        for line in self.receive():
            name, _, rest = line.partition(":")
            value, _, typ = rest.partition("|")
            if typ.split("|")[0] == kind and name.startswith(AIRFLOW_PREFIX + "mdsync."):
                out[name.removeprefix(AIRFLOW_PREFIX)].append(float(value))
        return out


def test_a_dag_run_sends_its_figures_to_statsd_as_its_report_has_them(sync_world, airflow_db):
    import statsd  # noqa: F401 - Airflow's StatsD backend; without it Airflow would quietly send nothing
    server = StatsdServer()
    sync_world.seed_people()
    try:
        with airflow_metrics(AIRFLOW__METRICS__STATSD_ON="True", AIRFLOW__METRICS__STATSD_HOST="127.0.0.1",
                             AIRFLOW__METRICS__STATSD_PORT=str(server.port)):
            assert run_once() == "success"
            gauges = wait_for(lambda: server.values("g").get("mdsync.run.duration"), "the run's duration gauge")
        counters = {name: sum(values) for name, values in server.values("c").items()}
        timers = server.values("ms")
    finally:
        server.sock.close()

    summary = _last_run(sync_world)
    expected = _expected(summary)
    assert {name: counters.get(name) for name in expected} == expected
    # a first sync creates, links and so writes on both sides: the figures compared are not all zeros
    assert counters["mdsync.values.written.dynamics"] > 0 and counters["mdsync.values.written.marketo"] > 0
    assert counters["mdsync.records.read.marketo"] > 0 and counters["mdsync.api_calls.marketo"] > 0
    collisions = sum(v for k, v in counters.items() if k.startswith("mdsync.collisions."))
    assert collisions == run_counts(summary)["collisions"]
    assert gauges == [metrics.run_duration(summary["tasks"])]
    # each task's waits for the limits of each service it called are its timers, in ms (test_cycle shows a
    # real wait reaching the stage's result)
    for service in ("marketo", "dynamics"):
        reported = [t["waited_s"][service] for t in summary["tasks"].values() if service in t["waited_s"]]
        assert reported and len(reported) == sum(1 for t in summary["tasks"].values() if t.get(service))
        assert sorted(timers[f"mdsync.rate_limit.wait.{service}"]) == \
            pytest.approx(sorted(1000 * s for s in reported)), service
    # plain StatsD has no tags: none went into the names (Datadog and statsd_influxdb_enabled keep them)
    assert not [line for line in server.lines if "mdsync." in line and ("," in line or "#" in line)]


# -- OpenTelemetry ------------------------------------------------------------------------------------------


class OtlpServer:
    """An OTLP/HTTP metrics endpoint on loopback (``POST /v1/metrics``, protobuf) keeping every export."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (ExportMetricsServiceRequest,
                                                                                  ExportMetricsServiceResponse)

        exports = self.exports = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportMetricsServiceRequest()
                request.ParseFromString(body)
                exports.append(request)
                answer = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):  # the exporter posts every 200 ms: keep the test output quiet
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def points(self) -> dict[str, dict[tuple, float]]:
        """The last exported value per metric name (without Airflow's prefix) and attributes: counters are
        cumulative in OTLP, so the last export of a series holds its total."""
        out: dict[str, dict[tuple, float]] = defaultdict(dict)
        for request in list(self.exports):
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if not m.name.startswith(AIRFLOW_PREFIX + "mdsync."):
                            continue
                        kind = m.WhichOneof("data")
                        for dp in getattr(m, kind).data_points:
                            attrs = tuple(sorted((a.key, a.value.string_value) for a in dp.attributes))
                            value = dp.sum if kind in ("histogram", "exponential_histogram") else \
                                (dp.as_int if dp.WhichOneof("value") == "as_int" else dp.as_double)
                            out[m.name.removeprefix(AIRFLOW_PREFIX)][attrs] = value
        return out


def test_a_dag_run_sends_its_figures_through_opentelemetry_with_tags_as_attributes(sync_world, airflow_db):
    server = OtlpServer()
    sync_world.seed_people()
    try:
        with airflow_metrics(AIRFLOW__METRICS__OTEL_ON="True", OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=server.url,
                             OTEL_METRIC_EXPORT_INTERVAL="200"):
            assert run_once() == "success"
            summary = _last_run(sync_world)
            expected = _expected(summary)

            def arrived():
                points = server.points()
                totals = {name: sum(points.get(name, {}).values()) for name in expected}
                return points if totals == expected and "mdsync.run.duration" in points else None

            points = wait_for(arrived, f"the run's metrics to add up to {expected} at the OTLP endpoint")
    finally:
        server.stop()

    assert points["mdsync.run.duration"] == {(): metrics.run_duration(summary["tasks"])}
    # the tags are attributes: the Dataverse rows read per entity type, the calls per task
    reads = points["mdsync.records.read.dynamics"]
    assert reads == {(("entity", e), ("side", "dynamics")): summary["entities"][e]["extracted_dynamics"]
                     for e in summary["entities"]}
    calls = points["mdsync.api_calls.marketo"]
    assert {dict(attrs)["task"]: n for attrs, n in calls.items()} == \
        {task: figures.get("marketo", 0) for task, figures in summary["tasks"].items()}
    winners = {dict(attrs)["entity"]: dict(attrs)["winner"] for name, series in points.items()
               if name.startswith("mdsync.collisions.") for attrs in series}
    assert winners == {"lead": "marketo", "contact": "dynamics"}
    assert expected["mdsync.values.written.dynamics"] > 0 and expected["mdsync.records.read.marketo"] > 0


# -- a metrics problem never fails a run --------------------------------------------------------------------


def test_misconfigured_metrics_are_a_warning_and_the_run_is_still_recorded(sync_world, airflow_db, capfd, caplog):
    from tests.include.mdsync.test_metrics import _manifest

    summary = Cycle.report(_manifest())
    cycle = Cycle(RunInfo(run_id="manual__metrics-misconfigured"), marketo_client=sync_world.marketo,
                  dynamics_client=sync_world.dynamics, store=sync_world.store())
    # a stat name handler that does not import: Airflow's metrics backend cannot be built when the first metric
    # is sent, and says so by raising from Stats.incr
    with airflow_metrics(AIRFLOW__METRICS__OTEL_ON="True", OTEL_EXPORTER_OTLP_METRICS_ENDPOINT="http://127.0.0.1:9/",
                         AIRFLOW__METRICS__STAT_NAME_HANDLER="no_such_module.handler"):
        cycle.record_run(summary)

    assert sync_world.store().run_summary("manual__metrics-misconfigured")["written"] == summary["written"]
    # Airflow's logging decides where the line goes (the terminal or Python logging): task_logs reads both
    warnings = [line for line in task_logs(capfd, caplog).splitlines() if "the run's metrics were not" in line]
    assert len(warnings) == 1, warnings
    assert "AirflowConfigException" in warnings[0] and '"no_such_module.handler"' in warnings[0]
    assert "the run itself is fine" in warnings[0]
    assert os.environ.get("AIRFLOW__METRICS__OTEL_ON") is None  # the settings were put back

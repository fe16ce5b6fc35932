"""One task of a sync cycle in its own process, as Airflow runs each task (used by ``bench/e2e_bench.py``).

    python bench/_stage.py STAGE MANIFEST_IN MANIFEST_OUT --run-id RUN --stats STATS.json

``STAGE`` is one of ``mdsync.cycle.STAGES``: the task reads the run's manifest (``RunManifest`` JSON) from
``MANIFEST_IN``, runs ``Cycle.run_stage(STAGE, manifest)`` and writes the updated manifest to ``MANIFEST_OUT``.
``STAGE`` ``run_all`` runs the whole cycle in this one process (``Cycle.run_all()``, for an engine without
``run_stage``) and writes ``{"report": <summary>}`` to ``MANIFEST_OUT``.

Connections come from ``AIRFLOW_CONN_MARKETO_DEFAULT`` / ``AIRFLOW_CONN_DYNAMICS_DEFAULT`` (the sandboxes'
``connection_json()``), settings from the ``MDSYNC_*`` environment. ``STATS.json`` gets this process's wall
time (imports, and the stage itself) and peak RSS (``VmHWM``, see :func:`peak_rss_mb`); the same line is printed
on stdout.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "include")]


def marketo_factory():
    from mdsync.marketo import MarketoClient

    conn = json.loads(os.environ["AIRFLOW_CONN_MARKETO_DEFAULT"])
    return MarketoClient(conn["host"], conn["login"], conn["password"])


def dynamics_factory():
    from mdsync.dynamics import DynamicsClient

    conn = json.loads(os.environ["AIRFLOW_CONN_DYNAMICS_DEFAULT"])
    extra = conn.get("extra") or {}
    if isinstance(extra, str):
        extra = json.loads(extra)
    return DynamicsClient(conn["host"], conn["login"], conn["password"], extra["tenant_id"],
                          authority=extra.get("authority"), verify=extra.get("verify", True))


def peak_rss_mb() -> float:
    """This program's peak resident memory: ``VmHWM`` of its own address space.

    ``ru_maxrss`` is not used for it: on Linux it survives fork and exec, so a child started by a big parent
    reports at least the parent's peak (it is kept in the stats as ``ru_maxrss_mb``).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    started = _STARTED if started is None else started
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage")
    parser.add_argument("manifest_in", type=Path)
    parser.add_argument("manifest_out", type=Path)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
                        stream=sys.stdout)

    import pandas  # noqa: F401  (counted in the import time, as a task's interpreter would)
    from mdsync.cycle import Cycle, RunInfo

    imported = time.perf_counter()
    cycle = Cycle(RunInfo(run_id=args.run_id), marketo_client=marketo_factory, dynamics_client=dynamics_factory)
    calls: dict = {}
    if args.stage == "run_all":
        out = {"report": cycle.run_all()}
        calls = out["report"].get("api_calls", {})
    else:
        from mdsync.results import RunManifest

        manifest = RunManifest.model_validate(json.loads(args.manifest_in.read_text()))
        manifest = cycle.run_stage(args.stage, manifest)
        out = manifest.dump()
        for name, result in manifest.stage_results():
            if name == args.stage:
                calls = dict(result.calls)
    done = time.perf_counter()
    args.manifest_out.write_text(json.dumps(out, default=str))
    stats = {"stage": args.stage, "wall_s": round(done - imported, 3), "import_s": round(imported - started, 3),
             "peak_rss_mb": peak_rss_mb(),
             "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "calls": calls}
    args.stats.write_text(json.dumps(stats))
    print("stage stats: " + json.dumps(stats), flush=True)
    return 0


def run_forked(argv: list[str], log_path: str) -> None:
    """One task in a child forked from a warm worker (``multiprocessing`` forkserver with the libraries
    preloaded), as Airflow's LocalExecutor runs a task with ``[scheduler] mp_start_method = forkserver`` and
    ``mp_forkserver_preload`` (see ``scripts/airflow-env.sh``): the task's imports are already done."""
    started = time.perf_counter()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
    sys.exit(main(argv, started=started))


if __name__ == "__main__":
    sys.exit(main())

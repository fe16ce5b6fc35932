"""The first sync on a distributed deployment: one Celery worker against two (issue 12's target).

Run:
    .venv/bin/python bench/deployment_bench.py --persons 100000 [--json out.json] [--rounds 1-worker,2-workers]
    make bench                          # runs it after the single-machine benchmarks

What it does, once per round (one worker, then two):
1. Starts both sandboxes with their real limits (Marketo 100 calls / 20 s, 10 concurrent; Dataverse service
   protection 6,000 requests / 5 min and 52 concurrent per user) and seeds them with ``bench/e2e_bench.py``'s
   population (the same mix, printed by that benchmark).
2. Starts the production layout of ``tests/fixtures/celery_deployment.py`` (PostgreSQL for Airflow and the
   state store, Redis as broker and for the shared call limits, moto's S3 for staging and logs, scheduler, DAG
   processor, API server) with that round's Celery workers, each its own ``AIRFLOW_HOME`` and folder.
3. Triggers one DAG run (the first sync) through the REST API and waits for it; the wall time is the run's own
   (start to end as Airflow records it), with a timeline of its tasks and the worker each ran on.
4. Reads the sandboxes' refusal counters (Marketo's 606/615, Dataverse's 429s) and checks the end state
   (e2e_bench's checks: links both ways, no duplicates, marked persons created, values converged).

Fails (exit 1) when a round's run does not succeed, an end-state check fails, either sandbox refused a call,
or two workers are more than ``--tolerance`` slower than one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "include"), str(REPO), str(REPO / "bench")]

import e2e_bench  # noqa: E402  (bench/: the population, seeding and end-state checks)
from sandbox.dataverse import DataverseSandbox  # noqa: E402
from sandbox.marketo import MarketoSandbox  # noqa: E402
from tests.fixtures.celery_deployment import DAG_ID, running_deployment  # noqa: E402
from tests.fixtures.postgres import postgres_server  # noqa: E402
from tests.fixtures.redis_server import start_redis, stop_redis  # noqa: E402

ROUNDS = {"1-worker": ("worker-a",), "2-workers": ("worker-a", "worker-b")}
#: the sync's settings for the benchmark (over the deployment's test pace): bulk jobs polled each second
SETTINGS = {"MDSYNC_BULK_POLL_SECONDS": "1"}
RUN_TIMEOUT_S = 3600.0


def one_round(label: str, workers: tuple[str, ...], persons: int, tmp: Path, postgres_url: str, redis) -> dict:
    pop, counts = e2e_bench.population(persons)
    folder = tmp / label
    with MarketoSandbox(folder / "marketo", rate_limit=(100, 20), max_concurrent=10, daily_quota=50_000) as marketo, \
            DataverseSandbox(folder / "dataverse", requests_per_window=6000, window_s=300,
                             max_concurrent=52) as dataverse:
        seeded = e2e_bench.seed(pop, marketo, dataverse)
        print(f"  seeded {seeded['marketo_persons']:,} Marketo persons and {seeded['dynamics_rows']:,} Dynamics rows "
              f"in {seeded['marketo_s'] + seeded['dynamics_s']:.0f} s", flush=True)
        with running_deployment(postgres_url, redis, marketo, dataverse, workers=workers, settings=SETTINGS,
                                quiet=True) as deployment:
            print(f"  deployment with {len(workers)} worker(s) ready after {deployment.seconds['startup']:.0f} s",
                  flush=True)
            marketo.admin("POST", "/calls/reset")
            dataverse.admin("POST", "calls/reset")
            # a first sync writes far more than the mass-change guard lets through unasked: allowed up front, as
            # an operator starting one would (README "The first sync of a whole database")
            run_id = deployment.trigger({"allow_mass_change": True})
            # polled every 2 s: light on the API server, which shares the CPUs with the run
            state = deployment.wait_for_run(run_id, timeout_s=RUN_TIMEOUT_S, poll_s=2.0)
            run = deployment.get(f"dags/{DAG_ID}/dagRuns/{run_id}")
            timeline = deployment.timeline(run_id)
            instances = deployment.task_instances(run_id)
            tries = {t: ti["try_number"] for t, ti in instances.items()}
            hosts = sorted({ti.get("hostname") for ti in instances.values() if ti.get("hostname")})
            end_state = e2e_bench.read_end_state(marketo, dataverse, deployment.state_url)
        counted = {"marketo": marketo.calls(), "dynamics": dataverse.calls()}
        # what each sandbox's own limiter refused: Marketo's 606/615/607 (``limited``), Dataverse's 429s
        refused = {"marketo": counted["marketo"]["limited"], "dynamics": counted["dynamics"]["throttled"]}
        calls = {service: e2e_bench.split_calls(service, stats) for service, stats in counted.items()}
        checks = e2e_bench.check_end_state(pop, counts, end_state)
    wall = _seconds(run["start_date"], run["end_date"])
    return {"label": label, "workers": list(workers), "state": state, "wall_s": wall, "timeline": timeline,
            "tries": tries, "hosts": hosts, "refused": refused, "calls": calls,
            "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks]}


def _seconds(start: str, end: str) -> float:
    from datetime import datetime

    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persons", type=int, default=100_000, help="Marketo persons to seed (default 100000)")
    parser.add_argument("--rounds", default=",".join(ROUNDS), help=f"which rounds, in order (default: {','.join(ROUNDS)})")
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="how much slower two workers may be than one before the bench fails (default 0.10)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    # stopped (kill, timeout): tear the deployment, the sandboxes and the servers down on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    labels = [r.strip() for r in args.rounds.split(",") if r.strip()]
    unknown = [r for r in labels if r not in ROUNDS]
    if unknown:
        parser.error(f"unknown round(s) {unknown}; choose from {list(ROUNDS)}")

    info = e2e_bench.machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gb']} GB RAM; load average "
          f"{info['load_average']} (every process of the deployment and both sandboxes on the same CPUs)")
    figures: dict = {"machine": info, "persons": args.persons, "rounds": []}
    failures: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="mdsync-deploy-bench-"))
    try:
        with ExitStack() as stack:
            postgres_url = stack.enter_context(postgres_server())
            redis = start_redis(tmp / "redis")
            stack.callback(stop_redis, redis)
            for label in labels:
                print(f"\n{label}: first sync of {args.persons:,} persons", flush=True)
                started = time.monotonic()
                result = one_round(label, ROUNDS[label], args.persons, tmp, postgres_url, redis)
                result["round_s"] = round(time.monotonic() - started, 1)
                figures["rounds"].append(result)
                print(f"  run {result['state']} in {result['wall_s']:.1f} s on {', '.join(result['hosts'])}; "
                      f"refused: Marketo {result['refused']['marketo'] or 0}, Dataverse {result['refused']['dynamics'] or 0}; "
                      f"calls: Marketo {result['calls']['marketo']['data']}, Dataverse {result['calls']['dynamics']['data']}")
                print(result["timeline"])
                retried = {t: n for t, n in result["tries"].items() if n > 1}
                if retried:
                    print(f"  retried: {retried}")
                for check in result["checks"]:
                    print(f"  {'ok  ' if check['ok'] else 'FAIL'} {check['name']}: {check['detail']}")
                if result["state"] != "success":
                    failures.append(f"{label}: the run ended {result['state']}")
                failures += [f"{label}: {c['name']}" for c in result["checks"] if not c["ok"]]
                for service, codes in result["refused"].items():
                    if codes:
                        failures.append(f"{label}: the {service} sandbox refused calls: {codes}")
    finally:
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2, default=str))
            print(f"figures written to {args.json}")
        shutil.rmtree(tmp, ignore_errors=True)

    walls = {r["label"]: r["wall_s"] for r in figures["rounds"]}
    if {"1-worker", "2-workers"} <= walls.keys():
        ratio = walls["2-workers"] / walls["1-worker"]
        print(f"\ntwo workers: {walls['2-workers']:.1f} s against {walls['1-worker']:.1f} s on one ({ratio:.2f} x)")
        if ratio > 1 + args.tolerance:
            failures.append(f"two workers took {ratio:.2f} x one worker's time (tolerance {args.tolerance:.0%})")
    return e2e_bench.verdict(failures)


if __name__ == "__main__":
    sys.exit(main())

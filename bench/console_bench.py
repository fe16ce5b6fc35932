"""Console benchmark (issue 11): every page and API call of the operator console against a state store holding a
million activity rows (and 100,000 links, 2,016 runs: a week of 5-minute cycles, 5,000 open errors).

Target: each answers in under a second. The console runs in process behind Airflow's own API app (auth manager,
real JWTs, the plugin as the API server mounts it); live reads of the two services are not part of it (the
person and "why" answers are timed without them; their live read is two API calls).

Run: ``make bench`` (or ``.venv/bin/python bench/console_bench.py [--rows 1000000]``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 1.0


def fill(url: str, rows: int, links: int = 100_000, runs: int = 2016, errors: int = 5000) -> dict:
    """A state store with ``rows`` activity rows spread over ``runs`` runs and ``links`` persons."""
    import numpy as np
    import pandas as pd
    import sqlalchemy as sa

    from mdsync.state import open_store, schema

    store = open_store(url)
    rng = np.random.default_rng(7)
    now = pd.Timestamp.now(tz="UTC")
    run_ids = [f"scheduled__{(now - pd.Timedelta(minutes=5 * i)).isoformat()}" for i in range(runs)]
    actions = np.array(["update", "collision", "create", "link", "skip", "error"])
    weights = np.array([0.6, 0.15, 0.08, 0.08, 0.06, 0.03])
    fields = np.array(["job_title", "city", "phone", "company", "first_name", "last_name"])
    person = rng.integers(1, links + 1, rows)
    run_of = rng.integers(0, runs, rows)
    t0 = time.perf_counter()
    frame = pd.DataFrame({
        "run_id": np.array(run_ids)[run_of], "at": (now - pd.to_timedelta(run_of * 5, unit="m")).to_pydatetime(),
        "entity_type": np.where(person % 2 == 0, "lead", "contact"), "person_id": person,
        "email": pd.Series(person).map(lambda p: f"p{p}@bench.example.com").to_numpy(),
        "dynamics_type": np.where(person % 2 == 0, "lead", "contact"),
        "dynamics_id": pd.Series(person).map(lambda p: f"00000000-0000-4000-8000-{p:012d}").to_numpy(),
        "action": rng.choice(actions, rows, p=weights), "field": rng.choice(fields, rows),
        "old_value": "old", "new_value": "new", "winner": rng.choice(np.array(["marketo", "dynamics"]), rows),
        "detail": "Marketo 'new' vs Dynamics 'old' (last synced 'base'): the entity type's winner",
    }).sort_values("at")
    cols = list(frame.columns)
    with store.engine.begin() as c:
        for start in range(0, rows, 50_000):
            part = frame.iloc[start:start + 50_000]
            c.execute(sa.insert(schema.activity), [dict(zip(cols, r)) for r in part.itertuples(index=False, name=None)])
        c.execute(sa.insert(schema.links), [
            {"person_id": p, "dynamics_type": "lead" if p % 2 == 0 else "contact",
             "dynamics_id": f"00000000-0000-4000-8000-{p:012d}", "method": "email", "linked_at": now.to_pydatetime()}
            for p in range(1, links + 1)])
        c.execute(sa.insert(schema.sync_errors), [
            {"person_id": p, "dynamics_type": "contact", "dynamics_id": f"00000000-0000-4000-8000-{p:012d}",
             "target": "dynamics", "field": "job_title", "value": "Intern", "code": "0x80040265",
             "message": "Interns are not contacts.", "first_seen_at": now.to_pydatetime(),
             "last_seen_at": now.to_pydatetime(), "occurrences": 3} for p in range(1, errors + 1)])
    for i, rid in enumerate(run_ids):
        store.record_run(rid, {"written_dynamics": i % 40, "calls_marketo": 3, "calls_dynamics": 3,
                               "collisions": i % 7}, summary={"run": rid}, run_type="scheduled")
    return {"fill_s": round(time.perf_counter() - t0, 1), "run_ids": run_ids}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mdsync-console-bench-"))
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({"admin": "bench"}))
    os.environ.update({
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "MDSYNC_STATE_URL": f"sqlite:///{home / 'state.sqlite'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",  # no access-log line per timed request
        "PYTHONWARNINGS": "ignore",
    })
    import warnings

    warnings.filterwarnings("ignore")
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True)
    filled = fill(os.environ["MDSYNC_STATE_URL"], args.rows)
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    client = TestClient(create_app())
    token = client.post("/auth/token", json={"username": "admin", "password": "bench"}).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    mid_run = filled["run_ids"][1000]
    calls = [
        ("health API", "/mdsync/api/health"), ("health page", "/mdsync/"),
        ("collisions, page 1", "/mdsync/api/collisions"), ("collisions, page 200", "/mdsync/api/collisions?page=200"),
        ("collisions of one field", "/mdsync/api/collisions?field=city"),
        ("collisions page", "/mdsync/collisions"),
        ("errors, page 1", "/mdsync/api/errors"), ("errors page", "/mdsync/errors"),
        ("a person's story", "/mdsync/api/person?q=4242&live=false"),
        ("a person by email", "/mdsync/api/person?q=p4242@bench.example.com&live=false"),
        ("why, from the store only", "/mdsync/api/why?q=4242&live=false"),
        ("a run's decisions", f"/mdsync/api/runs/{mid_run}/decisions"), ("a run's page", f"/mdsync/runs/{mid_run}"),
        ("runs list", "/mdsync/api/runs"),
    ]
    results = []
    client.get("/mdsync/api/health", headers=headers)  # the first call opens the store once
    for name, path in calls:
        best = None
        for _ in range(3):
            t = time.perf_counter()
            r = client.get(path, headers=headers)
            elapsed = time.perf_counter() - t
            best = elapsed if best is None else min(best, elapsed)
        results.append({"call": name, "path": path, "status": r.status_code, "seconds": round(best, 3),
                        "ok": r.status_code == 200 and best < TARGET_S})
    t = time.perf_counter()
    with client.stream("GET", "/mdsync/api/collisions.csv", headers=headers) as r:
        lines = sum(chunk.count(b"\n") for chunk in r.iter_bytes())
    csv_s = time.perf_counter() - t
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                      "activity_rows": args.rows, "fill_s": filled["fill_s"], "calls": results,
                      "collisions_csv": {"lines": lines, "seconds": round(csv_s, 1)}}, indent=1))
    for row in results:
        print(f"{'ok ' if row['ok'] else 'SLOW'} {row['seconds']:6.3f} s  {row['status']}  {row['call']}")
    return 0 if all(row["ok"] for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end first-sync benchmark (DESIGN §8): the real engine against both sandboxes, with their real limits.

Run:
    make bench                          # the engine bench, then this one at 100,000 persons
    make bench PERSONS=1000000          # ... at 1,000,000 persons
    .venv/bin/python bench/e2e_bench.py --persons 100000 [--keep] [--json out.json] [--sequential]

What it does:
1. Starts both sandboxes with the real limits (Marketo: 100 calls / 20 s, 10 concurrent, 50,000 calls a day;
   Dataverse service protection: 6,000 requests / 5 min and 52 concurrent per user) in a temporary folder and seeds them through their admin APIs, in
   batches of 50,000: about N Marketo persons and 0.8 N Dynamics rows, mixed as ``MIX`` / ``PAIR_VARIANTS`` /
   ``MARKED_AS`` below say (printed at start).
2. Times three cycles on a fresh state store: the **first sync**, the **echo cycle** right after it (our own
   writes come back as changes; it must write nothing), and a **10k-change window** (``CHANGES`` linked
   records updated, half in Marketo through Sync Leads, half in Dynamics through UpdateMultiple, then a cycle).
   Each task of a cycle runs in its own child process (``bench/_stage.py``), as Airflow runs each task: forked
   from a worker that preloaded the libraries (``--task-start forkserver``, the default, as ``scripts/airflow-env.sh``
   configures the LocalExecutor), or a new interpreter that imports them (``--task-start spawn``); the two
   extract tasks, and the two plan tasks, run side by side as in the DAG (``--sequential`` runs them one after the other).
3. Prints per cycle: each task's wall time and peak RSS (its own process's ``VmHWM``), the cycle's wall time, the API calls per service from
   the sandboxes' own counters (auth calls apart), the floor (the fewest calls the limits allow, see
   ``floors()``), the records written per side from the run's report, and the end-state checks (links, no
   duplicate emails, marked persons created, unmarked ones left alone, Dynamics-only rows created in Marketo,
   values converged to the expected winner). A failed check is printed as FAIL and the bench exits 1.

The floor: Marketo ceil(records written / 300) (or 2 calls per Bulk Lead Import job, create and status, when
that is fewer) + 4 calls per bulk export job (create, enqueue, status, file) + ceil(persons read by REST / 300)
when no bulk job read them; Dataverse, per entity set, ceil(records written / 1000) + ceil(rows read / 5000)
(at least one read call). Records written are distinct persons with a successful write in the loads' staged
outcomes, plus the records created (and, in Dynamics, the rows whose person was created in Marketo, which get
the Marketo id written back). Auth calls (tokens, OpenID discovery) are counted apart and not compared with the
floor; schema calls (describe, entity metadata) are in the data calls but not in the floor.

DESIGN §8 targets: first sync of 100k persons in 5 min and of 1M in 30 min on 2 cores, calls within 1.1 x the
floor, and the cycle after it writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "include")]

import _stage  # noqa: E402  (bench/, the task runner)
from sandbox.dataverse import DataverseSandbox  # noqa: E402
from sandbox.marketo import MarketoSandbox  # noqa: E402

# --- the mix (shares of --persons) ------------------------------------------------------------------------
MIX = {
    "pair_lead": 0.30,              # Marketo person + Dynamics lead with the same email
    "pair_contact": 0.30,           # Marketo person + Dynamics contact with the same email
    "marketo_marked": 0.05,         # Marketo only, syncToDynamics = true: must be created in Dynamics
    "marketo_unmarked": 0.35,       # Marketo only, not marked: must be left alone
    "dynamics_only_lead": 0.10,     # Dynamics lead only: must become a new Marketo person
    "dynamics_only_contact": 0.10,  # Dynamics contact only: must become a new Marketo person
}
#: variants of a pair, in percent of pairs (by index % 100); the rest are identical on both sides
PAIR_VARIANTS = {
    "title_differs": 10,            # job title differs: a first-link collision, won by the entity type's side
    "city_only_dynamics": 5,        # city blank in Marketo: filled from Dynamics
    "phone_only_dynamics": 5,       # phone blank in Marketo: filled from Dynamics
    "city_only_marketo": 5,         # city blank in Dynamics: filled from Marketo
    "email_case_differs": 2,        # same email, different case (matched case-insensitively)
}
#: dynamicsSyncAs of marked persons, in tenths (blank means the config's default type, lead)
MARKED_AS = {"lead": 4, "contact": 3, "": 3}
#: linked records changed before the third cycle (half in Marketo, half in Dynamics)
CHANGES = 10_000
SEED_BATCH = 50_000
TITLES = ["Engineer", "Manager", "Director", "Analyst", "Consultant", "Designer", "Developer", "Architect",
          "Account Executive", "Product Owner", "Scientist", "Administrator", "Specialist", "Coordinator",
          "Vice President", "Founder", "Buyer", "Controller", "Recruiter", "Teacher"]
ENTITY_SET = {"lead": "leads", "contact": "contacts"}
ID_COLUMN = {"lead": "leadid", "contact": "contactid"}
STAGE_TIMEOUT_S = 3 * 3600
#: what this script imports at its top level (preloaded with the task worker's modules, see Runner)
BENCH_IMPORTS = ["numpy", "pandas", "_stage", "sandbox.dataverse", "sandbox.marketo"]
#: tasks the DAG runs side by side (same upstream); the runner starts them together, as a scheduler would
SIDE_BY_SIDE = {("extract_marketo", "extract_dynamics"), ("plan_lead", "plan_contact")}


# --- machine --------------------------------------------------------------------------------------------

def worker_preload() -> list[str]:
    """The modules a task worker preloads: ``AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD`` of
    ``scripts/airflow-env.sh`` (one list for Airflow and this benchmark)."""
    text = (REPO / "scripts" / "airflow-env.sh").read_text()
    found = re.search(r'MP_FORKSERVER_PRELOAD:-([^}"]+)', text)
    if not found:
        raise SystemExit("scripts/airflow-env.sh sets no AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD default")
    return [m.strip() for m in found.group(1).split(",") if m.strip()]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    import sqlite3

    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "memory_gb": round(mem_kb / 1024 ** 2, 1),
            "python": platform.python_version(), "pandas": pd.__version__, "numpy": np.__version__,
            "sqlite": sqlite3.sqlite_version, "platform": platform.platform(),
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}


# --- the population -------------------------------------------------------------------------------------

def population(n: int) -> tuple[pd.DataFrame, dict]:
    """Every seeded person, one row each (index ``i``), with what each side holds and what must end up where.

    Marketo persons come first (``i`` < number of Marketo persons) so their Marketo id is ``first id + i``.
    """
    counts = {k: int(round(n * share)) for k, share in MIX.items()}
    order = ["pair_lead", "pair_contact", "marketo_marked", "marketo_unmarked", "dynamics_only_lead",
             "dynamics_only_contact"]
    category = np.repeat(order, [counts[k] for k in order])
    total = len(category)
    i = np.arange(total)
    s = pd.Series(i)
    idx7 = s.astype(str).str.zfill(7)
    email = "p" + idx7 + "@bench.example.com"
    entity = pd.Series(np.select([np.char.endswith(category.astype(str), "lead"),
                                  np.char.endswith(category.astype(str), "contact")], ["lead", "contact"], None),
                       dtype=object)
    is_pair = pd.Series(np.char.startswith(category.astype(str), "pair_"))
    in_marketo = pd.Series(~np.char.startswith(category.astype(str), "dynamics_only"))
    in_dynamics = is_pair | pd.Series(np.char.startswith(category.astype(str), "dynamics_only"))

    k = i % 100
    variant = np.full(total, "identical", dtype=object)
    start = 0
    for name, pct in PAIR_VARIANTS.items():
        variant[(k >= start) & (k < start + pct)] = name
        start += pct
    variant = pd.Series(np.where(is_pair, variant, None), dtype=object)

    title = pd.Series(np.array(TITLES, dtype=object)[i % len(TITLES)], dtype=object)
    city = "City " + (s % 997).astype(str)
    phone = "+1 555 " + idx7
    m_title = title.where(variant.ne("title_differs"), title + " (M)")
    d_title = title.where(variant.ne("title_differs"), title + " (D)")
    m_city = city.where(variant.ne("city_only_dynamics"), None)
    d_city = city.where(variant.ne("city_only_marketo"), None)
    m_phone = phone.where(variant.ne("phone_only_dynamics"), None)
    m_email = email.where(variant.ne("email_case_differs"), "P" + idx7 + "@Bench.Example.COM")

    marked = pd.Series(category == "marketo_marked")
    tenth = i % 10
    sync_as = pd.Series(None, index=s.index, dtype=object)
    start = 0
    for value, tenths in MARKED_AS.items():
        sync_as[marked & (tenth >= start) & (tenth < start + tenths)] = value
        start += tenths
    # some unmarked persons carry a sync-as value without the marker: still not for Dynamics
    unmarked = pd.Series(category == "marketo_unmarked")
    sync_as[unmarked & (i % 5 == 0)] = "contact"
    sync_flag = pd.Series(np.where(marked, True, np.where(unmarked & (i % 2 == 0), False, None)), dtype=object)

    exp_entity = entity.where(in_dynamics, None)
    exp_entity = exp_entity.where(~marked, sync_as.replace("", "lead"))
    winner_title = np.where(entity.eq("lead"), m_title, d_title)
    exp_title = pd.Series(np.where(variant.eq("title_differs"), winner_title, title), dtype=object)

    dyn_id = pd.Series(None, index=s.index, dtype=object)
    dyn_id[in_dynamics] = [str(uuid.UUID(int=((1 if e == "lead" else 2) << 96) | int(j)))
                           for e, j in zip(entity[in_dynamics], i[in_dynamics.to_numpy()])]

    pop = pd.DataFrame({
        "category": category, "entity": entity, "variant": variant, "email": email, "m_email": m_email,
        "in_marketo": in_marketo, "in_dynamics": in_dynamics, "marked": marked, "sync_as": sync_as,
        "sync_flag": sync_flag, "first": "First" + s.astype(str), "last": "Last" + s.astype(str),
        "company": "Company " + (s % 5000).astype(str), "m_title": m_title, "d_title": d_title,
        "m_city": m_city, "d_city": d_city, "m_phone": m_phone, "d_phone": phone, "dynamics_id": dyn_id,
        "exp_entity": exp_entity, "exp_title": exp_title, "exp_city": city, "exp_phone": phone,
    })
    pop.index.name = "i"
    return pop, counts


def _records(frame: pd.DataFrame, columns: dict[str, str]) -> list[dict]:
    """API records of a frame's rows (``columns``: frame column -> API name), blank values left out."""
    names = list(columns.values())
    arrays = [frame[c].to_numpy(dtype=object) for c in columns]
    return [{k: v for k, v in zip(names, row) if v is not None and v == v} for row in zip(*arrays)]


def seed(pop: pd.DataFrame, marketo: MarketoSandbox, dataverse: DataverseSandbox) -> dict:
    started = time.perf_counter()
    mk = pop[pop["in_marketo"]]
    first_id = None
    for lo in range(0, len(mk), SEED_BATCH):
        batch = mk.iloc[lo:lo + SEED_BATCH]
        leads = _records(batch, {"m_email": "email", "first": "firstName", "last": "lastName", "m_title": "title",
                                 "company": "company", "m_city": "city", "m_phone": "phone",
                                 "sync_flag": "syncToDynamics", "sync_as": "dynamicsSyncAs"})
        out = marketo.admin("POST", "/leads", json={"leads": leads}, timeout=900)
        ids = out.get("ids") or list(range(out["first_id"], out["last_id"] + 1))
        if first_id is None:
            first_id = ids[0]
        if ids[0] != first_id + lo or len(ids) != len(batch):
            raise SystemExit(f"Marketo seeding returned ids {ids[0]}..{ids[-1]} for rows {lo}..{lo + len(batch) - 1}")
    marketo_s = time.perf_counter() - started
    started = time.perf_counter()
    dy = pop[pop["in_dynamics"]]
    for name in ("lead", "contact"):
        rows = dy[dy["entity"] == name]
        columns = {"dynamics_id": ID_COLUMN[name], "email": "emailaddress1", "first": "firstname",
                   "last": "lastname", "d_title": "jobtitle", "d_city": "address1_city", "d_phone": "telephone1"}
        if name == "lead":
            columns["company"] = "companyname"
        for lo in range(0, len(rows), SEED_BATCH):
            dataverse.admin("POST", f"rows/{ENTITY_SET[name]}",
                            {"return_ids": False, "rows": _records(rows.iloc[lo:lo + SEED_BATCH], columns)})
    dynamics_s = time.perf_counter() - started
    pop["marketo_id"] = pd.Series(np.arange(len(pop)) + first_id, index=pop.index).where(pop["in_marketo"])
    return {"marketo_s": round(marketo_s, 1), "dynamics_s": round(dynamics_s, 1), "marketo_persons": len(mk),
            "dynamics_rows": len(dy), "first_marketo_id": first_id}


# --- clients --------------------------------------------------------------------------------------------

def clients(marketo: MarketoSandbox, dataverse: DataverseSandbox):
    from mdsync.dynamics import DynamicsClient
    from mdsync.marketo import MarketoClient

    return (MarketoClient(marketo.base_url, marketo.client_id, marketo.client_secret),
            DynamicsClient(dataverse.org_url, dataverse.client_id, dataverse.client_secret, dataverse.tenant_id,
                           authority=dataverse.authority, verify=dataverse.ca_bundle))


def settle_marketo_window(since: float) -> None:
    """Let Marketo's 20-second rate window that the bench's own calls used run out before a timed cycle."""
    wait = 21 - (time.monotonic() - since)
    if wait > 0:
        time.sleep(wait)


# --- one cycle ------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, tmp: Path, marketo: MarketoSandbox, dataverse: DataverseSandbox, parallel: bool,
                 task_start: str = "forkserver") -> None:
        self.tmp, self.marketo, self.dataverse, self.parallel = tmp, marketo, dataverse, parallel
        from mdsync import cycle as cycle_module

        self.stages = list(getattr(cycle_module, "STAGES", []))
        self.per_task = bool(self.stages) and hasattr(cycle_module.Cycle, "run_stage")
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "include"),
                                                                              os.environ.get("PYTHONPATH")]))}
        self.task_start = task_start
        if task_start == "forkserver":
            # as scripts/airflow-env.sh configures the scheduler's LocalExecutor: a forkserver that imported
            # the libraries once; each task is a fresh child forked from it
            # (Python 3.11's forkserver ignores the parent's sys.path: PYTHONPATH says where this checkout is)
            os.environ["PYTHONPATH"] = os.pathsep.join([self.env["PYTHONPATH"], str(REPO / "bench")])
            self.forkserver = multiprocessing.get_context("forkserver")
            # (the bench's tasks run the engine without Airflow, so Airflow's own modules are left out; each
            # child re-runs this script's top level as __mp_main__, so what it imports is preloaded too)
            self.forkserver.set_forkserver_preload(
                [m for m in worker_preload() if m.split(".")[0] != "airflow"] + BENCH_IMPORTS)

    def _spawn(self, stage: str, run_id: str, manifest_in: Path, folder: Path):
        out, stats, log = folder / f"{stage}.manifest.json", folder / f"{stage}.stats.json", folder / f"{stage}.log"
        argv = [stage, str(manifest_in), str(out), "--run-id", run_id, "--stats", str(stats)]
        job = {"stage": stage, "out": out, "stats": stats, "log": log, "started": time.perf_counter()}
        if self.task_start == "forkserver":
            proc = self.forkserver.Process(target=_stage.run_forked, args=(argv, str(log)), name=f"task {stage}")
            proc.start()
            return proc, job
        job["fh"] = log.open("w")
        proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "_stage.py"), *argv], env=self.env, cwd=REPO,
                                stdout=job["fh"], stderr=subprocess.STDOUT)
        return proc, job

    def _wait(self, proc, job: dict) -> dict:
        if isinstance(proc, subprocess.Popen):
            try:
                proc.wait(timeout=STAGE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            job["fh"].close()
            code = proc.returncode
        else:
            proc.join(STAGE_TIMEOUT_S)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            code = proc.exitcode
        if code != 0:
            tail = job["log"].read_text(errors="replace")[-5000:]
            raise SystemExit(f"\ntask {job['stage']} failed (exit {code}); log {job['log']}:\n{tail}")
        stats = json.loads(job["stats"].read_text())
        stats["process_s"] = round(time.perf_counter() - job["started"], 3)
        return stats

    def run(self, label: str, run_id: str) -> dict:
        from mdsync.cycle import Cycle, RunInfo

        folder = self.tmp / "runs" / run_id
        folder.mkdir(parents=True)
        self.marketo.admin("POST", "/calls/reset")
        self.dataverse.admin("POST", "calls/reset")
        started = time.perf_counter()
        tasks, manifest, report = [], None, None
        if self.per_task:
            from mdsync.results import RunManifest

            current = folder / "start.manifest.json"
            current.write_text(json.dumps(RunManifest(run_id=run_id).dump()))
            pending = list(self.stages)
            while pending:
                group = pending[:2] if self.parallel and tuple(pending[:2]) in SIDE_BY_SIDE else pending[:1]
                pending = pending[len(group):]
                jobs = [self._spawn(stage, run_id, current, folder) for stage in group]
                tasks += [self._wait(proc, job) for proc, job in jobs]
                if len(jobs) == 1:
                    current = jobs[0][1]["out"]
                else:  # side by side from the same input: each contributed its own part of the manifest
                    base = json.loads(current.read_text())
                    merged = dict(base)
                    for _, job in jobs:
                        for key, value in json.loads(job["out"].read_text()).items():
                            if key == "plans":  # each plan task added its own entity's plan
                                merged[key] = merged.get(key, []) + [p for p in value if p not in base.get(key, [])]
                            elif value != base.get(key):
                                merged[key] = value
                    current = folder / f"{'+'.join(group)}.manifest.json"
                    current.write_text(json.dumps(merged))
            manifest = RunManifest.model_validate(json.loads(current.read_text()))
        else:
            proc, job = self._spawn("run_all", run_id, folder / "none.json", folder)
            tasks.append(self._wait(proc, job))
            report = json.loads(job["out"].read_text())["report"]
        wall = time.perf_counter() - started
        m_calls, d_calls = self.marketo.calls(), self.dataverse.calls()
        if manifest is not None:
            cycle = Cycle(RunInfo(run_id=run_id), marketo_client=lambda: None, dynamics_client=lambda: None)
            report = cycle.report(manifest)
        return {"label": label, "run_id": run_id, "wall_s": round(wall, 2), "tasks": tasks, "report": report,
                "manifest": manifest.dump() if manifest is not None else None,
                "sandbox_calls": {"marketo": m_calls, "dynamics": d_calls}}


def _is_auth(service: str, endpoint: str) -> bool:
    e = endpoint.lower()
    if service == "marketo":
        return "/identity/" in e
    return "oauth2" in e or "well-known" in e or "userrealm" in e or "/discovery" in e


def split_calls(service: str, stats: dict) -> dict:
    by = stats.get("by_endpoint", {})
    auth = sum(n for e, n in by.items() if _is_auth(service, e))
    out = {"total": int(stats.get("total", sum(by.values()))), "auth": auth}
    out["data"] = out["total"] - auth
    if service == "marketo":
        out["bulk_export_jobs"] = sum(n for e, n in by.items() if e.startswith("POST") and "/export/create" in e)
        out["bulk_import_jobs"] = sum(n for e, n in by.items() if e == "POST /bulk/v1/leads.json")
        out["limited"] = stats.get("limited", {})
    return out


def _written_records(run: dict) -> dict:
    """Records (not fields) written per side and entity set, from the staged per-field outcomes of the loads."""
    m = run["manifest"]
    out = {"marketo": None, "dynamics": {}, "exact": False}
    if not m:
        return out

    def ok_people(paths) -> set:
        people = set()
        for path in paths:
            if path and Path(path).exists():
                r = pd.read_parquet(path)
                if not r.empty and "person_id" in r:
                    people |= set(r.loc[r["ok"].astype(bool), "person_id"].dropna().astype("int64"))
        return people

    try:
        dl, ml = m.get("dynamics_loaded") or {}, m.get("marketo_loaded") or {}
        # Dynamics rows written: field and link writes, rows created from Marketo persons, and the Marketo id
        # written back on rows whose person was created in Marketo
        created = [pd.read_parquet(x["created_links"]) for x in (dl, ml) if x.get("created_links")]
        for name, path in (dl.get("results") or {}).items():
            people = ok_people([path])
            for c in created:
                if not c.empty and "dynamics_type" in c:
                    people |= set(c.loc[c["dynamics_type"] == name, "person_id"].astype("int64"))
            out["dynamics"][name] = len(people)
        people = ok_people((ml.get("results") or {}).values())
        if ml.get("created_links"):
            people |= set(pd.read_parquet(ml["created_links"])["person_id"].astype("int64"))
        out["marketo"] = len(people)
        out["exact"] = True
    except (KeyError, OSError, ValueError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def floors(run: dict, calls: dict) -> dict:
    """The fewest calls the limits allow for what the run read and wrote (see the module docstring)."""
    report, m = run["report"] or {}, run["manifest"] or {}
    written = _written_records(run)
    if written["marketo"] is None:  # no staged outcomes: field writes from the report (an upper bound)
        written["marketo"] = int((report.get("written") or {}).get("marketo", 0))
        total_d = int((report.get("written") or {}).get("dynamics", 0))
        written["dynamics"] = {"all": total_d}
    jobs = calls["marketo"]["bulk_export_jobs"]
    read_m = int((m.get("marketo") or {}).get("extracted", report.get("extracted_marketo_persons", 0)) or 0)
    imports = calls["marketo"].get("bulk_import_jobs", 0)
    m_write = math.ceil(written["marketo"] / 300)
    if imports:  # Bulk Lead Import: a job is at least a create and one status call
        m_write = min(m_write, 2 * imports)
    m_read = 4 * jobs if jobs else math.ceil(read_m / 300)
    d_write = sum(math.ceil(n / 1000) for n in written["dynamics"].values())
    if (m.get("dynamics") or {}).get("entities"):
        rows = {e: int(v.get("extracted", 0)) for e, v in m["dynamics"]["entities"].items()}
    else:
        rows = {e: int(v.get("extracted_dynamics", 0)) for e, v in (report.get("entities") or {}).items()}
    d_read = sum(max(1, math.ceil(n / 5000)) for n in rows.values())
    return {"marketo": m_write + m_read, "dynamics": d_write + d_read,
            "detail": {"marketo": f"{m_write} to write {written['marketo']:,} records"
                                  f"{f' ({imports} bulk import jobs)' if imports else ''} + {m_read} to read "
                                  f"({f'{jobs} bulk jobs' if jobs else f'{read_m:,} persons by REST'})",
                       "dynamics": f"{d_write} to write "
                                   f"{', '.join(f'{n:,} {e}' for e, n in written['dynamics'].items()) or 'nothing'}"
                                   f" + {d_read} to read {', '.join(f'{n:,} {e}' for e, n in rows.items())}"},
            "records_written": written}


# --- end state ------------------------------------------------------------------------------------------

def _norm(values: pd.Series) -> pd.Series:
    v = values.astype(object).where(values.notna(), None)
    return v.map(lambda x: None if x is None or (isinstance(x, str) and x.strip() == "") else str(x))


def read_end_state(marketo: MarketoSandbox, dataverse: DataverseSandbox, state_url: str | None = None) -> dict:
    """Both sandboxes' persons and rows, and the state store's links (``state_url``; by default
    ``MDSYNC_STATE_URL``)."""
    from mdsync.state import open_store

    _mk, dy = clients(marketo, dataverse)
    # Marketo's persons straight from the sandbox's database, read-only: exporting 1.2M persons through the API
    # for each check would use up the day's 500 MB export quota that the next cycles need (as it would on a real
    # subscription), so the checks would change what they measure. Every person in it was seeded or synced here.
    fields = ["email", "title", "city", "phone", "dynamicsRecordId", "dynamicsRecordType", "syncToDynamics"]
    with sqlite3.connect(f"file:{marketo.data_dir / 'marketo.sqlite3'}?mode=ro", uri=True) as db:
        persons = pd.read_sql_query(f"SELECT id, {', '.join(repr(f).replace(chr(39), chr(34)) for f in fields)} "
                                    "FROM leads", db)
    rows = {}
    for name in ("lead", "contact"):
        rows[name] = dy.query(ENTITY_SET[name], [ID_COLUMN[name], "emailaddress1", "mdsync_marketopersonid",
                                                 "jobtitle", "address1_city", "telephone1"])
    links = open_store(state_url or os.environ["MDSYNC_STATE_URL"]).load_links()
    return {"persons": persons, "rows": rows, "links": links}


def check_end_state(pop: pd.DataFrame, counts: dict, state: dict) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, bool, str]] = []

    def add(name: str, ok: bool, detail: str) -> None:
        checks.append((name, bool(ok), detail))

    def sample(mask: pd.Series, cols: list[str]) -> str:
        bad = mask[mask].index[:2]
        shown = [{k: v for k, v in frame.loc[i, cols].to_dict().items() if not pd.isna(v)} for i in bad]
        return "; e.g. " + " | ".join(str(s) for s in shown) if len(bad) else ""

    persons, links = state["persons"].copy(), state["links"]
    persons["key"] = persons["email"].astype(str).str.lower()
    n_pairs = counts["pair_lead"] + counts["pair_contact"]
    n_marked = counts["marketo_marked"]
    n_dyn_only = counts["dynamics_only_lead"] + counts["dynamics_only_contact"]
    n_marketo = int(pop["in_marketo"].sum())
    n_dynamics = int(pop["in_dynamics"].sum())

    expected_links = n_pairs + n_marked + n_dyn_only
    add("links", len(links) == expected_links,
        f"{len(links):,} links in the state store; expected {expected_links:,} = {n_pairs:,} pairs + "
        f"{n_marked:,} marked persons created in Dynamics + {n_dyn_only:,} Dynamics-only rows created in Marketo")
    dup_m = int(persons["key"].duplicated().sum())
    add("marketo persons", len(persons) == n_marketo + n_dyn_only and dup_m == 0,
        f"{len(persons):,} persons (expected {n_marketo:,} seeded + {n_dyn_only:,} created), "
        f"{dup_m:,} duplicate emails")
    d_all = pd.concat([r.assign(entity=name, dynamics_id=r[ID_COLUMN[name]].astype(str).str.lower())
                       for name, r in state["rows"].items()], ignore_index=True)
    d_all["key"] = d_all["emailaddress1"].astype(str).str.lower()
    dup_d = int(d_all["key"].duplicated().sum())
    add("dynamics rows", len(d_all) == n_dynamics + n_marked and dup_d == 0,
        f"{len(d_all):,} rows ({', '.join(f'{len(r):,} {n}s' for n, r in state['rows'].items())}; expected "
        f"{n_dynamics:,} seeded + {n_marked:,} created), {dup_d:,} duplicate emails")

    m = persons.drop_duplicates("key").set_index("key")
    d = d_all.drop_duplicates("key").set_index("key")
    frame = pop.copy()
    frame["m_id"] = m["id"].reindex(frame["email"]).to_numpy()
    for col in ("dynamicsRecordId", "dynamicsRecordType", "title", "city", "phone"):
        frame[f"m_{col}_now"] = _norm(m[col].reindex(frame["email"])).to_numpy() if col in m else None
    for col in ("entity", "dynamics_id", "mdsync_marketopersonid", "jobtitle", "address1_city", "telephone1"):
        frame[f"d_{col}_now"] = _norm(d[col].reindex(frame["email"])).to_numpy()
    link_of = links.reindex(frame["m_id"].fillna(-1).astype("int64").to_numpy())
    frame["link_type"] = link_of["dynamics_type"].to_numpy()
    frame["link_id"] = link_of["dynamics_id"].astype(object).map(
        lambda x: x.lower() if isinstance(x, str) else None).to_numpy()

    linked = frame["exp_entity"].notna()
    seeded_id = frame["dynamics_id"].str.lower()
    m_id_text = frame["m_id"].map(lambda x: None if pd.isna(x) else str(int(x)))
    wrong = linked & ~(
        frame["m_id"].notna() & frame["d_entity_now"].eq(frame["exp_entity"])
        & frame["link_type"].eq(frame["exp_entity"]) & frame["link_id"].eq(frame["d_dynamics_id_now"])
        & frame["m_dynamicsRecordId_now"].str.lower().eq(frame["d_dynamics_id_now"])
        & frame["m_dynamicsRecordType_now"].eq(frame["exp_entity"])
        & frame["d_mdsync_marketopersonid_now"].eq(m_id_text)
        & (seeded_id.isna() | seeded_id.eq(frame["d_dynamics_id_now"])))
    cols = ["email", "category", "exp_entity", "m_id", "link_type", "link_id", "m_dynamicsRecordId_now",
            "d_entity_now", "d_dynamics_id_now", "d_mdsync_marketopersonid_now"]
    for cat, what in (("pair", "pairs linked to their seeded record, link fields on both sides"),
                      ("marketo_marked", "marked persons created in Dynamics as their dynamicsSyncAs (blank: lead)"),
                      ("dynamics_only", "Dynamics-only rows created as Marketo persons and linked")):
        mask = frame["category"].str.startswith(cat)
        bad = wrong & mask
        add(what.split(" ")[0] + " " + what.split(" ")[1], not bad.any(),
            f"{int((mask & ~bad).sum()):,} of {int(mask.sum()):,} {what}{sample(bad, cols)}")
    unmarked = frame["category"].eq("marketo_unmarked")
    touched = unmarked & (frame["link_type"].notna() | frame["m_dynamicsRecordId_now"].notna()
                          | frame["d_entity_now"].notna() | frame["m_id"].isna())
    add("unmarked left alone", not touched.any(),
        f"{int((unmarked & ~touched).sum()):,} of {int(unmarked.sum()):,} unmarked persons with no link, no "
        f"Dynamics record and no link fields{sample(touched, cols)}")
    for field, m_col, d_col in (("exp_title", "m_title_now", "d_jobtitle_now"),
                                ("exp_city", "m_city_now", "d_address1_city_now"),
                                ("exp_phone", "m_phone_now", "d_telephone1_now")):
        # over the persons linked as expected (the ones that are not were reported above)
        ok_linked = linked & ~wrong
        bad = ok_linked & ~(frame[m_col].eq(frame[field]) & frame[d_col].eq(frame[field]))
        name = field.removeprefix("exp_")
        add(f"{name} converged", not bad.any(),
            f"{int((ok_linked & ~bad).sum()):,} of {int(ok_linked.sum()):,} linked persons have the expected {name} on "
            f"both sides{sample(bad, ['email', 'category', 'variant', 'exp_entity', field, m_col, d_col])}")
    return checks


# --- changes for the third cycle ------------------------------------------------------------------------

def make_changes(pop: pd.DataFrame, marketo: MarketoSandbox, dataverse: DataverseSandbox, n: int) -> dict:
    """``n`` linked records changed: half the job titles in Marketo, half the phones in Dynamics (no overlap)."""
    mk, dy = clients(marketo, dataverse)
    candidates = pop.index[pop["variant"].eq("identical")].to_numpy()
    rng = np.random.default_rng(7)
    picked = rng.permutation(candidates)[: min(n, len(candidates))]
    in_marketo, in_dynamics = np.sort(picked[: len(picked) // 2]), np.sort(picked[len(picked) // 2:])
    new_titles = "Changed Title " + pd.Series(in_marketo).astype(str)
    res = mk.sync_leads([{"id": int(pid), "title": t} for pid, t in
                         zip(pop.loc[in_marketo, "marketo_id"].astype("int64"), new_titles)], "updateOnly", "id")
    if not res["status"].eq("updated").all():
        raise SystemExit(f"Marketo changes: {res[~res['status'].eq('updated')].head().to_dict('records')}")
    pop.loc[in_marketo, "exp_title"] = new_titles.to_numpy()
    new_phones = "+1 555 999 " + pd.Series(in_dynamics).astype(str).str.zfill(7)
    pop.loc[in_dynamics, "exp_phone"] = new_phones.to_numpy()
    changed = pop.loc[in_dynamics]
    for name in ("lead", "contact"):
        mine = changed["entity"].eq(name).to_numpy()
        rows = [{ID_COLUMN[name]: rid, "telephone1": ph}
                for rid, ph in zip(changed.loc[mine, "dynamics_id"], pop.loc[in_dynamics[mine], "exp_phone"])]
        if rows:
            out = dy.update_multiple(ENTITY_SET[name], rows)
            if not out["ok"].all():
                raise SystemExit(f"Dynamics changes: {out[~out['ok']].head().to_dict('records')}")
    return {"marketo": len(in_marketo), "dynamics": len(in_dynamics)}


# --- output ---------------------------------------------------------------------------------------------

def print_cycle(run: dict, calls: dict, floor: dict, checks: list | None) -> None:
    report = run["report"] or {}
    print(f"\n=== {run['label']} (run {run['run_id']}): {run['wall_s']:.1f} s")
    print(f"  {'task (own process)':<22}{'wall s':>9}{'imports s':>11}{'process s':>11}{'peak RSS MB':>13}"
          f"{'Marketo':>9}{'Dataverse':>11}")
    for t in run["tasks"]:
        c = t.get("calls") or {}
        print(f"  {t['stage']:<22}{t['wall_s']:>9.1f}{t['import_s']:>11.1f}{t['process_s']:>11.1f}"
              f"{t['peak_rss_mb']:>13,.0f}{c.get('marketo', 0):>9,}{c.get('dynamics', 0):>11,}")
    work = sum(t["wall_s"] for t in run["tasks"])
    print(f"  {'cycle':<22}{run['wall_s']:>9.1f}{'':>22}{max(t['peak_rss_mb'] for t in run['tasks']):>13,.0f}"
          f"   (tasks' own work {work:.1f} s; the rest is process start-up and imports)")
    for service, name in (("marketo", "Marketo"), ("dynamics", "Dataverse")):
        c, f = calls[service], floor[service]
        ratio = f"{c['data'] / f:.2f} x" if f else "-"
        extra = f", rate-limited {c['limited']}" if c.get("limited") else ""
        print(f"  API calls {name:<10} {c['data']:>7,} data + {c['auth']:,} auth{extra}; floor {f:,} "
              f"({floor['detail'][service]}); {ratio} the floor")
    written = report.get("written") or {}
    print(f"  written (report): Dynamics {written.get('dynamics', 0):,}, Marketo {written.get('marketo', 0):,}; "
          f"created {report.get('created')}; new links {report.get('new_links')}; errors {report.get('errors')}")
    for name, ok, detail in checks or []:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")


def verdict(failures: list[str]) -> int:
    """Print the failed checks (or that all passed); the bench's exit code."""
    if failures:
        print(f"\n{len(failures)} check(s) FAILED:")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("\nall checks passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persons", type=int, default=100_000, help="Marketo persons to seed (default 100000)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (sandboxes, state, logs)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--sequential", action="store_true", help="run every task one after the other")
    parser.add_argument("--task-start", choices=["forkserver", "spawn"], default="forkserver",
                        help="forkserver (default): each task forked from a worker that preloaded the libraries, "
                             "as scripts/airflow-env.sh configures Airflow's LocalExecutor; spawn: a new "
                             "interpreter per task (Airflow's default start method before 3.14: imports per task)")
    args = parser.parse_args(argv)

    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gb']} GB RAM; Python {info['python']}, "
          f"pandas {info['pandas']}, numpy {info['numpy']}, SQLite {info['sqlite']}; load average "
          f"{info['load_average']} (the sandboxes run on the same CPUs)")
    pop, counts = population(args.persons)
    n_marketo, n_dynamics = int(pop["in_marketo"].sum()), int(pop["in_dynamics"].sum())
    pairs = counts["pair_lead"] + counts["pair_contact"]
    print(f"mix for --persons {args.persons:,}: {n_marketo:,} Marketo persons, {n_dynamics:,} Dynamics rows")
    for name, n in counts.items():
        print(f"  {name:<24}{n:>10,}  ({MIX[name]:.0%})")
    print("  pair variants: " + ", ".join(f"{k} {v}%" for k, v in PAIR_VARIANTS.items()) + ", the rest identical "
          f"({int(pop['variant'].eq('identical').sum()):,} of {pairs:,} pairs)")
    print("  marked persons' dynamicsSyncAs: " + ", ".join(f"{k or 'blank'} {v}0%" for k, v in MARKED_AS.items())
          + "; 20% of unmarked persons have dynamicsSyncAs=contact without the marker")

    tmp = Path(tempfile.mkdtemp(prefix="mdsync-e2e-"))
    figures: dict = {"machine": info, "task_start": args.task_start, "persons": args.persons, "mix": counts, "pair_variants": PAIR_VARIANTS,
                     "marked_as": MARKED_AS, "cycles": []}
    failures: list[str] = []
    try:
        os.environ.update({
            "MDSYNC_STATE_URL": f"sqlite:///{tmp / 'state.sqlite'}", "MDSYNC_STAGING_URL": f"file://{tmp / 'staging'}",
            "MDSYNC_KEEP_STAGING": "1", "MDSYNC_BULK_POLL_SECONDS": "1",
        })
        # the real limits: Marketo 100 calls / 20 s, 10 concurrent, 50,000 a day; Dataverse service protection
        with MarketoSandbox(tmp / "marketo", rate_limit=(100, 20), max_concurrent=10, daily_quota=50_000) as marketo, \
                DataverseSandbox(tmp / "dataverse", requests_per_window=6000, window_s=300,
                                 max_concurrent=52) as dataverse:
            os.environ["AIRFLOW_CONN_MARKETO_DEFAULT"] = marketo.connection_json()
            os.environ["AIRFLOW_CONN_DYNAMICS_DEFAULT"] = dataverse.connection_json()
            seeded = seed(pop, marketo, dataverse)
            figures["seed"] = seeded
            print(f"\nseeded {seeded['marketo_persons']:,} Marketo persons in {seeded['marketo_s']:.1f} s and "
                  f"{seeded['dynamics_rows']:,} Dynamics rows in {seeded['dynamics_s']:.1f} s (admin API); "
                  f"folder {tmp}")
            runner = Runner(tmp, marketo, dataverse, parallel=not args.sequential, task_start=args.task_start)
            if not runner.per_task:
                print("note: this engine has no Cycle.run_stage / STAGES yet: each cycle runs as one process "
                      "(run_all); per-task figures appear once run_stage lands")

            def cycle(label: str, run_id: str, check: bool, expect_written: dict | None = None) -> dict:
                run = runner.run(label, run_id)
                calls = {s: split_calls(s, run["sandbox_calls"][s]) for s in ("marketo", "dynamics")}
                floor = floors(run, calls)
                checks = []
                if expect_written is not None:
                    got = {k: int((run["report"].get("written") or {}).get(k, 0)) for k in expect_written}
                    checks.append(("writes", got == expect_written,
                                   f"written Dynamics {got.get('dynamics', 0):,}, Marketo {got.get('marketo', 0):,}; "
                                   f"expected {expect_written.get('dynamics', 0):,} and "
                                   f"{expect_written.get('marketo', 0):,}"))
                if check:
                    checks += check_end_state(pop, counts, read_end_state(marketo, dataverse))
                verified_at = time.monotonic()
                print_cycle(run, calls, floor, checks)
                failures.extend(f"{label}: {name}" for name, ok, _ in checks if not ok)
                figures["cycles"].append({
                    "label": label, "run_id": run_id, "wall_s": run["wall_s"], "tasks": run["tasks"],
                    "calls": calls, "floor": floor, "report": run["report"],
                    "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
                    "sandbox_calls": run["sandbox_calls"]})
                return {"verified_at": verified_at}

            last = cycle("first sync", "bench-first", check=True)
            settle_marketo_window(last["verified_at"])
            cycle("echo cycle", "bench-echo", check=False, expect_written={"dynamics": 0, "marketo": 0})
            t = time.monotonic()
            changed = make_changes(pop, marketo, dataverse, CHANGES)
            print(f"\nchanged {changed['marketo'] + changed['dynamics']:,} linked records: {changed['marketo']:,} "
                  f"job titles in Marketo (Sync Leads), {changed['dynamics']:,} phones in Dynamics (UpdateMultiple)")
            settle_marketo_window(t)
            cycle(f"{changed['marketo'] + changed['dynamics']:,}-change window", "bench-changes",
                  check=True, expect_written={"dynamics": changed["marketo"], "marketo": changed["dynamics"]})
        print("\nsummary")
        print(f"  {'cycle':<24}{'wall s':>9}{'peak RSS MB':>13}{'Marketo calls':>15}{'floor':>7}"
              f"{'Dataverse calls':>17}{'floor':>7}{'written D/M':>16}")
        for c in figures["cycles"]:
            w = (c["report"] or {}).get("written") or {}
            print(f"  {c['label']:<24}{c['wall_s']:>9.1f}{max(t['peak_rss_mb'] for t in c['tasks']):>13,.0f}"
                  f"{c['calls']['marketo']['data']:>15,}{c['floor']['marketo']:>7,}"
                  f"{c['calls']['dynamics']['data']:>17,}{c['floor']['dynamics']:>7,}"
                  f"{w.get('dynamics', 0):>8,}/{w.get('marketo', 0):,}")
    finally:
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2, default=str))
            print(f"figures written to {args.json}")
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return verdict(failures)


if __name__ == "__main__":
    sys.exit(main())

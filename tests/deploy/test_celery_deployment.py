"""The sync on a distributed Airflow: CeleryExecutor with two workers that share no disk (issue 12, part 1).

The deployment (``tests/fixtures/celery_deployment.py``) runs the scheduler, the DAG processor, the API server and
two Celery workers, each in its own ``AIRFLOW_HOME`` and working folder, on PostgreSQL (Airflow's metadata and
the sync's state store), Redis (the broker and the shared call limits) and moto's S3 server (the staging area
and the task logs). Runs are triggered and followed through the REST API only, as an operator would.

Three cycles, with changes on both sides before each:

1. the first sync, where ``extract_marketo`` fails once (its bulk export job fails: a sandbox fault) and is
   retried **on the other worker** (the worker of the first try stops taking tasks while it runs, as a machine
   being drained does);
2. a cycle whose ``load_dynamics`` loses its worker **mid-load**: the whole worker (its Celery pool, the task
   supervisor and the task runner) is SIGKILLed while one of its Dataverse bulk writes is in flight (the service
   has the request and answers late: a sandbox delay), so nobody knows whether it was applied; the scheduler
   notices the missing heartbeats, the task is retried on the surviving worker, and the cycle converges (the
   lease is the run's, the writes are idempotent, the commit happens once);
3. a cycle on the one worker left.

Then both sandboxes must hold every change on the other side, with no duplicate person or record and every link
right, the services' own limiters must never have refused a call, staging and logs must have gone to object
storage (no process's folder has a staging or state file), and teardown must leave no process behind.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import redis

from tests.fixtures.celery_deployment import DAG_ID, HEARTBEAT_TIMEOUT_S, WORKERS, CeleryDeployment
from tests.fixtures.sync_env import SyncWorld
from tests.fixtures.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.postgres]

#: the bulk lead export the first sync reads Marketo with (the fault fails the first job created there)
LEAD_EXPORT = "/bulk/v1/leads/export"
#: the bulk writes of cycle 2's load_dynamics (Ann's new job title, Nia's new lead): the first one to be sent is
#: held in flight (a sandbox delay) while its worker dies
HELD_WRITES = ("/api/data/v9.2/contacts/Microsoft.Dynamics.CRM.UpdateMultiple",
               "/api/data/v9.2/leads/Microsoft.Dynamics.CRM.UpsertMultiple")


def _cycle(deployment: CeleryDeployment, name: str, run_id: str, timeout_s: float = 240.0) -> None:
    """Wait for the run to end and require success (printing each task's state, try and host)."""
    started = time.monotonic()
    state = deployment.wait_for_run(run_id, timeout_s=timeout_s)
    print(f"\n{name} ({run_id}) ended {state} {time.monotonic() - started:.1f} s after the wait began: "
          f"{deployment.describe(run_id)}\n{deployment.timeline(run_id)}")
    assert state == "success", f"{name} ({run_id}) ended {state}: {deployment.describe(run_id)}"


def _hosts(tries: list[dict]) -> list[tuple[int, str]]:
    return [(t["try_number"], t["hostname"]) for t in tries]


@pytest.mark.timeout(900)
def test_cycles_on_two_celery_workers_survive_a_retry_elsewhere_and_a_worker_killed_mid_load(
        celery_deployment, marketo, dataverse, tmp_path):
    d = celery_deployment
    world = SyncWorld(marketo, dataverse, tmp_path)
    began = time.monotonic()

    # -- cycle 1: the first sync; extract_marketo fails once and its retry runs on the other worker --------
    ids = world.seed_people()
    marketo.hold_bulk(True)  # the export job waits while the first try is seen running on its worker
    marketo.fault("job_failure", count=1, path_prefix=LEAD_EXPORT)
    started = time.monotonic()
    run1 = d.trigger()
    first = d.wait_for_task(run1, "extract_marketo", {"running"}, timeout_s=180)["hostname"]
    assert first in WORKERS, f"extract_marketo ran on {first!r}, not one of the deployment's workers"
    other = next(w for w in WORKERS if w != first)
    d.stop_consuming(first)  # drained: what it runs goes on, nothing new reaches it
    marketo.hold_bulk(False)  # the export job starts, and fails
    d.wait_for_task(run1, "extract_marketo", {"success"}, timeout_s=120)
    d.resume_consuming(first)
    _cycle(d, "cycle 1", run1)
    d.seconds["cycle_1"] = time.monotonic() - started

    tries = d.tries(run1, "extract_marketo")
    assert _hosts(tries) == [(1, first), (2, other)], d.describe(run1)
    assert tries[-1]["state"] == "success"
    failed_log = d.task_log(run1, "extract_marketo", 1)  # read back from the bucket through the API server
    assert "ended Failed" in failed_log, failed_log[-2000:]
    assert world.person("cat@example.com")["dynamicsRecordType"] == "contact"  # a Dynamics contact created in Marketo
    max_contact = world.record("contacts", "max@example.com")  # a marked person created in Dynamics
    assert max_contact["mdsync_marketopersonid"] == str(ids["max_pid"])
    assert world.person("max@example.com")["dynamicsRecordId"] == max_contact["contactid"]
    assert world.person("ann@example.com")["dynamicsRecordId"] == ids["ann"]
    assert world.record("leads", "lena@example.com")["mdsync_marketopersonid"] == str(ids["lena_pid"])

    # -- cycle 2: changes on both sides; the worker running load_dynamics dies with a write in flight -----
    world.update_person(ids["ann_pid"], title="Staff Engineer")  # Marketo -> the Dynamics contact
    world.update_record("leads", ids["lead"], jobtitle="Principal Engineer")  # Dynamics -> the Marketo person
    world.update_record("contacts", ids["cat"], address1_city="Lisbon")  # Dynamics -> the person created in cycle 1
    created = world.marketo().sync_leads([{"email": "nia@example.com", "firstName": "Nia", "lastName": "New",
                                           "title": "Buyer", "syncToDynamics": True, "dynamicsSyncAs": "lead"}],
                                         action="createOnly")
    nia_pid = int(created["id"].iloc[0])
    dataverse.admin("POST", "calls/reset")
    for path in HELD_WRITES:  # the service takes the write, and answers only after 8 s
        dataverse.fault("delay", count=1, seconds=8, path_prefix=path)
    started = time.monotonic()
    run2 = d.trigger()
    victim = d.wait_for_task(run2, "load_dynamics", {"running"}, timeout_s=180)["hostname"]
    survivor = next(w for w in WORKERS if w != victim)
    wait_for(lambda: dataverse.concurrency()["in_flight"] >= 1, "a Dataverse write of load_dynamics in flight",
             timeout_s=60)
    killed = d.kill_worker(victim)
    killed_at = time.monotonic()
    dataverse.admin("DELETE", "faults")  # the retry runs at full speed
    assert len(killed) >= 3, f"killing {victim} reached only {killed}: not its pool and task processes"
    # the scheduler finds the missing heartbeats, the DAG processor puts the task up for retry, the survivor runs it
    d.wait_for_task(run2, "load_dynamics", {"running", "success"}, timeout_s=HEARTBEAT_TIMEOUT_S + 90, min_try=2)
    d.seconds["retried_after_kill"] = time.monotonic() - killed_at
    _cycle(d, "cycle 2", run2)
    d.seconds["cycle_2"] = time.monotonic() - started

    tries = d.tries(run2, "load_dynamics")
    assert _hosts(tries) == [(1, victim), (2, survivor)], d.describe(run2)
    assert tries[0]["state"] in ("failed", "up_for_retry") and tries[-1]["state"] == "success"
    for task_id, ti in d.task_instances(run2).items():  # after the kill, everything ran on the survivor
        if task_id in ("load_marketo", "commit", "report", "release_lease"):
            assert ti["hostname"] == survivor, f"{task_id} ran on {ti['hostname']}: {d.describe(run2)}"
    noticed = d.get("eventLogs", dag_id=DAG_ID, run_id=run2, event="heartbeat timeout")["event_logs"]
    assert [e["task_id"] for e in noticed] == ["load_dynamics"], noticed

    writes = dataverse.calls()["by_endpoint"]
    sent = [writes.get(f"POST {path}", 0) for path in HELD_WRITES]
    # the write in flight when its worker died was sent again by the retry (and applied once: see below)
    assert min(sent) >= 1 and max(sent) == 2, writes
    assert world.record("contacts", "ann@example.com")["jobtitle"] == "Staff Engineer"
    assert world.person("lena@example.com")["title"] == "Principal Engineer"
    assert world.person("cat@example.com")["city"] == "Lisbon"
    nia_lead = world.record("leads", "nia@example.com")  # created once, although its first load died
    assert nia_lead["mdsync_marketopersonid"] == str(nia_pid)
    assert world.person("nia@example.com")["dynamicsRecordId"] == nia_lead["leadid"]

    # -- cycle 3: on the one worker left --------------------------------------------------------------------
    world.update_person(ids["max_pid"], title="Lead Analyst")
    world.update_record("contacts", ids["ann"], address1_city="Munich")
    started = time.monotonic()
    run3 = d.trigger()
    _cycle(d, "cycle 3", run3)
    d.seconds["cycle_3"] = time.monotonic() - started
    assert {ti["hostname"] for ti in d.task_instances(run3).values() if ti["hostname"]} == {survivor}
    assert world.record("contacts", "max@example.com")["jobtitle"] == "Lead Analyst"
    assert world.person("ann@example.com")["city"] == "Munich"

    # -- the end state on both sides: one person and one record per email, links both ways ------------------
    from mdsync.state import open_store

    store = open_store(d.state_url)
    links = store.load_links().reset_index()
    pairs = {"lena@example.com": ("leads", "lead"), "ann@example.com": ("contacts", "contact"),
             "cat@example.com": ("contacts", "contact"), "max@example.com": ("contacts", "contact"),
             "nia@example.com": ("leads", "lead")}
    for email, (entity_set, kind) in pairs.items():
        person = world.person(email)  # exactly one Marketo person
        record = world.record(entity_set, email)  # exactly one Dynamics record of that type
        other_set = "contacts" if entity_set == "leads" else "leads"
        assert world.records(other_set, email).empty, f"{email} also has a Dynamics {other_set[:-1]}"
        record_id, person_id = record[f"{kind}id"], _person_id(world, email)
        assert person["dynamicsRecordId"] == record_id and person["dynamicsRecordType"] == kind, (email, person)
        assert record["mdsync_marketopersonid"] == str(person_id), (email, record)
        link = links[links["person_id"] == person_id]
        assert link[["dynamics_type", "dynamics_id"]].values.tolist() == [[kind, record_id]], (email, link)
    assert len(links) == len(pairs), links.to_dict("records")
    lease = _lease_state(d.state_url)
    assert lease.holder_key is None and lease.run_id == run3, lease  # given back by the last run

    # -- the services' own limiters never refused a call; the deployment shared its limits through Redis ---
    calls = marketo.calls()
    assert calls["limited"] == {}, calls  # no 606, 615 or 607 answered
    assert dataverse.throttled() == {}  # no 429 answered (by a service-protection limit or a fault)
    shared = redis.Redis.from_url(d.limits_url).keys("mdsync:limits:*")
    assert shared, "no shared limit key in the deployment's Redis: the workers did not share their limits"
    # every try's log, read back from the bucket (the killed try's died with its worker, unuploaded)
    logs = {**d.run_logs(run1), **{(f"{t} (cycle 2)", n): text for (t, n), text in
                                   d.run_logs(run2, skip={("load_dynamics", 1)}).items()},
            **{(f"{t} (cycle 3)", n): text for (t, n), text in d.run_logs(run3).items()}}
    # and none of the tasks warned that a setting assumes one machine (state, staging and limits are shared)
    one_machine = [key for key, text in logs.items() if "may run on different machines" in text]
    assert one_machine == [], f"deployment warnings in the logs of {one_machine}"
    secrets = [json.loads(c)["password"] for c in (marketo.connection_json(), dataverse.connection_json())]
    leaked = [key for key, text in logs.items() if any(secret in text for secret in secrets)]
    assert leaked == [], f"a client secret in the logs of {leaked}"

    # -- nothing on a worker's disk: staging and logs are in the bucket, no home has a state or staging file --
    staged = d.keys("staging/")
    assert any(key.endswith(".json") and "/field-access-" in key for key in staged), staged  # the shared cache
    for run_id in (run1, run2, run3):  # each successful run removed its staged frames (folder as Staging names it)
        folder = re.sub(r"[^A-Za-z0-9_.=-]+", "_", run_id)
        assert not [key for key in staged if f"/{folder}/" in key], staged
    logged = d.keys("logs/")
    for run_id, task_id in ((run1, "extract_marketo"), (run2, "load_dynamics"), (run3, "commit")):
        assert any(f"run_id={run_id}" in key and f"task_id={task_id}" in key for key in logged), (task_id, logged)
    for service in d.services.values():
        local = [str(p) for p in service.home.rglob("*") if p.name in ("staging", "state.sqlite")]
        assert local == [], f"{service.name} wrote sync files to its own disk: {local}"

    d.seconds["test"] = time.monotonic() - began
    print("\nphases (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in d.seconds.items()))


def _person_id(world: SyncWorld, email: str) -> int:
    """The Marketo person id of the one person with ``email``."""
    found = world.persons(email, fields=("id",))
    assert len(found) == 1, f"{len(found)} Marketo persons with {email}"
    return int(found["id"].iloc[0])


def _lease_state(state_url: str):
    from mdsync.lease import CycleLease
    from mdsync.state.database import create_engine

    return CycleLease(create_engine(state_url)).state()

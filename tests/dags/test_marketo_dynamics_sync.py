"""The DAG end to end through Airflow (``dag.test()``, as ``make sync`` runs it) against both sandboxes."""

from __future__ import annotations

import json
import logging
import re

import requests

from mdsync.lease import CycleLease, Holder
from mdsync_airflow.run_once import run_once
from tests.fixtures.sync_env import task_logs


def _marketo_token(sandbox) -> str:
    # Marketo hands out the same token while it is valid, so this is the token the run used.
    r = requests.get(f"{sandbox.base_url}/identity/oauth/token", params={
        "grant_type": "client_credentials", "client_id": sandbox.client_id, "client_secret": sandbox.client_secret})
    return r.json()["access_token"]


def _lease(sync_world) -> CycleLease:
    return CycleLease(sync_world.store().engine)


def test_dag_syncs_both_ways_dry_runs_pushes_on_demand_and_keeps_secrets_out_of_logs(sync_world, airflow_db, capfd,
                                                                                      caplog):
    caplog.set_level(logging.INFO)
    ids = sync_world.seed_people()

    assert run_once() == "success"
    cat = sync_world.person("cat@example.com")
    assert cat["dynamicsRecordType"] == "contact"
    assert sync_world.record("contacts", "max@example.com")["mdsync_marketopersonid"] == str(ids["max_pid"])

    sync_world.update_person(ids["ann_pid"], title="Staff Engineer")
    assert run_once({"dry_run": True}) == "success"
    assert sync_world.record("contacts", "ann@example.com")["jobtitle"] == "Engineer"

    assert run_once() == "success"
    assert sync_world.record("contacts", "ann@example.com")["jobtitle"] == "Staff Engineer"

    pid = sync_world.marketo_sandbox.seed_leads([{"email": "on.demand@example.com", "firstName": "Odette",
                                                  "lastName": "Demand"}])[0]
    assert run_once({"person_ids": [pid], "sync_as": "contact"}) == "success"
    assert sync_world.record("contacts", "on.demand@example.com")["mdsync_marketopersonid"] == str(pid)

    # successful runs removed their staged frames (through ObjectStoragePath)
    assert [p.name for p in (sync_world.tmp / "staging").iterdir() if p.is_dir()] == []

    # every run gave the cycle lease back at its end (its teardown)
    lease = _lease(sync_world).state()
    assert lease.run_id.startswith("manual__") and lease.holder_key is None and lease.released_at > lease.acquired_at

    logs = task_logs(capfd, caplog)
    assert "sync summary" in logs  # the report task's summary
    assert "LINK" in logs and "CREATE" in logs  # one line per record decision
    secrets = [sync_world.marketo_sandbox.client_secret, sync_world.dataverse_sandbox.client_secret,
               _marketo_token(sync_world.marketo_sandbox)]
    for secret in secrets:
        assert secret not in logs
    assert not re.search(r"Bearer\s+[A-Za-z0-9._~+/=-]{16,}", logs)
    assert not re.search(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}", logs)  # no JWT access token


def test_a_failing_run_fails_the_command(sync_world, airflow_db, monkeypatch):
    # a connection to nowhere: the run must end failed (make sync then exits non-zero)
    broken = json.loads(sync_world.marketo_sandbox.connection_json())
    broken["password"] = "wrong-secret"
    monkeypatch.setenv("AIRFLOW_CONN_MARKETO_DEFAULT", json.dumps(broken))
    monkeypatch.setenv("MDSYNC_TASK_RETRIES", "0")  # read when the DAG file is parsed for this run
    from mdsync_airflow.run_once import main

    assert main(["--conf", "{}"]) == 1
    # the run took the lease, failed in refresh_schema, and its teardown gave the lease back all the same
    lease = _lease(sync_world).state()
    assert lease.run_id.startswith("manual__") and lease.holder_key is None and lease.released_at > lease.acquired_at
    assert sync_world.store().watermark("marketo", "persons") is None


def test_a_run_that_finds_the_lease_held_waits_then_defers_and_writes_nothing(sync_world, airflow_db, monkeypatch,
                                                                              capfd, caplog):
    caplog.set_level(logging.INFO)
    sync_world.seed_people()
    other = Holder.of_run("marketo_dynamics_sync", "scheduled__2026-12-02T08:00:00+00:00", None)
    assert _lease(sync_world).try_acquire(other)  # e.g. a scheduled run of the same store is mid-cycle
    monkeypatch.setenv("MDSYNC_LEASE_WAIT_SECONDS", "1")
    monkeypatch.setenv("MDSYNC_LEASE_POLL_SECONDS", "0.2")
    from mdsync_airflow.run_once import main

    assert main([]) == 1
    logs = task_logs(capfd, caplog)
    assert "waiting for the cycle lease" in logs and "held by run 'scheduled__2026-12-02T08:00:00+00:00'" in logs
    deferred = [line for line in logs.splitlines() if line.startswith("marketo_dynamics_sync: run manual__")]
    assert len(deferred) == 1 and "deferred: the cycle lease of this state store is held by run " \
        "'scheduled__2026-12-02T08:00:00+00:00'" in deferred[0] and "nothing is lost" in deferred[0]
    # nothing was written on either side or in the store, and the other run still holds the lease
    store = sync_world.store()
    assert store.watermark("marketo", "persons") is None and store.load_links().empty and store.activity().empty
    assert sync_world.persons("cat@example.com").empty  # the Dynamics-only contact was not created in Marketo
    assert sync_world.records("contacts", "max@example.com").empty  # nor the marked person in Dynamics
    assert not sync_world.person("ann@example.com")["dynamicsRecordId"]  # and nobody was linked
    assert _lease(sync_world).state().run_id == other.run_id and _lease(sync_world).release(other)

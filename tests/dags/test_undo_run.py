"""Undo a run through Airflow (``dag.test()``, as ``make sync CONF='{"undo_run": "…"}'`` runs it) against both
sandboxes: the dry run writes nothing and shows the restores, the undo restores both sides, an unknown run id
fails at once in one line (retries on, no API call)."""

from __future__ import annotations

import logging
import re

import pandas as pd

from mdsync_airflow.run_once import run
from tests.fixtures.sync_env import task_logs


def blank(value) -> bool:
    return value is None or (pd.isna(value) if not isinstance(value, str) else value == "")


def phones(world, email: str) -> tuple:
    person = world.marketo().get_leads("email", [email], ["phone"]).iloc[0]
    from mdsync.dynamics import eq

    record = world.dynamics().query("contacts", ["contactid", "telephone1"], filter=eq("emailaddress1", email)).iloc[0]
    return person["phone"], record["telephone1"]


def test_undo_through_the_dag_dry_run_then_for_real_and_an_unknown_run_fails_in_one_line(sync_world, airflow_db,
                                                                                        monkeypatch, capfd, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("MDSYNC_TASK_RETRIES", "2")  # read when the DAG file is parsed: a retry would show in the calls
    monkeypatch.setenv("MDSYNC_RETRY_DELAY_SECONDS", "0")
    w = sync_world
    ids = w.seed_people()
    assert run({}).state == "success"
    w.update_person(ids["lena_pid"], title="VP Marketing")
    w.update_record("contacts", ids["ann"], telephone1="+1 555 0101")
    undone = run({})
    assert undone.state == "success"
    assert w.record("leads", "lena@example.com")["jobtitle"] == "VP Marketing"
    assert phones(w, "ann@example.com") == ("+1 555 0101", "+1 555 0101")
    task_logs(capfd, caplog)  # what came before is not the undo's

    dry = run({"undo_run": undone.run_id, "dry_run": True})
    assert dry.state == "success"
    assert w.record("leads", "lena@example.com")["jobtitle"] == "VP Marketing"
    assert w.person("lena@example.com")["title"] == "VP Marketing"
    assert w.store().activity(run_id=dry.run_id).empty
    logs = task_logs(capfd, caplog)
    line = re.compile(r"UNDO +person (\d+) .*? \| (\w+): .* -> (Dynamics|Marketo) \[dry run: not written\]")
    shown = {(int(m[1]), m[2], m[3]) for m in line.finditer(logs)}
    assert shown == {(ids["lena_pid"], "job_title", "Dynamics"), (ids["lena_pid"], "job_title", "Marketo"),
                     (ids["ann_pid"], "phone", "Dynamics"), (ids["ann_pid"], "phone", "Marketo")}
    assert f"undo of run {undone.run_id}: fields to restore: Dynamics 2, Marketo 2" in logs

    done = run({"undo_run": undone.run_id})
    assert done.state == "success"
    assert w.record("leads", "lena@example.com")["jobtitle"] == "Engineer" == w.person("lena@example.com")["title"]
    assert all(blank(v) for v in phones(w, "ann@example.com"))
    lines = w.store().activity(run_id=done.run_id)
    restores = lines[lines["action"] == "undo"]
    assert len(restores) == 4 and restores["detail"].str.startswith(f"undo of run {undone.run_id}: ").all()

    calls = w.marketo_sandbox.calls()["total"]
    unknown = run({"undo_run": "manual__1999-01-01T00:00:00+00:00"})
    assert unknown.state == "failed"
    assert w.marketo_sandbox.calls()["total"] == calls  # refused before any call, and not retried
    logs = task_logs(capfd, caplog)
    assert ("run parameter undo_run: run 'manual__1999-01-01T00:00:00+00:00' recorded no activity in this state "
            f"store") in logs and f"the latest runs with activity are {done.run_id} (" in logs
    assert "not retried" in logs

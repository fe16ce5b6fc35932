"""The mass-change guard through Airflow: real DAG runs (``dag.test()``, as ``make sync`` runs them) against both
sandboxes, with the approval answered the way a person's answer arrives — Airflow's REST API
(``PATCH …/taskInstances/approve_mass_change/-1/hitlDetails``, what the Required Actions page calls) on the API
app sharing the metadata database — and a timeout resolved by the scheduler's own awaiting-input sweep.

Every end state is read back through the sandboxes' APIs (both sides) and Airflow's REST API (task states, the
report's XCom, the approval request)."""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone

import pytest

from tests.fixtures.mass_change import (dynamics_titles, marketo_titles, retitle_contacts, retitle_persons,
                                        seed_linked_contacts)
from tests.fixtures.waiting import wait_for

DAG_ID = "marketo_dynamics_sync"
APPROVAL = "approve_mass_change"
TIMEOUT = "time out"
#: a title a botched import might write: table syntax, Markdown and a Jinja expression that must stay literal
BOTCHED = "Intern | **all** {{ 7 * 7 }}"

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def api(airflow_db):
    """Airflow's REST API in this process (its simple auth manager with every caller an admin)."""
    from fastapi.testclient import TestClient

    old = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS")
    os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "True"
    from airflow.api_fastapi.app import create_app

    yield TestClient(create_app("core"), base_url="http://localhost/api/v2")
    if old is None:
        os.environ.pop("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", None)
    else:
        os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = old


@pytest.fixture
def dag(airflow_db):
    """A fresh parse of the DAG for each run, as ``make sync`` does (tasks run in this process set a run's conf
    values on the parsed DAG's own Param objects, so a reused DAG would carry them into the next run)."""
    from airflow.dag_processing.dagbag import DagBag

    def parsed():
        bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
        assert bag.import_errors == {}
        return bag.get_dag(DAG_ID)

    return parsed


class Answerer(threading.Thread):
    """Answers the next approval request of the DAG, from another thread while ``dag.test()`` waits for it:
    ``Approve``/``Reject`` through the REST API, :data:`TIMEOUT` by letting the deadline pass and running the
    scheduler's timeout sweep, ``None`` when no request may come (one that does anyway is rejected and reported,
    so the run ends instead of waiting forever)."""

    def __init__(self, api, answer: str | None) -> None:
        super().__init__(daemon=True)
        self.api, self.answer = api, answer
        self.since = datetime.now(timezone.utc)
        self.done = threading.Event()
        self.request: dict | None = None
        self.error: BaseException | str | None = None

    def _parked(self):
        from sqlalchemy import select

        from airflow.models.taskinstance import TaskInstance as TI
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState

        with create_session() as session:
            ti = session.scalar(select(TI).where(TI.dag_id == DAG_ID, TI.task_id == APPROVAL,
                                                 TI.state == TaskInstanceState.AWAITING_INPUT,
                                                 TI.start_date >= self.since))
            return (ti.id, ti.run_id, ti.trigger_timeout) if ti is not None else None

    def _url(self, run_id: str) -> str:
        return f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{APPROVAL}/-1/hitlDetails"

    def _respond(self, run_id: str, option: str) -> None:
        r = self.api.patch(self._url(run_id), json={"chosen_options": [option], "params_input": {}})
        assert r.status_code == 200, r.text

    def run(self) -> None:
        parked = None
        try:
            parked = wait_for(lambda: self.done.is_set() or self._parked(), "the approval request", timeout_s=600)
            if parked is True:
                return  # the run ended without asking
            ti_id, run_id, deadline = parked
            r = self.api.get(self._url(run_id))
            assert r.status_code == 200, r.text
            self.request = r.json()
            if self.answer is None:
                self.error = "the run asked for approval although it should not have"
                self._respond(run_id, "Reject")
            elif self.answer == TIMEOUT:
                from airflow._shared.timezones import timezone as airflow_tz
                from airflow.jobs.job import Job
                from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

                wait_for(lambda: airflow_tz.utcnow() > deadline, "the approval deadline", timeout_s=120)
                SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()
            else:
                self._respond(run_id, self.answer)
        except BaseException as exc:  # noqa: BLE001 - reported by finish(); the run must not wait forever
            self.error = exc
            if isinstance(parked, tuple):
                _fail_task(parked[0])

    def finish(self) -> None:
        self.done.set()
        self.join(timeout=60)
        if self.error is not None:
            raise AssertionError(f"approval thread: {self.error!r}")


def _fail_task(ti_id) -> None:
    from sqlalchemy import update

    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.utils.session import create_session

    with create_session() as session:
        session.execute(update(TI).where(TI.id == ti_id).values(state="failed"))


def sync(dag, api, answer: str | None = None, **conf) -> dict:
    """One manual run of the DAG, the approval answered by an :class:`Answerer`; what the run did, read back
    through the REST API."""
    answerer = Answerer(api, answer)
    answerer.start()
    try:
        dr = dag().test(run_conf=conf)
    finally:
        answerer.finish()
    run_id = dr.run_id
    tis = api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    report = api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/report/xcomEntries/return_value",
                     params={"deserialize": True}).json()
    requests = api.get(f"/dags/~/dagRuns/{run_id}/hitlDetails").json()
    return {"state": str(getattr(dr.state, "value", dr.state)), "tasks": {t["task_id"]: t["state"] for t in tis},
            "report": report.get("value"), "requests": requests["total_entries"], "request": answerer.request}


def _watermarks(world) -> dict:
    store = world.store()
    return {(s, e): getattr(store.watermark(s, e), "high_water", None)
            for s, e in [("marketo", "persons"), ("dynamics", "lead"), ("dynamics", "contact")]}


def _guard_env(monkeypatch, **extra) -> None:
    """Thresholds small enough for a sandbox: more than max(3, 20 % of 10 linked) = 3 records to one side."""
    monkeypatch.setenv("MDSYNC_GUARD_MAX_RECORDS", "3")
    monkeypatch.setenv("MDSYNC_GUARD_MAX_PERCENT", "20")
    for key, value in extra.items():
        monkeypatch.setenv(key, value)


def test_a_mass_change_waits_for_approval_rejected_or_unanswered_it_writes_nothing_approved_or_allowed_it_writes(
        sync_world, api, dag, monkeypatch, capfd, caplog):
    # one scenario, five runs (each dag.test() run costs tens of seconds): (d) under the threshold, (a) rejected,
    # (a) timed out, (b) approved, (c) allowed by the run parameter. Dry runs: tests/include/mdsync/test_guard.py
    # (the decision on a real cycle) and tests/plugins/mdsync_airflow/test_guard_operator.py (the task skips).
    pairs = seed_linked_contacts(sync_world, 10)
    first = sync(dag, api)  # (d) under the threshold: no request, nobody waits, the approval task skips
    assert first["state"] == "success" and first["requests"] == 0
    assert first["tasks"][APPROVAL] == "skipped" and first["tasks"]["load_dynamics"] == "success"
    assert first["report"]["mass_change"]["outcome"] == "under_threshold" and first["report"]["new_links"] == 10

    _guard_env(monkeypatch)
    changed = pairs.contact_ids[:4]
    retitle_contacts(sync_world, changed, BOTCHED)  # 4 contacts retitled in Dynamics: 4 records to Marketo
    before = _watermarks(sync_world)

    # (a) rejected
    caplog.set_level(logging.INFO)
    capfd.readouterr()
    rejected = sync(dag, api, "Reject")
    out = capfd.readouterr()
    logs = out.out + out.err + caplog.text  # task logs reach one or the other, depending on earlier logging set-up
    assert "mass change REJECTED: nothing was written; watermarks and baselines did not move" in logs
    assert rejected["state"] == "success"
    assert {t: rejected["tasks"][t] for t in (APPROVAL, "load_dynamics", "load_marketo", "commit", "report")} == {
        APPROVAL: "success", "load_dynamics": "skipped", "load_marketo": "skipped", "commit": "skipped",
        "report": "success"}
    assert marketo_titles(sync_world, pairs.person_ids) == ["Engineer"] * 10  # nothing written to Marketo …
    assert dynamics_titles(sync_world, pairs.contact_ids) == [BOTCHED] * 4 + ["Engineer"] * 6  # … nor to Dynamics
    assert _watermarks(sync_world) == before  # the watermarks did not move
    guard = rejected["report"]["mass_change"]
    assert guard["outcome"] == "rejected" and guard["written"] is False and guard["responded_by"]
    assert guard["marketo"] == {"records": 4, "threshold": 3} and guard["dynamics"] == {"records": 0, "threshold": 3}
    assert rejected["report"]["written"] == {"dynamics": 0, "marketo": 0}
    # what the approver saw: counts per side and field, a sample old -> new (escaped, not templated), no secrets
    request = rejected["request"]
    assert request["options"] == ["Approve", "Reject"] and request["defaults"] == ["Reject"]
    assert request["subject"].startswith("Mass change held: 4 records to Marketo")
    body = request["body"]
    assert "| Marketo | **4** | 4 | 0 | 0 | 10 | 3 | **over** |" in body
    assert "| Marketo | contact | job\\_title | 4 |" in body
    assert f"| contact | {pairs.person_ids[0]} | {pairs.contact_ids[0]} | job\\_title | Engineer | " \
           "Intern \\| \\*\\*all\\*\\* {{ 7 \\* 7 }} |" in body
    for secret in (sync_world.marketo_sandbox.client_secret, sync_world.dataverse_sandbox.client_secret):
        assert secret not in body and secret not in request["subject"]

    # (a) not answered in time (the default answer, Reject, once the deadline has passed)
    monkeypatch.setenv("MDSYNC_GUARD_TIMEOUT_MINUTES", "0.02")
    timed_out = sync(dag, api, TIMEOUT)
    monkeypatch.delenv("MDSYNC_GUARD_TIMEOUT_MINUTES")
    assert timed_out["state"] == "success" and timed_out["tasks"]["load_dynamics"] == "skipped"
    assert timed_out["report"]["mass_change"]["outcome"] == "timed_out"
    assert timed_out["report"]["mass_change"]["responded_by"] is None
    assert marketo_titles(sync_world, pairs.person_ids) == ["Engineer"] * 10
    assert _watermarks(sync_world) == before

    # (b) approved: the changes were still there, and now they are written
    approved = sync(dag, api, "Approve")
    assert approved["state"] == "success" and approved["tasks"]["commit"] == "success"
    assert approved["report"]["mass_change"]["outcome"] == "approved"
    assert approved["report"]["written"]["marketo"] == 4
    assert marketo_titles(sync_world, pairs.person_ids) == [BOTCHED] * 4 + ["Engineer"] * 6
    assert _watermarks(sync_world) != before

    # (c) a manual run that allows it: written at once, nobody asked
    retitle_persons(sync_world, pairs.person_ids[5:], "Chief Everything")  # 5 persons: 5 records to Dynamics
    allowed = sync(dag, api, allow_mass_change=True)
    assert allowed["state"] == "success" and allowed["requests"] == 0 and allowed["tasks"][APPROVAL] == "skipped"
    assert allowed["report"]["mass_change"]["outcome"] == "allowed"
    assert allowed["report"]["mass_change"]["dynamics"] == {"records": 5, "threshold": 3}
    assert dynamics_titles(sync_world, pairs.contact_ids) == [BOTCHED] * 4 + ["Engineer"] + ["Chief Everything"] * 5

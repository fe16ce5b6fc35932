""""Why didn't this sync?" and the side-by-side read (issue 11), against both sandboxes over real HTTP.

Every situation is set up through the sandboxes' APIs and real cycles (``sync_world``: a fresh pair of sandboxes,
state store and staging area per test); then :func:`mdsync.explain.why` must name the reason with its specifics
(record id, field, value, run).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mdsync.config import load_config
from mdsync.explain import find_subject, side_by_side, why
from mdsync.settings import Settings

pytestmark = pytest.mark.integration


def _why(world, **kw):
    return why(load_config(), world.store(), Settings.from_env(), marketo_client=world.marketo(),
               dynamics_client=world.dynamics(), **kw)


def _only(explanation, code: str):
    found = [r for r in explanation.reasons if r.code == code]
    assert found, f"no {code!r} reason in {[(r.code, r.detail) for r in explanation.reasons]}"
    return found


def test_a_synced_pair_is_in_sync_and_side_by_side_shows_both_sides(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.cycle("run-2").run_all()  # the echo of run 1's writes
    config, store = load_config(), sync_world.store()
    pair = side_by_side(config, sync_world.marketo(), sync_world.dynamics(), store, person_id=ids["ann_pid"])
    assert (pair.dynamics_type, pair.dynamics_id) == ("contact", ids["ann"])
    assert pair.link is not None and pair.link.method == "email" and pair.link.out_of_filter_since is None
    city = next(r for r in pair.rows if r.field == "city")
    assert (city.marketo_name, city.dynamics_name, city.direction) == ("city", "address1_city", "both")
    assert city.marketo == city.dynamics == city.baseline == "Berlin" and not city.differs
    assert not pair.differing and not pair.marketo_missing and not pair.dynamics_missing
    assert pair.dynamics_in_filter is True
    json.dumps(pair.dump())  # JSON-ready for the console
    # the Dynamics side alone finds the same pair
    same = side_by_side(config, sync_world.marketo(), sync_world.dynamics(), store, dynamics_id=ids["ann"])
    assert same.person_id == ids["ann_pid"] and same.dynamics_type == "contact"

    answer = _why(sync_world, person_id=ids["ann_pid"])
    assert answer.status == "in_sync" and answer.reasons == [], [(r.code, r.detail) for r in answer.reasons]
    assert answer.last_run_id in ("run-1", "run-2") and answer.last_synced_at is not None
    assert "is in sync" in answer.summary and answer.last_run_id in answer.summary
    json.dumps(answer.dump())


def test_a_person_not_marked_for_sync_says_so(sync_world):
    sync_world.cycle("run-1").run_all()
    pid = sync_world.marketo_sandbox.seed_leads([{"email": "quiet@example.com", "firstName": "Quinn"}])[0]
    sync_world.cycle("run-2").run_all()
    pair = side_by_side(load_config(), sync_world.marketo(), sync_world.dynamics(), sync_world.store(), person_id=pid)
    assert pair.link is None and pair.dynamics_id is None and pair.marked_for_sync is False
    assert next(r for r in pair.rows if r.field == "first_name").marketo == "Quinn"
    assert all(r.dynamics is None for r in pair.rows)
    answer = _why(sync_world, email="QUIET@example.com")  # an email the state store never saw: looked up live
    reason, = _only(answer, "not_marked_for_sync")
    assert str(pid) in reason.detail and "syncToDynamics" in reason.action and f"person_ids=[{pid}]" in reason.action
    assert answer.status == "not_synced"


def test_a_record_outside_the_sync_filter_says_so_for_linked_and_unlinked_records(sync_world):
    ids = sync_world.seed_people()
    inactive, = sync_world.dataverse_sandbox.seed("contacts", [{"emailaddress1": "gone@example.com", "lastname": "Gone",
                                                                "statecode": 1, "statuscode": 2}])
    sync_world.cycle("run-1").run_all()
    sync_world.update_record("contacts", ids["ann"], statecode=1, statuscode=2)
    sync_world.cycle("run-2").run_all()
    answer = _why(sync_world, person_id=ids["ann_pid"])
    reason, = _only(answer, "outside_sync_filter")
    assert ids["ann"] in reason.detail and "statecode eq 0" in reason.detail and "statecode 1" in reason.detail
    assert "paused since" in reason.detail and "reactivate" in reason.action
    # a record that was never linked: no person is created for it, and why() says so by its id alone
    answer = _why(sync_world, dynamics_id=inactive)
    assert answer.subject.dynamics_type == "contact" and answer.subject.person_id is None
    reason, = _only(answer, "outside_sync_filter")
    assert inactive in reason.detail and "neither linked nor created in Marketo" in reason.detail


def test_a_field_the_sync_user_cannot_read_and_a_field_that_is_not_mapped(sync_world):
    ids = sync_world.seed_people()
    sync_world.dataverse_sandbox.admin("PUT", "security", {"secured_columns": {"contact": ["jobtitle"]},
                                                           "readable": {}, "updatable": {}})
    sync_world.cycle("run-1").run_all()
    sync_world.update_person(ids["ann_pid"], title="Unwritable")
    sync_world.cycle("run-2").run_all()
    answer = _why(sync_world, person_id=ids["ann_pid"], field="title")  # the Marketo name finds the field too
    dropped = _only(answer, "field_dropped")
    assert {r.field for r in dropped} == {"job_title"}
    assert any("cannot read Dataverse column 'jobtitle'" in r.detail for r in dropped)
    assert any("cannot update Dataverse column 'jobtitle'" in r.detail for r in dropped)
    assert answer.field_access.startswith("cache ")  # the cycle's own schema refresh, read outside the run
    row = next(r for r in answer.values.rows if r.field == "job_title")
    assert row.marketo == "Unwritable" and row.dynamics is None and row.differs
    assert "cannot read Dataverse column 'jobtitle'" in row.dropped  # the side-by-side says why the cell is empty
    assert set(answer.codes) == {"field_dropped"}
    answer = _why(sync_world, person_id=ids["ann_pid"], field="nickname")
    reason, = _only(answer, "field_not_mapped")
    assert "'nickname'" in reason.detail and "entities.contact.fields" in reason.action


def test_a_field_whose_direction_does_not_carry_the_change(sync_world, monkeypatch):
    import yaml

    from mdsync.config import DEFAULT_CONFIG_PATH

    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    for f in raw["entities"]["contact"]["fields"]:
        if f["name"] == "job_title":
            f["direction"] = "to_dynamics"
    path = sync_world.tmp / "to-dynamics.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("MDSYNC_CONFIG", str(path))
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.update_record("contacts", ids["ann"], jobtitle="Set in Dynamics")
    sync_world.cycle("run-2").run_all()
    assert sync_world.person("ann@example.com")["title"] == "Engineer"  # not carried to Marketo
    # the cycle wrote Marketo's value over the Dynamics edit: asked about the field, why() says the edit cannot flow
    answer = _why(sync_world, person_id=ids["ann_pid"], field="job_title")
    reason, = _only(answer, "direction")
    assert reason.field == "job_title" and "to_dynamics" in reason.detail and reason.run_id == "run-2"
    assert "Dynamics's 'Set in Dynamics' was overwritten with Marketo's 'Engineer'" in reason.detail
    # an edit in Dynamics that no cycle has read yet: named live, before it is overwritten
    sync_world.update_record("contacts", ids["ann"], jobtitle="Again in Dynamics")
    reason, = _only(_why(sync_world, person_id=ids["ann_pid"]), "direction")
    assert "'Again in Dynamics'" in reason.detail and "not written to Marketo" in reason.detail


def test_a_rejected_value_is_held_with_the_services_message(sync_world):
    ids = sync_world.seed_people()
    sync_world.dataverse_sandbox.admin("PUT", "rules", [{"entity": "contact", "column": "jobtitle", "op": "forbid",
                                                          "values": ["Intern"], "message": "Interns are not contacts."}])
    sync_world.cycle("run-1").run_all()
    sync_world.update_person(ids["ann_pid"], title="Intern")
    sync_world.cycle("run-2").run_all()
    sync_world.cycle("run-3").run_all()  # not re-sent: the same value stays rejected
    answer = _why(sync_world, person_id=ids["ann_pid"])
    reason, = _only(answer, "value_rejected")
    assert reason.field == "job_title" and "'Intern'" in reason.detail and "Interns are not contacts." in reason.detail
    assert reason.run_id == "run-2" and "retry_failed" in reason.action and "1 time(s)" in reason.detail
    assert answer.codes == ["value_rejected"]  # read already: not "not yet reached", however recent the edit


def test_an_ambiguous_email_match_and_a_search_by_that_email(sync_world):
    pids = sync_world.marketo_sandbox.seed_leads([{"email": "twin@example.com", "firstName": "One"},
                                                  {"email": "TWIN@example.com", "firstName": "Two"}])
    twin, = sync_world.dataverse_sandbox.seed("contacts", [{"emailaddress1": "twin@example.com", "lastname": "Twin"}])
    sync_world.cycle("run-1").run_all()
    answer = _why(sync_world, dynamics_id=twin)
    reason, = _only(answer, "ambiguous_match")
    assert twin in reason.detail and "2 Marketo persons have this email" in reason.detail and reason.run_id == "run-1"
    assert str(pids[0]) in reason.detail and str(pids[1]) in reason.detail
    # by email: three records share it, so the console is asked to choose (and told why nothing was linked)
    answer = _why(sync_world, email="Twin@Example.com")
    assert answer.status == "choose" and {c.person_id for c in answer.candidates} >= set(pids)
    assert twin in {c.dynamics_id for c in answer.candidates}
    assert answer.codes[0] == "several_matches" and "ambiguous_match" in answer.codes
    # the state store alone finds the record by that email, whatever its case
    assert [s.dynamics_id for s in find_subject(sync_world.store(), "TWIN@EXAMPLE.COM")] == [twin]


def test_a_deleted_pair_and_its_held_survivor(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.dynamics().request("DELETE", f"contacts({ids['ann']})")
    sync_world.cycle("run-2").run_all()
    sync_world.update_person(ids["ann_pid"], title="After the delete", syncToDynamics=True)
    sync_world.cycle("run-3").run_all()
    answer = _why(sync_world, person_id=ids["ann_pid"])
    reason, = _only(answer, "deleted")
    assert ids["ann"] in reason.detail and "was deleted" in reason.detail and reason.run_id == "run-2"
    assert "flag" in reason.detail and f"person_ids=[{ids['ann_pid']}]" in reason.action
    assert "not_marked_for_sync" not in answer.codes
    # the deleted contact itself: recorded as deleted, not "not found"
    answer = _why(sync_world, dynamics_id=ids["ann"])
    assert "deleted" in answer.codes and "record_not_found" not in answer.codes


def test_a_person_merged_away_in_marketo(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    winner = sync_world.marketo_sandbox.seed_leads([{"email": "ann.new@example.com", "firstName": "Ann"}])[0]
    sync_world.marketo().merge_leads(winner, [ids["ann_pid"]])
    sync_world.cycle("run-2").run_all()
    answer = _why(sync_world, person_id=ids["ann_pid"])
    reason, = _only(answer, "merged")
    assert f"merged away into person {winner}" in reason.detail and reason.run_id == "run-2"
    assert f"person {winner}" in reason.action and "record_not_found" not in answer.codes
    assert answer.values.marketo_missing


def test_a_lost_collision_names_both_values_and_the_winner(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.update_person(ids["lena_pid"], title="VP Marketing")
    sync_world.update_record("leads", ids["lead"], jobtitle="Head of Sales")
    sync_world.cycle("run-2").run_all()
    sync_world.cycle("run-3").run_all()
    answer = _why(sync_world, dynamics_id=ids["lead"], field="jobtitle")
    reason, = _only(answer, "collision_lost")
    assert reason.field == "job_title" and reason.run_id == "run-2"
    assert "'VP Marketing'" in reason.detail and "'Head of Sales'" in reason.detail
    assert "Marketo won" in reason.title and "Dynamics's 'Head of Sales' was overwritten" in reason.detail
    # a later run that writes the field again makes the collision history
    sync_world.update_record("leads", ids["lead"], jobtitle="Head of Sales again")
    sync_world.cycle("run-4").run_all()
    assert "collision_lost" not in _why(sync_world, dynamics_id=ids["lead"], field="job_title").codes


def test_a_change_not_yet_read_and_a_store_no_cycle_has_used(sync_world):
    answer = _why(sync_world, person_id=12345)
    assert "not_yet_reached" in answer.codes and "no cycle has committed" in _only(answer, "not_yet_reached")[0].title
    assert "record_not_found" in answer.codes  # and Marketo has no such person
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.cycle("run-2").run_all()
    sync_world.update_person(ids["ann_pid"], city="Madrid")
    answer = _why(sync_world, email="ann@example.com")
    reason, = _only(answer, "not_yet_reached")
    assert "Marketo updatedAt" in reason.detail and reason.run_id == "run-2" and f"person_ids=[{ids['ann_pid']}]" in reason.action
    row = next(r for r in answer.values.rows if r.field == "city")
    assert (row.marketo, row.dynamics, row.baseline, row.differs) == ("Madrid", "Berlin", "Berlin", True)
    sync_world.cycle("run-3").run_all()
    assert _why(sync_world, email="ann@example.com").status == "in_sync"


def test_a_run_held_by_the_mass_change_guard(sync_world, monkeypatch):
    from mdsync.cycle import STAGES

    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.update_person(ids["ann_pid"], title="Mass Title")
    monkeypatch.setenv("MDSYNC_GUARD_MAX_RECORDS", "0")
    monkeypatch.setenv("MDSYNC_GUARD_MAX_PERCENT", "0")
    cycle = sync_world.cycle("held")
    from mdsync.results import RunManifest

    manifest = RunManifest(run_id="held")
    for stage in STAGES[:STAGES.index("load_dynamics")]:
        manifest = cycle.run_stage(stage, manifest)
    decision = cycle.check_guard(manifest)
    assert decision.outcome == "awaiting_approval"
    # the approver rejects: no load, no commit (what the DAG's approve_mass_change does); Airflow keeps the outcome
    held = {**decision.dump(), "outcome": "rejected", "run_id": "held"}
    answer = _why(sync_world, person_id=ids["ann_pid"], guard_held_runs=[held])
    reason, = _only(answer, "mass_change_held")
    assert reason.run_id == "held" and "rejected" in reason.detail and "approval request's sample" in reason.detail
    assert "approve_mass_change" in reason.action
    assert "not_yet_reached" in answer.codes  # the watermark did not move either
    assert "mass_change_held" not in _why(sync_world, person_id=ids["ann_pid"]).codes  # nothing held: not claimed
    # a state store that keeps each run's mass-change outcome (a ``runs`` table) answers without Airflow's help
    import sqlalchemy as sa
    from mdsync.state import schema

    store = sync_world.store()
    runs = getattr(schema, "runs", None)
    if runs is not None and sa.inspect(store.engine).has_table(runs.name):
        with store.engine.begin() as c:
            c.execute(sa.insert(runs).values(run_id="held-2", mass_change="timed_out",
                                             finished_at=pd.Timestamp.now(tz="UTC").to_pydatetime()))
        reason, = _only(_why(sync_world, person_id=ids["ann_pid"]), "mass_change_held")
        assert reason.run_id == "held-2" and "timed out" in reason.detail


def test_a_value_the_field_map_cannot_read(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.update_person(ids["lena_pid"], leadSource="Billboard")
    sync_world.cycle("run-2").run_all()
    answer = _why(sync_world, person_id=ids["lena_pid"], field="lead_source")
    reason, = _only(answer, "value_unreadable")
    assert "'Billboard'" in reason.detail and "value map" in reason.detail and "lead_source.values" in reason.action


def test_a_dynamics_record_without_an_email(sync_world):
    rid, = sync_world.dataverse_sandbox.seed("contacts", [{"lastname": "Nomail"}])
    sync_world.cycle("run-1").run_all()
    answer = _why(sync_world, dynamics_id=rid, dynamics_type="contact")
    reason, = _only(answer, "no_email")
    assert rid in reason.detail and "emailaddress1" in reason.detail


def test_a_create_the_other_side_refused(sync_world):
    sync_world.dataverse_sandbox.admin("PUT", "rules", [{"entity": "contact", "column": "jobtitle", "op": "forbid",
                                                          "values": ["Intern"], "message": "Interns are not contacts."}])
    sync_world.cycle("run-1").run_all()
    res = sync_world.marketo().sync_leads([{"email": "intern@example.com", "lastName": "Intern", "title": "Intern",
                                            "syncToDynamics": True, "dynamicsSyncAs": "contact"}], action="createOnly")
    pid = int(res["id"].iloc[0])
    sync_world.cycle("run-2").run_all()
    answer = _why(sync_world, person_id=pid)
    reason, = _only(answer, "create_refused")
    assert "Dynamics refused to create the contact" in reason.detail and "Interns are not contacts." in reason.detail
    assert reason.run_id == "run-2" and "not_marked_for_sync" not in answer.codes


def test_a_re_opt_in_held_by_an_opt_out_on_the_other_side(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.update_record("contacts", ids["ann"], donotbulkemail=True)
    sync_world.cycle("run-2").run_all()  # the opt-out reaches Marketo
    sync_world.update_person(ids["ann_pid"], unsubscribed=False)  # a re-opt-in in Marketo alone
    sync_world.cycle("run-3").run_all()
    answer = _why(sync_world, person_id=ids["ann_pid"], field="email_opt_out")
    reason, = _only(answer, "consent_held")
    assert reason.run_id == "run-3" and "re-opt-in in Marketo not propagated" in reason.detail
    assert "both sides" in reason.action
    row = next(r for r in answer.values.rows if r.field == "email_opt_out")
    assert (row.marketo, row.dynamics) == ("false", "true") and row.differs


def test_a_lead_whose_email_a_contact_took_is_skipped_with_the_reason(sync_world):
    lead, = sync_world.dataverse_sandbox.seed("leads", [{"emailaddress1": "both@example.com", "lastname": "Lead",
                                                         "companyname": "Acme"}])
    contact, = sync_world.dataverse_sandbox.seed("contacts", [{"emailaddress1": "both@example.com", "lastname": "Contact"}])
    sync_world.cycle("run-1").run_all()
    answer = _why(sync_world, dynamics_id=lead)
    reason, = _only(answer, "skipped")
    assert f"the contact {contact} with the same email is linked instead" in reason.detail and reason.run_id == "run-1"
    assert "unexplained" not in answer.codes

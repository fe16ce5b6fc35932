"""The mass-change guard on frames (mdsync.guard): counts per side, entity and field, thresholds, outcomes, sample."""

from __future__ import annotations

import pandas as pd
import pytest

from mdsync import guard
from mdsync.guard import LINK_FIELDS, Limits, decide
from mdsync.results import GuardDecision


def writes(rows: list[tuple[int, str, str | None, str | None]]) -> pd.DataFrame:
    """``(person_id, field, previous, value)`` rows -> a plan's write frame."""
    return pd.DataFrame({"person_id": pd.Series([r[0] for r in rows], dtype="int64"),
                         "dynamics_id": [f"rec-{r[0]}" for r in rows], "field": [r[1] for r in rows],
                         "value": pd.Series([r[3] for r in rows], dtype="string"),
                         "previous": pd.Series([r[2] for r in rows], dtype="string")})


def links(person_ids) -> pd.DataFrame:
    ids = list(person_ids)
    return pd.DataFrame({"person_id": pd.Series(ids, dtype="int64"), "dynamics_id": [f"rec-{p}" for p in ids]})


def job_titles(person_ids, old="Engineer", new="Intern") -> pd.DataFrame:
    return writes([(p, "job_title", old, new) for p in person_ids])


def run(dynamics=None, marketo=None, d_links=None, m_links=None, d_creates=None, m_creates=None, linked=None,
        limits=Limits(max_records=10, max_percent=20), **kw) -> GuardDecision:
    return decide(dynamics or {}, marketo or {}, d_links or {}, m_links or {}, d_creates or {}, m_creates or {},
                  linked, limits, **kw)


def test_threshold_is_the_larger_of_the_floor_and_the_share_of_linked_records():
    limits = Limits(max_records=5000, max_percent=10)
    assert limits.threshold(None) == limits.threshold(0) == limits.threshold(49_999) == 5000
    assert limits.threshold(50_000) == 5000 and limits.threshold(1_000_000) == 100_000
    assert Limits().max_records == 5000 and Limits().max_percent == 10  # the shipped defaults


def test_a_quiet_cycle_is_under_the_threshold_and_goes_ahead():
    d = run({"contact": job_titles([1, 2])}, {"lead": writes([(3, "city", "Berlin", "Porto")])}, linked=100)
    assert not d.tripped and d.outcome == "under_threshold" and d.proceed
    assert d.sides["dynamics"].records == 2 and d.sides["marketo"].records == 1
    assert d.sides["dynamics"].threshold == 20  # 20 % of 100 linked is above the floor of 10


def test_records_are_counted_once_per_record_across_fields_link_fields_and_entities():
    dyn = {"contact": writes([(1, "job_title", "a", "b"), (1, "city", "x", "y"), (2, "city", None, "Rome")]),
           "lead": job_titles([7])}
    d = run(dyn, d_links={"contact": links([2, 3])}, d_creates={"lead": 4}, linked=100)
    side = d.sides["dynamics"]
    assert side.updated == {"contact": 3, "lead": 1} and side.created == {"lead": 4}
    assert side.records == 3 + 1 + 4
    assert side.fields == {"contact": {"city": 2, "job_title": 1, LINK_FIELDS: 2}, "lead": {"job_title": 1}}
    assert d.sides["marketo"].records == 0 and not d.tripped


def test_more_records_than_the_threshold_on_one_side_asks_for_approval():
    d = run({"contact": job_titles(range(1, 12))}, linked=50)  # 11 > max(10, 20 % of 50)
    assert d.tripped and d.sides["dynamics"].tripped and not d.sides["marketo"].tripped
    assert d.outcome == "awaiting_approval" and not d.proceed
    # exactly at the threshold is not over it
    assert not run({"contact": job_titles(range(1, 11))}, linked=50).tripped


def test_the_share_of_linked_records_raises_the_threshold_on_a_large_base():
    changed = {"lead": job_titles(range(1, 16))}  # 15 records
    assert run(changed, linked=50).tripped  # threshold 10
    assert not run(changed, linked=100).tripped  # threshold 20 % of 100 = 20


def test_creates_alone_trip_it_on_the_side_they_are_written_to():
    d = run(m_creates={"contact": 30}, linked=10)  # a botched Dynamics import: 30 new contacts to create in Marketo
    assert d.sides["marketo"].tripped and not d.sides["dynamics"].tripped
    assert d.sides["marketo"].created == {"contact": 30}


def lifecycle(rows: list[tuple[str, str, int, str]]) -> pd.DataFrame:
    """``(target side, action, person_id, entity_type)`` rows -> identity's delete-policy frame."""
    return pd.DataFrame({"target": [r[0] for r in rows], "action": [r[1] for r in rows],
                         "person_id": pd.Series([r[2] for r in rows], dtype="int64"),
                         "entity_type": [r[3] for r in rows], "dynamics_id": [f"rec-{r[2]}" for r in rows]})


def test_a_mass_delete_on_one_side_trips_it_on_the_other_before_anything_is_deleted_or_flagged():
    # 12 persons deleted in Marketo under propagate: their 12 contacts would be deleted in Dynamics
    deleted = lifecycle([("dynamics", "delete", p, "contact") for p in range(1, 13)])
    d = run(deletes=deleted, linked=40)
    side = d.sides["dynamics"]
    assert side.deleted == {"contact": 12} and side.records == 12 and side.tripped and not d.proceed
    assert "contact 0 updated + 0 created + 12 deleted" in guard.describe(d)[0]
    # flags are updates of the survivors, counted once with their other writes
    flagged = lifecycle([("marketo", "flag", p, "lead") for p in range(1, 6)]
                        + [("dynamics", "deactivate", 9, "lead")])
    d = run(marketo={"lead": writes([(1, "city", "a", "b")])}, deletes=flagged, linked=40)
    assert d.sides["marketo"].updated == {"lead": 5} and d.sides["marketo"].fields["lead"][guard.DELETED_FLAG] == 5
    assert d.sides["dynamics"].deleted == {"lead": 1} and not d.tripped


def test_a_dry_run_never_asks_and_allow_mass_change_lets_the_run_through():
    big = {"contact": job_titles(range(1, 40))}
    assert run(big, dry_run=True).outcome == "dry_run" and run(big, dry_run=True).proceed
    assert run(big, allowed=True).outcome == "allowed" and run(big, allowed=True).proceed
    # neither changes a run under the threshold
    assert run({"contact": job_titles([1])}, dry_run=True, allowed=True).outcome == "under_threshold"


@pytest.mark.parametrize("outcome, proceed", [("approved", True), ("rejected", False), ("timed_out", False),
                                              ("awaiting_approval", False), ("allowed", True)])
def test_only_an_approval_lets_an_asking_run_write(outcome, proceed):
    d = run({"contact": job_titles(range(1, 40))})
    d.outcome = outcome
    assert d.proceed is proceed


def test_the_sample_shows_a_few_records_old_to_new_with_long_values_cut():
    long = "x" * 500
    dyn = {"contact": writes([(9, "job_title", "Engineer", "Intern"), (3, "city", "Berlin", long),
                              (3, "job_title", None, "CTO"), *[(p, "city", "a", "b") for p in range(100, 120)]]),
           "lead": job_titles([1])}
    sample = run(dyn, sample_size=3).sides["dynamics"].sample
    # the first 3 records by entity type then person id: contact 3, contact 9, then contact 100
    assert [(s.entity, s.person_id, s.field) for s in sample] == [
        ("contact", 3, "city"), ("contact", 3, "job_title"), ("contact", 9, "job_title"), ("contact", 100, "city")]
    assert sample[0].old == "Berlin" and len(sample[0].new) == guard.SAMPLE_VALUE_CHARS and sample[0].new.endswith("…")
    assert sample[1].old is None and sample[1].new == "CTO" and sample[1].dynamics_id == "rec-3"
    assert sample[2].old == "Engineer" and sample[2].new == "Intern"


def test_the_decision_round_trips_through_xcom_json():
    d = run({"contact": job_titles(range(1, 40))}, m_creates={"lead": 2}, linked=5)
    again = GuardDecision.model_validate(d.dump())
    assert again == d and again.tripped and again.sides["dynamics"].sample[0].new == "Intern"


def test_describe_names_each_side_its_threshold_and_what_happens():
    d = run({"contact": job_titles(range(1, 40))}, linked=None)
    lines = guard.describe(d)
    assert "39 records to Dynamics (contact 39 updated + 0 created)" in lines[0] and "OVER" in lines[0]
    assert "0 records to Marketo" in lines[1] and "OVER" not in lines[1]
    assert "nothing is written until someone approves" in lines[2]
    d.outcome, d.responded_by = "rejected", "admin"
    assert guard.describe(d)[-1].endswith("still there for the next cycle (by admin)")


# -- on a real cycle (both sandboxes over HTTP): what the DAG's check_mass_change task runs ----------------------

def plan_only(world, run_id: str, **params):
    """A cycle run up to its plans (what the DAG has done when the guard is checked)."""
    from mdsync.cycle import STAGES
    from mdsync.results import RunManifest

    cycle = world.cycle(run_id, **params)
    manifest = RunManifest(run_id=run_id)
    for name in STAGES[:STAGES.index("load_dynamics")]:
        manifest = cycle.run_stage(name, manifest)
    return cycle, manifest


def test_check_guard_counts_a_mass_change_on_a_real_cycle_and_the_report_says_nothing_was_written(sync_world,
                                                                                                  monkeypatch):
    from tests.fixtures.mass_change import retitle_contacts, seed_linked_contacts

    pairs = seed_linked_contacts(sync_world, 10)
    first = sync_world.cycle("run-1").run_all()  # 10 links, link fields written on both sides: under the floor
    assert first["new_links"] == 10
    monkeypatch.setenv("MDSYNC_GUARD_MAX_RECORDS", "3")
    monkeypatch.setenv("MDSYNC_GUARD_MAX_PERCENT", "20")  # threshold max(3, 20 % of 10) = 3
    retitle_contacts(sync_world, pairs.contact_ids[:4], "Intern")

    cycle, manifest = plan_only(sync_world, "run-2")
    decision = cycle.check_guard(manifest)
    marketo, dynamics = decision.sides["marketo"], decision.sides["dynamics"]
    assert (marketo.records, marketo.linked, marketo.threshold) == (4, 10, 3) and marketo.tripped
    assert marketo.fields == {"contact": {"job_title": 4}} and marketo.updated == {"contact": 4}
    assert dynamics.records == 0 and not dynamics.tripped
    assert decision.outcome == "awaiting_approval"
    assert [(s.person_id, s.field, s.old, s.new) for s in marketo.sample[:2]] == [
        (pairs.person_ids[0], "job_title", "Engineer", "Intern"), (pairs.person_ids[1], "job_title", "Engineer", "Intern")]

    # rejected: the DAG skips the loads and commit; the report says so and nothing moved
    manifest.guard = decision.model_copy(update={"outcome": "rejected", "responded_by": "admin"})
    summary = cycle.report(manifest)
    assert summary["written"] == {"dynamics": 0, "marketo": 0} and summary["committed"] == {}
    assert summary["mass_change"] == {"outcome": "rejected", "written": False, "responded_by": "admin",
                                      "dynamics": {"records": 0, "threshold": 3}, "marketo": {"records": 4, "threshold": 3}}
    # the same plan is there next time, and a dry run or allow_mass_change do not ask
    _, again = plan_only(sync_world, "run-3", dry_run=True)
    assert sync_world.cycle("run-3", dry_run=True).check_guard(again).outcome == "dry_run"
    cycle, again = plan_only(sync_world, "run-4")
    allowed = cycle.check_guard(again, allow_mass_change=True)
    assert allowed.outcome == "allowed" and allowed.sides["marketo"].records == 4


def test_a_mass_delete_in_dynamics_asks_before_the_persons_are_flagged(sync_world, monkeypatch):
    from tests.fixtures.mass_change import seed_linked_contacts

    pairs = seed_linked_contacts(sync_world, 10, prefix="gone")
    assert sync_world.cycle("del-1").run_all()["new_links"] == 10
    monkeypatch.setenv("MDSYNC_GUARD_MAX_RECORDS", "3")
    monkeypatch.setenv("MDSYNC_GUARD_MAX_PERCENT", "20")  # threshold max(3, 20 % of 10) = 3
    client = sync_world.dynamics()
    for contact in pairs.contact_ids[:4]:  # a clean-up job deletes four linked contacts
        client.request("DELETE", f"contacts({contact})")

    cycle, manifest = plan_only(sync_world, "del-2")
    decision = cycle.check_guard(manifest)
    marketo = decision.sides["marketo"]
    # the default policy flags the four persons: updates of the Marketo side, counted against the threshold
    assert (marketo.records, marketo.linked, marketo.tripped) == (4, 10, True)
    assert marketo.fields == {"contact": {guard.DELETED_FLAG: 4}} and decision.outcome == "awaiting_approval"


def test_check_run_counts_the_persons_a_dynamics_dedupe_would_merge_away_in_marketo(tmp_path):
    from pathlib import Path

    from mdsync.results import Identified, RunManifest
    from mdsync.staging import Staging

    s = Staging(Path(tmp_path), "dedupe")
    empty = pd.DataFrame({"person_id": pd.Series([], dtype="int64")})
    creates = pd.DataFrame({"entity_type": pd.Series([], dtype="string")})
    # a Dataverse dedupe merged 12 contacts whose masters had persons: 12 persons to merge away in Marketo
    merges = pd.DataFrame({"winner_id": pd.Series(range(101, 113), dtype="int64"),
                           "loser_id": pd.Series(range(1, 13), dtype="int64"), "entity_type": "contact",
                           "dynamics_id": [f"rec-{i}" for i in range(12)], "detail": "merged in Dynamics"})
    identity = Identified(links=s.write_frame("links", pd.DataFrame({"new": pd.Series([False] * 40)})),
                          persons=s.write_frame("persons", empty), records={}, unlinked=s.write_frame("u", empty),
                          activity=s.write_frame("a", empty), marketo_creates=s.write_frame("mc", creates),
                          dynamics_creates=s.write_frame("dc", creates), marketo_link_writes=s.write_frame("ml", empty),
                          dynamics_link_writes={}, marketo_merges=s.write_frame("merges", merges))
    decision = guard.check_run(RunManifest(run_id="dedupe", identity=identity), s, Limits(max_records=10, max_percent=20))
    marketo = decision.sides["marketo"]
    assert marketo.deleted == {"contact": 12} and marketo.tripped and decision.outcome == "awaiting_approval"

"""Undo a run (issue 9 item 5), on frames: a run's write lines (as commit records them) + the values now on both
sides -> the restores, the values not restored and why, the records and links only listed.

Each scenario makes the undone run the way a cycle does: a real plan (:func:`mdsync.plan.plan_entity`) of a change,
its write lines (:func:`mdsync.activity.write_activity`, as the commit stores them), and both sides after its
writes. The end-to-end scenarios through both sandboxes are in test_undo_end_to_end.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mdsync.activity import activity_frame, consent_held_activity, format_line, write_activity, written_side
from mdsync.commit import succeeded_baselines
from mdsync.config import FieldMap, Side
from mdsync.errors import ConfigError
from mdsync.plan import REQUIRES_BOTH, REQUIRES_DYNAMICS, REQUIRES_MARKETO, plan_entity
from mdsync.undo import (ALREADY_RESTORED, CHANGED_LATER, CONSENT_KEPT, NOT_FOUND, NOT_LINKED, NOT_MAPPED, NOT_READABLE,
                         ONE_WAY, UNDO, UNDO_SKIPPED, check_request, plan_undo, records_to_read, run_writes)
from tests.include.mdsync.conftest import api_records_for, canonical, links_for

pytestmark = pytest.mark.unit

RUN = "manual__2026-11-22T08:00:00+00:00"
ANN = {"email": "ann@example.com", "first_name": "Ann", "job_title": "Engineer", "phone": "111"}


def _results(writes: pd.DataFrame, failed: set[tuple[int, str]] = frozenset()) -> pd.DataFrame:
    bad = np.array([(p, f) in failed for p, f in zip(writes["person_id"], writes["field"])], dtype=bool)
    return writes[["person_id", "dynamics_id", "field", "value"]].assign(
        ok=~bad, error_code=np.where(bad, "0x80040265", None), error_message=np.where(bad, "rejected", None))


def lines(entity, plan, failed=frozenset()) -> pd.DataFrame:
    """A run's activity rows as the state store returns them (``id`` in commit order)."""
    parts = [write_activity(entity.name, plan.dynamics_writes, _results(plan.dynamics_writes, failed), "dynamics"),
             write_activity(entity.name, plan.marketo_writes, _results(plan.marketo_writes, failed), "marketo")]
    out = pd.concat([p for p in parts if not p.empty], ignore_index=True)
    return out.assign(id=range(1, len(out) + 1), run_id=RUN)


def apply(plan, marketo: pd.DataFrame, dynamics: pd.DataFrame, failed=frozenset()):
    """Both sides after the plan's writes (the ones not in ``failed``)."""
    marketo, dynamics = marketo.copy(), dynamics.copy()
    for writes, frame in ((plan.dynamics_writes, dynamics), (plan.marketo_writes, marketo)):
        for row in writes.itertuples():
            if (row.person_id, row.field) not in failed:
                frame.loc[row.person_id, row.field] = row.value
    return marketo, dynamics


def run_changes(entity, before: dict, marketo_now: dict, dynamics_now: dict, persons=(1,), failed=frozenset()):
    """A run that syncs ``marketo_now`` / ``dynamics_now`` (both were ``before``): (its lines, both sides after it)."""
    base = canonical({p: before for p in persons})
    m = canonical({p: {**before, **marketo_now.get(p, {})} for p in persons})
    d = canonical({p: {**before, **dynamics_now.get(p, {})} for p in persons})
    plan = plan_entity(entity, base, m, d, links_for(persons))
    m_after, d_after = apply(plan, m, d, failed)
    return lines(entity, plan, failed), m_after, d_after, plan


def undo(entity, activity, marketo, dynamics, persons=(1,), baseline=None, links=None):
    return plan_undo(entity, activity, marketo, dynamics, links if links is not None else links_for(persons),
                     baseline if baseline is not None else canonical({p: {} for p in persons}).reindex(columns=[]),
                     undone_run=RUN)


def cells(writes: pd.DataFrame) -> dict:
    return {(int(r.person_id), r.field): (None if pd.isna(r.value) else r.value) for r in writes.itertuples()}


def test_a_run_that_synced_both_ways_is_restored_on_both_sides_of_each_pair(lead):
    activity, m, d, _ = run_changes(lead, ANN, {1: {"job_title": "CTO"}}, {1: {"phone": "999"}})
    u = undo(lead, activity, m, d)
    # each value the run wrote goes back on the side it wrote and on the side the change came from
    assert cells(u.plan.dynamics_writes) == {(1, "job_title"): "Engineer", (1, "phone"): "111"}
    assert cells(u.plan.marketo_writes) == {(1, "job_title"): "Engineer", (1, "phone"): "111"}
    assert set(u.plan.dynamics_writes["action"]) == {UNDO} and set(u.plan.dynamics_writes["previous"]) == {"CTO", "999"}
    assert u.plan.dynamics_writes["reason"].str.contains(f"undo of run {RUN}", regex=False).all()
    b = u.plan.baseline_updates.set_index("field")
    assert b.loc["job_title", "value"] == "Engineer" and set(b["requires"]) == {REQUIRES_BOTH}
    assert u.notes.empty and u.summary.restores == 2 and u.summary.skipped == {}
    assert u.plan.collisions.empty and u.plan.consent_held.empty and u.plan.compared == 1


def test_the_restored_pair_agrees_so_a_cycle_after_the_undo_writes_nothing(lead):
    activity, m, d, _ = run_changes(lead, ANN, {1: {"job_title": "CTO"}}, {1: {"phone": "999"}})
    u = undo(lead, activity, m, d)
    m2, d2 = apply(u.plan, m, d)
    baseline = canonical({1: {**ANN}})  # the undo's baselines
    after = plan_entity(lead, baseline, m2, d2, links_for([1]))
    assert after.is_empty and (m2 == d2).all(axis=None)


def test_a_value_changed_after_the_run_is_kept_and_listed(lead):
    activity, m, d, _ = run_changes(lead, ANN, {1: {"job_title": "CTO"}}, {1: {"phone": "999"}})
    d.loc[1, "job_title"] = "CEO"  # changed in Dynamics since the run wrote CTO there
    u = undo(lead, activity, m, d)
    assert cells(u.plan.dynamics_writes) == {(1, "phone"): "111"}  # the other field is still restored
    assert cells(u.plan.marketo_writes) == {(1, "phone"): "111"}
    assert u.plan.baseline_updates["field"].tolist() == ["phone"]
    note = u.notes.iloc[0]
    assert (note["action"], note["field"], note["old_value"], note["new_value"]) == (UNDO_SKIPPED, "job_title", "CEO",
                                                                                      "Engineer")
    assert "wrote 'CTO' in Dynamics; changed in Dynamics since: kept" in note["detail"]
    assert u.summary.skipped == {CHANGED_LATER: 1}
    item = u.summary.changed_later[0]
    assert (item.field, item.changed_in, item.wrote, item.now, item.restore) == ("job_title", "dynamics", "CTO", "CEO",
                                                                                 "Engineer")
    assert format_line(note.to_dict()).startswith("UNDO_SKIPPED person 1 ⇄ lead")


def test_a_later_change_on_the_side_the_change_came_from_is_kept_too(lead):
    activity, m, d, _ = run_changes(lead, ANN, {1: {"job_title": "CTO"}}, {})
    m.loc[1, "job_title"] = "Chief Technology Officer"  # Marketo (where CTO came from) changed again
    u = undo(lead, activity, m, d)
    assert u.plan.is_empty and u.summary.skipped == {CHANGED_LATER: 1}
    assert "changed in Marketo since" in u.notes["detail"].iloc[0]


def test_a_side_already_back_to_the_old_value_is_not_written_again(lead):
    activity, m, d, _ = run_changes(lead, ANN, {1: {"job_title": "CTO"}}, {})
    d.loc[1, "job_title"] = "Engineer"  # someone put Dynamics back by hand
    u = undo(lead, activity, m, d)
    assert u.plan.dynamics_writes.empty and cells(u.plan.marketo_writes) == {(1, "job_title"): "Engineer"}
    assert u.plan.baseline_updates["requires"].tolist() == [REQUIRES_MARKETO]
    d.loc[1, "job_title"] = m.loc[1, "job_title"] = "Engineer"
    again = undo(lead, activity, m, d)
    assert again.plan.is_empty and again.summary.skipped == {ALREADY_RESTORED: 1}


def test_only_the_writes_that_went_through_are_undone(lead):
    failed = {(1, "phone")}
    activity, m, d, _ = run_changes(lead, ANN, {1: {"job_title": "CTO", "phone": "555"}}, {}, failed=failed)
    assert sorted(activity["action"]) == ["error", "update"]
    u = undo(lead, activity, m, d)
    assert cells(u.plan.dynamics_writes) == {(1, "job_title"): "Engineer"}
    assert set(u.plan.marketo_writes["field"]) == {"job_title"}  # Marketo's 555 was never carried over: not touched


def test_consent_an_opt_out_the_run_carried_over_is_never_undone(lead):
    before = {**ANN, "email_opt_out": "false", "do_not_call": "false"}
    activity, m, d, plan = run_changes(lead, before, {1: {"email_opt_out": "true", "job_title": "CTO"}}, {})
    assert plan.dynamics_writes.set_index("field").loc["email_opt_out", "action"] == "consent"
    u = undo(lead, activity, m, d)
    assert cells(u.plan.dynamics_writes) == {(1, "job_title"): "Engineer"}
    assert "email_opt_out" not in set(u.plan.marketo_writes["field"])
    assert u.summary.skipped == {CONSENT_KEPT: 1}
    assert "never turns an opt-out into an opt-in" in u.notes["detail"].iloc[0]


def test_a_re_opt_in_the_run_held_is_a_consent_line_but_not_a_write(lead):
    before = {**ANN, "email_opt_out": "true"}
    base = canonical({1: before})
    plan = plan_entity(lead, base, canonical({1: {**before, "email_opt_out": "false"}}), base, links_for([1]))
    held = consent_held_activity("lead", plan.consent_held).assign(id=1, run_id=RUN)
    assert held["action"].tolist() == ["consent"] and written_side(held["detail"]).isna().all()
    assert run_writes(held).empty


def test_picklists_and_booleans_round_trip_through_their_canonical_values(lead):
    vip = FieldMap(name="vip", marketo="isVip", dynamics="new_vip", type="boolean")
    entity = lead.model_copy(update={"fields": [*lead.fields, vip]})
    before = {**ANN, "lead_source": "Seminar", "vip": "false"}
    activity, m, d, _ = run_changes(entity, before, {1: {"lead_source": "Web"}}, {1: {"vip": "true"}})
    u = undo(entity, activity, m, d)
    assert cells(u.plan.dynamics_writes) == {(1, "lead_source"): "Seminar", (1, "vip"): "false"}
    dyn = api_records_for(u.plan.dynamics_writes, entity, Side.DYNAMICS)
    mkt = api_records_for(u.plan.marketo_writes, entity, Side.MARKETO)
    assert dyn[0]["leadsourcecode"] == 6 and dyn[0]["new_vip"] is False
    assert mkt[0]["leadSource"] == "Seminar" and mkt[0]["isVip"] is False


def test_an_empty_value_before_the_run_is_restored_as_empty(contact):
    before = {**ANN, "city": None}
    activity, m, d, _ = run_changes(contact, before, {}, {1: {"city": "Porto"}})
    u = undo(contact, activity, m, d)
    assert cells(u.plan.marketo_writes) == {(1, "city"): None} == cells(u.plan.dynamics_writes)
    assert api_records_for(u.plan.marketo_writes, contact, Side.MARKETO)[0]["city"] is None


def test_emails_still_count_as_unchanged_in_another_case(contact):
    activity, m, d, _ = run_changes(contact, ANN, {}, {1: {"email": "ann.lee@example.com"}})
    m.loc[1, "email"] = "Ann.Lee@Example.com"
    u = undo(contact, activity, m, d)
    assert cells(u.plan.marketo_writes) == {(1, "email"): "ann@example.com"}


def test_a_collision_is_undone_to_the_value_the_loser_had(lead):
    activity, m, d, plan = run_changes(lead, ANN, {1: {"job_title": "CTO"}}, {1: {"job_title": "Head of Sales"}})
    assert not plan.collisions.empty  # lead: Marketo wins, Dynamics' Head of Sales was overwritten
    u = undo(lead, activity, m, d)
    assert cells(u.plan.dynamics_writes) == {(1, "job_title"): "Head of Sales"} == cells(u.plan.marketo_writes)


def test_undoing_an_undo_puts_the_run_back(lead):
    activity, m, d, _ = run_changes(lead, ANN, {1: {"job_title": "CTO"}}, {1: {"phone": "999"}})
    u = undo(lead, activity, m, d)
    undo_lines = lines(lead, u.plan).assign(run_id="undo-run")
    assert set(undo_lines["action"]) == {UNDO}
    assert len(run_writes(undo_lines)) == 4  # both fields, both sides
    m2, d2 = apply(u.plan, m, d)
    again = plan_undo(lead, undo_lines, m2, d2, links_for([1]), canonical({1: ANN}), undone_run="undo-run")
    assert cells(again.plan.dynamics_writes) == {(1, "job_title"): "CTO", (1, "phone"): "999"}
    assert cells(again.plan.marketo_writes) == cells(again.plan.dynamics_writes)
    assert set(again.plan.baseline_updates["requires"]) == {REQUIRES_BOTH}


def test_pairs_no_longer_linked_records_not_found_and_fields_not_readable_are_not_restored(lead):
    activity, m, d, _ = run_changes(lead, ANN, {p: {"job_title": "CTO"} for p in (1, 2, 3, 4)}, {},
                                    persons=(1, 2, 3, 4))
    links = links_for([1, 2, 3, 4]).drop(index=[1])  # person 1 unlinked since
    d = d.drop(index=[2])  # person 2's lead is gone
    m = m.assign(job_title=m["job_title"].where(m.index != 3, "CTO"))
    u = undo(lead, activity, m, d, persons=(1, 2, 3, 4), links=links)
    assert u.summary.skipped == {NOT_LINKED: 1, NOT_FOUND: 1}
    assert sorted(u.plan.dynamics_writes["person_id"]) == [3, 4]
    details = dict(zip(u.notes["person_id"], u.notes["detail"]))
    assert "no longer linked" in details[1] and "no longer in Dynamics" in details[2]
    unreadable = undo(lead, activity, m.drop(columns=["job_title"]), d, persons=(1, 2, 3, 4))
    assert unreadable.plan.is_empty and unreadable.summary.skipped == {NOT_FOUND: 1, NOT_READABLE: 3}


def test_one_way_fields_and_fields_no_longer_mapped_are_not_restored(lead):
    one_way = lead.model_copy(update={"fields": [FieldMap.model_validate({**f.model_dump(), "direction": "to_dynamics"})
                                                 if f.name == "job_title" else f for f in lead.fields]})
    activity, m, d, _ = run_changes(one_way, ANN, {1: {"job_title": "CTO"}}, {})
    u = undo(one_way, activity, m, d)
    assert u.plan.is_empty and u.summary.skipped == {ONE_WAY: 1}
    assert "Marketo is its source" in u.notes["detail"].iloc[0]
    fewer = lead.model_copy(update={"fields": [f for f in lead.fields if f.name != "job_title"]})
    activity, m, d, _ = run_changes(lead, ANN, {1: {"job_title": "CTO"}}, {})
    assert undo(fewer, activity, m, d).summary.skipped == {NOT_MAPPED: 1}


def test_records_the_run_created_and_links_it_made_are_listed_not_undone(lead, contact):
    activity, m, d, _ = run_changes(lead, ANN, {1: {"job_title": "CTO"}}, {})
    made = activity_frame([
        {"entity_type": "lead", "person_id": 7, "dynamics_type": "lead", "dynamics_id": "abc", "action": "create",
         "detail": "marked for sync: created the lead in Dynamics"},
        {"entity_type": "lead", "person_id": 8, "dynamics_type": "lead", "dynamics_id": "def", "action": "link",
         "detail": "linked (email match)"},
        {"entity_type": "contact", "person_id": 9, "dynamics_type": "contact", "dynamics_id": "ghi", "action": "create",
         "detail": "new contact in Dynamics: created the person in Marketo"}])
    activity = pd.concat([activity, made.assign(id=[10, 11, 12], run_id=RUN)], ignore_index=True)
    u = undo(lead, activity, m, d)
    assert (u.summary.created, u.summary.linked, u.summary.restores) == (1, 1, 1)
    listed = u.notes.set_index("person_id")
    assert set(listed["action"]) == {UNDO_SKIPPED}
    assert "created by run" in listed.loc[7, "detail"] and "not deleted" in listed.loc[7, "detail"]
    assert "the link is kept" in listed.loc[8, "detail"]
    assert 9 not in listed.index  # the contact's create is listed by the contact plan
    assert undo(contact, activity, m, d).summary.created == 1


def test_a_baseline_update_on_both_sides_needs_both_writes():
    updates = pd.DataFrame({"person_id": [1, 2, 3], "field": ["phone"] * 3, "value": ["1", "2", "3"],
                            "requires": [REQUIRES_BOTH, REQUIRES_BOTH, REQUIRES_DYNAMICS]})
    ok = pd.DataFrame({"person_id": [1, 2, 3], "field": ["phone"] * 3, "ok": [True, True, True]})
    half = ok.assign(ok=[True, False, True])
    assert succeeded_baselines(updates, ok, half)["person_id"].tolist() == [1, 3]


def test_a_commit_written_twice_counts_once(lead):
    activity, m, d, _ = run_changes(lead, ANN, {1: {"job_title": "CTO"}}, {})
    twice = pd.concat([activity, activity.assign(id=activity["id"] + 100)], ignore_index=True)
    assert len(run_writes(twice)) == 1
    assert records_to_read(twice) == ([1], {"lead": [links_for([1])["dynamics_id"].iloc[0]]})


def test_a_request_that_cannot_be_done_is_one_line(lead):
    activity, *_ = run_changes(lead, ANN, {1: {"job_title": "CTO"}}, {})
    recent = pd.DataFrame({"run_id": ["scheduled__2026-11-22T08:05:00+00:00"],
                           "last_at": [pd.Timestamp("2026-11-22T08:06:00Z")]})
    cases = [
        (dict(undo_run="nope", activity=activity.iloc[0:0], recent=recent),
         "run 'nope' recorded no activity in this state store .* latest runs with activity are "
         "scheduled__2026-11-22T08:05:00\\+00:00"),
        (dict(undo_run=RUN, activity=activity.assign(action="skip")), "wrote nothing"),
        (dict(undo_run="me", activity=activity), "is this run itself"),
        (dict(undo_run=RUN, activity=activity, person_ids=[1]), "cannot be combined with person_ids"),
        (dict(undo_run=RUN, activity=activity, full_resync=True), "cannot be combined with full_resync"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as caught:
            check_request(kwargs.pop("undo_run"), kwargs.pop("activity"), this_run="me", **kwargs)
        assert "\n" not in str(caught.value)
    check_request(RUN, activity, this_run="me")  # a run that wrote values is fine

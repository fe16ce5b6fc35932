"""Every branch of the three-way diff, the collision policy and the plan (DESIGN §4.3)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from mdsync.config import DEFAULT_CONFIG_PATH, Side, parse_config
from mdsync.plan import (
    REQUIRES_DYNAMICS, REQUIRES_MARKETO, REQUIRES_NOTHING, plan_entity, suppress_known_rejections,
)
from tests.include.mdsync.conftest import api_records_for, canonical, links_for

BASE = {"email": "ann@example.com", "first_name": "Ann", "job_title": "Engineer", "lead_source": "Web"}


def _plan(entity, baseline, marketo, dynamics, persons=(1,)):
    return plan_entity(entity, canonical(baseline), canonical(marketo), canonical(dynamics), links_for(persons))


def _one(frame: pd.DataFrame) -> dict:
    assert len(frame) == 1, frame
    return frame.iloc[0].to_dict()


@pytest.mark.parametrize("entity_name", ["lead", "contact"])
def test_only_marketo_changed_writes_to_dynamics(config, entity_name):
    plan = _plan(config.entity(entity_name), {1: BASE}, {1: {**BASE, "first_name": "Anna"}}, {1: BASE})
    write = _one(plan.dynamics_writes)
    assert (write["field"], write["value"], write["previous"], write["reason"]) == (
        "first_name", "Anna", "Ann", "changed in Marketo")
    assert write["dynamics_id"] == "00000000-0000-0000-0000-000000000001"
    assert plan.marketo_writes.empty and plan.collisions.empty
    assert _one(plan.baseline_updates) == {"person_id": 1, "field": "first_name", "value": "Anna",
                                           "requires": REQUIRES_DYNAMICS}


@pytest.mark.parametrize("entity_name", ["lead", "contact"])
def test_only_dynamics_changed_writes_to_marketo(config, entity_name):
    plan = _plan(config.entity(entity_name), {1: BASE}, {1: BASE}, {1: {**BASE, "job_title": "CTO"}})
    write = _one(plan.marketo_writes)
    assert (write["field"], write["value"], write["previous"], write["reason"]) == (
        "job_title", "CTO", "Engineer", "changed in Dynamics")
    assert plan.dynamics_writes.empty and plan.collisions.empty
    assert _one(plan.baseline_updates)["requires"] == REQUIRES_MARKETO


def test_both_changed_to_the_same_value_writes_nothing_and_advances_baseline(lead):
    plan = _plan(lead, {1: BASE}, {1: {**BASE, "job_title": "CTO"}}, {1: {**BASE, "job_title": "CTO"}})
    assert plan.is_empty and plan.collisions.empty
    assert _one(plan.baseline_updates) == {"person_id": 1, "field": "job_title", "value": "CTO",
                                           "requires": REQUIRES_NOTHING}


def test_collision_on_a_lead_marketo_wins(lead):
    plan = _plan(lead, {1: BASE}, {1: {**BASE, "job_title": "VP"}}, {1: {**BASE, "job_title": "CTO"}})
    write = _one(plan.dynamics_writes)
    assert (write["field"], write["value"], write["previous"]) == ("job_title", "VP", "CTO")
    assert write["reason"] == "collision on a lead: Marketo wins for leads"
    assert plan.marketo_writes.empty
    collision = _one(plan.collisions)
    assert (collision["marketo_value"], collision["dynamics_value"], collision["baseline"], collision["winner"]) == (
        "VP", "CTO", "Engineer", "marketo")


def test_collision_on_a_contact_dynamics_wins(contact):
    plan = _plan(contact, {1: BASE}, {1: {**BASE, "job_title": "VP"}}, {1: {**BASE, "job_title": "CTO"}})
    write = _one(plan.marketo_writes)
    assert (write["field"], write["value"], write["previous"]) == ("job_title", "CTO", "VP")
    assert write["reason"] == "collision on a contact: Dynamics wins for contacts"
    assert plan.dynamics_writes.empty
    collision = _one(plan.collisions)
    assert (collision["winner"], collision["marketo_value"], collision["dynamics_value"]) == ("dynamics", "VP", "CTO")


def test_null_and_empty_are_the_same(lead):
    base = {**BASE, "job_title": None}
    # canonical frames already hold NA for empty strings; a cleared value on one side is a change to null
    plan = _plan(lead, {1: base}, {1: base}, {1: base})
    assert plan.is_empty and plan.baseline_updates.empty
    plan = _plan(lead, {1: BASE}, {1: {**BASE, "job_title": None}}, {1: BASE})
    write = _one(plan.dynamics_writes)
    assert write["field"] == "job_title" and pd.isna(write["value"])


def test_email_case_is_not_a_change(lead):
    plan = _plan(lead, {1: BASE}, {1: {**BASE, "email": "Ann@Example.COM"}}, {1: BASE})
    assert plan.is_empty and plan.collisions.empty
    # the baseline takes the exact spelling so the next cycle compares against it
    assert _one(plan.baseline_updates)["value"] == "Ann@Example.COM"


def test_email_change_beyond_case_is_written(lead):
    plan = _plan(lead, {1: BASE}, {1: {**BASE, "email": "ann@new.example"}}, {1: BASE})
    assert _one(plan.dynamics_writes)["value"] == "ann@new.example"


def test_picklist_values_compare_through_the_map(lead):
    plan = _plan(lead, {1: BASE}, {1: BASE}, {1: {**BASE, "lead_source": "Trade Show"}})
    write = _one(plan.marketo_writes)
    assert write["value"] == "Trade Show"
    record = api_records_for(plan.marketo_writes, lead, Side.MARKETO)
    assert record == [{"id": 1, "leadSource": "Trade Show"}]
    plan = _plan(lead, {1: BASE}, {1: {**BASE, "lead_source": "Seminar"}}, {1: BASE})
    assert api_records_for(plan.dynamics_writes, lead, Side.DYNAMICS) == [
        {"leadid": "00000000-0000-0000-0000-000000000001", "leadsourcecode": 6}]


@pytest.fixture(scope="module")
def one_way_lead():
    """The shipped lead config with email opt-out as a plain one-way boolean (no consent rule)."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    field = next(f for f in raw["entities"]["lead"]["fields"] if f["name"] == "email_opt_out")
    del field["rule"]
    field["direction"] = "to_dynamics"
    return parse_config(raw).entity("lead")


def test_one_way_field_only_flows_its_way(one_way_lead):
    lead = one_way_lead
    base = {**BASE, "email_opt_out": "false"}
    # Dynamics changed a to_dynamics field: Marketo is the source, so Dynamics is set back, never Marketo
    plan = _plan(lead, {1: base}, {1: base}, {1: {**base, "email_opt_out": "true"}})
    assert plan.marketo_writes.empty and plan.collisions.empty
    write = _one(plan.dynamics_writes)
    assert (write["field"], write["value"], write["reason"]) == (
        "email_opt_out", "false", "one-way field: Marketo is the source")
    assert api_records_for(plan.dynamics_writes, lead, Side.DYNAMICS)[0]["donotbulkemail"] is False
    # Marketo changed it: it flows to Dynamics
    plan = _plan(lead, {1: base}, {1: {**base, "email_opt_out": "true"}}, {1: base})
    assert _one(plan.dynamics_writes)["value"] == "true" and plan.marketo_writes.empty


def test_field_absent_from_one_frame_counts_as_unchanged_there(lead):
    # Dynamics frame lacks job_title (the sync user cannot read it): Marketo's change still flows,
    # and the missing column never clears Marketo's value.
    dynamics = {1: {k: v for k, v in BASE.items() if k != "job_title"}}
    plan = _plan(lead, {1: BASE}, {1: {**BASE, "job_title": "VP"}}, dynamics)
    assert _one(plan.dynamics_writes)["value"] == "VP" and plan.marketo_writes.empty
    plan = _plan(lead, {1: BASE}, {1: BASE}, dynamics)
    assert plan.is_empty


def test_person_absent_from_one_side_counts_as_unchanged_there(lead):
    baseline = canonical({1: BASE, 2: BASE})
    marketo = canonical({1: {**BASE, "first_name": "Anna"}})
    dynamics = canonical({2: {**BASE, "first_name": "Bob"}})
    plan = plan_entity(lead, baseline, marketo, dynamics, links_for([1, 2]))
    assert plan.dynamics_writes[["person_id", "value"]].values.tolist() == [[1, "Anna"]]
    assert plan.marketo_writes[["person_id", "value"]].values.tolist() == [[2, "Bob"]]


def test_unlinked_persons_are_not_compared(lead):
    plan = plan_entity(lead, canonical({1: BASE}), canonical({1: {**BASE, "first_name": "X"}, 9: BASE}),
                       canonical({1: BASE}), links_for([1]))
    assert plan.compared == 1 and plan.dynamics_writes["person_id"].tolist() == [1]


def test_new_link_without_baseline_fills_blanks_and_resolves_conflicts_by_policy(lead, contact):
    marketo = {1: {"email": "a@x.com", "first_name": "Ann", "job_title": None}}
    dynamics = {1: {"email": "a@x.com", "first_name": "Annie", "job_title": "CTO"}}
    for entity, winner_value in ((lead, "Ann"), (contact, "Annie")):
        plan = plan_entity(entity, canonical({}).reindex(columns=["email"]), canonical(marketo), canonical(dynamics),
                           links_for([1]))
        writes = pd.concat([plan.dynamics_writes, plan.marketo_writes])
        assert set(writes["field"]) == {"first_name", "job_title"}
        assert writes.loc[writes["field"] == "first_name", "value"].item() == winner_value
        # the blank job title is filled from Dynamics whoever wins collisions
        assert plan.marketo_writes.loc[plan.marketo_writes["field"] == "job_title", "value"].item() == "CTO"


def test_unreadable_value_is_left_alone(lead):
    invalid = pd.DataFrame({"person_id": [1], "field": ["lead_source"]})
    plan = plan_entity(lead, canonical({1: BASE}), canonical({1: BASE}),
                       canonical({1: {**BASE, "lead_source": None}}), links_for([1]), dynamics_invalid=invalid)
    assert plan.is_empty


def test_known_rejection_is_not_resent_until_the_value_changes(lead):
    plan = _plan(lead, {1: BASE}, {1: {**BASE, "job_title": "X" * 150}}, {1: BASE})
    errors = pd.DataFrame({"person_id": [1], "target": ["dynamics"], "field": ["job_title"],
                           "value": pd.array(["X" * 150], dtype="str")})
    send, held = suppress_known_rejections(plan.dynamics_writes, errors, Side.DYNAMICS)
    assert send.empty and held["field"].tolist() == ["job_title"]
    plan = _plan(lead, {1: BASE}, {1: {**BASE, "job_title": "Y" * 150}}, {1: BASE})
    send, held = suppress_known_rejections(plan.dynamics_writes, errors, Side.DYNAMICS)
    assert send["value"].tolist() == ["Y" * 150] and held.empty
    # an error recorded against the other target holds nothing back
    send, _ = suppress_known_rejections(plan.dynamics_writes, errors.assign(target="marketo"), Side.DYNAMICS)
    assert len(send) == 1


def test_api_records_group_fields_per_record(lead):
    plan = _plan(lead, {1: BASE, 2: BASE},
                 {1: {**BASE, "first_name": "A", "job_title": "B"}, 2: {**BASE, "first_name": "C"}},
                 {1: BASE, 2: BASE}, persons=[1, 2])
    records = api_records_for(plan.dynamics_writes, lead, Side.DYNAMICS)
    assert sorted(records, key=lambda r: r["leadid"]) == [
        {"leadid": "00000000-0000-0000-0000-000000000001", "firstname": "A", "jobtitle": "B"},
        {"leadid": "00000000-0000-0000-0000-000000000002", "firstname": "C"},
    ]

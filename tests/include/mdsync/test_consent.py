"""Consent flags (``rule: opt_out_wins``, issue 9): an opt-out on either side wins over an opt-in, whatever
changed and whatever the entity type's collision winner; the sync never turns an opt-out into an opt-in.

Unit tests on frames: every combination of baseline (none yet, null, false, true) x Marketo x Dynamics (null,
false, true) on both entity types, the activity lines, and the API values. The end-to-end scenarios through
both sandboxes are at the bottom.
"""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from mdsync.activity import consent_held_activity, format_line, problem_activity, write_activity
from mdsync.canonical import canonical_series
from mdsync.config import Side
from mdsync.plan import CONSENT, REQUIRES_DYNAMICS, REQUIRES_MARKETO, REQUIRES_NOTHING, UPDATE, plan_entity
from tests.include.mdsync.conftest import api_records_for, canonical, links_for

BASE = {"email": "ann@example.com", "first_name": "Ann", "job_title": "Engineer"}
N, F, T = None, "false", "true"
NO_BASELINE = "no baseline"

# (Marketo, Dynamics) -> outcome when the baseline is not an opt-out (no baseline yet, null or false), and when it
# is one (true). "nothing": no write; "to_dynamics" / "to_marketo": the opt-out ("true") is written there;
# "held_marketo" / "held_dynamics": that side re-opted in, not propagated while the other still says opted out.
NOT_OPTED_OUT_BEFORE = {
    (N, N): "nothing", (N, F): "nothing", (N, T): "to_marketo",
    (F, N): "nothing", (F, F): "nothing", (F, T): "to_marketo",
    (T, N): "to_dynamics", (T, F): "to_dynamics", (T, T): "nothing",
}
OPTED_OUT_BEFORE = {
    (N, N): "nothing", (N, F): "nothing", (N, T): "held_marketo",
    (F, N): "nothing", (F, F): "nothing", (F, T): "held_marketo",
    (T, N): "held_dynamics", (T, F): "held_dynamics", (T, T): "nothing",
}
MATRIX = [(b, m, d, (OPTED_OUT_BEFORE if b == T else NOT_OPTED_OUT_BEFORE)[(m, d)])
          for b in (NO_BASELINE, N, F, T) for (m, d) in NOT_OPTED_OUT_BEFORE]


def _plan(entity, baseline, marketo, dynamics, persons=(1,)):
    return plan_entity(entity, canonical(baseline), canonical(marketo), canonical(dynamics), links_for(persons))


def _opt(value):
    return {**BASE, "email_opt_out": value}


def _outcome(plan) -> str:
    d, m = (w[w["field"] == "email_opt_out"] for w in (plan.dynamics_writes, plan.marketo_writes))
    held = plan.consent_held[plan.consent_held["field"] == "email_opt_out"]
    found = [name for name, frame in (("to_dynamics", d), ("to_marketo", m)) if not frame.empty]
    found += [f"held_{side}" for side in held["reopted"]]
    assert len(found) <= 1, found
    return found[0] if found else "nothing"


def _shown(v):
    return "null" if v is None else v


@pytest.mark.parametrize("entity_name", ["lead", "contact"])
@pytest.mark.parametrize("baseline,marketo,dynamics,expected", MATRIX,
                         ids=[f"base={_shown(b)}-mkt={_shown(m)}-dyn={_shown(d)}" for b, m, d, _ in MATRIX])
def test_every_combination(config, entity_name, baseline, marketo, dynamics, expected):
    entity = config.entity(entity_name)
    base = {} if baseline == NO_BASELINE else {1: _opt(baseline)}
    plan = _plan(entity, base, {1: _opt(marketo)}, {1: _opt(dynamics)})
    assert _outcome(plan) == expected
    assert plan.collisions.empty  # a consent flag never collides
    updates = plan.baseline_updates[plan.baseline_updates["field"] == "email_opt_out"]
    if expected.startswith("to_"):
        write = (plan.dynamics_writes if expected == "to_dynamics" else plan.marketo_writes).iloc[0]
        assert (write["value"], write["action"]) == (T, CONSENT)  # only ever an opt-out is written
        source = "Marketo" if expected == "to_dynamics" else "Dynamics"
        assert write["reason"] == f"consent: opted out in {source} (an opt-out on either side wins)"
        assert updates[["value", "requires"]].values.tolist() == [
            [T, REQUIRES_DYNAMICS if expected == "to_dynamics" else REQUIRES_MARKETO]]
    elif expected.startswith("held_"):
        assert updates.empty  # the baseline keeps the opt-out
        held = plan.consent_held.iloc[0]
        reopted = expected.removeprefix("held_")
        assert held["reopted"] == reopted and held["baseline"] == T
        here, there = ("Marketo", "Dynamics") if reopted == "marketo" else ("Dynamics", "Marketo")
        assert held["reason"].startswith(f"consent: re-opt-in in {here} not propagated: {there} still says opted out")
    else:
        assert plan.consent_held.empty
        # the sides agree on the opt-out: the baseline follows Marketo's exact value when it differs
        before = None if baseline == NO_BASELINE else baseline
        if marketo == before:
            assert updates.empty
        else:
            assert updates[["requires"]].values.tolist() == [[REQUIRES_NOTHING]]
            assert updates["value"].isna().all() if marketo is None else updates["value"].tolist() == [marketo]


def test_null_and_false_are_both_not_opted_out(lead):
    # no baseline: null on one side, false on the other is "equal" (nothing is copied onto the null side)
    plan = _plan(lead, {}, {1: _opt(N)}, {1: _opt(F)})
    assert plan.is_empty and plan.consent_held.empty
    # an ordinary boolean would copy false over null (first link: a value on one side only fills the blank side)
    plan = _plan(lead, {}, {1: {**BASE, "do_not_call": N}}, {1: {**BASE, "do_not_call": F}})
    assert plan.is_empty  # do_not_call is a consent flag too


def test_opt_out_wins_whatever_the_collision_winner(config):
    # both sides changed since the baseline (Dynamics null -> false, Marketo null -> true): for an ordinary field
    # this is a collision won by Dynamics on a contact; for consent the opt-out wins on both entity types
    for name in ("lead", "contact"):
        plan = _plan(config.entity(name), {1: _opt(N)}, {1: _opt(T)}, {1: _opt(F)})
        assert plan.collisions.empty and plan.marketo_writes.empty
        assert plan.dynamics_writes[["field", "value", "previous"]].values.tolist() == [["email_opt_out", T, F]]
        plan = _plan(config.entity(name), {1: _opt(F)}, {1: _opt(N)}, {1: _opt(T)})
        assert plan.dynamics_writes.empty
        write = plan.marketo_writes.iloc[0]
        assert len(plan.marketo_writes) == 1 and (write["field"], write["value"]) == ("email_opt_out", T)
        assert pd.isna(write["previous"])


def test_a_person_missing_from_a_side_keeps_its_baseline_there(contact):
    # Dynamics re-opted in; Marketo did not report the person this window (its value is the baseline: opted out)
    plan = plan_entity(contact, canonical({1: _opt(T)}), canonical({}).reindex(pd.Index([], dtype="int64", name="person_id")),
                       canonical({1: _opt(F)}), links_for([1]))
    assert plan.is_empty and plan.consent_held["reopted"].tolist() == ["dynamics"]
    # Marketo unsubscribed; Dynamics did not report the record: the opt-out is written there
    plan = plan_entity(contact, canonical({1: _opt(F)}), canonical({1: _opt(T)}),
                       canonical({}).reindex(pd.Index([], dtype="int64", name="person_id")), links_for([1]))
    assert plan.dynamics_writes[["field", "value", "action"]].values.tolist() == [["email_opt_out", T, CONSENT]]


def test_a_re_opt_in_takes_effect_once_both_sides_say_opted_in(lead):
    # cycle 1: Marketo re-opts in; Dynamics still opted out -> held, baseline stays true
    held = _plan(lead, {1: _opt(T)}, {1: _opt(F)}, {1: _opt(T)})
    assert held.is_empty and len(held.consent_held) == 1
    # cycle 2: Dynamics clears its flag too -> both agree: nothing written, the baseline follows
    plan = _plan(lead, {1: _opt(T)}, {1: _opt(F)}, {1: _opt(F)})
    assert plan.is_empty and plan.consent_held.empty
    assert plan.baseline_updates[["field", "value", "requires"]].values.tolist() == [["email_opt_out", F, REQUIRES_NOTHING]]


def test_consent_rows_beside_ordinary_changes_many_rows(contact):
    # five pairs in one frame: the rule applies row by row, vectorised, next to ordinary field changes
    base = {i: _opt(F if i < 3 else T) for i in range(1, 6)}
    marketo = {1: _opt(T), 2: {**_opt(F), "job_title": "VP"}, 3: _opt(F), 4: _opt(T), 5: _opt(T)}
    dynamics = {1: _opt(F), 2: _opt(T), 3: _opt(T), 4: _opt(N), 5: _opt(T)}
    plan = _plan(contact, base, marketo, dynamics, persons=range(1, 6))
    d = plan.dynamics_writes.set_index(["person_id", "field"])
    m = plan.marketo_writes.set_index(["person_id", "field"])
    assert d.loc[(1, "email_opt_out"), "value"] == T and d.loc[(2, "job_title"), "value"] == "VP"
    assert d.loc[(2, "job_title"), "action"] == UPDATE and d.loc[(1, "email_opt_out"), "action"] == CONSENT
    assert m.index.tolist() == [(2, "email_opt_out")]
    assert sorted(zip(plan.consent_held["person_id"], plan.consent_held["reopted"])) == [(3, "marketo"), (4, "dynamics")]
    summary = plan.summary()
    assert (summary["consent_changes"], summary["consent_held"], summary["collisions"]) == (2, 2, 0)


def test_consent_writes_are_api_booleans(lead):
    plan = _plan(lead, {1: {**_opt(F), "do_not_call": F}}, {1: {**_opt(T), "do_not_call": F}},
                 {1: {**_opt(F), "do_not_call": T}})
    assert api_records_for(plan.dynamics_writes, lead, Side.DYNAMICS) == [
        {"leadid": "00000000-0000-0000-0000-000000000001", "donotbulkemail": True}]
    assert api_records_for(plan.marketo_writes, lead, Side.MARKETO) == [{"id": 1, "doNotCall": True}]


def _results(rows):
    return pd.DataFrame(rows, columns=["person_id", "dynamics_id", "field", "value", "ok", "error_code", "error_message"])


def test_consent_activity_lines(lead):
    plan = _plan(lead, {1: _opt(F), 2: _opt(T)}, {1: _opt(F), 2: _opt(F)}, {1: _opt(T), 2: _opt(T)}, persons=(1, 2))
    writes = plan.marketo_writes
    act = write_activity("lead", writes, _results([(1, "L1", "email_opt_out", T, True, None, None)]), "marketo")
    row = act.iloc[0].to_dict()
    assert (row["action"], row["field"], row["old_value"], row["new_value"], row["winner"]) == (
        "consent", "email_opt_out", F, T, "dynamics")
    assert row["detail"] == "consent: opted out in Dynamics (an opt-out on either side wins) -> Marketo"
    assert format_line(row) == ("CONSENT   person 1 ⇄ lead L1 | email_opt_out: 'false' -> 'true' | winner: dynamics | "
                                "consent: opted out in Dynamics (an opt-out on either side wins) -> Marketo")
    # a rejected consent write is an error like any other (a sync error, re-sent when the value changes)
    failed = write_activity("lead", writes, _results([(1, "L1", "email_opt_out", T, False, "1003", "no")]), "marketo")
    assert failed["action"].tolist() == ["error"]
    # ordinary writes (also those built without an action column) stay updates
    assert write_activity("lead", writes.drop(columns="action"), _results([(1, "L1", "email_opt_out", T, True, None, None)]),
                          "marketo")["action"].tolist() == ["update"]

    held = consent_held_activity("lead", plan.consent_held).iloc[0].to_dict()
    assert (held["action"], held["person_id"], held["field"], held["old_value"], held["new_value"], held["winner"]) == (
        "consent", 2, "email_opt_out", T, F, "dynamics")
    assert format_line(held).startswith("CONSENT   person 2 ⇄ lead 00000000-0000-0000-0000-000000000002 | "
                                        "email_opt_out: 'true' -> 'false' | winner: dynamics | consent: re-opt-in in "
                                        "Marketo not propagated: Dynamics still says opted out")
    assert consent_held_activity("lead", plan.consent_held.iloc[:0]).empty


def test_unreadable_value_is_a_skip_line(lead):
    # a consent flag Dynamics reports as something that is not a boolean is left alone, and said so
    _, problem = canonical_series(pd.Series(["maybe"], index=pd.Index([1], name="person_id")),
                                  lead.field("email_opt_out"), Side.DYNAMICS)
    rows = problem_activity("lead", [problem], links_for([1]))
    assert rows[["action", "field", "new_value"]].values.tolist() == [["skip", "email_opt_out", "maybe"]]
    assert rows["detail"].iloc[0] == "Dynamics value 'maybe' left alone: not a boolean"


# -- end to end through both sandboxes (real HTTP) -------------------------------------------------------------


def _unsubscribed(world, email: str):
    return world.person(email, fields=("unsubscribed", "doNotCall"))


def _flags(world, entity_set: str, email: str) -> dict:
    from mdsync.dynamics import eq

    rows = world.dynamics().query(entity_set, [entity_set[:-1] + "id", "donotbulkemail", "donotphone"],
                                  filter=eq("emailaddress1", email))
    assert len(rows) == 1, rows
    return rows.iloc[0].to_dict()


def _consent_lines(world, run_id: str) -> pd.DataFrame:
    act = world.store().activity(run_id=run_id)
    return act[act["action"] == "consent"]


@pytest.mark.integration
def test_an_opt_out_in_dynamics_reaches_marketo_and_is_never_reverted(sync_world, caplog):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    # Dynamics opts out the contact (Ann) and the lead (Lena); on the lead (Marketo wins collisions) Marketo also
    # changes something else, so the person is in Marketo's window with unsubscribed still false
    sync_world.update_record("contacts", ids["ann"], donotbulkemail=True)
    sync_world.update_record("leads", ids["lead"], donotbulkemail=True, donotphone=True)
    sync_world.update_person(ids["lena_pid"], title="CMO", unsubscribed=False)

    with caplog.at_level(logging.INFO, logger="mdsync"):
        report = sync_world.cycle("run-2").run_all()

    assert _unsubscribed(sync_world, "ann@example.com")["unsubscribed"] is True
    lena = _unsubscribed(sync_world, "lena@example.com")
    assert (lena["unsubscribed"], lena["doNotCall"]) == (True, True)
    assert _flags(sync_world, "contacts", "ann@example.com")["donotbulkemail"] is True  # still opted out
    lead = _flags(sync_world, "leads", "lena@example.com")
    assert (lead["donotbulkemail"], lead["donotphone"]) == (True, True)
    assert sync_world.record("leads", "lena@example.com")["jobtitle"] == "CMO"  # the ordinary change flowed too
    assert report["written"]["marketo"] >= 2

    lines = _consent_lines(sync_world, "run-2").set_index(["person_id", "field"])
    assert lines.loc[(ids["ann_pid"], "email_opt_out"), "winner"] == "dynamics"
    assert lines.loc[(ids["lena_pid"], "email_opt_out"), "new_value"] == "true"
    assert lines.loc[(ids["lena_pid"], "do_not_call"), "detail"] == (
        "consent: opted out in Dynamics (an opt-out on either side wins) -> Marketo")
    assert any(r.getMessage().startswith(f"CONSENT   person {ids['lena_pid']} ") and "do_not_call: (empty) -> 'true'"
               in r.getMessage() for r in caplog.records)

    # the echo: nothing is written back, nothing reverted
    quiet = sync_world.cycle("run-3").run_all()
    assert quiet["written"] == {"dynamics": 0, "marketo": 0}
    assert _flags(sync_world, "contacts", "ann@example.com")["donotbulkemail"] is True


@pytest.mark.integration
def test_an_unsubscribe_in_marketo_reaches_dynamics_and_a_first_link_keeps_an_opt_out(sync_world):
    ids = sync_world.seed_people()
    # a pair linked by email on the first cycle: opted out in Dynamics only, not in Marketo (no baseline yet)
    dora_id, = sync_world.dataverse_sandbox.seed("contacts", [
        {"emailaddress1": "dora@example.com", "firstname": "Dora", "lastname": "Out", "donotbulkemail": True}])
    sync_world.marketo_sandbox.seed_leads([
        {"email": "dora@example.com", "firstName": "Dora", "lastName": "Out", "unsubscribed": False}])
    sync_world.cycle("run-1").run_all()
    assert _unsubscribed(sync_world, "dora@example.com")["unsubscribed"] is True
    assert _flags(sync_world, "contacts", "dora@example.com")["donotbulkemail"] is True

    # Marketo unsubscribes the contact (Ann; Dynamics wins collisions for contacts) and the lead (Lena)
    sync_world.update_person(ids["ann_pid"], unsubscribed=True)
    sync_world.update_person(ids["lena_pid"], unsubscribed=True)
    sync_world.update_record("contacts", ids["ann"], jobtitle="Principal")  # Dynamics in the window as well
    sync_world.cycle("run-2").run_all()
    assert _flags(sync_world, "contacts", "ann@example.com")["donotbulkemail"] is True
    assert _flags(sync_world, "leads", "lena@example.com")["donotbulkemail"] is True
    assert _unsubscribed(sync_world, "ann@example.com")["unsubscribed"] is True
    lines = _consent_lines(sync_world, "run-2")
    assert set(zip(lines["person_id"], lines["winner"])) == {(ids["ann_pid"], "marketo"), (ids["lena_pid"], "marketo")}


@pytest.mark.integration
def test_a_re_opt_in_on_one_side_is_not_propagated_while_the_other_says_opted_out(sync_world, caplog):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.update_record("contacts", ids["ann"], donotbulkemail=True)
    sync_world.update_person(ids["lena_pid"], unsubscribed=True)
    sync_world.cycle("run-2").run_all()  # both opted out on both sides now

    # Ann re-subscribes in Marketo; Lena's lead is cleared in Dynamics
    sync_world.update_person(ids["ann_pid"], unsubscribed=False)
    sync_world.update_record("leads", ids["lead"], donotbulkemail=False)
    with caplog.at_level(logging.INFO, logger="mdsync"):
        report = sync_world.cycle("run-3").run_all()

    assert report["written"] == {"dynamics": 0, "marketo": 0}  # neither propagated, neither reverted
    assert _flags(sync_world, "contacts", "ann@example.com")["donotbulkemail"] is True
    assert _unsubscribed(sync_world, "ann@example.com")["unsubscribed"] is False
    assert _unsubscribed(sync_world, "lena@example.com")["unsubscribed"] is True
    assert _flags(sync_world, "leads", "lena@example.com")["donotbulkemail"] is False
    held = _consent_lines(sync_world, "run-3").set_index("person_id")
    assert held.loc[ids["ann_pid"], "detail"].startswith(
        "consent: re-opt-in in Marketo not propagated: Dynamics still says opted out")
    assert held.loc[ids["lena_pid"], "detail"].startswith(
        "consent: re-opt-in in Dynamics not propagated: Marketo still says opted out")
    assert (held.loc[ids["ann_pid"], "old_value"], held.loc[ids["ann_pid"], "new_value"]) == ("true", "false")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CONSENT")]
    assert any(m.startswith(f"CONSENT   person {ids['ann_pid']} ") and "re-opt-in in Marketo" in m for m in logged)

    # the other side opts in too: both agree, nothing is written, and the re-opt-in stands
    sync_world.update_record("contacts", ids["ann"], donotbulkemail=False)
    report = sync_world.cycle("run-4").run_all()
    assert report["written"] == {"dynamics": 0, "marketo": 0}
    assert _consent_lines(sync_world, "run-4").empty
    assert _unsubscribed(sync_world, "ann@example.com")["unsubscribed"] is False
    assert _flags(sync_world, "contacts", "ann@example.com")["donotbulkemail"] is False
    # ... and a later opt-out on either side flows again
    sync_world.update_record("contacts", ids["ann"], donotbulkemail=True)
    sync_world.cycle("run-5").run_all()
    assert _unsubscribed(sync_world, "ann@example.com")["unsubscribed"] is True

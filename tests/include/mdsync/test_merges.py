"""Merges on either side (issue 10.1, 10.2; DESIGN §3) on hand-made frames, and the parts that carry them out.

Identity decides from frames alone: a Marketo merge's winner keeps or takes over the link, a Dataverse merge's
subordinate hands its person to the master (or the two persons are merged in Marketo), a lead qualified into an
existing contact merges its person into the contact's. Below that: telling merges from deletes in the extract,
the lookups merges need, baselines following the moved pair, the Marketo client's merge call and the state
store's memory of merged-away persons.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import pytest

from mdsync import extract, identity
from mdsync.config import load_config
from tests.include.mdsync.test_extract import FakeMarketo

CONFIG = load_config()
SINCE = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
PERSON_COLUMNS = ["id", "email", "dynamicsRecordId", "dynamicsRecordType", "syncToDynamics", "dynamicsSyncAs"]
RECORD_COLUMNS = {"lead": ["leadid", "emailaddress1", "mdsync_marketopersonid", "statecode", "merged",
                           "_masterid_value", "_parentcontactid_value"],
                  "contact": ["contactid", "emailaddress1", "mdsync_marketopersonid", "statecode", "merged",
                              "_masterid_value", "_originatingleadid_value"]}


# -- frame builders ------------------------------------------------------------------------------------

def persons(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=PERSON_COLUMNS).astype({"id": "int64"})


def records(entity: str, *rows: dict) -> pd.DataFrame:
    frame = pd.DataFrame([{"statecode": 0, "merged": False, **r} for r in rows], columns=RECORD_COLUMNS[entity])
    return frame.astype({CONFIG.entity(entity).id_column: object})


def links(*rows: tuple) -> pd.DataFrame:
    """``(person_id, dynamics_type, dynamics_id)`` rows -> the state store's links."""
    return pd.DataFrame({"dynamics_type": [r[1] for r in rows], "dynamics_id": [r[2] for r in rows],
                         "method": "email", "paused": False},
                        index=pd.Index([r[0] for r in rows], dtype="int64", name="person_id"))


def merges(*pairs: tuple[int, int]) -> pd.DataFrame:
    """``(loser, winner)`` pairs."""
    return pd.DataFrame({"loser_id": [p[0] for p in pairs], "winner_id": [p[1] for p in pairs]}, dtype="int64")


def decide(*, store=(), people=(), leads=(), contacts=(), merged=(), **kwargs) -> identity.IdentityDecisions:
    return identity.decide(CONFIG, links(*store) if store else identity.empty_links(), persons(*people),
                           {"lead": records("lead", *leads), "contact": records("contact", *contacts)},
                           merges=merges(*merged) if merged else None, **kwargs)


def link_map(d: identity.IdentityDecisions) -> dict[int, tuple[str, str, str]]:
    return {int(p): (r.dynamics_type, r.dynamics_id, r.method) for p, r in d.links.iterrows()}


def acts(d: identity.IdentityDecisions, action: str) -> list[dict]:
    return [r for r in d.activity.to_dict("records") if r["action"] == action]


def link_writes(d: identity.IdentityDecisions, people, leads=(), contacts=()) -> tuple[set, set]:
    m, w = identity.link_field_writes(CONFIG, d.links, persons(*people),
                                      {"lead": records("lead", *leads), "contact": records("contact", *contacts)})
    return (set(m.itertuples(index=False, name=None)),
            {(e, *r) for e, f in w.items() for r in f.itertuples(index=False, name=None)})


# -- merges in Marketo --------------------------------------------------------------------------------

def test_a_free_winner_takes_over_the_losers_link_on_both_sides():
    people = [{"id": 34, "email": "ann@x.com"}]
    contacts = [{"contactid": "C1", "emailaddress1": "ann@x.com", "mdsync_marketopersonid": "12"}]
    d = decide(store=[(12, "contact", "C1")], people=people, contacts=contacts, merged=[(12, 34)])
    assert link_map(d) == {34: ("contact", "C1", "marketo_merge")} and d.links.loc[34, "new"]
    assert d.unlinked == [12]
    assert d.moved.to_dict("records") == [{"from_person": 12, "to_person": 34}]  # the baselines follow
    [line] = acts(d, "merge")
    assert line["person_id"] == 34 and line["dynamics_id"] == "C1"
    assert line["detail"] == "merged in Marketo: person 12 into 34; link moved: the contact C1 now follows person 34"
    assert d.marketo_creates.empty and d.dynamics_creates.empty and d.marketo_merges.empty
    # both link fields name the new pair: the winner's Marketo fields, the contact's Marketo-id column
    marketo, dynamics = link_writes(d, people, contacts=contacts)
    assert marketo == {(34, "C1", "contact")} and dynamics == {("contact", "C1", 34)}


def test_a_linked_winner_keeps_its_record_and_the_losers_is_held():
    people = [{"id": 34, "email": "ann@x.com", "dynamicsRecordId": "C2", "dynamicsRecordType": "contact"}]
    leads = [{"leadid": "L1", "emailaddress1": "ann@x.com", "mdsync_marketopersonid": "12"}]
    d = decide(store=[(12, "lead", "L1"), (34, "contact", "C2")], people=people, leads=leads, merged=[(12, 34)])
    assert link_map(d) == {34: ("contact", "C2", "email")} and d.unlinked == [12]
    [line] = acts(d, "merge")
    assert line["detail"] == ("merged in Marketo: person 12 into 34; person 34 keeps its link to the contact C2; the "
                              "link of person 12 to the lead L1 is dropped (a Dynamics merge of those two records "
                              "may be wanted)")
    # the lead is neither linked by email to the winner nor used to create a person again
    assert d.marketo_creates.empty and not acts(d, "ambiguous") and d.moved.empty
    assert link_writes(d, people, leads=leads) == (set(), set())  # the loser's id is not written anywhere


def test_a_free_winner_of_two_linked_losers_takes_the_contact():
    d = decide(store=[(12, "lead", "L1"), (13, "contact", "C1")], people=[{"id": 34, "email": "ann@x.com"}],
               leads=[{"leadid": "L1"}], contacts=[{"contactid": "C1"}], merged=[(12, 34), (13, 34)])
    assert link_map(d) == {34: ("contact", "C1", "marketo_merge")} and d.unlinked == [12, 13]
    lines = {r["dynamics_id"]: r["detail"] for r in acts(d, "merge")}
    assert "link moved" in lines["C1"] and "keeps its link to the contact C1" in lines["L1"]


def test_merges_of_persons_without_links_decide_nothing():
    d = decide(store=[(34, "contact", "C2")], people=[{"id": 34, "email": "ann@x.com"}], merged=[(12, 34)])
    assert link_map(d) == {34: ("contact", "C2", "email")} and d.activity.empty and d.unlinked == []


def test_a_row_naming_a_merged_away_person_is_repointed_to_a_free_winner():
    people = [{"id": 34, "email": "ann@x.com"}]
    leads = [{"leadid": "L1", "emailaddress1": "other@x.com", "mdsync_marketopersonid": "12"}]
    d = decide(people=people, leads=leads, merged=[(12, 34)])  # a later cycle: 12 is remembered as merged away
    assert link_map(d) == {34: ("lead", "L1", "marketo_id_column")}
    [line] = acts(d, "merge")
    assert "names person 12, merged into 34 in Marketo: linked to 34" in line["detail"]
    assert d.marketo_creates.empty
    assert link_writes(d, people, leads=leads)[1] == {("lead", "L1", 34)}  # the column is rewritten to the winner


def test_a_row_naming_a_merged_away_person_whose_winner_is_linked_is_not_created_again():
    d = decide(store=[(34, "contact", "C2")], people=[{"id": 34, "email": "ann@x.com"}],
               leads=[{"leadid": "L1", "emailaddress1": "new@x.com", "mdsync_marketopersonid": "12"}],
               merged=[(12, 34)])
    assert link_map(d) == {34: ("contact", "C2", "email")}
    assert d.marketo_creates.empty  # no person is created for the lead again
    [line] = acts(d, "skip")
    assert line["dynamics_id"] == "L1" and "merged into 34 in Marketo, which follows another record" in line["detail"]


# -- merges in Dynamics ---------------------------------------------------------------------------------

def test_the_person_of_a_merged_subordinate_moves_to_a_master_without_one():
    contacts = [{"contactid": "S1", "emailaddress1": "ann@x.com", "mdsync_marketopersonid": "7", "statecode": 1,
                 "merged": True, "_masterid_value": "M1"},
                {"contactid": "M1", "emailaddress1": "ann.b@x.com"}]
    people = [{"id": 7, "email": "ann@x.com", "dynamicsRecordId": "S1", "dynamicsRecordType": "contact"}]
    d = decide(store=[(7, "contact", "S1")], people=people, contacts=contacts)
    assert link_map(d) == {7: ("contact", "M1", "dynamics_merge")} and d.unlinked == []
    [line] = acts(d, "merge")
    assert line["detail"] == "merged in Dynamics: contact S1 into M1; person 7 now follows M1"
    assert d.moved.to_dict("records") == [{"from_person": 7, "to_person": 7}]
    assert not acts(d, "skip") and d.paused.empty  # not "left the sync filter": the person followed the merge
    assert d.marketo_merges.empty and d.marketo_creates.empty
    assert link_writes(d, people, contacts=contacts) == ({(7, "M1", "contact")}, {("contact", "M1", 7)})


def test_a_master_with_its_own_person_merges_the_two_persons_in_marketo():
    contacts = [{"contactid": "S1", "emailaddress1": "ann@x.com", "mdsync_marketopersonid": "7", "statecode": 1,
                 "merged": True, "_masterid_value": "M1"},
                {"contactid": "M1", "emailaddress1": "ann.b@x.com", "mdsync_marketopersonid": "8"}]
    d = decide(store=[(7, "contact", "S1"), (8, "contact", "M1")], contacts=contacts,
               people=[{"id": 7, "email": "ann@x.com"}, {"id": 8, "email": "ann.b@x.com"}])
    assert link_map(d) == {8: ("contact", "M1", "email")} and d.unlinked == [7]
    assert d.marketo_merges[["winner_id", "loser_id", "entity_type", "dynamics_id"]].to_dict("records") == [
        {"winner_id": 8, "loser_id": 7, "entity_type": "contact", "dynamics_id": "M1"}]
    [line] = acts(d, "merge")
    assert line["person_id"] == 8
    assert line["detail"] == ("merged in Dynamics: contact S1 into M1; persons 7 and 8 merged in Marketo (8, who "
                              "follows M1, wins)")
    assert d.marketo_creates.empty and d.moved.empty


def test_a_merge_marketo_refused_is_asked_again_when_the_loser_and_the_master_are_read_again():
    # the link of 7 was dropped when its merge was decided; Marketo refused, so 7 still names the subordinate
    contacts = [{"contactid": "S1", "mdsync_marketopersonid": "7", "statecode": 1, "merged": True,
                 "_masterid_value": "M1"},
                {"contactid": "M1", "mdsync_marketopersonid": "8"}]
    people = [{"id": 7, "email": "ann@x.com", "dynamicsRecordId": "S1", "dynamicsRecordType": "contact"}]
    d = decide(store=[(8, "contact", "M1")], people=people, contacts=contacts)
    assert d.marketo_merges[["winner_id", "loser_id"]].to_dict("records") == [{"winner_id": 8, "loser_id": 7}]
    assert link_map(d) == {8: ("contact", "M1", "email")} and not acts(d, "link")


def test_a_master_merged_in_turn_is_followed_to_the_surviving_record():
    leads = [{"leadid": "S1", "mdsync_marketopersonid": "7", "statecode": 2, "merged": True, "_masterid_value": "S2"},
             {"leadid": "S2", "statecode": 2, "merged": True, "_masterid_value": "M1"},
             {"leadid": "M1", "emailaddress1": "ann@x.com"}]
    d = decide(store=[(7, "lead", "S1")], people=[{"id": 7, "email": "ann@x.com"}], leads=leads)
    assert link_map(d) == {7: ("lead", "M1", "dynamics_merge")}


def test_an_unlinked_merged_subordinate_is_neither_matched_nor_rebuilt():
    # a full reconcile long after the merge: the subordinate still carries its old person and email
    contacts = [{"contactid": "S1", "emailaddress1": "ann@x.com", "mdsync_marketopersonid": "7", "statecode": 1,
                 "merged": True, "_masterid_value": "M1"},
                {"contactid": "M1", "emailaddress1": "ann@x.com", "mdsync_marketopersonid": "7"}]
    d = decide(store=[(7, "contact", "M1")], people=[{"id": 7, "email": "ann@x.com"}], contacts=contacts)
    assert link_map(d) == {7: ("contact", "M1", "email")} and d.activity.empty and d.marketo_creates.empty


def test_a_master_that_was_not_read_leaves_the_link_and_says_so():
    contacts = [{"contactid": "S1", "mdsync_marketopersonid": "7", "statecode": 1, "merged": True,
                 "_masterid_value": "M9"}]
    d = decide(store=[(7, "contact", "S1")], people=[{"id": 7, "email": "ann@x.com"}], contacts=contacts)
    assert link_map(d) == {7: ("contact", "S1", "email")}
    assert any("could not be read; the link stays" in r["detail"] for r in acts(d, "skip"))


# -- leads qualified ------------------------------------------------------------------------------------

def test_a_lead_qualified_into_an_existing_contact_merges_the_persons_in_marketo():
    leads = [{"leadid": "L1", "emailaddress1": "ann@x.com", "statecode": 1, "_parentcontactid_value": "C1"}]
    contacts = [{"contactid": "C1", "emailaddress1": "ann@corp.com", "mdsync_marketopersonid": "8"}]
    d = decide(store=[(7, "lead", "L1"), (8, "contact", "C1")], leads=leads, contacts=contacts,
               people=[{"id": 7, "email": "ann@x.com"}, {"id": 8, "email": "ann@corp.com"}])
    assert link_map(d) == {8: ("contact", "C1", "email")} and d.unlinked == [7]
    assert d.marketo_merges[["winner_id", "loser_id"]].to_dict("records") == [{"winner_id": 8, "loser_id": 7}]
    [line] = acts(d, "merge")
    assert line["detail"].startswith("persons 7 and 8 merged in Marketo (lead qualified into an existing contact")


def test_a_lead_qualified_into_a_contact_without_a_person_hands_its_person_over():
    leads = [{"leadid": "L1", "emailaddress1": "ann@x.com", "statecode": 1, "_parentcontactid_value": "C1"}]
    made = [{"contactid": "C1", "emailaddress1": "ann@x.com", "_originatingleadid_value": "L1"}]
    d = decide(store=[(7, "lead", "L1")], leads=leads, contacts=made, people=[{"id": 7, "email": "ann@x.com"}])
    assert link_map(d) == {7: ("contact", "C1", "lead_qualified")}
    [line] = [r for r in acts(d, "link") if "was qualified" in r["detail"]]
    assert line["detail"] == "lead L1 was qualified: the person now follows the contact created from it"
    existing = [{"contactid": "C1", "emailaddress1": "someone@x.com"}]  # an existing contact with another email
    d = decide(store=[(7, "lead", "L1")], leads=leads, contacts=existing, people=[{"id": 7, "email": "ann@x.com"}])
    assert link_map(d) == {7: ("contact", "C1", "lead_qualified")} and d.marketo_merges.empty
    assert any("qualified into the existing contact C1: the person now follows it" in r["detail"] for r in acts(d, "link"))


# -- what merges need read, and baselines ----------------------------------------------------------------

def test_lookups_read_winners_instead_of_losers_and_the_records_links_move_to():
    store = links((12, "contact", "C1"), (7, "contact", "S1"))
    recs = {"lead": records("lead", {"leadid": "L5", "mdsync_marketopersonid": "13"}),
            "contact": records("contact", {"contactid": "S1", "statecode": 1, "merged": True, "_masterid_value": "M1"})}
    got = identity.plan_lookups(CONFIG, store, persons(), recs, merges=merges((12, 34), (13, 35)))
    assert got.marketo_ids == [7, 34, 35]  # winners (never the losers), the subordinate's person
    assert got.dynamics_ids == {"contact": ["C1", "M1"]}  # the loser's record, the master


def test_the_plan_compares_a_moved_pair_against_the_losers_baselines():
    base = pd.DataFrame({"jobtitle": ["Old"]}, index=pd.Index([5], dtype="int64", name="person_id"))
    loser = pd.DataFrame({"jobtitle": ["Loser's"]}, index=pd.Index([12], dtype="int64", name="person_id"))
    moved = pd.DataFrame({"from_person": [12, 7], "to_person": [34, 7]})
    asked = []
    got = identity.carry_baselines(base, moved, lambda ids: asked.append(ids) or loser)
    assert asked == [[12]]  # a person handed a record keeps its own baselines: nothing to read for 7
    assert got["jobtitle"].to_dict() == {5: "Old", 34: "Loser's"}


# -- the extract tells merges from deletes ------------------------------------------------------------------

def test_merged_away_persons_are_not_deleted_and_their_winners_are_read():
    client = FakeMarketo({1: SINCE, 2: SINCE, 3: SINCE, 5: SINCE}, deleted=[4, 6], merges=[(1, 2), (1, 3), (6, 7)])
    got = extract.extract_marketo(client, CONFIG, since=SINCE)
    assert got.deleted == [4, 6, 7]  # 7 was merged into 6, deleted since: gone with it
    assert got.merges.to_dict("records") == [{"loser_id": 2, "winner_id": 1}, {"loser_id": 3, "winner_id": 1}]
    read = [c for c in client.calls if c[0] == "get_leads"]
    assert [c[2] for c in read] == [[1]]  # the winner, in full; never a loser
    assert got.persons["id"].tolist() == [1]
    assert client.names()[:2] == ["get_paging_token", "get_merges_and_deletions"]


def test_chains_of_merges_end_at_the_surviving_person():
    chain = pd.DataFrame({"loser_id": [12, 34, 50], "winner_id": [34, 56, 12]})
    assert extract.final_winners(chain).set_index("loser_id")["winner_id"].to_dict() == {12: 56, 34: 56, 50: 56}


def test_the_merge_ids_attribute_is_read_as_marketo_writes_it():
    from mdsync.marketo.activities import merge_ids

    assert merge_ids("[12,34]") == [12, 34] and merge_ids("[12]") == [12] and merge_ids("12, 34") == [12, 34]
    assert merge_ids(None) == [] and merge_ids("[]") == []


# -- the load stage merges persons in Marketo ---------------------------------------------------------------

@pytest.mark.integration
def test_a_refused_merge_is_a_record_level_error_and_the_others_go_through(marketo, marketo_client):
    from mdsync.load import MERGE_PERSONS, merge_in_marketo

    a, b, c = marketo.seed_leads([{"email": f"r{i}@example.com"} for i in range(3)])
    plan = pd.DataFrame({"winner_id": [a, a], "loser_id": [b, 424242], "entity_type": "contact",
                         "dynamics_id": ["C1", "C2"], "detail": "merged in Dynamics"})
    dry = merge_in_marketo(plan, marketo_client, dry_run=True)
    assert dry.done == 0 and dry.activity.empty and len(marketo_client.get_leads("id", [a, b, c], ["id"])) == 3
    out = merge_in_marketo(plan, marketo_client)
    assert out.done == 1 and out.results["ok"].tolist() == [True, False]
    [line] = out.activity.to_dict("records")
    assert (line["action"], line["person_id"], line["dynamics_id"]) == ("error", a, "C2")
    assert line["detail"].startswith(f"Marketo refused to merge person 424242 into {a}: 1004 ")
    [error] = out.errors.to_dict("records")
    assert (error["person_id"], error["field"], error["value"], error["code"]) == (424242, MERGE_PERSONS, str(a), "1004")
    assert marketo_client.get_leads("id", [a, b, c], ["id"])["id"].tolist() == [a, c]  # b merged into a


# -- the state store remembers merged-away persons ---------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    from mdsync.state import open_store

    return open_store(f"sqlite:///{tmp_path / 'state.sqlite'}")


def test_the_store_remembers_merges_and_carries_baselines(store):
    from mdsync.commit import carried_baselines

    assert store.save_merges(merges((12, 34), (13, 34)), "run-1") == 2
    store.save_merges(merges((13, 56)), "run-2")  # seen again with another winner: refreshed
    assert store.load_merges([12, 13, 99]).set_index("loser_id")["winner_id"].to_dict() == {12: 34, 13: 56}
    store.save_baselines(pd.DataFrame({"person_id": [12, 12], "field": ["jobtitle", "city"], "value": ["A", None]}),
                         "run-1")
    with store.transaction() as tx:
        carried = carried_baselines(store, pd.DataFrame({"from_person": [12], "to_person": [34]}), tx)
    assert sorted(carried.itertuples(index=False, name=None), key=str) == [(34, "city", None), (34, "jobtitle", "A")]

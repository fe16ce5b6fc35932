"""Every rule of the identity stage (DESIGN §3), on hand-made frames: no service is called."""

from __future__ import annotations

import pandas as pd
import pytest

from mdsync import identity
from mdsync.config import load_config

CONFIG = load_config()
DEFAULT_TYPE = CONFIG.marketo.sync_marker.default_type
PERSON_COLUMNS = ["id", "email", "dynamicsRecordId", "dynamicsRecordType", "syncToDynamics", "dynamicsSyncAs"]
RECORD_COLUMNS = {"lead": ["leadid", "emailaddress1", "mdsync_marketopersonid", "statecode"],
                  "contact": ["contactid", "emailaddress1", "mdsync_marketopersonid", "statecode"]}


# -- frame builders ------------------------------------------------------------------------------------

def persons(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=PERSON_COLUMNS).astype({"id": "int64"})


def records(entity: str, *rows: dict) -> pd.DataFrame:
    idc = CONFIG.entity(entity).id_column
    frame = pd.DataFrame([{"statecode": 0, **r} for r in rows], columns=RECORD_COLUMNS[entity])
    return frame.astype({idc: object})


def lead(lid: str, email: str | None = None, **extra) -> dict:
    return {"leadid": lid, "emailaddress1": email, **extra}


def contact(cid: str, email: str | None = None, **extra) -> dict:
    return {"contactid": cid, "emailaddress1": email, **extra}


def links(*rows: tuple) -> pd.DataFrame:
    """``(person_id, dynamics_type, dynamics_id[, method])`` rows -> the state store's links."""
    if not rows:
        return identity.empty_links().drop(columns="new")
    full = [(r + ("email",))[:4] for r in rows]
    return pd.DataFrame({"dynamics_type": [r[1] for r in full], "dynamics_id": [r[2] for r in full],
                         "method": [r[3] for r in full]},
                        index=pd.Index([r[0] for r in full], dtype="int64", name="person_id"))


def decide(*, store=(), people=(), leads=(), contacts=(), **kwargs) -> identity.IdentityDecisions:
    return identity.decide(CONFIG, links(*store), persons(*people),
                           {"lead": records("lead", *leads), "contact": records("contact", *contacts)}, **kwargs)


def link_map(d: identity.IdentityDecisions) -> dict[int, tuple[str, str, str]]:
    return {int(p): (r.dynamics_type, r.dynamics_id, r.method) for p, r in d.links.iterrows()}


def acts(d: identity.IdentityDecisions, action: str | None = None) -> list[dict]:
    rows = d.activity.to_dict("records")
    return [r for r in rows if action is None or r["action"] == action]


def creates(frame: pd.DataFrame, *columns: str) -> set[tuple]:
    return set(frame[list(columns)].itertuples(index=False, name=None))


# -- links kept and dropped ----------------------------------------------------------------------------

def test_existing_links_are_kept_and_not_new():
    d = decide(store=[(1, "lead", "L1"), (2, "contact", "C2")],
               people=[{"id": 1, "email": "ann@x.com"}, {"id": 2, "email": "bob@x.com"}],
               leads=[lead("L1", "ann@x.com", mdsync_marketopersonid="1")],
               contacts=[contact("C2", "bob@x.com", mdsync_marketopersonid="2")])
    assert link_map(d) == {1: ("lead", "L1", "email"), 2: ("contact", "C2", "email")}
    assert not d.links["new"].any() and d.new_links.empty
    assert d.unlinked == [] and d.activity.empty
    assert d.marketo_creates.empty and d.dynamics_creates.empty


def test_kept_links_need_neither_side_in_the_frames():
    # an idle cycle reads nothing: the state store's links stand on their own
    d = decide(store=[(1, "lead", "L1"), (2, "contact", "C2")])
    assert set(link_map(d)) == {1, 2} and d.activity.empty


def test_person_deleted_in_marketo_drops_the_link_and_flags_the_record():
    # the shipped delete policy is the native sync's: the other side is kept and flagged
    d = decide(store=[(1, "lead", "L1"), (2, "lead", "L2")], people=[{"id": 2, "email": "bob@x.com"}],
               marketo_deleted=[1, 99])
    assert d.unlinked == [1]
    assert link_map(d) == {2: ("lead", "L2", "email")}
    [row] = acts(d)
    assert (row["action"], row["person_id"], row["entity_type"], row["dynamics_id"]) == ("flag", 1, "lead", "L1")
    assert "deleted in Marketo" in row["detail"] and "kept and flagged (mdsync_deletedinmarketo = true)" in row["detail"]
    assert d.deletes.to_dict("records") == [{"target": "dynamics", "action": "flag", "person_id": 1,
                                             "entity_type": "lead", "dynamics_id": "L1"}]


def test_record_deleted_in_dynamics_drops_the_link_case_insensitively():
    d = decide(store=[(1, "contact", "aaaa-bbbb"), (2, "lead", "aaaa-bbbb")],
               dynamics_deleted={"contact": ["AAAA-BBBB"]})
    assert d.unlinked == [1]
    assert link_map(d) == {2: ("lead", "aaaa-bbbb", "email")}  # same id, other entity type: untouched
    [row] = acts(d)
    assert (row["action"], row["person_id"], row["dynamics_type"]) == ("flag", 1, "contact")
    assert "contact deleted in Dynamics" in row["detail"] and "deletedInDynamics = true" in row["detail"]
    assert d.deletes[["target", "person_id"]].to_dict("records") == [{"target": "marketo", "person_id": 1}]


def test_deleted_on_both_sides_is_one_unlink():
    d = decide(store=[(1, "lead", "L1")], marketo_deleted=[1], dynamics_deleted={"lead": ["L1"]})
    assert d.unlinked == [1] and d.links.empty
    assert [r["action"] for r in acts(d)] == ["unlink"]


# -- links rebuilt from the link fields ---------------------------------------------------------------

def test_link_rebuilt_from_the_dataverse_marketo_id_column():
    d = decide(people=[{"id": 7, "email": "other@x.com"}],
               leads=[lead("L1", "ann@x.com", mdsync_marketopersonid=" 7 ")])
    assert link_map(d) == {7: ("lead", "L1", "marketo_id_column")}
    assert d.links.loc[7, "new"]
    assert d.marketo_creates.empty  # linked by the column, not matched by email nor created
    [row] = acts(d, "link")
    assert row["person_id"] == 7 and row["detail"] == "linked (marketo id column)"


def test_link_rebuilt_from_the_marketo_link_fields():
    d = decide(people=[{"id": 3, "email": "ann@x.com", "dynamicsRecordId": "C1", "dynamicsRecordType": " Contact "}],
               contacts=[contact("C1", "someone-else@x.com")])
    assert link_map(d) == {3: ("contact", "C1", "dynamics_id_field")}
    assert d.marketo_creates.empty and d.dynamics_creates.empty


@pytest.mark.parametrize("value", ["abc", "7.5", "-", "1e400x"])
def test_invalid_marketo_id_column_is_an_error_row_not_a_crash(value):
    d = decide(people=[{"id": 7, "email": "p@x.com"}], leads=[lead("L1", None, mdsync_marketopersonid=value)])
    assert d.links.empty
    [error] = acts(d, "error")
    assert (error["entity_type"], error["dynamics_id"]) == ("lead", "L1")
    assert repr(value) in error["detail"] and "not a Marketo person id" in error["detail"]


@pytest.mark.parametrize("kind", ["account", "", None, "leads"])
def test_invalid_marketo_link_type_is_an_error_row_not_a_crash(kind):
    d = decide(people=[{"id": 3, "email": None, "dynamicsRecordId": "L1", "dynamicsRecordType": kind}],
               leads=[lead("L1", None)])
    assert d.links.empty
    [error] = acts(d, "error")
    assert error["person_id"] == 3 and "expected lead or contact" in error["detail"]


def test_marketo_id_column_naming_an_already_linked_person_is_ambiguous():
    d = decide(store=[(1, "lead", "L1")], people=[{"id": 1, "email": "ann@x.com"}],
               leads=[lead("L1", "ann@x.com", mdsync_marketopersonid="1"), lead("L2", None, mdsync_marketopersonid="1")])
    assert link_map(d) == {1: ("lead", "L1", "email")}
    [row] = acts(d, "ambiguous")
    assert (row["person_id"], row["dynamics_id"]) == (1, "L2") and "already linked" in row["detail"]


def test_an_ambiguous_link_column_means_nothing_is_done_for_that_record():
    # "nothing done" holds: the record is neither linked by email to another person nor created
    d = decide(store=[(1, "lead", "L1")], people=[{"id": 1, "email": "ann@x.com"}, {"id": 2, "email": "zed@x.com"}],
               leads=[lead("L1", "ann@x.com", mdsync_marketopersonid="1"),
                      lead("L2", "zed@x.com", mdsync_marketopersonid="1"),
                      lead("L3", "new@x.com", mdsync_marketopersonid="1")])
    assert link_map(d) == {1: ("lead", "L1", "email")}
    assert d.marketo_creates.empty
    assert sorted(r["dynamics_id"] for r in acts(d, "ambiguous")) == ["L2", "L3"]


def test_an_ambiguous_marketo_link_field_means_nothing_is_done_for_that_person():
    d = decide(store=[(1, "contact", "C1")],
               people=[{"id": 1, "email": "a@x.com"},
                       {"id": 2, "email": "b@x.com", "dynamicsRecordId": "C1", "dynamicsRecordType": "contact",
                        "syncToDynamics": True}],
               contacts=[contact("C1", "a@x.com"), contact("C2", "b@x.com", statecode=1)])
    assert link_map(d) == {1: ("contact", "C1", "email")}
    assert d.dynamics_creates.empty  # not created in Dynamics, nor linked to C2 by its email


def test_two_records_naming_one_person_are_ambiguous_whatever_their_order():
    for order in (1, -1):
        d = decide(people=[{"id": 1, "email": "p@x.com"}],
                   leads=[lead("L1", None, mdsync_marketopersonid="1"), lead("L2", None, mdsync_marketopersonid="1")][::order])
        assert d.links.empty
        assert sorted(r["dynamics_id"] for r in acts(d, "ambiguous")) == ["L1", "L2"]


def test_two_persons_naming_one_record_are_ambiguous_whatever_their_order():
    # a stale link field on one of them must not decide, by row order, which of them gets a Dynamics record
    people = [{"id": 3, "email": "a@x.com", "dynamicsRecordId": "L404", "dynamicsRecordType": "lead", "syncToDynamics": True},
              {"id": 4, "email": "b@x.com", "dynamicsRecordId": "L404", "dynamicsRecordType": "lead"}]
    outcomes = []
    for order in (1, -1):
        d = decide(people=people[::order])
        assert d.links.empty
        assert sorted(r["person_id"] for r in acts(d, "ambiguous")) == [3, 4]
        outcomes.append(creates(d.dynamics_creates, "person_id", "entity_type"))
    assert outcomes[0] == outcomes[1]


def test_two_marked_persons_with_the_email_of_one_existing_record_are_ambiguous():
    people = [{"id": 3, "email": "ann@x.com", "syncToDynamics": True}, {"id": 4, "email": "Ann@x.com", "syncToDynamics": True}]
    for order in (1, -1):
        d = decide(people=people[::order], contacts=[contact("C1", "ann@x.com")])
        assert d.links.empty and d.dynamics_creates.empty and d.marketo_creates.empty
        assert sorted(r["person_id"] for r in acts(d, "ambiguous") if r["person_id"] is not None) == [3, 4]


def test_marked_persons_whose_email_has_a_record_outside_the_sync_filter_get_nothing():
    # an inactive contact (statecode 1, outside the shipped filter) is neither linked nor duplicated
    people = [{"id": 3, "email": "ann@x.com", "syncToDynamics": True}, {"id": 4, "email": "Ann@x.com", "syncToDynamics": True}]
    for order in (1, -1):
        d = decide(people=people[::order], contacts=[contact("C1", "ann@x.com", statecode=1)])
        assert d.links.empty and d.dynamics_creates.empty and d.marketo_creates.empty
        skips = acts(d, "skip")
        assert sorted(r["person_id"] for r in skips) == [3, 4]
        assert all(r["dynamics_id"] == "C1" and "outside the sync filter" in r["detail"] for r in skips)


def test_marketo_link_field_naming_a_record_linked_elsewhere_is_ambiguous():
    d = decide(store=[(1, "contact", "C1")],
               people=[{"id": 1, "email": "a@x.com"},
                       {"id": 2, "email": "b@x.com", "dynamicsRecordId": "c1", "dynamicsRecordType": "contact"}],
               contacts=[contact("C1", "a@x.com")])
    assert link_map(d) == {1: ("contact", "C1", "email")}
    [row] = acts(d, "ambiguous")
    assert row["person_id"] == 2 and "linked to another person" in row["detail"]


# -- unlinked Dynamics records: email match or create -------------------------------------------------

def test_unlinked_record_links_by_email_case_insensitively():
    d = decide(people=[{"id": 5, "email": " Ann@Example.COM "}, {"id": 6, "email": "bob@example.com"}],
               leads=[lead("L1", "ann@example.com")])
    assert link_map(d) == {5: ("lead", "L1", "email")}
    assert d.marketo_creates.empty


def test_two_persons_with_the_email_is_ambiguous_and_nothing_is_linked():
    d = decide(people=[{"id": 5, "email": "ann@x.com"}, {"id": 6, "email": "ANN@x.com"}],
               leads=[lead("L1", "ann@x.com")])
    assert d.links.empty and d.marketo_creates.empty
    [row] = acts(d, "ambiguous")
    assert row["dynamics_id"] == "L1" and "2 Marketo persons" in row["detail"] and "5, 6" in row["detail"]


def test_contact_wins_over_a_lead_with_the_same_email():
    d = decide(people=[{"id": 5, "email": "ann@x.com"}],
               leads=[lead("L1", "Ann@x.com")], contacts=[contact("C1", "ann@x.com")])
    assert link_map(d) == {5: ("contact", "C1", "email")}
    assert d.marketo_creates.empty  # the lead does not become a second person
    [skip] = acts(d, "skip")
    assert (skip["entity_type"], skip["dynamics_id"]) == ("lead", "L1")
    assert "contact C1" in skip["detail"]


def test_contact_wins_over_a_lead_when_the_person_is_created():
    d = decide(leads=[lead("L1", "new@x.com")], contacts=[contact("C1", "NEW@x.com")])
    assert creates(d.marketo_creates, "entity_type", "dynamics_id") == {("contact", "C1")}
    assert [r["dynamics_id"] for r in acts(d, "skip")] == ["L1"]


@pytest.mark.parametrize("entity", ["contact", "lead"])
def test_two_unlinked_records_of_a_type_with_one_email_are_ambiguous(entity):
    rows = [{"lead": lead, "contact": contact}[entity](i, "same@x.com") for i in ("X1", "X2")]
    d = decide(people=[{"id": 5, "email": "same@x.com"}], **{f"{entity}s": rows})
    assert d.links.empty and d.marketo_creates.empty
    assert sorted(r["dynamics_id"] for r in acts(d, "ambiguous")) == ["X1", "X2"]


def test_unlinked_record_without_email_is_skipped():
    d = decide(leads=[lead("L1", None), lead("L2", "  ")])
    assert d.links.empty and d.marketo_creates.empty
    assert sorted(r["dynamics_id"] for r in acts(d, "skip")) == ["L1", "L2"]
    assert all("no email" in r["detail"] for r in acts(d, "skip"))


def test_unmatched_records_want_a_marketo_person():
    d = decide(people=[{"id": 5, "email": "ann@x.com"}],
               leads=[lead("L1", "ann@x.com"), lead("L2", " new@x.com ")], contacts=[contact("C9", "c9@x.com")])
    assert link_map(d) == {5: ("lead", "L1", "email")}
    assert list(d.marketo_creates.columns) == identity.MARKETO_CREATE_COLUMNS
    assert creates(d.marketo_creates, "entity_type", "dynamics_id", "email") == {
        ("lead", "L2", "new@x.com"), ("contact", "C9", "c9@x.com")}


def test_inactive_unlinked_records_are_neither_matched_nor_created():
    d = decide(people=[{"id": 5, "email": "ann@x.com"}],
               leads=[lead("L1", "ann@x.com", statecode=1), lead("L2", "new@x.com", statecode=2)])
    assert d.links.empty and d.marketo_creates.empty


def test_person_already_linked_elsewhere_is_not_taken_by_email():
    d = decide(store=[(5, "lead", "L1")], people=[{"id": 5, "email": "ann@x.com"}],
               leads=[lead("L1", "ann@x.com", statecode=0)], contacts=[contact("C1", "ann@x.com")])
    assert link_map(d) == {5: ("lead", "L1", "email")}
    [row] = acts(d, "ambiguous")
    assert row["dynamics_id"] == "C1" and "already linked" in row["detail"]
    assert d.marketo_creates.empty


def test_contact_of_a_qualified_lead_takes_the_person_over():
    d = decide(store=[(5, "lead", "L1")], people=[{"id": 5, "email": "ann@x.com"}],
               leads=[lead("L1", "ann@x.com", statecode=1, mdsync_marketopersonid="5")],
               contacts=[contact("C1", "Ann@x.com")])
    assert link_map(d) == {5: ("contact", "C1", "lead_qualified")}
    assert d.links.loc[5, "new"] and d.unlinked == []
    details = [r["detail"] for r in acts(d, "link") if r["dynamics_id"] == "C1"]
    assert any("lead L1 was qualified" in t for t in details)
    assert d.marketo_creates.empty


# -- Marketo persons marked for sync ------------------------------------------------------------------

@pytest.mark.parametrize("sync_as, expected", [
    ("contact", "contact"), ("lead", "lead"), (" Contact ", "contact"), ("", DEFAULT_TYPE), (None, DEFAULT_TYPE),
    (pd.NA, DEFAULT_TYPE), (float("nan"), DEFAULT_TYPE), ("garbage", DEFAULT_TYPE),
])
def test_marked_person_is_created_as_asked_or_as_the_default(sync_as, expected):
    d = decide(people=[{"id": 5, "email": "ann@x.com", "syncToDynamics": True, "dynamicsSyncAs": sync_as}])
    assert list(d.dynamics_creates.columns) == identity.DYNAMICS_CREATE_COLUMNS
    assert creates(d.dynamics_creates, "person_id", "entity_type", "email") == {(5, expected, "ann@x.com")}
    assert d.links.empty and d.activity.empty


@pytest.mark.parametrize("marker, pushed", [
    (True, True), ("true", True), ("TRUE", True), ("1", True), (1, True), ("yes", True),
    (False, False), ("false", False), (0, False), (None, False), ("", False),
])
def test_sync_marker_values(marker, pushed):
    d = decide(people=[{"id": 5, "email": "ann@x.com", "syncToDynamics": marker}])
    assert (not d.dynamics_creates.empty) is pushed


def test_unmarked_persons_are_left_alone():
    d = decide(people=[{"id": 5, "email": "ann@x.com"}, {"id": 6, "email": "bob@x.com", "syncToDynamics": False}])
    assert d.links.empty and d.dynamics_creates.empty and d.marketo_creates.empty and d.activity.empty


def test_marked_person_links_an_existing_contact_before_a_lead():
    # (records outside the sync filter are never linked: see test_marked_persons_whose_email_has_a_record_outside...)
    d = decide(people=[{"id": 5, "email": "ANN@x.com", "syncToDynamics": True, "dynamicsSyncAs": "lead"}],
               leads=[lead("L1", "ann@x.com")], contacts=[contact("C1", "ann@x.com")])
    assert link_map(d) == {5: ("contact", "C1", "email")}
    assert d.dynamics_creates.empty and d.marketo_creates.empty


def test_marked_person_links_an_existing_lead_when_there_is_no_contact():
    d = decide(people=[{"id": 5, "email": "ann@x.com", "syncToDynamics": True, "dynamicsSyncAs": "contact"}],
               leads=[lead("L1", "Ann@X.com")])
    assert link_map(d) == {5: ("lead", "L1", "email")}
    assert d.dynamics_creates.empty


def test_marked_person_with_two_existing_contacts_is_ambiguous():
    d = decide(people=[{"id": 5, "email": "ann@x.com", "syncToDynamics": True}],
               contacts=[contact("C1", "ann@x.com"), contact("C2", "ann@x.com")])
    assert d.links.empty and d.dynamics_creates.empty and d.marketo_creates.empty
    [row] = [r for r in acts(d, "ambiguous") if r["person_id"] is not None]
    assert row["person_id"] == 5 and "2 Dynamics contacts" in row["detail"]


def test_marked_person_without_email_is_skipped():
    d = decide(people=[{"id": 5, "email": None, "syncToDynamics": True}, {"id": 6, "email": " ", "syncToDynamics": True}])
    assert d.dynamics_creates.empty
    assert sorted(r["person_id"] for r in acts(d, "skip")) == [5, 6]


def test_linked_marked_person_is_not_created_again():
    d = decide(store=[(5, "lead", "L1")], people=[{"id": 5, "email": "ann@x.com", "syncToDynamics": True}])
    assert d.dynamics_creates.empty and link_map(d) == {5: ("lead", "L1", "email")}


@pytest.mark.parametrize("push_as, expected", [("contact", "contact"), ("lead", "lead"), (None, DEFAULT_TYPE)])
def test_push_ids_create_unmarked_persons_as_push_as(push_as, expected):
    d = decide(people=[{"id": 5, "email": "ann@x.com"}, {"id": 6, "email": "bob@x.com"},
                       {"id": 7, "email": "cy@x.com", "syncToDynamics": True, "dynamicsSyncAs": "contact"}],
               push_ids=[5, 7], push_as=push_as)
    got = dict(zip(d.dynamics_creates["person_id"], d.dynamics_creates["entity_type"]))
    # a manual run's type overrides the person's own dynamicsSyncAs
    assert got == {5: expected, 7: expected}


# -- stale link fields --------------------------------------------------------------------------------

def test_stale_marketo_link_field_is_not_linked():
    d = decide(people=[{"id": 5, "email": "ann@x.com", "dynamicsRecordId": "L404", "dynamicsRecordType": "lead",
                        "syncToDynamics": True}])
    assert d.links.empty and d.new_links.empty
    [skip] = acts(d, "skip")
    assert (skip["person_id"], skip["dynamics_id"]) == (5, "L404")
    assert "does not exist" in skip["detail"] and "Dynamics lead" in skip["detail"]
    assert acts(d, "link") == []


def test_stale_dataverse_link_column_is_not_linked_nor_created():
    d = decide(leads=[lead("L1", "ann@x.com", mdsync_marketopersonid="404")])
    assert d.links.empty and d.marketo_creates.empty
    [skip] = acts(d, "skip")
    assert (skip["person_id"], skip["dynamics_id"]) == (404, "L1") and "Marketo person" in skip["detail"]


def test_link_column_naming_a_person_deleted_this_window_is_not_linked():
    d = decide(leads=[lead("L1", None, mdsync_marketopersonid="5")], people=[{"id": 5, "email": "a@x.com"}],
               marketo_deleted=[5])
    assert d.links.empty


def test_link_field_naming_a_record_deleted_this_window_is_not_linked():
    d = decide(people=[{"id": 5, "email": None, "dynamicsRecordId": "C1", "dynamicsRecordType": "contact"}],
               contacts=[contact("C1", None)], dynamics_deleted={"contact": ["c1"]})
    assert d.links.empty


def test_the_record_kept_after_a_deletion_is_not_recreated_on_the_deleted_side():
    # DESIGN §3 / README: a deletion drops the link and keeps the other side's record. The kept record still
    # carries its link fields, so later cycles leave it unlinked; the deletion cycle must not re-create it.
    d = decide(store=[(1, "lead", "L1"), (2, "contact", "C2")],
               people=[{"id": 2, "email": "bob@x.com", "dynamicsRecordId": "C2", "dynamicsRecordType": "contact",
                        "syncToDynamics": True}],
               leads=[lead("L1", "ann@x.com", mdsync_marketopersonid="1")],
               marketo_deleted=[1], dynamics_deleted={"contact": ["C2"]})
    assert d.unlinked == [1, 2] and d.links.empty
    assert d.marketo_creates.empty, "the person deleted in Marketo would be created again"
    assert d.dynamics_creates.empty, "the contact deleted in Dynamics would be created again"
    again = identity.decide(CONFIG, d.links, persons({"id": 2, "email": "bob@x.com", "dynamicsRecordId": "C2",
                                                      "dynamicsRecordType": "contact", "syncToDynamics": True}),
                            {"lead": records("lead", lead("L1", "ann@x.com", mdsync_marketopersonid="1")),
                             "contact": records("contact")})
    assert again.links.empty and again.marketo_creates.empty and again.dynamics_creates.empty


def test_activity_rows_have_the_activity_columns():
    from mdsync.activity import COLUMNS

    d = decide(people=[{"id": 5, "email": "ann@x.com"}], leads=[lead("L1", "ann@x.com"), lead("L2", None)])
    assert list(d.activity.columns) == COLUMNS
    assert set(d.activity["action"]) == {"link", "skip"}


# -- plan_lookups -------------------------------------------------------------------------------------

def _lookups(people=(), leads=(), contacts=(), store=(), **kwargs) -> identity.Lookups:
    return identity.plan_lookups(CONFIG, links(*store), persons(*people),
                                 {"lead": records("lead", *leads), "contact": records("contact", *contacts)}, **kwargs)


INCOMPLETE = dict(
    store=[(1, "lead", "L1")],
    people=[{"id": 1, "email": "linked@x.com"},
            {"id": 2, "email": "Marked@X.com", "syncToDynamics": True},
            {"id": 3, "email": "unmarked@x.com"},
            {"id": 4, "email": "c@x.com", "dynamicsRecordId": "C5", "dynamicsRecordType": "contact"},
            {"id": 6, "email": "c6@x.com", "dynamicsRecordId": "C6", "dynamicsRecordType": "contact"}],
    leads=[lead("L1", "linked@x.com", mdsync_marketopersonid="1"),
           lead("L2", "New@X.com", mdsync_marketopersonid="9"),
           lead("L3", "inactive@x.com", statecode=1),
           lead("L4", "bad@x.com", mdsync_marketopersonid="abc")],
    contacts=[contact("C6", "c6@x.com")],
)


def test_plan_lookups_asks_for_what_incomplete_frames_miss():
    got = _lookups(**INCOMPLETE, push_ids=[3, 44])
    assert got.marketo_ids == [9, 44]  # named by a link column / by the manual run, not extracted
    # unlinked active records; the linked L1 and the inactive L3 need no lookup
    assert got.marketo_emails == ["bad@x.com", "c6@x.com", "new@x.com"]
    assert got.dynamics_emails == ["marked@x.com", "unmarked@x.com"]  # marked, or pushed by the manual run
    assert got.dynamics_ids == {"contact": ["C5"]}  # C6 was extracted
    assert not got.empty
    assert got.counts() == {"marketo_emails": 3, "marketo_ids": 2, "dynamics_emails": 2, "dynamics_ids": 1}


def test_plan_lookups_with_complete_marketo_asks_nothing_of_marketo():
    got = _lookups(**INCOMPLETE, push_ids=[3, 44], marketo_complete=True)
    assert got.marketo_emails == [] and got.marketo_ids == []
    assert got.dynamics_emails == ["marked@x.com", "unmarked@x.com"] and got.dynamics_ids == {"contact": ["C5"]}


def test_plan_lookups_with_complete_dynamics_asks_nothing_of_dynamics():
    got = _lookups(**INCOMPLETE, push_ids=[3, 44], dynamics_complete=True)
    assert got.dynamics_emails == [] and got.dynamics_ids == {}
    assert got.marketo_ids == [9, 44] and got.marketo_emails == ["bad@x.com", "c6@x.com", "new@x.com"]


def test_plan_lookups_with_both_complete_is_empty():
    assert _lookups(**INCOMPLETE, push_ids=[3], marketo_complete=True, dynamics_complete=True).empty


def test_plan_lookups_of_an_idle_cycle_is_empty():
    assert _lookups(store=[(1, "lead", "L1")]).empty


# -- link_field_writes --------------------------------------------------------------------------------

def test_link_field_writes_only_the_stale_ones():
    store = links((1, "lead", "L1"), (2, "contact", "C2"), (3, "lead", "L3"), (4, "lead", "L4"), (8, "contact", "C8"))
    people = persons(
        {"id": 1, "dynamicsRecordId": "l1", "dynamicsRecordType": "lead"},     # current (ids case-insensitive)
        {"id": 2},                                                            # never written
        {"id": 3, "dynamicsRecordId": "L3", "dynamicsRecordType": "contact"},  # wrong type
        {"id": 9, "dynamicsRecordId": "L9", "dynamicsRecordType": "lead"},     # not linked: left alone
    )  # person 4 and 8 were not read: nothing known, nothing written
    recs = {"lead": records("lead", lead("L1", mdsync_marketopersonid="1"), lead("L3", mdsync_marketopersonid=""),
                            lead("L4", mdsync_marketopersonid="44"), lead("L7", mdsync_marketopersonid="7")),
            "contact": records("contact", contact("C2", mdsync_marketopersonid="2"))}
    m_writes, d_writes = identity.link_field_writes(CONFIG, store, people, recs)
    assert set(m_writes.itertuples(index=False, name=None)) == {(2, "C2", "contact"), (3, "L3", "lead")}
    assert set(d_writes) == {"lead", "contact"}
    assert set(d_writes["lead"].itertuples(index=False, name=None)) == {("L3", 3), ("L4", 4)}
    assert d_writes["contact"].empty


def test_link_field_writes_of_a_settled_pair_are_empty():
    store = links((1, "lead", "L1"))
    m_writes, d_writes = identity.link_field_writes(
        CONFIG, store, persons({"id": 1, "dynamicsRecordId": "L1", "dynamicsRecordType": "lead"}),
        {"lead": records("lead", lead("L1", mdsync_marketopersonid="1")), "contact": records("contact")})
    assert m_writes.empty and all(w.empty for w in d_writes.values())

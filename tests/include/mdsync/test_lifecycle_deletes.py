"""Deletes by policy (issue 10.3) on hand-made frames: the config, what identity decides for each policy on each
side (flag, propagate and its "changed since" guard, unlink), that a survivor is never used to bring the deleted
record back unless the config (or a manual run) says so, and the state store's record of deletions. No service is
called; test_lifecycle_end_to_end.py runs the same cases against both sandboxes."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import yaml

from mdsync import identity
from mdsync.canonical import CANONICAL_DTYPE
from mdsync.config import DEFAULT_CONFIG_PATH, DeletePolicy, DynamicsDeleteAction, load_config, parse_config
from mdsync.errors import ConfigError

CONFIG = load_config()
RAW = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def config_with(raw_changes=None, **deletes):
    """The shipped config with ``entities.<type>.deletes`` replaced (``lead={"policy": "unlink"}``)."""
    raw = copy.deepcopy(RAW)
    for entity, settings in deletes.items():
        raw["entities"][entity]["deletes"] = settings
    if raw_changes:
        raw_changes(raw)
    return parse_config(raw, source="sync.yaml")


def persons(*rows: dict) -> pd.DataFrame:
    cols = ["id", "email", "firstName", "title", "dynamicsRecordId", "dynamicsRecordType", "syncToDynamics"]
    return pd.DataFrame(list(rows), columns=cols).astype({"id": "int64"})


def records(entity: str, *rows: dict) -> pd.DataFrame:
    idc = CONFIG.entity(entity).id_column
    cols = [idc, "emailaddress1", "firstname", "jobtitle", "mdsync_marketopersonid", "statecode"]
    return pd.DataFrame([{"statecode": 0, **r} for r in rows], columns=cols).astype({idc: object})


def links(*rows: tuple, paused=()) -> pd.DataFrame:
    return pd.DataFrame({"dynamics_type": [r[1] for r in rows], "dynamics_id": [r[2] for r in rows], "method": "email",
                         "paused": [r[0] in paused for r in rows]},
                        index=pd.Index([r[0] for r in rows], dtype="int64", name="person_id"))


def deletions(*rows: tuple) -> pd.DataFrame:
    """``(deleted_in, person_id, dynamics_type, dynamics_id)`` -> recorded deletions, as the state store returns them."""
    return pd.DataFrame([{"deleted_in": r[0], "person_id": r[1], "dynamics_type": r[2], "dynamics_id": r[3].lower(),
                          "policy": "flag", "action": "flag"} for r in rows]).astype({"person_id": "int64"})


def lines(d, action=None) -> list[dict]:
    return [r for r in d.activity.to_dict("records") if action is None or r["action"] == action]


# -- config -----------------------------------------------------------------------------------------------

def test_the_shipped_policy_is_the_native_syncs_flag():
    assert CONFIG.marketo.deleted_flag_field == "deletedInDynamics"
    assert CONFIG.dynamics.deleted_flag_column == "mdsync_deletedinmarketo"
    for entity in CONFIG.entities.values():
        assert entity.deletes.policy is DeletePolicy.FLAG
        assert entity.deletes.dynamics_action is DynamicsDeleteAction.DELETE and entity.deletes.recreate is False


def _error(**kw) -> str:
    with pytest.raises(ConfigError) as info:
        config_with(**kw)
    return str(info.value)


def test_flag_needs_both_flag_targets():
    def no_flags(raw):
        del raw["marketo"]["deleted_flag_field"]
        del raw["dynamics"]["deleted_flag_column"]
    msg = _error(raw_changes=no_flags)
    assert "entities.lead.deletes.policy is 'flag' (the default), which needs marketo.deleted_flag_field and " \
           "dynamics.deleted_flag_column" in msg and "or choose policy 'unlink' or 'propagate'" in msg
    # without flags, another policy is fine
    cfg = config_with(raw_changes=no_flags, lead={"policy": "unlink"}, contact={"policy": "propagate"})
    assert cfg.entity("contact").deletes.policy is DeletePolicy.PROPAGATE


@pytest.mark.parametrize("deletes, says", [
    ({"policy": "remove"}, "entities.lead.deletes.policy (lead): 'remove' is not one of 'flag', 'propagate' or 'unlink'"),
    ({"policy": "flag", "dynamics_action": "deactivate"}, "dynamics_action 'deactivate' applies to policy 'propagate' only"),
    ({"policy": "propagate", "dynamics_action": "archive"}, "entities.lead.deletes.dynamics_action (lead): 'archive' is not one of"),
    ({"policy": "unlink", "recreate": "sometimes"}, "entities.lead.deletes.recreate (lead): Input should be a valid boolean"),
    ({"policy": "unlink", "when": "always"}, "entities.lead.deletes.when (lead): is not a known setting (typo?)"),
])
def test_bad_delete_settings_name_the_entry(deletes, says):
    assert says in _error(lead=deletes)


def test_a_flag_target_cannot_be_a_synced_or_link_field():
    def flag_is_title(raw):
        raw["marketo"]["deleted_flag_field"] = "title"
    assert "Marketo field 'title' is reserved for marketo.deleted_flag_field" in _error(raw_changes=flag_is_title)

    def flag_is_link(raw):
        raw["dynamics"]["deleted_flag_column"] = "mdsync_marketopersonid"
    assert "dynamics.deleted_flag_column 'mdsync_marketopersonid' is the link column" in _error(raw_changes=flag_is_link)


# -- decisions per policy and side ----------------------------------------------------------------------------

PAIRS = [(1, "contact", "C1"), (2, "lead", "L2")]


@pytest.mark.parametrize("policy, action, verb, target_action", [
    ("flag", "flag", "kept and flagged (mdsync_deletedinmarketo = true)", "flag"),
    ("unlink", "unlink", "is kept (deletes: unlink)", None),
    ("propagate", "delete", "deleting the contact in Dynamics (deletes: propagate)", "delete"),
])
def test_person_deleted_in_marketo(policy, action, verb, target_action):
    cfg = config_with(contact={"policy": policy})
    d = identity.decide(cfg, links(*PAIRS), persons(), {}, marketo_deleted=[1])
    assert d.unlinked == [1] and list(d.links.index) == [2]
    [line] = lines(d)
    assert (line["action"], line["person_id"], line["dynamics_id"]) == (action, 1, "C1")
    assert line["detail"].startswith("person deleted in Marketo") and verb in line["detail"]
    expected = [] if target_action is None else [
        {"target": "dynamics", "action": target_action, "person_id": 1, "entity_type": "contact", "dynamics_id": "C1"}]
    assert d.deletes.to_dict("records") == expected
    # the pair is recorded whatever the policy, so the contact is never used to bring the person back
    assert d.deletions.to_dict("records") == [{"deleted_in": "marketo", "person_id": 1, "dynamics_type": "contact",
                                               "dynamics_id": "c1", "policy": policy, "action": action}]


@pytest.mark.parametrize("policy, action, verb, target_action", [
    ("flag", "flag", "kept and flagged (deletedInDynamics = true)", "flag"),
    ("unlink", "unlink", "is kept (deletes: unlink)", None),
    ("propagate", "delete", "deleting the Marketo person in Marketo (deletes: propagate)", "delete"),
])
def test_record_deleted_in_dynamics(policy, action, verb, target_action):
    cfg = config_with(lead={"policy": policy})
    d = identity.decide(cfg, links(*PAIRS), persons(), {}, dynamics_deleted={"lead": ["l2"]})
    assert d.unlinked == [2] and list(d.links.index) == [1]
    [line] = lines(d)
    assert (line["action"], line["person_id"], line["dynamics_id"]) == (action, 2, "L2")
    assert line["detail"].startswith("lead deleted in Dynamics") and verb in line["detail"]
    expected = [] if target_action is None else [
        {"target": "marketo", "action": target_action, "person_id": 2, "entity_type": "lead", "dynamics_id": "L2"}]
    assert d.deletes.to_dict("records") == expected
    assert d.deletions[["deleted_in", "person_id", "dynamics_id"]].to_dict("records") == [
        {"deleted_in": "dynamics", "person_id": 2, "dynamics_id": "l2"}]


def test_propagate_can_deactivate_instead_of_delete():
    cfg = config_with(contact={"policy": "propagate", "dynamics_action": "deactivate"},
                      lead={"policy": "propagate", "dynamics_action": "deactivate"})
    d = identity.decide(cfg, links(*PAIRS), persons(), {}, marketo_deleted=[1, 2])
    assert d.deletes[["action", "dynamics_id"]].to_dict("records") == [
        {"action": "deactivate", "dynamics_id": "C1"}, {"action": "deactivate", "dynamics_id": "L2"}]
    assert all("deactivating the" in r["detail"] and r["action"] == "delete" for r in lines(d))


def test_propagate_keeps_a_survivor_that_changed_on_its_own_side():
    cfg = config_with(contact={"policy": "propagate"}, lead={"policy": "propagate"})
    changed = identity.ChangedSince(marketo=pd.Index([2], dtype="int64"), dynamics=pd.Index([1], dtype="int64"))
    d = identity.decide(cfg, links(*PAIRS, (3, "contact", "C3")), persons(), {}, marketo_deleted=[1, 3],
                        dynamics_deleted={"lead": ["L2"]}, changed=changed)
    assert d.unlinked == [1, 2, 3]
    # only the unchanged contact C3 is deleted
    assert d.deletes[["target", "action", "dynamics_id"]].to_dict("records") == [
        {"target": "dynamics", "action": "delete", "dynamics_id": "C3"}]
    kept = {r["person_id"]: r["detail"] for r in lines(d, "skip")}
    assert "but the contact changed in Dynamics since the last sync: not deleted, kept unlinked" in kept[1]
    assert "but the Marketo person changed in Marketo since the last sync: not deleted" in kept[2]
    assert set(d.deletions["action"]) == {"kept", "delete"}


def test_a_pair_outside_the_sync_filter_is_only_unlinked():
    cfg = config_with(contact={"policy": "propagate"})
    d = identity.decide(cfg, links(*PAIRS, paused=[1]), persons(), {}, marketo_deleted=[1])
    [line] = lines(d)
    assert line["action"] == "unlink" and "outside the sync filter, so the delete policy is not applied" in line["detail"]
    assert d.deletes.empty and d.deletions["action"].tolist() == ["unlink"]


def test_deleted_on_both_sides_does_nothing_to_either_and_records_nothing():
    d = identity.decide(CONFIG, links(*PAIRS), persons(), {}, marketo_deleted=[1], dynamics_deleted={"contact": ["C1"]})
    [line] = lines(d)
    assert line["action"] == "unlink" and "deleted in Marketo and in Dynamics" in line["detail"]
    assert d.deletes.empty and d.deletions.empty


# -- the propagate guard: what "changed since the last sync" means ----------------------------------------------

def _access():
    from mdsync.access import refresh_access
    from tests.include.mdsync.test_access import dynamics_metadata, marketo_describe

    return refresh_access(CONFIG, marketo_describe(), dynamics_metadata())


def test_changed_since_compares_the_survivor_with_the_last_synced_values():
    store = links((1, "contact", "C1"), (2, "contact", "C2"), (3, "contact", "C3"), (4, "lead", "L4"))
    baseline = pd.DataFrame({"email": [None, "b@x.com", None, "d@x.com"], "first_name": ["Ann", "Bob", "Cy", "Dee"],
                             "job_title": ["CEO", "CTO", "CFO", "COO"]},
                            index=pd.Index([1, 2, 3, 4], dtype="int64", name="person_id")).astype(CANONICAL_DTYPE)
    people = persons({"id": 2, "email": "b@x.com", "firstName": "Bob", "title": "CTO"},    # read, same as synced
                     {"id": 4, "email": "d@x.com", "firstName": "Dee", "title": "Boss"})   # read, changed
    rows = {"contact": records("contact", {"contactid": "C1", "firstname": "Ann", "jobtitle": "Chief"},  # changed
                               {"contactid": "C3", "firstname": "Cy", "jobtitle": "CFO"})}               # our own echo
    changed = identity.changed_since(CONFIG, _access(), store, people, rows, baseline, [1, 2, 3, 4])
    assert list(changed.dynamics) == [1] and list(changed.marketo) == [4]
    assert identity.guard_ids(config_with(contact={"policy": "propagate"}), store, marketo_deleted=[1, 4],
                              dynamics_deleted={"contact": ["c2"]}).tolist() == [1, 2]


# -- survivors are not brought back -----------------------------------------------------------------------------

def test_the_record_of_a_deleted_person_is_not_used_to_create_it_again():
    # the contact still names its deleted person; its next edit finds no person by email
    rows = {"contact": records("contact", {"contactid": "C1", "emailaddress1": "ann@x.com", "mdsync_marketopersonid": "1"})}
    tomb = deletions(("marketo", 1, "contact", "C1"))
    d = identity.decide(CONFIG, links(), persons(), rows, deletions=tomb)
    assert d.links.empty and d.marketo_creates.empty
    [line] = lines(d)
    assert line["action"] == "skip" and line["dynamics_id"] == "c1"  # as recorded (Dataverse ids are lower-case)
    assert "its Marketo person 1 was deleted" in line["detail"] and "deletes.recreate is false" in line["detail"]
    # not linked to another person with its email either, and not said again on a full reconcile
    d = identity.decide(CONFIG, links(), persons({"id": 9, "email": "ann@x.com"}), rows, deletions=tomb, note_held=False)
    assert d.links.empty and d.marketo_creates.empty and d.activity.empty
    # unless the entity type's deletes.recreate says so: then the stale link column is ignored
    cfg = config_with(contact={"policy": "flag", "recreate": True})
    d = identity.decide(cfg, links(), persons(), rows, deletions=tomb)
    assert d.marketo_creates["dynamics_id"].tolist() == ["C1"] and d.links.empty


def test_the_person_of_a_deleted_record_is_not_pushed_again():
    people = persons({"id": 2, "email": "bob@x.com", "dynamicsRecordId": "L2", "dynamicsRecordType": "lead",
                      "syncToDynamics": True})
    tomb = deletions(("dynamics", 2, "lead", "L2"))
    d = identity.decide(CONFIG, links(), people, {}, deletions=tomb)
    assert d.dynamics_creates.empty and d.links.empty
    [line] = lines(d)
    assert "its Dynamics lead l2 was deleted" in line["detail"] and line["person_id"] == 2
    # a manual run that names the person pushes it (its stale link fields are ignored)
    d = identity.decide(CONFIG, links(), people, {}, deletions=tomb, push_ids=[2], push_as="contact")
    assert d.dynamics_creates[["person_id", "entity_type"]].to_dict("records") == [{"person_id": 2, "entity_type": "contact"}]
    # and so does deletes.recreate
    d = identity.decide(config_with(lead={"policy": "unlink", "recreate": True}), links(), people, {}, deletions=tomb)
    assert d.dynamics_creates["person_id"].tolist() == [2]


def test_a_survivor_linked_again_is_not_held():
    rows = {"contact": records("contact", {"contactid": "C1", "emailaddress1": "ann@x.com", "mdsync_marketopersonid": "9"})}
    d = identity.decide(CONFIG, links((9, "contact", "C1")), persons({"id": 9, "email": "ann@x.com"}), rows,
                        deletions=deletions(("marketo", 1, "contact", "C1")))
    assert d.links.index.tolist() == [9] and d.activity.empty


def test_a_marked_person_with_the_email_of_a_held_record_gets_no_duplicate():
    rows = {"contact": records("contact", {"contactid": "C1", "emailaddress1": "ann@x.com", "mdsync_marketopersonid": "1"})}
    d = identity.decide(CONFIG, links(), persons({"id": 5, "email": "Ann@x.com", "syncToDynamics": True}), rows,
                        deletions=deletions(("marketo", 1, "contact", "C1")))
    assert d.dynamics_creates.empty and d.links.empty
    assert any(r["person_id"] == 5 and "is held" in r["detail"] for r in lines(d, "skip"))


def test_a_deleted_id_that_a_link_field_names_is_not_looked_up():
    people = persons({"id": 3, "email": "a@x.com", "dynamicsRecordId": "L2", "dynamicsRecordType": "lead"},
                     {"id": 4, "email": "b@x.com", "dynamicsRecordId": "L4", "dynamicsRecordType": "lead"})
    rows = {"contact": records("contact", {"contactid": "C1", "mdsync_marketopersonid": "1"},
                               {"contactid": "C5", "mdsync_marketopersonid": "5"})}
    tombs = deletions(("marketo", 1, "contact", "C1"), ("dynamics", 3, "lead", "L2"))
    assert identity.plan_lookups(CONFIG, links(), people, rows).marketo_ids == [1, 5]
    lookups = identity.plan_lookups(CONFIG, links(), people, rows, deletions=tombs)
    assert lookups.marketo_ids == [5] and lookups.dynamics_ids == {"lead": ["L4"]}


def test_deletion_keys_name_the_records_read_and_those_their_link_fields_name():
    people = persons({"id": 3, "email": "a@x.com", "dynamicsRecordId": "AAAA", "dynamicsRecordType": "lead"})
    rows = {"contact": records("contact", {"contactid": "C1", "mdsync_marketopersonid": "7"},
                               {"contactid": "C2", "mdsync_marketopersonid": "x"})}
    pids, dids = identity.deletion_keys(CONFIG, people, rows, push_ids=[11])
    assert sorted(pids) == [3, 7, 11] and sorted(dids) == ["aaaa", "c1", "c2"]


# -- the state store's record of deletions and of paused links -----------------------------------------------------

def test_the_store_keeps_deletions_and_the_paused_state_of_links(tmp_path):
    from mdsync.state import open_store

    store = open_store(f"sqlite:///{tmp_path / 'state.sqlite'}")
    store.save_links(pd.DataFrame({"person_id": [1, 2], "dynamics_type": ["contact", "lead"], "dynamics_id": ["C1", "L2"],
                                   "method": "email", "paused": [False, True]}), "run-1")
    assert store.load_links()["paused"].to_dict() == {1: False, 2: True}
    store.set_paused(pd.DataFrame({"person_id": [1, 2], "paused": [True, False]}))
    assert store.load_links()["paused"].to_dict() == {1: True, 2: False}

    rows = pd.DataFrame([{"deleted_in": "marketo", "person_id": 1, "dynamics_type": "contact", "dynamics_id": "C1",
                          "policy": "flag", "action": "flag"}])
    assert store.save_deletions(rows, "run-2") == 1
    store.save_deletions(rows.assign(action="unlink"), "run-3")  # recorded again: refreshed, not duplicated
    found = store.load_deletions(person_ids=[1])
    assert found[store.DELETION_COLUMNS].to_dict("records") == [
        {"deleted_in": "marketo", "person_id": 1, "dynamics_type": "contact", "dynamics_id": "c1", "policy": "flag",
         "action": "unlink"}]
    assert len(store.load_deletions(dynamics_ids=["C1"])) == 1 and store.load_deletions(person_ids=[2]).empty

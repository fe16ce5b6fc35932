"""Deletes by policy and the sync filter (issue 10.3, 10.4) end to end, against both sandboxes.

One module-scoped world: every case's pair is seeded up front and linked by one first sync; then each phase sets
its config (delete policies per entity type), changes both sides through their real APIs, runs a cycle and reads
the end state back through both APIs and the state store:

1. contact ``flag`` / lead ``unlink``: a person or a record deleted on either side; their survivors edited next
   (and the persons marked for sync): nothing is created again. A contact deactivated meanwhile leaves the shipped
   filter (``statecode eq 0``): one line, nothing synced while out; reactivated, it is synced in full.
2. contact ``propagate`` (delete) / lead ``propagate`` (deactivate): the other side deleted or deactivated, except
   a survivor that changed on its own side in the same window; a dry run first shows it and does nothing.
3. contact ``flag`` with ``recreate: true``: the flagged contact's next edit creates a person again.

Inactive records seeded unlinked stay outside the shipped filter: not linked, no person created.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import yaml

from mdsync.config import DEFAULT_CONFIG_PATH
from tests.fixtures.module_world import ModuleWorld, module_world

pytestmark = pytest.mark.integration

FLAG_FIELD, FLAG_COLUMN = "deletedInDynamics", "mdsync_deletedinmarketo"
ENTITY_SET = {"contact": "contacts", "lead": "leads"}
#: case -> the entity type of its pair
PAIRS = {"flag-m": "contact", "flag-d": "contact", "unlink-m": "lead", "unlink-d": "lead", "filter": "contact",
         "prop-m": "contact", "prop-d": "contact", "prop-lead": "lead", "guard-m": "contact", "guard-d": "lead",
         "recreate": "contact"}


def email(case: str) -> str:
    return f"{case}@lifecycle.example.com"


def use_config(world: ModuleWorld, name: str, **deletes) -> None:
    """Point the sync at the shipped config with ``entities.<type>.deletes`` set (``contact={"policy": ...}``)."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    for entity, settings in deletes.items():
        raw["entities"][entity]["deletes"] = settings
    path = world.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(raw), sort_keys=False))
    world.mp.setenv("MDSYNC_CONFIG", str(path))


def persons(world: ModuleWorld, case: str) -> pd.DataFrame:
    return world.persons(email(case), fields=["id", "email", "title", "city", "dynamicsRecordId", FLAG_FIELD])


def rows(world: ModuleWorld, case: str, entity: str | None = None) -> pd.DataFrame:
    from mdsync.dynamics import eq

    es = ENTITY_SET[entity or PAIRS[case]]
    return world.dynamics().query(es, [es[:-1] + "id", "emailaddress1", "jobtitle", "address1_city", "statecode",
                                       "statuscode", "mdsync_marketopersonid", FLAG_COLUMN],
                                  filter=eq("emailaddress1", email(case)))


def nothing_new(world: ModuleWorld, case: str, *, persons_left: int, rows_left: int) -> None:
    """No person and no record (of either entity type) with the case's email beyond what is expected."""
    assert len(persons(world, case)) == persons_left, persons(world, case)
    found = sum(len(rows(world, case, e)) for e in ENTITY_SET)
    assert found == rows_left, f"{case}: {found} Dynamics rows"


def lines(world: ModuleWorld, run_id: str, **match) -> pd.DataFrame:
    act = world.activity(run_id=run_id)
    for column, value in match.items():
        act = act[act[column].astype(str).str.lower() == str(value).lower()]
    return act


@pytest.fixture(scope="module")
def world(marketo_sandbox, dataverse_sandbox, tmp_path_factory):
    yield from module_world(marketo_sandbox, dataverse_sandbox, tmp_path_factory, "lifecycle")


@pytest.fixture(scope="module")
def linked(world: ModuleWorld) -> dict:
    """Every case's pair linked by a first sync; inactive records seeded alongside (they stay unlinked)."""
    use_config(world, "shipped")
    ids: dict[str, dict] = {}
    for entity in ENTITY_SET:
        cases = [c for c, e in PAIRS.items() if e == entity]
        rids = world.dataverse_sandbox.seed(ENTITY_SET[entity], [
            {"emailaddress1": email(c), "firstname": c, "lastname": "Pair", "jobtitle": "Old"} for c in cases])
        for c, rid in zip(cases, rids):
            ids[c] = {"rid": rid}
    pids = world.marketo_sandbox.seed_leads([{"email": email(c), "firstName": c, "lastName": "Pair", "title": "Old"}
                                             for c in PAIRS])
    for c, pid in zip(PAIRS, pids):
        ids[c]["pid"] = pid
    # outside the shipped filter: an inactive contact alone, an inactive lead with an existing person's email
    world.dataverse_sandbox.seed("contacts", [{"emailaddress1": email("inactive-c"), "lastname": "Gone",
                                               "statecode": 1, "statuscode": 2}])
    world.dataverse_sandbox.seed("leads", [{"emailaddress1": email("inactive-l"), "lastname": "Lost",
                                            "statecode": 2, "statuscode": 4}])
    ids["inactive-l"] = {"pid": world.marketo_sandbox.seed_leads([{"email": email("inactive-l"), "lastName": "Lost"}])[0]}
    report = world.run("first")
    assert report["new_links"] == len(PAIRS)
    return ids


def test_inactive_records_are_outside_the_shipped_filter(world, linked):
    assert persons(world, "inactive-c").empty  # no person created for the inactive contact
    person = persons(world, "inactive-l").iloc[0]
    assert pd.isna(person["dynamicsRecordId"]) and int(person["id"]) not in world.store().load_links().index
    assert rows(world, "inactive-l", "lead")["mdsync_marketopersonid"].isna().all()


@pytest.fixture(scope="module")
def phase1(world: ModuleWorld, linked) -> dict:
    """Contact ``flag`` / lead ``unlink``: one delete per side each; a contact leaves the filter."""
    use_config(world, "flag-unlink", contact={"policy": "flag"}, lead={"policy": "unlink"})
    m = world.marketo()
    assert m.delete_leads([linked["flag-m"]["pid"], linked["unlink-m"]["pid"]])["status"].tolist() == ["deleted"] * 2
    world.dynamics().request("DELETE", f"contacts({linked['flag-d']['rid']})")
    world.dynamics().request("DELETE", f"leads({linked['unlink-d']['rid']})")
    world.set_row("contacts", linked["filter"]["rid"], statecode=1, statuscode=2)
    deleted = world.run("p1-delete")
    # the survivors are edited (the persons marked for sync), and the paused pair changes on both sides
    world.set_row("contacts", linked["flag-m"]["rid"], jobtitle="Edited after delete")
    world.set_row("leads", linked["unlink-m"]["rid"], jobtitle="Edited after delete")
    for case in ("flag-d", "unlink-d"):
        world.set_person(linked[case]["pid"], title="Edited after delete", syncToDynamics=True, dynamicsSyncAs="contact")
    world.set_person(linked["filter"]["pid"], city="Marketo City")
    world.set_row("contacts", linked["filter"]["rid"], jobtitle="Dynamics Title")
    edited = world.run("p1-edit")
    return {"deleted": deleted, "edited": edited}


def test_flag_marks_the_survivor_on_either_side(world, linked, phase1):
    contact = rows(world, "flag-m").iloc[0]
    assert bool(contact[FLAG_COLUMN]) is True  # its person was deleted in Marketo
    person = persons(world, "flag-d").iloc[0]
    assert bool(person[FLAG_FIELD]) is True  # its contact was deleted in Dynamics
    links = world.store().load_links()
    assert linked["flag-m"]["pid"] not in links.index and linked["flag-d"]["pid"] not in links.index
    flagged = lines(world, "p1-delete", action="flag")
    assert set(flagged["person_id"].astype(int)) == {linked["flag-m"]["pid"], linked["flag-d"]["pid"]}
    assert phase1["deleted"]["lifecycle"]["flag"] == 2


def test_unlink_leaves_the_survivor_as_it_is(world, linked, phase1):
    lead = rows(world, "unlink-m").iloc[0]
    assert pd.isna(lead[FLAG_COLUMN]) or lead[FLAG_COLUMN] is False
    person = persons(world, "unlink-d").iloc[0]
    assert pd.isna(person[FLAG_FIELD]) or person[FLAG_FIELD] is False
    unlinked = lines(world, "p1-delete", action="unlink")
    assert set(unlinked["person_id"].astype(int)) == {linked["unlink-m"]["pid"], linked["unlink-d"]["pid"]}
    assert unlinked["detail"].str.contains(r"\(deletes: unlink\)").all()


def test_survivors_are_not_brought_back_under_flag_and_unlink(world, linked, phase1):
    # the deleted persons are not created again from their records' edits, nor the deleted records from their
    # persons' (marked for sync), and nothing else is linked to them
    nothing_new(world, "flag-m", persons_left=0, rows_left=1)
    nothing_new(world, "unlink-m", persons_left=0, rows_left=1)
    nothing_new(world, "flag-d", persons_left=1, rows_left=0)
    nothing_new(world, "unlink-d", persons_left=1, rows_left=0)
    assert phase1["edited"]["created"] == 0
    held = lines(world, "p1-edit", action="skip")
    for case in ("flag-m", "unlink-m", "flag-d", "unlink-d"):
        mine = held[held["person_id"].astype("Int64") == linked[case]["pid"]]
        assert mine["detail"].str.contains("was deleted").any(), (case, held["detail"].tolist())


def test_a_record_that_leaves_the_filter_stops_syncing_and_says_so_once(world, linked, phase1):
    pid = linked["filter"]["pid"]
    left = lines(world, "p1-delete", person_id=pid)
    assert left["detail"].str.contains("left the sync filter").sum() == 1
    assert world.store().load_links().loc[pid, "paused"]  # the link is kept
    # changes on both sides while it is outside: neither is written, and no second line
    assert persons(world, "filter").iloc[0]["title"] == "Old"
    assert pd.isna(rows(world, "filter").iloc[0]["address1_city"])
    assert not lines(world, "p1-edit", person_id=pid)["detail"].str.contains("sync filter").any()


def test_a_record_that_enters_the_filter_again_is_synced_in_full(world, linked, phase1):
    pid, rid = linked["filter"]["pid"], linked["filter"]["rid"]
    world.set_row("contacts", rid, statecode=0, statuscode=1)  # only the state changes in Dynamics
    report = world.run("p1-back")
    back = lines(world, "p1-back", person_id=pid)
    assert back["detail"].str.contains("inside the sync filter again").sum() == 1
    # what changed on both sides while it was outside is synced now: the person was read although it did not change
    assert persons(world, "filter").iloc[0]["title"] == "Dynamics Title"
    assert rows(world, "filter").iloc[0]["address1_city"] == "Marketo City"
    assert not world.store().load_links().loc[pid, "paused"]
    assert report["lifecycle"]["entered_filter"] == 1


@pytest.fixture(scope="module")
def phase2(world: ModuleWorld, linked, phase1) -> dict:
    """Contact ``propagate`` (delete) / lead ``propagate`` (deactivate); two survivors changed in the same window."""
    use_config(world, "propagate", contact={"policy": "propagate"},
               lead={"policy": "propagate", "dynamics_action": "deactivate"})
    m = world.marketo()
    assert (m.delete_leads([linked[c]["pid"] for c in ("prop-m", "prop-lead", "guard-m")])["status"] == "deleted").all()
    world.dynamics().request("DELETE", f"contacts({linked['prop-d']['rid']})")
    world.dynamics().request("DELETE", f"leads({linked['guard-d']['rid']})")
    world.set_row("contacts", linked["guard-m"]["rid"], jobtitle="Changed in Dynamics")
    world.set_person(linked["guard-d"]["pid"], title="Changed in Marketo")
    dry = world.run("p2-dry", dry_run=True)
    after_dry = {"prop-m": rows(world, "prop-m"), "prop-d": persons(world, "prop-d")}
    real = world.run("p2")
    return {"dry": dry, "after_dry": after_dry, "real": real}


def test_a_dry_run_shows_the_deletes_and_does_none(world, linked, phase2):
    assert phase2["dry"]["lifecycle"]["delete"] == 2 and phase2["dry"]["lifecycle"]["deactivate"] == 1
    assert phase2["dry"]["lifecycle"]["deleted"] == {"dynamics": 0, "marketo": 0}
    assert len(phase2["after_dry"]["prop-m"]) == 1 and len(phase2["after_dry"]["prop-d"]) == 1
    assert world.activity(run_id="p2-dry").empty  # a dry run records nothing


def test_propagate_deletes_or_deactivates_the_other_side(world, linked, phase2):
    assert rows(world, "prop-m").empty  # the contact of the deleted person is deleted
    assert persons(world, "prop-d").empty  # the person of the deleted contact is deleted
    lead = rows(world, "prop-lead").iloc[0]  # the lead of the deleted person is deactivated (Disqualified, Canceled)
    assert (int(lead["statecode"]), int(lead["statuscode"])) == (2, 7)
    assert phase2["real"]["lifecycle"]["deleted"] == {"dynamics": 2, "marketo": 1}
    done = lines(world, "p2", action="delete")
    assert set(done["person_id"].astype(int)) == {linked[c]["pid"] for c in ("prop-m", "prop-d", "prop-lead")}
    assert lines(world, "p2", action="error").empty


def test_propagate_keeps_a_survivor_changed_since_the_last_sync(world, linked, phase2):
    contact = rows(world, "guard-m").iloc[0]
    assert contact["jobtitle"] == "Changed in Dynamics" and int(contact["statecode"]) == 0
    assert persons(world, "guard-d").iloc[0]["title"] == "Changed in Marketo"
    kept = lines(world, "p2", action="skip")
    for case in ("guard-m", "guard-d"):
        detail = kept[kept["person_id"].astype("Int64") == linked[case]["pid"]]["detail"]
        assert detail.str.contains("since the last sync: not deleted, kept unlinked").any(), (case, kept["detail"].tolist())
    links = world.store().load_links()
    assert linked["guard-m"]["pid"] not in links.index and linked["guard-d"]["pid"] not in links.index


def test_recreate_lets_a_flagged_survivor_create_its_person_again(world, linked, phase2):
    use_config(world, "recreate", contact={"policy": "flag", "recreate": True}, lead={"policy": "unlink"})
    assert world.marketo().delete_leads([linked["recreate"]["pid"]])["status"].tolist() == ["deleted"]
    world.run("p3-delete")
    assert bool(rows(world, "recreate").iloc[0][FLAG_COLUMN]) is True
    world.set_row("contacts", linked["recreate"]["rid"], jobtitle="Edited after delete")
    report = world.run("p3-edit")
    assert report["created_in"]["marketo"] == 1
    person, row = persons(world, "recreate").iloc[0], rows(world, "recreate").iloc[0]
    assert int(person["id"]) != linked["recreate"]["pid"] and row["mdsync_marketopersonid"] == str(int(person["id"]))
    assert person["title"] == "Edited after delete"

"""Merges on either side (issue 10.1, 10.2) end to end, against both sandboxes.

One module-scoped world: every case's records are seeded up front and linked by one first sync; then each case's
merge is done through the services' real APIs (Marketo Merge Leads, Dataverse Merge and QualifyLead), a dry run
shows the decisions and does none of them, one cycle follows every merge, and the end state is read back through
both APIs and the state store. Later cycles edit the records left behind: nothing is created again.

- ``m-loser``: a Marketo merge where only the loser was linked (the winner takes the link over);
- ``m-both``: a Marketo merge where both were linked, to different records (the winner keeps its own);
- ``d-free``: a Dataverse merge into a master without a person (the person follows the master);
- ``d-both``: a Dataverse merge into a master with its own person (the two persons are merged in Marketo);
- ``qualify``: a lead qualified into an existing contact (its person is merged into the contact's).
"""

from __future__ import annotations

import pandas as pd
import pytest

from mdsync.cycle import STAGES
from tests.fixtures.module_world import ModuleWorld, module_world

pytestmark = pytest.mark.integration

FLAG_COLUMN = "mdsync_deletedinmarketo"


def email(name: str) -> str:
    return f"{name}@merges.example.com"


@pytest.fixture(scope="module")
def world(marketo_sandbox, dataverse_sandbox, tmp_path_factory):
    yield from module_world(marketo_sandbox, dataverse_sandbox, tmp_path_factory, "merges")


@pytest.fixture(scope="module")
def linked(world: ModuleWorld) -> dict:
    """Each case's pairs linked by a first sync (a winner-to-be unlinked: no record has its email)."""
    contacts = ["m-loser", "m-both-loser", "d-free-sub", "d-both-sub", "d-both-master", "qualify-contact"]
    leads = ["m-both-winner", "qualify-lead"]
    rid = dict(zip(contacts, world.dataverse_sandbox.seed("contacts", [
        {"emailaddress1": email(c), "firstname": c, "lastname": "Merge", "jobtitle": "Old"} for c in contacts])))
    rid.update(zip(leads, world.dataverse_sandbox.seed("leads", [
        {"emailaddress1": email(c), "firstname": c, "lastname": "Merge", "jobtitle": "Old"} for c in leads])))
    names = contacts + leads + ["m-loser-winner"]
    pid = dict(zip(names, world.marketo_sandbox.seed_leads(
        [{"email": email(n), "firstName": n, "lastName": "Merge", "title": "Old"} for n in names])))
    report = world.run("first")
    assert report["new_links"] == len(contacts) + len(leads) and report["created"] == 0
    return {"rid": rid, "pid": pid}


@pytest.fixture(scope="module")
def merged(world: ModuleWorld, linked) -> dict:
    """Every case's merge through the services' APIs; a dry run, then the cycle that follows them."""
    rid, pid = linked["rid"], linked["pid"]
    m, d = world.marketo(), world.dynamics()
    m.merge_leads(pid["m-loser-winner"], [pid["m-loser"]])
    m.merge_leads(pid["m-both-winner"], [pid["m-both-loser"]])
    # a master without a person: created after the first sync, then merged into at once
    rid["d-free-master"] = world.new_row("contacts", emailaddress1=email("d-free-master"), firstname="Master",
                                         lastname="Merge")
    d.merge("contact", rid["d-free-master"], rid["d-free-sub"])
    d.merge("contact", rid["d-both-master"], rid["d-both-sub"])
    d.qualify_lead(rid["qualify-lead"], create_contact=False)  # into the existing contact
    world.set_row("leads", rid["qualify-lead"], **{"parentcontactid@odata.bind": f"/contacts({rid['qualify-contact']})"})

    cycle = world.cycle("dry", dry_run=True)
    manifest = world.stages(cycle, STAGES)
    dry = {"activity": cycle.staging.read_frame(manifest.identity.activity), "report": cycle.report(manifest),
           "persons": world.marketo().get_leads("id", list(pid.values()), ["id"])["id"].tolist(),
           "links": world.store().load_links()}
    real = world.run("merge")
    return {"dry": dry, "real": real}


def lines(world: ModuleWorld, run_id: str, action: str | None = None) -> pd.DataFrame:
    act = world.activity(run_id=run_id)
    return act if action is None else act[act["action"] == action]


def survivor(world: ModuleWorld, linked: dict, winner: str, loser: str, entity_set: str, record: str):
    """The winner linked to ``record`` (both link fields and the state store), the loser gone from Marketo and
    unlinked, with no tombstone (a merge is not a delete); returns the snapshot, both ids and the winner's line."""
    pid, rid = linked["pid"], linked["rid"]
    snap = world.read([email(winner), email(loser)])
    snap.pair(pid[winner], entity_set, rid[record])
    assert world.marketo().get_leads("id", [pid[loser]], ["id"]).empty and pid[loser] not in snap.links.index
    assert world.store().load_deletions(person_ids=[pid[loser]]).empty
    line = lines(world, "merge", "merge").query(f"person_id == {pid[winner]}")["detail"]
    assert len(line) == 1, line.tolist()
    return snap, pid[winner], pid[loser], line.iloc[0]


def test_a_dry_run_shows_every_merge_and_does_none(world, linked, merged):
    pid, dry = linked["pid"], merged["dry"]
    text = " | ".join(dry["activity"].loc[dry["activity"]["action"] == "merge", "detail"])
    for expected in (f"merged in Marketo: person {pid['m-loser']} into {pid['m-loser-winner']}; link moved",
                     f"merged in Marketo: person {pid['m-both-loser']} into {pid['m-both-winner']}; person "
                     f"{pid['m-both-winner']} keeps its link",
                     f"person {pid['d-free-sub']} now follows",
                     f"persons {pid['d-both-sub']} and {pid['d-both-master']} merged in Marketo",
                     f"persons {pid['qualify-lead']} and {pid['qualify-contact']} merged in Marketo (lead qualified "
                     "into an existing contact"):
        assert expected in text, text
    assert all(d.endswith("[dry run: not done]") for d in dry["activity"].loc[dry["activity"]["action"] == "merge",
                                                                                 "detail"])
    assert dry["report"]["lifecycle"]["persons_to_merge"] == 2 and dry["report"]["lifecycle"]["merged_by_sync"] == 0
    # nothing was done: the Dynamics-side losers still exist in Marketo, and no link moved
    assert {pid["d-both-sub"], pid["qualify-lead"]} <= set(dry["persons"])
    assert dry["links"].loc[pid["d-free-sub"], "dynamics_id"] == linked["rid"]["d-free-sub"]
    assert pid["m-loser-winner"] not in dry["links"].index


def test_a_winner_takes_over_the_link_of_its_only_linked_loser(world, linked, merged):
    rid = linked["rid"]
    snap, winner, loser, line = survivor(world, linked, "m-loser-winner", "m-loser", "contacts", "m-loser")
    assert not bool(snap.row_by_id("contacts", rid["m-loser"]).get(FLAG_COLUMN) or False)  # no "deleted" flag
    # the pair's baselines followed the winner
    assert not world.store().load_baselines(person_ids=[winner]).empty
    assert world.store().load_baselines(person_ids=[loser]).empty
    assert line == (f"merged in Marketo: person {loser} into {winner}; link moved: the contact {rid['m-loser']} now "
                    f"follows person {winner}")


def test_a_linked_winner_keeps_its_record_and_the_losers_link_is_dropped(world, linked, merged):
    rid = linked["rid"]
    snap, winner, loser, detail = survivor(world, linked, "m-both-winner", "m-both-loser", "leads", "m-both-winner")
    assert not bool(snap.row_by_id("contacts", rid["m-both-loser"]).get(FLAG_COLUMN) or False)
    assert f"keeps its link to the lead {rid['m-both-winner']}" in detail
    assert f"the link of person {loser} to the contact {rid['m-both-loser']} is dropped" in detail
    assert "a Dynamics merge of those two records may be wanted" in detail


def test_the_person_of_a_merged_contact_follows_a_master_without_one(world, linked, merged):
    pid, rid = linked["pid"], linked["rid"]
    person = pid["d-free-sub"]
    snap = world.read([email("d-free-sub"), email("d-free-master")])
    snap.pair(person, "contacts", rid["d-free-master"])
    assert snap.person_by_id(person)["lastName"] == "Merge"
    assert len(snap.persons) == 1  # no person was created for the master
    [line] = lines(world, "merge", "merge").query(f"person_id == {person}")["detail"].tolist()
    assert line == (f"merged in Dynamics: contact {rid['d-free-sub']} into {rid['d-free-master']}; person {person} "
                    f"now follows {rid['d-free-master']}")
    assert not lines(world, "merge")["detail"].str.contains("left the sync filter").any()


def test_a_master_with_its_own_person_gets_the_two_persons_merged_in_marketo(world, linked, merged):
    rid = linked["rid"]
    _, winner, loser, detail = survivor(world, linked, "d-both-master", "d-both-sub", "contacts", "d-both-master")
    assert merged["real"]["lifecycle"]["merged_by_sync"] == 2 and merged["real"]["lifecycle"]["merge_errors"] == 0
    assert detail == (f"merged in Dynamics: contact {rid['d-both-sub']} into {rid['d-both-master']}; persons {loser} "
                      f"and {winner} merged in Marketo ({winner}, who follows {rid['d-both-master']}, wins)")


def test_a_lead_qualified_into_an_existing_contact_merges_its_person_into_the_contacts(world, linked, merged):
    snap, winner, loser, detail = survivor(world, linked, "qualify-contact", "qualify-lead", "contacts", "qualify-contact")
    assert snap.rows_with("contacts", email("qualify-lead")).empty  # no contact was created from the lead
    assert detail.startswith(f"persons {loser} and {winner} merged in Marketo (lead qualified into an existing contact")


def test_nothing_is_created_again_for_the_losers_in_later_cycles(world, linked, merged):
    pid, rid = linked["pid"], linked["rid"]
    assert merged["real"]["created"] == 0
    echo = world.run("echo")  # our own writes and merges come back once
    # the records left behind are edited: the contact whose person was merged away (its column still names the
    # loser), and the pairs that moved
    world.set_row("contacts", rid["m-both-loser"], jobtitle="Edited after the merge")
    world.set_row("contacts", rid["d-free-master"], jobtitle="Master edited")
    world.set_person(pid["m-loser-winner"], title="Winner edited")
    after = world.run("after")
    assert echo["created"] == 0 and after["created"] == 0
    # the sync's own merges come back as Merge Leads activities (the test's own too, when they fall within the
    # overlap): nothing to decide, nothing written
    assert echo["lifecycle"]["merged_in_marketo"] >= 2 and echo["written"] == {"dynamics": 0, "marketo": 0}
    assert world.activity(run_id="echo").empty
    snap = world.read([email(n) for n in pid] + [email("d-free-master")])
    for loser in ("m-loser", "m-both-loser", "d-both-sub", "qualify-lead"):
        assert snap.persons_with(email(loser)).empty, loser  # merged away and never created again
        assert pid[loser] not in snap.links.index
    row = snap.row_by_id("contacts", rid["m-both-loser"])
    assert row["mdsync_marketopersonid"] == str(pid["m-both-loser"])  # not written since, nor linked to anyone
    held = lines(world, "after", "skip")
    assert held["detail"].str.contains(f"names person {pid['m-both-loser']}, merged into {pid['m-both-winner']} "
                                       "in Marketo, which follows another record").any(), held["detail"].tolist()
    # the moved pairs sync as any pair does
    assert snap.row_by_id("contacts", rid["m-loser"])["jobtitle"] == "Winner edited"
    assert snap.person_by_id(pid["d-free-sub"])["title"] == "Master edited"

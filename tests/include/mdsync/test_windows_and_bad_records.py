"""A window with many changes is read in bulk; no single bad record stops a cycle (issue 8), against both sandboxes."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_a_window_with_many_changes_is_read_through_a_bulk_activity_export(sync_world, monkeypatch):
    monkeypatch.setenv("MDSYNC_MAX_CHANGE_PAGES", "1")  # more than 300 change activities: read the window in bulk
    n = 350
    ids = sync_world.dataverse_sandbox.seed("contacts", [
        {"emailaddress1": f"many{i}@example.com", "firstname": "Many", "lastname": f"M{i}", "jobtitle": "Old"}
        for i in range(n)])
    pids = sync_world.marketo_sandbox.seed_leads([
        {"email": f"many{i}@example.com", "firstName": "Many", "lastName": f"M{i}", "title": "Old"} for i in range(n)])
    first = sync_world.cycle("first").run_all()
    assert first["new_links"] == n
    res = sync_world.marketo().sync_leads([{"id": pid, "title": f"New {pid}"} for pid in pids],
                                          action="updateOnly", lookup_field="id")
    assert (res["status"] == "updated").all()

    report = sync_world.cycle("busy").run_all()

    assert report["marketo_read"] == "bulk_window"
    assert report["entities"]["contact"]["to_dynamics"] == n and report["errors"] == {"dynamics": 0, "marketo": 0}
    titles = sync_world.dynamics().query("contacts", ["contactid", "jobtitle", "mdsync_marketopersonid"])
    by_person = dict(zip(titles["mdsync_marketopersonid"], titles["jobtitle"]))
    assert all(by_person[str(pid)] == f"New {pid}" for pid in pids)
    assert set(titles["contactid"]) == set(ids)  # nothing created, nothing lost
    quiet = sync_world.cycle("after").run_all()
    assert quiet["written"] == {"dynamics": 0, "marketo": 0}


def test_bad_records_are_set_aside_and_everything_else_syncs(sync_world):
    sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    # new Dynamics contacts: two emails Marketo refuses in a lookup, one fine; persons marked with an empty and an
    # unknown "sync as"
    sync_world.dataverse_sandbox.seed("contacts", [
        {"emailaddress1": "not-an-email", "firstname": "Bad", "lastname": "Email"},
        {"emailaddress1": "comma,person@example.com", "firstname": "Comma", "lastname": "Person"},
        {"emailaddress1": "fine@example.com", "firstname": "Fine", "lastname": "Person"}])
    res = sync_world.marketo().sync_leads([
        {"email": "blank.as@example.com", "lastName": "Blank", "syncToDynamics": True, "dynamicsSyncAs": ""},
        {"email": "odd.as@example.com", "lastName": "Odd", "syncToDynamics": True, "dynamicsSyncAs": "partner"}],
        action="createOnly")
    assert (res["status"] == "created").all()

    report = sync_world.cycle("run-2").run_all()

    fine = sync_world.person("fine@example.com")
    assert fine["dynamicsRecordType"] == "contact"
    for email in ("blank.as@example.com", "odd.as@example.com"):  # the default type, lead
        assert sync_world.record("leads", email)["mdsync_marketopersonid"] == str(int(sync_world.person(email)["id"]))
    assert report["created_in"] == {"dynamics": 2, "marketo": 1}
    history = sync_world.store().activity(run_id="run-2")
    refused = history[history["action"].eq("error")]
    details = " ".join(refused["detail"].astype(str))
    assert "not-an-email" in " ".join(refused["email"].astype(str)) + details
    assert "comma,person@example.com" in " ".join(refused["email"].astype(str)) + details
    assert len(sync_world.records("contacts", "fine@example.com")) == 1

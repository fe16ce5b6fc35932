"""The console's person and "why didn't this sync?" pages and API, from real cycles against both sandboxes: the
live side-by-side read (a difference marked), the timeline across runs with links to the task logs, and reasons
(a rejected value, a lost collision) with what to do."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def story(console_world):
    """run-1 links; between run-1 and run-2 a collision on Lena's lead (Marketo wins) and a title Dynamics rejects
    for Cat; after run-2 Ann's city changes in Marketo (not synced yet: a live difference)."""
    w = console_world
    ids = w.seed_people()
    w.cycle("run-1").run_all()
    w.dataverse_sandbox.admin("PUT", "rules", [{"entity": "contact", "column": "jobtitle", "op": "forbid",
                                                 "values": ["Intern"], "message": "Interns are not contacts."}])
    w.update_person(ids["lena_pid"], city="Marketo City")
    w.update_record("leads", ids["lead"], address1_city="Dynamics City")
    cat_pid = int(w.person("cat@example.com")["id"])
    w.update_person(cat_pid, title="Intern")
    w.cycle("run-2").run_all()
    w.update_person(ids["ann_pid"], city="Lisbon")
    return {**ids, "cat_pid": cat_pid}


def test_person_by_email_shows_both_sides_and_the_timeline(console, story):
    data = console.get("/mdsync/api/person", params={"q": "LENA@example.com"}).json()
    assert [m["person_id"] for m in data["matches"]] == [story["lena_pid"]]
    assert data["subject"]["dynamics_id"] == story["lead"] and data["live_problems"] == []
    city = next(r for r in data["values"]["rows"] if r["field"] == "city")
    assert city["marketo"] == city["dynamics"] == city["baseline"] == "Marketo City" and not city["differs"]
    actions = [(r["action"], r["field"], r["run_id"]) for r in data["timeline"]["rows"]]
    assert ("collision", "city", "run-2") in actions and any(a == "link" and run == "run-1" for a, _, run in actions)
    collision = next(r for r in data["timeline"]["rows"] if r["action"] == "collision")
    assert collision["winner"] == "marketo" and collision["task_id"] == "plan_lead"
    assert data["timeline"]["rows"][0]["id"] > data["timeline"]["rows"][-1]["id"]  # newest first


def test_a_change_not_synced_yet_is_marked_as_a_difference(console, story):
    data = console.get("/mdsync/api/person", params={"q": str(story["ann_pid"])}).json()
    city = next(r for r in data["values"]["rows"] if r["field"] == "city")
    assert city["marketo"] == "Lisbon" and city["dynamics"] == "Berlin" and city["differs"]
    page = console.get("/mdsync/person", params={"q": str(story["ann_pid"])})
    assert page.status_code == 200 and 'class="differs"' in page.text and "Lisbon" in page.text
    assert "/tasks/" in page.text  # timeline rows link to their task's log


def test_why_names_the_rejected_value_with_the_services_message(console, story):
    data = console.get("/mdsync/api/why", params={"q": str(story["cat_pid"]), "field": "job_title"}).json()
    reason = next(r for r in data["reasons"] if r["code"] == "value_rejected")
    assert "Intern" in reason["detail"] and "Interns are not contacts." in reason["detail"]
    assert "retry_failed" in reason["action"] or "retry" in reason["action"].lower()
    page = console.get("/mdsync/why", params={"q": str(story["cat_pid"]), "field": "job_title"})
    assert page.status_code == 200 and 'data-code="value_rejected"' in page.text and "What to do" in page.text


def test_why_names_a_lost_collision_and_says_in_sync_for_an_untouched_field(console, story):
    data = console.get("/mdsync/api/why", params={"q": str(story["lena_pid"]), "field": "city"}).json()
    lost = next(r for r in data["reasons"] if r["code"] == "collision_lost")
    assert "Dynamics City" in lost["detail"] and "Marketo City" in lost["detail"] and lost["run_id"] == "run-2"
    calm = console.get("/mdsync/api/why", params={"q": str(story["lena_pid"]), "field": "first_name"}).json()
    assert calm["status"] == "in_sync" and calm["reasons"] == [], calm


def test_bad_searches_are_one_clear_line(console, story):
    assert console.get("/mdsync/api/person", params={"q": ""}).status_code == 422
    r = console.get("/mdsync/api/why", params={"q": "not an id"})
    assert r.status_code == 422 and "email" in r.json()["detail"]
    page = console.get("/mdsync/person", params={"q": "nobody@example.com"})
    assert page.status_code == 200 and "knows nothing about" in page.text
    assert console.get("/mdsync/api/person", params={"q": "1"}, user=None).status_code == 401

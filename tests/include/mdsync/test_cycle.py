"""The sync cycle end to end against both sandboxes over real HTTP(S), run by the engine (no Airflow).

The same stages run as DAG tasks in tests/dags; here they run in one process so the scenarios stay quick.
"""

from __future__ import annotations

import pandas as pd



def test_first_cycle_links_and_creates_both_ways_without_duplicates(sync_world):
    ids = sync_world.seed_people()
    report = sync_world.cycle("run-1").run_all()
    assert report["new_links"] == 4 and report["created"] == 2
    staging = sync_world.tmp / "staging"
    assert not (staging / "run-1").exists() and any(staging.glob("field-access-*.json"))  # run folder cleaned up
    # Cat existed only in Dynamics: now one Marketo person, linked both ways
    cat = sync_world.person("cat@example.com")
    assert (cat["dynamicsRecordId"], cat["dynamicsRecordType"]) == (ids["cat"], "contact")
    assert sync_world.record("contacts", "cat@example.com")["mdsync_marketopersonid"] == str(int(cat["id"]))
    # Max was marked for sync as a contact: now one Dynamics contact carrying his person id
    max_contact = sync_world.record("contacts", "max@example.com")
    assert max_contact["mdsync_marketopersonid"] == str(ids["max_pid"])
    assert sync_world.records("leads", "max@example.com").empty
    # Lena matched her lead by email despite the different case
    assert sync_world.person("lena@example.com")["dynamicsRecordId"] == ids["lead"]
    links = sync_world.store().load_links()
    assert links.loc[ids["ann_pid"], "dynamics_id"] == ids["ann"] and len(links) == 4
    # A second cycle links and creates nothing more
    again = sync_world.cycle("run-2").run_all()
    assert again["created"] == 0 and again["new_links"] == 0
    assert len(sync_world.persons("cat@example.com")) == 1 and len(sync_world.records("contacts", "max@example.com")) == 1


def test_changes_flow_both_ways_collisions_follow_policy_and_rejections_are_logged(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    cat_pid = int(sync_world.person("cat@example.com")["id"])
    sync_world.dataverse_sandbox.admin("PUT", "rules", [{"entity": "contact", "column": "jobtitle", "op": "forbid",
                                                          "values": ["Intern"], "message": "Interns are not contacts."}])
    # only Marketo changed / only Dynamics changed
    sync_world.update_person(ids["lena_pid"], lastName="Leadbetter")
    sync_world.update_record("contacts", ids["ann"], jobtitle="Principal Engineer")
    # collisions: the same field on both sides
    sync_world.update_person(ids["lena_pid"], title="VP Marketing")
    sync_world.update_record("leads", ids["lead"], jobtitle="Head of Sales")
    sync_world.update_person(ids["ann_pid"], city="Lisbon")
    sync_world.update_record("contacts", ids["ann"], address1_city="Porto")
    # a value Dynamics rejects, next to one it accepts
    sync_world.update_person(cat_pid, title="Intern", lastName="Diaz-Ruiz")

    report = sync_world.cycle("run-2").run_all()

    lena_lead = sync_world.record("leads", "lena@example.com")
    assert lena_lead["lastname"] == "Leadbetter"
    assert lena_lead["jobtitle"] == "VP Marketing" == sync_world.person("lena@example.com")["title"]  # lead: Marketo wins
    ann = sync_world.person("ann@example.com")
    assert ann["title"] == "Principal Engineer"
    assert ann["city"] == "Porto" == sync_world.record("contacts", "ann@example.com")["address1_city"]  # contact: Dynamics wins
    cat_contact = sync_world.record("contacts", "cat@example.com")
    assert cat_contact["lastname"] == "Diaz-Ruiz" and cat_contact["jobtitle"] == "VP"
    assert report["errors"]["dynamics"] == 1

    store = sync_world.store()
    history = store.activity(email="cat@example.com")
    error = history[history["action"] == "error"]
    assert error["field"].tolist() == ["job_title"] and "Interns are not contacts." in error["detail"].iloc[0]
    open_errors = store.open_errors()
    assert open_errors[["person_id", "target", "field", "value"]].values.tolist() == [[cat_pid, "dynamics", "job_title", "Intern"]]
    collisions = store.activity(run_id="run-2")
    collisions = collisions[collisions["action"] == "collision"].set_index("field")
    assert collisions.loc["job_title", "winner"] == "marketo" and collisions.loc["job_title", "new_value"] == "VP Marketing"
    assert collisions.loc["city", "winner"] == "dynamics" and collisions.loc["city", "old_value"] == "Lisbon"
    # the rejection is in the person's Marketo activity log too
    type_id = sync_world.marketo().ensure_custom_activity_type(
        "dynamicsSyncError", "Dynamics Sync Error", {"apiName": "dynamicsField", "name": "Dynamics Field"})
    token = sync_world.marketo().get_paging_token(pd.Timestamp.now(tz="UTC") - pd.Timedelta(minutes=10))
    activities, _ = sync_world.marketo().get_activities(token, [type_id], lead_ids=[cat_pid])
    assert [a["primaryAttributeValue"] for a in activities] == ["job_title"]

    # The next cycle writes nothing, and the rejected value is not re-sent while it stays the same.
    calls_before = sync_world.dataverse_sandbox.calls()["by_endpoint"]
    quiet = sync_world.cycle("run-3").run_all()
    assert quiet["written"] == {"dynamics": 0, "marketo": 0}
    assert sum(e["to_dynamics"] + e["to_marketo"] for e in quiet["entities"].values()) == 0
    after = sync_world.dataverse_sandbox.calls()["by_endpoint"]
    writes = {k: after.get(k, 0) - calls_before.get(k, 0) for k in after if not k.startswith("GET") and "token" not in k}
    assert sum(writes.values()) == 0, writes


def test_a_stages_waits_for_the_call_limits_are_in_its_result(sync_world):
    cycle = sync_world.cycle("manual__waits")
    schema = cycle.refresh_schema()
    cycle.marketo.limits.pause(0.3)  # as after a Retry-After: the stage's first call is held back

    extracted = cycle.extract_marketo(schema)

    assert extracted.calls["marketo"] > 0 and 0.25 <= extracted.waited_s["marketo"] < 5
    assert "dynamics" not in extracted.waited_s  # a service the task never called has no wait


def test_dry_run_writes_nothing(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.update_person(ids["ann_pid"], title="Dry Run Title")
    before = sync_world.store().activity()
    report = sync_world.cycle("dry", dry_run=True).run_all()
    assert report["entities"]["contact"]["to_dynamics"] == 1 and report["written"] == {"dynamics": 0, "marketo": 0}
    assert sync_world.record("contacts", "ann@example.com")["jobtitle"] == "Engineer"
    assert len(sync_world.store().activity()) == len(before)
    # the real run afterwards still sees the change (the dry run moved no watermark or baseline)
    sync_world.cycle("real").run_all()
    assert sync_world.record("contacts", "ann@example.com")["jobtitle"] == "Dry Run Title"


def test_manual_run_for_one_person_creates_it_in_dynamics_at_once(sync_world):
    sync_world.cycle("run-1").run_all()
    pid = sync_world.marketo_sandbox.seed_leads([{"email": "now@example.com", "firstName": "Nora", "lastName": "Now"}])[0]
    sync_world.cycle("manual", person_ids=[pid], sync_as="lead").run_all()
    lead = sync_world.record("leads", "now@example.com")
    assert lead["mdsync_marketopersonid"] == str(pid) and lead["lastname"] == "Now"
    assert sync_world.person("now@example.com")["dynamicsRecordId"] == lead["leadid"]


def test_crash_between_the_two_loads_then_rerun_converges_without_duplicates(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.update_person(ids["lena_pid"], title="Crash Title")
    sync_world.update_record("contacts", ids["ann"], jobtitle="Crash Job")
    sync_world.dataverse_sandbox.seed("contacts", [{"emailaddress1": "new@example.com", "firstname": "New", "lastname": "Contact"}])
    # run stages up to the Dynamics load, then "crash" before the Marketo load and the commit
    from mdsync.cycle import STAGES
    from mdsync.results import RunManifest

    c = sync_world.cycle("crashed")
    manifest = RunManifest(run_id="crashed")
    for stage in STAGES[:STAGES.index("load_dynamics") + 1]:
        manifest = c.run_stage(stage, manifest)
    assert sync_world.record("leads", "lena@example.com")["jobtitle"] == "Crash Title"
    # the whole run is retried
    sync_world.cycle("crashed-retry").run_all()
    assert sync_world.person("ann@example.com")["title"] == "Crash Job"
    assert len(sync_world.persons("new@example.com")) == 1
    assert len(sync_world.records("contacts", "new@example.com")) == 1
    quiet = sync_world.cycle("after").run_all()
    assert quiet["written"] == {"dynamics": 0, "marketo": 0} and quiet["created"] == 0


def test_backfill_over_past_windows_is_safe(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.update_person(ids["ann_pid"], title="Backfilled")
    now = pd.Timestamp.now(tz="UTC").floor("5min").to_pydatetime()
    reports = []
    for k in (3, 2, 1):  # three past 5-minute windows, oldest first, as a backfill runs them
        start = now - pd.Timedelta(minutes=5 * k)
        reports.append(sync_world.cycle(f"backfill-{k}", run_type="backfill", window_start=start,
                                        window_end=start + pd.Timedelta(minutes=5)).run_all())
    assert sync_world.record("contacts", "ann@example.com")["jobtitle"] == "Backfilled"
    assert sum(r["written"]["dynamics"] for r in reports) == 1  # written once, later windows converge to no-ops
    assert len(sync_world.store().load_links()) == 4


def test_ambiguous_email_matches_are_logged_not_guessed(sync_world):
    sync_world.marketo_sandbox.seed_leads([{"email": "twin@example.com", "firstName": "One"},
                                           {"email": "TWIN@example.com", "firstName": "Two"}])
    twin_id, = sync_world.dataverse_sandbox.seed("contacts", [{"emailaddress1": "twin@example.com", "lastname": "Twin"}])
    report = sync_world.cycle("run-1").run_all()
    assert report["new_links"] == 0 and report["created"] == 0
    assert len(sync_world.persons("twin@example.com")) == 2  # nobody created a third
    history = sync_world.store().activity(dynamics_id=twin_id)
    assert history["action"].tolist() == ["ambiguous"]
    assert "2 Marketo persons have this email" in history["detail"].iloc[0]


def test_fields_the_sync_user_cannot_read_or_update_are_dropped_and_logged(sync_world, caplog):
    ids = sync_world.seed_people()
    sync_world.dataverse_sandbox.admin("PUT", "security", {"secured_columns": {"contact": ["jobtitle", "telephone1"]},
                                                           "readable": {"contact": ["telephone1"]}, "updatable": {}})
    sync_world.cycle("run-1").run_all()
    assert "contact.job_title dropped on the dynamics side" in caplog.text
    assert "cannot update Dataverse column 'telephone1'" in caplog.text
    sync_world.update_person(ids["ann_pid"], title="Unwritable", lastName="Writable")
    report = sync_world.cycle("run-2").run_all()
    record = sync_world.record("contacts", "ann@example.com")
    assert record["lastname"] == "Writable"
    assert report["errors"] == {"dynamics": 0, "marketo": 0}
    # the secured column was neither read nor written, so Marketo's value stays as it is on both sides
    assert sync_world.person("ann@example.com")["title"] == "Unwritable"


def test_deleted_records_drop_their_link_and_keep_the_other_side(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.dynamics().request("DELETE", f"contacts({ids['ann']})")
    sync_world.cycle("run-2").run_all()
    store = sync_world.store()
    assert ids["ann_pid"] not in store.load_links().index
    # the shipped delete policy (flag, as the native sync): the person is kept and flagged (test_lifecycle_*)
    assert store.activity(person_id=ids["ann_pid"])["action"].tolist()[-1] == "flag"
    assert len(sync_world.persons("ann@example.com")) == 1


def test_activity_command_prints_a_persons_history(sync_world, capsys):
    from mdsync.activity import main

    sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    import os

    assert main(["--email", "CAT@example.com", "--state-url", os.environ["MDSYNC_STATE_URL"]]) == 0
    out = capsys.readouterr().out
    assert "CREATE" in out and "cat@example.com" in out and "run-1" in out
    assert main(["--email", "nobody@example.com", "--state-url", os.environ["MDSYNC_STATE_URL"]]) == 1


def test_qualified_lead_moves_the_person_to_the_new_contact(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    created = sync_world.dynamics().qualify_lead(ids["lead"], create_contact=True)
    contact_id = next(r["id"] for r in created if r["entity"] == "contact")
    report = sync_world.cycle("run-2").run_all()
    assert report["created"] == 0
    person = sync_world.person("lena@example.com")
    assert (person["dynamicsRecordType"], person["dynamicsRecordId"]) == ("contact", contact_id)
    assert sync_world.store().load_links().loc[ids["lena_pid"], "dynamics_id"] == contact_id
    assert sync_world.record("contacts", "lena@example.com")["mdsync_marketopersonid"] == str(ids["lena_pid"])


def _data_calls(counts: dict) -> dict:
    return {k: v for k, v in counts["by_endpoint"].items() if "token" not in k and v}


def test_idle_cycle_stays_within_the_api_budget(sync_world):
    """DESIGN §8: an idle cycle costs at most 3 Marketo and 3 Dataverse calls (tokens aside)."""
    import time

    sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    time.sleep(3)  # past the 2 s overlap, so each window holds only what came after the last one
    sync_world.cycle("run-2").run_all()  # our own writes of run 1 come back once
    time.sleep(3)
    sync_world.marketo_sandbox.admin("POST", "/calls/reset")
    sync_world.dataverse_sandbox.admin("POST", "calls/reset")
    report = sync_world.cycle("idle").run_all()
    assert report["written"] == {"dynamics": 0, "marketo": 0}
    marketo_calls = _data_calls(sync_world.marketo_sandbox.calls())
    dataverse_calls = _data_calls(sync_world.dataverse_sandbox.calls())
    assert sum(marketo_calls.values()) <= 3, marketo_calls
    assert sum(dataverse_calls.values()) <= 3, dataverse_calls


def test_writes_use_the_minimum_number_of_calls(sync_world):
    """DESIGN §8: ceil(n/300) Marketo calls and ceil(n/1000) Dataverse bulk calls for n records."""
    n = 700
    emails = [f"bulk{i}@example.com" for i in range(n)]
    ids = sync_world.dataverse_sandbox.seed("contacts", [{"emailaddress1": e, "lastname": f"Bulk {i}"}
                                                         for i, e in enumerate(emails)])
    pids = sync_world.marketo_sandbox.seed_leads([{"email": e, "lastName": f"Bulk {i}"} for i, e in enumerate(emails)])
    sync_world.cycle("run-1").run_all()
    sync_world.marketo().sync_leads([{"id": p, "title": "Marketo side"} for p in pids[:n // 2]], "updateOnly", "id")
    sync_world.dynamics().update_multiple("contacts", [{"contactid": i, "jobtitle": "Dynamics side"} for i in ids[n // 2:]])
    sync_world.marketo_sandbox.admin("POST", "/calls/reset")
    sync_world.dataverse_sandbox.admin("POST", "calls/reset")
    report = sync_world.cycle("run-2").run_all()
    assert report["written"] == {"dynamics": n // 2, "marketo": n - n // 2}
    marketo_writes = sync_world.marketo_sandbox.calls()["by_endpoint"].get("POST /rest/v1/leads.json", 0)
    dataverse_writes = {k: v for k, v in _data_calls(sync_world.dataverse_sandbox.calls()).items() if k.startswith("POST")}
    assert marketo_writes == 2  # 350 records: ceil(350 / 300)
    assert sum(dataverse_writes.values()) == 1, dataverse_writes  # 350 records: one UpdateMultiple

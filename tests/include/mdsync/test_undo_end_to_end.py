"""Undo a run (issue 9 item 5) end to end: cycles run by the engine against both sandboxes over real HTTP(S).

A run carries changes both ways (titles, phones, a picklist, consent, a new contact, a rejected value); the undo
restores both sides of each pair and the state store's baselines, keeps a value changed again since, lists what
the run created, and its dry run writes nothing and logs exactly the restores. The same through Airflow is in
tests/dags/test_marketo_dynamics_sync.py.
"""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from mdsync.dynamics import eq
from mdsync.errors import ConfigError

pytestmark = pytest.mark.integration

M_FIELDS = ["title", "phone", "city", "leadSource", "unsubscribed", "dynamicsRecordId"]
D_COLUMNS = ["jobtitle", "telephone1", "address1_city", "donotbulkemail", "mdsync_marketopersonid"]


def marketo(world, email: str) -> dict:
    found = world.marketo().get_leads("email", [email], M_FIELDS)
    assert len(found) == 1, found
    return found.iloc[0].to_dict()


def dynamics(world, entity_set: str, email: str, *extra: str) -> dict:
    id_column = entity_set[:-1] + "id"
    found = world.dynamics().query(entity_set, [id_column, *D_COLUMNS, *extra], filter=eq("emailaddress1", email))
    assert len(found) == 1, found
    return found.iloc[0].to_dict()


def blank(value) -> bool:
    return value is None or (pd.isna(value) if not isinstance(value, str) else value == "")


def both_sides(world) -> list[dict]:
    """Lena's and Ann's values on both sides (blanks as None, so two reads compare equal)."""
    rows = [marketo(world, "lena@example.com"), dynamics(world, "leads", "lena@example.com", "leadsourcecode"),
            marketo(world, "ann@example.com"), dynamics(world, "contacts", "ann@example.com")]
    return [{k: None if blank(v) else v for k, v in r.items()} for r in rows]


def the_run(world) -> dict:
    """Link everything (run-1), then the run to undo (run-2): changes both ways, consent, a create, a rejection."""
    ids = world.seed_people()
    world.cycle("run-1").run_all()
    world.dataverse_sandbox.admin("PUT", "rules", [{"entity": "contact", "column": "jobtitle", "op": "forbid",
                                                     "values": ["Intern"], "message": "Interns are not contacts."}])
    world.update_person(ids["lena_pid"], title="VP Marketing", leadSource="Seminar")  # lead: Marketo -> Dynamics
    world.update_person(ids["ann_pid"], city="Lisbon")  # contact: Marketo -> Dynamics
    world.update_record("contacts", ids["ann"], telephone1="+1 555 0101", donotbulkemail=True)  # Dynamics -> Marketo
    world.update_record("leads", ids["lead"], telephone1="+49 30 1234")
    cat_pid = int(world.person("cat@example.com")["id"])
    world.update_person(cat_pid, title="Intern")  # Dynamics rejects Intern
    new_id, = world.dataverse_sandbox.seed("contacts", [{"emailaddress1": "new@example.com", "firstname": "New",
                                                         "lastname": "Contact"}])
    report = world.cycle("run-2").run_all()
    assert report["created"] == 1 and report["errors"]["dynamics"] == 1
    assert dynamics(world, "leads", "lena@example.com", "leadsourcecode")["leadsourcecode"] == 6
    assert marketo(world, "ann@example.com")["unsubscribed"] is True
    return {**ids, "cat_pid": cat_pid, "new": new_id}


def undo_lines(world, run_id: str) -> pd.DataFrame:
    history = world.store().activity(run_id=run_id)
    return history[history["action"].isin(["undo", "undo_skipped"])]


def test_undo_restores_both_sides_and_the_baselines_keeps_later_changes_and_lists_creates(sync_world, caplog):
    w = sync_world
    ids = the_run(w)
    w.update_record("contacts", ids["ann"], address1_city="Porto")  # changed again after the run: must stay

    with caplog.at_level(logging.INFO, logger="mdsync"):
        report = w.cycle("undo-1", undo_run="run-2").run_all()

    # the lead: the title and the picklist go back on both sides (Marketo, where they changed, and Dynamics)
    lena_m, lena_d = marketo(w, "lena@example.com"), dynamics(w, "leads", "lena@example.com", "leadsourcecode")
    assert lena_m["title"] == "Engineer" == lena_d["jobtitle"]
    assert (lena_m["leadSource"], lena_d["leadsourcecode"]) == ("Web", 8)
    assert blank(lena_m["phone"]) and blank(lena_d["telephone1"])  # the phone Dynamics had set: empty again
    # the contact: the phone goes back to empty on both sides; the opt-out stays; the city changed since stays
    ann_m, ann_d = marketo(w, "ann@example.com"), dynamics(w, "contacts", "ann@example.com")
    assert blank(ann_m["phone"]) and blank(ann_d["telephone1"])
    assert ann_m["unsubscribed"] is True and ann_d["donotbulkemail"] is True
    assert (ann_m["city"], ann_d["address1_city"]) == ("Lisbon", "Porto")
    # the rejected write was never made: nothing to undo (Marketo keeps Intern, Dynamics VP)
    assert w.record("contacts", "cat@example.com")["jobtitle"] == "VP"
    # the contact the run created in Marketo is still there, linked
    assert marketo(w, "new@example.com")["dynamicsRecordId"] == ids["new"]

    # the state store: baselines are the restored values, the activity names the undone run
    store = w.store()
    baselines = store.load_baselines(person_ids=[ids["lena_pid"], ids["ann_pid"]],
                                     fields=["job_title", "lead_source", "phone", "city"])
    assert baselines.loc[ids["lena_pid"], "job_title"] == "Engineer"
    assert baselines.loc[ids["lena_pid"], "lead_source"] == "Web"
    assert pd.isna(baselines.loc[ids["ann_pid"], "phone"]) and pd.isna(baselines.loc[ids["lena_pid"], "phone"])
    assert baselines.loc[ids["ann_pid"], "city"] == "Lisbon"  # not restored: the baseline stays
    lines = undo_lines(w, "undo-1")
    restores = lines[lines["action"] == "undo"]
    assert sorted(zip(restores["person_id"], restores["field"], restores["detail"].str.endswith("-> Dynamics"))) == \
        sorted([(ids["lena_pid"], f, side) for f in ("job_title", "lead_source", "phone") for side in (True, False)]
               + [(ids["ann_pid"], "phone", side) for side in (True, False)])
    assert restores["detail"].str.startswith("undo of run run-2: ").all()
    skipped = lines[lines["action"] == "undo_skipped"].set_index(["person_id", "field"])
    city = skipped.loc[(ids["ann_pid"], "city")]
    assert (city["old_value"], city["new_value"]) == ("Porto", "Berlin") and "changed in Dynamics since" in city["detail"]
    assert "never turns an opt-out into an opt-in" in skipped.loc[(ids["ann_pid"], "email_opt_out"), "detail"]
    created = lines[(lines["action"] == "undo_skipped") & lines["field"].isna()
                    & lines["detail"].str.contains("created by run run-2")]
    assert created["dynamics_id"].str.lower().tolist() == [ids["new"].lower()]

    # the report and the log say the same
    undo = report["undo"]
    assert undo["run_id"] == "run-2" and undo["to_restore"] == {"dynamics": 4, "marketo": 4}
    assert undo["not_restored"] == {"changed_later": 1, "consent": 1} and undo["created_listed"] == 1
    assert [(i["person_id"], i["field"], i["changed_in"], i["now"]) for i in undo["changed_later"]] == \
        [(ids["ann_pid"], "city", "dynamics", "Porto")]
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "undo of run run-2: fields to restore: Dynamics 4, Marketo 4" in log
    assert f"UNDO_SKIPPED person {ids['ann_pid']} <ann@example.com>" in log

    # the next cycle does not fight the undo: only the later city change flows (to Marketo, as usual)
    after = w.cycle("after").run_all()
    assert after["written"] == {"dynamics": 0, "marketo": 1}
    assert marketo(w, "lena@example.com")["title"] == "Engineer" and marketo(w, "ann@example.com")["city"] == "Porto"

    # undoing the undo is a run like any other: the run's values come back
    again = w.cycle("undo-2", undo_run="undo-1").run_all()
    assert again["undo"]["to_restore"] == {"dynamics": 4, "marketo": 4}
    assert w.record("leads", "lena@example.com")["jobtitle"] == "VP Marketing" == marketo(w, "lena@example.com")["title"]
    assert dynamics(w, "contacts", "ann@example.com")["telephone1"] == "+1 555 0101"


def test_a_dry_run_undo_writes_nothing_and_logs_exactly_the_restores(sync_world, caplog):
    w = sync_world
    ids = the_run(w)
    before = both_sides(w)
    activity_before = len(w.store().activity())

    with caplog.at_level(logging.INFO, logger="mdsync"):
        report = w.cycle("undo-dry", undo_run="run-2", dry_run=True).run_all()

    # the run's writes still stand everywhere (nothing changed since): all five of them would go back on both sides
    assert report["written"] == {"dynamics": 0, "marketo": 0}
    assert report["undo"]["to_restore"] == {"dynamics": 5, "marketo": 5}
    assert both_sides(w) == before and len(w.store().activity()) == activity_before  # nothing written, nothing recorded
    shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("UNDO ")]
    assert all(line.endswith("[dry run: not written]") for line in shown)
    restored = sorted((line.split(" | ")[1].split(":")[0], line.split(" -> ")[-1].split(" [")[0]) for line in shown)
    assert restored == sorted([(f, side) for f in ("job_title", "lead_source", "phone") for side in ("Dynamics", "Marketo")]
                              + [(f, side) for f in ("city", "phone") for side in ("Dynamics", "Marketo")])
    assert any(f"UNDO      person {ids['lena_pid']} " in line and "job_title: 'VP Marketing' -> 'Engineer'" in line
               for line in shown)
    # the real undo afterwards does exactly that
    done = w.cycle("undo", undo_run="run-2").run_all()
    assert done["written"] == {"dynamics": 5, "marketo": 5}
    assert marketo(w, "lena@example.com")["title"] == "Engineer" and marketo(w, "ann@example.com")["city"] == "Berlin"


def test_an_unknown_run_or_one_that_wrote_nothing_is_one_line(sync_world):
    w = sync_world
    w.seed_people()
    w.cycle("run-1").run_all()
    quiet = w.cycle("quiet").run_all()
    assert quiet["written"] == {"dynamics": 0, "marketo": 0}
    with pytest.raises(ConfigError) as unknown:
        w.cycle("undo", undo_run="run-0").run_all()
    message = str(unknown.value)
    assert "\n" not in message and "run 'run-0' recorded no activity in this state store" in message
    assert "the latest runs with activity are run-1 (" in message
    with pytest.raises(ConfigError, match="run 'quiet' recorded no activity") as nothing:
        w.cycle("undo", undo_run="quiet").run_all()
    assert "\n" not in str(nothing.value)
    with pytest.raises(ConfigError, match="cannot be combined with person_ids"):
        w.cycle("undo", undo_run="run-1", person_ids=[1]).run_all()

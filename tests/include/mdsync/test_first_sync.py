"""The first sync of a whole (small) database against both sandboxes, then its echo cycle (issue 8).

Asserts the end state on both sides through their APIs and the API calls against the floor (counts, not
times): links both ways, marked persons created, unmarked ones left alone, blanks filled, first-link
collisions won by the entity type's side, no duplicates; the echo cycle writes nothing.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

PAIRS = 600          # matched by email: half contacts, half leads
MARKED = 300         # Marketo-only, marked for sync: a third each as contact, lead, blank (-> lead)
UNMARKED = 400       # Marketo-only, not marked: left alone
DYNAMICS_ONLY = 200  # half contacts, half leads: become new Marketo persons

pytestmark = pytest.mark.integration


def _seed(world) -> dict:
    half = PAIRS // 2
    contacts = [{"emailaddress1": f"pair{i}@example.com", "firstname": f"C{i}", "lastname": "Pair",
                 "jobtitle": "Dynamics Title" if i % 3 == 0 else "Same Title",
                 "address1_city": f"City{i}" if i % 4 == 0 else None} for i in range(half)]
    leads = [{"emailaddress1": f"pair{i}@example.com", "firstname": f"L{i}", "lastname": "Pair", "companyname": "Acme",
              "jobtitle": "Dynamics Title" if i % 3 == 0 else "Same Title"} for i in range(half, PAIRS)]
    contacts += [{"emailaddress1": f"dynonly{i}@example.com", "firstname": "Only", "lastname": f"D{i}",
                  "jobtitle": "Buyer"} for i in range(DYNAMICS_ONLY // 2)]
    leads += [{"emailaddress1": f"dynonly{i}@example.com", "firstname": "Only", "lastname": f"D{i}",
               "companyname": "Beta"} for i in range(DYNAMICS_ONLY // 2, DYNAMICS_ONLY)]
    contact_ids = world.dataverse_sandbox.seed("contacts", [{k: v for k, v in r.items() if v is not None} for r in contacts])
    lead_ids = world.dataverse_sandbox.seed("leads", leads)
    persons = [{"email": f"PAIR{i}@example.com" if i % 10 == 0 else f"pair{i}@example.com", "firstName": f"P{i}",
                "lastName": "Pair", "title": "Marketo Title" if i % 3 == 0 else "Same Title",
                **({"phone": f"+49 {i}"} if i % 5 == 0 else {})} for i in range(PAIRS)]
    kinds = ["contact", "lead", ""]
    persons += [{"email": f"marked{i}@example.com", "firstName": "Marked", "lastName": f"M{i}", "syncToDynamics": True,
                 "dynamicsSyncAs": kinds[i % 3]} for i in range(MARKED)]
    persons += [{"email": f"unmarked{i}@example.com", "firstName": "Un", "lastName": f"U{i}"} for i in range(UNMARKED)]
    pids = world.marketo_sandbox.seed_leads(persons)
    return {"contacts": contact_ids, "leads": lead_ids, "pids": pids}


def _all_persons(world) -> pd.DataFrame:
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    return world.marketo().export_leads(["id", "email", "title", "city", "phone", "dynamicsRecordId", "dynamicsRecordType"],
                                        created_at=(now - timedelta(days=2), now + timedelta(minutes=1)),
                                        poll_interval_s=0.1)


def _all_rows(world, entity_set: str) -> pd.DataFrame:
    id_column = entity_set[:-1] + "id"
    return world.dynamics().query(entity_set, [id_column, "emailaddress1", "jobtitle", "address1_city", "telephone1",
                                               "mdsync_marketopersonid"])


def test_first_sync_links_creates_and_reconciles_the_whole_database_then_its_echo_writes_nothing(sync_world, monkeypatch):
    monkeypatch.setenv("MDSYNC_MARKETO_BULK_THRESHOLD", "500")  # the link-field writes go through the bulk import
    seeded = _seed(sync_world)
    sync_world.marketo_sandbox.admin("POST", "/calls/reset")
    sync_world.dataverse_sandbox.admin("POST", "calls/reset")

    report = sync_world.cycle("first").run_all()
    seen = _data_calls(sync_world)  # before this test's own reads below

    expected_links = PAIRS + MARKED + DYNAMICS_ONLY
    assert report["new_links"] == expected_links
    assert report["created_in"] == {"dynamics": MARKED, "marketo": DYNAMICS_ONLY}
    assert report["marketo_read"] == "bulk_all" and report["marketo_write_method"] == "bulk_import"
    links = sync_world.store().load_links()
    assert len(links) == expected_links and links["dynamics_id"].is_unique

    persons = _all_persons(sync_world)
    assert len(persons) == PAIRS + MARKED + UNMARKED + DYNAMICS_ONLY  # nobody duplicated
    assert persons["email"].str.lower().is_unique
    by_email = persons.assign(key=persons["email"].str.lower()).set_index("key")
    # every linked person names its record, and the record names the person (links both ways)
    contacts, leads = _all_rows(sync_world, "contacts"), _all_rows(sync_world, "leads")
    assert len(contacts) == PAIRS // 2 + DYNAMICS_ONLY // 2 + MARKED // 3
    assert len(leads) == PAIRS // 2 + DYNAMICS_ONLY // 2 + 2 * MARKED // 3  # marked with a blank type become leads
    rows = pd.concat([contacts.rename(columns={"contactid": "rid"}).assign(kind="contact"),
                      leads.rename(columns={"leadid": "rid"}).assign(kind="lead")], ignore_index=True)
    rows["key"] = rows["emailaddress1"].str.lower()
    assert rows["key"].is_unique
    joined = rows.join(by_email, on="key", how="inner")
    assert len(joined) == expected_links
    assert (joined["mdsync_marketopersonid"] == joined["id"].astype(str)).all()
    assert (joined["dynamicsRecordId"].str.lower() == joined["rid"].str.lower()).all()
    assert (joined["dynamicsRecordType"] == joined["kind"]).all()
    # unmarked persons are left alone
    unmarked = by_email[by_email.index.str.startswith("unmarked")]
    assert len(unmarked) == UNMARKED and unmarked["dynamicsRecordId"].isna().all()
    # first-link semantics: blanks are filled from the other side, different values go to the entity's side
    pair = joined[joined["key"].str.startswith("pair")].assign(i=lambda f: f["key"].str.extract(r"(\d+)")[0].astype(int))
    assert (pair.loc[pair["i"] % 4 == 0, "city"].dropna().str.startswith("City")).sum() == len(range(0, PAIRS // 2, 4))
    assert (pair.loc[pair["i"] % 5 == 0, "telephone1"] == "+49 " + pair.loc[pair["i"] % 5 == 0, "i"].astype(str)).all()
    differ = pair[pair["i"] % 3 == 0]
    on_contact, on_lead = differ[differ["kind"] == "contact"], differ[differ["kind"] == "lead"]
    assert (on_contact["title"] == "Dynamics Title").all() and (on_contact["jobtitle"] == "Dynamics Title").all()
    assert (on_lead["title"] == "Marketo Title").all() and (on_lead["jobtitle"] == "Marketo Title").all()
    # created persons carry the Dynamics values
    assert (by_email.loc[by_email.index.str.startswith("dynonly"), "dynamicsRecordId"].notna()).all()

    # API calls against the floor (the clients' counts per task; the schema refresh reads metadata once an hour)
    used = {side: sum(t[side] for name, t in report["tasks"].items() if name != "refresh_schema")
            for side in ("marketo", "dynamics")}
    per_entity = 2  # contacts and leads
    dynamics_floor = (per_entity * math.ceil(max(len(contacts), len(leads)) / 5000)  # full reads, 5,000 a page
                      + per_entity * math.ceil(MARKED / 1000)          # UpsertMultiple creates
                      + per_entity * math.ceil(PAIRS / 2 / 1000)       # UpdateMultiple: values and link columns
                      + per_entity * math.ceil(DYNAMICS_ONLY / 2 / 1000))  # link columns of persons created in Marketo
    assert used["dynamics"] <= math.ceil(1.1 * dynamics_floor), (used, dynamics_floor)
    # Marketo: paging token, deleted leads, one id probe and one bulk export job (create, enqueue, status, file);
    # one bulk import job (create, a few status polls); the 200 creates in ceil(200/300) Sync Leads calls
    marketo_read = 2 + 1 + 4
    assert used["marketo"] <= marketo_read + math.ceil(DYNAMICS_ONLY / 300) + 6, used
    # the sandboxes saw the calls the run reported (the Marketo client also counts its token requests,
    # the Dataverse sandbox also MSAL's discovery)
    assert report["api_calls"]["marketo"] - 3 <= seen["marketo"] <= report["api_calls"]["marketo"], (seen, report)
    assert report["api_calls"]["dynamics"] <= seen["dynamics"] <= report["api_calls"]["dynamics"] + 6

    sync_world.marketo_sandbox.admin("POST", "/calls/reset")
    sync_world.dataverse_sandbox.admin("POST", "calls/reset")
    echo = sync_world.cycle("echo").run_all()
    assert echo["written"] == {"dynamics": 0, "marketo": 0} and echo["created"] == 0 and echo["new_links"] == 0
    calls = _data_calls(sync_world)
    assert calls["marketo"] <= 30 and calls["dynamics"] <= 30, calls


def _data_calls(world) -> dict[str, int]:
    """Calls each sandbox answered since its counters were reset, token requests excluded."""
    out = {}
    for name, sandbox in (("marketo", world.marketo_sandbox), ("dynamics", world.dataverse_sandbox)):
        counts = sandbox.admin("GET", "/calls")
        by_path = counts.get("by_endpoint") or counts.get("endpoints") or counts
        out[name] = sum(int(n) for path, n in by_path.items()
                        if isinstance(n, int) and "token" not in path and "/_sandbox" not in path and path != "total")
    return out


def test_many_new_dynamics_records_become_persons_through_the_bulk_import(sync_world, monkeypatch):
    monkeypatch.setenv("MDSYNC_MARKETO_BULK_THRESHOLD", "50")
    n = 120
    ids = sync_world.dataverse_sandbox.seed("leads", [
        {"emailaddress1": f"imported{i}@example.com", "firstname": "Imp", "lastname": f"I{i}", "companyname": "Bulk"}
        for i in range(n)])
    report = sync_world.cycle("first").run_all()
    assert report["created_in"] == {"dynamics": 0, "marketo": n} and report["errors"] == {"dynamics": 0, "marketo": 0}
    persons = _all_persons(sync_world)
    assert len(persons) == n and set(persons["dynamicsRecordId"].str.lower()) == {i.lower() for i in ids}
    leads = _all_rows(sync_world, "leads").set_index("leadid")
    assert (leads.loc[persons["dynamicsRecordId"], "mdsync_marketopersonid"].to_numpy() == persons["id"].astype(str).to_numpy()).all()
    echo = sync_world.cycle("echo").run_all()
    assert echo["written"] == {"dynamics": 0, "marketo": 0} and echo["created"] == 0

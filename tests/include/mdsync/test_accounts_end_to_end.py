"""Accounts to persons, one way (issue 10.5), end to end through both sandboxes, run by the engine (no Airflow).

A Dynamics contact's parent account fills its Marketo person's company fields: an account change reaches every
linked person of its contacts in the next cycle, in the fewest Sync Leads calls; a contact that moves to another
account, or is newly linked, takes that account's values; a Marketo-side edit is not synced back and stays until
the account's value changes; the cycle after writes nothing. Everything is read back through both APIs and the
state store. The module shares one world (one first sync); each case keeps to its own accounts and emails.
"""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from mdsync.config import DEFAULT_CONFIG_PATH
from mdsync.dynamics import eq
from mdsync.errors import ConfigError
from tests.fixtures.module_world import ModuleWorld, module_world

#: the persons' company fields the shipped config fills from accounts (and the link field)
COMPANY_FIELDS = ["id", "email", "company", "industry", "annualRevenue", "numberOfEmployees", "billingCity",
                  "website", "dynamicsRecordId"]
SYNC_LEADS = "POST /rest/v1/leads.json"


@pytest.fixture(scope="module")
def world(marketo_sandbox, dataverse_sandbox, tmp_path_factory):
    yield from module_world(marketo_sandbox, dataverse_sandbox, tmp_path_factory, "accounts")


def account(world: ModuleWorld, **columns) -> str:
    return world.new_row("accounts", **columns)


def set_account(world: ModuleWorld, account_id: str, **columns) -> None:
    res = world.dynamics().update_multiple("accounts", [{"accountid": account_id, **columns}])
    assert res["ok"].tolist() == [True], res.to_dict("records")


def contacts_and_persons(world: ModuleWorld, account_id: str | None, *emails: str, persons: bool = True,
                         **person_fields) -> list[str]:
    """Contacts of ``account_id`` with these emails (seeded, so change tracking reports them) and, unless
    ``persons`` is false, a Marketo person with each email (linked by email in the next cycle)."""
    parent = {"_parentcustomerid_value": account_id} if account_id else {}
    ids = world.dataverse_sandbox.seed("contacts", [{"emailaddress1": e, "lastname": e.split("@")[0], **parent}
                                                    for e in emails])
    if persons:
        world.new_persons([{"email": e, "lastName": e.split("@")[0], **person_fields} for e in emails])
    return ids


def company(world: ModuleWorld, email: str) -> dict:
    found = world.persons(email, COMPANY_FIELDS)
    assert len(found) == 1, f"expected one Marketo person with {email}, found {len(found)}"
    row = found.iloc[0].to_dict()
    return {k: (None if not isinstance(v, str) and pd.isna(v) else v) for k, v in row.items()}


def quiet(world: ModuleWorld, run_id: str) -> dict:
    """A cycle that must write nothing (the echo of the one before: no ping-pong)."""
    report = world.run(run_id)
    assert report["written"] == {"dynamics": 0, "marketo": 0}, report["written"]
    assert report["accounts"]["to_marketo"] == 0, report["accounts"]
    return report


def reset_calls(world: ModuleWorld) -> None:
    world.marketo_sandbox.admin("POST", "/calls/reset")
    world.dataverse_sandbox.admin("POST", "calls/reset")


def account_lines(world: ModuleWorld, run_id: str) -> pd.DataFrame:
    lines = world.activity(run_id=run_id)
    return lines[lines["field"].fillna("").str.startswith("account.").to_numpy()]


def test_an_account_change_reaches_all_its_contacts_persons_in_one_write_call(world):
    acme = account(world, name="Acme", industrycode=7, revenue=1_000_000, numberofemployees=50,
                   address1_city="Berlin")
    other = account(world, name="Other Ltd", numberofemployees=3)
    emails = [f"acme{i}@accounts.example" for i in range(3)]
    contacts_and_persons(world, acme, *emails)
    contacts_and_persons(world, other, "other@accounts.example")
    world.run("acme-link")  # links by email, and the first link takes the account's values
    for email in emails:
        got = company(world, email)
        assert {k: got[k] for k in COMPANY_FIELDS[2:-1]} == {
            "company": "Acme", "industry": "Consulting", "annualRevenue": 1_000_000, "numberOfEmployees": 50,
            "billingCity": "Berlin", "website": None}
    quiet(world, "acme-link-echo")

    # a Marketo-side edit is not synced back, and an unchanged account does not overwrite it
    world.set_person(int(company(world, emails[0])["id"]), company="Edited in Marketo")
    quiet(world, "acme-marketo-edit")
    assert company(world, emails[0])["company"] == "Edited in Marketo"
    assert world.dynamics().query("accounts", ["name"], filter=eq("accountid", acme))["name"].tolist() == ["Acme"]

    set_account(world, acme, name="Acme Corp", numberofemployees=75)
    reset_calls(world)
    report = world.run("acme-change")
    assert world.marketo_sandbox.calls()["by_endpoint"].get(SYNC_LEADS, 0) == 1  # 3 persons: ceil(3 / 300)
    assert report["written"] == {"dynamics": 0, "marketo": 6}  # 3 persons x (company, numberOfEmployees)
    assert report["accounts"] == {"changed": 1, "contacts_read": 3, "accounts": 1, "persons": 3, "to_marketo": 6,
                                  "held": 0}
    for email in emails:
        got = company(world, email)
        assert (got["company"], got["numberOfEmployees"], got["billingCity"]) == ("Acme Corp", 75, "Berlin")
    assert company(world, "other@accounts.example")["company"] == "Other Ltd"
    lines = account_lines(world, "acme-change")
    pids = [int(company(world, e)["id"]) for e in emails]
    assert sorted(lines["person_id"]) == sorted(pids * 2) and set(lines["action"]) == {"update"}
    edited = lines[lines["field"].eq("account.company").to_numpy() & lines["person_id"].eq(pids[0]).to_numpy()].iloc[0]
    assert (edited["old_value"], edited["new_value"], edited["dynamics_type"]) == ("Edited in Marketo", "Acme Corp",
                                                                                   "contact")
    assert edited["detail"] == "company fields from account 'Acme Corp' -> Marketo"
    quiet(world, "acme-change-echo")


def test_a_contact_moved_to_another_account_takes_its_values(world):
    initech = account(world, name="Initech", numberofemployees=10, address1_city="Austin", websiteurl="https://initech.example")
    umbrella = account(world, name="Umbrella", revenue=500_000, address1_city="Raccoon City")
    contact_id, = contacts_and_persons(world, initech, "mover@accounts.example")
    world.run("mover-link")
    assert company(world, "mover@accounts.example")["company"] == "Initech"
    quiet(world, "mover-link-echo")

    moved = world.dynamics().request("PATCH", f"contacts({contact_id})",
                                     json={"parentcustomerid_account@odata.bind": f"/accounts({umbrella})"})
    assert moved.status_code == 204
    world.run("mover-move")
    got = company(world, "mover@accounts.example")
    # the new account's values, and what the old one gave that the new one lacks is cleared
    assert (got["company"], got["annualRevenue"], got["billingCity"]) == ("Umbrella", 500_000, "Raccoon City")
    assert got["numberOfEmployees"] is None and got["website"] is None
    details = set(account_lines(world, "mover-move")["detail"])
    assert details == {"company fields from account 'Umbrella' (the contact's new account) -> Marketo"}
    quiet(world, "mover-move-echo")


def test_a_first_link_takes_the_accounts_values_and_a_created_person_gets_them_next_cycle(world):
    hooli = account(world, name="Hooli", industrycode=6, address1_city="Palo Alto")
    # a contact of Hooli and an existing person with its email (linked by email), whose own website stays: Hooli
    # has none, and a first link never blanks a value
    contacts_and_persons(world, hooli, "gavin@accounts.example", website="https://gavin.example")
    # a contact of Hooli without a person: the cycle creates one, which takes the values in the next cycle
    contacts_and_persons(world, hooli, "richard@accounts.example", persons=False)
    report = world.run("hooli-link")
    assert report["created_in"]["marketo"] == 1
    got = company(world, "gavin@accounts.example")
    assert (got["company"], got["industry"], got["billingCity"], got["website"]) == (
        "Hooli", "Business Services", "Palo Alto", "https://gavin.example")
    assert set(account_lines(world, "hooli-link")["detail"]) == {
        "company fields from account 'Hooli' (the contact's account, first sync) -> Marketo"}
    assert company(world, "richard@accounts.example")["company"] is None  # created by this cycle, after its plan

    world.run("hooli-created")  # the new person's contact came back (the sync set its link column)
    assert company(world, "richard@accounts.example")["company"] == "Hooli"
    quiet(world, "hooli-echo")


def test_a_dry_run_writes_nothing_and_the_real_run_after_it_does(world):
    globex = account(world, name="Globex", numberofemployees=20)
    contacts_and_persons(world, globex, "hank@accounts.example")
    world.run("globex-link")
    quiet(world, "globex-link-echo")
    set_account(world, globex, name="Globex Corporation")
    before = len(world.activity())
    reset_calls(world)
    report = world.run("globex-dry", dry_run=True)
    assert report["accounts"]["to_marketo"] == 1 and report["written"] == {"dynamics": 0, "marketo": 0}
    assert world.marketo_sandbox.calls()["by_endpoint"].get(SYNC_LEADS, 0) == 0
    assert company(world, "hank@accounts.example")["company"] == "Globex"
    assert len(world.activity()) == before  # nothing recorded, no baseline or delta link moved
    world.run("globex-real")
    assert company(world, "hank@accounts.example")["company"] == "Globex Corporation"
    quiet(world, "globex-echo")


def test_a_misspelt_account_column_is_a_config_error_before_any_write(world, tmp_path, monkeypatch):
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    next(f for f in raw["accounts"]["fields"] if f["name"] == "employees")["dynamics"] = "numberofemployes"
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MDSYNC_CONFIG", str(path))
    reset_calls(world)
    with pytest.raises(ConfigError) as refused:
        world.run("misspelt-account-column")
    assert ("accounts.fields[2].dynamics (employees): Dataverse table 'account' has no column 'numberofemployes' "
            "(did you mean 'numberofemployees'?)") in str(refused.value)
    writes = {k: n for k, n in world.marketo_sandbox.calls()["by_endpoint"].items() if k.startswith("POST /rest/v1/")}
    assert writes == {}


def test_a_full_read_of_accounts_reads_their_contacts_in_one_query_and_writes_nothing_new(world):
    """As when the accounts section is added to a running sync (or the accounts' delta link is lost): every
    account is read, their contacts' parents in one paged query, and only values not written yet are written."""
    from datetime import datetime, timezone

    stark = account(world, name="Stark Industries", numberofemployees=1000)
    contacts_and_persons(world, stark, "pepper@accounts.example")
    world.run("stark-link")
    quiet(world, "stark-link-echo")
    set_account(world, stark, address1_city="Malibu")  # a value not written yet
    world.store().save_watermark("dynamics", "account", datetime.now(timezone.utc), None, "lost-delta-link")
    reset_calls(world)
    report = world.run("stark-full-read")
    assert report["accounts"]["changed"] >= 6 and report["accounts"]["to_marketo"] == 1  # every account read
    assert world.dataverse_calls().get("GET /api/data/v9.2/contacts") == 2  # the contacts' delta, the parents' scan
    assert report["written"]["marketo"] == 1 and company(world, "pepper@accounts.example")["billingCity"] == "Malibu"
    quiet(world, "stark-full-read-echo")


def test_rows_are_found_by_any_of_many_values_in_url_sized_filters_with_escaped_literals(world):
    from mdsync.extract import query_any

    names = [f"O'Query {i}" for i in range(5)]
    world.dataverse_sandbox.seed("contacts", [{"lastname": n, "emailaddress1": f"q{i}@accounts.example"}
                                              for i, n in enumerate(names)])
    reset_calls(world)
    found = query_any(world.dynamics(), "contacts", ["contactid", "lastname"], "lastname", names + ["nobody"],
                      per_query=2)
    assert sorted(found["lastname"]) == names
    assert world.dataverse_calls().get("GET /api/data/v9.2/contacts") == 3  # ceil(6 / 2)


def test_a_value_marketo_cannot_take_is_a_record_error_retried_on_request_or_when_it_changes(world, tmp_path,
                                                                                             monkeypatch):
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["accounts"]["fields"].append({"name": "role", "marketo": "leadRole", "dynamics": "name"})  # 50 characters
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MDSYNC_CONFIG", str(path))
    long_name = "Cyberdyne Systems Corporation of North America Inc."  # 51 characters
    cyberdyne = account(world, name=long_name)
    contacts_and_persons(world, cyberdyne, "miles@accounts.example")
    report = world.run("cyberdyne-link")
    assert report["errors"]["marketo"] == 1
    person = world.person("miles@accounts.example", fields=["id", "company", "leadRole"])
    assert (person["company"], person["leadRole"]) == (long_name, None)  # the person's other fields went through
    pid = int(person["id"])
    error = world.open_errors(pid)[["target", "field", "code"]].values.tolist()
    assert error == [["marketo", "account.role", "too_long"]]
    line = account_lines(world, "cyberdyne-link").set_index("field").loc["account.role"]
    assert line["action"] == "error" and line["detail"] == (
        "Marketo rejected the value: too_long value is 51 characters but the Marketo field allows 50; not sent "
        "(values are never truncated); not re-sent until the value changes")
    quiet(world, "cyberdyne-link-echo")  # not re-sent while the account keeps it

    assert world.run("cyberdyne-retry", retry_failed=True)["errors"]["marketo"] == 1  # asked for: tried again
    set_account(world, cyberdyne, name="Cyberdyne")
    world.run("cyberdyne-renamed")
    person = world.person("miles@accounts.example", fields=["id", "company", "leadRole"])
    assert (person["company"], person["leadRole"]) == ("Cyberdyne", "Cyberdyne")
    assert world.open_errors(pid).empty
    quiet(world, "cyberdyne-echo")

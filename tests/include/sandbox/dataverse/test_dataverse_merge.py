"""``Merge`` in the Dataverse sandbox as merge-entity-using-web-api.md and the entity reference describe it: the
subordinate deactivated with ``masterid`` and ``merged`` set, ``UpdateContent`` on the target, the rows pointing
at the subordinate moved where the relationship cascades merges, ``PerformParentingChecks``, and all of it
reported by change tracking; read back over real HTTPS."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from sandbox.dataverse.store import Store
from tests.include.sandbox.dataverse.test_dataverse_sandbox import Api, api, error_of  # noqa: F401  (fixture)

STATE = "_masterid_value,merged,statecode,statuscode"


def ref(kind: str, row_id: str) -> dict:
    """An entity reference as Merge takes it."""
    return {"@odata.type": f"Microsoft.Dynamics.CRM.{kind}", f"{kind}id": row_id}


def merge(api, kind: str, target: str, sub: str, content: dict | None = None, checks=False):
    return api("POST", "Merge", json={"Target": ref(kind, target), "Subordinate": ref(kind, sub),
                                      "UpdateContent": {"@odata.type": f"Microsoft.Dynamics.CRM.{kind}",
                                                        **(content or {})},
                                      "PerformParentingChecks": checks})


def state_of(api, entity_set: str, row_id: str) -> tuple:
    row = api("GET", f"{entity_set}({row_id})", params={"$select": STATE}).json()
    return row["_masterid_value"], row["merged"], row["statecode"], row["statuscode"]


def track(api, entity_set: str, select: str) -> str:
    """A delta link taken now (the initial read's rows are not looked at)."""
    return api("GET", entity_set, params={"$select": select},
               headers={"Prefer": "odata.track-changes"}).json()["@odata.deltaLink"]


def delta(api, link: str) -> dict:
    """The rows a delta link reports, by id (deletions keyed ``deleted:<id>``)."""
    body = api.session.get(link, verify=api.sb.ca_bundle, timeout=30).json()
    id_key = next(k for k in ("contactid", "leadid", "accountid") if f"/{k[:-2]}s?" in link)
    return {r.get(id_key) or f"deleted:{r['id']}": r for r in body["value"]}


def test_contact_merge_deactivates_the_subordinate_and_moves_its_children(dataverse, api):
    target, sub = dataverse.seed("contacts", [
        {"lastname": "Keep", "emailaddress1": "keep@x.org", "modifiedon": "2020-01-01T00:00:00Z"},
        {"lastname": "Dup", "emailaddress1": "dup@x.org", "telephone1": "555"}])
    child = dataverse.seed("contacts", [{"lastname": "Child", "_parentcustomerid_value": sub}])[0]
    lead = dataverse.seed("leads", [{"lastname": "L", "_parentcontactid_value": sub}])[0]
    contacts_link = track(api, "contacts", STATE + ",telephone1,_parentcustomerid_value,modifiedon")
    leads_link = track(api, "leads", "_parentcontactid_value")
    assert state_of(api, "contacts", sub) == (None, False, 0, 1)

    assert merge(api, "contact", target, sub, {"telephone1": "555"}).status_code == 204

    assert state_of(api, "contacts", sub) == (target, True, 1, 2)
    kept = api("GET", f"contacts({target})", params={"$select": STATE + ",telephone1,modifiedon"}).json()
    assert (kept["telephone1"], kept["merged"], kept["statecode"]) == ("555", False, 0)
    assert kept["modifiedon"] > "2020-01-01T00:00:00Z"
    changed = delta(api, contacts_link)
    assert set(changed) == {target, sub, child}
    assert {k: changed[sub][k] for k in STATE.split(",")} == {
        "_masterid_value": target, "merged": True, "statecode": 1, "statuscode": 2}
    assert changed[target]["telephone1"] == "555"
    assert changed[child]["_parentcustomerid_value"] == target  # contact_customer_contacts: Merge Cascade
    assert delta(api, leads_link)[lead]["_parentcontactid_value"] == target  # lead_parent_contact: Cascade
    active = api("GET", "contacts", params={"$select": "lastname", "$filter": "statecode eq 0"}).json()["value"]
    assert sorted(r["lastname"] for r in active) == ["Child", "Keep"]
    merged_into = api("GET", "contacts", params={"$select": "lastname",
                                                 "$filter": f"_masterid_value eq {target}"}).json()["value"]
    assert [r["lastname"] for r in merged_into] == ["Dup"]


def test_lead_merge_disqualifies_the_subordinate_as_canceled(dataverse, api):
    target, sub = dataverse.seed("leads", [{"lastname": "Keep"}, {"lastname": "Dup", "companyname": "Dup Inc"}])
    contact = dataverse.seed("contacts", [{"lastname": "From dup", "_originatingleadid_value": sub}])[0]
    link = track(api, "leads", STATE)
    assert merge(api, "lead", target, sub, {"companyname": "Dup Inc"}).status_code == 204
    assert state_of(api, "leads", sub) == (target, True, 2, 7)
    got = api("GET", f"leads({target})", params={"$select": "companyname,statecode"}).json()
    assert (got["companyname"], got["statecode"]) == ("Dup Inc", 0)
    changed = delta(api, link)
    assert set(changed) == {target, sub} and changed[sub]["merged"] is True
    moved = api("GET", f"contacts({contact})", params={"$select": "_originatingleadid_value"}).json()
    assert moved["_originatingleadid_value"] == target  # contact_originating_lead: Merge Cascade


def test_account_merge_moves_the_contacts_to_the_target_account(dataverse, api):
    target, sub = dataverse.seed("accounts", [{"name": "Keep Ltd"}, {"name": "Dup Ltd"}])
    people = dataverse.seed("contacts", [{"lastname": f"P{i}", "_parentcustomerid_value": sub} for i in range(3)])
    link = track(api, "contacts", "_parentcustomerid_value")
    assert merge(api, "account", target, sub, {"accountnumber": "A-1"}).status_code == 204
    assert state_of(api, "accounts", sub) == (target, True, 1, 2)
    assert api("GET", f"accounts({target})", params={"$select": "accountnumber"}).json()["accountnumber"] == "A-1"
    changed = delta(api, link)
    assert set(changed) == set(people) and {r["_parentcustomerid_value"] for r in changed.values()} == {target}


def test_parenting_checks_refuse_subordinates_with_another_parent(dataverse, api):
    acme, other = dataverse.seed("accounts", [{"name": "Acme"}, {"name": "Other"}])
    target, same, elsewhere, orphan = dataverse.seed("contacts", [
        {"lastname": "T", "_parentcustomerid_value": acme}, {"lastname": "S", "_parentcustomerid_value": acme},
        {"lastname": "E", "_parentcustomerid_value": other}, {"lastname": "O"}])
    refused = merge(api, "contact", target, elsewhere, {"telephone1": "1"}, checks=True)
    assert refused.status_code == 400
    code, message = error_of(refused)
    assert code == "0x80044331" and elsewhere in message and other in message and acme in message
    assert state_of(api, "contacts", elsewhere) == (None, False, 0, 1)  # nothing written
    assert api("GET", f"contacts({target})", params={"$select": "telephone1"}).json()["telephone1"] is None
    assert merge(api, "contact", target, same, checks=True).status_code == 204
    assert merge(api, "contact", target, orphan, checks=True).status_code == 204  # no parent to lose
    assert merge(api, "contact", target, elsewhere, checks=False).status_code == 204
    assert api("GET", f"contacts({target})", params={"$select": "_parentcustomerid_value"}).json()[
        "_parentcustomerid_value"] == acme  # the master keeps its own parent


@pytest.mark.parametrize("case", ["again", "identical", "inactive_master", "read_only_content", "no_checks",
                                  "other_type", "unsupported"])
def test_merge_refusals_name_the_records_and_write_nothing(dataverse, api, case):
    target, sub, closed = dataverse.seed("contacts", [{"lastname": "T"}, {"lastname": "S"},
                                                      {"lastname": "C", "statecode": 1, "statuscode": 2}])
    if case == "again":
        assert merge(api, "contact", target, sub).status_code == 204
        resp, fragment = merge(api, "contact", target, sub), f"sub-entity:contact-{sub} is deactive"
    elif case == "identical":
        resp, fragment = merge(api, "contact", target, target), "master and sub-entities that are identical"
    elif case == "inactive_master":
        resp, fragment = merge(api, "contact", closed, sub), f"master entity:contact-{closed} is deactive"
    elif case == "read_only_content":
        resp, fragment = merge(api, "contact", target, sub, {"merged": True}), "'merged' attribute"
    elif case == "no_checks":
        resp = api("POST", "Merge", json={"Target": ref("contact", target), "Subordinate": ref("contact", sub)})
        fragment = "'PerformParentingChecks' is required"
    elif case == "other_type":
        lead = dataverse.seed("leads", [{"lastname": "L"}])[0]
        resp = api("POST", "Merge", json={"Target": ref("contact", target), "Subordinate": ref("lead", lead),
                                          "PerformParentingChecks": False})
        fragment = "same type"
    else:
        resp = api("POST", "Merge", json={"Target": ref("fieldpermission", target),
                                          "Subordinate": ref("fieldpermission", sub), "PerformParentingChecks": False})
        fragment = "This type: fieldpermission is not supported with merge operation"
    assert resp.status_code == 400 and fragment in error_of(resp)[1]
    expected_sub = (target, True, 1, 2) if case == "again" else (None, False, 0, 1)
    assert state_of(api, "contacts", sub) == expected_sub
    assert state_of(api, "contacts", target) == (None, False, 0, 1)


def test_merged_and_masterid_are_read_only_and_default_to_unmerged(dataverse, api):
    created = api("POST", "contacts", json={"lastname": "New"}, headers={"Prefer": "return=representation"},
                  params={"$select": STATE})
    assert created.status_code == 201
    row = created.json()
    assert (row["merged"], row["_masterid_value"]) == (False, None)
    other = dataverse.seed("contacts", [{"lastname": "Other"}])[0]
    for body in ({"merged": True}, {"masterid@odata.bind": f"/contacts({other})"}):
        refused = api("PATCH", f"contacts({row['contactid']})", json=body)
        assert refused.status_code == 400 and "not valid for update" in error_of(refused)[1]
    lead = api("GET", "leads", params={"$select": STATE}).json()
    assert lead["value"] == []  # the columns exist on leads too (no 400 for the $select)


def test_a_database_from_before_the_merge_columns_gains_them(tmp_path):
    old = Store(tmp_path / "old.sqlite3")
    with old.engine.begin() as conn:  # as an older sandbox left it: no merge columns
        for table in ("contact", "lead", "account"):
            conn.execute(sa.text(f'ALTER TABLE "{table}" DROP COLUMN "merged"'))
            conn.execute(sa.text(f'ALTER TABLE "{table}" DROP COLUMN "_masterid_value"'))
    old.engine.dispose()
    store = Store(tmp_path / "old.sqlite3")
    ids = store.seed(store.entity("contacts"), [{"lastname": "Kept"}])
    rows, _next, _total = store.query(store.entity("contacts"), select=STATE)
    assert rows[0]["contactid"] == ids[0] and (rows[0]["merged"], rows[0]["_masterid_value"]) == (False, None)


def test_deletes_follow_the_relationships_delete_behaviour(dataverse, api):
    account = dataverse.seed("accounts", [{"name": "Gone Ltd"}])[0]
    staff = dataverse.seed("contacts", [{"lastname": f"S{i}", "_parentcustomerid_value": account} for i in range(2)])
    lead = dataverse.seed("leads", [{"lastname": "L", "_parentaccountid_value": account,
                                     "_parentcontactid_value": staff[0]}])[0]
    contacts_link, leads_link = track(api, "contacts", "lastname"), track(api, "leads", "_parentaccountid_value")
    assert api("DELETE", f"accounts({account})").status_code == 204
    # contact_customer_accounts: Delete Cascade; lead_parent_account and lead_parent_contact: RemoveLink
    assert set(delta(api, contacts_link)) == {f"deleted:{i}" for i in staff}
    assert api("GET", f"contacts({staff[1]})").status_code == 404
    changed = delta(api, leads_link)
    assert set(changed) == {lead} and changed[lead]["_parentaccountid_value"] is None
    got = api("GET", f"leads({lead})", params={"$select": "_parentaccountid_value,_parentcontactid_value"}).json()
    assert (got["_parentaccountid_value"], got["_parentcontactid_value"]) == (None, None)

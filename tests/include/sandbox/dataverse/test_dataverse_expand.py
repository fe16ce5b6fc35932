"""``$expand`` of single-valued navigation properties in the Dataverse sandbox (a contact's parent account, a
lead's parent account, an account's primary contact): the related row nested as the Web API nests it (or
null), on collections, pages, single rows and creates; refused with change tracking as documented; one query per
page, not per row; over real HTTPS."""

from __future__ import annotations

import time

from tests.include.sandbox.dataverse.test_dataverse_sandbox import Api, api, error_of  # noqa: F401  (fixture)

ACCOUNT_FIELDS = "name,industrycode,revenue,numberofemployees,address1_city"
EXPAND = f"parentcustomerid_account($select={ACCOUNT_FIELDS})"


def test_contacts_with_their_parent_account_nested(dataverse, api):
    acme = dataverse.seed("accounts", [{"name": "Acme", "industrycode": 7, "revenue": 1500.5,
                                        "numberofemployees": 40, "address1_city": "Lyon"}])[0]
    ann, bob = dataverse.seed("contacts", [{"lastname": "Ann", "_parentcustomerid_value": acme},
                                           {"lastname": "Bob"}])
    cy = dataverse.seed("contacts", [{"lastname": "Cy", "_parentcustomerid_value": ann}])[0]  # a contact parent
    resp = api("GET", "contacts", params={"$select": "lastname", "$expand": EXPAND, "$orderby": "lastname"})
    assert resp.status_code == 200
    rows = {r["lastname"]: r for r in resp.json()["value"]}
    etag = api("GET", f"accounts({acme})", params={"$select": "name"}).json()["@odata.etag"]
    assert rows["Ann"]["parentcustomerid_account"] == {
        "@odata.etag": etag, "accountid": acme, "name": "Acme", "industrycode": 7, "revenue": 1500.5,
        "numberofemployees": 40, "address1_city": "Lyon"}
    assert rows["Bob"]["parentcustomerid_account"] is None
    assert rows["Cy"]["parentcustomerid_account"] is None  # its parent customer is a contact
    assert set(rows["Ann"]) == {"@odata.etag", "contactid", "lastname", "parentcustomerid_account"}
    both = api("GET", f"contacts({cy})", params={
        "$select": "lastname", "$expand": "parentcustomerid_account($select=name),parentcustomerid_contact"
                                          "($select=lastname;)"}).json()
    assert both["parentcustomerid_account"] is None
    parent = both["parentcustomerid_contact"]
    assert (parent["lastname"], parent["contactid"]) == ("Ann", ann)
    whole = api("GET", f"contacts({bob})", params={"$select": "lastname",
                                                   "$expand": "parentcustomerid_account"}).json()
    assert whole["parentcustomerid_account"] is None


def test_expansions_on_single_rows_creates_and_other_tables(dataverse, api):
    acme = dataverse.seed("accounts", [{"name": "Acme"}])[0]
    lead = dataverse.seed("leads", [{"lastname": "L", "_parentaccountid_value": acme}])[0]
    got = api("GET", f"leads({lead})", params={"$select": "lastname", "$expand": "parentaccountid($select=name)"})
    assert got.json()["parentaccountid"]["name"] == "Acme"
    contact = dataverse.seed("contacts", [{"firstname": "Yvonne", "lastname": "McKay"}])[0]
    created = api("POST", "accounts", params={"$select": "name", "$expand": "primarycontactid($select=fullname)"},
                  json={"name": "Sample Account", "primarycontactid@odata.bind": f"/contacts({contact})"},
                  headers={"Prefer": "return=representation"})
    assert created.status_code == 201
    assert {k: v for k, v in created.json()["primarycontactid"].items() if k != "@odata.etag"} == {
        "fullname": "Yvonne McKay", "contactid": contact}
    updated = api("PATCH", f"accounts({created.json()['accountid']})", json={"name": "Renamed"},
                  params={"$select": "name", "$expand": "primarycontactid"},
                  headers={"Prefer": "return=representation"})
    assert updated.status_code == 200 and "primarycontactid" not in updated.json()  # an update ignores $expand


def test_expand_pages_keep_their_expansion(dataverse, api):
    acme = dataverse.seed("accounts", [{"name": "Acme"}])[0]
    dataverse.seed("contacts", [{"lastname": f"P{i}", "_parentcustomerid_value": acme} for i in range(5)])
    body = api("GET", "contacts", params={"$select": "lastname", "$expand": "parentcustomerid_account($select=name)"},
               headers={"Prefer": "odata.maxpagesize=3"}).json()
    second = api.session.get(body["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=3"},
                             verify=dataverse.ca_bundle).json()
    names = [r["parentcustomerid_account"]["name"] for r in body["value"] + second["value"]]
    assert names == ["Acme"] * 5 and "@odata.nextLink" not in second


def test_expand_refusals(dataverse, api):
    cases = [({"$expand": "nope"}, 400, "Could not find a property named 'nope' on type "
                                        "'Microsoft.Dynamics.CRM.contact'."),
             ({"$expand": "parentcustomerid"}, 400, "Could not find a property named 'parentcustomerid'"),
             ({"$expand": "parentcustomerid_account($filter=name eq 'x')"}, 400, "only $select"),
             ({"$expand": "parentcustomerid_account($select=nope)"}, 400, "Could not find a property named 'nope' "
                                                                          "on type 'Microsoft.Dynamics.CRM.account'.")]
    for params, status, fragment in cases:
        resp = api("GET", "contacts", params=params)
        assert resp.status_code == status and fragment in error_of(resp)[1], params
    tracked = api("GET", "contacts", params={"$select": "lastname", "$expand": EXPAND},
                  headers={"Prefer": "odata.track-changes"})
    documented = 'The "expand" query parameter isn\'t supported when Change Tracking is enabled.'
    assert tracked.status_code == 400 and error_of(tracked)[1] == documented
    link = api("GET", "contacts", params={"$select": "lastname"},
               headers={"Prefer": "odata.track-changes"}).json()["@odata.deltaLink"]
    on_delta = api.session.get(link + "&$expand=" + EXPAND, verify=dataverse.ca_bundle)
    assert on_delta.status_code == 400 and error_of(on_delta)[1] == documented


def test_a_secured_account_column_is_left_out_of_the_expansion(dataverse, api):
    acme = dataverse.seed("accounts", [{"name": "Acme", "revenue": 9.0}])[0]
    dataverse.seed("contacts", [{"lastname": "Ann", "_parentcustomerid_value": acme}])
    dataverse.admin("PUT", "security", {"secured_columns": {"account": ["revenue"]}})
    row = api("GET", "contacts", params={"$select": "lastname", "$expand": EXPAND}).json()["value"][0]
    assert "revenue" not in row["parentcustomerid_account"] and row["parentcustomerid_account"]["name"] == "Acme"


def test_a_full_page_of_5000_contacts_expands_set_wise(dataverse, api):
    accounts = dataverse.seed("accounts", [{"name": f"Account {i}", "revenue": float(i)} for i in range(100)])
    dataverse.seed("contacts", [{"lastname": f"C{i}", "_parentcustomerid_value": accounts[i % 100]}
                                for i in range(5000)])
    params = {"$select": "lastname,_parentcustomerid_value"}
    started = time.monotonic()
    plain = api("GET", "contacts", params=params).json()["value"]
    plain_s = time.monotonic() - started
    started = time.monotonic()
    page = api("GET", "contacts", params={**params, "$expand": EXPAND}).json()
    expanded_s = time.monotonic() - started
    assert len(plain) == len(page["value"]) == 5000 and "@odata.nextLink" not in page
    by_id = dict(zip(accounts, range(100)))
    assert all(r["parentcustomerid_account"]["accountid"] == r["_parentcustomerid_value"]
               and r["parentcustomerid_account"]["revenue"] == float(by_id[r["_parentcustomerid_value"]])
               for r in page["value"])
    # one query per 500 related ids, not one per row: the expansion costs about what formatting the page does
    assert expanded_s < 3 * plain_s + 1.0, (plain_s, expanded_s)

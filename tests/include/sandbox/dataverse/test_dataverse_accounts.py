"""Accounts in the Dataverse sandbox with what contacts and leads have: writes and their validation (money,
choices, whole numbers), queries and paging, change tracking with deletions, the bulk messages, admin seeding,
and contacts' parent account readable and filterable; over real HTTPS."""

from __future__ import annotations

from tests.include.sandbox.dataverse.test_dataverse_sandbox import Api, api, error_of  # noqa: F401  (fixture)

ACCOUNT = "Microsoft.Dynamics.CRM.account"
FIELDS = "name,industrycode,revenue,numberofemployees,address1_city"


def entity_id(resp) -> str:
    return resp.headers["OData-EntityId"].rsplit("(", 1)[1][:-1]


def pages(api, path: str, params: dict, page_size: int, tracking: bool = False) -> tuple[list[list[dict]], dict]:
    """Every page of a query followed through ``@odata.nextLink``; returns the pages and the last body."""
    prefer = f"odata.maxpagesize={page_size}" + (",odata.track-changes" if tracking else "")
    body = api("GET", path, params=params, headers={"Prefer": prefer}).json()
    out = [body["value"]]
    while "@odata.nextLink" in body:
        body = api.session.get(body["@odata.nextLink"], headers={"Prefer": prefer}, verify=api.sb.ca_bundle).json()
        out.append(body["value"])
    return out, body


def test_account_create_update_delete_and_validation(api):
    created = api("POST", "accounts", json={"name": "Contoso", "industrycode": 7, "revenue": 1250000.557,
                                            "numberofemployees": 120, "address1_city": "Lyon"},
                  headers={"Prefer": "return=representation"}, params={"$select": FIELDS})
    assert created.status_code == 201
    row = created.json()
    assert {k: row[k] for k in FIELDS.split(",")} == {"name": "Contoso", "industrycode": 7, "revenue": 1250000.56,
                                                      "numberofemployees": 120, "address1_city": "Lyon"}
    account = row["accountid"]
    assert api("PATCH", f"accounts({account})", json={"revenue": 2000000, "address1_city": "Paris"},
               headers={"If-Match": row["@odata.etag"]}).status_code == 204
    got = api("GET", f"accounts({account})", params={"$select": "revenue,address1_city"}).json()
    assert (got["revenue"], got["address1_city"]) == (2000000.0, "Paris")
    for body, code, fragment in (
            ({"revenue": -1}, "0x80044331", "outside the valid range (0 to 100000000000000)"),
            ({"revenue": "lots"}, "0x80048d19", "revenue"),
            ({"industrycode": 999}, "0x80044331", "Accepted Values: 1,"),
            ({"numberofemployees": 2_000_000_000}, "0x80044331", "outside the valid range (0 to 1000000000)"),
            ({"name": "n" * 161}, "0x80044331", "maximum allowed length of '160'")):
        refused = api("PATCH", f"accounts({account})", json=body)
        assert refused.status_code == 400 and error_of(refused)[0] == code and fragment in error_of(refused)[1]
    assert api("DELETE", f"accounts({account})").status_code == 204
    assert api("GET", f"accounts({account})").status_code == 404


def test_account_queries_filter_order_and_page(dataverse, api):
    dataverse.seed("accounts", [{"name": f"A{i:02d}", "industrycode": 7 if i % 2 else 1, "revenue": i * 1000.0,
                                 "numberofemployees": i, "address1_city": "Lyon" if i < 10 else "Oslo"}
                                for i in range(25)])
    found, last = pages(api, "accounts", {"$select": "name,revenue", "$filter": "industrycode eq 7 and revenue gt "
                                          "4000 and address1_city eq 'Lyon'", "$orderby": "revenue desc",
                                          "$count": "true"}, page_size=2)
    assert [[r["name"] for r in page] for page in found] == [["A09", "A07"], ["A05"]]
    every, _ = pages(api, "accounts", {"$select": "name"}, page_size=10)
    assert [len(p) for p in every] == [10, 10, 5] and len({r["accountid"] for p in every for r in p}) == 25
    counted = api("GET", "accounts", params={"$select": "name", "$filter": "startswith(name,'A1')",
                                             "$count": "true", "$top": "3"}).json()
    assert counted["@odata.count"] == 10 and len(counted["value"]) == 3


def test_account_change_tracking_reports_changes_and_deletions(dataverse, api):
    ids = dataverse.seed("accounts", [{"name": f"T{i}"} for i in range(5)])
    initial, body = pages(api, "accounts", {"$select": "name,revenue"}, page_size=2, tracking=True)
    assert [len(p) for p in initial] == [2, 2, 1] and "@odata.deltaLink" in body
    assert api("PATCH", f"accounts({ids[1]})", json={"revenue": 10}).status_code == 204
    assert api("DELETE", f"accounts({ids[2]})").status_code == 204
    added = entity_id(api("POST", "accounts", json={"name": "New"}))
    changes = api.session.get(body["@odata.deltaLink"], verify=dataverse.ca_bundle).json()
    assert changes["@odata.context"].endswith("$metadata#accounts/$delta")
    rows = {r.get("accountid") or r["id"]: r for r in changes["value"]}
    assert (rows[ids[1]]["name"], rows[ids[1]]["revenue"]) == ("T1", 10.0)
    assert rows[added]["name"] == "New"
    assert rows[ids[2]] == {"@odata.context": "$metadata#accounts/$deletedEntity", "id": ids[2], "reason": "deleted"}
    assert len(rows) == 3
    again = api.session.get(changes["@odata.deltaLink"], verify=dataverse.ca_bundle).json()
    assert again["value"] == []


def test_account_bulk_messages(api):
    created = api("POST", "accounts/Microsoft.Dynamics.CRM.CreateMultiple", json={"Targets": [
        {"@odata.type": ACCOUNT, "name": "B1", "revenue": 1}, {"@odata.type": ACCOUNT, "name": "B2"}]})
    assert created.status_code == 200
    first, second = created.json()["Ids"]
    updated = api("POST", "accounts/Microsoft.Dynamics.CRM.UpdateMultiple", json={"Targets": [
        {"@odata.type": ACCOUNT, "accountid": first, "numberofemployees": 5},
        {"@odata.type": ACCOUNT, "accountid": second, "industrycode": 3}]})
    assert updated.status_code == 204
    fresh = "5b3cbb8e-0d2a-4a52-9c3a-7a2f6f3c0a11"
    upserted = api("POST", "accounts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [
        {"@odata.type": ACCOUNT, "@odata.id": f"accounts({first})", "name": "B1 renamed"},
        {"@odata.type": ACCOUNT, "@odata.id": f"accounts({fresh})", "name": "B3"}]})
    assert upserted.status_code == 200 and upserted.json()["Ids"] == [first, fresh]
    rows = api("GET", "accounts", params={"$select": "name,numberofemployees,industrycode,revenue",
                                          "$orderby": "name"}).json()["value"]
    assert [(r["name"], r["numberofemployees"], r["industrycode"], r["revenue"]) for r in rows] == [
        ("B1 renamed", 5, None, 1.0), ("B2", None, 3, None), ("B3", None, None, None)]
    refused = api("POST", "accounts/Microsoft.Dynamics.CRM.UpdateMultiple", json={"Targets": [
        {"@odata.type": ACCOUNT, "accountid": first, "revenue": 7},
        {"@odata.type": ACCOUNT, "accountid": second, "revenue": -7}]})
    assert refused.status_code == 400 and "revenue" in error_of(refused)[1]
    assert api("GET", f"accounts({first})", params={"$select": "revenue"}).json()["revenue"] == 1.0


def test_contacts_parent_account_is_bound_read_filtered_and_tracked(dataverse, api):
    acme, globex = dataverse.seed("accounts", [{"name": "Acme"}, {"name": "Globex"}])
    ann = entity_id(api("POST", "contacts", json={"lastname": "Ann",
                                                  "parentcustomerid_account@odata.bind": f"/accounts({acme})"}))
    dataverse.seed("contacts", [{"lastname": "Bob", "_parentcustomerid_value": globex}, {"lastname": "Cy"}])
    link = api("GET", "contacts", params={"$select": "lastname,_parentcustomerid_value"},
               headers={"Prefer": "odata.track-changes"}).json()["@odata.deltaLink"]
    got = api("GET", f"contacts({ann})", params={"$select": "_parentcustomerid_value"}).json()
    assert got["_parentcustomerid_value"] == acme
    at_acme = api("GET", "contacts", params={"$select": "lastname",
                                             "$filter": f"_parentcustomerid_value eq {acme}"}).json()["value"]
    assert [r["lastname"] for r in at_acme] == ["Ann"]
    orphans = api("GET", "contacts", params={"$select": "lastname",
                                             "$filter": "_parentcustomerid_value eq null"}).json()["value"]
    assert [r["lastname"] for r in orphans] == ["Cy"]
    missing = api("PATCH", f"contacts({ann})", json={
        "parentcustomerid_account@odata.bind": "/accounts(00000000-0000-0000-0000-000000000001)"})
    assert missing.status_code == 404 and "account With Id = 00000000-0000-0000-0000-000000000001" in error_of(
        missing)[1]
    assert api("PATCH", f"contacts({ann})", json={
        "parentcustomerid_account@odata.bind": f"/accounts({globex})"}).status_code == 204
    changed = api.session.get(link, verify=dataverse.ca_bundle).json()["value"]
    assert [(r["lastname"], r["_parentcustomerid_value"]) for r in changed] == [("Ann", globex)]


def test_account_seeding_and_money_metadata(dataverse, api):
    answer = dataverse.admin("POST", "rows/accounts", {"rows": [{"name": "S1", "revenue": 5.5}], "return_ids": False})
    assert answer == {"count": 1}
    meta = api("GET", "EntityDefinitions(LogicalName='account')/Attributes/Microsoft.Dynamics.CRM."
                      "MoneyAttributeMetadata", params={"$select": "LogicalName,MinValue,MaxValue,Precision"})
    revenue = next(a for a in meta.json()["value"] if a["LogicalName"] == "revenue")
    assert (revenue["@odata.type"], revenue["MinValue"], revenue["MaxValue"], revenue["Precision"]) == (
        "#Microsoft.Dynamics.CRM.MoneyAttributeMetadata", 0, 100000000000000, 2)
    assert api("GET", "accounts", params={"$select": "revenue"}).json()["value"][0]["revenue"] == 5.5

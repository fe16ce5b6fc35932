"""``statecode`` / ``statuscode`` changes in the Dataverse sandbox by PATCH and bulk update: checked against each
entity's State and Status options (the entity reference), a deactivation seen by change tracking and by
``$filter=statecode eq 0``, and QualifyLead agreeing with it; read back over real HTTPS."""

from __future__ import annotations

import pytest

from tests.include.sandbox.dataverse.test_dataverse_sandbox import Api, api, error_of  # noqa: F401  (fixture)

INVALID_STATE = "0x80048408"


def state(api, entity_set: str, row_id: str) -> tuple[int, int]:
    row = api("GET", f"{entity_set}({row_id})", params={"$select": "statecode,statuscode"}).json()
    return row["statecode"], row["statuscode"]


@pytest.mark.parametrize("entity_set", ["contacts", "accounts"])
def test_deactivation_by_patch_is_a_change_and_leaves_the_active_filter(dataverse, api, entity_set):
    name = "lastname" if entity_set == "contacts" else "name"
    stays, goes = dataverse.seed(entity_set, [{name: "Stays"}, {name: "Goes"}])
    link = api("GET", entity_set, params={"$select": f"{name},statecode,statuscode"},
               headers={"Prefer": "odata.track-changes"}).json()["@odata.deltaLink"]
    assert api("PATCH", f"{entity_set}({goes})", json={"statecode": 1}).status_code == 204
    assert state(api, entity_set, goes) == (1, 2)  # the state's default status reason
    changed = api.session.get(link, verify=dataverse.ca_bundle).json()["value"]
    assert [(r[name], r["statecode"], r["statuscode"]) for r in changed] == [("Goes", 1, 2)]
    active = api("GET", entity_set, params={"$select": name, "$filter": "statecode eq 0"}).json()["value"]
    assert [r[name] for r in active] == ["Stays"]
    assert api("PATCH", f"{entity_set}({goes})", json={"statecode": 0, "statuscode": 1}).status_code == 204
    assert state(api, entity_set, goes) == (0, 1)


@pytest.mark.parametrize("entity_set, start, body, message", [
    ("contacts", None, {"statecode": 0, "statuscode": 2}, "2 is not a valid status code for state code "
                                                          "ContactState.Active on contact with Id {id}."),
    ("contacts", None, {"statuscode": 2}, "2 is not a valid status code for state code ContactState.Active on "
                                          "contact with Id {id}."),
    ("contacts", {"statecode": 1, "statuscode": 2}, {"statuscode": 1},
     "1 is not a valid status code for state code ContactState.Inactive on contact with Id {id}."),
    ("leads", None, {"statecode": 2, "statuscode": 3}, "3 is not a valid status code for state code "
                                                       "LeadState.Disqualified on lead with Id {id}."),
    ("accounts", None, {"statecode": 1, "statuscode": 1}, "1 is not a valid status code for state code "
                                                          "AccountState.Inactive on account with Id {id}."),
])
def test_a_status_of_another_state_is_refused_and_nothing_changes(dataverse, api, entity_set, start, body, message):
    row_id = dataverse.seed(entity_set, [{**(start or {})}])[0]
    before = state(api, entity_set, row_id)
    refused = api("PATCH", f"{entity_set}({row_id})", json=body)
    assert refused.status_code == 400 and error_of(refused) == (INVALID_STATE, message.format(id=row_id))
    assert state(api, entity_set, row_id) == before


def test_unknown_state_values_and_creates_in_another_state(api):
    bad = api("POST", "contacts", json={"lastname": "X", "statecode": 1})
    assert bad.status_code == 400 and "not valid for create" in error_of(bad)[1]
    inactive_status = api("POST", "contacts", json={"lastname": "X", "statuscode": 2})
    assert inactive_status.status_code == 400 and error_of(inactive_status)[0] == INVALID_STATE
    created = api("POST", "contacts", json={"lastname": "X"})
    row_id = created.headers["OData-EntityId"].rsplit("(", 1)[1][:-1]
    unknown = api("PATCH", f"contacts({row_id})", json={"statecode": 5})
    assert unknown.status_code == 400 and "Accepted Values: 0,1" in error_of(unknown)[1]


def test_lead_states_by_patch_agree_with_qualify_lead(dataverse, api):
    lead = dataverse.seed("leads", [{"lastname": "Lead", "emailaddress1": "lead@x.org"}])[0]
    assert api("PATCH", f"leads({lead})", json={"statecode": 2, "statuscode": 5}).status_code == 204
    assert state(api, "leads", lead) == (2, 5)  # Disqualified, Cannot Contact
    closed = api("POST", f"leads({lead})/Microsoft.Dynamics.CRM.QualifyLead", json={"CreateContact": True,
                                                                                   "Status": 3})
    assert closed.status_code == 400 and "already closed" in error_of(closed)[1]
    assert api("PATCH", f"leads({lead})", json={"statecode": 0}).status_code == 204  # reactivated
    assert state(api, "leads", lead) == (0, 1)
    qualified = api("POST", f"leads({lead})/Microsoft.Dynamics.CRM.QualifyLead", json={"CreateContact": True,
                                                                                      "Status": 3})
    assert qualified.status_code == 200 and state(api, "leads", lead) == (1, 3)
    open_leads = api("GET", "leads", params={"$select": "leadid", "$filter": "statecode eq 0"}).json()["value"]
    assert open_leads == []


def test_update_multiple_checks_each_pair_and_fails_as_a_whole(dataverse, api):
    first, second = dataverse.seed("contacts", [{"lastname": "A"}, {"lastname": "B"}])
    kind = "Microsoft.Dynamics.CRM.contact"
    failed = api("POST", "contacts/Microsoft.Dynamics.CRM.UpdateMultiple", json={"Targets": [
        {"@odata.type": kind, "contactid": first, "statecode": 1},
        {"@odata.type": kind, "contactid": second, "statecode": 1, "statuscode": 1}]})
    assert failed.status_code == 400 and error_of(failed) == (INVALID_STATE, "1 is not a valid status code for "
                                                              "state code ContactState.Inactive on contact with "
                                                              f"Id {second}.")
    assert state(api, "contacts", first) == (0, 1)  # all or nothing
    done = api("POST", "contacts/Microsoft.Dynamics.CRM.UpdateMultiple", json={"Targets": [
        {"@odata.type": kind, "contactid": first, "statecode": 1},
        {"@odata.type": kind, "contactid": second, "statecode": 1, "statuscode": 2}]})
    assert done.status_code == 204
    assert (state(api, "contacts", first), state(api, "contacts", second)) == ((1, 2), (1, 2))


def test_a_lead_qualified_into_an_existing_contact_keeps_its_parent_contact(dataverse, api):
    contact = dataverse.seed("contacts", [{"lastname": "Existing", "emailaddress1": "same@x.org"}])[0]
    lead = dataverse.seed("leads", [{"lastname": "Lead", "emailaddress1": "same@x.org"}])[0]
    assert api("PATCH", f"leads({lead})", json={"parentcontactid@odata.bind": f"/contacts({contact})"}).status_code == 204
    qualified = api("POST", f"leads({lead})/Microsoft.Dynamics.CRM.QualifyLead",
                    json={"CreateContact": False, "CreateAccount": False, "Status": 3})
    assert qualified.status_code == 200 and qualified.json()["value"] == []  # nothing created
    row = api("GET", f"leads({lead})", params={"$select": "statecode,_parentcontactid_value"}).json()
    assert (row["statecode"], row["_parentcontactid_value"]) == (1, contact)

"""Merge Leads (leads.md "Merge", Swagger ``mergeLeadsUsingPOST``) and how the merge is reported.

The path's lead wins; ``leadId`` (one) and/or ``leadIds`` (up to 25, comma-separated or repeated) lose;
``mergeInCRM`` is a boolean. Losers leave the lead database; the winner carries one Merge Leads activity
(type 32) naming them in ``Merge IDs``, read through Get Lead Activities with a paging token, and the losers'
activities. Every answer is schema-checked.
"""

from __future__ import annotations

import pytest

from tests.include.sandbox.marketo.test_marketo_sandbox_contract import Api, error_code

MERGE_LEADS = 32


@pytest.fixture
def api(marketo):
    caller = Api(marketo)
    yield caller
    assert caller.violations == [], "responses that do not match swagger-mapi.json"


def paging_token(api) -> str:
    return api.json("GET", "/rest/v1/activities/pagingtoken.json",
                    params={"sinceDatetime": "2020-01-01T00:00:00Z"})["nextPageToken"]


def create(api, *records) -> list[int]:
    body = api.json("POST", "/rest/v1/leads.json", json={"action": "createOnly", "input": list(records)})
    assert [r["status"] for r in body["result"]] == ["created"] * len(records), body
    return [r["id"] for r in body["result"]]


def merge(api, winner: int, **params) -> dict:
    return api.json("POST", f"/rest/v1/leads/{winner}/merge.json", params=params)


def activities(api, token: str, type_ids, **params) -> dict:
    return api.json("GET", "/rest/v1/activities.json",
                    params={"nextPageToken": token, "activityTypeIds": ",".join(map(str, type_ids)), **params})


def test_merge_keeps_the_winner_fills_its_blanks_and_the_losers_disappear(api):
    token = paging_token(api)
    a, b, c = create(api, {"email": "a@x.io", "firstName": "Ann"},
                     {"email": "b@x.io", "firstName": "Bea", "phone": "555", "company": "B Corp"},
                     {"email": "c@x.io", "company": "C Corp", "city": "Cork"})
    api.json("POST", "/rest/v1/leads.json", json={"input": [{"email": "b@x.io", "title": "CTO"}]})
    body = merge(api, a, leadIds=f"{b},{c}")
    assert set(body) == {"requestId", "success"} and body["success"] is True  # leads.md's response
    fields = "email,firstName,phone,company,city,title"
    (winner,) = api.json("GET", f"/rest/v1/lead/{a}.json", params={"fields": fields})["result"]
    # The winner's values win; its blanks take the first loser's value (leads.md).
    assert winner == {"id": a, "email": "a@x.io", "firstName": "Ann", "phone": "555", "company": "B Corp",
                      "city": "Cork", "title": "CTO"}
    # The losers are gone from the lead database: not returned by id, by filter or by email.
    assert api.json("GET", f"/rest/v1/lead/{b}.json")["result"] == []
    by_id = api.json("GET", "/rest/v1/leads.json", params={"filterType": "id", "filterValues": f"{a},{b},{c}"})
    assert [r["id"] for r in by_id["result"]] == [a]
    assert api.json("GET", "/rest/v1/leads.json", params={"filterType": "email", "filterValues": "c@x.io"})[
        "result"] == []

    # One Merge Leads activity on the winner, naming the losers.
    merges = activities(api, token, [MERGE_LEADS])
    (act,) = merges["result"]
    assert (act["leadId"], act["activityTypeId"], act["primaryAttributeValueId"]) == (a, MERGE_LEADS, a)
    assert act["attributes"] == [{"name": "Merge IDs", "value": f"[{b},{c}]"},
                                 {"name": "Merge Source", "value": "Web service API"},
                                 {"name": "Merged in Sales", "value": False},
                                 {"name": "Master Updated", "value": True}]
    assert merges["moreResult"] is False
    assert activities(api, merges["nextPageToken"], [MERGE_LEADS])["result"] == []
    # The activity logs are combined: the losers' activities are the winner's now.
    new_leads = activities(api, token, [12])["result"]
    assert [x["leadId"] for x in new_leads] == [a, a, a]
    assert activities(api, token, [12, 13], leadIds=f"{b},{c}")["result"] == []
    changes = activities(api, token, [13], leadIds=str(a))["result"]
    # b's own change (Job Title) and the merge's fills, each a Change Data Value of the winner.
    assert {x["primaryAttributeValue"] for x in changes} == {"Job Title", "Phone Number", "Company Name", "City"}
    # The losers also show as deleted leads (Delete Lead, 37), as a deletion does in the sandbox.
    gone = api.json("GET", "/rest/v1/activities/deletedleads.json", params={"nextPageToken": token})["result"]
    assert [x["leadId"] for x in gone] == [b, c]
    # The type is described with its attributes.
    types = {t["id"]: t for t in api.json("GET", "/rest/v1/activities/types.json")["result"]}
    assert [x["name"] for x in types[MERGE_LEADS]["attributes"]] == ["Merge IDs", "Merge Source", "Merged in Sales",
                                                                     "Master Updated"]


def test_merge_leads_activities_page_with_their_token(api):
    token = paging_token(api)
    a, b, c, d, e = create(api, *({"email": f"{n}@x.io", "firstName": n} for n in "abcde"))
    merge(api, a, leadId=b)
    merge(api, c, leadIds=d, mergeInCRM="false")
    merge(api, e, leadId=a, mergeInCRM="true")  # no CRM synced here: merged in Marketo only
    pages, page_token = [], token
    while True:
        page = activities(api, page_token, [MERGE_LEADS], batchSize=2)
        pages.append([(x["leadId"], x["attributes"][0]["value"]) for x in page["result"]])
        page_token = page["nextPageToken"]
        if not page["moreResult"]:
            break
    # a's own Merge Leads activity went to e with the rest of a's log.
    assert pages == [[(e, f"[{b}]"), (c, f"[{d}]")], [(e, f"[{a}]")]]
    # Nothing to fill on e (a had no value e lacked): "Master Updated" says so.
    last = activities(api, token, [MERGE_LEADS], leadIds=str(e))["result"][-1]
    assert last["attributes"][2:] == [{"name": "Merged in Sales", "value": False},
                                      {"name": "Master Updated", "value": False}]
    # e now carries all of a's and b's activity (b's came to a with the first merge).
    assert {x["leadId"] for x in activities(api, token, [12])["result"]} == {c, e}


def test_a_merged_losers_id_is_refused_afterwards(api):
    a, b, d = create(api, {"email": "a@x.io"}, {"email": "b@x.io"}, {"email": "d@x.io"})
    merge(api, a, leadId=b)
    # As a winner or a loser of another merge: 1004, and nothing is merged.
    assert error_code(merge(api, b, leadId=d)) == "1004"
    refused = merge(api, d, leadIds=f"{a},{b}")
    assert error_code(refused) == "1004" and str(b) in refused["errors"][0]["message"]
    assert len(api.json("GET", "/rest/v1/leads.json", params={"filterType": "id", "filterValues": f"{a},{d}"})[
        "result"]) == 2
    # Updated by id, deleted: the record-level "Lead not found".
    upd = api.json("POST", "/rest/v1/leads.json", json={"action": "updateOnly", "lookupField": "id",
                                                        "input": [{"id": b, "firstName": "x"}]})
    assert upd["result"][0]["status"] == "skipped" and upd["result"][0]["reasons"][0]["code"] == "1004"
    deleted = api.json("POST", "/rest/v1/leads/delete.json", json={"input": [{"id": b}]})
    assert deleted["result"][0]["status"] == "skipped" and deleted["result"][0]["reasons"][0]["code"] == "1004"
    # Its email makes a new lead with a new id: a loser's id is never given again.
    (again,) = create(api, {"email": "b@x.io"})
    assert again > d


def test_merge_parameters_and_limits(api):
    a, b, c, d = create(api, *({"email": f"{n}@x.io"} for n in "abcd"))
    assert error_code(merge(api, a)) == "701"
    assert error_code(merge(api, 987654, leadId=b)) == "1004"
    assert error_code(merge(api, a, leadIds=f"{b},987654")) == "1004"  # all or nothing
    assert error_code(merge(api, a, leadIds=",".join(str(i) for i in range(10_000, 10_026)))) == "1080"
    assert error_code(merge(api, a, leadId=f"{b},{c}")) == "1003"  # leadId is one id
    assert error_code(merge(api, a, leadIds="x")) == "1003"
    assert error_code(merge(api, a, leadId=b, mergeInCRM="maybe")) == "1003"
    assert error_code(merge(api, a, leadId=a)) == "1003"  # the winner cannot lose too
    assert len(api.json("GET", "/rest/v1/leads.json", params={"filterType": "id",
                                                              "filterValues": f"{a},{b},{c},{d}"})["result"]) == 4
    # 25 is the most; leadIds repeated and leadId beside it are all losers.
    extra = create(api, *({"email": f"many{i}@x.io"} for i in range(22)))
    body = merge(api, a, leadId=b, leadIds=[f"{c},{d}", ",".join(map(str, extra))])
    assert body["success"] is True
    left = api.json("GET", "/rest/v1/leads.json", params={"filterType": "id",
                                                          "filterValues": ",".join(map(str, [a, b, c, d, *extra]))})
    assert [r["id"] for r in left["result"]] == [a]

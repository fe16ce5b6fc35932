"""Contract of the sandbox's Bulk Lead Import and Bulk Activity Export over real HTTP.

JSON responses on Swagger paths are schema-checked by the ``Api`` caller; files are read as CSV.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone

import pytest

from tests.fixtures.waiting import wait_for
from tests.include.sandbox.marketo.test_marketo_sandbox_contract import Api, error_code


@pytest.fixture
def api(marketo):
    caller = Api(marketo)
    yield caller
    marketo.hold_bulk(False)
    assert caller.violations == [], "responses that do not match swagger-mapi.json"


def submit(api, text: str, fmt: str = "csv", **params):
    files = {"file": ("leads.csv", text.encode(), "text/csv")}
    return api.json("POST", "/bulk/v1/leads.json", params={"format": fmt, **params}, files=files)


def finished(api, batch_id: int) -> dict:
    def check():
        job = api.json("GET", f"/bulk/v1/leads/batch/{batch_id}.json")["result"][0]
        return job if job["status"] in ("Complete", "Failed") else None
    return wait_for(check, f"import batch {batch_id} to finish")


def rows_of(text: str, delimiter: str = ",") -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))


def test_import_creates_and_updates_by_email_and_reports_each_failed_row(api, marketo):
    (known,) = marketo.seed_leads([{"email": "known@example.com", "firstName": "Old", "lastName": "Kept",
                                    "leadScore": 5}])
    token = api.json("GET", "/rest/v1/activities/pagingtoken.json",
                     params={"sinceDatetime": "2020-01-01T00:00:00Z"})["nextPageToken"]
    text = ("email,firstName,lastName,leadScore,company,favouriteColour\n"
            "KNOWN@example.com,New,,7,,\n"                      # update; blank lastName keeps "Kept"
            'new@example.com,"Ñandú, ""the bird""","Line\nTwo",3,Acme,\n'
            "not-an-email,X,,1,,\n"                               # 1001 email
            "bad@example.com,X,,seven,,\n"                        # 1001 integer
            f"long@example.com,{'x' * 256},,1,,\n"                # over 255
            "colour@example.com,C,,1,,blue\n"                     # unknown column with a value
            ",NoKey,,1,,\n"                                       # no lookup value
            "new@example.com,Again,,4,,\n")                       # same key again: a warning
    api.sb.hold_bulk(True)
    job = submit(api, text)["result"][0]
    assert job["status"] == "Queued" and job["importId"] == str(job["batchId"])
    assert api.json("GET", f"/bulk/v1/leads/batch/{job['batchId']}.json")["result"][0]["status"] == "Queued"
    assert error_code(api.json("GET", f"/bulk/v1/leads/batch/{job['batchId']}/failures.json")) == "1003"
    api.sb.hold_bulk(False)
    done = finished(api, job["batchId"])
    assert (done["status"], done["numOfLeadsProcessed"], done["numOfRowsFailed"], done["numOfRowsWithWarning"]) == \
        ("Complete", 3, 5, 1)
    assert done["message"] == "Import completed with errors, 3 records imported (3 members), 5 failed"
    failures = api.call("GET", f"/bulk/v1/leads/batch/{job['batchId']}/failures.json")
    assert failures.status_code == 200 and failures.headers["content-type"].startswith("text/csv")
    header, *failed = rows_of(failures.text)
    assert header == ["email", "firstName", "lastName", "leadScore", "company", "favouriteColour",
                      "Import Failure Reason"]
    assert [(r[0], r[-1]) for r in failed] == [
        ("not-an-email", "Invalid value 'not-an-email'. Required of type 'email'"),
        ("bad@example.com", "Invalid value 'seven'. Required of type 'integer'"),
        ("long@example.com", "Invalid value for field 'firstName': length 256 exceeds the maximum length 255"),
        ("colour@example.com", "Field 'favouriteColour' not found"),
        ("", "Value for lookup field 'email' not specified")]
    assert failed[0][:-1] == ["not-an-email", "X", "", "1", "", ""]  # the input row's own cells
    header, warned = rows_of(api.call("GET", f"/bulk/v1/leads/batch/{job['batchId']}/warnings.json").text)
    assert header[-1] == "Import Warning Reason" and warned[:2] == ["new@example.com", "Again"]
    assert "line 3" in warned[-1]
    leads = api.json("GET", "/rest/v1/leads.json", params={
        "filterType": "email", "filterValues": "known@example.com,new@example.com",
        "fields": "email,firstName,lastName,leadScore,company"})["result"]
    assert leads[0] == {"id": known, "email": "KNOWN@example.com", "firstName": "New", "lastName": "Kept",
                        "leadScore": 7, "company": None}
    assert leads[1]["firstName"] == "Again" and leads[1]["lastName"] == "Line\nTwo" and leads[1]["company"] == "Acme"
    # The same activities as Sync Leads: Change Data Value for the update, New Lead then changes for the new one.
    changes = api.json("GET", "/rest/v1/activities/leadchanges.json",
                       params={"nextPageToken": token, "fields": "firstName,leadScore"})["result"]
    summary = [(a["leadId"], a["activityTypeId"], [(f["name"], f.get("oldValue"), f["newValue"])
                                                    for f in a["fields"]]) for a in changes]
    new_id = leads[1]["id"]
    assert summary == [(known, 13, [("firstName", "Old", "New")]), (known, 13, [("leadScore", "5", "7")]),
                       (new_id, 12, []), (new_id, 13, [("firstName", "Ñandú, \"the bird\"", "Again")]),
                       (new_id, 13, [("leadScore", "3", "4")])]
    assert {a["value"] for c in changes for a in c["attributes"] if a["name"] in ("Source", "Source Type")} == \
        {"Web service API"}


def test_import_by_id_is_update_only_other_formats_and_whole_file_failures(api, marketo):
    a, b = marketo.seed_leads([{"email": "a@example.com"}, {"email": "b@example.com"}])
    job = submit(api, f"id\tcity\n{a}\tParis\n999999\tNowhere\n{b}\t\n", fmt="tsv", lookupField="id")["result"][0]
    done = finished(api, job["batchId"])
    assert (done["numOfLeadsProcessed"], done["numOfRowsFailed"]) == (2, 1)
    failures = api.call("GET", f"/bulk/v1/leads/batch/{job['batchId']}/failures.json").text
    assert rows_of(failures, "\t")[1] == ["999999", "Nowhere", "Lead not found"]
    # SSV is semicolon-separated for imports (bulk-import.md).
    job = submit(api, f"email;city\nb@example.com;Lyon\n", fmt="ssv")["result"][0]
    assert finished(api, job["batchId"])["status"] == "Complete"
    cities = api.json("GET", "/rest/v1/leads.json", params={"filterType": "id", "filterValues": f"{a},{b}",
                                                            "fields": "city"})["result"]
    assert [c["city"] for c in cities] == ["Paris", "Lyon"]
    for text, why in (("firstName\nX\n", "lookup field 'email' is not a column"), ("\n\n", "empty"),
                      ("email,email\nx@example.com,y@example.com\n", "more than once")):
        job = submit(api, text)["result"][0]
        done = finished(api, job["batchId"])
        assert done["status"] == "Failed" and why in done["message"] and "nothing imported" in done["message"]
    assert error_code(submit(api, "")) == "701"


def test_import_limits_and_parameter_errors_have_their_documented_codes(api, marketo):
    big = "email,company\n" + "".join(f"u{i}@example.com,{'c' * 90}\n" for i in range(110_000))
    assert len(big.encode()) > 10 * 1024 * 1024
    too_big = api.call("POST", "/bulk/v1/leads.json", params={"format": "csv"},
                       files={"file": ("big.csv", big.encode(), "text/csv")})
    assert too_big.status_code == 413
    assert error_code(submit(api, "email\nx@example.com\n", fmt="xml")) == "1003"
    assert error_code(submit(api, "email\nx@example.com\n", lookupField="nope")) == "1006"
    assert error_code(submit(api, "email\nx@example.com\n", lookupField="firstName")) == "1011"
    assert error_code(submit(api, "email\nx@example.com\n", listId="12")) == "1013"
    assert error_code(submit(api, "email\nx@example.com\n", partitionName="Elsewhere")) == "1003"
    assert error_code(api.json("POST", "/bulk/v1/leads.json", json={"email": "x"})) == "612"
    assert error_code(api.json("GET", "/bulk/v1/leads/batch/424242.json")) == "1013"
    # 10 jobs at most in the queue, the importing ones included: the 11th is 1016.
    api.sb.hold_bulk(True)
    queued = [submit(api, "email\nx@example.com\n", partitionName="Default")["result"][0]["batchId"]]
    queued += [submit(api, f"email\nq{i}@example.com\n")["result"][0]["batchId"] for i in range(9)]
    assert error_code(submit(api, "email\nq@example.com\n")) == "1016"
    assert api.json("GET", "/rest/v1/leads.json", params={"filterType": "email", "filterValues": "x@example.com"}
                    )["success"]
    assert api.sb.hold_bulk(False)["hold"] is False
    for batch in queued:
        assert finished(api, batch)["status"] == "Complete"
    assert 1 <= api.sb.bulk()["peak_importing"] <= 2


def test_an_injected_job_failure_fails_the_import(api, marketo):
    api.sb.fault("job_failure", path_prefix="/bulk/v1/leads.json")
    job = submit(api, "email\nx@example.com\n")["result"][0]
    done = finished(api, job["batchId"])
    assert done["status"] == "Failed" and "injected" in done["message"]
    assert finished(api, submit(api, "email\nx@example.com\n")["result"][0]["batchId"])["status"] == "Complete"


def activity_export(api, body: dict) -> dict:
    return api.json("POST", "/bulk/v1/activities/export/create.json", json=body)


def window(days_back: float = 1, days_ahead: float = 1) -> dict:
    now = datetime.now(timezone.utc)
    return {"startAt": (now - timedelta(days=days_back)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "endAt": (now + timedelta(days=days_ahead)).strftime("%Y-%m-%dT%H:%M:%SZ")}


def run_activity_export(api, body: dict) -> list[dict]:
    job = activity_export(api, body)["result"][0]
    path = f"/bulk/v1/activities/export/{job['exportId']}"
    assert api.json("POST", path + "/enqueue.json")["result"][0]["status"] == "Queued"
    wait_for(lambda: api.json("GET", path + "/status.json")["result"][0]["status"] == "Completed",
             "the activity export")
    resp = api.call("GET", path + "/file.json")
    assert resp.status_code == 200
    return list(csv.DictReader(io.StringIO(resp.text, newline="")))


def test_activity_export_writes_the_recorded_activities_with_json_attributes(api, marketo):
    body = api.json("POST", "/rest/v1/leads.json", json={"input": [
        {"email": "a@example.com", "firstName": "A"}, {"email": "b@example.com", "firstName": "B"}]})
    a, b = (r["id"] for r in body["result"])
    api.json("POST", "/rest/v1/leads.json", json={"input": [{"email": "a@example.com", "firstName": "Ä, \"2\""}]})
    api.json("POST", f"/rest/v1/leads/{a}/merge.json", params={"leadId": b})
    rows = run_activity_export(api, {"filter": {"createdAt": window()}})
    assert list(rows[0]) == ["marketoGUID", "leadId", "activityDate", "activityTypeId", "campaignId",
                             "primaryAttributeValueId", "primaryAttributeValue", "attributes"]
    kinds = [(int(r["leadId"]), int(r["activityTypeId"])) for r in rows]
    # Delete Lead (37, from the merge) is never exported; New Lead, Change Data Value and Merge Leads are,
    # the loser's New Lead as the winner's (a merge combines activity logs).
    assert kinds == [(a, 12), (a, 12), (a, 13), (a, 32)]
    change = rows[2]
    assert (change["primaryAttributeValueId"], change["primaryAttributeValue"], change["campaignId"]) == \
        ("3", "First Name", "null")
    assert json.loads(change["attributes"]) == {"New Value": "Ä, \"2\"", "Old Value": "A", "Reason": "API sync",
                                                "Source": "Web service API"}
    only = run_activity_export(api, {"format": "CSV", "fields": ["leadId", "activityTypeId", "actionResult"],
                                     "filter": {"createdAt": window(), "activityTypeIds": [13],
                                                "primaryAttributeValues": ["First Name"]}})
    assert only == [{"leadId": str(a), "activityTypeId": "13", "actionResult": "succeeded"}]
    listed = api.json("GET", "/bulk/v1/activities/export.json", params={"status": "Completed"})["result"]
    assert len(listed) == 2 and api.json("GET", "/bulk/v1/leads/export.json")["result"] == []


def test_activity_export_validation_and_a_queue_shared_with_lead_exports(api, marketo):
    assert error_code(activity_export(api, {"filter": {"createdAt": window(40, 0)}})) == "1003"
    assert error_code(activity_export(api, {"filter": {}})) == "1003"
    assert error_code(activity_export(api, {"filter": {"createdAt": window(), "activityTypeIds": [37]}})) == "1003"
    assert error_code(activity_export(api, {"filter": {"createdAt": window(),
                                                       "primaryAttributeValues": ["First Name"]}})) == "1003"
    assert error_code(activity_export(api, {"filter": {"createdAt": window(), "activityTypeIds": [13],
                                                       "primaryAttributeValues": ["x"],
                                                       "primaryAttributeValueIds": [3]}})) == "1003"
    assert error_code(activity_export(api, {"fields": ["bogus"], "filter": {"createdAt": window()}})) == "1003"
    assert error_code(activity_export(api, {"format": "XLS", "filter": {"createdAt": window()}})) == "1003"
    # One queue of 10 for lead and activity exports (bulk-extract.md "Queue").
    api.sb.hold_bulk(True)
    ids = []
    for i in range(10):
        if i % 2:
            job = activity_export(api, {"filter": {"createdAt": window()}})["result"][0]
            path = "/bulk/v1/activities/export"
        else:
            job = api.json("POST", "/bulk/v1/leads/export/create.json", json={
                "fields": ["email"], "filter": {"createdAt": window()}})["result"][0]
            path = "/bulk/v1/leads/export"
        assert api.json("POST", f"{path}/{job['exportId']}/enqueue.json")["result"][0]["status"] == "Queued"
        ids.append((path, job["exportId"]))
    extra = activity_export(api, {"filter": {"createdAt": window()}})["result"][0]
    full = api.json("POST", f"/bulk/v1/activities/export/{extra['exportId']}/enqueue.json")
    assert error_code(full) == "1029" and full["errors"][0]["message"] == "Too many jobs in queue"
    # An activity job is not a lead job.
    assert error_code(api.json("GET", f"/bulk/v1/leads/export/{extra['exportId']}/status.json")) == "1029"
    cancelled = api.json("POST", f"/bulk/v1/activities/export/{ids[1][1]}/cancel.json")["result"][0]
    assert cancelled["status"] == "Cancelled"
    api.sb.hold_bulk(False)
    for path, export_id in ids[2:]:
        wait_for(lambda: api.json("GET", f"{path}/{export_id}/status.json")["result"][0]["status"] == "Completed",
                 f"export {export_id}")

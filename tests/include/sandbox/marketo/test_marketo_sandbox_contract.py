"""Contract of the Marketo sandbox over real HTTP: identity, envelopes, record statuses, limits, persistence.

Every Lead Database response the sandbox sends here is checked against the official Swagger schema.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from sandbox.marketo import MarketoSandbox
from tests.fixtures.marketo_sandbox import (schema_checking_hook, validate_error_envelope, validate_identity,
                                            validate_response)


class Api:
    """A raw HTTP caller of the sandbox that schema-checks every JSON Lead Database response it receives."""

    def __init__(self, sb: MarketoSandbox) -> None:
        self.sb = sb
        self.http = requests.Session()
        # The sandbox CA when it serves HTTPS; no REQUESTS_CA_BUNDLE (or proxy) from the environment instead.
        self.http.trust_env = False
        self.http.verify = sb.verify
        self.violations: list[str] = []
        self._checked: list = []
        # Every response, identity ones included, goes through the fixture's one Swagger check.
        self.http.hooks["response"].append(schema_checking_hook(self.violations, self._checked))
        self.token = self.identity().json()["access_token"]

    @property
    def checked(self) -> int:
        """How many responses were schema-checked."""
        return len(self._checked)

    def identity(self, **override):
        params = {"grant_type": "client_credentials", "client_id": self.sb.client_id,
                  "client_secret": self.sb.client_secret, **override}
        return self.http.get(self.sb.base_url + "/identity/oauth/token", params=params)

    def call(self, method: str, path: str, *, token: str | None = "default", **kwargs):
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        return self.http.request(method, self.sb.base_url + path, headers=headers, **kwargs)

    def json(self, method: str, path: str, **kwargs) -> dict:
        resp = self.call(method, path, **kwargs)
        assert resp.status_code == 200, resp.text
        return resp.json()


@pytest.fixture
def api(marketo):
    caller = Api(marketo)
    yield caller
    assert caller.violations == [], "responses that do not match swagger-mapi.json"


def error_code(body: dict) -> str | None:
    assert body["success"] is False, body
    return body["errors"][0]["code"]


def test_identity_issues_expiring_bearer_tokens_and_refuses_bad_credentials(api):
    # Earlier tests share the session's token; retire it so this one sees a freshly issued token.
    api.sb.fault("expire_tokens")
    first = api.identity().json()
    assert first["token_type"] == "bearer" and first["expires_in"] > 3500 and first["scope"]
    # Asking again before expiry returns the same token with its remaining life (authentication.md).
    assert api.identity().json()["access_token"] == first["access_token"]
    bad = api.identity(client_secret="wrong")
    assert bad.status_code == 401 and bad.json()["error"] == "unauthorized"
    assert api.identity(grant_type="password").status_code == 400


def test_rest_calls_need_a_valid_bearer_token(api):
    assert error_code(api.json("GET", "/rest/v1/leads/describe.json", token=None)) == "601"
    assert error_code(api.json("GET", "/rest/v1/leads/describe.json", token="not-a-token")) == "601"
    # The access_token query parameter was retired on 2026-08-31 (authentication.md).
    body = api.json("GET", "/rest/v1/leads/describe.json", token=None, params={"access_token": api.token})
    assert error_code(body) == "601" and "Authorization" in body["errors"][0]["message"]
    api.sb.fault("expire_tokens")
    assert error_code(api.json("GET", "/rest/v1/leads/describe.json")) == "602"
    # 601/602 calls are not counted against the rate limit or quota; a new token works at once.
    api.token = api.identity().json()["access_token"]
    assert api.json("GET", "/rest/v1/leads/describe.json")["success"] is True


def test_describe_lists_standard_and_sync_fields(api):
    fields = {f["rest"]["name"]: f for f in api.json("GET", "/rest/v1/leads/describe.json")["result"]}
    for name in ("email", "firstName", "lastName", "company", "phone", "leadScore", "unsubscribed", "createdAt"):
        assert name in fields
    assert fields["createdAt"]["rest"]["readOnly"] is True
    assert fields["dynamicsRecordId"]["dataType"] == "string" and fields["dynamicsRecordId"]["length"] == 36
    assert fields["syncToDynamics"]["dataType"] == "boolean"
    d2 = api.json("GET", "/rest/v1/leads/describe2.json")["result"][0]
    by_name = {f["name"]: f for f in d2["fields"]}
    for name in ("dynamicsRecordId", "dynamicsRecordType", "syncToDynamics", "dynamicsSyncAs"):
        assert by_name[name]["updateable"] is True
    assert ["email"] in d2["searchableFields"] and ["dynamicsRecordId"] in d2["searchableFields"]
    assert ["firstName"] not in d2["searchableFields"]


def test_sync_leads_record_statuses_and_reasons(api, marketo):
    marketo.seed_leads([{"email": "dup@example.com"}, {"email": "DUP@example.com"}, {"email": "one@example.com"}])
    body = api.json("POST", "/rest/v1/leads.json", json={"action": "createOrUpdate", "input": [
        {"email": "one@example.com", "firstName": "Updated"},
        {"email": "new@example.com", "firstName": "Zoë", "lastName": "O'Brien"},
        {"email": "dup@example.com", "firstName": "x"},
        {"email": "not-an-email"},
        {"email": "long@example.com", "dynamicsRecordId": "x" * 37},
        {"email": "type@example.com", "leadScore": "ten"},
        {"email": "field@example.com", "noSuchField": 1},
        {"firstName": "no key"},
    ]})
    statuses = [(r["status"], (r.get("reasons") or [{}])[0].get("code")) for r in body["result"]]
    assert statuses == [("updated", None), ("created", None), ("skipped", "1007"), ("skipped", "1001"),
                        ("skipped", "1001"), ("skipped", "1001"), ("skipped", "1006"), ("skipped", "1003")]
    assert "36" in body["result"][4]["reasons"][0]["message"]
    only = api.json("POST", "/rest/v1/leads.json", json={"action": "createOnly", "input": [{"email": "ONE@example.com"}]})
    assert only["result"][0]["reasons"][0] == {"code": "1005", "message": "Lead already exists"}
    upd = api.json("POST", "/rest/v1/leads.json", json={"action": "updateOnly", "input": [{"email": "ghost@example.com"}]})
    assert upd["result"][0]["reasons"][0]["code"] == "1004"
    refused = api.json("POST", "/rest/v1/leads.json", json={"lookupField": "firstName", "input": [{"firstName": "a"}]})
    assert error_code(refused) == "1011"
    created_id = body["result"][1]["id"]
    lead = api.json("GET", f"/rest/v1/lead/{created_id}.json", params={"fields": "firstName,lastName,email"})
    assert lead["result"][0] == {"id": created_id, "firstName": "Zoë", "lastName": "O'Brien", "email": "new@example.com"}


def test_request_level_limits_300_records_1mb_8kb_and_filter_values(api, marketo):
    too_many = api.json("POST", "/rest/v1/leads.json", json={"input": [{"email": f"{i}@x.io"} for i in range(301)]})
    assert error_code(too_many) == "1003"
    values = ",".join(str(i) for i in range(301))
    assert error_code(api.json("GET", "/rest/v1/leads.json", params={"filterType": "id", "filterValues": values})) == "1003"
    big = api.call("POST", "/rest/v1/leads.json", data=json.dumps({"input": [{"address": "x" * 1_100_000}]}),
                   headers={"Content-Type": "application/json"})
    assert big.status_code == 413
    long_uri = api.call("GET", "/rest/v1/leads.json", params={"filterType": "email", "filterValues": "a" * 9000})
    assert long_uri.status_code == 414
    # The documented way round 414: POST with _method=GET and the query in a form body.
    ids = marketo.seed_leads([{"email": f"p{i}@x.io"} for i in range(3)])
    form = api.json("POST", "/rest/v1/leads.json", params={"_method": "GET"},
                    data={"filterType": "id", "filterValues": ",".join(map(str, ids))})
    assert [r["id"] for r in form["result"]] == ids
    bad_json = api.call("POST", "/rest/v1/leads.json", data="{nope", headers={"Content-Type": "application/json"})
    assert error_code(bad_json.json()) == "609"
    assert error_code(api.json("GET", "/rest/v1/nothing/here.json")) == "610"


def test_leads_page_by_token_to_the_end_and_email_matches_case_insensitively(api, marketo):
    ids = marketo.seed_leads([{"email": f"Page{i}@Example.com", "dynamicsRecordType": "lead"} for i in range(650)])
    got, token, pages = [], None, 0
    while True:
        params = {"filterType": "dynamicsRecordType", "filterValues": "lead", "fields": "email"}
        if token:
            params["nextPageToken"] = token
        body = api.json("GET", "/rest/v1/leads.json", params=params)
        pages += 1
        got += [r["id"] for r in body["result"]]
        token = body.get("nextPageToken")
        if not body.get("moreResult"):
            break
    assert got == ids and pages == 3
    hit = api.json("GET", "/rest/v1/leads.json", params={"filterType": "email", "filterValues": "page7@example.COM"})
    assert [r["id"] for r in hit["result"]] == [ids[7]]


def test_lead_changes_report_api_changes_with_old_and_new_values_and_seeding_records_none(api, marketo):
    marketo.seed_leads([{"email": "seed@example.com", "firstName": "Seed"}])
    token = api.json("GET", "/rest/v1/activities/pagingtoken.json",
                     params={"sinceDatetime": "2020-01-01T00:00:00+00:00"})["nextPageToken"]
    api.json("POST", "/rest/v1/leads.json", json={"input": [
        {"email": "seed@example.com", "firstName": "Grown", "syncToDynamics": True},
        {"email": "fresh@example.com", "lastName": "Fresh"}]})
    body = api.json("GET", "/rest/v1/activities/leadchanges.json",
                    params={"nextPageToken": token, "fields": "firstName,syncToDynamics"})
    changes = [(a["activityTypeId"], [(f["name"], f.get("oldValue"), f["newValue"]) for f in a["fields"]])
               for a in body["result"]]
    assert changes == [(13, [("firstName", "Seed", "Grown")]), (13, [("syncToDynamics", None, "true")]), (12, [])]
    assert {"name": "Source", "value": "Web service API"} in body["result"][0]["attributes"]
    assert body["moreResult"] is False and body["nextPageToken"]
    # The returned token continues after what was read: nothing new, nothing repeated.
    again = api.json("GET", "/rest/v1/activities/leadchanges.json",
                     params={"nextPageToken": body["nextPageToken"], "fields": "firstName"})
    assert again["result"] == []


def test_deleted_leads_merge_and_custom_activities(api, marketo):
    a, b, c = marketo.seed_leads([{"email": "a@x.io", "firstName": "A"}, {"email": "b@x.io", "phone": "555"},
                                  {"email": "c@x.io"}])
    token = api.json("GET", "/rest/v1/activities/pagingtoken.json",
                     params={"sinceDatetime": "2020-01-01T00:00:00Z"})["nextPageToken"]
    deleted = api.json("POST", "/rest/v1/leads/delete.json", json={"input": [{"id": c}, {"id": 999999}]})
    assert [r["status"] for r in deleted["result"]] == ["deleted", "skipped"]
    assert api.json("POST", f"/rest/v1/leads/{a}/merge.json", params={"leadId": b})["success"] is True
    merged = api.json("GET", f"/rest/v1/lead/{a}.json", params={"fields": "phone,firstName"})["result"][0]
    assert merged["phone"] == "555" and merged["firstName"] == "A"
    gone = api.json("GET", "/rest/v1/activities/deletedleads.json", params={"nextPageToken": token})
    assert [r["leadId"] for r in gone["result"]] == [c, b]
    too_many = api.json("POST", f"/rest/v1/leads/{a}/merge.json",
                        params={"leadIds": ",".join(str(i) for i in range(1000, 1026))})
    assert error_code(too_many) == "1080"

    bad_name = api.json("POST", "/rest/v1/activities/external/type.json", json={
        "apiName": "dynamics_sync_error", "name": "x", "triggerName": "t", "filterName": "f",
        "primaryAttribute": {"apiName": "msg", "name": "Message"}})
    assert error_code(bad_name) == "1003"
    created = api.json("POST", "/rest/v1/activities/external/type.json", json={
        "apiName": "dynamicsSyncError", "name": "Dynamics Sync Error", "triggerName": "Has Dynamics Sync Error",
        "filterName": "Had Dynamics Sync Error", "primaryAttribute": {"apiName": "errorMessage", "name": "Error"}})
    type_id = created["result"][0]["id"]
    assert created["result"][0]["status"] == "draft" and type_id >= 100000
    api.json("POST", "/rest/v1/activities/external/type/dynamicsSyncError/attributes/create.json",
             json={"attributes": [{"apiName": "entity", "name": "Entity", "dataType": "string"}]})
    record = {"leadId": a, "activityDate": "2026-01-02T03:04:05Z", "activityTypeId": type_id,
              "primaryAttributeValue": "rejected", "attributes": [{"apiName": "entity", "value": "contact"}]}
    # Not approved yet: activities of a draft type are refused per record.
    draft_try = api.json("POST", "/rest/v1/activities/external.json", json={"input": [record]})
    assert draft_try["result"][0]["status"] == "skipped"
    approved = api.json("POST", "/rest/v1/activities/external/type/dynamicsSyncError/approve.json")
    assert approved["result"][0]["status"] == "approved"
    added = api.json("POST", "/rest/v1/activities/external.json", json={"input": [record]})
    assert added["result"][0]["status"] == "added"
    listed = api.json("GET", "/rest/v1/activities.json", params={"nextPageToken": token, "activityTypeIds": type_id})
    assert listed["result"][0]["primaryAttributeValue"] == "rejected"
    assert {"name": "Entity", "apiName": "entity", "value": "contact"} in listed["result"][0]["attributes"]
    types = api.json("GET", "/rest/v1/activities/types.json")["result"]
    assert {t["id"] for t in types} >= {12, 13, 37, type_id}


def test_bulk_export_lifecycle_checksum_range_and_limits(api, marketo):
    marketo.seed_leads([{"email": f"e{i}@x.io", "firstName": None if i == 0 else f"N{i}",
                         "createdAt": f"2026-01-{1 + i % 20:02d}T10:00:00Z"} for i in range(40)])
    too_wide = api.json("POST", "/bulk/v1/leads/export/create.json", json={
        "fields": ["email"], "filter": {"createdAt": {"startAt": "2026-01-01T00:00:00Z", "endAt": "2026-03-01T00:00:00Z"}}})
    assert error_code(too_wide) == "1003"
    job = api.json("POST", "/bulk/v1/leads/export/create.json", json={
        "fields": ["id", "email", "firstName"], "columnHeaderNames": {"email": "Email Address"},
        "filter": {"createdAt": {"startAt": "2026-01-01T00:00:00Z", "endAt": "2026-01-10T23:59:59Z"}}})["result"][0]
    assert job["status"] == "Created"
    export = f"/bulk/v1/leads/export/{job['exportId']}"
    assert api.call("GET", export + "/file.json").status_code == 404
    assert api.json("POST", export + "/enqueue.json")["result"][0]["status"] == "Queued"
    assert error_code(api.json("POST", export + "/enqueue.json")) == "1029"
    deadline = time.monotonic() + 10
    while (status := api.json("GET", export + "/status.json")["result"][0])["status"] != "Completed":
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    whole = api.call("GET", export + "/file.json")
    lines = whole.text.splitlines()
    assert lines[0] == "id,Email Address,firstName" and len(lines) == 1 + 20 == 1 + status["numberOfRecords"]
    assert lines[1].endswith(",null")  # empty values are written as null
    import hashlib

    assert status["fileChecksum"] == "sha256:" + hashlib.sha256(whole.content).hexdigest()
    part = api.call("GET", export + "/file.json", headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == whole.content[:10]
    assert part.headers["Content-Range"] == f"bytes 0-9/{status['fileSize']}"
    listed = api.json("GET", "/bulk/v1/leads/export.json", params={"status": "Completed"})
    assert [j["exportId"] for j in listed["result"]] == [job["exportId"]]


def test_rate_concurrency_and_daily_quota_are_enforced_with_their_codes(tmp_path):
    with MarketoSandbox(tmp_path, rate_limit=(5, 2), max_concurrent=2, daily_quota=8) as sb:
        api = Api(sb)
        codes = [api.json("GET", "/rest/v1/leads/describe.json").get("errors", [{}]) for _ in range(6)]
        assert [c[0].get("code") if c else None for c in codes] == [None] * 5 + ["606"]
        time.sleep(2.1)
        sb.fault("delay", count=3, seconds=0.6)
        results = []
        threads = [threading.Thread(target=lambda: results.append(api.json("GET", "/rest/v1/leads/describe.json")))
                   for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert sorted(r["errors"][0]["code"] if r["errors"] else "ok" for r in results) == ["615", "ok", "ok"]
        time.sleep(2.1)
        # 5 + 2 admitted calls so far; the 8th is the last the daily quota allows.
        assert api.json("GET", "/rest/v1/leads/describe.json")["success"] is True
        assert error_code(api.json("GET", "/rest/v1/leads/describe.json")) == "607"
        stats = sb.calls()
        assert stats["limited"] == {"606": 1, "615": 1, "607": 1} and stats["peak_concurrency"] == 2
        assert api.violations == []


def test_data_and_credentials_survive_a_restart(tmp_path):
    with MarketoSandbox(tmp_path / "db") as sb:
        ids = sb.seed_leads([{"email": "keep@example.com"}])
        first = (sb.client_id, sb.client_secret)
    again = MarketoSandbox(tmp_path / "db")
    assert (again.client_id, again.client_secret) == first
    with again:
        api = Api(again)
        body = api.json("GET", "/rest/v1/leads.json", params={"filterType": "email", "filterValues": "keep@example.com"})
        assert [r["id"] for r in body["result"]] == ids


def test_admin_counts_calls_by_endpoint_and_reset_wipes_data(api, marketo):
    marketo.seed_leads([{"email": "x@example.com"}])
    api.json("GET", "/rest/v1/leads.json", params={"filterType": "email", "filterValues": "x@example.com"})
    api.json("GET", "/rest/v1/lead/1.json")
    stats = marketo.calls()
    assert stats["by_endpoint"]["GET /rest/v1/leads.json"] == 1
    assert stats["by_endpoint"]["GET /rest/v1/lead/{id}.json"] == 1
    assert stats["by_endpoint"]["GET /identity/oauth/token"] == 1
    marketo.reset()
    assert marketo.calls()["total"] == 0
    body = api.json("GET", "/rest/v1/leads.json", params={"filterType": "email", "filterValues": "x@example.com"})
    assert body["result"] == []
    bad = requests.post(marketo.admin_url + "/leads", json={"leads": [{"leadScore": "high"}]})
    assert bad.status_code == 400 and "leadScore" in bad.json()["error"]


def test_schema_check_catches_a_non_conforming_body(api, marketo):
    """A guard on the guard: the schema check rejects a wrongly typed id, a bad identity answer and malformed
    error envelopes, and does run on the calls made, errors and identity included."""
    assert validate_response("GET", "/rest/v1/leads.json", {"requestId": "r", "success": True, "result": [{"id": "1"}],
                                                            "errors": [], "warnings": []})
    assert validate_identity({"access_token": "t", "token_type": "mac", "expires_in": 10, "scope": "s"})
    assert validate_identity({"access_token": "t", "token_type": "bearer", "expires_in": 10, "scope": "s"}) == []
    good = {"requestId": "r", "success": False, "errors": [{"code": "610", "message": "Requested resource not found"}]}
    assert validate_error_envelope("GET", "/rest/v1/x.json", good) == []
    for bad in ({**good, "errors": []}, {**good, "errors": [{"code": 610, "message": "m"}]},
                {"success": False, "errors": good["errors"]}):
        assert validate_error_envelope("GET", "/rest/v1/x.json", bad), bad
    assert api.checked == 1  # the identity call that made the caller's token
    api.json("GET", "/rest/v1/leads/describe2.json")
    assert error_code(api.json("GET", "/rest/v1/nothing/here.json")) == "610"  # no operation: the bare envelope
    assert error_code(api.json("DELETE", "/rest/v1/leads/describe.json")) == "605"
    assert api.checked == 4

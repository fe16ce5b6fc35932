"""The Dataverse sandbox spoken to directly over HTTPS: shapes, codes and limits of the real service."""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid
from collections import Counter

import msal
import pytest
import requests

from sandbox.dataverse import DataverseSandbox
from tests.fixtures.waiting import wait_for

API = "/api/data/v9.2/"


def token_for(sb) -> str:
    session = requests.Session()
    session.trust_env = False
    session.verify = sb.ca_bundle
    app = msal.ConfidentialClientApplication(sb.client_id, client_credential=sb.client_secret, authority=sb.authority,
                                             instance_discovery=False, http_client=session)
    return app.acquire_token_for_client([sb.org_url + "/.default"])["access_token"]


class Api:
    """A bare HTTPS caller of the sandbox with a bearer token (no client library in between)."""

    def __init__(self, sb) -> None:
        self.sb = sb
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers["Authorization"] = "Bearer " + token_for(sb)

    def __call__(self, method: str, path: str, **kw) -> requests.Response:
        return self.session.request(method, self.sb.org_url + API + path, verify=self.sb.ca_bundle, timeout=30, **kw)


@pytest.fixture
def api(dataverse):
    return Api(dataverse)


def error_of(resp) -> tuple[str, str]:
    body = resp.json()["error"]
    return body["code"], body["message"]


# identity ---------------------------------------------------------------------------------------------------
def test_openid_discovery_and_token_errors(dataverse):
    s = requests.Session()
    s.trust_env = False
    conf = s.get(f"{dataverse.authority}/v2.0/.well-known/openid-configuration", verify=dataverse.ca_bundle).json()
    assert conf["token_endpoint"] == f"{dataverse.authority}/oauth2/v2.0/token"
    assert conf["authorization_endpoint"].startswith("https://")
    bad = s.post(conf["token_endpoint"], verify=dataverse.ca_bundle, data={
        "grant_type": "client_credentials", "client_id": dataverse.client_id, "client_secret": "wrong",
        "scope": dataverse.org_url + "/.default"})
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"
    wrong_scope = s.post(conf["token_endpoint"], verify=dataverse.ca_bundle, data={
        "grant_type": "client_credentials", "client_id": dataverse.client_id, "client_secret": dataverse.client_secret,
        "scope": "https://other.crm.dynamics.com/.default"})
    assert wrong_scope.json()["error"] == "invalid_scope"


def test_missing_and_revoked_tokens_get_401(dataverse, api):
    s = requests.Session()
    s.trust_env = False
    resp = s.get(dataverse.org_url + API + "WhoAmI", verify=dataverse.ca_bundle)
    assert resp.status_code == 401 and "error" in resp.json()
    assert api("GET", "WhoAmI").status_code == 200
    dataverse.admin("POST", "faults", {"kind": "expire_tokens"})
    assert api("GET", "WhoAmI").status_code == 401


# single-row writes -----------------------------------------------------------------------------------------
def test_create_retrieve_update_delete(api):
    created = api("POST", "contacts", json={"firstname": "Grace", "lastname": "Hopper"})
    assert created.status_code == 204
    url = created.headers["OData-EntityId"]
    row_id = url[url.index("(") + 1:-1]
    got = api("GET", f"contacts({row_id})", params={"$select": "fullname,statecode,statuscode"})
    assert got.json()["fullname"] == "Grace Hopper" and (got.json()["statecode"], got.json()["statuscode"]) == (0, 1)
    etag = got.headers["ETag"]
    assert api("PATCH", f"contacts({row_id})", json={"lastname": "H."}, headers={"If-Match": etag}).status_code == 204
    stale = api("PATCH", f"contacts({row_id})", json={"lastname": "X"}, headers={"If-Match": etag})
    assert stale.status_code == 412 and "RowVersion" in error_of(stale)[1]
    assert api("DELETE", f"contacts({row_id})").status_code == 204
    gone = api("GET", f"contacts({row_id})")
    assert gone.status_code == 404 and error_of(gone) == ("0x80040217", f"contact With Id = {row_id} Does Not Exist")


def test_upsert_by_alternate_key_with_conditions(api):
    path = "leads(mdsync_marketopersonid='77')"
    assert api("PATCH", path, json={"lastname": "X"}, headers={"If-Match": "*"}).status_code == 404
    assert api("PATCH", path, json={"lastname": "First"}).status_code == 204  # created
    refused = api("PATCH", path, json={"lastname": "Again"}, headers={"If-None-Match": "*"})
    assert refused.status_code == 412 and error_of(refused)[1] == "A record with matching key values already exists."
    assert api("PATCH", path, json={"lastname": "Second"}).status_code == 204  # updated in place
    rows = api("GET", "leads", params={"$select": "lastname,mdsync_marketopersonid"}).json()["value"]
    assert [(r["lastname"], r["mdsync_marketopersonid"]) for r in rows] == [("Second", "77")]
    duplicate = api("POST", "leads", json={"lastname": "Dup", "mdsync_marketopersonid": "77"})
    assert duplicate.status_code == 412


@pytest.mark.parametrize("body, status, code, fragment", [
    ({"lastname": "x" * 51}, 400, "0x80044331", "exceeded the maximum allowed length of '50'"),
    ({"leadsourcecode": 3}, 400, "0x80044331", "Accepted Values: 1"),
    ({"donotemail": "yes"}, 400, "0x80048d19", "donotemail"),
    ({"numberofchildren": 1.5}, 400, "0x80048d19", "numberofchildren"),
    ({"numberofchildren": -1}, 400, "0x80044331", "outside the valid range (0 to 1000000000)"),
    ({"nosuchcolumn": 1}, 400, "0x80060888", "'nosuchcolumn'"),
    ({"createdon": "2020-01-01T00:00:00Z"}, 400, "0x80048d19", "not valid for create"),
])
def test_validation_errors_have_the_service_shape(api, body, status, code, fragment):
    resp = api("POST", "contacts", json=body)
    assert resp.status_code == status
    assert error_of(resp)[0] == code and fragment in error_of(resp)[1]


def test_business_rules_and_field_security(dataverse, api):
    dataverse.admin("PUT", "rules", [{"entity": "contact", "column": "jobtitle", "op": "forbid", "values": ["Intern"],
                                      "message": "Interns can't be contacts."},
                                     {"entity": "contact", "column": "emailaddress1", "op": "match",
                                      "pattern": r"[^@\s]+@[^@\s]+"},
                                     {"entity": "lead", "column": "companyname", "op": "require"}])
    no_company = api("POST", "leads", json={"lastname": "A"})
    assert no_company.status_code == 400 and error_of(no_company) == ("0x80040265",
                                                                      "Business rule: 'companyname' is required.")
    refused = api("POST", "contacts", json={"lastname": "A", "jobtitle": "Intern"})
    assert refused.status_code == 400 and error_of(refused) == ("0x80040265", "Interns can't be contacts.")
    bad_email = api("POST", "contacts", json={"lastname": "A", "emailaddress1": "no-at-sign"})
    assert bad_email.status_code == 400 and "no-at-sign" in error_of(bad_email)[1]
    dataverse.admin("PUT", "security", {"secured_columns": {"contact": ["telephone1"]}})
    assert api("POST", "contacts", json={"lastname": "B", "telephone1": "1"}).status_code == 403
    ok = api("POST", "contacts", json={"lastname": "B"})
    assert ok.status_code == 204
    filtered = api("GET", "contacts", params={"$filter": "telephone1 eq '1'"})
    assert filtered.status_code == 403 and "telephone1" in error_of(filtered)[1]
    attrs = api("GET", "EntityDefinitions(LogicalName='contact')/Attributes",
                params={"$select": "LogicalName,IsSecured"}).json()["value"]
    assert [a["LogicalName"] for a in attrs if a["IsSecured"]] == ["telephone1"]


# queries and change tracking ----------------------------------------------------------------------------------
def test_paging_cookie_count_and_query_errors(dataverse, api):
    dataverse.seed("accounts", [{"name": f"Account {i:03d}"} for i in range(25)])
    first = api("GET", "accounts", params={"$select": "name", "$count": "true"},
                headers={"Prefer": "odata.maxpagesize=10"})
    body = first.json()
    assert body["@odata.count"] == 25 and len(body["value"]) == 10
    assert first.headers["Preference-Applied"] == "odata.maxpagesize=10"
    assert "$skiptoken=%3Ccookie%20pagenumber%3D%222%22" in body["@odata.nextLink"]
    bad_filter = api("GET", "accounts", params={"$filter": "name eq"})
    assert bad_filter.status_code == 400 and error_of(bad_filter)[0] == "0x80060888"
    bad_select = api("GET", "accounts", params={"$select": "nope"})
    assert bad_select.status_code == 400 and "'nope'" in error_of(bad_select)[1]


def test_change_tracking_refuses_filter_and_reports_deletes(dataverse, api):
    refused = api("GET", "contacts", params={"$filter": "lastname eq 'a'"}, headers={"Prefer": "odata.track-changes"})
    assert refused.status_code == 400
    assert error_of(refused)[1] == 'The "filter" query parameter isn\'t supported when Change Tracking is enabled.'
    ids = dataverse.seed("contacts", [{"lastname": "A"}, {"lastname": "B"}])
    first = api("GET", "contacts", params={"$select": "lastname"}, headers={"Prefer": "odata.track-changes"}).json()
    assert len(first["value"]) == 2 and "@odata.deltaLink" in first
    api("DELETE", f"contacts({ids[0]})")
    delta = api.session.get(first["@odata.deltaLink"], verify=dataverse.ca_bundle).json()
    assert delta["@odata.context"].endswith("$metadata#contacts/$delta")
    assert delta["value"] == [{"@odata.context": "$metadata#contacts/$deletedEntity", "id": ids[0],
                               "reason": "deleted"}]


# bulk and $batch --------------------------------------------------------------------------------------------
def test_bulk_messages_are_all_or_nothing(api):
    good = {"@odata.type": "Microsoft.Dynamics.CRM.contact", "lastname": "Good"}
    bad = {"@odata.type": "Microsoft.Dynamics.CRM.contact", "lastname": "y" * 60}
    failed = api("POST", "contacts/Microsoft.Dynamics.CRM.CreateMultiple", json={"Targets": [good, bad]})
    assert failed.status_code == 400 and error_of(failed)[0] == "0x80044331"
    assert api("GET", "contacts").json()["value"] == []
    created = api("POST", "contacts/Microsoft.Dynamics.CRM.CreateMultiple", json={"Targets": [good, good]})
    assert created.status_code == 200 and len(created.json()["Ids"]) == 2
    untyped = api("POST", "contacts/Microsoft.Dynamics.CRM.CreateMultiple", json={"Targets": [{"lastname": "A"}]})
    assert untyped.status_code == 400 and "@odata.type" in error_of(untyped)[1]


def _batch(api, parts: list[str], continue_on_error: bool) -> requests.Response:
    boundary = f"batch_{uuid.uuid4()}"
    body = "".join(f"--{boundary}\r\n{p}" for p in parts) + f"--{boundary}--\r\n"
    headers = {"Content-Type": f'multipart/mixed; boundary="{boundary}"'}
    if continue_on_error:
        headers["Prefer"] = "odata.continue-on-error"
    return api("POST", "$batch", data=body.encode(), headers=headers)


def _op(method: str, path: str, payload: dict | None = None) -> str:
    text = f"{method} {API}{path} HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n\r\n"
    return ("Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n" + text
            + (json.dumps(payload) if payload is not None else "") + "\r\n")


def test_batch_continue_on_error_and_atomic_change_sets(api):
    ops = [_op("POST", "contacts", {"lastname": "z" * 60}), _op("POST", "contacts", {"lastname": "Kept"})]
    stopped = _batch(api, ops, continue_on_error=False)
    assert stopped.status_code == 400 and stopped.text.count("HTTP/1.1 ") == 1
    went_on = _batch(api, ops, continue_on_error=True)
    assert went_on.status_code == 200 and "HTTP/1.1 400 Bad Request" in went_on.text
    assert "HTTP/1.1 204 No Content" in went_on.text and "OData-EntityId:" in went_on.text
    inner = f"changeset_{uuid.uuid4()}"
    changeset = (f"Content-Type: multipart/mixed; boundary={inner}\r\n\r\n"
                 + "".join(f"--{inner}\r\n{p}" for p in [_op("POST", "contacts", {"lastname": "Rolled back"}),
                                                          _op("POST", "contacts", {"lastname": "q" * 60})])
                 + f"--{inner}--\r\n")
    _batch(api, [changeset], continue_on_error=True)
    names = [r["lastname"] for r in api("GET", "contacts", params={"$select": "lastname"}).json()["value"]]
    assert names == ["Kept"]


# service protection, faults, admin ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict_sandbox(tmp_path_factory):
    """A second sandbox with tiny limits: 5 requests per 2 s, 1 request in flight, 2 s tokens."""
    with DataverseSandbox(tmp_path_factory.mktemp("dv-strict"), requests_per_window=5, window_s=2,
                          max_concurrent=1, token_ttl_s=2) as sb:
        yield sb


def test_request_limit_answers_429_with_retry_after(strict_sandbox):
    strict_sandbox.reset()
    api = Api(strict_sandbox)
    statuses = [api("GET", "WhoAmI") for _ in range(6)]
    assert [r.status_code for r in statuses[:5]] == [200] * 5
    limited = statuses[5]
    assert limited.status_code == 429 and error_of(limited)[0] == "0x80072322"
    assert 1 <= int(limited.headers["Retry-After"]) <= 2
    time.sleep(int(limited.headers["Retry-After"]))
    assert Api(strict_sandbox)("GET", "WhoAmI").status_code == 200  # new token: this sandbox's last 2 s


def test_tokens_expire_after_their_lifetime(strict_sandbox):
    strict_sandbox.reset()
    api = Api(strict_sandbox)
    assert api("GET", "WhoAmI").status_code == 200
    time.sleep(2.2)
    expired = api("GET", "WhoAmI")
    assert expired.status_code == 401 and error_of(expired)[1] == "The access token has expired."
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]


def test_concurrency_limit_answers_429(strict_sandbox):
    strict_sandbox.reset()
    api = Api(strict_sandbox)
    strict_sandbox.fault("delay", count=1, seconds=0.5, path_prefix="/api/data/v9.2/contacts")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(api, "GET", "contacts")
        wait_for(lambda: strict_sandbox.concurrency()["in_flight"] == 1, "the delayed request in flight", 10)
        second = api("GET", "WhoAmI")
        assert slow.result().status_code == 200
    assert second.status_code == 429 and error_of(second)[0] == "0x80072326"
    assert strict_sandbox.throttled() == {"0x80072326": 1}  # the refusal is counted by its code


def test_faults_and_call_counts(dataverse, api):
    dataverse.admin("POST", "calls/reset")
    dataverse.fault("server_error", count=1, path_prefix="/api/data/v9.2/leads")
    dataverse.fault("throttle", count=1, seconds=7, path_prefix="/api/data/v9.2/leads")
    assert api("GET", "leads").status_code == 500
    throttled = api("GET", "leads")
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
    assert api("GET", "leads").status_code == 200
    assert api("GET", "contacts").status_code == 200
    assert dataverse.calls() == {"total": 4, "by_endpoint": {"GET /api/data/v9.2/leads": 3,
                                                             "GET /api/data/v9.2/contacts": 1},
                                 "throttled": {"injected": 1}}


def throttled_seen(responses) -> Counter:
    """The 429s a client saw, by the reason the sandbox counts them under (an injected fault is ``injected``)."""
    return Counter(error_of(r)[0] for r in responses if r.status_code == 429)


def test_injected_throttles_are_counted_and_reset(dataverse, api):
    token_path = f"/{dataverse.tenant_id}/oauth2/v2.0/token"

    def token_request() -> requests.Response:
        form = {"grant_type": "client_credentials", "client_id": dataverse.client_id,
                "client_secret": dataverse.client_secret, "scope": dataverse.org_url + "/.default"}
        return api.session.post(dataverse.org_url + token_path, data=form, verify=dataverse.ca_bundle, timeout=30)

    assert dataverse.throttled() == {}
    dataverse.fault("throttle", count=2, seconds=1, path_prefix="/api/data/v9.2/WhoAmI")
    dataverse.fault("throttle", count=1, seconds=1, path_prefix=token_path)
    seen = [api("GET", "WhoAmI") for _ in range(3)]
    token_answers = [token_request() for _ in range(2)]
    assert [r.status_code for r in seen] == [429, 429, 200]
    assert [r.status_code for r in token_answers] == [429, 200]
    assert token_answers[0].json()["error"] == "temporarily_unavailable"
    # the Web API's injected 429 carries the window's code, but it is counted apart from the real limit's
    assert throttled_seen(seen) == {"0x80072322": 2}
    assert dataverse.throttled() == {"injected": 3}  # two Web API 429s and the Entra ID one
    assert dataverse.calls()["by_endpoint"]["GET /api/data/v9.2/WhoAmI"] == 3  # refused ones are calls too

    dataverse.admin("POST", "calls/reset")
    assert dataverse.calls() == {"total": 0, "by_endpoint": {}, "throttled": {}}
    dataverse.fault("throttle", count=1, path_prefix="/api/data/v9.2/WhoAmI")
    assert api("GET", "WhoAmI").status_code == 429
    assert dataverse.throttled() == {"injected": 1}
    dataverse.reset()
    assert dataverse.throttled() == {}


def test_window_refusals_are_counted_by_code_and_reset(strict_sandbox):
    strict_sandbox.reset()
    api = Api(strict_sandbox)
    # the request window (5 per 2 s): send until it refuses one
    seen = []
    for _ in range(6):
        seen.append(api("GET", "WhoAmI"))
        if seen[-1].status_code == 429:
            break
    assert throttled_seen(seen) == {"0x80072322": 1}, [r.status_code for r in seen]
    assert strict_sandbox.throttled() == throttled_seen(seen)
    strict_sandbox.admin("POST", "calls/reset")
    assert strict_sandbox.throttled() == {}


def test_state_survives_a_restart(tmp_path):
    sb = DataverseSandbox(tmp_path / "dv")
    with sb:
        ids = sb.seed("contacts", [{"lastname": "Persisted"}])
        first_api = Api(sb)
        link = first_api("GET", "contacts", headers={"Prefer": "odata.track-changes"}).json()["@odata.deltaLink"]
        ca = (tmp_path / "dv" / "ca.pem").read_bytes()
        creds = (sb.client_id, sb.client_secret, sb.tenant_id)
    again = DataverseSandbox(tmp_path / "dv")
    with again:
        assert (again.client_id, again.client_secret, again.tenant_id) == creds
        assert (tmp_path / "dv" / "ca.pem").read_bytes() == ca
        api = Api(again)
        rows = api("GET", "contacts", params={"$select": "lastname"}).json()["value"]
        assert [r["contactid"] for r in rows] == ids
        api("POST", "contacts", json={"lastname": "After restart"})
        delta_path = link.split(API, 1)[1].replace(sb.org_url, again.org_url)
        delta = api("GET", delta_path).json()["value"]
        assert [r["lastname"] for r in delta] == ["After restart"]
    assert again._process is None


def test_alternate_keys_are_in_the_metadata_and_only_an_active_key_addresses_rows(dataverse, api):
    keys = api("GET", "EntityDefinitions(LogicalName='contact')/Keys").json()
    assert keys["@odata.context"].endswith("$metadata#EntityDefinitions('contact')/Keys")
    [key] = keys["value"]
    assert (key["LogicalName"], key["KeyAttributes"], key["EntityKeyIndexStatus"]) == \
        ("mdsync_marketopersonid_key", ["mdsync_marketopersonid"], "Active")
    assert api("GET", "EntityDefinitions(LogicalName='account')/Keys").json()["value"] == []  # no link column
    path = "contacts(mdsync_marketopersonid='5')"
    assert api("PATCH", path, json={"lastname": "Keyed"}).status_code == 204

    assert dataverse.admin("PUT", "keys", {"contact": "Pending"}) == {"contact": "Pending", "lead": "Active"}
    [key] = api("GET", "EntityDefinitions(LogicalName='contact')/Keys",
                params={"$select": "LogicalName,EntityKeyIndexStatus"}).json()["value"]
    assert key.pop("MetadataId") and key == {"LogicalName": "mdsync_marketopersonid_key", "EntityKeyIndexStatus": "Pending"}
    refused = api("PATCH", path, json={"lastname": "Again"})
    assert refused.status_code == 400 and "is not part of an alternate key of 'contact' (keys: none)" in error_of(refused)[1]

    dataverse.admin("PUT", "keys", {"contact": None})
    assert api("GET", "EntityDefinitions(LogicalName='contact')/Keys").json()["value"] == []
    bad = requests.put(dataverse.admin_url + "/keys", json={"contact": "Broken"}, verify=dataverse.ca_bundle, timeout=10)
    assert bad.status_code == 400 and "Broken" in bad.text
    dataverse.reset()
    assert dataverse.admin("GET", "keys") == {"contact": "Active", "lead": "Active"}

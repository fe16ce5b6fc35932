"""Long queries sent as ``POST`` with ``_method=GET`` (lead-database.md "Long URIs") answer like the GET.

Third-party clients send the whole query, ``_method=GET`` and ``access_token`` included, as an
``application/x-www-form-urlencoded`` body (often with ``; charset=UTF-8``), or keep ``_method=GET`` in the
URL. Every JSON answer is schema-checked against the GET operation it stands for.
"""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from tests.include.sandbox.marketo.test_marketo_sandbox_contract import Api, error_code

FORM_UTF8 = "application/x-www-form-urlencoded; charset=UTF-8"


@pytest.fixture
def api(marketo):
    caller = Api(marketo)
    yield caller
    assert caller.violations == [], "responses that do not match swagger-mapi.json"


def comparable(body: dict) -> dict:
    """A response without its request id (the only part two identical calls differ in)."""
    return {k: v for k, v in body.items() if k != "requestId"}


def form_get(api, path: str, params: list[tuple[str, str]] | dict, *, content_type: str = FORM_UTF8,
             charset: str = "utf-8", in_url: bool = False, token: str | None = None) -> dict:
    """POST the query as a form body carrying ``access_token`` (no Authorization header)."""
    items = list(params.items()) if isinstance(params, dict) else list(params)
    items += [("access_token", token or api.token)]
    url = path
    if in_url:
        url += "?_method=GET"
    else:
        items = [("_method", "GET"), *items]
    body = urlencode(items, encoding=charset).encode("ascii")
    return api.json("POST", url, token=None, data=body, headers={"Content-Type": content_type})


def test_leads_by_300_emails_in_a_form_body_with_a_charset_and_a_body_token_answer_like_the_get(api, marketo):
    emails = [f"long.query.person.{i:03d}@a-rather-long-example-domain.com" for i in range(300)]
    ids = marketo.seed_leads([{"email": e, "firstName": f"N{i}"} for i, e in enumerate(emails)])
    query = {"filterType": "email", "filterValues": ",".join(emails), "fields": "email,firstName"}
    assert len(urlencode(query)) > 8 * 1024  # as a GET this is 414
    assert api.call("GET", "/rest/v1/leads.json", params=query).status_code == 414
    body = form_get(api, "/rest/v1/leads.json", query)
    assert body["success"] is True and [r["id"] for r in body["result"]] == ids
    assert body["result"][7] == {"id": ids[7], "email": emails[7], "firstName": "N7"}
    # The same answer as the GETs of its thirds, and as the documented form (_method=GET in the URL).
    thirds = [api.json("GET", "/rest/v1/leads.json", params={**query, "filterValues": ",".join(emails[i:i + 100])})
              for i in (0, 100, 200)]
    assert body["result"] == [r for part in thirds for r in part["result"]]
    assert comparable(form_get(api, "/rest/v1/leads.json", query, in_url=True)) == comparable(body)
    # Counted as the POST it was sent as.
    assert marketo.calls()["by_endpoint"]["POST /rest/v1/leads.json"] == 2


def test_activities_lead_changes_and_lead_by_id_answer_like_their_gets(api, marketo):
    token = api.json("GET", "/rest/v1/activities/pagingtoken.json",
                     params={"sinceDatetime": "2020-01-01T00:00:00Z"})["nextPageToken"]
    created = api.json("POST", "/rest/v1/leads.json", json={"input": [
        {"email": f"act{i}@example.com", "firstName": "A"} for i in range(5)]})["result"]
    ids = [r["id"] for r in created]
    api.json("POST", "/rest/v1/leads.json", json={"input": [{"email": "act0@example.com", "firstName": "B"}]})
    cases = [
        ("/rest/v1/activities.json", [("nextPageToken", token), ("activityTypeIds", "12"),
                                      ("activityTypeIds", "13"), ("batchSize", "4")]),
        ("/rest/v1/activities/leadchanges.json", {"nextPageToken": token, "fields": "firstName",
                                                  "leadIds": ",".join(map(str, ids[:2]))}),
        ("/rest/v1/activities/deletedleads.json", {"nextPageToken": token}),
        (f"/rest/v1/lead/{ids[0]}.json", {"fields": "email,firstName"}),
    ]
    for path, params in cases:
        as_get = api.json("GET", path, params=params)
        assert as_get["success"] is True, (path, as_get)
        assert comparable(form_get(api, path, params)) == comparable(as_get), path
        assert comparable(form_get(api, path, params, in_url=True)) == comparable(as_get), path
    page = api.json("GET", "/rest/v1/activities.json", params=cases[0][1])
    assert [a["activityTypeId"] for a in page["result"]] == [12, 12, 12, 12] and page["moreResult"] is True
    assert form_get(api, f"/rest/v1/lead/{ids[0]}.json", {"fields": "firstName"})["result"] == [
        {"id": ids[0], "firstName": "B"}]


def test_a_form_body_in_another_charset_is_decoded_in_it(api, marketo):
    (lead,) = marketo.seed_leads([{"email": "n@example.com", "dynamicsRecordId": "Ñandú-Zoë"}])
    query = {"filterType": "dynamicsRecordId", "filterValues": "Ñandú-Zoë", "fields": "dynamicsRecordId"}
    latin = form_get(api, "/rest/v1/leads.json", query, content_type="application/x-www-form-urlencoded; "
                     "charset=ISO-8859-1", charset="latin-1")
    assert latin["result"] == [{"id": lead, "dynamicsRecordId": "Ñandú-Zoë"}]
    assert form_get(api, "/rest/v1/leads.json", query)["result"] == latin["result"]
    # UTF-8 is the default when the Content-Type names no charset.
    plain = form_get(api, "/rest/v1/leads.json", query, content_type="application/x-www-form-urlencoded")
    assert plain["result"] == latin["result"]


def test_body_tokens_are_checked_like_header_tokens_and_url_tokens_stay_refused(api, marketo):
    query = {"filterType": "email", "filterValues": "x@example.com"}
    assert error_code(form_get(api, "/rest/v1/leads.json", query, token="not-a-token")) == "601"
    no_token = api.json("POST", "/rest/v1/leads.json", token=None, data={"_method": "GET", **query})
    assert error_code(no_token) == "601"
    # The access_token query parameter was retired on 2026-08-31 (authentication.md), long query or not.
    in_url = api.json("POST", "/rest/v1/leads.json?_method=GET&" + urlencode({"access_token": api.token}),
                      token=None, data=query)
    assert error_code(in_url) == "601" and "Authorization" in in_url["errors"][0]["message"]
    # A header token is used when both are there.
    both = api.json("POST", "/rest/v1/leads.json", data={"_method": "GET", "access_token": "stale", **query})
    assert both["success"] is True
    api.sb.fault("expire_tokens")
    assert error_code(form_get(api, "/rest/v1/leads.json", query)) == "602"
    api.token = api.identity().json()["access_token"]
    assert form_get(api, "/rest/v1/leads.json", query)["success"] is True


def test_what_is_not_a_long_query_is_refused_as_before(api, marketo):
    # A form POST without _method=GET is a Sync Leads call, which takes JSON only.
    sync = api.json("POST", "/rest/v1/leads.json", data={"filterType": "email", "filterValues": "x@example.com"})
    assert error_code(sync) == "612"
    # _method=GET with a body that is not a form.
    json_body = api.json("POST", "/rest/v1/leads.json?_method=GET", json={"filterType": "email"})
    assert error_code(json_body) == "612"
    bad_charset = api.json("POST", "/rest/v1/leads.json", data="_method=GET&filterType=email&filterValues=a",
                           headers={"Content-Type": "application/x-www-form-urlencoded; charset=no-such"})
    assert error_code(bad_charset) == "612"
    # A POST-only operation asked for as a GET is the GET of its path: a method Marketo does not serve.
    assert error_code(form_get(api, "/rest/v1/leads/delete.json", {"id": "1"})) == "605"
    # A GET-only operation posted without _method=GET.
    assert error_code(api.json("POST", "/rest/v1/activities.json", data={"nextPageToken": "x"})) == "605"


def test_long_query_answers_are_schema_checked_as_the_get_they_stand_for(api, marketo):
    import requests

    from tests.fixtures.marketo_sandbox import operation_method

    def prepared(url, **kw):
        return requests.Request("POST", marketo.base_url + url, **kw).prepare()

    assert operation_method(prepared("/rest/v1/leads.json?_method=GET", data={"filterType": "id"})) == "GET"
    assert operation_method(prepared("/rest/v1/leads.json", data=b"_method=GET&filterType=id",
                                     headers={"Content-Type": FORM_UTF8})) == "GET"
    assert operation_method(prepared("/rest/v1/leads.json", json={"_method": "GET"})) == "POST"
    before = api.checked
    form_get(api, "/rest/v1/leads.json", {"filterType": "id", "filterValues": "1"})
    assert api.checked == before + 1

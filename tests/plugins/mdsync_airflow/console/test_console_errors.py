"""The console's errors table (API, CSV and page) and *retry selected*, built from real cycles against both
sandboxes: values a Dataverse business rule refuses (a contact's and a lead's job title) and an email Marketo
refuses. Filters, paging, CSV, auth (a viewer reads but may not retry), the retry's checks (422), and a retry
started through a real Airflow API server, whose run carries ``retry_failed`` and the persons."""

from __future__ import annotations

import csv
import io
from urllib.parse import quote

import pandas as pd
import pytest
import requests


pytestmark = pytest.mark.integration

DAG_ID = "marketo_dynamics_sync"
RULE = "Interns are not synced to Dynamics (business rule)."


@pytest.fixture(scope="module")
def world(console_module_world):
    return console_module_world


@pytest.fixture(scope="module")
def rejected(world, console):
    """Four linked pairs; then Dynamics refuses the job title 'Intern' of two contacts and a lead (a business
    rule) and Marketo refuses a contact's new email 'not an email' (``err-2``); ``err-3`` retries Cat's."""
    dv = world.dataverse_sandbox
    lead_id, = dv.seed("leads", [{"emailaddress1": "lena@errors.example.com", "firstname": "Lena", "lastname": "Lead",
                                  "jobtitle": "Engineer", "companyname": "Acme", "leadsourcecode": 8}])
    cat_id, dan_id, eve_id = dv.seed("contacts", [
        {"emailaddress1": f"{n}@errors.example.com", "firstname": n.title(), "lastname": "Start", "jobtitle": "Engineer"}
        for n in ("cat", "dan", "eve")])
    lena, cat, dan, eve = world.marketo_sandbox.seed_leads(
        [{"email": "lena@errors.example.com", "firstName": "Lena", "lastName": "Lead", "title": "Engineer",
          "company": "Acme"}]
        + [{"email": f"{n}@errors.example.com", "firstName": n.title(), "lastName": "Start", "title": "Engineer"}
           for n in ("cat", "dan", "eve")])
    first = world.run("err-1")
    assert first["new_links"] == 4, first
    dv.admin("PUT", "rules", [{"entity": entity, "column": "jobtitle", "op": "forbid", "values": ["Intern"],
                               "message": RULE} for entity in ("contact", "lead")])
    world.set_person(cat, title="Intern", lastName="Changed")
    world.set_person(dan, title="Intern")
    world.set_person(lena, title="Intern")
    world.set_row("contacts", eve_id, emailaddress1="not an email")
    second = world.run("err-2")
    assert second["errors"] == {"dynamics": 3, "marketo": 1}, second["errors"]
    # Cat's title is sent again and refused again; with person_ids, retry_failed re-sends only their values
    world.run("err-3", person_ids=[cat], retry_failed=True)
    open_errors = world.store().open_errors()
    assert len(open_errors) == 4, open_errors.to_dict("records")
    return {"lead": lead_id, "cat": cat_id, "dan": dan_id, "eve": eve_id, "lena_pid": lena, "cat_pid": cat,
            "dan_pid": dan, "eve_pid": eve}


def _api(console, user="admin", **params):
    r = console.get("/mdsync/api/errors", user=user, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _names(rejected, rows) -> set[str]:
    names = {rejected[f"{n}_pid"]: n for n in ("lena", "cat", "dan", "eve")}
    return {names[r["person_id"]] for r in rows}


def test_rows_hold_the_record_field_value_message_since_when_and_attempts(console, rejected):
    data = _api(console)
    assert (data["total"], data["page"], data["page_size"]) == (4, 1, 50)
    rows = {r["person_id"]: r for r in data["rows"]}
    assert [r["id"] for r in data["rows"]] == sorted(rows[p]["id"] for p in rows)[::-1]  # newest first
    cat = rows[rejected["cat_pid"]]
    assert (cat["dynamics_type"], cat["dynamics_id"].lower()) == ("contact", rejected["cat"].lower())
    assert (cat["target"], cat["field"], cat["value"]) == ("dynamics", "job_title", "Intern")
    assert RULE in cat["message"] and cat["code"]
    assert cat["occurrences"] == 2 and cat["run_id"] == "err-3"  # refused again by the retry
    assert pd.Timestamp(cat["first_seen_at"]) < pd.Timestamp(cat["last_seen_at"])
    lena = rows[rejected["lena_pid"]]
    assert (lena["dynamics_type"], lena["target"], lena["field"]) == ("lead", "dynamics", "job_title")
    # the retry named Cat alone: the other rejections were held back, not sent again
    assert (lena["occurrences"], lena["run_id"]) == (1, "err-2")
    assert (rows[rejected["dan_pid"]]["occurrences"], rows[rejected["dan_pid"]]["run_id"]) == (1, "err-2")
    eve = rows[rejected["eve_pid"]]
    assert (eve["target"], eve["field"], eve["value"], eve["code"]) == ("marketo", "email", "not an email", "1001")
    # err-3 read no change of Eve's contact (Dataverse's delta), so her rejection was not tried again
    assert eve["message"] and (eve["occurrences"], eve["run_id"]) == (1, "err-2")


@pytest.mark.parametrize("params, expected", [
    ({"target": "marketo"}, {"eve"}),
    ({"target": "Dynamics"}, {"lena", "cat", "dan"}),
    ({"entity": "lead"}, {"lena"}),
    ({"field": "job_title", "entity": "contact"}, {"cat", "dan"}),
    ({"field": "email"}, {"eve"}),
    ({"q": "intern"}, {"lena", "cat", "dan"}),
    ({"q": "business RULE"}, {"lena", "cat", "dan"}),
    ({"q": "1001"}, {"eve"}),
    ({"q": "no such text"}, set()),
    ({"target": "", "field": "", "entity": "", "q": ""}, {"lena", "cat", "dan", "eve"}),  # an HTML form's empties
])
def test_each_filter(console, rejected, params, expected):
    data = _api(console, **params)
    assert _names(rejected, data["rows"]) == expected and data["total"] == len(expected)


def test_text_filter_takes_a_person_id_or_a_dynamics_id(console, rejected):
    assert _names(rejected, _api(console, q=str(rejected["dan_pid"]))["rows"]) == {"dan"}
    assert _names(rejected, _api(console, q=rejected["lead"])["rows"]) == {"lena"}


def test_bad_target_and_paging_are_422(console, rejected):
    r = console.get("/mdsync/api/errors", params={"target": "salesforce"})
    assert r.status_code == 422 and "target='salesforce' is not a side" in r.json()["detail"]
    for params in ({"page": 0}, {"page_size": 0}, {"page_size": 501}):
        assert console.get("/mdsync/api/errors", params=params).status_code == 422, params


def test_paging_page_two_and_page_size(console, rejected):
    everything = [r["id"] for r in _api(console, page_size=500)["rows"]]
    first, second = _api(console, page_size=3), _api(console, page_size=3, page=2)
    assert (second["total"], second["page"], second["page_size"], len(second["rows"])) == (4, 2, 3, 1)
    assert [r["id"] for r in first["rows"] + second["rows"]] == everything


def test_csv_has_a_header_and_every_matching_row(console, rejected):
    from mdsync_airflow.console.errors import CSV_COLUMNS

    r = console.get("/mdsync/api/errors.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    header, *rows = list(csv.reader(io.StringIO(r.text)))
    assert header == CSV_COLUMNS and len(rows) == 4
    eve = next(dict(zip(header, row)) for row in rows if row[header.index("person_id")] == str(rejected["eve_pid"]))
    assert (eve["target"], eve["field"], eve["value"], eve["code"], eve["occurrences"]) == (
        "marketo", "email", "not an email", "1001", "1")
    dynamics = list(csv.reader(io.StringIO(console.get("/mdsync/api/errors.csv", params={"target": "dynamics"}).text)))
    assert dynamics[0] == CSV_COLUMNS and {row[header.index("target")] for row in dynamics[1:]} == {"dynamics"}
    assert len(dynamics) == 1 + 3


def test_page_has_a_checkbox_per_error_and_the_retry_button(console, rejected):
    r = console.get("/mdsync/errors", user="viewer")
    assert r.status_code == 200
    html = r.text
    assert "4 open errors" in html and RULE in html and "not an email" in html
    for name in ("lena", "cat", "dan", "eve"):
        pid = rejected[f"{name}_pid"]
        assert f'<input type="checkbox" name="person" value="{pid}"' in html
        assert f'href="/mdsync/person?q={pid}"' in html
    assert 'data-action="retry" data-url="/mdsync/api/errors/retry"' in html and 'id="action-result"' in html
    assert 'href="/dags/marketo_dynamics_sync/runs/err-3"' in html and 'href="/mdsync/api/errors.csv"' in html
    marketo_only = console.get("/mdsync/errors", params={"target": "marketo"}).text
    assert "1 open error matching" in marketo_only and RULE not in marketo_only
    assert 'href="/mdsync/api/errors.csv?target=marketo"' in marketo_only


@pytest.mark.parametrize("path", ["/mdsync/api/errors", "/mdsync/api/errors.csv", "/mdsync/errors"])
def test_no_token_is_401_a_bad_token_403_and_neither_shows_data(console, rejected, path):
    none = console.get(path, user=None)
    bad = console.client.get(path, headers={"Authorization": "Bearer not.a.jwt"})
    assert (none.status_code, bad.status_code) == (401, 403)
    for r in (none, bad):
        assert "Intern" not in r.text and "not an email" not in r.text


def _retry(console, body, user="admin"):
    headers = {"Authorization": f"Bearer {console.token(user)}"} if user else {}
    return console.client.post("/mdsync/api/errors/retry", json=body, headers=headers)


def test_retry_needs_a_login_and_permission_to_trigger(console, rejected):
    body = {"person_ids": [rejected["cat_pid"]]}
    assert _retry(console, body, user=None).status_code == 401
    bad = console.client.post("/mdsync/api/errors/retry", json=body, headers={"Authorization": "Bearer not.a.jwt"})
    assert bad.status_code == 403
    assert _retry(console, body, user="viewer").status_code == 403  # a viewer reads the errors, may not retry


@pytest.mark.parametrize("body, says, bad_ids", [
    ({}, "a non-empty list", []),
    ({"person_ids": []}, "a non-empty list", []),
    ({"person_ids": "12"}, "a non-empty list", []),
    ({"person_ids": ["12", 1.5, True, -3]}, "not Marketo person ids", ["12", 1.5, True, -3]),
])
def test_retry_refuses_what_is_not_a_list_of_person_ids(console, rejected, body, says, bad_ids):
    r = _retry(console, body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert says in detail["message"] and detail["bad_ids"] == bad_ids


def test_retry_refuses_persons_without_an_open_error_naming_them(console, rejected):
    r = _retry(console, {"person_ids": [rejected["cat_pid"], 987654321, rejected["dan_pid"], 987654322, 987654321]})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail["bad_ids"] == [987654321, 987654322]  # each once, in the order given; the good ones not named
    assert detail["message"].startswith("no open error for persons 987654321, 987654322: ")


def test_retry_selected_starts_a_run_with_retry_failed_and_the_persons(rejected, world, airflow_api_server):
    """Through a real API server (the console calls Airflow's REST API over HTTP with the caller's token): the
    errors the cycles recorded are put into the server's state store, then admin retries two persons."""
    from mdsync.state import open_store

    server = airflow_api_server
    errors = world.store().open_errors()
    open_store(server.state_url).record_errors(
        errors[["person_id", "dynamics_type", "dynamics_id", "target", "field", "value", "code", "message"]],
        run_id="err-2")
    wanted = [rejected["dan_pid"], rejected["cat_pid"]]
    url = server.url("/mdsync/api/errors/retry")
    viewer = requests.post(url, json={"person_ids": wanted}, timeout=60,
                           headers={"Authorization": f"Bearer {server.token('viewer')}"})
    assert viewer.status_code == 403, viewer.text
    r = requests.post(url, json={"person_ids": wanted + [rejected["dan_pid"]]}, timeout=60,
                      headers={"Authorization": f"Bearer {server.token('admin')}"})
    assert r.status_code == 200, f"{r.status_code} {r.text}\n{server.log_tail()}"
    answer = r.json()
    run_id = answer["run_id"]
    assert answer["run_url"] == f"/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"
    assert str(rejected["cat_pid"]) in answer["message"]
    run = server.api("admin", f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}")
    assert run.status_code == 200, run.text
    assert run.json()["conf"] == {"retry_failed": True, "person_ids": wanted}
    assert run.json()["run_type"] == "manual"
    assert "sync console by admin" in (run.json().get("note") or "")

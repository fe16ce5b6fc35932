"""Bulk messages of the Dataverse sandbox, target by target: the set-wise reads and executemany writes behave
as writing row by row would (a later target sees what an earlier one did), and the admin API reports the
requests in flight and the recommended degree of parallelism."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.fixtures.waiting import wait_for
from tests.include.sandbox.dataverse.test_dataverse_sandbox import Api, api, error_of  # noqa: F401  (fixture)

CONTACT = "Microsoft.Dynamics.CRM.contact"


def _bulk(api, message: str, targets: list[dict]):
    return api("POST", f"contacts/Microsoft.Dynamics.CRM.{message}",
               json={"Targets": [{"@odata.type": CONTACT, **t} for t in targets]})


def _rows(api) -> list[dict]:
    return api("GET", "contacts", params={"$select": "lastname,firstname,fullname,mdsync_marketopersonid,"
                                                    "versionnumber", "$orderby": "versionnumber"}).json()["value"]


def test_upsert_of_one_key_twice_creates_then_updates_the_same_row(api):
    resp = _bulk(api, "UpsertMultiple", [
        {"@odata.id": "contacts(mdsync_marketopersonid='m1')", "lastname": "First", "firstname": "Ann"},
        {"@odata.id": "contacts(mdsync_marketopersonid='M1')", "lastname": "Second"}])  # keys compare NOCASE
    assert resp.status_code == 200
    ids = resp.json()["Ids"]
    assert ids[0] == ids[1]
    rows = _rows(api)
    assert [(r["contactid"], r["lastname"], r["fullname"], r["mdsync_marketopersonid"]) for r in rows] == [
        (ids[0], "Second", "Ann Second", "m1")]


def test_create_multiple_with_a_key_twice_fails_as_a_whole(api):
    resp = _bulk(api, "CreateMultiple", [{"lastname": "A", "mdsync_marketopersonid": "dup"},
                                         {"lastname": "B"},
                                         {"lastname": "C", "mdsync_marketopersonid": "DUP"}])
    assert resp.status_code == 412 and error_of(resp)[1] == "A record with matching key values already exists."
    assert _rows(api) == []


def test_a_key_released_earlier_in_the_request_can_be_taken_later(dataverse, api):
    a, b = dataverse.seed("contacts", [{"lastname": "A", "mdsync_marketopersonid": "k1"}, {"lastname": "B"}])
    taken_first = _bulk(api, "UpdateMultiple", [{"contactid": b, "mdsync_marketopersonid": "k1"},
                                                {"contactid": a, "mdsync_marketopersonid": "k2"}])
    assert taken_first.status_code == 412  # b takes k1 while a still has it: nothing is written
    assert {r["lastname"]: r["mdsync_marketopersonid"] for r in _rows(api)} == {"A": "k1", "B": None}
    released_first = _bulk(api, "UpdateMultiple", [{"contactid": a, "mdsync_marketopersonid": "k2"},
                                                   {"contactid": b, "mdsync_marketopersonid": "k1"}])
    assert released_first.status_code == 204
    assert {r["lastname"]: r["mdsync_marketopersonid"] for r in _rows(api)} == {"A": "k2", "B": "k1"}
    by_key = _bulk(api, "UpsertMultiple", [{"@odata.id": "contacts(mdsync_marketopersonid='k1')", "lastname": "B2"}])
    assert by_key.json()["Ids"] == [b]


def test_the_first_failing_target_decides_the_error(dataverse, api):
    (row,) = dataverse.seed("contacts", [{"lastname": "Kept"}])
    missing = "00000000-0000-0000-0000-00000000abcd"
    first_missing = _bulk(api, "UpdateMultiple", [{"contactid": row, "lastname": "New"},
                                                  {"contactid": missing, "lastname": "Ghost"},
                                                  {"contactid": row, "lastname": "z" * 60}])
    assert first_missing.status_code == 404 and missing in error_of(first_missing)[1]
    first_invalid = _bulk(api, "UpdateMultiple", [{"contactid": row, "lastname": "z" * 60},
                                                  {"contactid": missing, "lastname": "Ghost"}])
    assert first_invalid.status_code == 400 and error_of(first_invalid)[0] == "0x80044331"
    untyped = api("POST", "contacts/Microsoft.Dynamics.CRM.UpdateMultiple", json={"Targets": [
        {"@odata.type": CONTACT, "contactid": missing}, {"contactid": row}]})
    assert untyped.status_code == 404  # the missing row comes before the untyped target
    assert [r["lastname"] for r in _rows(api)] == ["Kept"]


def test_rows_written_in_one_request_get_versions_in_target_order_and_show_in_a_delta(dataverse, api):
    ids = dataverse.seed("contacts", [{"lastname": f"S{i}"} for i in range(3)])
    link = api("GET", "contacts", params={"$select": "lastname"},
               headers={"Prefer": "odata.track-changes"}).json()["@odata.deltaLink"]
    resp = _bulk(api, "UpsertMultiple", [{"contactid": ids[2], "lastname": "U2"},
                                         {"@odata.id": "contacts(mdsync_marketopersonid='new')", "lastname": "N"},
                                         {"contactid": ids[0], "lastname": "U0"},
                                         {"contactid": ids[2], "firstname": "Again"}])
    assert resp.status_code == 200
    new_id = resp.json()["Ids"][1]
    delta = api.session.get(link, verify=dataverse.ca_bundle).json()["value"]
    assert [r["contactid"] for r in delta] == [new_id, ids[0], ids[2]]  # by version: ids[2] last wrote last
    assert {r["contactid"]: r["lastname"] for r in delta}[ids[2]] == "U2"
    versions = {r["contactid"]: r["versionnumber"] for r in _rows(api)}
    assert versions[ids[2]] > versions[ids[0]] > versions[new_id] > versions[ids[1]]
    assert {r["contactid"]: r["fullname"] for r in _rows(api)}[ids[2]] == "Again U2"


def test_web_api_answers_carry_the_dop_hint_and_the_admin_api_sets_it(dataverse, api):
    assert api("GET", "WhoAmI").headers["x-ms-dop-hint"] == "4"
    assert dataverse.admin("PUT", "concurrency", {"dop_hint": 2})["dop_hint"] == 2
    assert api("GET", "contacts").headers["x-ms-dop-hint"] == "2"
    dataverse.admin("PUT", "concurrency", {"dop_hint": None})
    assert "x-ms-dop-hint" not in api("GET", "WhoAmI").headers
    dataverse.reset()
    assert api("GET", "WhoAmI").headers["x-ms-dop-hint"] == "4"


@pytest.mark.parametrize("body", [{}, {"dop_hint": 0}, {"dop_hint": "3"}, {"dop_hint": True}])
def test_a_bad_dop_hint_is_refused(dataverse, body):
    with pytest.raises(Exception) as info:
        dataverse.admin("PUT", "concurrency", body)
    assert "400" in str(info.value)


def test_concurrency_reports_requests_in_flight_and_their_peak(dataverse, api):
    assert dataverse.concurrency() == {"in_flight": 0, "peak": 0, "max_concurrent": 52, "dop_hint": 4}
    dataverse.fault("delay", count=3, seconds=2, path_prefix="/api/data/v9.2/contacts")
    callers = [Api(dataverse) for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(c, "GET", "contacts") for c in callers]
        wait_for(lambda: dataverse.concurrency()["in_flight"] == 3, "three delayed requests in flight")
        assert all(f.result().status_code == 200 for f in slow)
    assert dataverse.concurrency() == {"in_flight": 0, "peak": 3, "max_concurrent": 52, "dop_hint": 4}
    assert dataverse.admin("POST", "concurrency/reset")["peak"] == 0

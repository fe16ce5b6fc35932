"""Contract tests of the Dataverse client against the sandbox: real HTTPS, real MSAL, real SQLite."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from mdsync.dynamics import DynamicsClient, and_, eq, isin
from mdsync.errors import ServiceError

SPECIAL = ["O'Brien & Sons #1 100%", "Zoë Ångström–Ñúñez", "a''b'c", "ends with '", "日本語 ∑ 🚀"]


def people(n: int, prefix: str = "p") -> list[dict]:
    return [{"firstname": f"First{i}", "lastname": f"Last{i:05d}", "emailaddress1": f"{prefix}{i}@example.com"}
            for i in range(n)]


def calls_to(sandbox, endpoint: str) -> int:
    return sandbox.calls()["by_endpoint"].get(endpoint, 0)


# auth -----------------------------------------------------------------------------------------------------
def test_client_credentials_token_comes_from_msal_cache(dataverse):
    seen = []
    client = DynamicsClient(dataverse.org_url, dataverse.client_id, dataverse.client_secret, dataverse.tenant_id,
                            authority=dataverse.authority, verify=dataverse.ca_bundle, token_listener=seen.append)
    dataverse.seed("contacts", people(3))
    client.query("contacts", ["lastname"])
    client.query("contacts", ["firstname"])
    token_calls = [k for k in dataverse.calls()["by_endpoint"] if k.endswith("/oauth2/v2.0/token")]
    assert len(token_calls) == 1 and calls_to(dataverse, token_calls[0]) == 1
    assert len(seen) == 1 and seen[0].count(".") == 2  # one JWT, handed to the listener once
    assert client.calls_made >= 3


def test_password_grant_works_with_unmodified_msal(dataverse):
    client = DynamicsClient(dataverse.org_url, dataverse.client_id, dataverse.client_secret, dataverse.tenant_id,
                            authority=dataverse.authority, verify=dataverse.ca_bundle, username=dataverse.username,
                            password=dataverse.user_password)
    who = client.request("GET", "WhoAmI").json()
    assert who["UserId"] == dataverse.identity.interactive_user_id
    client.request("GET", "WhoAmI")  # second call: token from MSAL's cache (silent)
    token_calls = sum(v for k, v in dataverse.calls()["by_endpoint"].items() if k.endswith("/token"))
    assert token_calls == 1


def test_wrong_secret_is_a_specific_error(dataverse):
    client = DynamicsClient(dataverse.org_url, dataverse.client_id, "not-the-secret", dataverse.tenant_id,
                            authority=dataverse.authority, verify=dataverse.ca_bundle)
    with pytest.raises(ServiceError) as info:
        client.request("GET", "WhoAmI")
    assert info.value.code == "invalid_client" and "AADSTS7000215" in info.value.service_message
    assert "not-the-secret" not in str(info.value)


# queries ----------------------------------------------------------------------------------------------------
def test_select_filter_orderby_top_and_typed_columns(dataverse, dynamics_client):
    rows = people(30)
    for i, row in enumerate(rows):
        row.update({"donotemail": i % 2 == 0, "leadsourcecode": 1, "jobtitle": "CTO" if i < 10 else None})
    dataverse.seed("contacts", rows)
    frame = dynamics_client.query(
        "contacts", ["lastname", "donotemail", "leadsourcecode", "createdon"],
        filter=and_(eq("jobtitle", "CTO"), eq("donotemail", True)), orderby="lastname desc", top=3)
    assert list(frame.columns) == ["contactid", "lastname", "donotemail", "leadsourcecode", "createdon"]
    assert list(frame["lastname"]) == ["Last00008", "Last00006", "Last00004"]
    assert frame["donotemail"].dtype == "boolean" and frame["donotemail"].all()
    assert str(frame["leadsourcecode"].dtype) == "Int64"
    assert str(frame["createdon"].dtype).startswith("datetime64") and str(frame["createdon"].dt.tz) == "UTC"


def test_paging_follows_next_links_to_the_end(dataverse, dynamics_client):
    ids = dataverse.seed("contacts", people(2345))
    dataverse.admin("POST", "calls/reset")
    frame = dynamics_client.query("contacts", ["emailaddress1"], page_size=500)
    assert len(frame) == 2345 and set(frame["contactid"]) == set(ids)
    assert calls_to(dataverse, "GET /api/data/v9.2/contacts") == 5


def test_ordered_paging_keeps_order_across_pages(dataverse, dynamics_client):
    dataverse.seed("contacts", people(57))
    frame = dynamics_client.query("contacts", ["lastname"], orderby="lastname desc", page_size=10)
    assert list(frame["lastname"]) == sorted((f"Last{i:05d}" for i in range(57)), reverse=True)


def test_special_characters_round_trip_through_writes_and_filters(dataverse, dynamics_client):
    rows = [{"mdsync_marketopersonid": value, "lastname": value, "firstname": f"n{i}"} for i, value in enumerate(SPECIAL)]
    result = dynamics_client.upsert_multiple("contacts", rows)
    assert result["ok"].all(), result["error_message"].tolist()
    for value in SPECIAL:
        found = dynamics_client.query("contacts", ["lastname", "mdsync_marketopersonid"], filter=eq("lastname", value))
        assert list(found["lastname"]) == [value] and list(found["mdsync_marketopersonid"]) == [value]
    # A value crafted to widen the filter stays one literal and matches nothing.
    assert dynamics_client.query("contacts", ["lastname"], filter=eq("lastname", "x' or lastname ne '")).empty
    both = dynamics_client.query("contacts", ["lastname"], filter=isin("mdsync_marketopersonid", SPECIAL[:2]))
    assert sorted(both["lastname"]) == sorted(SPECIAL[:2])
    # Upserting again by the same keys (with quotes, #, % and non-ASCII in the URL) updates in place.
    again = dynamics_client.upsert_multiple("contacts", [{**r, "firstname": "again"} for r in rows])
    assert list(again["id"]) == list(result["id"])
    assert set(dynamics_client.query("contacts", ["firstname"])["firstname"]) == {"again"}


def test_without_bulk_support_writes_go_through_batch_with_special_keys(dataverse, dynamics_client):
    dataverse.admin("PUT", "messages", {"unsupported": {"contact": ["UpsertMultiple"]}})
    rows = [{"mdsync_marketopersonid": value, "lastname": value} for value in SPECIAL]
    rows.append({"mdsync_marketopersonid": "too long", "lastname": "l" * 51})
    result = dynamics_client.upsert_multiple("contacts", rows)
    assert result["ok"].tolist() == [True] * len(SPECIAL) + [False]
    assert result.loc[len(SPECIAL), "error_code"] == "0x80044331"
    again = dynamics_client.upsert_multiple("contacts", rows[:-1])  # known unsupported: straight to $batch
    assert list(again["id"]) == list(result["id"][:-1])
    stored = dynamics_client.query("contacts", ["mdsync_marketopersonid", "lastname"])
    assert sorted(stored["mdsync_marketopersonid"]) == sorted(SPECIAL)
    assert (stored["mdsync_marketopersonid"] == stored["lastname"]).all()
    counts = dataverse.calls()["by_endpoint"]
    assert counts["POST /api/data/v9.2/contacts/Microsoft.Dynamics.CRM.UpsertMultiple"] == 1
    assert counts["POST /api/data/v9.2/$batch"] == 2


# change tracking ----------------------------------------------------------------------------------------------
def test_delta_link_reports_creates_updates_and_deletes(dataverse, dynamics_client):
    ids = dataverse.seed("contacts", people(12))
    first = dynamics_client.track_changes("contacts", ["lastname", "emailaddress1"], page_size=5)
    assert first.full_read and len(first.changed) == 12 and first.deleted_ids == []
    dynamics_client.update_multiple("contacts", [{"contactid": ids[0], "lastname": "Renamed"}])
    created = dynamics_client.create_multiple("contacts", [{"lastname": "New"}])
    outcome = dynamics_client.batch([{"method": "DELETE", "url": f"contacts({ids[1]})"}])
    assert outcome[0]["status"] == 204
    delta = dynamics_client.track_changes("contacts", ["lastname", "emailaddress1"], first.delta_link)
    assert not delta.full_read
    assert sorted(delta.changed["lastname"]) == ["New", "Renamed"]
    assert set(delta.changed["contactid"]) == {ids[0], created["id"][0]}
    assert delta.deleted_ids == [ids[1]]
    quiet = dynamics_client.track_changes("contacts", ["lastname"], delta.delta_link)
    assert quiet.changed.empty and quiet.deleted_ids == [] and not quiet.full_read


def test_idle_delta_read_costs_one_call(dataverse, dynamics_client):
    first = dynamics_client.track_changes("leads", ["lastname"])
    fresh = DynamicsClient(dataverse.org_url, dataverse.client_id, dataverse.client_secret, dataverse.tenant_id,
                           authority=dataverse.authority, verify=dataverse.ca_bundle)
    fresh.column_types.update(dynamics_client.column_types)  # e.g. kept from the cycle's schema refresh
    fresh.track_changes("leads", ["lastname"], first.delta_link)
    assert fresh.calls_made == 1
    assert dynamics_client.logical_name("fieldpermissions") == "fieldpermission"  # non-standard: looked up


def test_seeded_rows_show_up_in_a_later_delta(dataverse, dynamics_client):
    first = dynamics_client.track_changes("leads", ["lastname"])
    assert first.changed.empty
    ids = dataverse.seed("leads", people(7, "lead"))
    delta = dynamics_client.track_changes("leads", ["lastname"], first.delta_link)
    assert set(delta.changed["leadid"]) == set(ids)


def test_expired_delta_link_falls_back_to_a_full_read(dataverse, dynamics_client):
    dataverse.seed("contacts", people(4))
    first = dynamics_client.track_changes("contacts", ["lastname"])
    dataverse.admin("POST", "faults", {"kind": "expire_delta_tokens"})
    again = dynamics_client.track_changes("contacts", ["lastname"], first.delta_link)
    assert again.full_read and len(again.changed) == 4 and again.delta_link != first.delta_link
    assert not dynamics_client.track_changes("contacts", ["lastname"], again.delta_link).full_read


# writes -------------------------------------------------------------------------------------------------------
def _assert_mixed(result, good_idx, bad):
    assert list(result["index"]) == list(range(len(result)))
    assert result.loc[good_idx, "ok"].all()
    for idx, (code, fragment) in bad.items():
        row = result.loc[idx]
        assert not row["ok"] and row["error_code"] == code and fragment in row["error_message"], row.to_dict()


def test_upsert_multiple_lands_good_rows_and_reports_bad_ones(dataverse, dynamics_client):
    rows = [{"mdsync_marketopersonid": "1", "lastname": "Good"},
            {"mdsync_marketopersonid": "2", "lastname": "x" * 51},
            {"mdsync_marketopersonid": "3", "lastname": "Good too", "leadsourcecode": 99},
            {"mdsync_marketopersonid": None, "lastname": "No key"},
            {"mdsync_marketopersonid": "5", "lastname": "Good three"}]
    result = dynamics_client.upsert_multiple("contacts", rows)
    _assert_mixed(result, [0, 4], {1: ("0x80044331", "'lastname' attribute of the 'contact' entity exceeded the "
                                            "maximum allowed length of '50'"),
                                   2: ("0x80044331", "value 99 of 'leadsourcecode'")})
    assert not result.loc[3, "ok"] and "mdsync_marketopersonid" in result.loc[3, "error_message"]
    stored = dynamics_client.query("contacts", ["mdsync_marketopersonid"])
    assert sorted(stored["mdsync_marketopersonid"]) == ["1", "5"]
    assert set(result.loc[[0, 4], "id"]) == set(stored["contactid"])


def test_create_and_update_multiple_with_mixed_records(dataverse, dynamics_client):
    dataverse.admin("PUT", "rules", [{"entity": "lead", "column": "jobtitle", "op": "forbid", "values": ["Intern"],
                                      "message": "Interns are not leads."}])
    created = dynamics_client.create_multiple("leads", [{"lastname": "A", "companyname": "Acme"},
                                                        {"lastname": "B", "jobtitle": "Intern"},
                                                        {"lastname": "C", "birthdate": "1990-01-01"}])
    _assert_mixed(created, [0], {1: ("0x80040265", "Interns are not leads."),
                                 2: ("0x80060888", "'birthdate'")})
    lead_id = created.loc[0, "id"]
    missing = "00000000-0000-0000-0000-00000000abcd"
    updated = dynamics_client.update_multiple("leads", [{"leadid": lead_id, "companyname": "Acme Ltd"},
                                                        {"leadid": missing, "companyname": "Ghost"}])
    _assert_mixed(updated, [0], {1: ("0x80040217", f"lead With Id = {missing} Does Not Exist")})
    frame = dynamics_client.query("leads", ["companyname"])
    assert list(frame["companyname"]) == ["Acme Ltd"]  # the failed update created nothing


def test_upsert_is_idempotent_by_alternate_key(dataverse, dynamics_client):
    rows = [{"mdsync_marketopersonid": str(i), "lastname": f"L{i}"} for i in range(20)]
    first = dynamics_client.upsert_multiple("contacts", rows)
    second = dynamics_client.upsert_multiple("contacts", rows)  # a retried load
    assert first["ok"].all() and second["ok"].all()
    assert list(first["id"]) == list(second["id"])
    assert len(dynamics_client.query("contacts", ["lastname"])) == 20


def test_bulk_writes_use_one_call_per_thousand_records(dataverse, dynamics_client):
    rows = [{"mdsync_marketopersonid": f"m{i}", "lastname": f"L{i}"} for i in range(2500)]
    dynamics_client.request("GET", "WhoAmI")  # token fetched before counting
    dataverse.admin("POST", "calls/reset")
    result = dynamics_client.upsert_multiple("contacts", pd.DataFrame(rows))
    assert result["ok"].all() and len(result) == 2500
    counts = dataverse.calls()["by_endpoint"]
    assert counts == {"POST /api/data/v9.2/contacts/Microsoft.Dynamics.CRM.UpsertMultiple": 3}


# metadata and security ----------------------------------------------------------------------------------------
def test_attribute_metadata_matches_the_entity_reference(dynamics_client):
    attrs = dynamics_client.attributes("contact").set_index("logical_name")
    assert attrs.loc["lastname", "type"] == "String" and attrs.loc["lastname", "max_length"] == 50
    assert attrs.loc["emailaddress1", "max_length"] == 100
    assert attrs.loc["mdsync_marketopersonid", "max_length"] == 100
    assert attrs.loc["leadsourcecode", "options"] == {1: "Default Value"}
    lead = dynamics_client.attributes("lead").set_index("logical_name")
    assert lead.loc["leadsourcecode", "options"][1] == "Advertisement" and len(lead.loc["leadsourcecode", "options"]) == 10
    assert lead.loc["statuscode", "options"][3] == "Qualified" and lead.loc["lastname", "required_level"] == "ApplicationRequired"
    assert not attrs.loc["createdon", "is_valid_for_update"]
    assert not attrs["is_secured"].any()


def test_secured_columns_read_as_absent_and_refuse_updates(dataverse, dynamics_client):
    ids = dataverse.seed("contacts", [{"lastname": "Sec", "jobtitle": "CEO", "mobilephone": "+1 555"}])
    dataverse.admin("PUT", "security", {"secured_columns": {"contact": ["jobtitle", "mobilephone"]},
                                        "readable": {"contact": ["jobtitle"]}, "updatable": {"contact": []}})
    perms = dynamics_client.field_permissions("contact").set_index("logical_name")
    assert perms.loc["jobtitle"].to_dict() == {"is_secured": True, "can_read": True, "can_update": False,
                                               "can_create": False}
    assert perms.loc["mobilephone", "can_read"] == False  # noqa: E712  (pandas boolean)
    assert perms.loc["lastname", "can_update"] and not perms.loc["lastname", "is_secured"]
    frame = dynamics_client.query("contacts", ["lastname", "jobtitle", "mobilephone"])
    assert frame.loc[0, "jobtitle"] == "CEO" and pd.isna(frame.loc[0, "mobilephone"])
    result = dynamics_client.update_multiple("contacts", [{"contactid": ids[0], "jobtitle": "CFO"}])
    assert not result.loc[0, "ok"] and result.loc[0, "status"] == 403
    assert "secured field 'jobtitle'" in result.loc[0, "error_message"]


# lead lifecycle -------------------------------------------------------------------------------------------------
def test_qualify_lead_creates_a_linked_contact_and_closes_the_lead(dataverse, dynamics_client):
    lead_id = dataverse.seed("leads", [{"firstname": "Ada", "lastname": "Lovelace", "emailaddress1": "ada@x.org",
                                        "companyname": "Engines"}])[0]
    created = dynamics_client.qualify_lead(lead_id, create_account=True)
    kinds = {c["entity"]: c["id"] for c in created}
    assert set(kinds) == {"contact", "account"}
    contact = dynamics_client.query("contacts", ["emailaddress1", "_originatingleadid_value",
                                                 "_parentcustomerid_value"])
    assert contact.loc[0].to_dict() == {"contactid": kinds["contact"], "emailaddress1": "ada@x.org",
                                        "_originatingleadid_value": lead_id, "_parentcustomerid_value": kinds["account"]}
    state = dynamics_client.states("leads", [lead_id])
    assert (state.loc[0, "statecode"], state.loc[0, "statuscode"]) == (1, 3)
    with pytest.raises(ServiceError) as info:
        dynamics_client.qualify_lead(lead_id)
    assert info.value.status == 400 and "already closed" in info.value.service_message


def test_merge_updates_target_and_deactivates_subordinate(dataverse, dynamics_client):
    target, sub = dataverse.seed("contacts", [{"lastname": "Keep"}, {"lastname": "Dup", "telephone1": "123"}])
    dynamics_client.merge("contact", target, sub, {"telephone1": "123"})
    states = dynamics_client.states("contacts", [target, sub]).set_index("contactid")
    assert states.loc[target, "statecode"] == 0 and states.loc[sub, "statecode"] == 1
    assert dynamics_client.query("contacts", ["telephone1"], filter=eq("lastname", "Keep"))["telephone1"][0] == "123"


# faults ----------------------------------------------------------------------------------------------------------
def test_throttle_storm_waits_retry_after_and_finishes(dataverse, dynamics_client):
    ids = dataverse.seed("contacts", people(30))
    dynamics_client.request("GET", "WhoAmI")
    dataverse.fault("throttle", count=3, seconds=1, path_prefix="/api/data/v9.2/contacts")
    started = time.monotonic()
    frame = dynamics_client.query("contacts", ["lastname"], page_size=10)
    assert time.monotonic() - started >= 3  # honoured Retry-After: 1 s three times
    assert sorted(frame["contactid"]) == sorted(ids)


def test_throttled_and_failing_writes_are_not_duplicated(dataverse, dynamics_client):
    dynamics_client.request("GET", "WhoAmI")
    dataverse.fault("throttle", count=2, seconds=0, path_prefix="/api/data/v9.2/contacts/Microsoft")
    dataverse.fault("server_error", count=2, path_prefix="/api/data/v9.2/contacts/Microsoft")
    rows = [{"mdsync_marketopersonid": f"k{i}", "lastname": "T"} for i in range(50)]
    assert dynamics_client.upsert_multiple("contacts", rows)["ok"].all()
    assert len(dynamics_client.query("contacts", ["lastname"])) == 50


def test_persistent_server_errors_end_in_a_specific_error(dataverse):
    client = DynamicsClient(dataverse.org_url, dataverse.client_id, dataverse.client_secret, dataverse.tenant_id,
                            authority=dataverse.authority, verify=dataverse.ca_bundle, max_attempts=3, backoff_s=0.01)
    dataverse.fault("server_error", count=5, path_prefix="/api/data/v9.2/WhoAmI")
    with pytest.raises(ServiceError) as info:
        client.request("GET", "WhoAmI")
    assert info.value.status == 500 and "gave up after 3 attempts" in str(info.value)
    assert info.value.request == "GET /api/data/v9.2/WhoAmI"


def test_token_expiry_mid_paging_renews_once_and_loses_nothing(dataverse, dynamics_client):
    ids = dataverse.seed("contacts", people(400))
    dynamics_client.request("GET", "WhoAmI")
    dataverse.fault("delay", count=8, seconds=0.25, path_prefix="/api/data/v9.2/contacts")
    expire = threading.Timer(0.8, lambda: dataverse.admin("POST", "faults", {"kind": "expire_tokens"}))
    expire.start()
    frame = dynamics_client.query("contacts", ["lastname"], page_size=50)
    expire.join()
    assert len(frame) == 400 and frame["contactid"].is_unique and set(frame["contactid"]) == set(ids)
    token_calls = sum(v for k, v in dataverse.calls()["by_endpoint"].items() if k.endswith("/token"))
    assert token_calls == 2
    assert calls_to(dataverse, "GET /api/data/v9.2/contacts") == 9  # 8 pages + the one refused with 401

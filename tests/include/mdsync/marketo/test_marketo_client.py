"""Contract of MarketoClient against the running Marketo sandbox (real HTTP on loopback)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from mdsync.errors import ServiceError
from mdsync.marketo import MarketoClient


def calls(sb, endpoint: str) -> int:
    return sb.calls()["by_endpoint"].get(endpoint, 0)


def test_describe_is_typed_and_cached(marketo, marketo_client):
    fields = marketo_client.describe_leads()
    row = fields.set_index("rest_name").loc["dynamicsRecordId"]
    assert (row["data_type"], row["length"], bool(row["updateable"]), bool(row["searchable"])) == ("string", 36, True, True)
    assert not fields.set_index("rest_name").loc["updatedAt", "updateable"]
    assert str(fields["length"].dtype) == "Int64" and str(fields["updateable"].dtype) == "boolean"
    marketo_client.describe_leads()
    assert calls(marketo, "GET /rest/v1/leads/describe2.json") == 1


def test_get_leads_batches_300_values_and_pages_to_the_end(marketo, marketo_client):
    ids = marketo.seed_leads([{"email": f"lead{i}@example.com", "leadScore": i, "syncToDynamics": i % 2 == 0,
                               "annualRevenue": 1.5 * i, "dynamicsRecordType": "contact" if i < 650 else None,
                               "createdAt": "2026-03-01T12:00:00+02:00"} for i in range(700)])
    by_id = marketo_client.get_leads("id", ids, fields=["email", "leadScore", "syncToDynamics", "annualRevenue",
                                                        "createdAt"])
    assert by_id["id"].tolist() == ids
    assert calls(marketo, "GET /rest/v1/leads.json") == 3  # 300 + 300 + 100 values
    assert str(by_id["leadScore"].dtype) == "Int64" and by_id["syncToDynamics"].tolist()[:3] == [True, False, True]
    assert str(by_id["annualRevenue"].dtype) == "Float64" and by_id["annualRevenue"].iloc[3] == 4.5
    assert by_id["createdAt"].iloc[0] == pd.Timestamp("2026-03-01T10:00:00Z")
    # One filter value matching 650 leads: the client follows nextPageToken to the end (300 + 300 + 50).
    marketo.admin("POST", "/calls/reset")
    contacts = marketo_client.get_leads("dynamicsRecordType", ["contact"], fields=["email"])
    assert contacts["id"].tolist() == ids[:650] and calls(marketo, "GET /rest/v1/leads.json") == 3


def test_long_filter_values_go_as_post_with_method_get(marketo, marketo_client):
    guids = [str(uuid.uuid4()) for _ in range(300)]
    ids = marketo.seed_leads([{"email": f"g{i}@example.com", "dynamicsRecordId": g} for i, g in enumerate(guids)])
    found = marketo_client.get_leads("dynamicsRecordId", guids, fields=["dynamicsRecordId"])
    assert sorted(found["id"].tolist()) == ids and set(found["dynamicsRecordId"]) == set(guids)
    stats = marketo.calls()["by_endpoint"]
    assert stats.get("POST /rest/v1/leads.json") == 1 and "GET /rest/v1/leads.json" not in stats


def test_sync_leads_reports_each_record_in_input_order(marketo, marketo_client):
    marketo.seed_leads([{"email": "known@example.com", "firstName": "Old"}, {"email": "twin@example.com"},
                        {"email": "twin@example.com"}])
    records = pd.DataFrame({
        "email": ["known@example.com", "new@example.com", "twin@example.com", "bad-email", "x@example.com"],
        "firstName": ["New", "Ñandú", "T", "B", "X"],
        "leadScore": pd.array([1, None, 3, 4, None], dtype="Int64"),
        "dynamicsRecordId": [None, None, None, None, "g" * 40],
    })
    result = marketo_client.sync_leads(records)
    assert result["seq"].tolist() == [0, 1, 2, 3, 4]
    assert result["status"].tolist() == ["updated", "created", "skipped", "skipped", "skipped"]
    assert result["reason_code"].tolist()[2:] == ["1007", "1001", "1001"]
    assert "dynamicsRecordId" in result["reason_message"].iloc[4]
    assert pd.isna(result["id"].iloc[2]) and result["id"].iloc[0] == 1
    only = marketo_client.sync_leads([{"email": "known@example.com"}], action="createOnly")
    assert (only["status"].iloc[0], only["reason_code"].iloc[0]) == ("skipped", "1005")
    upd = marketo_client.sync_leads([{"id": 999999, "firstName": "Ghost"}], action="updateOnly", lookup_field="id")
    assert (upd["status"].iloc[0], upd["reason_code"].iloc[0]) == ("skipped", "1004")
    back = marketo_client.get_leads("email", ["new@example.com"], fields=["firstName", "leadScore"])
    assert back["firstName"].iloc[0] == "Ñandú" and pd.isna(back["leadScore"].iloc[0])


def test_sync_leads_splits_by_300_records_and_1_mb(marketo, marketo_client):
    many = marketo_client.sync_leads([{"email": f"b{i}@example.com"} for i in range(650)])
    assert (many["status"] == "created").all() and many["id"].is_unique
    assert calls(marketo, "POST /rest/v1/leads.json") == 3
    marketo.admin("POST", "/calls/reset")
    heavy = [{"email": f"h{i}@example.com", "address": "x" * 60_000} for i in range(40)]  # ~2.4 MB in all
    result = marketo_client.sync_leads(heavy)
    assert (result["status"] == "created").all()
    assert calls(marketo, "POST /rest/v1/leads.json") == 3


def test_lead_changes_include_api_changes_and_page_past_300(marketo, marketo_client):
    ids = marketo.seed_leads([{"email": f"c{i}@example.com", "firstName": "A"} for i in range(320)])
    token = marketo_client.get_paging_token(datetime.now(timezone.utc) - timedelta(seconds=5))
    marketo_client.sync_leads([{"email": f"c{i}@example.com", "firstName": "B", "lastName": "L"} for i in range(320)])
    marketo_client.sync_leads([{"email": "c0@example.com", "firstName": None}])
    changes, next_token = marketo_client.get_lead_changes(token, ["firstName"])
    assert len(changes) == 321 and changes["id"].is_unique
    assert set(changes["field"]) == {"firstName"}  # lastName changes were not asked for
    first = changes[changes["lead_id"] == ids[0]].sort_values("id")
    assert first[["old_value", "new_value"]].values.tolist() == [["A", "B"], ["B", ""]]
    assert (changes["source"] == "Web service API").all()
    assert str(changes["activity_date"].dtype).startswith("datetime64") and str(changes["activity_date"].dt.tz) == "UTC"
    assert calls(marketo, "GET /rest/v1/activities/leadchanges.json") == 2
    again, _ = marketo_client.get_lead_changes(next_token, ["firstName"])
    assert again.empty


def test_deleted_leads_and_merge(marketo, marketo_client):
    a, b, c = marketo.seed_leads([{"email": "a@example.com"}, {"email": "b@example.com", "company": "B Corp"},
                                  {"email": "c@example.com"}])
    token = marketo_client.get_paging_token(datetime.now(timezone.utc) - timedelta(seconds=5))
    deleted = marketo_client.delete_leads([c, 424242])
    assert deleted[["id", "status"]].values.tolist() == [[c, "deleted"], [424242, "skipped"]]
    assert pd.isna(deleted["reason_code"].iloc[0]) and deleted["reason_code"].iloc[1] == "1004"
    marketo_client.merge_leads(a, [b])
    gone, _ = marketo_client.get_deleted_leads(token)
    assert gone["lead_id"].tolist() == [c, b] and (gone["activity_type_id"] == 37).all()
    left = marketo_client.get_leads("id", [a, b, c], fields=["company"])
    assert left["id"].tolist() == [a] and left["company"].iloc[0] == "B Corp"


def test_merges_and_deletions_come_from_one_activities_call_a_page(marketo, marketo_client):
    w, a, b, c = marketo.seed_leads([{"email": f"m{i}@example.com"} for i in range(4)])
    token = marketo_client.get_paging_token(datetime.now(timezone.utc) - timedelta(seconds=5))
    marketo_client.delete_leads([c])
    marketo_client.merge_leads(w, [a, b])
    deleted, merges, _ = marketo_client.get_merges_and_deletions(token)
    assert calls(marketo, "GET /rest/v1/activities.json") == 1
    assert sorted(deleted["lead_id"]) == sorted([a, b, c])  # a merge deletes its losers too
    assert merges[["winner_id", "loser_id"]].values.tolist() == [[w, a], [w, b]]
    assert str(merges["activity_date"].dt.tz) == "UTC"


def test_merge_persons_splits_by_winner_and_25_losers_and_isolates_a_refused_id(marketo, marketo_client):
    ids = marketo.seed_leads([{"email": f"p{i}@example.com"} for i in range(30)])
    winner, other, losers = ids[0], ids[1], ids[2:29]
    plan = pd.DataFrame({"winner_id": [winner] * 27 + [other, other],
                         "loser_id": losers + [ids[29], 424242]})
    out = marketo_client.merge_persons(plan)
    assert out[["winner_id", "loser_id"]].values.tolist() == plan.values.tolist()  # one row per input, in order
    assert out["ok"].tolist() == [True] * 28 + [False]
    assert out["error_code"].iloc[-1] == "1004" and "424242" in out["error_message"].iloc[-1]
    # the winner's 27 losers in two calls (25 + 2); the other winner's call refused, then each loser alone
    assert calls(marketo, "POST /rest/v1/leads/{id}/merge.json") == 2 + 3
    left = marketo_client.get_leads("id", ids, fields=["email"])
    assert left["id"].tolist() == [winner, other]


def test_export_leads_runs_one_job_per_31_days_and_types_the_csv(marketo, marketo_client):
    marketo.seed_leads([{"email": f"x{i}@example.com", "firstName": None if i == 1 else f"Name, {i}",
                         "leadScore": i, "unsubscribed": i == 2, "createdAt": f"2026-0{1 + i % 3}-15T08:00:00Z"}
                        for i in range(9)])
    frame = marketo_client.export_leads(["email", "firstName", "leadScore", "unsubscribed", "createdAt"],
                                        created_at=(datetime(2026, 1, 1, tzinfo=timezone.utc),
                                                    datetime(2026, 3, 31, tzinfo=timezone.utc)),
                                        poll_interval_s=0.05)
    assert calls(marketo, "POST /bulk/v1/leads/export/create.json") == 3  # 90 days -> 3 windows
    frame = frame.sort_values("id").reset_index(drop=True)
    assert frame["leadScore"].tolist() == list(range(9)) and str(frame["leadScore"].dtype) == "Int64"
    assert pd.isna(frame["firstName"].iloc[1]) and frame["firstName"].iloc[0] == "Name, 0"
    assert frame["unsubscribed"].tolist()[:3] == [False, False, True]
    assert frame["createdAt"].iloc[1] == pd.Timestamp("2026-02-15T08:00:00Z")
    with pytest.raises(ValueError, match="exactly one"):
        marketo_client.export_leads(["email"])


def test_custom_activity_type_is_created_once_and_activities_are_added(marketo, marketo_client):
    (lead,) = marketo.seed_leads([{"email": "err@example.com"}])
    spec = dict(api_name="dynamicsSyncError", name="Dynamics Sync Error",
                primary_attribute={"apiName": "errorMessage", "name": "Error Message", "dataType": "string"},
                attributes=[{"apiName": "entityType", "name": "Entity Type", "dataType": "string"},
                            {"apiName": "fieldName", "name": "Field Name", "dataType": "string"}])
    type_id = marketo_client.ensure_custom_activity_type(**spec)
    assert marketo_client.ensure_custom_activity_type(**spec) == type_id
    assert calls(marketo, "POST /rest/v1/activities/external/type.json") == 1
    result = marketo_client.add_custom_activities([
        {"leadId": lead, "activityTypeId": type_id, "primaryAttributeValue": "Last Name: required",
         "attributes": {"entityType": "contact", "fieldName": "lastname"}},
        {"leadId": 987654, "activityTypeId": type_id, "primaryAttributeValue": "x", "attributes": {}},
    ])
    assert result["status"].tolist() == ["added", "skipped"] and result["reason_code"].iloc[1] == "1004"
    token = marketo_client.get_paging_token(datetime.now(timezone.utc) - timedelta(minutes=1))
    acts, _ = marketo_client.get_activities(token, [type_id])
    assert [(a["leadId"], a["primaryAttributeValue"]) for a in acts] == [(lead, "Last Name: required")]
    with pytest.raises(ServiceError, match="1003"):
        marketo_client.ensure_custom_activity_type(**{**spec, "api_name": "dynamics_sync_error"})


def test_bad_credentials_fail_clearly_without_leaking_the_secret(marketo):
    client = MarketoClient(marketo.base_url, marketo.client_id, "wrong-secret-value")
    with pytest.raises(ServiceError) as err:
        client.describe_leads()
    assert "client id" in str(err.value) and "wrong-secret-value" not in str(err.value)
    assert err.value.status == 401

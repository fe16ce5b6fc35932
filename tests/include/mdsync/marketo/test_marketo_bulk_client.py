"""MarketoClient's bulk import, activity export, concurrent export windows and lookups, against the sandbox."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from mdsync.errors import ServiceError
from tests.fixtures.waiting import wait_for


def calls(sb, endpoint: str) -> int:
    return sb.calls()["by_endpoint"].get(endpoint, 0)


class Background:
    """Run a client call in a thread; ``result()`` joins it and returns its value or raises its error."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self.value = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self.value = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def result(self, timeout_s: float = 60.0):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the background call did not finish"
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture
def held(marketo):
    yield marketo
    marketo.hold_bulk(False)


def test_import_by_id_reports_every_record_in_order_across_several_files(marketo, marketo_client):
    ids = marketo.seed_leads([{"email": f"p{i}@example.com", "firstName": "Old", "title": "T"} for i in range(3000)])
    records = [{"id": i, "firstName": f"Ñame, \"{n}\"\nline two", "leadScore": n % 7} for n, i in enumerate(ids)]
    records[5]["leadScore"] = "five"             # 1001 integer
    records[10]["id"] = 99_999_999               # not a lead: update only
    records[20]["email"] = "not-an-email"        # 1001 email (the column exists for this record only)
    records.append({"id": ids[-1], "title": "Second row"})  # same id as the record before it: a warning
    result = marketo_client.import_leads(records, poll_interval_s=0.05, max_file_bytes=20_000)
    assert calls(marketo, "POST /bulk/v1/leads.json") > 3  # forced small: several files, several jobs
    assert result["seq"].tolist() == list(range(len(records)))
    assert list(result.columns) == ["seq", "id", "status", "reason_code", "reason_message"]
    skipped = result[result["status"] == "skipped"]
    assert skipped["seq"].tolist() == [5, 10, 20]
    assert skipped["reason_message"].tolist() == ["Invalid value 'five'. Required of type 'integer'",
                                                  "Lead not found", "Invalid value 'not-an-email'. Required of type 'email'"]
    ok = result[result["status"] == "updated"]
    assert len(ok) == len(records) - 3 and ok["id"].tolist()[:3] == ids[:3]
    assert "also on line" in result["reason_message"].iloc[3000]
    back = marketo_client.get_leads("id", ids[:31], fields=["firstName", "leadScore", "title", "email"])
    assert back["firstName"].iloc[0] == 'Ñame, "0"\nline two' and back["leadScore"].tolist()[:5] == [0, 1, 2, 3, 4]
    assert back["title"].iloc[0] == "T"  # a blank cell (no title for that record) leaves the value
    assert back["email"].iloc[20] == "p20@example.com"
    last = marketo_client.get_leads("id", [ids[-1]], fields=["firstName", "title"])
    assert last[["firstName", "title"]].values.tolist() == [['Ñame, "2999"\nline two', "Second row"]]


def test_import_by_email_creates_and_updates_and_refuses_clears(marketo, marketo_client):
    marketo.seed_leads([{"email": "known@example.com", "firstName": "Old"}])
    frame = pd.DataFrame({"email": ["known@example.com", "new@example.com", "bad@"],
                          "firstName": ["New", "Nu", "Bad"], "unsubscribed": [True, False, True]})
    result = marketo_client.import_leads(frame, lookup_field="email", poll_interval_s=0.05)
    assert result["status"].tolist() == ["imported", "imported", "skipped"] and result["id"].isna().all()
    found = marketo_client.get_leads("email", ["known@example.com", "new@example.com"], ["firstName", "unsubscribed"])
    assert found["firstName"].tolist() == ["New", "Nu"] and found["unsubscribed"].tolist() == [True, False]
    with pytest.raises(ValueError) as err:
        marketo_client.import_leads([{"id": 1, "firstName": None}, {"id": 2, "title": ""}, {"firstName": "x"}])
    assert "#0 firstName" in str(err.value) and "#1 title" in str(err.value) and "sync_leads" in str(err.value)
    assert "without a 'id' value" in str(err.value) and "#2" in str(err.value)


def test_a_failed_import_job_raises_naming_its_batch(marketo, marketo_client):
    (lead,) = marketo.seed_leads([{"email": "x@example.com"}])
    marketo.fault("job_failure", path_prefix="/bulk/v1/leads.json")
    with pytest.raises(ServiceError) as err:
        marketo_client.import_leads([{"id": lead, "city": "Oslo"}], poll_interval_s=0.05)
    assert "import batch 1 " in str(err.value) and "injected job failure" in str(err.value)


def test_import_waits_out_a_full_queue_and_resubmits(held, marketo_client):
    (lead,) = held.seed_leads([{"email": "x@example.com"}])
    held.hold_bulk(True)
    token = marketo_client.auth.token()
    for i in range(10):  # someone else's jobs fill the queue
        marketo_client.session.post(held.base_url + "/bulk/v1/leads.json", params={"format": "csv"},
                                    headers={"Authorization": f"Bearer {token}"},
                                    files={"file": ("f.csv", f"email\nother{i}@example.com\n", "text/csv")})
    call = Background(marketo_client.import_leads, [{"id": lead, "city": "Oslo"}], poll_interval_s=0.05)
    wait_for(lambda: held.calls()["by_endpoint"].get("POST /bulk/v1/leads.json", 0) >= 12,
             "the client to be refused (1016) and to try again")
    held.hold_bulk(False)
    result = call.result()
    assert result["status"].tolist() == ["updated"]
    assert marketo_client.get_leads("id", [lead], ["city"])["city"].tolist() == ["Oslo"]
    assert held.bulk()["peak_importing"] <= 2


def test_export_activities_reads_new_leads_and_changes_over_windows_queued_together(held, marketo_client):
    created = marketo_client.sync_leads([{"email": f"a{i}@example.com", "firstName": "A"} for i in range(3)])
    ids = created["id"].tolist()
    marketo_client.sync_leads([{"email": "a0@example.com", "firstName": "Ä, \"b\""}])
    type_id = marketo_client.ensure_custom_activity_type(
        "syncNote", "Sync Note", {"apiName": "note", "name": "Note", "dataType": "string"},
        [{"apiName": "detail", "name": "Detail", "dataType": "string"}])
    marketo_client.add_custom_activities([{"leadId": ids[1], "activityTypeId": type_id,
                                           "primaryAttributeValue": "hello", "attributes": {"detail": "d"}}])
    now = datetime.now(timezone.utc)
    held.hold_bulk(True)
    call = Background(marketo_client.export_activities, [12, 13, type_id],
                      created_at=(now - timedelta(days=45), now + timedelta(minutes=1)), poll_interval_s=0.05)
    # Both 31-day windows are queued before either has run.
    wait_for(lambda: calls(held, "POST /bulk/v1/activities/export/{id}/enqueue.json") == 2, "both windows queued")
    held.hold_bulk(False)
    frame = call.result()
    assert list(frame.columns) == ["marketo_guid", "lead_id", "activity_date", "activity_type_id",
                                   "primary_attribute_value_id", "primary_attribute_value", "attributes"]
    assert frame["activity_type_id"].tolist() == [12, 12, 12, 13, type_id]
    assert frame["lead_id"].tolist() == [*ids, ids[0], ids[1]]
    change = frame.iloc[3]
    assert (change["primary_attribute_value_id"], change["primary_attribute_value"]) == (3, "First Name")
    assert change["attributes"] == {"New Value": "Ä, \"b\"", "Old Value": "A", "Reason": "API sync",
                                    "Source": "Web service API"}
    assert frame.iloc[4]["attributes"] == {"Detail": "d"} and frame.iloc[4]["primary_attribute_value"] == "hello"
    assert str(frame["activity_date"].dt.tz) == "UTC" and str(frame["lead_id"].dtype) == "Int64"
    with pytest.raises(ValueError, match="Delete Lead"):
        marketo_client.export_activities([37], created_at=(now - timedelta(days=1), now))


def test_export_leads_queues_its_windows_together(held, marketo_client):
    held.seed_leads([{"email": f"x{i}@example.com", "createdAt": f"2026-0{1 + i % 3}-15T08:00:00Z"} for i in range(6)])
    held.hold_bulk(True)
    call = Background(marketo_client.export_leads, ["email"], created_at=(
        datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 3, 31, tzinfo=timezone.utc)), poll_interval_s=0.05)
    wait_for(lambda: calls(held, "POST /bulk/v1/leads/export/{id}/enqueue.json") == 3, "all three windows queued")
    held.hold_bulk(False)
    assert sorted(call.result()["email"]) == sorted(f"x{i}@example.com" for i in range(6))


def test_lookup_leads_refuses_comma_and_invalid_values_and_returns_the_rest(marketo, marketo_client):
    ids = marketo.seed_leads([{"email": f"g{i}@example.com"} for i in range(400)])
    values = [f"g{i}@example.com" for i in range(400)]
    values[7] = "not-an-email"
    values.insert(350, "odd,one@example.com")
    found, refused = marketo_client.lookup_leads("email", values, ["email"])
    assert sorted(found["id"].tolist()) == sorted(i for n, i in enumerate(ids[:400]) if n != 7)
    assert refused["value"].tolist() == ["odd,one@example.com", "not-an-email"]
    assert refused["code"].tolist() == ["not-sent", "1003"]
    assert "comma" in refused["message"].iloc[0] and "not-an-email" in refused["message"].iloc[1]
    # One bad value in a chunk of 300 costs a bisection, not one call per value.
    assert calls(marketo, "GET /rest/v1/leads.json") <= 2 + 2 * 9
    again = marketo_client.get_leads("email", ["g1@example.com", "not-an-email"], ["email"])
    assert again["email"].tolist() == ["g1@example.com"]


def test_sync_leads_creates_1100_persons_in_4_calls(marketo, marketo_client):
    records = [{"email": f"p{i}@example.com", "firstName": f"Prénom {i}", "lastName": "Ünïcode",
                "dynamicsRecordId": f"{i:08d}-0000-0000-0000-000000000000", "dynamicsRecordType": "contact"}
               for i in range(1100)]
    result = marketo_client.sync_leads(records, action="createOnly")
    assert (result["status"] == "created").all()
    assert calls(marketo, "POST /rest/v1/leads.json") == 4

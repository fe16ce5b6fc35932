"""The load stage's grouping, per-field retry, length checks and Marketo method choice (DESIGN §4.4), with plain
Python senders and fake clients that record their calls -- no service is involved."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mdsync import load
from mdsync.config import load_config

CONFIG = load_config()
LEAD = CONFIG.entity("lead")


def _cells(rows: list[tuple]) -> pd.DataFrame:
    """``(person_id, api_field, api_value)`` -> long API cells with a ``row`` id."""
    frame = pd.DataFrame(rows, columns=["person_id", "api_field", "api_value"])
    return frame.assign(row=frame.index)


# -- api_records ----------------------------------------------------------------------------------------

def test_api_records_groups_by_field_set_and_keeps_clears_apart_from_unwritten():
    api = _cells([(1, "firstName", "Ann"), (1, "lastName", None), (2, "firstName", "Bob"),
                  (3, "firstName", "Cy"), (3, "lastName", "Dee"), (4, "lastName", None)])
    records, order = load.api_records(api, "person_id", {"person_id": "id"})
    by_id = {r["id"]: r for r in records}
    assert by_id == {1: {"id": 1, "firstName": "Ann", "lastName": None},  # None = clear the field
                     2: {"id": 2, "firstName": "Bob"},                    # lastName not written: no key at all
                     3: {"id": 3, "firstName": "Cy", "lastName": "Dee"},
                     4: {"id": 4, "lastName": None}}
    assert [r["id"] for r in records] == list(order)
    # records of one field set come out together (one build per set)
    sets = [frozenset(r) for r in records]
    assert sum(1 for a, b in zip(sets, sets[1:]) if a != b) == len(set(sets)) - 1


def test_api_records_last_cell_wins_and_empty_is_empty():
    records, order = load.api_records(_cells([(1, "firstName", "Ann"), (1, "firstName", "Anna")]),
                                      "person_id", {"person_id": "id"})
    assert records == [{"id": 1, "firstName": "Anna"}] and list(order) == [1]
    records, order = load.api_records(_cells([]), "person_id", {"person_id": "id"})
    assert records == [] and len(order) == 0


def test_api_records_with_many_field_sets_and_wide_records():
    # more than 62 fields: the field-set signature switches from a bit mask to a hash
    rows = [(p, f"f{k}", f"{p}-{k}") for p in range(1, 6) for k in range(70) if (p + k) % 3]
    records, order = load.api_records(_cells(rows), "person_id", {"person_id": "id"})
    assert len(records) == 5
    for r in records:
        p = r.pop("id")
        assert r == {f"f{k}": f"{p}-{k}" for k in range(70) if (p + k) % 3}


# -- write_records --------------------------------------------------------------------------------------

class RejectingSender:
    """Accepts every record except one carrying ``field`` = ``value``; remembers what it was sent."""

    def __init__(self, field: str, value) -> None:
        self.field, self.value, self.calls = field, value, []

    def __call__(self, records: list[dict]):
        self.calls.append([dict(r) for r in records])
        return [(False, "1003", f"invalid {self.field}") if r.get(self.field) == self.value else (True, None, None)
                for r in records]


def _writes(rows: list[tuple]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(person_id, field, value)`` canonical writes whose API field is the field name itself."""
    writes = pd.DataFrame(rows, columns=["person_id", "field", "value"])
    api = writes.assign(api_field=writes["field"], api_value=writes["value"], row=writes.index)
    return writes, api


def test_write_records_resends_a_rejected_record_field_by_field():
    writes, api = _writes([(1, "firstName", "Ann"), (1, "lastName", "BAD"), (1, "title", "CTO"),
                           (2, "firstName", "Bob"), (2, "lastName", "Smith"), (3, "lastName", "BAD")])
    send = RejectingSender("lastName", "BAD")
    out = load.write_records(writes, api, "person_id", {"person_id": "id"}, send)
    # first call: one record per person; second: person 1's fields one at a time (person 3 has one field only)
    assert len(send.calls) == 2
    assert sorted(r["id"] for r in send.calls[0]) == [1, 2, 3]
    assert sorted(tuple(sorted(r)) for r in send.calls[1]) == [("firstName", "id"), ("id", "lastName"), ("id", "title")]
    assert all(r["id"] == 1 for r in send.calls[1])
    # outcomes line up with the rows
    assert out.index.equals(writes.index)
    assert out["ok"].tolist() == [True, False, True, True, True, False]
    assert out.loc[[1, 5], "error_code"].tolist() == ["1003", "1003"]
    assert out.loc[1, "error_message"] == "invalid lastName"
    assert out.loc[[0, 2, 3, 4], "error_code"].isna().all()
    assert out[["person_id", "field", "value"]].equals(writes[["person_id", "field", "value"]])


def test_write_records_without_rejections_is_one_send():
    writes, api = _writes([(p, "firstName", f"N{p}") for p in range(1, 11)])
    send = RejectingSender("firstName", "nobody")
    out = load.write_records(writes, api, "person_id", {"person_id": "id"}, send)
    assert len(send.calls) == 1 and len(send.calls[0]) == 10 and out["ok"].all()


def test_write_records_hands_records_to_the_sender_in_chunks():
    writes, api = _writes([(p, "firstName", f"N{p}") for p in range(1, 8)])
    send = RejectingSender("firstName", "nobody")
    load.write_records(writes, api, "person_id", {"person_id": "id"}, send, chunk=3)
    assert [len(c) for c in send.calls] == [3, 3, 1]


def test_write_records_of_nothing_sends_nothing():
    writes, api = _writes([])
    send = RejectingSender("firstName", "x")
    out = load.write_records(writes, api, "person_id", {"person_id": "id"}, send)
    assert out.empty and send.calls == []


# -- length checks --------------------------------------------------------------------------------------

def test_too_long_reports_without_truncating():
    writes = pd.DataFrame({"field": ["first_name", "first_name", "last_name", "first_name", "job_title"],
                           "value": ["Annabelle", "Ann", "x" * 500, None, "y" * 10]})
    got = load._too_long(writes, {"first_name": 5, "job_title": 10}, "Dataverse column leads")
    assert got.isna().tolist() == [False, True, True, True, True]
    assert got[0] == "value is 9 characters but Dataverse column leads allows 5; not sent (values are never truncated)"


class FakeDynamics:
    """``update_multiple`` that records its rows and accepts them all."""

    calls_made = 0

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[dict]]] = []

    def update_multiple(self, entity_set, rows):
        self.sent.append((entity_set, [dict(r) for r in rows]))
        self.calls_made += math.ceil(len(rows) / 1000)
        return pd.DataFrame({"ok": [True] * len(rows), "error_code": [None] * len(rows),
                             "error_message": [None] * len(rows)})


def _dynamics_writes(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["person_id", "dynamics_id", "field", "value"])


def test_load_dynamics_refuses_an_over_long_value_without_a_call_and_sends_the_rest():
    client = FakeDynamics()
    writes = _dynamics_writes([(1, "L1", "first_name", "Annabelle"), (1, "L1", "last_name", "Smith")])
    link_writes = pd.DataFrame({"dynamics_id": ["L2"], "person_id": [2]})
    out = load.load_dynamics(CONFIG, LEAD, writes, link_writes, {"first_name": 5}, client)
    [(entity_set, rows)] = client.sent
    assert entity_set == "leads"
    assert sorted(rows, key=lambda r: r["leadid"]) == [
        {"leadid": "L1", "lastname": "Smith"}, {"leadid": "L2", "mdsync_marketopersonid": "2"}]
    refused = out[out["field"] == "first_name"].iloc[0]
    assert not refused["ok"] and refused["error_code"] == "too_long"
    assert refused["value"] == "Annabelle"  # reported as it is, never cut to fit
    assert out.loc[out["field"] != "first_name", "ok"].all()
    assert set(out["field"]) == {"first_name", "last_name", load.LINK_FIELD}


def test_load_dynamics_with_only_over_long_values_makes_no_call():
    client = FakeDynamics()
    out = load.load_dynamics(CONFIG, LEAD, _dynamics_writes([(1, "L1", "first_name", "Annabelle")]),
                             pd.DataFrame(columns=["dynamics_id", "person_id"]), {"first_name": 5}, client)
    assert client.sent == [] and out["error_code"].tolist() == ["too_long"]


def test_load_dynamics_dry_run_sends_nothing():
    client = FakeDynamics()
    out = load.load_dynamics(CONFIG, LEAD, _dynamics_writes([(1, "L1", "last_name", "Smith")]),
                             pd.DataFrame(columns=["dynamics_id", "person_id"]), {}, client, dry_run=True)
    assert client.sent == [] and out["error_code"].tolist() == ["dry_run"] and not out["ok"].any()


# -- Marketo: Sync Leads or the Bulk Lead Import ---------------------------------------------------------

class FakeMarketo:
    """``sync_leads`` / ``import_leads`` that record their calls; sync splits into 300-record API calls."""

    def __init__(self, reject: set[int] = frozenset()) -> None:
        self.reject = reject
        self.calls: list[tuple[str, list[dict], dict]] = []
        self.calls_made = 0

    def _result(self, records):
        status = ["skipped" if r["id"] in self.reject else "updated" for r in records]
        return pd.DataFrame({"id": [r["id"] for r in records], "status": status,
                             "reason_code": [("1004" if s == "skipped" else None) for s in status],
                             "reason_message": [("not found" if s == "skipped" else None) for s in status]})

    def sync_leads(self, records, action="createOrUpdate", lookup_field="email"):
        records = [dict(r) for r in records]
        self.calls.append(("sync_leads", records, {"action": action, "lookup_field": lookup_field}))
        self.calls_made += math.ceil(len(records) / 300)
        return self._result(records)

    def import_leads(self, records, *, lookup_field="id", **_):
        records = [dict(r) for r in records]
        self.calls.append(("import_leads", records, {"lookup_field": lookup_field}))
        self.calls_made += 3  # create, status, failures: whatever the size
        return self._result(records)


def _marketo_writes(n: int, clear_every: int = 0) -> pd.DataFrame:
    rows = []
    for p in range(1, n + 1):
        rows.append((p, f"L{p}", "first_name", f"First{p}", "lead"))
        rows.append((p, f"L{p}", "last_name", None if clear_every and p % clear_every == 0 else f"Last{p}", "lead"))
    return pd.DataFrame(rows, columns=["person_id", "dynamics_id", "field", "value", "entity_type"])


NO_LINKS = pd.DataFrame(columns=["person_id", "dynamics_id", "dynamics_type"])


def test_load_marketo_below_the_threshold_uses_sync_leads_by_id():
    client = FakeMarketo()
    out, method = load.load_marketo(CONFIG, CONFIG.entities, _marketo_writes(5), NO_LINKS, {}, client, bulk_threshold=10)
    assert method == "sync"
    [(name, records, kwargs)] = client.calls
    assert name == "sync_leads" and kwargs == {"action": "updateOnly", "lookup_field": "id"}
    assert sorted(r["id"] for r in records) == [1, 2, 3, 4, 5]
    assert {"id": 3, "firstName": "First3", "lastName": "Last3"} in records
    assert out["ok"].all() and len(out) == 10


def test_load_marketo_above_the_threshold_imports_and_sends_clears_through_sync_leads():
    client = FakeMarketo()
    out, method = load.load_marketo(CONFIG, CONFIG.entities, _marketo_writes(12, clear_every=4), NO_LINKS, {}, client,
                                    bulk_threshold=10)
    assert method == "bulk_import"
    calls = {name: (records, kwargs) for name, records, kwargs in client.calls}
    assert [c[0] for c in client.calls].count("import_leads") == 1
    imported, kwargs = calls["import_leads"]
    assert kwargs == {"lookup_field": "id"}
    assert sorted(r["id"] for r in imported) == [p for p in range(1, 13) if p % 4]
    assert all(v is not None for r in imported for v in r.values())  # a blank cell would not clear
    synced, kwargs = calls["sync_leads"]
    assert sorted(r["id"] for r in synced) == [4, 8, 12]
    assert all(r["lastName"] is None for r in synced)
    assert out["ok"].all() and len(out) == 24


def test_load_marketo_rejections_line_up_with_rows():
    client = FakeMarketo(reject={2})
    out, _ = load.load_marketo(CONFIG, CONFIG.entities, _marketo_writes(3), NO_LINKS, {}, client)
    failed = out[~out["ok"].astype(bool)]
    assert set(failed["person_id"]) == {2} and len(failed) == 2 and set(failed["error_code"]) == {"1004"}
    assert out[out["person_id"] != 2]["ok"].all()


def test_load_marketo_1100_records_cost_the_minimum_sync_calls():
    client = FakeMarketo()
    out, method = load.load_marketo(CONFIG, CONFIG.entities, _marketo_writes(1100), NO_LINKS, {}, client)
    assert method == "sync"
    # the engine hands every record over in one list; the client's 300-record batches make the calls
    assert [(name, len(records)) for name, records, _ in client.calls] == [("sync_leads", 1100)]
    assert client.calls_made == math.ceil(1100 / 300)
    assert out["ok"].all() and len(out) == 2200


def test_load_marketo_link_writes_set_both_link_fields():
    client = FakeMarketo()
    links = pd.DataFrame({"person_id": [7], "dynamics_id": ["C7"], "dynamics_type": ["contact"]})
    empty = _marketo_writes(0)
    out, _ = load.load_marketo(CONFIG, CONFIG.entities, empty, links, {}, client)
    [(_, records, _)] = client.calls
    assert records == [{"id": 7, "dynamicsRecordId": "C7", "dynamicsRecordType": "contact"}]
    assert out["field"].tolist() == [load.LINK_FIELD] and out["ok"].all()


def test_load_marketo_refuses_over_long_values_without_a_call():
    client = FakeMarketo()
    writes = _marketo_writes(1)
    writes.loc[writes["field"] == "first_name", "value"] = "x" * 300
    out, _ = load.load_marketo(CONFIG, CONFIG.entities, writes, NO_LINKS, {"first_name": 255}, client)
    [(_, records, _)] = client.calls
    assert records == [{"id": 1, "lastName": "Last1"}]
    refused = out[out["field"] == "first_name"].iloc[0]
    assert refused["error_code"] == "too_long" and refused["value"] == "x" * 300 and not refused["ok"]
    assert "300 characters" in refused["error_message"] and "255" in refused["error_message"]


def test_load_marketo_without_import_leads_stays_on_sync():
    class SyncOnly:  # a client without the Bulk Lead Import
        def __init__(self) -> None:
            self.inner = FakeMarketo()
            self.calls = self.inner.calls

        def sync_leads(self, *args, **kwargs):
            return self.inner.sync_leads(*args, **kwargs)

    client = SyncOnly()
    _, method = load.load_marketo(CONFIG, CONFIG.entities, _marketo_writes(20), NO_LINKS, {}, client, bulk_threshold=10)
    assert method == "sync" and [c[0] for c in client.calls] == ["sync_leads"]


def test_load_marketo_of_nothing_calls_nothing():
    client = FakeMarketo()
    out, method = load.load_marketo(CONFIG, CONFIG.entities, _marketo_writes(0), NO_LINKS, {}, client)
    assert out.empty and client.calls == [] and method == "sync"
    assert np.array_equal(out.columns[:4], ["person_id", "dynamics_id", "field", "value"])

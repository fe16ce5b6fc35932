"""Bulk writes sent in parallel against the Dataverse sandbox: outcomes per record in input order, a failed
chunk falls back on its own, 429s back off without losing or repeating a row, the number of requests in flight
stays within the bound (and the service's x-ms-dop-hint), and an error no retry can fix stops the rest.

Chunks are made small here (``writes.CHUNK``) so that many requests go out for a few hundred rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mdsync.dynamics import DynamicsClient, writes
from mdsync.errors import ServiceError

BULK = "/api/data/v9.2/contacts/Microsoft.Dynamics.CRM."


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(writes, "CHUNK", 10)


def client_for(dataverse, **kw) -> DynamicsClient:
    kw.setdefault("backoff_s", 0.01)
    client = DynamicsClient(dataverse.org_url, dataverse.client_id, dataverse.client_secret, dataverse.tenant_id,
                            authority=dataverse.authority, verify=dataverse.ca_bundle, **kw)
    client.request("GET", "WhoAmI")  # token and x-ms-dop-hint before anything is counted
    dataverse.admin("POST", "calls/reset")
    dataverse.admin("POST", "concurrency/reset")
    return client


def calls(dataverse) -> dict:
    """Write calls by message (``UpsertMultiple``, ``$batch``...)."""
    return {k.rsplit(".", 1)[-1].rsplit("/", 1)[-1]: v for k, v in dataverse.calls()["by_endpoint"].items()
            if "Microsoft.Dynamics.CRM." in k or k.endswith("/$batch")}


def stored(client) -> pd.DataFrame:
    return client.query("contacts", ["lastname", "jobtitle", "mdsync_marketopersonid"]).set_index(
        "mdsync_marketopersonid")


def test_parallel_upserts_return_outcomes_in_input_order(dataverse, small_chunks):
    client = client_for(dataverse, max_parallel_requests=4)
    # the first two requests answer late, so later chunks finish first
    dataverse.fault("delay", count=2, seconds=0.5, path_prefix=BULK)
    rows = [{"mdsync_marketopersonid": f"m{i}", "lastname": f"L{i}"} for i in range(95)]
    result = client.upsert_multiple("contacts", rows)
    assert list(result["index"]) == list(range(95)) and result["ok"].all()
    rows_by_key = stored(client)
    assert list(result["id"]) == [rows_by_key.loc[f"m{i}", "contactid"] for i in range(95)]
    assert calls(dataverse) == {"UpsertMultiple": 10}  # ceil(95 / 10): the floor, whatever the order
    assert 2 <= dataverse.concurrency()["peak"] <= 4


def test_a_bad_record_fails_only_its_own_chunk(dataverse, small_chunks):
    ids = dataverse.seed("contacts", [{"lastname": f"L{i}"} for i in range(40)])
    client = client_for(dataverse, max_parallel_requests=4)
    updates = [{"contactid": i, "jobtitle": f"T{n}"} for n, i in enumerate(ids)]
    updates[13]["jobtitle"] = "x" * 200  # chunk 1 (rows 10-19) fails as a whole, then goes as $batch
    updates[25]["contactid"] = "00000000-0000-0000-0000-00000000abcd"  # chunk 2: a row that does not exist
    result = client.update_multiple("contacts", updates)
    assert list(result["index"]) == list(range(40))
    bad = result.set_index("index").loc[[13, 25]]
    assert list(bad["ok"]) == [False, False]
    assert bad.loc[13, "error_code"] == "0x80044331" and "'jobtitle'" in bad.loc[13, "error_message"]
    assert bad.loc[25, "status"] == 404 and "Does Not Exist" in bad.loc[25, "error_message"]
    assert result.drop(index=[13, 25])["ok"].all()
    titles = client.query("contacts", ["jobtitle"]).set_index("contactid")["jobtitle"]
    assert {i: None if pd.isna(titles[i]) else titles[i] for i in ids} == {
        i: None if n in (13, 25) else f"T{n}" for n, i in enumerate(ids)}
    assert calls(dataverse) == {"UpdateMultiple": 4, "$batch": 2}


def test_throttling_during_parallel_creates_backs_off_and_every_row_lands_once(dataverse, small_chunks):
    client = client_for(dataverse, max_parallel_requests=4)
    dataverse.fault("throttle", count=3, seconds=1, path_prefix=BULK)
    dataverse.fault("server_error", count=2, path_prefix=BULK)
    result = client.create_multiple("contacts", [{"lastname": f"C{i}"} for i in range(80)])
    assert result["ok"].all() and result["id"].is_unique
    names = client.query("contacts", ["lastname"])["lastname"]
    assert sorted(names) == sorted(f"C{i}" for i in range(80))  # exactly once each
    assert calls(dataverse) == {"CreateMultiple": 8 + 3 + 2}  # each refused request sent once more


def test_requests_in_flight_stay_within_the_bound_and_the_dop_hint(dataverse, small_chunks):
    dataverse.fault("delay", count=100, seconds=0.1, path_prefix=BULK)  # every request overlaps the others
    client = client_for(dataverse, max_parallel_requests=3)
    assert client.parallel_requests() == 3
    assert client.upsert_multiple("contacts", [{"mdsync_marketopersonid": f"a{i}", "lastname": "A"}
                                               for i in range(120)])["ok"].all()
    assert 2 <= dataverse.concurrency()["peak"] <= 3
    dataverse.admin("PUT", "concurrency", {"dop_hint": 2})
    hinted = client_for(dataverse, max_parallel_requests=16)
    assert hinted.parallel_requests() == 2  # the service recommends fewer than the setting
    assert hinted.upsert_multiple("contacts", [{"mdsync_marketopersonid": f"b{i}", "lastname": "B"}
                                               for i in range(120)])["ok"].all()
    assert dataverse.concurrency()["peak"] == 2
    assert len(client.query("contacts", ["lastname"])) == 240


def test_default_parallelism_and_the_client_cap(dataverse):
    client = client_for(dataverse)
    assert client.max_parallel_requests is None and client.parallel_requests() == writes.DEFAULT_PARALLEL
    dataverse.admin("PUT", "concurrency", {"dop_hint": None})
    unhinted = client_for(dataverse, max_parallel_requests=6)
    assert unhinted.parallel_requests() == 6


def test_an_error_no_retry_fixes_stops_the_remaining_chunks(dataverse, small_chunks):
    client = client_for(dataverse, max_parallel_requests=2, max_attempts=2)
    # three 5xx among two requests in flight: one of them gets two and gives up; the rest answer slowly
    dataverse.fault("server_error", count=3, path_prefix=BULK)
    dataverse.fault("delay", count=100, seconds=0.2, path_prefix=BULK)
    with pytest.raises(ServiceError) as info:
        client.upsert_multiple("contacts", [{"mdsync_marketopersonid": f"s{i}", "lastname": "S"} for i in range(200)])
    assert "gave up after 2 attempts" in str(info.value)
    sent = calls(dataverse)["UpsertMultiple"]
    landed = len(client.query("contacts", ["lastname"]))
    assert landed % 10 == 0 and landed < 200  # whole chunks, and not all of them
    assert sent - 3 == landed // 10  # the 5xx answers and one call per chunk that landed: the rest never sent


def test_parallel_requests_renew_an_expired_token_once(dataverse, small_chunks):
    client = client_for(dataverse, max_parallel_requests=4)
    dataverse.admin("POST", "faults", {"kind": "expire_tokens"})
    dataverse.fault("delay", count=100, seconds=0.05, path_prefix=BULK)
    assert client.upsert_multiple("contacts", [{"mdsync_marketopersonid": f"t{i}", "lastname": "T"}
                                               for i in range(100)])["ok"].all()
    token_calls = sum(v for k, v in dataverse.calls()["by_endpoint"].items() if k.endswith("/token"))
    assert token_calls == 1
    assert len(client.query("contacts", ["lastname"])) == 100


def test_batch_operations_go_in_parallel_in_order(dataverse, small_chunks):
    ids = dataverse.seed("contacts", [{"lastname": f"B{i}"} for i in range(35)])
    client = client_for(dataverse, max_parallel_requests=4)
    ops = [{"method": "PATCH", "url": f"contacts({i})", "body": {"jobtitle": f"J{n}"}, "headers": {"If-Match": "*"}}
           for n, i in enumerate(ids)]
    ops[7]["body"] = {"jobtitle": "y" * 200}
    out = client.batch(ops)
    assert [o["ok"] for o in out] == [n != 7 for n in range(35)]
    assert out[7]["error_code"] == "0x80044331"
    assert calls(dataverse) == {"$batch": 4}


# row serialisation ----------------------------------------------------------------------------------------------
def test_records_from_a_frame_and_from_dicts_are_json_ready():
    frame = pd.DataFrame({
        "s": pd.Series(["a", None, "c"], dtype="str"),
        "i": pd.Series([1, None, 3], dtype="Int64"),
        "f": [1.5, np.nan, 2.0],
        "b": pd.Series([True, None, False], dtype="boolean"),
        "t": pd.to_datetime(["2024-01-02T03:04:05Z", None, "2024-06-01T00:00:00+02:00"], utc=True, format="ISO8601"),
        "n": pd.to_datetime(["2024-01-02 03:04:05", None, None]),
        "o": pd.Series([np.int64(7), pd.NaT, {"x": 1}], dtype=object),
    })
    expected = [
        {"s": "a", "i": 1, "f": 1.5, "b": True, "t": "2024-01-02T03:04:05Z", "n": "2024-01-02T03:04:05Z", "o": 7},
        {"s": None, "i": None, "f": None, "b": None, "t": None, "n": None, "o": None},
        {"s": "c", "i": 3, "f": 2.0, "b": False, "t": "2024-05-31T22:00:00Z", "n": None, "o": {"x": 1}},
    ]
    got = writes._records(frame)
    assert got == expected
    assert [type(v) for v in got[0].values()] == [str, int, float, bool, str, str, int]
    plain = {"contactid": "x", "jobtitle": "T", "donotemail": False, "n": 3, "gone": None}
    mixed = {"a": np.int64(2), "b": float("nan"), "c": pd.Timestamp("2024-01-01", tz="UTC"), "d": pd.NA, "e": [1]}
    out = writes._records([plain, mixed])
    assert out[0] is plain  # nothing to clean: not copied
    assert out[1] == {"a": 2, "b": None, "c": "2024-01-01T00:00:00Z", "d": None, "e": [1]} and type(out[1]["a"]) is int
    assert writes._records(pd.DataFrame(index=range(2))) == [{}, {}]

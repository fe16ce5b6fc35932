"""The commit stage (DESIGN §4.5, §4.6): baselines advance only for writes that went through; activity and
sync-error rows; one atomic commit against a real SQLite state store."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import pytest

from mdsync.activity import COLUMNS, write_activity
from mdsync.commit import commit_cycle, error_rows, resolved_keys, succeeded_baselines
from mdsync.constants import LINK_FIELD
from mdsync.plan import REQUIRES_DYNAMICS, REQUIRES_MARKETO, REQUIRES_NOTHING
from mdsync.state import open_store


def _results(rows: list[tuple]) -> pd.DataFrame:
    """``(person_id, dynamics_id, field, value, ok, error_code, error_message)`` rows."""
    return pd.DataFrame(rows, columns=["person_id", "dynamics_id", "field", "value", "ok", "error_code", "error_message"])


NO_RESULTS = _results([])


def test_succeeded_baselines_keeps_only_baselines_whose_write_went_through():
    updates = pd.DataFrame([
        (1, "first_name", "Ann", REQUIRES_NOTHING),   # both sides agreed: no write needed
        (1, "last_name", "Lee", REQUIRES_DYNAMICS),   # written to Dynamics, accepted
        (2, "last_name", "Roe", REQUIRES_DYNAMICS),   # written to Dynamics, rejected
        (3, "job_title", "CTO", REQUIRES_MARKETO),    # written to Marketo, accepted
        (4, "job_title", "CEO", REQUIRES_MARKETO),    # Marketo write never attempted (no result)
        (5, "city", "Oslo", REQUIRES_DYNAMICS),       # only the Marketo write of the same key succeeded
    ], columns=["person_id", "field", "value", "requires"])
    dynamics = _results([(1, "L1", "last_name", "Lee", True, None, None), (2, "L2", "last_name", "Roe", False, "x", "no")])
    marketo = _results([(3, "L3", "job_title", "CTO", True, None, None), (5, "L5", "city", "Oslo", True, None, None)])
    kept = succeeded_baselines(updates, dynamics, marketo)
    assert list(zip(kept["person_id"], kept["field"])) == [(1, "first_name"), (1, "last_name"), (3, "job_title")]
    assert kept.columns.tolist() == updates.columns.tolist()


def test_succeeded_baselines_without_results_keeps_only_those_needing_no_write():
    updates = pd.DataFrame([(1, "first_name", "Ann", REQUIRES_NOTHING), (2, "first_name", "Bo", REQUIRES_MARKETO)],
                           columns=["person_id", "field", "value", "requires"])
    assert succeeded_baselines(updates, NO_RESULTS, NO_RESULTS)["person_id"].tolist() == [1]
    assert succeeded_baselines(updates.iloc[:0], NO_RESULTS, NO_RESULTS).empty


def test_write_activity_rows_for_updates_and_rejections():
    writes = pd.DataFrame([(1, "first_name", "Ann", "changed in Marketo"), (2, "first_name", None, "filled from Marketo")],
                          columns=["person_id", "field", "previous", "reason"])
    results = _results([(1, "L1", "first_name", "Anna", True, None, None),
                        (2, "L2", "first_name", "Bob", False, "0x80040237", "duplicate"),
                        (3, "L3", LINK_FIELD, "3", True, None, None)])
    act = write_activity("lead", writes, results, "dynamics")
    assert act.columns.tolist() == COLUMNS
    assert len(act) == 2  # the link write is not a field update
    ok, bad = act.to_dict("records")
    assert (ok["action"], ok["person_id"], ok["dynamics_id"], ok["field"], ok["old_value"], ok["new_value"]) == (
        "update", 1, "L1", "first_name", "Ann", "Anna")
    assert ok["detail"] == "changed in Marketo -> Dynamics" and ok["entity_type"] == "lead"
    assert bad["action"] == "error" and bad["new_value"] == "Bob"
    assert "Dynamics rejected the value: 0x80040237 duplicate" in bad["detail"]


def test_write_activity_marks_dry_runs():
    writes = pd.DataFrame([(1, "city", "Oslo", "changed in Dynamics")], columns=["person_id", "field", "previous", "reason"])
    act = write_activity("contact", writes, _results([(1, "C1", "city", "Bergen", False, "dry_run", None)]), "marketo")
    [row] = act.to_dict("records")
    assert row["action"] == "update" and row["detail"].endswith("[dry run: not written]") and "-> Marketo" in row["detail"]
    assert write_activity("contact", writes, NO_RESULTS, "marketo").empty


def test_error_rows_are_the_failed_writes_except_dry_runs():
    results = _results([(1, "L1", "first_name", "Ann", True, None, None),
                        (2, "C2", "city", "x" * 99, False, "too_long", "value is 99 characters"),
                        (3, "L3", "city", "Oslo", False, "dry_run", None),
                        (4, "L4", "city", "Rome", False, None, None)])
    entity_of = pd.Series({1: "lead", 2: "contact", 3: "lead", 4: "lead"})
    rows = error_rows(results, "dynamics", entity_of)
    assert rows.columns.tolist() == ["person_id", "dynamics_type", "dynamics_id", "target", "field", "value", "code", "message"]
    assert rows["person_id"].tolist() == [2, 4]
    first = rows.iloc[0].to_dict()
    assert first == {"person_id": 2, "dynamics_type": "contact", "dynamics_id": "C2", "target": "dynamics",
                     "field": "city", "value": "x" * 99, "code": "too_long", "message": "value is 99 characters"}
    assert error_rows(NO_RESULTS, "dynamics", entity_of).empty
    assert error_rows(results.iloc[:1], "dynamics", entity_of).empty


def test_resolved_keys_are_the_writes_that_went_through():
    results = _results([(1, "L1", "city", "Oslo", True, None, None), (2, "L2", "city", "Rome", False, "x", "y")])
    assert resolved_keys(results, "marketo").to_dict("records") == [{"person_id": 1, "field": "city", "target": "marketo"}]


@pytest.fixture
def store(tmp_path):
    return open_store(f"sqlite:///{tmp_path / 'state.db'}")


def test_commit_cycle_persists_everything(store):
    store.save_links(pd.DataFrame({"person_id": [9], "dynamics_type": ["lead"], "dynamics_id": ["L9"], "method": ["email"]}),
                     "run-0")
    store.save_baselines(pd.DataFrame({"person_id": [9], "field": ["city"], "value": ["Oslo"]}), "run-0")
    store.record_errors(pd.DataFrame([{"person_id": 1, "dynamics_type": "lead", "dynamics_id": "L1", "target": "dynamics",
                                       "field": "city", "value": "Rome", "code": "x", "message": "old"}]), "run-0")
    high = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    counts = commit_cycle(
        store, "run-1",
        baselines=pd.DataFrame({"person_id": [1, 2], "field": ["city", "first_name"], "value": ["Oslo", None],
                                "requires": [REQUIRES_DYNAMICS, REQUIRES_NOTHING]}),
        activity=pd.DataFrame([{"action": "update", "person_id": 1, "field": "city", "new_value": "Oslo"},
                               {"action": "link", "person_id": 2, "dynamics_type": "contact", "dynamics_id": "C2"}]),
        errors=pd.DataFrame([{"person_id": 2, "dynamics_type": "contact", "dynamics_id": "C2", "target": "marketo",
                              "field": "phone", "value": "12", "code": "1003", "message": "bad phone"}]),
        resolved=pd.DataFrame({"person_id": [1], "target": ["dynamics"], "field": ["city"]}),
        watermarks=[("marketo", "persons", high, None), ("dynamics", "lead", high, "delta-token")],
        links=pd.DataFrame({"person_id": [1, 2], "dynamics_type": ["lead", "contact"], "dynamics_id": ["L1", "C2"],
                            "method": ["email", "created_in_dynamics"]}),
        unlinked=[9],
    )
    assert counts == {"baselines": 2, "errors": 1, "activity": 2, "watermarks": 2}
    links = store.load_links()
    assert links[["dynamics_type", "dynamics_id", "method"]].to_dict("index") == {
        1: {"dynamics_type": "lead", "dynamics_id": "L1", "method": "email"},
        2: {"dynamics_type": "contact", "dynamics_id": "C2", "method": "created_in_dynamics"}}
    baselines = store.load_baselines(fields=["city", "first_name"])
    assert 9 not in baselines.index  # the unlinked pair's baselines went with its link
    assert baselines.loc[1, "city"] == "Oslo" and pd.isna(baselines.loc[2, "first_name"])
    errors = store.open_errors()
    assert errors[["person_id", "target", "field", "message"]].to_dict("records") == [
        {"person_id": 2, "target": "marketo", "field": "phone", "message": "bad phone"}]
    history = store.activity(run_id="run-1")
    assert history["action"].tolist() == ["update", "link"]
    wm = store.watermark("dynamics", "lead")
    assert wm.high_water == high and wm.token == "delta-token" and wm.run_id == "run-1"


def test_commit_cycle_is_all_or_nothing(store):
    high = datetime(2026, 1, 2, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        commit_cycle(store, "run-1",
                     baselines=pd.DataFrame({"person_id": [1], "field": ["city"], "value": ["Oslo"], "requires": [""]}),
                     activity=pd.DataFrame([{"action": None, "person_id": 1}]),  # refused: every row needs an action
                     errors=pd.DataFrame(), resolved=pd.DataFrame(columns=["person_id", "target", "field"]),
                     watermarks=[("marketo", "persons", high, None)],
                     links=pd.DataFrame({"person_id": [1], "dynamics_type": ["lead"], "dynamics_id": ["L1"],
                                         "method": ["email"]}))
    assert store.load_links().empty
    assert store.load_baselines(fields=["city"]).empty
    assert store.watermark("marketo", "persons") is None


def test_commit_cycle_of_an_idle_cycle_moves_only_watermarks(store):
    high = datetime(2026, 1, 2, tzinfo=timezone.utc)
    counts = commit_cycle(store, "run-2", baselines=pd.DataFrame(columns=["person_id", "field", "value", "requires"]),
                          activity=pd.DataFrame(), errors=pd.DataFrame(),
                          resolved=pd.DataFrame(columns=["person_id", "target", "field"]),
                          watermarks=[("marketo", "persons", high, None)])
    assert counts == {"baselines": 0, "errors": 0, "activity": 0, "watermarks": 1}
    assert store.watermark("marketo", "persons").high_water == high

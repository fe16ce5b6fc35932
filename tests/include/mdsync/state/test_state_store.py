"""State store round trips on SQLite and on a real PostgreSQL server (started by the test run)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import sqlalchemy as sa

from mdsync.errors import StateStoreError
from mdsync.state import StateStore, open_store


@pytest.fixture
def store(state_url):
    s = open_store(state_url)
    yield s
    s.engine.dispose()


def test_schema_is_migrated_and_upgrade_is_idempotent(store):
    assert store.revision() == "0005"
    store.upgrade()
    assert store.revision() == "0005"
    tables = set(sa.inspect(store.engine).get_table_names())
    assert {"links", "baselines", "watermarks", "activity", "sync_errors", "cycle_lease", "deletions", "merges",
            "mdsync_alembic_version"} <= tables


def test_links_round_trip_and_relink(store):
    store.save_links(pd.DataFrame({
        "person_id": [1, 2], "dynamics_type": ["lead", "contact"],
        "dynamics_id": ["11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"],
        "method": ["email", "created_in_dynamics"],
    }), run_id="run-1")
    store.save_baselines(pd.DataFrame({"person_id": [1, 2], "field": ["email", "email"],
                                       "value": pd.array(["a@x.com", "b@x.com"], dtype="str")}), "run-1")
    links = store.load_links()
    assert links.loc[1, "dynamics_type"] == "lead" and links.loc[2, "method"] == "created_in_dynamics"
    assert store.load_links("contact").index.tolist() == [2]
    # Person 3 takes over person 2's contact (e.g. after a merge in Marketo): person 2 is unlinked and
    # its baselines, which described the old pair, are gone.
    store.save_links(pd.DataFrame({"person_id": [3], "dynamics_type": ["contact"],
                                   "dynamics_id": ["22222222-2222-2222-2222-222222222222"], "method": ["email"]}), "run-2")
    links = store.load_links()
    assert links.index.tolist() == [1, 3]
    assert store.load_baselines().index.tolist() == [1]
    store.remove_links([1])
    assert store.load_links().index.tolist() == [3] and store.load_baselines().empty


def test_baselines_round_trip_wide(store):
    store.save_baselines(pd.DataFrame({
        "person_id": [1, 1, 2], "field": ["email", "job_title", "email"],
        "value": pd.array(["a@x.com", None, "Zoë 'O'Brien' & co"], dtype="str"),
    }), run_id="r")
    wide = store.load_baselines(fields=["email", "job_title", "city"])
    assert wide.loc[2, "email"] == "Zoë 'O'Brien' & co"
    assert pd.isna(wide.loc[1, "job_title"]) and pd.isna(wide.loc[1, "city"])
    assert str(wide["email"].dtype) == "str"
    store.save_baselines(pd.DataFrame({"person_id": [1], "field": ["email"], "value": pd.array(["new@x.com"], dtype="str")}), "r2")
    assert store.load_baselines(person_ids=[1]).loc[1, "email"] == "new@x.com"
    assert store.load_baselines(person_ids=[99]).empty


def test_watermarks_round_trip(store):
    assert store.watermark("marketo", "lead") is None
    t = datetime(2026, 11, 22, 3, 0, 0, tzinfo=timezone.utc)
    store.save_watermark("marketo", "lead", t, "paging-token-1", "run-1")
    store.save_watermark("dynamics", "contact", None, "https://org/api/data/v9.2/contacts?$deltatoken=9", "run-1")
    wm = store.watermark("marketo", "lead")
    assert (wm.high_water, wm.token, wm.run_id) == (t, "paging-token-1", "run-1")
    store.save_watermark("marketo", "lead", t + timedelta(minutes=5), "paging-token-2", "run-2")
    assert store.watermark("marketo", "lead").token == "paging-token-2"
    assert store.watermark("dynamics", "contact").high_water is None
    with pytest.raises(ValueError, match="timezone-aware"):
        store.save_watermark("marketo", "lead", datetime(2026, 1, 1), None, "r")


def test_activity_round_trip_and_query_by_email(store):
    store.record_activity(pd.DataFrame({
        "entity_type": ["lead", "lead", "contact"], "person_id": [1, 1, 2],
        "email": ["Ann@X.com", "ann.new@x.com", "bob@x.com"], "dynamics_type": ["lead", "lead", "contact"],
        "dynamics_id": ["d1", "d1", "d2"], "action": ["update", "collision", "create"],
        "field": ["job_title", "job_title", None], "old_value": ["A", "B", None], "new_value": ["B", "C", None],
        "winner": [None, "marketo", None], "detail": ["changed in Marketo", "both changed", "new contact"],
    }), run_id="run-1")
    history = store.activity(email="ann@x.com")
    # the second row was recorded under the person's new email and is still part of their history
    assert history["action"].tolist() == ["update", "collision"]
    assert history["winner"].tolist()[1] == "marketo"
    assert store.activity(person_id=2)["action"].tolist() == ["create"]
    assert len(store.activity(run_id="run-1")) == 3
    assert store.activity(dynamics_id="d1", limit=1)["old_value"].tolist() == ["A"]
    with pytest.raises(ValueError, match="needs an action"):
        store.record_activity(pd.DataFrame({"person_id": [1]}), "r")


def test_sync_errors_open_refresh_and_resolve(store):
    row = {"person_id": [1], "dynamics_type": ["contact"], "dynamics_id": ["d1"], "target": ["dynamics"],
           "field": ["job_title"], "value": ["X" * 120], "code": ["0x80044331"],
           "message": ["A validation error occurred. The length of the 'jobtitle' attribute exceeded 100."]}
    store.record_errors(pd.DataFrame(row), "run-1")
    store.record_errors(pd.DataFrame({**row, "value": ["Y" * 120]}), "run-2")
    errors = store.open_errors()
    assert len(errors) == 1
    assert errors.loc[0, "occurrences"] == 2 and errors.loc[0, "value"] == "Y" * 120
    assert errors.loc[0, "run_id"] == "run-2"
    assert store.open_errors(target="marketo").empty
    assert store.resolve_errors(pd.DataFrame({"person_id": [1], "target": ["dynamics"], "field": ["job_title"]})) == 1
    assert store.open_errors().empty


def test_writes_in_one_transaction_roll_back_together(store):
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            store.save_baselines(pd.DataFrame({"person_id": [5], "field": ["email"],
                                               "value": pd.array(["x@x.com"], dtype="str")}), "r", conn=tx)
            store.save_watermark("marketo", "lead", datetime.now(timezone.utc), None, "r", conn=tx)
            raise RuntimeError("crash between writes")
    assert store.load_baselines().empty and store.watermark("marketo", "lead") is None


def test_unreachable_database_gives_a_clear_error(tmp_path):
    with pytest.raises(StateStoreError, match="cannot migrate the state store"):
        open_store("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    # the password never appears in the message
    try:
        open_store("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    except StateStoreError as exc:
        assert "secret" not in str(exc)


def test_default_url_lives_under_airflow_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MDSYNC_STATE_URL", raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    assert StateStore().url == f"sqlite:///{tmp_path}/mdsync/state.sqlite"
    monkeypatch.setenv("MDSYNC_STATE_URL", "sqlite:///elsewhere.sqlite")
    assert StateStore().url == "sqlite:///elsewhere.sqlite"


def test_stores_opened_at_once_by_several_processes_migrate_once(tmp_path):
    """The first run's tasks open a fresh store together: one migrates, the others wait and find it at head."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    code = "import sys; from mdsync.state import open_store; print(open_store(sys.argv[1]).revision())"
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err[-500:] for _, err in outcomes]
    assert len({out.strip() for out, _ in outcomes}) == 1 and outcomes[0][0].strip()

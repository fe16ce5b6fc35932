"""mdsync.explain on the state store alone (SQLite and PostgreSQL) and on frames: the search box's resolver, bounded
lookups by indexed columns, and the pure reason rules."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import sqlalchemy as sa

from mdsync.config import load_config
from mdsync.explain import (Facts, FieldRow, PairValues, Subject, _email_ranges, explain, find_subject, is_guid,
                            why)
from mdsync.settings import Settings
from mdsync.state import open_store

CONFIG = load_config()
ANN, LEAD, LOST = "0b6c2a5e-1d11-4c5e-9a43-000000000001", "0b6c2a5e-1d11-4c5e-9a43-000000000002", \
    "0b6c2a5e-1d11-4c5e-9a43-000000000003"


@pytest.fixture
def store(state_url):
    s = open_store(state_url)
    s.save_links(pd.DataFrame({"person_id": [7, 8], "dynamics_type": ["contact", "lead"], "dynamics_id": [ANN, LEAD],
                               "method": ["email", "email"]}), "run-1")
    s.record_activity(pd.DataFrame([
        {"person_id": 7, "email": "Ann.Lee@Example.COM", "entity_type": "contact", "dynamics_type": "contact",
         "dynamics_id": ANN, "action": "link", "detail": "linked (email)"},
        {"person_id": 8, "email": "lena@example.com", "entity_type": "lead", "dynamics_type": "lead",
         "dynamics_id": LEAD, "action": "link", "detail": "linked (email)"},
        {"email": "twin@example.com", "entity_type": "contact", "dynamics_type": "contact", "dynamics_id": LOST,
         "action": "ambiguous", "detail": "2 Marketo persons have this email (ids 11, 12); none is linked"},
        {"person_id": 11, "email": "Twin@example.com", "action": "skip", "detail": "not marked"},
    ]), "run-1")
    s.record_errors(pd.DataFrame([{"person_id": 7, "dynamics_type": "contact", "dynamics_id": ANN, "target": "dynamics",
                                   "field": "job_title", "value": "Intern", "code": "0x80040265",
                                   "message": "Interns are not contacts."}]), "run-2")
    s.save_watermark("marketo", "persons", datetime.now(timezone.utc), None, "run-2")
    return s


def test_find_subject_by_email_id_and_guid(store):
    found = find_subject(store, "  ann.lee@example.com ")  # stored as Ann.Lee@Example.COM
    assert [(s.person_id, s.dynamics_type, s.dynamics_id, s.linked) for s in found] == [(7, "contact", ANN, True)]
    assert found[0].email == "Ann.Lee@Example.COM"
    assert [(s.person_id, s.dynamics_id) for s in find_subject(store, "8")] == [(8, LEAD)]
    assert [s.person_id for s in find_subject(store, LEAD.upper())] == [8]
    # an email of an unlinked record and an unlinked person: both come back, each as it is known
    twins = find_subject(store, "TWIN@EXAMPLE.COM")
    assert {(s.person_id, s.dynamics_id, s.linked) for s in twins} == {(11, None, False), (None, LOST, False)}
    # ids the store never saw still come back (read live by why / side_by_side), marked unknown
    assert find_subject(store, "999").pop().known is False
    assert find_subject(store, "{0b6c2a5e-1d11-4c5e-9a43-0000000000ff}").pop().known is False
    assert find_subject(store, "nobody@example.com") == []
    with pytest.raises(ValueError, match="'Ann Lee' is not an email, a Marketo person id"):
        find_subject(store, "Ann Lee")


def test_why_from_the_state_store_alone(store):
    answer = why(CONFIG, store, Settings.from_env(), person_id=7)
    assert answer.status == "not_synced" and answer.values is None
    reason, = answer.reasons
    assert reason.code == "value_rejected" and "'Intern'" in reason.detail and "Interns are not contacts." in reason.detail
    assert reason.run_id == "run-2" and "retry_failed" in reason.action
    quiet = why(CONFIG, store, Settings.from_env(), person_id=8)
    assert quiet.status == "unknown" and quiet.reasons == [] and "no live read" in quiet.summary
    with pytest.raises(ValueError, match="needs a person_id"):
        why(CONFIG, store, Settings.from_env())
    with pytest.raises(ValueError, match="'abc' is not a GUID"):
        why(CONFIG, store, Settings.from_env(), dynamics_id="abc")


def test_lookups_are_index_searches_with_a_limit(tmp_path):
    """Every select find_subject and why run on a large activity table is an index search (no table scan)."""
    store = open_store(f"sqlite:///{tmp_path / 'big.sqlite'}")
    n = 50_000
    store.record_activity(pd.DataFrame({
        "person_id": range(1, n + 1), "email": [f"p{i}@example.com" for i in range(n)], "action": "update",
        "field": "city", "dynamics_id": [f"0b6c2a5e-1d11-4c5e-9a43-{i:012d}" for i in range(n)],
        "dynamics_type": "contact", "detail": "Marketo changed -> Dynamics"}), "run-big")
    store.record_activity(pd.DataFrame([{"person_id": 42, "action": "collision", "field": "city", "winner": "dynamics",
                                         "detail": "x"}]), "run-c")
    statements = []

    def keep(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    sa.event.listen(store.engine, "before_cursor_execute", keep)
    try:
        find_subject(store, "P41@EXAMPLE.com")
        find_subject(store, "42")
        find_subject(store, "0b6c2a5e-1d11-4c5e-9a43-000000000041")
        why(CONFIG, store, Settings.from_env(), person_id=42, field="city")
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", keep)
    assert any("FROM activity" in s for s, _ in statements)
    with store.engine.connect() as c:
        for statement, parameters in statements:
            if "sqlite_master" in statement or "alembic_version" in statement:
                continue
            plan = " | ".join(r[-1] for r in c.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters))
            for table in ("activity", "links", "sync_errors", "deletions", "baselines"):
                assert not pd.Series(plan).str.contains(rf"\bSCAN {table}\b").any(), (statement, plan)
            if "FROM activity" in statement:
                assert "LIMIT" in statement.upper(), statement


def test_email_ranges_cover_every_case_of_the_first_letters():
    ranges = _email_ranges("Ann@x.com")
    assert len(ranges) == 8 and ("ann", "ano") in ranges and ("ANN", "ANO") in ranges
    for spelling in ("ann@x.com", "ANN@X.COM", "aNn@x.com"):
        assert any(lo <= spelling < hi for lo, hi in ranges)
    assert len(_email_ranges("1a@x.com")) == 2  # a digit has one case
    assert is_guid("{0B6C2A5E-1D11-4C5E-9A43-000000000001}") and not is_guid("12345")


# -- the pure rules on frames ------------------------------------------------------------------------------------

def _pair(**rows) -> PairValues:
    entity = CONFIG.entity("contact")
    values = PairValues(person_id=7, dynamics_type="contact", dynamics_id=ANN, email="ann@example.com",
                        marketo_updated_at=datetime(2026, 1, 1, 10, 0, tzinfo=timezone.utc),
                        dynamics_modified_on=datetime(2026, 1, 1, 9, 0, tzinfo=timezone.utc), dynamics_in_filter=True)
    for f in entity.fields:
        m, d, b = rows.get(f.name, ("x", "x", "x"))
        values.rows.append(FieldRow(field=f.name, marketo_name=f.marketo, dynamics_name=f.dynamics,
                                    direction=f.direction.value, marketo=m, dynamics=d, baseline=b, differs=m != d))
    return values


def _facts(values: PairValues, *, watermark_at: datetime, committed_at: datetime, **kw) -> Facts:
    wm = {"high_water": watermark_at, "updated_at": committed_at, "run_id": "run-9"}
    return Facts(subject=Subject(person_id=7, dynamics_type="contact", dynamics_id=ANN, email="ann@example.com"),
                 entity=CONFIG.entity("contact"), link={"person_id": 7, "method": "email", "linked_at": None},
                 values=values, watermarks={("marketo", "persons"): wm, ("dynamics", "contact"): wm}, **kw)


def test_a_change_after_the_watermark_is_not_yet_reached_and_a_silent_dag_is_named():
    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    values = _pair(city=("Madrid", "Berlin", "Berlin"))
    reasons = explain(CONFIG, _facts(values, watermark_at=now - timedelta(hours=3), committed_at=now - timedelta(hours=3),
                                     now=now))
    reason, = reasons
    assert reason.code == "not_yet_reached" and "Marketo updatedAt 2026-01-01 10:00:00 UTC" in reason.detail
    assert "no cycle has committed for 180 minutes" in reason.detail and reason.run_id == "run-9"


def test_a_change_stamped_within_the_overlap_before_the_last_read_is_still_not_yet_reached():
    """Services stamp changes to the second: a change made just after a cycle read can carry a time a little
    before that read. The next cycle reads again from ``overlap`` before the watermark, so it will see it."""
    now = datetime(2026, 1, 1, 10, 0, 1, tzinfo=timezone.utc)
    values = _pair(city=("Madrid", "Berlin", "Berlin"))  # Marketo updatedAt 10:00:00, Dynamics 09:00:00
    watermark = datetime(2026, 1, 1, 10, 0, 0, 400000, tzinfo=timezone.utc)
    reason, = explain(CONFIG, _facts(values, watermark_at=watermark, committed_at=now, now=now,
                                     overlap=timedelta(seconds=2)))
    assert reason.code == "not_yet_reached" and "within the 2 s before the last cycle's read" in reason.detail
    assert "Dynamics" not in reason.detail  # the Dynamics change is older than the overlap: already read
    reason, = explain(CONFIG, _facts(values, watermark_at=watermark, committed_at=now, now=now))  # no overlap
    assert reason.code == "unexplained"
    # a decision about the pair recorded a second or more after the change's stamp: that cycle had read it
    from mdsync.state import schema

    decided = pd.DataFrame([{"at": values.marketo_updated_at + timedelta(seconds=1), "run_id": "run-9", "action": "write", "field": "job_title",
                             "person_id": 7, "dynamics_type": "contact", "dynamics_id": ANN, "entity_type": "contact",
                             "detail": "written to Dynamics"}], columns=[c.name for c in schema.activity.columns])
    reason, = explain(CONFIG, _facts(values, watermark_at=watermark, committed_at=now, now=now,
                                     overlap=timedelta(seconds=2), history=decided))
    assert reason.code != "not_yet_reached"
    # one recorded within the stamp's second (the previous cycle, committing just before the change) proves nothing
    reason, = explain(CONFIG, _facts(values, watermark_at=watermark, committed_at=now, now=now,
                                     overlap=timedelta(seconds=2), history=decided.assign(at=watermark)))
    assert reason.code == "not_yet_reached"


def test_a_difference_nothing_explains_is_said_plainly():
    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    values = _pair(city=("Madrid", "Berlin", "Berlin"))
    reason, = explain(CONFIG, _facts(values, watermark_at=now, committed_at=now, now=now))
    assert reason.code == "unexplained" and "Marketo 'Madrid' vs Dynamics 'Berlin'" in reason.detail
    assert "person_ids=[7]" in reason.action


def test_field_rows_compare_as_the_diff_does():
    from mdsync.explain import _pair_rows

    entity = CONFIG.entity("contact")
    baselines = pd.DataFrame({"field": ["email"], "value": ["ann@example.com"], "synced_at": [None], "run_id": ["r1"]})
    rows = {r.field: r for r in _pair_rows(entity, {"email": " Ann@Example.com", "city": "Berlin", "job_title": None},
                                           {"email": "ann@example.com", "city": "Porto", "job_title": None}, {},
                                           baselines, True, True)}
    assert not rows["email"].differs and rows["email"].baseline == "ann@example.com" and rows["email"].baseline_run_id == "r1"
    assert rows["city"].differs and not rows["job_title"].differs  # null = null
    one_side = {r.field: r for r in _pair_rows(entity, {"city": "Berlin"}, {}, {}, baselines, True, False)}
    assert not one_side["city"].differs  # nothing to compare with: no record on the other side


def test_a_held_run_is_only_claimed_when_something_waits():
    from mdsync.explain import HeldRun

    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    held = [HeldRun(run_id="held-1", outcome="timed_out", at=now)]
    assert explain(CONFIG, _facts(_pair(), watermark_at=now, committed_at=now, now=now, held_runs=held)) == []
    waiting = _pair(city=("Madrid", "Berlin", "Berlin"))
    codes = [r.code for r in explain(CONFIG, _facts(waiting, watermark_at=now - timedelta(hours=3),
                                                    committed_at=now - timedelta(minutes=5), now=now, held_runs=held))]
    assert codes == ["mass_change_held", "not_yet_reached"]


@pytest.mark.unit
def test_field_access_is_read_from_the_staging_area_where_the_cycle_keeps_it_object_storage_too(tmp_path):
    """The console hands why() the staging root as the tasks see it (an ObjectStoragePath): with object-storage
    staging the last schema refresh is read from there, not described again; an unreadable one is "none"."""
    import json
    from dataclasses import replace

    from airflow.sdk import ObjectStoragePath

    from mdsync.access import EntityAccess, FieldAccess
    from mdsync.explain import field_access

    # object storage as the settings name it; the root handed in (a local ObjectStoragePath here, where a
    # deployment's is s3://...) is where the cache is read, not a folder derived from the URL
    settings = replace(Settings.from_env(), staging_url="s3://mdsync_staging@bucket/staging")
    root = ObjectStoragePath(f"file://{tmp_path / 'staging'}")
    root.mkdir(parents=True)
    refreshed = datetime.now(timezone.utc).isoformat()
    access = FieldAccess(entities={"contact": EntityAccess(["email"], ["email"], ["emailaddress1"], ["emailaddress1"],
                                                           ["emailaddress1"])},
                         dynamics_metadata={}, marketo_describe=[], refreshed_at=refreshed)
    (root / "field-access-0123456789ab.json").write_text(json.dumps(access.to_json()))

    found, source = field_access(CONFIG, settings, staging_root=root)

    assert source == f"cache {refreshed}" and found.entities["contact"].marketo_read == ["email"]
    (root / "field-access-0123456789ab.json").write_text("{not json")
    assert field_access(CONFIG, settings, staging_root=root) == (None, "none")  # no clients to describe with
    assert field_access(CONFIG, settings) == (None, "none")  # object storage without its root: not guessed

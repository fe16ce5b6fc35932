"""The console's collisions table (API, CSV and page), built from real cycles against both sandboxes: the
same field changed on both sides between two runs. Filters, paging, the CSV of every matching row, auth; and, on
a store of its own, 1,000 collision lines paged and the query answered from ``ix_activity_action_id``."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest


pytestmark = pytest.mark.integration

#: the UTC day the cycles ran (the stored times are UTC)
TODAY = datetime.now(timezone.utc).date()
#: a baseline with both quotes and a backslash: shown with escapes in the line's detail
QUOTED_TITLE = 'Head of "Ops" O\'Neil \\ Co'


@pytest.fixture(scope="module")
def world(console_module_world):
    return console_module_world


@pytest.fixture(scope="module")
def collided(world, console):
    """Three linked pairs, then two runs with collisions: ``collide-2`` (a lead's job title, Marketo wins; a
    contact's city, Dynamics wins) and ``collide-3`` (two contact job titles, Dynamics wins)."""
    lead_id, = world.dataverse_sandbox.seed("leads", [
        {"emailaddress1": "lena@collide.example.com", "firstname": "Lena", "lastname": "Lead", "jobtitle": "Engineer",
         "companyname": "Acme", "leadsourcecode": 8}])
    ann_id, bob_id = world.dataverse_sandbox.seed("contacts", [
        {"emailaddress1": "ann@collide.example.com", "firstname": "Ann", "lastname": "Lee", "jobtitle": "Engineer",
         "address1_city": "Berlin"},
        {"emailaddress1": "bob@collide.example.com", "firstname": "Bob", "lastname": "Burns", "jobtitle": QUOTED_TITLE}])
    lena, ann, bob = world.marketo_sandbox.seed_leads([
        {"email": "lena@collide.example.com", "firstName": "Lena", "lastName": "Lead", "title": "Engineer",
         "company": "Acme"},
        {"email": "ann@collide.example.com", "firstName": "Ann", "lastName": "Lee", "title": "Engineer",
         "city": "Berlin"},
        {"email": "bob@collide.example.com", "firstName": "Bob", "lastName": "Burns", "title": QUOTED_TITLE}])
    first = world.run("collide-1")
    assert first["new_links"] == 3, first
    world.set_person(lena, title="VP Marketing")
    world.set_row("leads", lead_id, jobtitle="Head of Sales")
    world.set_person(ann, city="Lisbon")
    world.set_row("contacts", ann_id, address1_city="Porto")
    second = world.run("collide-2")
    world.set_person(bob, title="Chief Ops")
    world.set_row("contacts", bob_id, jobtitle="COO")
    world.set_person(ann, title="Architect")
    world.set_row("contacts", ann_id, jobtitle="Staff Engineer")
    third = world.run("collide-3")
    collisions = world.store().activity()
    collisions = collisions[collisions["action"] == "collision"]
    assert sorted(collisions["run_id"]) == ["collide-2", "collide-2", "collide-3", "collide-3"], (second, third)
    return {"lead": lead_id, "ann": ann_id, "bob": bob_id, "lena_pid": lena, "ann_pid": ann, "bob_pid": bob}


def _api(console, user="admin", **params):
    r = console.get("/mdsync/api/collisions", user=user, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _by(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def test_rows_hold_both_values_the_last_synced_value_the_winner_and_the_run(console, collided):
    data = _api(console)
    assert (data["total"], data["page"], data["page_size"]) == (4, 1, 50)
    rows = data["rows"]
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)  # newest first
    lena = _by(rows, person_id=collided["lena_pid"])
    assert lena["entity"] == "lead" and lena["field"] == "job_title" and lena["email"] == "lena@collide.example.com"
    assert (lena["marketo_value"], lena["dynamics_value"], lena["baseline"]) == ("VP Marketing", "Head of Sales",
                                                                                  "Engineer")
    assert lena["winner"] == "marketo" and lena["run_id"] == "collide-2"
    assert (lena["dynamics_type"], lena["dynamics_id"].lower()) == ("lead", collided["lead"].lower())
    city = _by(rows, person_id=collided["ann_pid"], field="city")
    assert (city["marketo_value"], city["dynamics_value"], city["baseline"], city["winner"]) == (
        "Lisbon", "Porto", "Berlin", "dynamics")
    bob = _by(rows, person_id=collided["bob_pid"])
    assert (bob["marketo_value"], bob["dynamics_value"], bob["winner"]) == ("Chief Ops", "COO", "dynamics")
    assert bob["baseline"] == QUOTED_TITLE  # read back exactly, quotes and backslash included
    assert pd.Timestamp(bob["at"]).tzinfo is not None and bob["reason"]


@pytest.mark.parametrize("params, expected", [
    ({"entity": "lead"}, {"lena"}),
    ({"entity": "contact", "field": "job_title"}, {"ann", "bob"}),
    ({"field": "city"}, {"ann"}),
    ({"winner": "marketo"}, {"lena"}),
    ({"winner": "Dynamics"}, {"ann", "bob"}),
    ({"run": "collide-3"}, {"ann", "bob"}),
    ({"q": "ANN@collide"}, {"ann"}),
    ({"q": "nobody@collide"}, set()),
    ({"since": TODAY.isoformat(), "until": TODAY.isoformat()}, {"lena", "ann", "bob"}),
    ({"until": (TODAY - timedelta(days=1)).isoformat()}, set()),
    ({"since": (TODAY + timedelta(days=2)).isoformat()}, set()),
    ({"entity": "", "field": "", "winner": "", "run": "", "since": "", "q": ""}, {"lena", "ann", "bob"}),  # a form
])
def test_each_filter(console, collided, params, expected):
    data = _api(console, **params)
    names = {collided[f"{n}_pid"]: n for n in ("lena", "ann", "bob")}
    assert {names[r["person_id"]] for r in data["rows"]} == expected
    assert data["total"] == len(data["rows"])


def test_person_filter_takes_the_person_id_or_the_dynamics_id(console, collided):
    by_person = _api(console, q=str(collided["ann_pid"]))
    by_record = _api(console, q=collided["ann"])
    assert by_person["total"] == by_record["total"] == 2
    assert {r["field"] for r in by_person["rows"]} == {"city", "job_title"}


@pytest.mark.parametrize("params, says", [
    ({"winner": "both"}, "winner='both' is not a side"), ({"since": "yesterday"}, "since='yesterday' is not a date"),
    ({"since": "2030-01-02", "until": "2030-01-01"}, "is after until"), ({"page_size": 501}, None), ({"page": 0}, None),
])
def test_bad_filters_and_paging_are_422(console, collided, params, says):
    r = console.get("/mdsync/api/collisions", params=params)
    assert r.status_code == 422, r.text
    if says:
        assert says in r.json()["detail"]


def test_paging_page_two_and_page_size(console, collided):
    everything = [r["id"] for r in _api(console, page_size=500)["rows"]]
    first, second = _api(console, page_size=3), _api(console, page_size=3, page=2)
    assert (first["total"], second["total"], second["page"], second["page_size"]) == (4, 4, 2, 3)
    assert [r["id"] for r in first["rows"] + second["rows"]] == everything
    assert _api(console, page_size=3, page=3)["rows"] == []


def _csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_csv_has_a_header_and_every_matching_row(console, collided):
    from mdsync_airflow.console.collisions import CSV_COLUMNS

    r = console.get("/mdsync/api/collisions.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    header, *rows = _csv_rows(r.text)
    assert header == CSV_COLUMNS and len(rows) == 4
    bob = next(dict(zip(header, row)) for row in rows if row[header.index("person_id")] == str(collided["bob_pid"]))
    assert (bob["baseline"], bob["dynamics_value"], bob["winner"]) == (QUOTED_TITLE, "COO", "dynamics")
    filtered = _csv_rows(console.get("/mdsync/api/collisions.csv", params={"run": "collide-2"}).text)
    assert filtered[0] == CSV_COLUMNS and len(filtered) == 3
    assert {row[header.index("field")] for row in filtered[1:]} == {"job_title", "city"}


def test_csv_chunks_walk_every_row_once(console, collided):
    """Chunks of one row (keyset by id): the same rows as one page, in the same order, each once."""
    from mdsync_airflow.console import collisions

    pieces = list(collisions.csv_rows(collisions.CollisionFilters(), chunk=1))
    assert len(pieces) == 1 + 4  # the header, then one piece per chunk (the last one short: empty, not sent)
    ids = [int(row[0]) for piece in pieces[1:] for row in _csv_rows(piece)]
    assert ids == [r["id"] for r in _api(console)["rows"]]


def test_page_shows_the_table_with_links_to_the_person_and_the_run(console, collided):
    r = console.get("/mdsync/collisions", user="viewer")
    assert r.status_code == 200
    html = r.text
    assert 'aria-current="page"' in html and "4 collisions" in html
    assert f'href="/mdsync/person?q={collided["lena_pid"]}"' in html
    assert 'href="/dags/marketo_dynamics_sync/runs/collide-2"' in html
    assert "VP Marketing" in html and "Head of Sales" in html and "Engineer" in html
    assert "Head of &#34;Ops&#34; O&#39;Neil" in html  # escaped, never raw HTML
    assert 'href="/mdsync/api/collisions.csv"' in html
    lead_only = console.get("/mdsync/collisions", params={"entity": "lead"}).text
    assert "1 collision matching" in lead_only and "Lisbon" not in lead_only
    assert 'href="/mdsync/api/collisions.csv?entity=lead"' in lead_only
    paged = console.get("/mdsync/collisions", params={"page_size": 3}).text
    assert "page 1 of 2" in paged and 'href="/mdsync/collisions?page=2&amp;page_size=3"' in paged


@pytest.mark.parametrize("path", ["/mdsync/api/collisions", "/mdsync/api/collisions.csv", "/mdsync/collisions"])
def test_no_token_is_401_a_bad_token_403_and_neither_shows_data(console, collided, path):
    none = console.get(path, user=None)
    bad = console.client.get(path, headers={"Authorization": "Bearer not.a.jwt"})
    assert (none.status_code, bad.status_code) == (401, 403)
    for r in (none, bad):
        assert "VP Marketing" not in r.text and "collide" not in r.text


# -- a store of its own: 1,000 collision lines -------------------------------------------------------------

@pytest.fixture
def thousand(tmp_path, monkeypatch):
    """1,000 collision lines (recorded as the plan stage records them) between other lines, in a fresh store."""
    from mdsync.activity import collision_activity
    from mdsync.state import open_store

    url = f"sqlite:///{tmp_path / 'thousand.sqlite'}"
    monkeypatch.setenv("MDSYNC_STATE_URL", url)
    store = open_store(url)
    n = 1000
    frame = pd.DataFrame({
        "person_id": range(1, n + 1), "dynamics_id": [f"c{i:04d}" for i in range(1, n + 1)],
        "field": ["city" if i % 2 else "job_title" for i in range(n)],
        "marketo_value": [f"m{i}" for i in range(n)], "dynamics_value": [f"d{i}" for i in range(n)],
        "baseline": [None, "(empty)", "it's", 'say "hi"', "back\\slash", "two\nlines"] * 166 + [None] * 4,
        "winner": ["marketo" if i % 3 else "dynamics" for i in range(n)], "reason": "policy",
    })
    for start in range(0, n, 250):  # several runs, with other lines in between
        store.record_activity(collision_activity("contact", frame.iloc[start:start + 250]), f"bulk-{start}")
        store.record_activity(pd.DataFrame({"action": ["update"] * 50, "person_id": range(50)}), f"bulk-{start}")
    return store, frame


def test_a_thousand_collisions_page_newest_first(thousand):
    from mdsync_airflow.console import collisions

    _, frame = thousand
    f = collisions.CollisionFilters()
    pages = [collisions.page(f, p, 100) for p in range(1, 11)]
    assert {p["total"] for p in pages} == {1000}
    people = [r["person_id"] for p in pages for r in p["rows"]]
    assert people == list(range(1000, 0, -1))  # the newest line first, every one once
    assert collisions.page(f, 11, 100)["rows"] == []
    row = pages[0]["rows"][0]  # person 1000: frame row 999
    assert (row["marketo_value"], row["dynamics_value"]) == ("m999", "d999")
    baselines = {r["person_id"]: r["baseline"] for p in pages for r in p["rows"]}
    assert [baselines[i] for i in range(1, 7)] == [None, "(empty)", "it's", 'say "hi"', "back\\slash", "two\nlines"]
    assert collisions.page(collisions.CollisionFilters(field="city", winner="dynamics"), 1, 500)["total"] == len(
        frame[(frame["field"] == "city") & (frame["winner"] == "dynamics")])
    assert sum(1 for piece in collisions.csv_rows(f, chunk=300) for _ in _csv_rows(piece)) == 1 + 1000


def test_the_collision_queries_use_the_action_id_index(thousand):
    from mdsync_airflow.console import collisions

    store, _ = thousand

    def plan(query) -> str:
        sql = str(query.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True}))
        with store.engine.connect() as c:
            return " ".join(str(row[-1]) for row in c.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))

    f = collisions.CollisionFilters()
    for query in (collisions.select_rows(f, limit=50, offset=100), collisions.select_count(f),
                  collisions.select_rows(f, limit=5000, before_id=600),
                  collisions.select_rows(collisions.CollisionFilters(field="city", winner="marketo"), limit=50)):
        text = plan(query)
        assert "ix_activity_action_id" in text, text
        assert "TEMP B-TREE" not in text, text  # no sort: the index gives the order

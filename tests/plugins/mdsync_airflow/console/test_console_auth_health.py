"""The console's health API and page, and its auth: no token 401, a bad token 403, the page never shows data
without a login; counts come from runs recorded by the report."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def recorded(console):
    """Two runs' reports in the state store (as the report task records them)."""
    from mdsync.cycle import run_counts
    from mdsync_airflow.console import sources

    store = sources.store()
    for i, (created, collisions, calls) in enumerate([(3, 1, 7), (0, 2, 5)]):
        summary = {"created_in": {"dynamics": created, "marketo": 1}, "written": {"dynamics": 4, "marketo": 2},
                   "new_links": created + 1, "errors": {"dynamics": 1, "marketo": 0},
                   "entities": {"lead": {"collisions": collisions, "held_back": 0, "extracted_dynamics": 9}},
                   "api_calls": {"marketo": calls, "dynamics": 2 * calls}, "extracted_marketo_persons": 11,
                   "mass_change": {"outcome": "under_threshold"}}
        store.record_run(f"manual__health-{i}", run_counts(summary), summary=summary, run_type="manual")
    return store


@pytest.mark.parametrize("path", ["/mdsync/api/health", "/mdsync/", "/mdsync/api/openapi.json"])
def test_no_token_is_401_and_shows_no_data(console, recorded, path):
    r = console.get(path, user=None)
    if path.endswith("openapi.json"):  # the API's description holds no data; it stays readable for tooling
        assert r.status_code == 200
        return
    assert r.status_code == 401
    assert "manual__health-0" not in r.text
    assert "calls" not in r.text.lower() or "Log in" in r.text


def test_bad_token_is_403(console, recorded):
    for path in ("/mdsync/api/health", "/mdsync/"):
        r = console.client.get(path, headers={"Authorization": "Bearer not.a.jwt"})
        assert r.status_code == 403, (path, r.status_code)
        assert "manual__health" not in r.text


def test_health_api_counts_come_from_recorded_runs(console, recorded):
    data = console.get("/mdsync/api/health").json()
    assert data["calls_today"]["marketo"]["sync_used"] == 12
    assert data["calls_today"]["dynamics"]["used"] == 24
    assert data["calls_today"]["marketo"]["quota"] == 50000
    day = {p["run_id"]: p for p in data["series"]["day"]}
    assert day["manual__health-0"]["records"] == 4 + 2 + 3 + 1
    assert day["manual__health-1"]["calls_dynamics"] == 10
    assert sum(p["calls_marketo"] for p in data["series"]["week"]) == 12
    assert data["waiting"]["open_errors"] == 0 and data["waiting"]["quota_pause"] is None
    assert data["waiting"]["lease"]["describe"].startswith("free")


def test_health_page_renders_for_a_viewer(console, recorded):
    r = console.get("/mdsync/", user="viewer", cookies=None)
    assert r.status_code == 200
    assert "API calls today" in r.text and "<svg" in r.text and "Records synced per run" in r.text
    assert "https://" not in r.text.replace("http://www.w3.org", "")  # no CDN: everything is served locally


def test_a_cookie_login_works_like_the_ui(console, recorded):
    console.client.cookies.set("_token", console.token("viewer"))
    try:
        assert console.client.get("/mdsync/api/health").status_code == 200
    finally:
        console.client.cookies.clear()

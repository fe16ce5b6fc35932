"""The console's runs pages and API from real cycles against both sandboxes: a run's counts and decisions, a dry
run's planned writes (``previews``), and the undo flow (a preview first, then the undo, refused before it)."""

from __future__ import annotations

from urllib.parse import quote

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cycles(console_world):
    """run-1 links, run-2 writes both ways, then a dry run previews the undo of run-2 (into the state store the
    console reads)."""
    w = console_world
    ids = w.seed_people()
    w.cycle("run-1").run_all()
    w.update_person(ids["lena_pid"], title="VP Marketing")
    w.update_record("contacts", ids["ann"], telephone1="+1 555 0101")
    w.cycle("run-2").run_all()
    w.cycle("preview-undo-2", undo_run="run-2", dry_run=True).run_all()
    return ids


def test_a_run_shows_its_counts_and_decisions(console, cycles):
    run = console.get("/mdsync/api/runs/run-2").json()
    assert run["reported"] and not run["dry_run"]
    assert run["counts"]["written_dynamics"] >= 1 and run["counts"]["written_marketo"] >= 1
    assert run["summary"]["written"] == {"dynamics": run["counts"]["written_dynamics"],
                                         "marketo": run["counts"]["written_marketo"]}
    assert [p["run_id"] for p in run["undo_previews"]] == ["preview-undo-2"]
    decisions = console.get("/mdsync/api/runs/run-2/decisions", params={"action": "update"}).json()
    fields = {(r["field"], r["new_value"]) for r in decisions["rows"]}
    assert ("job_title", "VP Marketing") in fields and ("phone", "+1 555 0101") in fields
    assert decisions["total"] == len(decisions["rows"]) and decisions["by_action"]["update"] == decisions["total"]
    page2 = console.get("/mdsync/api/runs/run-2/decisions", params={"action": "update", "page": 2, "page_size": 1}).json()
    assert page2["page"] == 2 and len(page2["rows"]) == 1 and page2["rows"][0]["id"] == decisions["rows"][1]["id"]


def test_a_dry_run_shows_its_planned_writes(console, cycles):
    store_run = console.get("/mdsync/api/runs/preview-undo-2").json()
    assert store_run["dry_run"] and store_run["undo_of"] == "run-2"
    preview = console.get("/mdsync/api/runs/preview-undo-2/preview").json()
    planned = {(r["action"], r["field"], r["new_value"]) for r in preview["rows"]}
    assert any(a == "undo" and f == "job_title" for a, f, _ in planned), planned
    # nothing of the dry run is in the activity log
    assert console.get("/mdsync/api/runs/preview-undo-2/decisions").json()["total"] == 0
    page = console.get(f"/mdsync/runs/{quote('preview-undo-2')}")
    assert page.status_code == 200
    assert "Planned writes" in page.text and "Undo run run-2 now" in page.text and 'id="preview-table"' in page.text


def test_the_run_page_offers_a_preview_and_lists_it(console, cycles):
    page = console.get("/mdsync/runs/run-2")
    assert page.status_code == 200
    assert "Preview the undo" in page.text and "preview-undo-2" in page.text and "VP Marketing" in page.text


def test_undo_needs_trigger_permission_and_a_preview(console, cycles):
    viewer = {"Authorization": f"Bearer {console.token('viewer')}"}
    assert console.client.post("/mdsync/api/runs/run-2/undo", json={"dry_run": True}, headers=viewer).status_code == 403
    admin = {"Authorization": f"Bearer {console.token('admin')}"}
    refused = console.client.post("/mdsync/api/runs/run-1/undo", json={"dry_run": False}, headers=admin)
    assert refused.status_code == 409 and "preview the undo of run-1 first" in refused.json()["detail"]
    missing = console.client.post("/mdsync/api/runs/no-such-run/undo", json={"dry_run": True}, headers=admin)
    assert missing.status_code == 404
    bad = console.client.post("/mdsync/api/runs/run-2/undo", json={"dry_run": "yes"}, headers=admin)
    assert bad.status_code == 422


def test_runs_list_pages(console, cycles):
    assert console.get("/mdsync/api/runs").status_code == 200
    assert console.get("/mdsync/runs").status_code == 200
    assert console.get("/mdsync/api/runs/nope").status_code == 404

""""Why didn't this sync?" and the side-by-side read (issue 11), against both sandboxes over real HTTP.

Every situation is set up through the sandboxes' APIs and real cycles (``sync_world``: a fresh pair of sandboxes,
state store and staging area per test); then :func:`mdsync.explain.why` must name the reason with its specifics
(record id, field, value, run).
"""

from __future__ import annotations

import json

import pytest

from mdsync.config import load_config
from mdsync.explain import find_subject, side_by_side, why
from mdsync.settings import Settings

pytestmark = pytest.mark.integration


def _why(world, **kw):
    return why(load_config(), world.store(), Settings.from_env(), marketo_client=world.marketo(),
               dynamics_client=world.dynamics(), **kw)


def _only(explanation, code: str):
    found = [r for r in explanation.reasons if r.code == code]
    assert found, f"no {code!r} reason in {[(r.code, r.detail) for r in explanation.reasons]}"
    return found


def test_a_synced_pair_is_in_sync_and_side_by_side_shows_both_sides(sync_world):
    ids = sync_world.seed_people()
    sync_world.cycle("run-1").run_all()
    sync_world.cycle("run-2").run_all()  # the echo of run 1's writes
    config, store = load_config(), sync_world.store()
    pair = side_by_side(config, sync_world.marketo(), sync_world.dynamics(), store, person_id=ids["ann_pid"])
    assert (pair.dynamics_type, pair.dynamics_id) == ("contact", ids["ann"])
    assert pair.link is not None and pair.link.method == "email" and pair.link.out_of_filter_since is None
    city = next(r for r in pair.rows if r.field == "city")
    assert (city.marketo_name, city.dynamics_name, city.direction) == ("city", "address1_city", "both")
    assert city.marketo == city.dynamics == city.baseline == "Berlin" and not city.differs
    assert not pair.differing and not pair.marketo_missing and not pair.dynamics_missing
    assert pair.dynamics_in_filter is True
    json.dumps(pair.dump())  # JSON-ready for the console
    # the Dynamics side alone finds the same pair
    same = side_by_side(config, sync_world.marketo(), sync_world.dynamics(), store, dynamics_id=ids["ann"])
    assert same.person_id == ids["ann_pid"] and same.dynamics_type == "contact"

    answer = _why(sync_world, person_id=ids["ann_pid"])
    assert answer.status == "in_sync" and answer.reasons == [], [(r.code, r.detail) for r in answer.reasons]
    assert answer.last_run_id in ("run-1", "run-2") and answer.last_synced_at is not None
    assert "is in sync" in answer.summary and answer.last_run_id in answer.summary
    json.dumps(answer.dump())


def test_a_person_not_marked_for_sync_says_so(sync_world):
    sync_world.cycle("run-1").run_all()
    pid = sync_world.marketo_sandbox.seed_leads([{"email": "quiet@example.com", "firstName": "Quinn"}])[0]
    sync_world.cycle("run-2").run_all()
    pair = side_by_side(load_config(), sync_world.marketo(), sync_world.dynamics(), sync_world.store(), person_id=pid)
    assert pair.link is None and pair.dynamics_id is None and pair.marked_for_sync is False
    assert next(r for r in pair.rows if r.field == "first_name").marketo == "Quinn"
    assert all(r.dynamics is None for r in pair.rows)
    answer = _why(sync_world, email="QUIET@example.com")  # an email the state store never saw: looked up live
    reason, = _only(answer, "not_marked_for_sync")
    assert str(pid) in reason.detail and "syncToDynamics" in reason.action and f"person_ids=[{pid}]" in reason.action
    assert answer.status == "not_synced"

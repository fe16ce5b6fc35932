"""A manual run's person_ids that Marketo does not have are reported in the log and the run's report; the
others are synced as asked."""

from __future__ import annotations

import logging


def test_person_ids_that_do_not_exist_are_reported_and_the_others_synced(sync_world, caplog):
    sync_world.cycle("run-1").run_all()
    (real,) = sync_world.marketo_sandbox.seed_leads([{"email": "asked.for@example.com", "firstName": "Asked",
                                                      "lastName": "For"}])
    deleted = sync_world.marketo_sandbox.seed_leads([{"email": "gone@example.com", "lastName": "Gone"}])[0]
    sync_world.marketo().delete_leads([deleted])
    never = real + 1000
    with caplog.at_level(logging.INFO):
        report = sync_world.cycle("run-2", person_ids=[real, never, deleted], sync_as="contact").run_all()
    assert report["person_ids_not_found"] == [never, deleted]
    warning = [r.getMessage() for r in caplog.records if r.name == "mdsync.extract" and "person_ids" in r.getMessage()]
    assert len(warning) == 1
    assert f"2 of the 3 person_ids asked for do not exist in Marketo and are not synced: {never}, {deleted}" \
        in warning[0] and f"{deleted} deleted since the window start" in warning[0]
    assert f"person_ids not found in Marketo (not synced): {never}, {deleted}" in caplog.text  # the report's lines
    assert sync_world.record("contacts", "asked.for@example.com")["mdsync_marketopersonid"] == str(real)

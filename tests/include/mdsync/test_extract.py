"""Marketo extraction (DESIGN §4.2): which fields are read and which changes count, and how each kind of window is
read, with a small fake client (a plain class with the few methods extraction uses)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from mdsync import extract
from mdsync.config import load_config

CONFIG = load_config()
SINCE = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def test_marketo_fields_include_everything_read():
    fields = extract.marketo_fields(CONFIG)
    mapped = {f.marketo for e in CONFIG.entities.values() for f in e.fields}
    assert mapped <= set(fields)
    assert {"email", "updatedAt", "dynamicsRecordId", "dynamicsRecordType", "syncToDynamics", "dynamicsSyncAs"} <= set(fields)
    assert len(fields) == len(set(fields))  # each once, though both entity types map most of them
    assert set(fields) == mapped | {"email", "updatedAt", "dynamicsRecordId", "dynamicsRecordType", "syncToDynamics",
                                    "dynamicsSyncAs"}


def test_change_fields_exclude_the_link_fields():
    changes = extract.change_fields(CONFIG)
    assert "dynamicsRecordId" not in changes and "dynamicsRecordType" not in changes and "updatedAt" not in changes
    # the marker is work: marking a person for sync must be noticed
    assert {"syncToDynamics", "dynamicsSyncAs", "email", "firstName", "leadSource"} <= set(changes)
    assert set(changes) == set(extract.marketo_fields(CONFIG)) - {"dynamicsRecordId", "dynamicsRecordType", "updatedAt"}


# -- a fake Marketo client ------------------------------------------------------------------------------

class FakeMarketo:
    """Persons by id with ``createdAt``; lead changes; deleted leads. Records the calls made."""

    def __init__(self, persons: dict[int, datetime | None] = None, changes: list[tuple[int, str]] = (),
                 more_result: bool = False, deleted: list[int] = (), activities: list[tuple[int, int, str]] = (),
                 merges: list[tuple[int, int]] = ()):
        self.persons = persons or {}
        self.changes, self.more_result, self.deleted = list(changes), more_result, list(deleted)
        self.merges = list(merges)  # (winner, loser); each loser also deleted, as Marketo records it
        self.activities = list(activities)
        self.calls: list[tuple] = []

    def _frame(self, ids, fields) -> pd.DataFrame:
        rows = [{"id": i, "email": f"p{i}@x.com", "createdAt": self.persons[i]} for i in ids if i in self.persons]
        return pd.DataFrame(rows, columns=["id", "email", "createdAt"])

    def get_leads(self, filter_type, values, fields=None):
        values = list(values)
        self.calls.append(("get_leads", filter_type, values, list(fields or [])))
        return self._frame(values, fields)

    def get_paging_token(self, since):
        self.calls.append(("get_paging_token", since))
        return "token-1"

    def get_merges_and_deletions(self, token):
        self.calls.append(("get_merges_and_deletions", token))
        gone = self.deleted + [loser for _, loser in self.merges]
        return (pd.DataFrame({"lead_id": pd.array(gone, dtype="Int64")}),
                pd.DataFrame({"winner_id": [w for w, _ in self.merges], "loser_id": [lo for _, lo in self.merges]},
                             dtype="int64"), "token-2")

    def get_lead_changes(self, token, fields, max_pages=None):
        self.calls.append(("get_lead_changes", token, list(fields), max_pages))
        frame = pd.DataFrame({"lead_id": [c[0] for c in self.changes], "primary_attribute_value": [c[1] for c in self.changes],
                              "activity_type_id": 13})
        frame.attrs["more_result"] = self.more_result
        return frame, "token-3"

    def export_leads(self, fields, created_at=None, updated_at=None, poll_interval_s=5.0):
        self.calls.append(("export_leads", list(fields), created_at, updated_at))
        return self._frame(sorted(self.persons), fields)

    def export_activities(self, activity_type_ids, created_at, *, poll_interval_s=5.0):
        self.calls.append(("export_activities", list(activity_type_ids), created_at))
        return pd.DataFrame(self.activities, columns=["lead_id", "activity_type_id", "primary_attribute_value"])

    def describe_leads(self):
        self.calls.append(("describe_leads",))
        return pd.DataFrame({"rest_name": ["firstName", "dynamicsRecordId"], "display_name": ["First Name", "Dynamics Id"]})

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


# -- oldest_person_created ------------------------------------------------------------------------------

def test_oldest_person_created_from_the_lowest_ids():
    client = FakeMarketo({1: datetime(2019, 5, 1, tzinfo=timezone.utc), 7: datetime(2018, 2, 3, tzinfo=timezone.utc)})
    assert extract.oldest_person_created(client) == datetime(2018, 2, 2, tzinfo=timezone.utc)
    [(name, filter_type, ids, fields)] = client.calls
    assert (name, filter_type, ids, fields) == ("get_leads", "id", list(range(1, 301)), ["createdAt"])


def test_oldest_person_created_probes_higher_ids_when_the_first_are_gone():
    # a subscription numbering from 4,800: ids 1-300 are gone, the geometric probe finds the lowest region
    base = datetime(2021, 1, 1, tzinfo=timezone.utc)
    client = FakeMarketo({i: base + timedelta(hours=i - 4_800) for i in range(4_800, 20_000)})
    got = extract.oldest_person_created(client)
    lookups = [c[2] for c in client.calls]
    assert len(lookups) == 3 and all(len(ids) <= 300 for ids in lookups)  # 1-300, the probe, the ids below the hit
    lowest_hit = min(i for i in lookups[1] if i in client.persons)
    assert lookups[2] == list(range(lowest_hit - 299, lowest_hit))
    assert lowest_hit - 299 <= 4_800  # the probe is dense enough to reach the very first person here
    assert got == base - timedelta(days=1)


def test_oldest_person_created_of_an_empty_database_is_yesterday():
    client = FakeMarketo({})
    got = extract.oldest_person_created(client)
    assert abs(got - (datetime.now(timezone.utc) - timedelta(days=1))) < timedelta(minutes=5)
    assert len(client.calls) == 2


def test_oldest_person_created_without_dates_is_the_epoch():
    assert extract.oldest_person_created(FakeMarketo({1: None, 2: None})) == extract.MARKETO_EPOCH


# -- extract_marketo modes ------------------------------------------------------------------------------

def test_full_extract_reads_every_person_by_bulk_export():
    boot = datetime(2020, 1, 1, tzinfo=timezone.utc)
    client = FakeMarketo({1: boot, 2: boot, 3: boot}, deleted=[2])
    got = extract.extract_marketo(client, CONFIG, since=SINCE, full=True, bootstrap_since=boot)
    assert got.mode == "bulk_all" and got.complete
    assert "get_lead_changes" not in client.names() and "get_leads" not in client.names()
    [export] = [c for c in client.calls if c[0] == "export_leads"]
    assert export[1] == extract.marketo_fields(CONFIG)
    assert export[2][0] == boot and export[3] is None  # by createdAt from the oldest person
    assert sorted(got.persons["id"]) == [1, 3] and got.deleted == [2]


def test_few_changes_read_the_changed_persons_by_id():
    client = FakeMarketo({1: SINCE, 2: SINCE, 3: SINCE, 4: SINCE}, changes=[(1, "First Name"), (3, "Email"), (3, "x")],
                         deleted=[4])
    got = extract.extract_marketo(client, CONFIG, since=SINCE, extra_ids=[2, 4], max_change_pages=7)
    assert got.mode == "changes" and not got.complete
    assert got.changed == 2
    changes_call = next(c for c in client.calls if c[0] == "get_lead_changes")
    assert changes_call[2] == extract.change_fields(CONFIG) and changes_call[3] == 7
    [lookup] = [c for c in client.calls if c[0] == "get_leads"]
    assert lookup[1:3] == ("id", [1, 2, 3])  # changed + asked for, minus the deleted
    assert "export_leads" not in client.names() and "export_activities" not in client.names()
    assert sorted(got.persons["id"]) == [1, 2, 3] and got.deleted == [4]
    assert client.calls[0] == ("get_paging_token", SINCE)


def test_a_window_with_more_pages_is_read_by_bulk_activity_export():
    client = FakeMarketo({1: SINCE, 2: SINCE, 5: SINCE}, changes=[(1, "First Name")], more_result=True,
                         activities=[(1, 13, "First Name"), (2, 12, None), (5, 13, "Dynamics Id"), (5, 13, "Unmapped")])
    got = extract.extract_marketo(client, CONFIG, since=SINCE, max_change_pages=1)
    assert got.mode == "bulk_window"
    [bulk] = [c for c in client.calls if c[0] == "export_activities"]
    assert bulk[1] == [extract.NEW_LEAD, extract.CHANGE_DATA_VALUE] and bulk[2][0] == SINCE
    # New Lead and mapped-field changes count; the link field and unmapped fields do not
    assert sorted(got.persons["id"]) == [1, 2] and got.changed == 2


def test_a_busy_window_pages_on_when_the_daily_export_quota_is_used_up():
    from mdsync.errors import ServiceError

    class QuotaUsedUp(FakeMarketo):
        def export_activities(self, activity_type_ids, created_at, *, poll_interval_s=5.0):
            self.calls.append(("export_activities", list(activity_type_ids), created_at))
            raise ServiceError("marketo", "1029", "Export daily quota exceeded")

    client = QuotaUsedUp({1: SINCE, 2: SINCE}, changes=[(1, "First Name"), (2, "First Name")], more_result=True)
    got = extract.extract_marketo(client, CONFIG, since=SINCE, max_change_pages=1)
    pages = [c for c in client.calls if c[0] == "get_lead_changes"]
    assert len(pages) == 2 and pages[1][1] == "token-3" and pages[1][3] is None  # the rest, from where it stopped
    assert got.mode == "changes" and sorted(got.persons["id"]) == [1, 2]


def test_a_busy_window_reads_the_changed_persons_in_bulk():
    persons = {i: SINCE for i in range(1, 11)}
    client = FakeMarketo(persons, changes=[(i, "Email") for i in range(1, 11)])
    got = extract.extract_marketo(client, CONFIG, since=SINCE, bulk_read_over=5)
    exports = [c for c in client.calls if c[0] == "export_leads"]
    assert len(exports) == 1 and exports[0][2] is None and exports[0][3][0] == SINCE  # by updatedAt over the window
    assert "get_leads" not in client.names()
    assert sorted(got.persons["id"]) == list(range(1, 11))


@pytest.mark.parametrize("lookback", [0, 2])
def test_lookback_adds_one_bulk_export_by_updated_at(lookback):
    client = FakeMarketo({1: SINCE}, changes=[])
    extract.extract_marketo(client, CONFIG, since=SINCE, lookback_days=lookback)
    assert client.names().count("export_leads") == (1 if lookback else 0)

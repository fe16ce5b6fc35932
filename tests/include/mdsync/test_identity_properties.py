"""Properties of the identity stage over random small worlds (hypothesis), and a scale check.

- Decisions do not depend on the order of the rows the services returned.
- Deciding again with the decided links as the state store's (same frames) changes nothing: no new links,
  no creates for anyone already linked, the same link set.
- A first sync of a large database is decided without quadratic work.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdsync import identity
from mdsync.config import load_config

CONFIG = load_config()
EMAILS = ["ann@x.com", "ANN@x.com", "bob@x.com", "cy@x.com", "dee@x.com", None, ""]
PERSON_COLUMNS = ["id", "email", "dynamicsRecordId", "dynamicsRecordType", "syncToDynamics", "dynamicsSyncAs"]


def _record_ids(entity: str, n: int) -> list[str]:
    return [f"{entity[0].upper()}{i}" for i in range(1, n + 1)]


@st.composite
def worlds(draw, consistent: bool = False):
    """A small world. ``consistent``: link fields as the sync leaves them -- a linked pair's fields name each other or
    are blank; an unlinked record or person may name only unlinked ones (or hold stale or invalid values)."""
    n_persons = draw(st.integers(0, 7))
    pids = list(range(1, n_persons + 1))
    ids = {"lead": _record_ids("lead", draw(st.integers(0, 5))), "contact": _record_ids("contact", draw(st.integers(0, 5)))}
    all_records = [(e, i) for e, rs in ids.items() for i in rs]
    # links from the state store: a partial one-to-one matching of persons and records
    pairs = []
    if pids and all_records:
        chosen_p = draw(st.lists(st.sampled_from(pids), unique=True, max_size=min(len(pids), len(all_records))))
        chosen_r = draw(st.permutations(all_records))[: len(chosen_p)]
        pairs = list(zip(chosen_p, chosen_r))
    links = pd.DataFrame({"dynamics_type": [r[0] for _, r in pairs], "dynamics_id": [r[1] for _, r in pairs],
                          "method": "email"}, index=pd.Index([p for p, _ in pairs], dtype="int64", name="person_id"))
    # Marketo link fields: empty, right, or pointing anywhere (stale, unknown, another person's)
    linked_p = {p: r for p, r in pairs}
    linked_r = {r: p for p, r in pairs}
    free_records = [r for r in all_records if r not in linked_r] if consistent else all_records
    link_targets = [None] + free_records + [("lead", "L404"), ("account", "A1")]
    persons = []
    for pid in pids:
        target = draw(st.sampled_from([None, linked_p[pid]])) if consistent and pid in linked_p \
            else draw(st.sampled_from(link_targets))
        persons.append({"id": pid, "email": draw(st.sampled_from(EMAILS)),
                        "dynamicsRecordId": target[1] if target else None,
                        "dynamicsRecordType": target[0] if target else None,
                        "syncToDynamics": draw(st.sampled_from([None, True, False, "true"])),
                        "dynamicsSyncAs": draw(st.sampled_from([None, "", "lead", "contact", "garbage"]))})
    records = {}
    for entity, rs in ids.items():
        idc = CONFIG.entity(entity).id_column
        free_persons = [p for p in pids if p not in linked_p] if consistent else pids
        rows = [{idc: r, "emailaddress1": draw(st.sampled_from(EMAILS)),
                 "mdsync_marketopersonid": draw(st.sampled_from([None, str(linked_r[(entity, r)])]))
                 if consistent and (entity, r) in linked_r
                 else draw(st.sampled_from([None, "", "abc", "404", *map(str, free_persons)])),
                 "statecode": draw(st.sampled_from([0, 0, 0, 1]))} for r in rs]
        records[entity] = pd.DataFrame(rows, columns=[idc, "emailaddress1", "mdsync_marketopersonid", "statecode"])
    m_deleted = draw(st.lists(st.sampled_from(pids), unique=True, max_size=2)) if pids else []
    d_deleted = {e: draw(st.lists(st.sampled_from(rs), unique=True, max_size=1)) if rs else [] for e, rs in ids.items()}
    # the pairs deleted this window carry the link fields the sync wrote on both records
    for pid, (entity, rid) in pairs:
        if pid in m_deleted or rid in d_deleted[entity]:
            idc = CONFIG.entity(entity).id_column
            records[entity].loc[records[entity][idc] == rid, "mdsync_marketopersonid"] = str(pid)
            for p in persons:
                if p["id"] == pid:
                    p["dynamicsRecordId"], p["dynamicsRecordType"] = rid, entity
    # a deleted record is not read any more; a deleted person is not read either
    persons = [p for p in persons if p["id"] not in m_deleted]
    records = {e: r[~r[CONFIG.entity(e).id_column].isin(d_deleted[e])].reset_index(drop=True) for e, r in records.items()}
    push = draw(st.lists(st.sampled_from(pids), unique=True, max_size=2)) if pids else []
    return (links, pd.DataFrame(persons, columns=PERSON_COLUMNS).astype({"id": "int64"}), records,
            m_deleted, d_deleted, push)


def _decide(world, links=None, persons=None, records=None):
    store, people, recs, m_deleted, d_deleted, push = world
    return identity.decide(CONFIG, store if links is None else links, people if persons is None else persons,
                           recs if records is None else records, m_deleted, d_deleted, push_ids=push)


def _link_set(d) -> set:
    return {(int(p), t, str(i)) for p, t, i in zip(d.links.index, d.links["dynamics_type"], d.links["dynamics_id"])}


def _rows(frame: pd.DataFrame) -> set:
    return set(frame.astype(object).where(frame.notna(), None).itertuples(index=False, name=None))


def _activity(d) -> set:
    cols = ["action", "person_id", "dynamics_type", "dynamics_id"]
    return _rows(d.activity[cols])


PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(world=worlds(), seed=st.integers(0, 2**32 - 1))
def test_decisions_do_not_depend_on_row_order(world, seed):
    rng = np.random.default_rng(seed)
    _, persons, records, *_ = world
    first = _decide(world)
    shuffled = _decide(world, persons=persons.sample(frac=1, random_state=rng).reset_index(drop=True),
                       records={e: r.sample(frac=1, random_state=rng).reset_index(drop=True) for e, r in records.items()})
    assert _link_set(shuffled) == _link_set(first)
    assert _rows(shuffled.marketo_creates) == _rows(first.marketo_creates)
    assert _rows(shuffled.dynamics_creates) == _rows(first.dynamics_creates)
    assert shuffled.unlinked == first.unlinked
    assert _activity(shuffled) == _activity(first)


@PROPERTY
@given(world=worlds(consistent=True))
def test_deciding_again_with_its_own_links_changes_nothing(world):
    first = _decide(world)
    links = first.links.drop(columns="new")
    again = _decide(world, links=links)  # the same frames and deletions, the decided links as the store's
    assert _link_set(again) == _link_set(first)
    assert again.new_links.empty
    linked_persons = set(first.links.index)
    linked_records = {(t, str(i).lower()) for t, i in zip(first.links["dynamics_type"], first.links["dynamics_id"])}
    assert not set(again.dynamics_creates["person_id"]) & linked_persons
    assert not {(t, str(i).lower()) for t, i in zip(again.marketo_creates["entity_type"],
                                                    again.marketo_creates["dynamics_id"])} & linked_records
    # one-to-one both ways
    assert first.links.index.is_unique
    assert not first.links.assign(k=first.links["dynamics_type"] + ":" + first.links["dynamics_id"].str.lower()
                                  )["k"].duplicated().any()


@PROPERTY
@given(world=worlds())
def test_creates_never_name_a_linked_record_or_person(world):
    d = _decide(world)
    linked_records = {(t, str(i).lower()) for t, i in zip(d.links["dynamics_type"], d.links["dynamics_id"])}
    assert not {(t, str(i).lower()) for t, i in zip(d.marketo_creates["entity_type"], d.marketo_creates["dynamics_id"])} \
        & linked_records
    assert not set(d.dynamics_creates["person_id"]) & set(d.links.index)
    assert d.dynamics_creates["person_id"].is_unique
    assert not d.marketo_creates.duplicated(["entity_type", "dynamics_id"]).any()
    # every new link names a person and a record that were read (no link to something that does not exist)
    new = d.new_links
    assert set(new.index) <= set(world[1]["id"])
    for entity, rows in world[2].items():
        mine = new[new["dynamics_type"] == entity]["dynamics_id"].str.lower()
        assert set(mine) <= set(rows[CONFIG.entity(entity).id_column].str.lower())


# -- scale ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_first_sync_of_a_large_database_is_decided():
    """20k persons and 16k records, no links yet (a first sync), decided column-wise (the bench times 1M)."""
    n_persons, n_leads, n_contacts = 20_000, 10_000, 6_000
    rng = np.random.default_rng(7)
    pids = np.arange(1, n_persons + 1)
    persons = pd.DataFrame({"id": pids, "email": [f"p{i}@x.com" for i in pids],
                            "dynamicsRecordId": None, "dynamicsRecordType": None,
                            "syncToDynamics": rng.random(n_persons) < 0.1, "dynamicsSyncAs": None})
    # leads 1..10k share emails with persons 1..10k; contacts with persons 9,001..14,000 (1k overlap with leads)
    leads = pd.DataFrame({"leadid": [f"L{i}" for i in range(n_leads)],
                          "emailaddress1": [f"P{i + 1}@X.com" for i in range(n_leads)],
                          "mdsync_marketopersonid": None, "statecode": 0})
    contacts = pd.DataFrame({"contactid": [f"C{i}" for i in range(n_contacts)],
                             "emailaddress1": [f"p{9_001 + i}@x.com" for i in range(n_contacts - 1_000)]
                             + [f"new{i}@x.com" for i in range(1_000)],
                             "mdsync_marketopersonid": None, "statecode": 0})
    d = identity.decide(CONFIG, identity.empty_links(), persons, {"lead": leads, "contact": contacts})
    by_method = d.links["method"].value_counts().to_dict()
    # 9k leads alone on their email + 5k contacts (1k of them winning over a lead); 1k new contacts
    assert by_method == {"email": 14_000}
    assert (d.links["dynamics_type"] == "contact").sum() == 5_000
    assert len(d.marketo_creates) == 1_000
    assert (d.activity["action"] == "skip").sum() == 1_000  # the leads that lost to a contact
    # marked persons without any record: persons 14,001..20,000 marked for sync
    marked_free = persons[(persons["id"] > 14_000) & persons["syncToDynamics"]]
    assert set(d.dynamics_creates["person_id"]) == set(marked_free["id"])
    lookups = identity.plan_lookups(CONFIG, identity.empty_links(), persons, {"lead": leads, "contact": contacts})
    assert len(lookups.marketo_emails) == 15_000

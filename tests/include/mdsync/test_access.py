"""Field access from both sides' metadata (DESIGN §4.1): fields the sync user cannot read or update are dropped
and logged; missing link fields are a setup error."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import yaml

from mdsync.access import FieldAccess, refresh_access
from mdsync.config import DEFAULT_CONFIG_PATH, load_config, parse_config
from mdsync.errors import ConfigError

CONFIG = load_config()
LINK_AND_MARKER = ["dynamicsRecordId", "dynamicsRecordType", "syncToDynamics", "dynamicsSyncAs", "deletedInDynamics"]
BOOLEANS = ("unsubscribed", "syncToDynamics", "deletedInDynamics")
#: columns the sync reads besides the mapped ones: the shipped filter's, and the deleted flag (with their types)
LIFECYCLE_COLUMNS = {"statecode": "State", "mdsync_deletedinmarketo": "Boolean"}


def marketo_describe(*, without=(), read_only=()) -> pd.DataFrame:
    names = list(dict.fromkeys([f.marketo for e in CONFIG.entities.values() for f in e.fields] + LINK_AND_MARKER))
    rows = [{"rest_name": n, "display_name": n, "data_type": "boolean" if n in BOOLEANS else "string",
             "length": None if n in BOOLEANS else 255, "updateable": n not in read_only}
            for n in names if n not in without]
    return pd.DataFrame(rows)


def dynamics_metadata(*, without=(), unreadable=(), not_updatable=(), secured_missing=()) -> dict[str, dict]:
    out = {}
    for name, entity in CONFIG.entities.items():
        columns = [entity.id_column, CONFIG.dynamics.marketo_id_column] + [f.dynamics for f in entity.fields]
        columns = [c for c in dict.fromkeys(columns + list(LIFECYCLE_COLUMNS)) if c not in without]
        attrs = pd.DataFrame({"logical_name": columns,
                              "type": [LIFECYCLE_COLUMNS.get(c, "String") for c in columns],
                              "max_length": [100 if c == "emailaddress1" else (50 if c == "firstname" else None)
                                             for c in columns]})
        perms = pd.DataFrame({"logical_name": [c for c in columns if c not in secured_missing]})
        perms["can_read"] = ~perms["logical_name"].isin(unreadable)
        perms["can_update"] = ~perms["logical_name"].isin(not_updatable)
        perms["can_create"] = perms["can_update"]
        out[name] = {"entity_set": entity.entity_set, "logical_name": name, "attributes": attrs, "permissions": perms}
    return out


def test_everything_accessible_drops_nothing():
    acc = refresh_access(CONFIG, marketo_describe(), dynamics_metadata())
    for name, entity in CONFIG.entities.items():
        e = acc.entities[name]
        names = [f.name for f in entity.fields]
        assert e.marketo_read == names and e.dynamics_read == names and e.dynamics_write == names
        assert e.dynamics_create == names and e.dropped == []
        assert e.marketo_write == names
        assert e.dynamics_max_length == {"email": 100, "first_name": 50}
        assert e.marketo_max_length["first_name"] == 255 and "email_opt_out" not in e.marketo_max_length


def test_a_column_the_sync_user_cannot_read_is_dropped_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="mdsync.access"):
        acc = refresh_access(CONFIG, marketo_describe(), dynamics_metadata(unreadable=["jobtitle"]))
    for name in CONFIG.entities:
        e = acc.entities[name]
        assert "job_title" not in e.dynamics_read
        assert {"field": "job_title", "side": "dynamics",
                "reason": "the sync user cannot read Dataverse column 'jobtitle' (field-level security)"} in e.dropped
    assert sum("job_title dropped on the dynamics side" in r.getMessage() for r in caplog.records) == len(CONFIG.entities)


def test_a_column_the_sync_user_cannot_update_is_dropped_for_writes():
    acc = refresh_access(CONFIG, marketo_describe(), dynamics_metadata(not_updatable=["telephone1"]))
    e = acc.entities["contact"]
    assert "phone" in e.dynamics_read and "phone" not in e.dynamics_write and "phone" not in e.dynamics_create
    assert [d["reason"] for d in e.dropped] == ["the sync user cannot update Dataverse column 'telephone1'"]


def test_a_secured_column_without_permissions_is_neither_read_nor_written():
    acc = refresh_access(CONFIG, marketo_describe(), dynamics_metadata(secured_missing=["address1_city"]))
    e = acc.entities["lead"]
    assert "city" not in e.dynamics_read and "city" not in e.dynamics_write
    assert {d["field"] for d in e.dropped} == {"city"} and len(e.dropped) == 2


def test_a_mapped_field_or_column_that_does_not_exist_is_a_config_error_naming_entry_and_closest_name():
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    lead = raw["entities"]["lead"]["fields"]
    contact = raw["entities"]["contact"]["fields"]
    i_title = next(i for i, f in enumerate(lead) if f["name"] == "job_title")
    i_city = next(i for i, f in enumerate(contact) if f["name"] == "city")
    lead[i_title]["marketo"] = "titel"
    contact[i_city]["dynamics"] = "adress1_city"
    with pytest.raises(ConfigError) as info:
        refresh_access(parse_config(raw), marketo_describe(), dynamics_metadata(), source="sync.yaml")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("sync.yaml names fields that do not exist")
    assert [line.strip() for line in lines[1:]] == [
        f"entities.lead.fields[{i_title}].marketo (job_title): Marketo's lead schema has no field 'titel' "
        "(did you mean 'title'?)",
        f"entities.contact.fields[{i_city}].dynamics (city): Dataverse table 'contact' has no column 'adress1_city' "
        "(did you mean 'address1_city'?)",
    ]


def test_every_missing_name_is_reported_at_once_and_nothing_close_means_no_guess():
    with pytest.raises(ConfigError) as info:
        refresh_access(CONFIG, marketo_describe(without=["website"]), dynamics_metadata(without=["mobilephone"]))
    problems = [line.strip() for line in str(info.value).splitlines()[1:]]
    assert len(problems) == 3  # website on leads; mobilephone on both tables
    assert any(p.startswith("entities.lead.fields[") and ".marketo (website): Marketo's lead schema has no field "
               "'website'" in p for p in problems)
    assert sum(p.endswith("has no column 'mobilephone'") for p in problems) == 2  # no guess when nothing is close


def test_a_read_only_marketo_field_is_dropped_only_where_it_flows_to_marketo():
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    for entity in raw["entities"].values():  # email opt-out as a plain one-way field (no consent rule)
        field = next(f for f in entity["fields"] if f["name"] == "email_opt_out")
        field.pop("rule")
        field["direction"] = "to_dynamics"
    acc = refresh_access(parse_config(raw), marketo_describe(read_only=["title", "unsubscribed"]), dynamics_metadata())
    lead = acc.entities["lead"]
    assert "job_title" in lead.marketo_read and "job_title" not in lead.marketo_write
    # email_opt_out flows to Dynamics only: a read-only Marketo field is fine
    assert [d["field"] for d in lead.dropped] == ["job_title"]
    assert "email_opt_out" in lead.marketo_read
    # shipped, the consent flag syncs both ways: read-only in Marketo, it is read but not written there
    lead = refresh_access(CONFIG, marketo_describe(read_only=["unsubscribed"]), dynamics_metadata()).entities["lead"]
    assert "email_opt_out" in lead.marketo_read and "email_opt_out" not in lead.marketo_write


@pytest.mark.parametrize("missing", LINK_AND_MARKER)
def test_missing_marketo_link_or_marker_fields_are_a_config_error(missing):
    with pytest.raises(ConfigError, match=repr(missing)):
        refresh_access(CONFIG, marketo_describe(without=[missing]), dynamics_metadata())


def test_missing_dataverse_link_column_is_a_config_error():
    with pytest.raises(ConfigError, match="mdsync_marketopersonid"):
        refresh_access(CONFIG, marketo_describe(), dynamics_metadata(without=["mdsync_marketopersonid"]))


def test_link_fields_are_matched_case_insensitively():
    describe = marketo_describe()
    describe["rest_name"] = describe["rest_name"].str.upper()
    acc = refresh_access(CONFIG, describe, dynamics_metadata())
    assert acc.entities["lead"].dropped == []


def test_field_access_round_trips_through_json():
    acc = refresh_access(CONFIG, marketo_describe(), dynamics_metadata(unreadable=["jobtitle"]))
    acc.refreshed_at = "2026-01-01T00:00:00+00:00"
    import json

    back = FieldAccess.from_json(json.loads(json.dumps(acc.to_json())))
    assert back == acc

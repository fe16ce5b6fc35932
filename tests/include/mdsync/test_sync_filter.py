"""The record-level sync filter (issue 10.4) on hand-made frames: the OData condition (what parses, what is a config
error, how it evaluates, as Dataverse would), the checks against both sides' metadata, and identity's decisions
for records outside it, leaving it and entering it again. No service is called."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import yaml

from mdsync import identity
from mdsync.access import refresh_access
from mdsync.config import (DEFAULT_CONFIG_PATH, BoolOp, Column, Comparison, Literal, Not, load_config, parse_condition,
                           parse_config)
from mdsync.errors import ConfigError
from tests.include.mdsync.test_access import dynamics_metadata, marketo_describe

CONFIG = load_config()
RAW = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def config_with(**filters) -> object:
    """The shipped config with ``entities.<type>.filter`` replaced (``contact={...}``)."""
    raw = copy.deepcopy(RAW)
    for entity, flt in filters.items():
        raw["entities"][entity]["filter"] = flt
    return parse_config(raw, source="sync.yaml")


def config_error(**filters) -> str:
    with pytest.raises(ConfigError) as info:
        config_with(**filters)
    return str(info.value)


def rows(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


def holds(condition: str, frame: pd.DataFrame) -> list[bool]:
    cfg = config_with(contact={"dynamics_condition": condition})
    return identity.in_filter(cfg.entity("contact"), frame).tolist()


# -- parsing -------------------------------------------------------------------------------------------

def test_the_shipped_filter_keeps_active_records_only():
    for entity in CONFIG.entities.values():
        assert entity.filter.dynamics_condition == "statecode eq 0" and entity.filter.dynamics_column is None
        assert entity.filter.condition == Comparison("eq", Column("statecode"), Literal(0))
        assert entity.filter.columns == ["statecode"]


def test_the_supported_subset_parses_into_a_small_tree():
    tree = parse_condition("statecode eq 0 and (not (lastname eq 'O''Brien') or jobtitle ne null) and 2.5 le numberofchildren")
    assert tree == BoolOp("and", BoolOp("and", Comparison("eq", Column("statecode"), Literal(0)),
                                        BoolOp("or", Not(Comparison("eq", Column("lastname"), Literal("O'Brien"))),
                                               Comparison("ne", Column("jobtitle"), Literal(None)))),
                          Comparison("le", Literal(2.5), Column("numberofchildren")))
    cfg = config_with(contact={"dynamics_condition": "donotemail eq false or firstname eq lastname",
                               "dynamics_column": "marketingonly"})
    assert cfg.entity("contact").filter.columns == ["donotemail", "firstname", "lastname", "marketingonly"]


def test_no_condition_means_every_record():
    cfg = config_with(contact={"dynamics_condition": None})
    assert cfg.entity("contact").filter.condition is None
    assert identity.in_filter(cfg.entity("contact"), rows(statecode=[0, 1, None])).tolist() == [True, True, True]


@pytest.mark.parametrize("condition, says", [
    ("contains(lastname, 'x')", "the function contains()"),
    ("statecode in (0, 1)", "'in'"),
    ("statecode add 1 eq 1", "arithmetic (add)"),
    ("parentcustomerid_account/name eq 'x'", "navigation (a/b)"),
    ("createdon gt 2024-01-01T00:00:00Z", "DateTime literals"),
    ("_parentcustomerid_value eq 11111111-1111-1111-1111-111111111111", "GUID literals"),
    ("emailaddress1s/any(e: e eq 'x')", "any()/all()"),
    ("donotemail", "is not a comparison"),
    ("true", "is not a comparison"),
    ("0 eq 0", "compares two literals"),
    ("not statecode eq 1", "put parentheses around each comparison"),
    ("statecode gt null", "null can only be compared with eq or ne"),
    ("donotemail lt true", "true/false can only be compared with eq or ne"),
    ("", "not a valid OData condition"),
    ("statecode eq", "not a valid OData condition"),
])
def test_unsupported_syntax_is_a_config_error_naming_the_entry(condition, says):
    msg = config_error(lead={"dynamics_condition": condition})
    assert "sync.yaml: entities.lead.filter.dynamics_condition" in msg
    assert says in msg, msg


@pytest.mark.parametrize("condition, at", [
    ("statecode eq 0) or (1 eq 1", "unexpected ')' at character 15"),   # closing the condition early
    ("lastname eq 'x'; drop table leads", "unexpected '; drop table leads' at character 16"),
    ("statecode eq 0&$select=*", "not a valid OData condition"),       # a second query option smuggled in
    ("statecode eq 0 or 1 eq 1", "compares two literals"),             # an always-true clause
    ("lastname eq 'x' or 'a' eq 'a'", "compares two literals"),
])
def test_injection_like_conditions_are_config_errors(condition, at):
    msg = config_error(contact={"dynamics_condition": condition})
    assert at in msg, msg


def test_a_quote_inside_a_string_stays_inside_the_string():
    # 'x'' or ''1''=''1' is one string literal: it matches that exact text and nothing else
    frame = rows(lastname=["x' or '1'='1", "x", "1"])
    assert holds("lastname eq 'x'' or ''1''=''1'", frame) == [True, False, False]


def test_a_filter_column_must_be_a_plain_name_and_not_a_link_or_flag_column():
    assert "is not a column name" in config_error(contact={"dynamics_column": "statecode eq 0"})
    assert "is the link column" in config_error(contact={"dynamics_column": "mdsync_marketopersonid"})
    assert "is the deleted flag" in config_error(lead={"dynamics_column": "mdsync_deletedinmarketo"})


# -- evaluation on frames ---------------------------------------------------------------------------------

def test_numbers_compare_by_value_whatever_the_column_dtype():
    for values in ([0, 1, 2, None], pd.array([0, 1, 2, None], dtype="Int64"), ["0", "1", "2", None], [0.0, 1.0, 2.0, float("nan")]):
        frame = rows(statecode=values)
        assert holds("statecode eq 0", frame) == [True, False, False, False]
        assert holds("statecode ge 1", frame) == [False, True, True, False]
        assert holds("1 lt statecode", frame) == [False, False, True, False]  # a literal on the left


def test_strings_compare_case_insensitively_as_dataverse_does():
    frame = rows(lastname=["Lee", "LEE", "lees", None])
    assert holds("lastname eq 'lee'", frame) == [True, True, False, False]
    assert holds("lastname gt 'lee'", frame) == [False, False, True, False]


def test_booleans_from_any_representation():
    frame = rows(donotemail=[True, False, "true", "0", 1, None])
    assert holds("donotemail eq true", frame) == [True, False, True, False, True, False]
    assert holds("donotemail ne true", frame) == [False, True, False, True, False, False]


def test_null_comparisons_are_unknown_as_in_dataverse():
    # "Records aren't returned if the expression evaluates to false or null" (filter-rows.md)
    frame = rows(jobtitle=["CEO", None, ""], statecode=[0, 0, 0])
    assert holds("jobtitle ne 'ceo'", frame) == [False, False, True]
    assert holds("not (jobtitle eq 'ceo')", frame) == [False, False, True]
    assert holds("jobtitle eq null", frame) == [False, True, False]
    assert holds("jobtitle ne null", frame) == [True, False, True]
    assert holds("jobtitle ne 'ceo' or jobtitle eq null", frame) == [False, True, True]
    # unknown or true is true; unknown and false is false
    assert holds("jobtitle eq 'x' or statecode eq 0", frame) == [True, True, True]
    assert holds("jobtitle eq 'ceo' and statecode eq 1", frame) == [False, False, False]


def test_columns_compare_with_columns_and_a_missing_column_is_null():
    frame = rows(firstname=["Ann", "Bob", None], lastname=["ann", "Lee", "Lee"])
    assert holds("firstname eq lastname", frame) == [True, False, False]
    assert holds("nickname eq null", frame) == [True, True, True]
    assert holds("nickname eq 'x'", frame) == [False, False, False]


def test_the_dynamics_column_must_also_be_true():
    cfg = config_with(contact={"dynamics_condition": "statecode eq 0", "dynamics_column": "marketingonly"})
    frame = rows(statecode=[0, 0, 0, 1], marketingonly=[True, False, None, True])
    assert identity.in_filter(cfg.entity("contact"), frame).tolist() == [True, False, False, False]


# -- checks against both sides' metadata (refresh_schema) ---------------------------------------------------

def test_a_filter_column_that_does_not_exist_is_a_config_error_with_the_closest_name():
    cfg = config_with(contact={"dynamics_condition": "statecode eq 0 and jobtitel ne null"})
    with pytest.raises(ConfigError) as info:
        refresh_access(cfg, marketo_describe(), dynamics_metadata(), source="sync.yaml")
    assert "entities.contact.filter: Dataverse table 'contact' has no column 'jobtitel' (did you mean 'jobtitle'?)" \
        in str(info.value)


def test_a_filter_compared_with_a_literal_of_another_type_is_a_config_error():
    cfg = config_with(lead={"dynamics_condition": "statecode eq 'open' and jobtitle eq 3"})
    with pytest.raises(ConfigError) as info:
        refresh_access(cfg, marketo_describe(), dynamics_metadata(), source="sync.yaml")
    msg = str(info.value)
    assert "entities.lead.filter.dynamics_condition: column 'statecode' of Dataverse table 'lead' is a State column " \
           "but is compared with the string 'open'" in msg
    assert "column 'jobtitle' of Dataverse table 'lead' is a String column but is compared with the number 3" in msg


def test_a_filter_column_the_sync_user_cannot_read_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        refresh_access(CONFIG, marketo_describe(), dynamics_metadata(unreadable=["statecode"]), source="sync.yaml")
    assert "entities.lead.filter: the sync user cannot read column 'statecode'" in str(info.value)


def test_the_dynamics_column_must_be_yes_no():
    cfg = config_with(contact={"dynamics_condition": None, "dynamics_column": "jobtitle"})
    with pytest.raises(ConfigError) as info:
        refresh_access(cfg, marketo_describe(), dynamics_metadata(), source="sync.yaml")
    assert "entities.contact.filter.dynamics_column: column 'jobtitle' of Dataverse table 'contact' is a String " \
           "column; it must be Yes/No (Boolean)" in str(info.value)


def test_filter_columns_are_read_by_the_extract():
    from mdsync.extract import dynamics_columns

    cfg = config_with(contact={"dynamics_condition": "statecode eq 0 and nickname ne null", "dynamics_column": "marketingonly"})
    acc = refresh_access(CONFIG, marketo_describe(), dynamics_metadata())
    columns = dynamics_columns(cfg, cfg.entity("contact"), acc.entities["contact"])
    assert {"statecode", "nickname", "marketingonly"} <= set(columns)


# -- identity: outside, leaving, entering -------------------------------------------------------------------

def _records(entity: str, *rows_: dict) -> pd.DataFrame:
    idc = CONFIG.entity(entity).id_column
    cols = [idc, "emailaddress1", "mdsync_marketopersonid", "statecode"]
    return pd.DataFrame([{"statecode": 0, **r} for r in rows_], columns=cols).astype({idc: object})


def _persons(*rows_: dict) -> pd.DataFrame:
    cols = ["id", "email", "dynamicsRecordId", "dynamicsRecordType", "syncToDynamics", "dynamicsSyncAs"]
    return pd.DataFrame(list(rows_), columns=cols).astype({"id": "int64"})


def _links(*rows_, paused=()) -> pd.DataFrame:
    return pd.DataFrame({"dynamics_type": [r[1] for r in rows_], "dynamics_id": [r[2] for r in rows_],
                         "method": "email", "paused": [r[0] in paused for r in rows_]},
                        index=pd.Index([r[0] for r in rows_], dtype="int64", name="person_id"))


def test_an_inactive_unlinked_record_is_neither_linked_nor_created():
    d = identity.decide(CONFIG, _links(), _persons({"id": 5, "email": "ann@x.com"}),
                        {"contact": _records("contact", {"contactid": "C1", "emailaddress1": "ann@x.com", "statecode": 1},
                                             {"contactid": "C2", "emailaddress1": "new@x.com", "statecode": 1})})
    assert d.links.empty and d.marketo_creates.empty and d.activity.empty


def test_a_linked_record_that_leaves_the_filter_pauses_its_pair_and_says_so_once():
    records = {"contact": _records("contact", {"contactid": "C1", "emailaddress1": "ann@x.com",
                                               "mdsync_marketopersonid": "5", "statecode": 1})}
    people = _persons({"id": 5, "email": "ann@x.com", "dynamicsRecordId": "C1", "dynamicsRecordType": "contact"})
    first = identity.decide(CONFIG, _links((5, "contact", "C1")), people, records)
    assert first.links.loc[5, "paused"] and first.unlinked == []
    [line] = first.activity.to_dict("records")
    assert (line["action"], line["person_id"], line["dynamics_id"]) == ("skip", 5, "C1")
    assert "left the sync filter (statecode eq 0)" in line["detail"] and "the link is kept" in line["detail"]
    assert first.paused.to_dict("records") == [{"person_id": 5, "paused": True}]
    # its link fields are not written while it is outside
    m_links, d_links = identity.link_field_writes(CONFIG, first.links, _persons({"id": 5, "email": "ann@x.com"}), records)
    assert m_links.empty and d_links["contact"].empty
    # read again while still outside (the next change, or a full reconcile): nothing more is said
    again = identity.decide(CONFIG, _links((5, "contact", "C1"), paused=[5]), people, records)
    assert again.links.loc[5, "paused"] and again.activity.empty and again.paused.empty


def test_a_paused_pair_whose_record_enters_the_filter_again_is_resumed_and_its_person_read():
    records = {"contact": _records("contact", {"contactid": "C1", "emailaddress1": "ann@x.com",
                                               "mdsync_marketopersonid": "5", "statecode": 0})}
    store = _links((5, "contact", "C1"), paused=[5])
    # the person did not change, so it is not in the extract: identity asks for it (the pair is synced in full)
    lookups = identity.plan_lookups(CONFIG, store, _persons(), records)
    assert lookups.marketo_ids == [5]
    d = identity.decide(CONFIG, store, _persons({"id": 5, "email": "ann@x.com"}), records)
    assert not d.links.loc[5, "paused"]
    [line] = d.activity.to_dict("records")
    assert line["action"] == "link" and "inside the sync filter again: synced in full" in line["detail"]
    assert d.paused.to_dict("records") == [{"person_id": 5, "paused": False}]


def test_a_paused_pair_not_read_this_cycle_stays_paused():
    d = identity.decide(CONFIG, _links((5, "contact", "C1"), (6, "lead", "L1"), paused=[5]),
                        _persons({"id": 5, "email": "ann@x.com"}), {})
    assert d.links["paused"].to_dict() == {5: True, 6: False} and d.activity.empty


def test_a_link_rebuilt_to_a_record_outside_the_filter_is_made_paused():
    d = identity.decide(CONFIG, _links(), _persons({"id": 7, "email": "ann@x.com"}),
                        {"lead": _records("lead", {"leadid": "L1", "emailaddress1": "ann@x.com",
                                                   "mdsync_marketopersonid": "7", "statecode": 2})})
    assert d.links.loc[7, "new"] and d.links.loc[7, "paused"]
    assert any("outside the sync filter (statecode eq 0): linked, but not synced" in r["detail"]
               for r in d.activity.to_dict("records"))


def test_the_marketo_marker_switched_off_does_not_stop_a_linked_pair():
    # the marker only decides which unlinked persons get a Dynamics record (as the native "Sync Person to
    # Dynamics" flow step, a one-time push)
    d = identity.decide(CONFIG, _links((5, "contact", "C1")),
                        _persons({"id": 5, "email": "ann@x.com", "dynamicsRecordId": "C1", "dynamicsRecordType": "contact",
                                  "syncToDynamics": False}), {})
    assert not d.links.loc[5, "paused"] and d.unlinked == [] and d.activity.empty

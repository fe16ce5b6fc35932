"""The account stage on small frames: which persons get which account values, and which get nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mdsync.accounts import (ACCOUNT_ID, accounts_to_read, baseline_fields, contact_parents, linked_pairs,
                             plan_accounts, with_account_fields, write_field)
from mdsync.canonical import CANONICAL_DTYPE
from mdsync.commit import succeeded_baselines
from mdsync.config import Side
from mdsync.load import api_cells, api_records
from mdsync.plan import REQUIRES_MARKETO, REQUIRES_NOTHING

ACME, GLOBEX = "aaaaaaaa-0000-0000-0000-000000000001", "bbbbbbbb-0000-0000-0000-000000000002"


def contact_id(n: int) -> str:
    return f"cccccccc-0000-0000-0000-{n:012d}"


@pytest.fixture(scope="module")
def settings(config):
    return config.accounts


@pytest.fixture(scope="module")
def fields(settings):
    return [settings.fields[i] for i, f in enumerate(settings.fields)
            if f.name in ("company", "industry", "annual_revenue", "employees", "billing_city")]


def accounts(*rows: dict) -> pd.DataFrame:
    cols = ["accountid", "name", "industrycode", "revenue", "numberofemployees", "address1_city"]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols).astype(
        {"industrycode": "Int64", "revenue": "float64", "numberofemployees": "Int64"})


def links(contacts: dict[int, int], **extra) -> pd.DataFrame:
    """``{person_id: contact number}`` as identity's links."""
    ids = pd.Index(list(contacts), dtype="int64", name="person_id")
    frame = pd.DataFrame({"dynamics_type": "contact", "dynamics_id": [contact_id(n) for n in contacts.values()],
                          "method": "email", "new": False, "paused": False}, index=ids)
    for column, values in extra.items():
        frame[column] = values
    return frame


def pairs_of(parents: dict[int, str | None], link_frame: pd.DataFrame) -> pd.DataFrame:
    rows = pd.DataFrame({"contactid": [contact_id(n) for n in parents],
                         "_parentcustomerid_value": list(parents.values())})
    return linked_pairs(contact_parents([rows], "contactid", "_parentcustomerid_value"), link_frame)


def baseline(rows: dict[int, dict[str, str | None]], fields) -> pd.DataFrame:
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=baseline_fields(fields))
    frame.index = pd.Index(frame.index.astype("int64"), name="person_id")
    return frame.astype(CANONICAL_DTYPE)


def acme_baseline(fields, *pids, **values) -> pd.DataFrame:
    was = {ACCOUNT_ID: ACME, write_field("company"): "Acme", write_field("industry"): "Consulting",
           write_field("annual_revenue"): "1000000", write_field("employees"): "50",
           write_field("billing_city"): "Berlin"}
    return baseline({p: {**was, **values} for p in pids}, fields)


ACME_ROW = {"accountid": ACME, "name": "Acme", "industrycode": 7, "revenue": 1e6, "numberofemployees": 50,
            "address1_city": "Berlin"}


def written(plan) -> dict[tuple[int, str], str | None]:
    w = plan.writes
    return {(int(p), f): (None if pd.isna(v) else v) for p, f, v in zip(w["person_id"], w["field"], w["value"])}


def test_an_account_change_reaches_every_linked_person_of_its_contacts(settings, fields):
    link = links({1: 1, 2: 2, 3: 3, 4: 4})
    pairs = pairs_of({1: ACME, 2: ACME, 3: ACME, 4: GLOBEX}, link)
    plan = plan_accounts(settings, fields, accounts({**ACME_ROW, "name": "Acme Corp", "numberofemployees": 75}),
                         pairs, acme_baseline(fields, 1, 2, 3))
    assert written(plan) == {(p, f): v for p in (1, 2, 3) for f, v in (("account.company", "Acme Corp"),
                                                                        ("account.employees", "75"))}
    w = plan.writes
    assert set(w["entity_type"]) == {"contact"} and w["dynamics_id"].tolist()[:1] == [contact_id(1)]
    assert set(w["reason"]) == {"company fields from account 'Acme Corp'"}
    assert set(w["previous"]) == {"Acme", "50"}  # the persons were not read: what the sync last wrote
    base = plan.baseline_updates
    assert set(base["requires"]) == {REQUIRES_MARKETO} and len(base) == 6  # the account is the one they had
    assert plan.accounts == 1 and plan.persons == 3  # Globex was not read: its contact's person is left alone


def test_an_unchanged_account_writes_nothing_whatever_marketo_holds(settings, fields):
    """One way: a Marketo-side edit stays until the account's value changes."""
    link = links({1: 1, 2: 2})
    persons = pd.DataFrame({"id": [1, 2], "company": ["Edited in Marketo", "Acme"], "industry": [None, "Consulting"]})
    plan = plan_accounts(settings, fields, accounts(ACME_ROW), pairs_of({1: ACME, 2: ACME}, link),
                         acme_baseline(fields, 1, 2), persons)
    assert plan.writes.empty and plan.baseline_updates.empty and plan.activity.empty


def test_a_changed_value_overwrites_a_marketo_edit_and_a_cleared_one_clears(settings, fields):
    link = links({1: 1})
    persons = pd.DataFrame({"id": [1], "company": ["Edited in Marketo"], "billingCity": ["Berlin"]})
    plan = plan_accounts(settings, fields, accounts({**ACME_ROW, "name": "Acme AG", "address1_city": None}),
                         pairs_of({1: ACME}, link), acme_baseline(fields, 1), persons)
    assert written(plan) == {(1, "account.company"): "Acme AG", (1, "account.billing_city"): None}
    assert plan.writes.set_index("field").loc["account.company", "previous"] == "Edited in Marketo"


def test_a_first_link_takes_the_accounts_values_but_never_blanks_one(settings, fields):
    link = links({7: 7})
    plan = plan_accounts(settings, fields, accounts({**ACME_ROW, "address1_city": None, "industrycode": None}),
                         pairs_of({7: ACME}, link), baseline({}, fields))
    assert written(plan) == {(7, "account.company"): "Acme", (7, "account.annual_revenue"): "1000000",
                             (7, "account.employees"): "50"}
    assert set(plan.writes["reason"]) == {"company fields from account 'Acme' (the contact's account, first sync)"}
    base = plan.baseline_updates.set_index("field")
    assert base.loc[ACCOUNT_ID, "value"] == ACME and base.loc[ACCOUNT_ID, "requires"] == REQUIRES_NOTHING


def test_a_contact_moved_to_another_account_takes_its_values_and_loses_the_old_ones(settings, fields):
    link = links({1: 1})
    globex = {"accountid": GLOBEX.upper(), "name": "Globex", "industrycode": 7, "revenue": 2.5e6,
              "numberofemployees": None, "address1_city": "Springfield"}
    plan = plan_accounts(settings, fields, accounts(globex), pairs_of({1: GLOBEX}, link), acme_baseline(fields, 1))
    assert written(plan) == {(1, "account.company"): "Globex", (1, "account.annual_revenue"): "2500000",
                             (1, "account.employees"): None, (1, "account.billing_city"): "Springfield"}
    assert set(plan.writes["reason"]) == {"company fields from account 'Globex' (the contact's new account)"}
    assert plan.baseline_updates.set_index("field").loc[ACCOUNT_ID, "value"] == GLOBEX  # ids compare lower-cased


def test_values_marketo_already_holds_are_not_written_and_the_baseline_follows(settings, fields):
    link = links({1: 1, 2: 2})
    persons = pd.DataFrame({"id": [1], "company": ["Acme"], "industry": ["Consulting"], "annualRevenue": [1e6],
                            "numberOfEmployees": [50], "billingCity": ["Berlin"]})
    plan = plan_accounts(settings, fields, accounts(ACME_ROW), pairs_of({1: ACME, 2: ACME}, link),
                         baseline({}, fields), persons)
    assert {p for p, _ in written(plan)} == {2}  # person 2 was not read: written
    held = plan.baseline_updates[plan.baseline_updates["person_id"].eq(1)]
    assert set(held["requires"]) == {REQUIRES_NOTHING} and len(held) == len(fields) + 1


def test_an_option_without_a_label_is_left_alone_and_said_so(settings, fields):
    link = links({1: 1})
    plan = plan_accounts(settings, fields, accounts({**ACME_ROW, "industrycode": 999}), pairs_of({1: ACME}, link),
                         acme_baseline(fields, 1))
    assert plan.writes.empty
    note = plan.activity.iloc[0]
    assert (note["action"], note["field"], note["person_id"]) == ("skip", "account.industry", 1)
    assert note["detail"] == ("Dynamics value 999 of account 'Acme' left alone: option value has no label in the "
                              "value map of industry")


def test_a_contact_that_lost_its_account_keeps_the_values_and_forgets_the_account(settings, fields):
    link = links({1: 1})
    plan = plan_accounts(settings, fields, accounts(ACME_ROW), pairs_of({1: None}, link), acme_baseline(fields, 1))
    assert plan.writes.empty
    assert plan.baseline_updates[["person_id", "field"]].values.tolist() == [[1, ACCOUNT_ID]]
    assert plan.baseline_updates["value"].isna().all()


def test_only_new_parents_and_forced_persons_are_read_by_id(fields):
    link = links({1: 1, 2: 2, 3: 3, 4: 4, 5: 5})
    other = "dddddddd-0000-0000-0000-000000000004"
    pairs = pairs_of({1: ACME, 2: GLOBEX, 3: other, 4: None, 5: ACME}, link)
    base = baseline({1: {ACCOUNT_ID: ACME}, 2: {ACCOUNT_ID: ACME}, 5: {ACCOUNT_ID: ACME}}, fields)
    # 1 and 5 are unchanged (Acme did not change), 2 moved, 3 is new, 4 has no account
    assert accounts_to_read(pairs, base, have=[]) == sorted([GLOBEX, other])
    assert accounts_to_read(pairs, base, have=[other.upper()]) == [GLOBEX]  # changed accounts are read already
    assert accounts_to_read(pairs, base, have=[], force=[5]) == sorted([ACME, GLOBEX, other])


def test_pairs_outside_the_sync_filter_and_leads_take_no_account_values():
    link = links({1: 1, 2: 2, 3: 3}, paused=[False, True, False], dynamics_type=["contact", "contact", "lead"])
    link.loc[1, "dynamics_id"] = contact_id(1).upper()
    pairs = pairs_of({1: ACME.upper(), 2: ACME, 3: ACME}, link)
    assert pairs.to_dict("records") == [{"person_id": 1, "dynamics_id": contact_id(1).upper(),
                                         "contact_id": contact_id(1), "account_id": ACME}]


def test_contacts_read_twice_keep_their_first_row():
    fresh = pd.DataFrame({"contactid": [contact_id(1)], "_parentcustomerid_value": [GLOBEX]})
    older = pd.DataFrame({"contactid": [contact_id(1), contact_id(2)], "_parentcustomerid_value": [ACME, None]})
    parents = contact_parents([fresh, older, pd.DataFrame()], "contactid", "_parentcustomerid_value")
    assert parents.astype(object).where(parents.notna(), None).values.tolist() == [[contact_id(1), GLOBEX],
                                                                                  [contact_id(2), None]]


def test_account_writes_become_marketo_values_of_the_right_types(config, settings, fields):
    link = links({1: 1})
    plan = plan_accounts(settings, fields, accounts({**ACME_ROW, "revenue": 1234.5}), pairs_of({1: ACME}, link),
                         baseline({}, fields))
    contact = with_account_fields(config.entities, fields)["contact"]
    cells = api_cells(plan.writes, {f.name: f for f in contact.fields}, Side.MARKETO)
    record, = api_records(cells, "person_id", {"person_id": "id"})[0]
    assert record == {"id": 1, "company": "Acme", "industry": "Consulting", "annualRevenue": 1234.5,
                      "numberOfEmployees": 50, "billingCity": "Berlin"}
    assert config.entity("contact").fields == config.entities["contact"].fields  # the config is left as it was


def test_a_rejected_write_keeps_its_baseline_and_the_others_advance(settings, fields):
    link = links({1: 1, 2: 2})
    plan = plan_accounts(settings, fields, accounts({**ACME_ROW, "name": "Acme Corp"}),
                         pairs_of({1: ACME, 2: ACME}, link), acme_baseline(fields, 1, 2))
    results = plan.writes[["person_id", "field"]].assign(ok=np.array([True, False]))
    kept = succeeded_baselines(plan.baseline_updates, pd.DataFrame(), results)
    assert kept[["person_id", "field", "value"]].values.tolist() == [[1, "account.company", "Acme Corp"]]


# -- field access of the accounts section (the schema refresh) ----------------------------------------------

def access_world(config, *, without=(), unreadable=(), read_only=(), lookup_type="Customer"):
    """Both sides' metadata as the schema refresh reads it, with the account table and the contact's lookup."""
    from mdsync.access import ACCOUNT_META
    from tests.include.mdsync.test_access import dynamics_metadata, marketo_describe

    describe = marketo_describe(read_only=read_only)
    extra = [f.marketo for f in config.accounts.fields if f.marketo not in set(describe["rest_name"])]
    describe = pd.concat([describe, pd.DataFrame({"rest_name": extra, "display_name": extra, "data_type": "string",
                                                  "length": 255, "updateable": [n not in read_only for n in extra]})],
                         ignore_index=True)
    dyn = dynamics_metadata()
    contact = dyn["contact"]
    contact["attributes"] = pd.concat([contact["attributes"], pd.DataFrame(
        {"logical_name": ["parentcustomerid"], "type": [lookup_type], "max_length": [None]})], ignore_index=True)
    contact["permissions"] = pd.concat([contact["permissions"], pd.DataFrame(
        {"logical_name": ["parentcustomerid"], "can_read": ["parentcustomerid" not in unreadable],
         "can_update": [True], "can_create": [True]})], ignore_index=True)
    columns = [c for c in dict.fromkeys(["accountid", "name", *(f.dynamics for f in config.accounts.fields)])
               if c not in without]
    dyn[ACCOUNT_META] = {"entity_set": "accounts", "logical_name": "account",
                         "attributes": pd.DataFrame({"logical_name": columns, "type": "String", "max_length": None}),
                         "permissions": pd.DataFrame({"logical_name": columns,
                                                      "can_read": [c not in unreadable for c in columns],
                                                      "can_update": True, "can_create": True})}
    return describe, dyn


def test_the_schema_refresh_decides_which_account_fields_the_run_may_use(config):
    from mdsync.access import FieldAccess, refresh_access

    acc = refresh_access(config, *access_world(config))
    assert acc.accounts.fields == [f.name for f in config.accounts.fields] and acc.accounts.dropped == []
    assert acc.accounts.marketo_max_length["account.company"] == 255
    assert acc.dynamics_metadata["accounts"]["logical_name"] == "account"  # later tasks type account rows from it
    assert FieldAccess.from_json(acc.to_json()).accounts == acc.accounts


def test_account_fields_the_sync_user_cannot_read_or_marketo_cannot_take_are_dropped_and_logged(config, caplog):
    from mdsync.access import refresh_access

    with caplog.at_level("WARNING", logger="mdsync.access"):
        acc = refresh_access(config, *access_world(config, unreadable=["revenue"], read_only=["sicCode"]))
    assert "annual_revenue" not in acc.accounts.fields and "sic_code" not in acc.accounts.fields
    assert [d["reason"] for d in acc.accounts.dropped] == [
        "the sync user cannot read Dataverse column 'revenue' of account (field-level security)",
        "Marketo field 'sicCode' is not updateable through the API"]
    assert "account field annual_revenue dropped for this run" in caplog.text


def test_misspelt_account_columns_and_fields_are_config_errors_naming_the_closest_name(config, raw_config):
    from mdsync.access import refresh_access
    from mdsync.config import parse_config
    from mdsync.errors import ConfigError

    fields = raw_config["accounts"]["fields"]
    next(f for f in fields if f["name"] == "billing_city")["dynamics"] = "address1_cty"
    next(f for f in fields if f["name"] == "employees")["marketo"] = "numberOfEmployes"
    raw_config["accounts"]["contact_lookup"] = "_parentcustomerid_valeu"
    with pytest.raises(ConfigError) as refused:  # against the shipped config's world
        refresh_access(parse_config(raw_config), *access_world(config), source="sync.yaml")
    message = str(refused.value)
    assert "sync.yaml names fields that do not exist" in message
    assert ("accounts.fields[7].dynamics (billing_city): Dataverse table 'account' has no column 'address1_cty' "
            "(did you mean 'address1_city'?)") in message
    assert ("accounts.fields[2].marketo (employees): Marketo's lead schema has no field 'numberOfEmployes' (did you "
            "mean 'numberOfEmployees'?)") in message
    assert ("accounts.contact_lookup: Dataverse table 'contact' has no column '_parentcustomerid_valeu' (did you mean "
            "'_parentcustomerid_value'?)") in message


@pytest.mark.parametrize("kind, world, says", [
    ("not a lookup", {"lookup_type": "String"}, "accounts.contact_lookup: column '_parentcustomerid_value' of "
                                                "Dataverse table 'contact' is a String column; it must be the lookup"),
    ("unreadable", {"unreadable": ["parentcustomerid"]}, "accounts.contact_lookup: the sync user cannot read column "
                                                         "'_parentcustomerid_value' of Dataverse table 'contact'"),
    ("unreadable name", {"unreadable": ["name"]}, "accounts.name_column: the sync user cannot read column 'name'"),
])
def test_a_contact_lookup_or_account_column_the_stage_cannot_use_is_a_config_error(config, kind, world, says):
    from mdsync.access import refresh_access
    from mdsync.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        refresh_access(config, *access_world(config, **world), source="sync.yaml")
    assert "sync.yaml: the accounts section cannot be used as configured" in str(refused.value)
    assert says in str(refused.value), kind


@pytest.fixture()
def raw_config():
    import yaml

    from mdsync.config import DEFAULT_CONFIG_PATH

    return yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def test_one_account_column_can_feed_two_marketo_fields(settings, fields):
    role = fields[0].model_copy(update={"name": "role", "marketo": "leadRole"})  # the account's name again
    plan = plan_accounts(settings, [*fields, role], accounts(ACME_ROW), pairs_of({1: ACME}, links({1: 1})),
                         baseline({}, [*fields, role]))
    assert {f: v for (_, f), v in written(plan).items() if f in ("account.company", "account.role")} == {
        "account.company": "Acme", "account.role": "Acme"}


def test_an_account_without_a_name_is_named_by_its_id(settings, fields):
    plan = plan_accounts(settings, fields, accounts({**ACME_ROW, "name": ""}), pairs_of({1: ACME}, links({1: 1})),
                         acme_baseline(fields, 1, **{write_field("company"): "Acme"}))
    assert plan.writes[["field", "reason"]].values.tolist() == [
        ["account.company", f"company fields from account with id {ACME}"]]

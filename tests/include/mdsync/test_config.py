"""Config loading: the shipped config is valid, and each kind of bad config gets its specific error."""

from __future__ import annotations

import copy

import pytest
import yaml

from mdsync.config import DEFAULT_CONFIG_PATH, Direction, FieldType, Side, ValueRule, load_config, parse_config
from mdsync.errors import ConfigError


@pytest.fixture()
def raw():
    return yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def test_shipped_config_is_valid_and_realistic():
    config = load_config()
    assert set(config.entities) == {"lead", "contact"}
    assert config.entity("lead").collision_winner is Side.MARKETO
    assert config.entity("contact").collision_winner is Side.DYNAMICS
    lead = config.entity("lead")
    assert lead.email_field.marketo == "email" and lead.email_field.dynamics == "emailaddress1"
    assert lead.field("lead_source").values[8] == "Web"
    # consent flags sync both ways and an opt-out wins, on both entity types (issue 9)
    for entity in config.entities.values():
        consent = {f.name: (f.marketo, f.dynamics) for f in entity.fields if f.opt_out_wins}
        assert consent == {"email_opt_out": ("unsubscribed", "donotbulkemail"), "do_not_call": ("doNotCall", "donotphone")}
        assert all(entity.field(n).direction is Direction.BOTH and entity.field(n).rule is ValueRule.OPT_OUT_WINS
                   for n in consent)
    assert config.marketo.link_fields.dynamics_id == "dynamicsRecordId"
    assert config.dynamics.marketo_id_column == "mdsync_marketopersonid"


def test_config_path_from_environment(tmp_path, monkeypatch, raw):
    raw["schedule"]["full_reconcile_every_hours"] = 6
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MDSYNC_CONFIG", str(path))
    assert load_config().schedule.full_reconcile_every_hours == 6


def _error(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="sync.yaml")
    return str(info.value)


def test_unknown_direction_names_the_entry(raw):
    raw["entities"]["lead"]["fields"][3]["direction"] = "sideways"
    msg = _error(raw)
    assert "sync.yaml: entities.lead.fields[3].direction (job_title)" in msg
    assert "'sideways' is not one of" in msg


def test_field_mapped_twice(raw):
    raw["entities"]["contact"]["fields"][2]["dynamics"] = "FirstName"
    msg = _error(raw)
    assert "entities.contact" in msg
    assert "dynamics field 'FirstName' is mapped twice (also at fields[1])" in msg


def _field(raw, entity: str, name: str) -> dict:
    return next(f for f in raw["entities"][entity]["fields"] if f["name"] == name)


@pytest.mark.parametrize("ftype", [t.value for t in FieldType if t not in (FieldType.BOOLEAN, FieldType.PICKLIST)])
def test_opt_out_wins_only_on_boolean_fields(raw, ftype):
    field = _field(raw, "contact", "job_title")
    field.update(rule="opt_out_wins", type=ftype)
    msg = _error(raw)
    assert "entities.contact.fields[3] (job_title)" in msg
    assert f"rule 'opt_out_wins' is only for boolean fields (true = opted out on both sides), not on type {ftype!r}" in msg


def test_opt_out_wins_on_a_picklist_names_the_rule(raw):
    _field(raw, "lead", "lead_source")["rule"] = "opt_out_wins"
    assert "rule 'opt_out_wins' is only for boolean fields" in _error(raw)


@pytest.mark.parametrize("direction", ["to_dynamics", "to_marketo"])
def test_opt_out_wins_syncs_both_ways(raw, direction):
    _field(raw, "lead", "email_opt_out")["direction"] = direction
    msg = _error(raw)
    assert "entities.lead.fields[13] (email_opt_out)" in msg
    assert f"rule 'opt_out_wins' syncs an opt-out both ways: direction must be 'both', not {direction!r}" in msg


def test_unknown_rule(raw):
    _field(raw, "lead", "email_opt_out")["rule"] = "opt_in_wins"
    msg = _error(raw)
    assert "entities.lead.fields[13].rule (email_opt_out): 'opt_in_wins' is not one of 'opt_out_wins'" in msg


def test_a_boolean_without_the_rule_is_an_ordinary_field(raw):
    field = _field(raw, "lead", "do_not_call")
    del field["rule"]
    field["direction"] = "to_marketo"
    f = parse_config(raw).entity("lead").field("do_not_call")
    assert f.rule is None and not f.opt_out_wins and f.direction is Direction.TO_MARKETO


def test_marketo_field_mapped_twice(raw):
    raw["entities"]["lead"]["fields"][4]["marketo"] = "title"
    assert "marketo field 'title' is mapped twice (also at fields[3])" in _error(raw)


def test_value_map_not_one_to_one(raw):
    raw["entities"]["lead"]["fields"][-1]["values"][2] = "Web"
    msg = _error(raw)
    assert "entities.lead.fields[15] (lead_source)" in msg
    assert "value map is not one-to-one: label 'Web' is mapped from both 2 and 8" in msg


def test_picklist_without_value_map(raw):
    del raw["entities"]["lead"]["fields"][-1]["values"]
    assert "a picklist needs a 'values' map" in _error(raw)


def test_value_map_on_non_picklist(raw):
    raw["entities"]["lead"]["fields"][1]["values"] = {1: "x"}
    assert "'values' is only allowed on picklist fields" in _error(raw)


def test_missing_collision_policy(raw):
    del raw["entities"]["contact"]["collision_winner"]
    assert "entities.contact.collision_winner (contact): is required but missing" in _error(raw)


def test_unknown_collision_winner(raw):
    raw["entities"]["lead"]["collision_winner"] = "salesforce"
    assert "'salesforce' is not one of 'marketo' or 'dynamics'" in _error(raw)


def test_unknown_entity_type(raw):
    raw["entities"]["opportunity"] = copy.deepcopy(raw["entities"]["contact"])
    assert "unknown entity type 'opportunity'" in _error(raw)


def test_unknown_field_type(raw):
    raw["entities"]["lead"]["fields"][1]["type"] = "text"
    assert "entities.lead.fields[1].type (first_name): 'text' is not one of" in _error(raw)


def test_entity_needs_one_email_field(raw):
    raw["entities"]["lead"]["fields"][0]["type"] = "string"
    assert "exactly one field of type 'email' is needed" in _error(raw)


def test_link_field_cannot_be_synced_as_data(raw):
    raw["entities"]["lead"]["fields"][1]["marketo"] = "dynamicsRecordId"
    assert "Marketo field 'dynamicsRecordId' is reserved for marketo.link_fields.dynamics_id" in _error(raw)


def test_link_column_cannot_be_synced_as_data(raw):
    raw["entities"]["contact"]["fields"][1]["dynamics"] = "mdsync_marketopersonid"
    assert "is the link column" in _error(raw)


def test_typo_in_setting_name(raw):
    raw["entities"]["lead"]["fields"][1]["directoin"] = "both"
    assert "entities.lead.fields[1].directoin (first_name): is not a known setting (typo?)" in _error(raw)


def test_unsupported_version(raw):
    raw["version"] = 2
    assert "unsupported config version 2" in _error(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the sync config"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("entities: [unclosed")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping at the top level"):
        load_config(top)


# -- accounts to persons (issue 10.5) -------------------------------------------------------------------------

def test_shipped_account_fields_flow_one_way_to_the_persons_company_fields():
    accounts = load_config().accounts
    assert (accounts.entity_set, accounts.id_column, accounts.contact_lookup) == ("accounts", "accountid",
                                                                                  "_parentcustomerid_value")
    assert {f.direction for f in accounts.fields} == {Direction.TO_MARKETO}
    pairs = {f.name: (f.marketo, f.dynamics) for f in accounts.fields}
    assert pairs["company"] == ("company", "name") and pairs["employees"] == ("numberOfEmployees", "numberofemployees")
    assert pairs["billing_city"] == ("billingCity", "address1_city")
    industry = next(f for f in accounts.fields if f.name == "industry")
    assert industry.type is FieldType.PICKLIST and industry.values[7] == "Consulting" and len(industry.values) == 33


def _account_field(raw, name: str) -> dict:
    return next(f for f in raw["accounts"]["fields"] if f["name"] == name)


@pytest.mark.parametrize("direction", ["both", "to_dynamics", "sideways"])
def test_account_fields_refuse_any_direction_but_to_marketo(raw, direction):
    _account_field(raw, "industry")["direction"] = direction
    msg = _error(raw)
    assert "sync.yaml: accounts: fields[11] (industry): account fields flow one way, from the Dynamics account to " \
           f"the Marketo persons of its contacts: direction must be 'to_marketo' (or left out), not {direction!r}" in msg


def test_an_explicit_to_marketo_direction_is_fine(raw):
    _account_field(raw, "company")["direction"] = "to_marketo"
    assert parse_config(raw).accounts.fields[0].direction is Direction.TO_MARKETO


def test_account_fields_take_no_value_rule(raw):
    _account_field(raw, "company").update(type="boolean", rule="opt_out_wins")
    assert "accounts: fields[0] (company): account fields take no value rule ('opt_out_wins'" in _error(raw)


def test_an_account_field_cannot_also_be_a_contact_field(raw):
    _account_field(raw, "billing_city")["marketo"] = "City"
    msg = _error(raw)
    assert ("accounts.fields[7] (billing_city): Marketo field 'City' is also mapped for contacts (entities.contact "
            "field 'city'); a person's field takes its value from the contact or from its account, not both") in msg


def test_an_account_field_cannot_be_a_link_field(raw):
    _account_field(raw, "company")["marketo"] = "dynamicsRecordType"
    assert "Marketo field 'dynamicsRecordType' is reserved for marketo.link_fields.dynamics_type" in _error(raw)


def test_an_account_field_mapped_twice(raw):
    _account_field(raw, "website")["marketo"] = "Company"
    assert "accounts: fields[4] (website): marketo field 'Company' is mapped twice (also at fields[0])" in _error(raw)


def test_an_account_column_setting_must_be_a_column_name(raw):
    raw["accounts"]["contact_lookup"] = "parentcustomerid/accountid"
    assert "sync.yaml: accounts.contact_lookup: contact_lookup 'parentcustomerid/accountid' is not a table or column " \
           "name" in _error(raw)


def test_accounts_need_the_contact_entity(raw):
    del raw["entities"]["contact"]
    assert "accounts: account fields reach persons through their contacts; configure entities.contact too" in _error(raw)


def test_the_accounts_section_is_optional_and_checked_for_typos(raw):
    del raw["accounts"]
    assert parse_config(copy.deepcopy(raw)).accounts is None
    raw["accounts"] = {"entity_set": "accounts", "feilds": []}
    msg = _error(raw)
    assert "accounts.feilds: is not a known setting (typo?)" in msg and "accounts.fields: is required but missing" in msg

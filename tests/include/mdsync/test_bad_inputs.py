"""The bad-input suite (issue 9 item 6): awkward and invalid values, matched values built to break a query, and
every kind of bad config, end to end against both sandboxes over real HTTP(S).

Data cases share one pair of sandboxes, one state store and three cycles: every case seeds its own records
(emails that name it) before the first sync, makes its change before the second, and the third must write
nothing more (no ping-pong, no re-sent rejection). Both sides are then read through their APIs once (a bulk
export of every Marketo person, every Dataverse row) and each case checks its own records: the value arrived
exactly (no trimming, normalising, truncating or re-encoding), or a specific error names the record, field,
value and what the service said, while the record's other changes and every other record synced; nothing is
duplicated. Config cases check that a bad config (or connection) stops a run at once with an error naming the
entry, before anything is written on either side. The README's "Faults and bad inputs" table lists every case.

The module's sync config is the shipped one plus a contact field whose Dataverse column is longer than its
Marketo field (``nickname`` 100 -> ``leadRole`` 50) and a lead-source map without option 10 ("Other"), as a
Dataverse option added after the map was written.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
import yaml
from airflow.sdk.exceptions import AirflowFailException

from mdsync.config import DEFAULT_CONFIG_PATH
from mdsync.cycle import STAGES
from mdsync.errors import ConfigError
from mdsync_airflow.failfast import fail_fast
from tests.fixtures.module_world import ModuleWorld, Snapshot, airflow_context, module_world

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: canonical field -> (Marketo REST name, Dataverse column)
NAMES = {"first_name": ("firstName", "firstname"), "last_name": ("lastName", "lastname"),
         "job_title": ("title", "jobtitle"), "city": ("city", "address1_city"), "street": ("address", "address1_line1"),
         "phone": ("phone", "telephone1"),
         "company": ("company", "companyname"), "lead_source": ("leadSource", "leadsourcecode"),
         "role": ("leadRole", "nickname"), "email": ("email", "emailaddress1")}
RULES = [
    {"entity": "contact", "column": "telephone1", "op": "match", "pattern": r"^[+0-9 ()/-]*$",
     "message": "Phone numbers hold digits, spaces and + ( ) / - only."},
    {"entity": "lead", "column": "companyname", "op": "require", "message": "A lead needs a company."},
    {"entity": "contact", "column": "jobtitle", "op": "forbid", "values": ["Intern"],
     "message": "Interns are not contacts."},
]


def module_config() -> dict:
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["entities"]["contact"]["fields"].append(
        {"name": "role", "marketo": "leadRole", "dynamics": "nickname", "type": "string", "direction": "both"})
    lead_source = next(f for f in config["entities"]["lead"]["fields"] if f["name"] == "lead_source")
    del lead_source["values"][10]
    return config


# -- the cases -------------------------------------------------------------------------------------------------

class Ctx(Snapshot):
    """What a case's steps see: the world, its own ids (filled in when seeded), and after the cycles the end
    state of both sides (a :class:`Snapshot`), the activity, the open errors and the runs' reports."""

    def __init__(self, world: ModuleWorld) -> None:
        super().__init__(pd.DataFrame(), {}, pd.DataFrame())
        self.world, self.ids = world, {}
        self.activity = self.errors = self.reports = None

    def lines(self, run: str | None = None, *, pid: int | None = None, email: str | None = None,
              action: str | None = None, rid: str | None = None) -> pd.DataFrame:
        a = self.activity
        keep = pd.Series(True, index=a.index)
        if run:
            keep &= a["run_id"].eq(run)
        if pid is not None:
            keep &= a["person_id"].eq(pid)
        if email is not None:
            keep &= a["email"].fillna("").str.lower().eq(email.lower())
        if rid is not None:
            keep &= a["dynamics_id"].fillna("").str.lower().eq(rid.lower())
        if action:
            keep &= a["action"].eq(action)
        return a[keep]

    def quiet_afterwards(self, pid: int) -> None:
        """The third cycle wrote nothing for this person (no ping-pong, no re-sent rejection)."""
        busy = self.lines("bad-3", pid=pid)
        assert busy[busy["action"].isin(["update", "error", "collision", "create"])].empty, busy.to_dict("records")


@dataclass
class Case:
    """A bad input: what it seeds before the first sync, what it changes before the second, and what must hold
    after the third. ``pairs`` are ``(key, entity, marketo fields, dynamics columns)`` linked by the first sync."""

    name: str
    pairs: list = field(default_factory=list)
    change: Callable[[Ctx], None] | None = None
    check: Callable[[Ctx], None] | None = None
    #: Marketo persons seeded before the first sync (unmarked, so they stay alone until a record matches them)
    persons: list = field(default_factory=list)
    #: a step run inside the second cycle, right after both extracts (what it makes is not in them)
    during: Callable[[Ctx], None] | None = None

    def email(self, what: str = "pair") -> str:
        return f"{self.name.replace('_', '-')}.{what}@bad.example.com"


BASE_M = {"firstName": "F", "lastName": "Base", "title": "Start", "city": "Start", "address": "Start"}
BASE_D = {"firstname": "F", "lastname": "Base", "jobtitle": "Start", "address1_city": "Start",
          "address1_line1": "Start"}
LEAD_M = {**BASE_M, "company": "Acme", "leadSource": "Web"}
LEAD_D = {**BASE_D, "companyname": "Acme", "leadsourcecode": 8}


def pair(case: Case, entity: str = "contact", m: dict | None = None, d: dict | None = None, key: str = "pair"):
    return (key, entity, {**(LEAD_M if entity == "lead" else BASE_M), **(m or {})},
            {**(LEAD_D if entity == "lead" else BASE_D), **(d or {})})


def flow(name: str, value, fld: str, side: str, entity: str = "contact") -> Case:
    """``value`` set in ``fld`` on ``side`` reaches the other side exactly, and stays."""
    case = Case(name)
    case.pairs = [pair(case, entity)]
    es = entity + "s"
    m_name, d_name = NAMES[fld]

    def change(ctx: Ctx) -> None:
        pid, rid = ctx.ids["pair"]
        if side == "marketo":
            ctx.world.set_person(pid, **{m_name: value})
        else:
            ctx.world.set_row(es, rid, **{d_name: value})

    def check(ctx: Ctx) -> None:
        pid, rid = ctx.ids["pair"]
        got_m, got_d = ctx.person_by_id(pid)[m_name], ctx.row_by_id(es, rid)[d_name]
        assert (got_m, got_d) == (value, value), f"sent {value!r}: Marketo has {got_m!r}, Dynamics has {got_d!r}"
        ctx.pair(pid, es, rid)
        assert len(ctx.lines("bad-2", pid=pid, action="update")) == 1
        ctx.quiet_afterwards(pid)

    case.change, case.check = change, check
    return case


def rejected(name: str, entity: str, fld: str, value, side: str, *, code: str, message: str,
             base: str | None = "Start", base_email: bool = False) -> Case:
    """``value`` set in ``fld`` on ``side`` is refused by the other side (or before sending): a specific error,
    the other change of the same record (last name) still arrives, the refused value is not re-sent."""
    case = Case(name)
    case.pairs = [pair(case, entity)]
    es = entity + "s"
    m_name, d_name = NAMES[fld]
    target = "dynamics" if side == "marketo" else "marketo"

    def change(ctx: Ctx) -> None:
        pid, rid = ctx.ids["pair"]
        if side == "marketo":
            ctx.world.set_person(pid, **{m_name: value, "lastName": f"{name} last"})
        else:
            ctx.world.set_row(es, rid, **{d_name: value, "lastname": f"{name} last"})

    def check(ctx: Ctx) -> None:
        pid, rid = ctx.ids["pair"]
        person, row = ctx.person_by_id(pid), ctx.row_by_id(es, rid)
        assert person["lastName"] == row["lastname"] == f"{name} last"  # the record's other change arrived
        kept = row[d_name] if target == "dynamics" else person[m_name]
        assert (kept if not pd.isna(kept) else None) == (case.email() if base_email else base)  # never cut or blanked
        source = person[m_name] if side == "marketo" else row[d_name]
        assert (source if not pd.isna(source) else None) == value  # and the source is left as it is
        err = ctx.errors[(ctx.errors["person_id"] == pid) & (ctx.errors["field"] == fld)]
        assert len(err) == 1, ctx.errors[ctx.errors["person_id"] == pid].to_dict("records")
        err = err.iloc[0]
        assert err["target"] == target and err["code"] == code and message in err["message"]
        assert (err["value"] if not pd.isna(err["value"]) else None) == value
        line = ctx.lines("bad-2", pid=pid, action="error")
        assert line["field"].tolist() == [fld] and message in line["detail"].iloc[0]
        ctx.quiet_afterwards(pid)
        skipped = ctx.lines("bad-3", pid=pid, action="skip")
        assert skipped.empty or skipped["detail"].str.contains("not re-sent").all()

    case.change, case.check = change, check
    return case


# matched values: a record found by email on the other side is linked, never duplicated

def linked_by_lookup(name: str, email: str, where: str) -> Case:
    """An email with characters that mean something in a URL or an OData filter, used to match records. The
    record to be found is not in the cycle's extract, so only the lookup can find it:
    ``where="marketo"``: a new Dynamics contact finds its Marketo person (seeded before the first sync, never
    changed since) through Marketo's filterValues;
    ``where="dynamics"``: a person marked for sync finds its Dynamics contact (made right after the cycle's
    extracts) through an OData ``$filter``."""
    case = Case(name)

    def change(ctx: Ctx) -> None:
        if where == "marketo":
            ctx.ids["rid"] = ctx.world.new_row("contacts", emailaddress1=email, lastname="New in Dynamics")
        else:
            ctx.ids["pid"] = ctx.world.mark(email, "contact", lastName="Marked")

    def during(ctx: Ctx) -> None:
        if where == "dynamics":
            ctx.ids["rid"] = ctx.world.new_row("contacts", emailaddress1=email, lastname="Existing")

    def check(ctx: Ctx) -> None:
        pid = ctx.ids["pid"] if where == "dynamics" else ctx.ids["person"][0]
        assert len(ctx.persons_with(email)) == 1 and len(ctx.rows_with("contacts", email)) == 1
        assert ctx.rows_with("leads", email).empty
        ctx.pair(pid, "contacts", ctx.ids["rid"])
        assert ctx.lines(pid=pid, action="create").empty
        assert len(ctx.lines("bad-2", pid=pid, action="link")) == 1

    if where == "marketo":
        case.persons = [("person", {"email": email, "lastName": "Existing"})]
    case.change, case.during, case.check = change, during, check
    return case


def created_exactly(name: str, email: str) -> Case:
    """A person marked for sync whose email is built to change a query if it were pasted into one unescaped:
    it matches nothing, so exactly one new lead is created with that exact email, and no other record is
    touched or linked to it."""
    case = Case(name)

    def change(ctx: Ctx) -> None:
        ctx.ids["pid"] = ctx.world.mark(email, "lead", lastName="Injected", company="Evil Corp")

    def check(ctx: Ctx) -> None:
        pid = ctx.ids["pid"]
        lead = ctx.row("leads", email)
        assert lead["emailaddress1"] == email
        ctx.pair(pid, "leads", lead["leadid"])
        assert sum(int(r["mdsync_marketopersonid"].eq(str(pid)).sum()) for r in ctx.rows.values()) == 1
        assert ctx.lines("bad-2", action="link", pid=pid).empty  # never linked to an existing record
        assert len(ctx.lines("bad-2", action="create", pid=pid)) == 1

    case.change, case.check = change, check
    return case


def _over_long_create(ctx: Ctx) -> None:
    ctx.ids["long"] = ctx.world.mark(CASE_EMAILS["over_long_value_in_a_create"], "contact", lastName="Long",
                                     title="L" * 120)


def _check_over_long_create(ctx: Ctx) -> None:
    email = CASE_EMAILS["over_long_value_in_a_create"]
    assert ctx.rows_with("contacts", email).empty and ctx.rows_with("leads", email).empty  # not created, not cut
    ctx.unlinked(ctx.ids["long"])
    err = ctx.errors[ctx.errors["person_id"] == ctx.ids["long"]]
    assert len(err) == 1 and err["target"].iloc[0] == "dynamics" and err["code"].iloc[0] == "0x80044331"
    assert "'jobtitle'" in err["message"].iloc[0] and "'100'" in err["message"].iloc[0]
    assert ctx.person_by_id(ctx.ids["long"])["title"] == "L" * 120


def _rule_create(ctx: Ctx) -> None:
    ctx.ids["intern"] = ctx.world.mark(CASE_EMAILS["business_rule_refuses_a_create"], "contact", lastName="Intern",
                                       title="Intern")
    ctx.ids["fine"] = ctx.world.mark(CASE_EMAILS["business_rule_refuses_a_create"].replace(".pair@", ".fine@"),
                                     "contact", lastName="Fine", title="Fine")


def _check_rule_create(ctx: Ctx) -> None:
    email = CASE_EMAILS["business_rule_refuses_a_create"]
    assert ctx.rows_with("contacts", email).empty
    ctx.unlinked(ctx.ids["intern"])
    err = ctx.errors[ctx.errors["person_id"] == ctx.ids["intern"]].iloc[0]
    assert err["code"] == "0x80040265" and "Interns are not contacts." in err["message"]
    # the other create of the same batch went through
    fine = ctx.row("contacts", email.replace(".pair@", ".fine@"))
    ctx.pair(ctx.ids["fine"], "contacts", fine["contactid"])


def _invalid_email_new(ctx: Ctx) -> None:
    ctx.ids["rid"] = ctx.world.new_row("contacts", emailaddress1="jürgen@bad.example.com", lastname="Umlaut")


def _check_invalid_email_new(ctx: Ctx) -> None:
    assert ctx.persons_with("jürgen@bad.example.com").empty  # Marketo takes ASCII addresses only
    row = ctx.row_by_id("contacts", ctx.ids["rid"])
    assert pd.isna(row["mdsync_marketopersonid"])
    refused = ctx.lines("bad-2", email="jürgen@bad.example.com", action="error")
    assert refused["detail"].str.contains("Invalid value 'jürgen@bad.example.com'. Required of type 'email'").all()
    assert refused["detail"].str.contains("lookup").any() and refused["detail"].str.contains("create").any()


def _comma_email(ctx: Ctx) -> None:
    w, e = ctx.world, CASE_EMAILS["comma_joins_two_existing_emails"]
    one, two = e.replace(".pair@", ".one@"), e.replace(".pair@", ".two@")
    ctx.ids["one"], ctx.ids["two"] = w.new_persons([{"email": one, "lastName": "One"},
                                                    {"email": two, "lastName": "Two"}])
    ctx.ids["rid"] = w.new_row("contacts", emailaddress1=f"{one},{two}", lastname="Joined")


def _check_comma_email(ctx: Ctx) -> None:
    e = CASE_EMAILS["comma_joins_two_existing_emails"]
    for key in ("one", "two"):  # neither person was matched (or changed) by the joined value
        ctx.unlinked(ctx.ids[key])
        assert ctx.person_by_id(ctx.ids[key])["lastName"] in ("One", "Two")
    joined = f"{e.replace('.pair@', '.one@')},{e.replace('.pair@', '.two@')}"
    assert pd.isna(ctx.row_by_id("contacts", ctx.ids["rid"])["mdsync_marketopersonid"])
    details = " ".join(ctx.lines("bad-2", email=joined, action="error")["detail"])
    assert "contains a comma: filterValues is comma-separated" in details


def _spaced_email(ctx: Ctx) -> None:
    e = CASE_EMAILS["email_with_surrounding_spaces"]
    ctx.ids["pid"] = ctx.world.new_persons([{"email": e, "lastName": "Spaced"}])[0]
    ctx.ids["rid"] = ctx.world.new_row("contacts", emailaddress1=f"  {e} ", lastname="Spaced")


def _check_spaced_email(ctx: Ctx) -> None:
    e = CASE_EMAILS["email_with_surrounding_spaces"]
    ctx.pair(ctx.ids["pid"], "contacts", ctx.ids["rid"])  # matched by the address, spaces aside
    assert ctx.person_by_id(ctx.ids["pid"])["email"] == e  # Marketo keeps its valid address
    assert ctx.errors[ctx.errors["person_id"] == ctx.ids["pid"]].empty  # and nothing was refused
    assert ctx.lines(pid=ctx.ids["pid"], action="collision").empty


def _null_vs_empty_check(case: Case):
    def check(ctx: Ctx) -> None:
        pid, rid = ctx.ids["pair"]
        d_city = ctx.row_by_id("contacts", rid)["address1_city"]
        assert pd.isna(ctx.person_by_id(pid)["city"]) and (pd.isna(d_city) or d_city == "")
        assert set(ctx.lines(pid=pid)["action"]) == {"link"}  # an empty string and a null are the same: no write
    return check


def _case_only_check(ctx: Ctx) -> None:
    pid, rid = ctx.ids["pair"]
    email = CASE_EMAILS["email_changed_only_in_case"]
    assert ctx.person_by_id(pid)["email"] == email  # Marketo keeps its spelling
    assert ctx.row_by_id("contacts", rid)["emailaddress1"] == email.upper()
    assert ctx.lines(pid=pid, action="update").empty
    ctx.pair(pid, "contacts", rid)


def _case_at_link(ctx: Ctx) -> None:
    e = CASE_EMAILS["email_differs_only_in_case_at_link"]
    ctx.ids["pid"] = ctx.world.new_persons([{"email": e.upper(), "lastName": "Upper"}])[0]
    ctx.ids["rid"] = ctx.world.new_row("contacts", emailaddress1=e, lastname="Lower")


def _check_case_at_link(ctx: Ctx) -> None:
    e = CASE_EMAILS["email_differs_only_in_case_at_link"]
    assert len(ctx.persons_with(e)) == 1
    ctx.pair(ctx.ids["pid"], "contacts", ctx.ids["rid"])
    assert ctx.person_by_id(ctx.ids["pid"])["email"] == e.upper()


def _twins(ctx: Ctx) -> None:
    e = CASE_EMAILS["two_persons_with_one_email"]
    # Sync Leads would refuse the second (1005 Lead already exists): such twins come from imports and merges
    ctx.ids["pids"] = ctx.world.marketo_sandbox.seed_leads([{"email": e, "lastName": "One"},
                                                            {"email": e.upper(), "lastName": "Two"}])
    ctx.ids["rid"] = ctx.world.new_row("contacts", emailaddress1=e, lastname="Record")


def _check_twins(ctx: Ctx) -> None:
    e = CASE_EMAILS["two_persons_with_one_email"]
    assert len(ctx.persons_with(e)) == 2  # nobody made a third, or merged them
    for pid in ctx.ids["pids"]:
        ctx.unlinked(pid)
    assert pd.isna(ctx.row_by_id("contacts", ctx.ids["rid"])["mdsync_marketopersonid"])
    amb = ctx.lines("bad-2", rid=ctx.ids["rid"], action="ambiguous")
    assert "2 Marketo persons have this email" in " ".join(amb["detail"])


def _twin_rows(ctx: Ctx) -> None:
    e = CASE_EMAILS["two_records_with_one_email"]
    ctx.ids["rids"] = ctx.world.dataverse_sandbox.seed("contacts", [{"emailaddress1": e, "lastname": "One"},
                                                                     {"emailaddress1": e.upper(), "lastname": "Two"}])
    ctx.ids["pid"] = ctx.world.mark(e, "contact", lastName="Marked")


def _check_twin_rows(ctx: Ctx) -> None:
    e = CASE_EMAILS["two_records_with_one_email"]
    assert len(ctx.rows_with("contacts", e)) == 2 and ctx.rows_with("leads", e).empty  # no third, no lead
    ctx.unlinked(ctx.ids["pid"])
    assert len(ctx.persons_with(e)) == 1
    amb = ctx.lines("bad-2", pid=ctx.ids["pid"], action="ambiguous")
    assert "2 Dynamics contacts have this email" in " ".join(amb["detail"])


def _lead_and_contact(ctx: Ctx) -> None:
    e = CASE_EMAILS["a_lead_and_a_contact_share_an_email"]
    ctx.ids["lead"] = ctx.world.new_row("leads", emailaddress1=e, lastname="Lead", companyname="Acme")
    ctx.ids["contact"] = ctx.world.new_row("contacts", emailaddress1=e, lastname="Contact")
    ctx.ids["pid"] = ctx.world.mark(e, "lead", lastName="Marked")


def _check_lead_and_contact(ctx: Ctx) -> None:
    e = CASE_EMAILS["a_lead_and_a_contact_share_an_email"]
    ctx.pair(ctx.ids["pid"], "contacts", ctx.ids["contact"])  # the contact gets the person
    assert pd.isna(ctx.row_by_id("leads", ctx.ids["lead"])["mdsync_marketopersonid"])
    assert len(ctx.rows_with("leads", e)) == 1 and len(ctx.persons_with(e)) == 1


def _garbage_link_field(ctx: Ctx) -> None:
    e = CASE_EMAILS["injection_in_a_marketo_link_field"]
    ctx.ids["pid"] = ctx.world.new_persons([{"email": e, "lastName": "Forged", "dynamicsRecordType": "contact",
                                             "dynamicsRecordId": "') or (contactid ne null"}])[0]


def _check_garbage_link_field(ctx: Ctx) -> None:
    pid = ctx.ids["pid"]
    assert pid not in ctx.links.index
    for rows in ctx.rows.values():  # no record was linked to it, nor changed to name it
        assert not rows["mdsync_marketopersonid"].eq(str(pid)).any()
    skip = ctx.lines("bad-2", pid=pid, action="skip")
    assert "names a Dynamics contact that does not exist" in " ".join(skip["detail"])
    assert ctx.person_by_id(pid)["dynamicsRecordId"] == "') or (contactid ne null"


def _garbage_link_column(ctx: Ctx) -> None:
    e = CASE_EMAILS["injection_in_the_dynamics_link_column"]
    ctx.ids["rid"] = ctx.world.new_row("contacts", emailaddress1=e, lastname="Forged",
                                       mdsync_marketopersonid="1 or 1 eq 1")


def _check_garbage_link_column(ctx: Ctx) -> None:
    e = CASE_EMAILS["injection_in_the_dynamics_link_column"]
    person = ctx.person(e)  # made from the record; the forged id named nobody
    ctx.pair(int(person["id"]), "contacts", ctx.ids["rid"])
    err = ctx.lines("bad-2", rid=ctx.ids["rid"], action="error")
    assert "holds '1 or 1 eq 1', which is not a Marketo person id" in " ".join(err["detail"])


def _no_email(ctx: Ctx) -> None:
    ctx.ids["rid"] = ctx.world.new_row("contacts", firstname="No", lastname="Email Address")


def _check_no_email(ctx: Ctx) -> None:
    assert pd.isna(ctx.row_by_id("contacts", ctx.ids["rid"])["mdsync_marketopersonid"])
    skip = ctx.lines("bad-2", rid=ctx.ids["rid"], action="skip")
    assert "has no email (emailaddress1); cannot match or create a Marketo person" in " ".join(skip["detail"])


def _picklist_case(name: str, side: str) -> Case:
    case = Case(name)
    case.pairs = [pair(case, "lead")]

    def change(ctx: Ctx) -> None:
        pid, rid = ctx.ids["pair"]
        if side == "marketo":
            ctx.world.set_person(pid, leadSource="Carrier Pigeon", lastName=f"{name} last")
        else:
            ctx.world.set_row("leads", rid, leadsourcecode=10, lastname=f"{name} last")

    def check(ctx: Ctx) -> None:
        pid, rid = ctx.ids["pair"]
        person, row = ctx.person_by_id(pid), ctx.row_by_id("leads", rid)
        assert person["lastName"] == row["lastname"] == f"{name} last"
        if side == "marketo":  # never guessed: Dynamics keeps its option, Marketo its label
            assert (person["leadSource"], row["leadsourcecode"]) == ("Carrier Pigeon", 8)
            reason = "Marketo value 'Carrier Pigeon' left alone: label is not in the value map of lead_source"
        else:
            assert (person["leadSource"], row["leadsourcecode"]) == ("Web", 10)
            reason = "Dynamics value 10 left alone: option value has no label in the value map of lead_source"
        skip = ctx.lines("bad-2", pid=pid, action="skip")
        assert skip["field"].tolist() == ["lead_source"] and skip["detail"].iloc[0] == reason
        assert ctx.errors[ctx.errors["person_id"] == pid].empty

    case.change, case.check = change, check
    return case


def _mapped_picklist() -> Case:
    case = Case("picklist_option_with_a_label")
    case.pairs = [pair(case, "lead")]

    def change(ctx: Ctx) -> None:
        ctx.world.set_row("leads", ctx.ids["pair"][1], leadsourcecode=7)

    def check(ctx: Ctx) -> None:
        pid, rid = ctx.ids["pair"]
        assert (ctx.person_by_id(pid)["leadSource"], ctx.row_by_id("leads", rid)["leadsourcecode"]) == ("Trade Show", 7)
        ctx.quiet_afterwards(pid)

    case.change, case.check = change, check
    return case


def _custom(name: str, change, check, pairs=None) -> Case:
    case = Case(name, change=change, check=check)
    if pairs:
        case.pairs = pairs(case)
    return case


def _set_both(m: dict | None = None, d: dict | None = None):
    def change(ctx: Ctx) -> None:
        pid, rid = ctx.ids["pair"]
        if m:
            ctx.world.set_person(pid, **m)
        if d:
            ctx.world.set_row("contacts", rid, **d)
    return change


def _cleared_check(m_name: str, d_name: str):
    def check(ctx: Ctx) -> None:
        pid, rid = ctx.ids["pair"]
        assert pd.isna(ctx.person_by_id(pid)[m_name]) and pd.isna(ctx.row_by_id("contacts", rid)[d_name])
        assert len(ctx.lines("bad-2", pid=pid, action="update")) == 1
        ctx.quiet_afterwards(pid)
    return check


CASES: list[Case] = [
    # characters that mean something in JSON, URLs, OData or CSV, and text that is easy to mangle
    flow("single_quote", "O'Brien-D'Arcy", "last_name", "marketo"),
    flow("double_quote", 'The "Boss"', "job_title", "dynamics"),
    flow("ampersand", "R&D & Sales", "job_title", "marketo"),
    flow("hash", "Team #1 #2", "city", "dynamics"),
    flow("percent", "100% %20 %2F %", "job_title", "marketo"),
    flow("plus", "C++ +49 a+b", "job_title", "dynamics"),
    flow("slash_and_backslash", "Sales/Marketing \\ Ops", "job_title", "marketo"),
    flow("emoji", "🚀 Growth 👩‍💻 🇩🇪", "job_title", "dynamics"),
    flow("cjk", "東京都渋谷区", "city", "marketo"),
    flow("rtl_arabic", "مدير المبيعات", "job_title", "dynamics"),
    flow("rtl_hebrew_with_marks", "\u200fשלום\u200e (HQ)", "city", "marketo"),
    flow("combining_characters", "Jose\u0301 Mu\u0308ller", "last_name", "dynamics"),  # decomposed: not normalised
    flow("leading_and_trailing_spaces", "  Padded  ", "job_title", "marketo"),
    flow("whitespace_only", "   ", "city", "dynamics"),
    flow("newline_and_tab", "Line 1\nLine 2\tTabbed", "street", "marketo"),
    flow("exactly_the_maximum_length", "X" * 100, "job_title", "marketo"),
    flow("looks_like_a_number", "007", "job_title", "dynamics"),
    flow("looks_like_null", "Null", "job_title", "marketo"),
    flow("looks_like_a_boolean", "true", "city", "dynamics", entity="lead"),
    flow("lead_with_quotes_and_ampersand", "O'Hara & \"Sons\"", "company", "dynamics", entity="lead"),
    # too long, invalid, refused
    rejected("over_long_for_dynamics", "contact", "job_title", "T" * 101, "marketo", code="too_long",
             message="value is 101 characters but Dataverse column contacts allows 100; not sent"),
    rejected("over_long_for_marketo", "contact", "role", "N" * 60, "dynamics", code="too_long",
             message="value is 60 characters but the Marketo field allows 50; not sent", base=None),
    _custom("over_long_value_in_a_create", _over_long_create, _check_over_long_create),
    rejected("invalid_email_from_dynamics", "contact", "email", "not an email", "dynamics", code="1001",
             message="Invalid value 'not an email'. Required of type 'email'", base_email=True),
    _custom("invalid_email_in_a_new_record", _invalid_email_new, _check_invalid_email_new),
    rejected("business_rule_pattern", "contact", "phone", "call me maybe", "marketo", code="0x80040265",
             message="Phone numbers hold digits, spaces and + ( ) / - only.", base=None),
    rejected("business_rule_required", "lead", "company", None, "marketo", code="0x80040265",
             message="A lead needs a company.", base="Acme"),
    _custom("business_rule_refuses_a_create", _rule_create, _check_rule_create),
    # null against empty
    _custom("null_against_empty_string", None, None,
            pairs=lambda c: [pair(c, m={"city": None}, d={"address1_city": ""})]),
    _custom("cleared_in_marketo", _set_both(m={"city": None}), _cleared_check("city", "address1_city"),
            pairs=lambda c: [pair(c)]),
    _custom("cleared_in_dynamics", _set_both(d={"jobtitle": None}), _cleared_check("title", "jobtitle"),
            pairs=lambda c: [pair(c)]),
    # picklists
    _picklist_case("picklist_label_with_no_option", "marketo"),
    _picklist_case("picklist_option_with_no_label", "dynamics"),
    _mapped_picklist(),
    # emails: case, spaces, duplicates, ambiguity
    _custom("email_changed_only_in_case", None, _case_only_check, pairs=lambda c: [pair(c)]),
    _custom("email_differs_only_in_case_at_link", _case_at_link, _check_case_at_link),
    _custom("email_with_surrounding_spaces", _spaced_email, _check_spaced_email),
    _custom("two_persons_with_one_email", _twins, _check_twins),
    _custom("two_records_with_one_email", _twin_rows, _check_twin_rows),
    _custom("a_lead_and_a_contact_share_an_email", _lead_and_contact, _check_lead_and_contact),
    _custom("no_email_on_a_new_record", _no_email, _check_no_email),
    # matched values built to change a query
    linked_by_lookup("quote_and_plus_in_a_marketo_lookup", "o'hara+tag@bad.example.com", "marketo"),
    linked_by_lookup("ampersand_hash_percent_in_a_marketo_lookup", "a&b#c%25d@bad.example.com", "marketo"),
    linked_by_lookup("quote_in_an_odata_lookup", "d'arcy@bad.example.com", "dynamics"),
    linked_by_lookup("slash_equals_question_in_an_odata_lookup", "a/b=c?d&e#f@bad.example.com", "dynamics"),
    created_exactly("odata_injection_with_quotes", "x'or'1'eq'1@bad.example.com"),
    created_exactly("odata_injection_with_a_query_option", "x&$filter=true&$top=1@bad.example.com"),
    created_exactly("odata_injection_url_encoded", "x%27%20or%201%20eq%201%27@bad.example.com"),
    _custom("comma_joins_two_existing_emails", _comma_email, _check_comma_email),
    _custom("injection_in_a_marketo_link_field", _garbage_link_field, _check_garbage_link_field),
    _custom("injection_in_the_dynamics_link_column", _garbage_link_column, _check_garbage_link_column),
]
CASE_EMAILS = {c.name: c.email() for c in CASES}
BY_NAME = {c.name: c for c in CASES}
# a case whose change is part of its seed: the email the pair is seeded with differs in case on one side
_case_only = BY_NAME["email_changed_only_in_case"]
_case_only.change = lambda ctx: ctx.world.set_row("contacts", ctx.ids["pair"][1],
                                                  emailaddress1=CASE_EMAILS["email_changed_only_in_case"].upper())
BY_NAME["null_against_empty_string"].check = _null_vs_empty_check(BY_NAME["null_against_empty_string"])


# -- the world: seeds, three cycles, then both sides read once --------------------------------------------------

@pytest.fixture(scope="module")
def world(marketo_sandbox, dataverse_sandbox, tmp_path_factory):
    yield from module_world(marketo_sandbox, dataverse_sandbox, tmp_path_factory, "bad-inputs")


@pytest.fixture(scope="module")
def config_path(world: ModuleWorld) -> Path:
    path = world.tmp / "sync.yaml"
    path.write_text(yaml.safe_dump(module_config(), allow_unicode=True, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def synced(world: ModuleWorld, config_path) -> dict[str, Ctx]:
    world.mp.setenv("MDSYNC_CONFIG", str(config_path))
    ctxs = {c.name: Ctx(world) for c in CASES}
    # every case's pairs, seeded in one call per side and entity set
    seeds = [(c, p) for c in CASES for p in c.pairs]
    for entity in ("contact", "lead"):
        mine = [(c, p) for c, p in seeds if p[1] == entity]
        if not mine:
            continue
        rids = world.dataverse_sandbox.seed(entity + "s", [{"emailaddress1": c.email(p[0]), **p[3]} for c, p in mine])
        pids = world.marketo_sandbox.seed_leads([{"email": c.email(p[0]), **p[2]} for c, p in mine])
        for (c, p), pid, rid in zip(mine, pids, rids):
            ctxs[c.name].ids[p[0]] = (pid, rid)
    alone = [(c, key, person) for c in CASES for key, person in c.persons]
    for (c, key, _), pid in zip(alone, world.marketo_sandbox.seed_leads([p for _, _, p in alone])):
        ctxs[c.name].ids[key] = (pid, None)
    reports = {"bad-1": world.run("bad-1")}
    world.dataverse_sandbox.admin("PUT", "rules", RULES)
    for c in CASES:
        if c.change:
            c.change(ctxs[c.name])
    second = world.cycle("bad-2")
    manifest = world.stages(second, STAGES[:STAGES.index("identify")])
    for c in CASES:
        if c.during:
            c.during(ctxs[c.name])
    manifest = world.stages(second, STAGES[STAGES.index("identify"):], manifest)
    reports["bad-2"] = second.report(manifest)
    second.finish()
    reports["bad-3"] = world.run("bad-3")
    # the end state, read through both APIs once
    now = datetime.now(timezone.utc)
    fields = ["id", "email", "firstName", "lastName", "title", "company", "city", "address", "phone", "leadSource",
              "leadRole", "dynamicsRecordId", "dynamicsRecordType"]
    persons = world.marketo().export_leads(fields, created_at=(now - timedelta(days=1), now + timedelta(minutes=1)),
                                           poll_interval_s=0.1)
    rows = {es: world.dynamics().query(es, cols) for es, cols in {
        "contacts": ["contactid", "emailaddress1", "firstname", "lastname", "jobtitle", "address1_city",
                     "address1_line1", "telephone1", "nickname", "mdsync_marketopersonid"],
        "leads": ["leadid", "emailaddress1", "firstname", "lastname", "jobtitle", "companyname", "address1_city",
                  "leadsourcecode", "mdsync_marketopersonid"]}.items()}
    store = world.store()
    state = {"persons": persons, "rows": rows, "activity": store.activity(), "errors": store.open_errors(),
             "links": store.load_links(), "reports": reports}
    for ctx in ctxs.values():
        for k, v in state.items():
            setattr(ctx, k, v)
    return ctxs


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_a_bad_input_is_synced_exactly_or_refused_with_a_specific_error(synced, name):
    BY_NAME[name].check(synced[name])


def test_nothing_is_duplicated_and_the_last_cycle_wrote_nothing(synced):
    ctx = next(iter(synced.values()))
    emails = ctx.persons["email"].str.lower()
    twins = CASE_EMAILS["two_persons_with_one_email"]
    assert emails[emails != twins].is_unique  # only the case that seeded two persons with one email has two
    rows = pd.concat(ctx.rows.values(), ignore_index=True)
    linked = rows["mdsync_marketopersonid"].dropna()
    assert linked.is_unique and ctx.links["dynamics_id"].str.lower().is_unique
    quiet = ctx.reports["bad-3"]
    assert quiet["written"] == {"dynamics": 0, "marketo": 0} and quiet["created"] == 0


# -- bad config: refused at once, naming the entry, before anything is written ---------------------------------

def _field(config: dict, entity: str, name: str) -> dict:
    return next(f for f in config["entities"][entity]["fields"] if f["name"] == name)


def _mutate(fn):
    def build(tmp: Path) -> Path:
        config = copy.deepcopy(module_config())
        fn(config)
        path = tmp / "bad-sync.yaml"
        path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
        return path
    return build


def _text(text: str):
    def build(tmp: Path) -> Path:
        path = tmp / "bad-sync.yaml"
        path.write_text(text)
        return path
    return build


def _set(path: str, value):
    def fn(config: dict) -> None:
        *parents, last = path.split(".")
        node = config
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    return fn


BAD_CONFIGS = {
    # name: (how the file is made, what the error must say)
    "config_file_missing": (lambda tmp: tmp / "no-such-sync.yaml", "cannot read the sync config"),
    "config_not_yaml": (_text("entities: [lead\n  contact: {"), "not valid YAML"),
    "config_not_a_mapping": (_text("- just\n- a list\n"), "the config must be a mapping at the top level"),
    "unsupported_version": (_mutate(_set("version", 2)), "unsupported config version 2"),
    "unknown_setting_typo": (_mutate(lambda c: c["schedule"].update(full_reconcile_every_hour=24)),
                             "schedule.full_reconcile_every_hour: is not a known setting (typo?)"),
    "unknown_direction": (_mutate(lambda c: _field(c, "lead", "job_title").update(direction="sideways")),
                          "entities.lead.fields[3].direction (job_title): 'sideways' is not one of"),
    "unknown_field_type": (_mutate(lambda c: _field(c, "contact", "city").update(type="text")),
                           "entities.contact.fields[7].type (city): 'text' is not one of"),
    "picklist_not_one_to_one": (_mutate(lambda c: _field(c, "lead", "lead_source")["values"].update({9: "Web"})),
                                "value map is not one-to-one: label 'Web' is mapped from both 8 and 9"),
    "picklist_without_values": (_mutate(lambda c: _field(c, "lead", "lead_source").pop("values")),
                                "a picklist needs a 'values' map"),
    "values_on_a_string_field": (_mutate(lambda c: _field(c, "contact", "city").update(values={1: "Berlin"})),
                                 "'values' is only allowed on picklist fields, not on type 'string'"),
    "collision_winner_missing": (_mutate(lambda c: c["entities"]["contact"].pop("collision_winner")),
                                 "entities.contact.collision_winner (contact): is required but missing"),
    "unknown_entity_type": (_mutate(lambda c: c["entities"].update(account=copy.deepcopy(c["entities"]["contact"]))),
                            "unknown entity type 'account'"),
    "consent_rule_on_a_string": (_mutate(lambda c: _field(c, "lead", "city").update(rule="opt_out_wins")),
                                 "rule 'opt_out_wins' is only for boolean fields"),
    "consent_rule_one_way": (_mutate(lambda c: _field(c, "contact", "email_opt_out").update(direction="to_marketo")),
                             "direction must be 'both', not 'to_marketo'"),
    "field_mapped_twice": (_mutate(lambda c: c["entities"]["contact"]["fields"].append(
        {"name": "title_again", "marketo": "title", "dynamics": "department"})),
        "marketo field 'title' is mapped twice"),
    "no_email_field": (_mutate(lambda c: _field(c, "contact", "email").update(type="string")),
                       "exactly one field of type 'email' is needed"),
    "link_field_synced_as_data": (_mutate(lambda c: c["entities"]["lead"]["fields"].append(
        {"name": "record_id", "marketo": "dynamicsRecordId", "dynamics": "description"})),
        "Marketo field 'dynamicsRecordId' is reserved for marketo.link_fields.dynamics_id"),
    "link_column_synced_as_data": (_mutate(lambda c: c["entities"]["contact"]["fields"].append(
        {"name": "person_id", "marketo": "department", "dynamics": "mdsync_marketopersonid"})),
        "is the link column (dynamics.marketo_id_column)"),
    "unknown_sync_as_default": (_mutate(lambda c: c["marketo"]["sync_marker"].update(default_type="account")),
                                "default_type 'account' is not one of lead, contact"),
    "reconcile_period_not_positive": (_mutate(lambda c: c["schedule"].update(full_reconcile_every_hours=0)),
                                      "schedule.full_reconcile_every_hours"),
    # found when the run describes both sides
    "marketo_field_that_does_not_exist": (
        _mutate(lambda c: _field(c, "contact", "job_title").update(marketo="titel")),
        "entities.contact.fields[3].marketo (job_title): Marketo's lead schema has no field 'titel' (did you mean "
        "'title'?)"),
    "dataverse_column_that_does_not_exist": (
        _mutate(lambda c: _field(c, "lead", "city").update(dynamics="adress1_city")),
        "entities.lead.fields[8].dynamics (city): Dataverse table 'lead' has no column 'adress1_city' (did you mean "
        "'address1_city'?)"),
    "alternate_key_that_does_not_exist": (
        _mutate(_set("dynamics.alternate_key", "mdsync_marketoid_key")),
        "dynamics.alternate_key (lead): Dataverse table 'lead' has no alternate key 'mdsync_marketoid_key' (did you "
        "mean 'mdsync_marketopersonid_key'?)"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_a_bad_config_stops_the_run_at_once_naming_the_entry_and_writes_nothing(world, tmp_path, monkeypatch, name):
    make, expected = BAD_CONFIGS[name]
    path = make(tmp_path)
    monkeypatch.setenv("MDSYNC_CONFIG", str(path))
    monkeypatch.setenv("MDSYNC_SCHEMA_CACHE_MINUTES", "0")  # describe both sides now
    monkeypatch.setenv("MDSYNC_STAGING_URL", f"file://{tmp_path / 'staging'}")
    calls = _writes(world)
    store_rows = len(world.store().activity())

    with pytest.raises(ConfigError) as refused:
        world.run(f"bad-config-{name}")

    message = str(refused.value)
    assert expected in message
    if not name.endswith("does_not_exist"):  # found reading the file: it is named (the schema's are the entry's)
        assert str(path) in message
    assert _writes(world) == calls  # not a single write on either side
    assert len(world.store().activity()) == store_rows
    failed = fail_fast(refused.value)  # at the Airflow boundary: the task fails at once, in one line
    assert isinstance(failed, AirflowFailException) and "\n" not in str(failed) and expected in str(failed)


@pytest.mark.parametrize("status, expected", [
    (None, "Dataverse table 'contact' has no alternate key 'mdsync_marketopersonid_key'; its keys: none"),
    ("Pending", "alternate key 'mdsync_marketopersonid_key' of Dataverse table 'contact' is Pending, not Active"),
    ("Failed", "'Failed': duplicate values in the column stop it"),
])
def test_a_missing_or_inactive_alternate_key_stops_the_run_before_any_write(world, tmp_path, monkeypatch, status,
                                                                             expected):
    """Creates are upserts by the key: without an active one a retried create would duplicate a record."""
    monkeypatch.setenv("MDSYNC_SCHEMA_CACHE_MINUTES", "0")
    monkeypatch.setenv("MDSYNC_STAGING_URL", f"file://{tmp_path / 'staging'}")
    calls = _writes(world)
    world.dataverse_sandbox.admin("PUT", "keys", {"contact": status})
    try:
        with pytest.raises(ConfigError) as refused:
            world.run(f"alternate-key-{status}")
    finally:
        world.dataverse_sandbox.admin("PUT", "keys", {"contact": "Active"})
    assert "dynamics.alternate_key (contact)" in str(refused.value) and expected in str(refused.value)
    assert _writes(world) == calls
    assert isinstance(fail_fast(refused.value), AirflowFailException)


def _writes(world: ModuleWorld) -> dict:
    """Write calls each sandbox has answered (reads and token requests aside)."""
    out = {}
    for side, counts in (("marketo", world.marketo_sandbox.calls()["by_endpoint"]),
                         ("dynamics", world.dataverse_calls())):
        out[side] = sum(n for k, n in counts.items()
                        if not k.startswith("GET") and "token" not in k and "/identity/" not in k)
    return out


BAD_CONNECTIONS = {
    # name: (connection env var, change to its JSON, what the error must say)
    "marketo_connection_without_a_secret": ("AIRFLOW_CONN_MARKETO_DEFAULT", lambda c: c.pop("password"),
                                            "marketo_default"),
    "marketo_connection_with_an_unknown_extra": ("AIRFLOW_CONN_MARKETO_DEFAULT",
                                                 lambda c: c.update(extra={"max_calls_per_windw": 50}),
                                                 "max_calls_per_windw"),
    "dynamics_connection_without_a_tenant": ("AIRFLOW_CONN_DYNAMICS_DEFAULT",
                                             lambda c: c["extra"].pop("tenant_id"), "tenant_id"),
    "dynamics_connection_with_a_bad_timeout": ("AIRFLOW_CONN_DYNAMICS_DEFAULT",
                                               lambda c: c["extra"].update(timeout="soon"), "timeout"),
}


@pytest.mark.parametrize("name", list(BAD_CONNECTIONS))
def test_a_bad_connection_is_refused_naming_the_connection_and_entry_before_any_call(world, monkeypatch, name):
    from mdsync_airflow.hooks.dynamics import DynamicsHook
    from mdsync_airflow.hooks.marketo import MarketoHook

    var, change, expected = BAD_CONNECTIONS[name]
    conn = json.loads(world.marketo_sandbox.connection_json() if "MARKETO" in var
                      else world.dataverse_sandbox.connection_json())
    change(conn)
    monkeypatch.setenv(var, json.dumps(conn))
    hook = MarketoHook() if "MARKETO" in var else DynamicsHook()
    calls = (world.marketo_sandbox.calls()["total"], world.dataverse_sandbox.calls()["total"])

    with pytest.raises(ConfigError) as refused:
        hook.get_client()

    assert expected in str(refused.value) and ("marketo_default" in str(refused.value)
                                               or "dynamics_default" in str(refused.value))
    assert (world.marketo_sandbox.calls()["total"], world.dataverse_sandbox.calls()["total"]) == calls


BAD_RUN_PARAMETERS = {
    # name: (the run's conf, what the one line must say)
    "run_parameter_with_a_typo": ({"person_id": [12]},
                                  "unknown run parameter 'person_id' (did you mean 'person_ids'?)"),
    "run_parameter_not_a_person_id": ({"person_ids": [-3]}, "person_ids[0]: -3"),
    "run_parameter_of_the_wrong_kind": ({"dry_run": "yes"}, "run parameter dry_run: 'yes' is not valid, expected true "
                                                            "or false"),
}


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).dags["marketo_dynamics_sync"]


@pytest.mark.parametrize("name", list(BAD_RUN_PARAMETERS))
def test_a_bad_run_parameter_fails_the_first_task_in_one_line_and_the_run_writes_nothing(world, dag, monkeypatch, name):
    from mdsync_airflow import runtime

    conf, expected = BAD_RUN_PARAMETERS[name]
    monkeypatch.setenv("MDSYNC_LEASE_WAIT_SECONDS", "0")
    ctx = airflow_context(f"manual__{name}", dag=dag, conf=conf, started_at=datetime.now(timezone.utc))
    calls = (world.marketo_sandbox.calls()["total"], world.dataverse_sandbox.calls()["total"])
    runtime.hold_lease(ctx)
    try:
        with pytest.raises(AirflowFailException) as failed:  # no retries: a retry cannot fix a typo
            with runtime.leased_cycle(ctx) as cycle:
                cycle.refresh_schema()
    finally:
        assert runtime.release_lease(ctx)
    assert expected in str(failed.value) and "\n" not in str(failed.value)
    assert (world.marketo_sandbox.calls()["total"], world.dataverse_sandbox.calls()["total"]) == calls
    assert world.store().activity(run_id=ctx["run_id"]).empty

"""OData literal escaping and the filter builder: a value can never change the shape of a query."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from odata_query import ast
from odata_query.grammar import ODataLexer, ODataParser

from mdsync.dynamics import and_, eq, isin, key_segment, odata_literal, or_, startswith
from mdsync.dynamics.odata import column, query_string


def parse(text: str):
    return ODataParser().parse(ODataLexer().tokenize(text))


def test_literals_by_type():
    assert odata_literal(None) == "null"
    assert odata_literal(True) == "true"
    assert odata_literal(42) == "42"
    assert odata_literal("O'Brien") == "'O''Brien'"
    guid = uuid.UUID("0e7b1a2c-1111-2222-3333-444455556666")
    assert odata_literal(guid) == "0e7b1a2c-1111-2222-3333-444455556666"
    when = dt.datetime(2024, 5, 1, 14, 30, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert odata_literal(when) == "2024-05-01T12:30:05Z"


@pytest.mark.parametrize("bad", [dt.datetime(2024, 1, 1), float("nan"), object()])
def test_ambiguous_or_unknown_values_are_refused(bad):
    with pytest.raises((TypeError, ValueError)):
        odata_literal(bad)


@pytest.mark.parametrize("name", ["lastname eq 'x' or 1 eq 1", "a)", "", "x y"])
def test_column_names_cannot_carry_expressions(name):
    with pytest.raises(ValueError, match="not a column name"):
        column(name)


@given(st.text())
def test_any_string_stays_one_literal(value):
    tree = parse(eq("lastname", value))
    assert tree == ast.Compare(ast.Eq(), ast.Identifier("lastname"), ast.String(value))


@given(st.lists(st.text(), min_size=2, max_size=5))
def test_in_list_keeps_every_value(values):
    tree = parse(isin("emailaddress1", values))
    assert isinstance(tree.comparator, ast.In)
    assert [n.val for n in tree.right.val] == values


def test_in_list_of_one_is_an_equality():
    assert parse(isin("emailaddress1", ["a'b"])) == ast.Compare(ast.Eq(), ast.Identifier("emailaddress1"),
                                                                 ast.String("a'b"))


def test_combinators_parenthesise_each_clause():
    text = and_(eq("statecode", 0), or_(eq("lastname", "a' or 'b"), startswith("firstname", "Zoë")))
    assert text == "(statecode eq 0) and ((lastname eq 'a'' or ''b') or (startswith(firstname,'Zoë')))"
    tree = parse(text)
    assert isinstance(tree.op, ast.And)


def test_key_segment_and_query_string_percent_encode_specials():
    assert key_segment("contacts", "mdsync_marketopersonid", "a'b#%&/é") == \
        "contacts(mdsync_marketopersonid='a''b%23%25%26%2F%C3%A9')"
    qs = query_string({"$select": "a,b", "$filter": eq("lastname", "x & y #1 %"), "$top": None})
    assert qs == "$select=a,b&$filter=lastname%20eq%20%27x%20%26%20y%20%231%20%25%27"

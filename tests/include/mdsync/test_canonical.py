"""Canonical values (DESIGN §5) and their conversion back to each API."""

from __future__ import annotations

import pandas as pd

from mdsync.canonical import canonical_frame, canonical_series, compare_key, to_dynamics, to_marketo
from mdsync.config import FieldMap, Side


def _field(type_: str, **kw) -> FieldMap:
    return FieldMap(name="f", marketo="f", dynamics="f", type=type_, **kw)


def test_null_and_empty_string_are_the_same():
    out, problem = canonical_series(pd.Series(["", None, "x"], dtype=object), _field("string"), Side.MARKETO)
    assert out.isna().tolist() == [True, True, False]
    assert problem is None


def test_strings_are_kept_exactly():
    out, _ = canonical_series(pd.Series([" Ann ", "ANN", "Zoë O'Brien"]), _field("string"), Side.MARKETO)
    assert out.tolist() == [" Ann ", "ANN", "Zoë O'Brien"]


def test_email_kept_as_written_but_compared_case_insensitively():
    f = _field("email")
    out, _ = canonical_series(pd.Series(["Ann@Example.COM"]), f, Side.MARKETO)
    assert out.tolist() == ["Ann@Example.COM"]
    assert compare_key(out, f).tolist() == ["ann@example.com"]


def test_numbers_by_value():
    out, problem = canonical_series(pd.Series([12, 12.0, "12.00", "12.5", None, "abc"], dtype=object),
                                    _field("number"), Side.DYNAMICS)
    assert out.tolist()[:4] == ["12", "12", "12", "12.5"]
    assert pd.isna(out.iloc[4]) and pd.isna(out.iloc[5])
    assert problem is not None and problem.values.tolist() == ["abc"] and problem.reason == "not a number"


def test_booleans():
    out, problem = canonical_series(pd.Series([True, False, None]), _field("boolean"), Side.DYNAMICS)
    assert out.tolist()[:2] == ["true", "false"] and pd.isna(out.iloc[2]) and problem is None
    out, problem = canonical_series(pd.Series(["TRUE", "0", "yes", "", "maybe"], dtype=object),
                                    _field("boolean"), Side.MARKETO)
    assert out.tolist()[:3] == ["true", "false", "true"] and pd.isna(out.iloc[3])
    assert problem.values.tolist() == ["maybe"]


def test_datetimes_utc_second_resolution():
    raw = pd.Series(["2026-11-22T03:04:05.987Z", "2026-11-22T04:04:05+01:00", "2026-11-22 03:04:05", "soon"])
    out, problem = canonical_series(raw, _field("datetime"), Side.MARKETO)
    assert out.tolist()[:3] == ["2026-11-22T03:04:05Z"] * 3
    assert problem.values.tolist() == ["soon"]


def test_picklists_through_their_map():
    f = _field("picklist", values={1: "Advertisement", 8: "Web"})
    dyn, problem = canonical_series(pd.Series([8, 1, None, 99], dtype=object), f, Side.DYNAMICS)
    assert dyn.tolist()[:2] == ["Web", "Advertisement"] and dyn.isna().tolist()[2:] == [True, True]
    assert problem.values.tolist() == [99] and "no label" in problem.reason
    mkt, problem = canonical_series(pd.Series(["Web", "", "Billboard"]), f, Side.MARKETO)
    assert mkt.tolist()[0] == "Web" and mkt.isna().tolist()[1:] == [True, True]
    assert problem.values.tolist() == ["Billboard"]
    assert to_dynamics(dyn, f).tolist() == [8, 1, None, None]
    assert to_marketo(dyn, f).tolist() == ["Web", "Advertisement", None, None]


def test_back_to_api_types():
    assert to_dynamics(pd.Series(["true", "false", None], dtype="str"), _field("boolean")).tolist() == [True, False, None]
    assert to_marketo(pd.Series(["12", None], dtype="str"), _field("integer")).tolist() == [12, None]
    assert to_marketo(pd.Series(["12.5"], dtype="str"), _field("number")).tolist() == [12.5]
    assert to_marketo(pd.Series(["x", None], dtype="str"), _field("string")).tolist() == ["x", None]


def test_canonical_frame_renames_and_skips_absent_columns(lead):
    raw = pd.DataFrame({"email": ["a@x.com"], "firstName": [""], "leadSource": ["Web"], "unrelated": [1]}, index=[7])
    out, problems = canonical_frame(raw, lead.fields, Side.MARKETO)
    assert list(out.columns) == ["email", "first_name", "lead_source"]
    assert pd.isna(out.loc[7, "first_name"]) and out.loc[7, "lead_source"] == "Web" and problems == []

"""The Usage API of the Marketo sandbox (usage.md) and ``MarketoClient.usage``, over real HTTP.

``/rest/v1/stats/usage.json`` and ``.../usage/last7days.json`` answer the calls the sandbox counted against its
daily quota (the Usage calls included), by quota day (midnight US Central time) and API user;
``/rest/v1/stats/errors.json`` and ``.../errors/last7days.json`` answer its response-level errors by code.
Every response is checked against the official Swagger spec.
"""

from __future__ import annotations

import sqlite3
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from mdsync.errors import AccessDenied
from sandbox.marketo import MarketoSandbox
from tests.include.sandbox.marketo.test_marketo_sandbox_contract import Api, error_code

USAGE = "/rest/v1/stats/usage.json"
WEEKLY_USAGE = "/rest/v1/stats/usage/last7days.json"
ERRORS = "/rest/v1/stats/errors.json"
WEEKLY_ERRORS = "/rest/v1/stats/errors/last7days.json"


def quota_today() -> date:
    """Today as Marketo's quota counts it (it resets at midnight US Central time)."""
    return datetime.now(ZoneInfo("America/Chicago")).date()


def week(today: date) -> list[str]:
    """The days of a last-7-days answer, newest first."""
    return [(today - timedelta(days=i)).isoformat() for i in range(7)]


def counted_calls(sb: MarketoSandbox) -> int:
    """The sandbox's per-endpoint counts of REST and bulk calls (identity calls are not API calls)."""
    return sum(n for endpoint, n in sb.calls()["by_endpoint"].items()
               if endpoint.split(" ", 1)[1].startswith(("/rest/", "/bulk/")))


@pytest.fixture
def api(marketo):
    caller = Api(marketo)
    yield caller
    assert caller.violations == [], "responses that do not match swagger-mapi.json"


@pytest.fixture
def api_user(api) -> str:
    """The API user the identity service names as the owner of the custom service (its token's scope)."""
    return api.identity().json()["scope"]


def test_daily_usage_counts_every_call_the_usage_calls_included(api, marketo, api_user):
    today = quota_today().isoformat()
    checked_before = api.checked  # the identity answers
    first = api.json("GET", USAGE)
    assert first["success"] is True and first["errors"] == [] and first["warnings"] == []
    assert first["result"] == [{"date": today, "total": 1, "users": [{"userId": api_user, "count": 1}]}]
    api.json("GET", "/rest/v1/leads/describe2.json")
    api.json("GET", "/rest/v1/leads.json", params={"filterType": "email", "filterValues": "nobody@example.com"})
    api.json("GET", "/bulk/v1/leads/export.json")  # bulk calls draw on the same quota
    second = api.json("GET", USAGE)
    assert second["result"] == [{"date": today, "total": 5, "users": [{"userId": api_user, "count": 5}]}]
    assert counted_calls(marketo) == 5
    assert api.checked - checked_before == 5  # every answer was schema-checked


def test_weekly_usage_has_a_row_for_each_of_the_seven_quota_days(api, api_user):
    api.json("GET", "/rest/v1/leads/describe.json")
    api.json("GET", "/rest/v1/leads/describe.json")
    body = api.json("GET", WEEKLY_USAGE)
    days = week(quota_today())
    assert [row["date"] for row in body["result"]] == days
    assert body["result"][0] == {"date": days[0], "total": 3, "users": [{"userId": api_user, "count": 3}]}
    # A fresh sandbox made no calls on the six days before.
    assert body["result"][1:] == [{"date": d, "total": 0, "users": []} for d in days[1:]]
    # The daily answer is the weekly answer's first day, one call (the daily one) later.
    assert api.json("GET", USAGE)["result"][0]["total"] == 4


def test_errors_are_counted_by_code_whoever_answered_them(api, marketo):
    today = quota_today().isoformat()
    assert api.json("GET", ERRORS)["result"] == [{"date": today, "total": 0, "errors": []}]
    # Answered by routes: a path that is no operation (610), a bad batchSize (1003), a missing filterType (701).
    assert error_code(api.json("GET", "/rest/v1/nothing.json")) == "610"
    assert error_code(api.json("GET", "/rest/v1/leads.json", params={
        "filterType": "email", "filterValues": "a@example.com", "batchSize": "0"})) == "1003"
    assert error_code(api.json("GET", "/rest/v1/leads.json", params={"filterValues": "a@example.com"})) == "701"
    # Answered by the front, before the quota counts the call: a bad token (601) and injected faults.
    assert error_code(api.json("GET", "/rest/v1/leads/describe.json", token="not-a-token")) == "601"
    marketo.fault("rate_limit", count=2, path_prefix="/rest/v1/leads/describe.json")
    marketo.fault("access_denied", count=1, path_prefix="/rest/v1/leads/describe2.json")
    assert error_code(api.json("GET", "/rest/v1/leads/describe.json")) == "606"
    assert error_code(api.json("GET", "/rest/v1/leads/describe.json")) == "606"
    assert error_code(api.json("GET", "/rest/v1/leads/describe2.json")) == "603"
    # Successes are not errors; nor is a skipped record inside a successful answer (1004, record-level).
    assert api.json("GET", "/rest/v1/leads/describe.json")["success"] is True
    skipped = api.json("POST", "/rest/v1/leads/delete.json", json={"input": [{"id": 987654}]})
    assert skipped["result"][0]["status"] == "skipped"
    expected = {"date": today, "total": 7, "errors": [
        {"errorCode": "601", "count": 1}, {"errorCode": "603", "count": 1}, {"errorCode": "606", "count": 2},
        {"errorCode": "610", "count": 1}, {"errorCode": "701", "count": 1}, {"errorCode": "1003", "count": 1}]}
    assert api.json("GET", ERRORS)["result"] == [expected]
    weekly = api.json("GET", WEEKLY_ERRORS)["result"]
    days = week(quota_today())
    assert weekly == [expected] + [{"date": d, "total": 0, "errors": []} for d in days[1:]]
    # Calls refused before the quota counted them (601, the injected 606 and 603) are errors but not usage:
    # counted are ERRORS twice, 610, 1003, 701, describe, delete, WEEKLY_ERRORS, and this usage call.
    assert api.json("GET", USAGE)["result"][0]["total"] == 9


def test_counts_persist_across_a_restart_and_the_week_covers_seven_quota_days(tmp_path):
    today = quota_today()
    with MarketoSandbox(tmp_path, daily_quota=3) as sb:
        api = Api(sb)
        for _ in range(3):
            assert api.json("GET", "/rest/v1/leads/describe.json")["success"] is True
        assert error_code(api.json("GET", "/rest/v1/leads/describe.json")) == "607"
        # Usage calls are calls: with the quota used up they are refused too, as on Marketo.
        assert error_code(api.json("GET", USAGE)) == "607"
        assert api.violations == []
    # Calls of earlier days: the sandbox has no clock to turn back, so they are written where it keeps its
    # counters (while it is stopped), one day inside the week and one just outside it.
    with sqlite3.connect(tmp_path / "marketo.sqlite3") as db:
        db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
            (f"api:{today - timedelta(days=1)}", 42), (f"api:{today - timedelta(days=7)}", 99),
            (f"api-errors:{today - timedelta(days=6)}:606", 4), (f"api-errors:{today - timedelta(days=7)}:606", 9)])
    db.close()
    with MarketoSandbox(tmp_path, daily_quota=1000) as sb:
        api = Api(sb)
        user = api.identity().json()["scope"]
        usage = api.json("GET", WEEKLY_USAGE)["result"]
        days = week(today)
        # Today: 3 answered, 2 refused with 607 (counted when they arrived, then refused), and this call.
        assert usage[0] == {"date": days[0], "total": 6, "users": [{"userId": user, "count": 6}]}
        assert usage[1] == {"date": days[1], "total": 42, "users": [{"userId": user, "count": 42}]}
        assert [row["date"] for row in usage] == days and sum(row["total"] for row in usage) == 48
        errors = api.json("GET", WEEKLY_ERRORS)["result"]
        assert errors[0] == {"date": days[0], "total": 2, "errors": [{"errorCode": "607", "count": 2}]}
        assert errors[6] == {"date": days[6], "total": 4, "errors": [{"errorCode": "606", "count": 4}]}
        assert [row["date"] for row in errors] == days and sum(row["total"] for row in errors) == 6
        assert api.violations == []


def test_client_usage_returns_what_the_sandbox_counted(marketo_client, marketo, api_user):
    marketo_client.describe_leads(refresh=True)
    marketo_client.get_leads("email", ["nobody@example.com", "someone@example.com"])
    today = marketo_client.usage()
    assert list(today.columns) == ["date", "total", "user_id", "user_calls"]
    assert today["date"].tolist() == [pd.Timestamp(quota_today())]
    assert today["total"].tolist() == today["user_calls"].tolist() == [counted_calls(marketo)]
    assert today["user_id"].tolist() == [api_user]
    assert str(today["total"].dtype) == "Int64"

    weekly = marketo_client.usage(days=7)
    assert weekly["date"].tolist() == [pd.Timestamp(d) for d in reversed(week(quota_today()))]
    last = weekly.iloc[-1]
    assert last["total"] == today["total"].iloc[0] + 1 == counted_calls(marketo) and last["user_id"] == api_user
    earlier = weekly.iloc[:-1]
    assert earlier["user_id"].isna().all() and (earlier["total"] == 0).all() and (earlier["user_calls"] == 0).all()

    calls = counted_calls(marketo)
    with pytest.raises(ValueError, match=r"days=3"):
        marketo_client.usage(days=3)
    assert counted_calls(marketo) == calls  # refused before anything was sent


def test_client_usage_raises_access_denied_at_once_when_the_subscription_refuses(marketo_client, marketo):
    marketo.fault("access_denied", count=1, path_prefix=USAGE)
    with pytest.raises(AccessDenied) as refused:
        marketo_client.usage()
    assert refused.value.code == "603" and refused.value.request == f"GET {USAGE}"
    # Not retried: one attempt reached the sandbox, so a caller can fall back to its own counts right away.
    stats = marketo.calls()
    assert stats["by_endpoint"][f"GET {USAGE}"] == 1 and stats["injected"] == {"access_denied": 1}
    # The refusal was not counted against the quota; the next ask answers, its own call the only one counted.
    assert marketo_client.usage()["total"].tolist() == [1]

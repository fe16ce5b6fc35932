"""Faults 604 (request time-out), 608 (API temporarily unavailable) and 713 (transient error).

``POST /_sandbox/faults`` with kinds ``request_timeout``, ``api_unavailable`` and ``transient_error``: the next
``count`` calls under ``path_prefix`` answer with Marketo's error envelope (HTTP 200, ``success: false``, the
code and the message of error-codes.md), are not executed and do not count against the rate window or the
daily quota. The engine's client retries them as transient. Every answer is schema-checked.
"""

from __future__ import annotations

import time

import pytest

from tests.include.sandbox.marketo.test_marketo_sandbox_contract import Api

KINDS = {"request_timeout": ("604", "Request time-out"), "api_unavailable": ("608", "API Temporarily Unavailable"),
         "transient_error": ("713", "Transient Error")}


@pytest.fixture
def api(marketo):
    caller = Api(marketo)
    yield caller
    assert caller.violations == [], "responses that do not match swagger-mapi.json"


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_answers_the_documented_envelope_and_the_call_is_not_executed(api, marketo, kind):
    code, message = KINDS[kind]
    quota_before = marketo.calls()
    marketo.fault(kind, count=1, path_prefix="/rest/v1/leads.json")
    failed = api.json("POST", "/rest/v1/leads.json", json={"input": [{"email": f"{kind}@example.com"}]})
    assert failed["success"] is False and failed["errors"] == [{"code": code, "message": message}]
    assert failed["requestId"] and failed["result"] == [] and failed["warnings"] == []
    # Not executed: nobody was created; the next call (the fault used up) goes through.
    query = {"filterType": "email", "filterValues": f"{kind}@example.com"}
    assert api.json("GET", "/rest/v1/leads.json", params=query)["result"] == []
    again = api.json("POST", "/rest/v1/leads.json", json={"input": [{"email": f"{kind}@example.com"}]})
    assert again["result"][0]["status"] == "created"
    stats = marketo.calls()
    assert stats["injected"] == {kind: 1} and quota_before["limited"] == stats["limited"] == {}
    # Another path is not affected by a fault scoped to a prefix.
    marketo.fault(kind, count=1, path_prefix="/rest/v1/activities")
    assert api.json("GET", "/rest/v1/leads/describe.json")["success"] is True
    token = api.json("GET", "/rest/v1/activities/pagingtoken.json", params={"sinceDatetime": "2026-01-01T00:00:00Z"})
    assert token["errors"] == [{"code": code, "message": message}]


def test_a_time_out_answers_after_its_seconds_and_faults_stay_out_of_the_quota(tmp_path):
    from sandbox.marketo import MarketoSandbox

    with MarketoSandbox(tmp_path, daily_quota=3) as sb:
        api = Api(sb)
        sb.fault("request_timeout", count=1, seconds=0.4)
        started = time.monotonic()
        body = api.json("GET", "/rest/v1/leads/describe.json")
        assert body["errors"][0]["code"] == "604" and time.monotonic() - started >= 0.4
        for kind in ("api_unavailable", "transient_error"):
            sb.fault(kind, count=2)
            assert [api.json("GET", "/rest/v1/leads/describe.json")["errors"][0]["code"] for _ in range(2)] == \
                [KINDS[kind][0]] * 2
        # Five failed calls and no quota used: the three the quota allows still go through (error-codes.md).
        assert [api.json("GET", "/rest/v1/leads/describe.json")["success"] for _ in range(3)] == [True] * 3
        assert api.json("GET", "/rest/v1/leads/describe.json")["errors"][0]["code"] == "607"
        assert api.violations == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_engine_client_retries_them_as_transient(marketo, marketo_client, kind):
    from mdsync.errors import ServiceUnavailable

    ids = marketo.seed_leads([{"email": "retry@example.com"}])
    marketo.admin("POST", "/calls/reset")
    marketo.fault(kind, count=2, path_prefix="/rest/v1/leads.json")
    found = marketo_client.get_leads("email", ["retry@example.com"])
    assert found["id"].tolist() == ids
    stats = marketo.calls()
    assert stats["by_endpoint"]["GET /rest/v1/leads.json"] == 3 and stats["injected"] == {kind: 2}
    # One that outlasts the retries stops the call with the code, as a transient failure that persisted.
    marketo.fault(kind, count=100, path_prefix="/rest/v1/leads.json")
    with pytest.raises(ServiceUnavailable) as info:
        marketo_client.get_leads("email", ["retry@example.com"])
    assert info.value.code == KINDS[kind][0]

"""The client under load and faults: limits never hit, storms/5xx/token expiry ridden out, 607 stops clearly.

Faults are injected through the sandbox's admin API; "mid-paging" faults are injected from a requests
response hook the moment the first page arrives, so they strike between pages of a real walk.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
import requests

from mdsync.errors import QuotaExhausted, ServiceError
from mdsync.marketo import MarketoClient
from sandbox.marketo import MarketoSandbox


def client_for(sb, **kw) -> MarketoClient:
    kw = {"retry_initial_s": 0.05, "retry_max_s": 0.5, **kw}
    return MarketoClient(sb.base_url, sb.client_id, sb.client_secret, **kw)


def inject_after_first(session: requests.Session, path: str, action) -> None:
    """Run ``action`` once, right after the first response for ``path`` arrives."""
    fired = threading.Event()

    def hook(resp, *args, **kwargs):
        if path in resp.url and not fired.is_set():
            fired.set()
            action()

    session.hooks["response"].append(hook)


@pytest.fixture(scope="module")
def tight_sandbox(tmp_path_factory):
    """A sandbox with small limits (20 calls / 2 s, 3 concurrent) so load tests take seconds, not minutes."""
    with MarketoSandbox(tmp_path_factory.mktemp("marketo-tight"), rate_limit=(20, 2), max_concurrent=3) as sb:
        yield sb


def test_parallel_load_stays_under_rate_and_concurrency_limits(tight_sandbox):
    sb = tight_sandbox
    sb.reset()
    ids = sb.seed_leads([{"email": f"load{i}@example.com"} for i in range(30)])
    # Every call is slowed down so that requests really overlap at the service.
    sb.fault("delay", count=1000, seconds=0.05, path_prefix="/rest/")
    client = client_for(sb, max_calls_per_window=20, window_s=2, max_concurrent=3)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        frames = list(pool.map(lambda i: client.get_leads("id", [i], fields=["email"]), ids * 2))
    elapsed = time.monotonic() - started
    stats = sb.calls()
    assert [f["id"].tolist() for f in frames] == [[i] for i in ids * 2]
    assert stats["limited"] == {}, "the service had to refuse calls (606/615)"
    assert 2 <= stats["peak_concurrency"] <= 3
    rest_calls = sum(n for k, n in stats["by_endpoint"].items() if " /rest/" in k)
    assert rest_calls == 61 == client.calls_made - 1  # 60 lookups + describe; plus one identity call
    # 61 calls at 20 per (widened) 2 s window cannot finish in less than three windows.
    assert elapsed > 3 * 2


def test_rate_limit_storm_mid_paging_loses_and_duplicates_nothing(marketo, marketo_client, caplog):
    ids = marketo.seed_leads([{"email": f"s{i}@example.com", "dynamicsSyncAs": "lead"} for i in range(900)])
    inject_after_first(marketo_client.session, "/rest/v1/leads.json",
                       lambda: marketo.fault("rate_limit", count=4, path_prefix="/rest/v1/leads"))
    with caplog.at_level(logging.WARNING, logger="mdsync.marketo"):
        leads = marketo_client.get_leads("dynamicsSyncAs", ["lead"], fields=["email"])
    assert leads["id"].tolist() == ids
    assert marketo.calls()["injected"] == {"rate_limit": 4}
    assert sum("606" in r.getMessage() for r in caplog.records) == 4


def test_server_errors_and_concurrency_refusals_mid_paging_are_retried(marketo, marketo_client):
    ids = marketo.seed_leads([{"email": f"e{i}@example.com", "firstName": "A"} for i in range(700)])
    token = marketo_client.get_paging_token(datetime.now(timezone.utc) - timedelta(seconds=5))
    marketo_client.sync_leads([{"email": f"e{i}@example.com", "firstName": "B"} for i in range(700)])

    def storm():
        marketo.fault("server_error", count=2, path_prefix="/rest/v1/activities")
        marketo.fault("concurrency", count=1, path_prefix="/rest/v1/activities")

    inject_after_first(marketo_client.session, "leadchanges.json", storm)
    changes, _ = marketo_client.get_lead_changes(token, ["firstName"])
    assert sorted(changes["lead_id"].tolist()) == ids and changes["id"].is_unique
    assert marketo.calls()["injected"] == {"server_error": 2, "concurrency": 1}


def test_token_expiry_mid_paging_reauthenticates_once_and_continues(marketo, marketo_client):
    ids = marketo.seed_leads([{"email": f"t{i}@example.com", "dynamicsRecordType": "contact"} for i in range(650)])
    seen: list[str] = []
    client = client_for(marketo, token_listener=seen.append)
    inject_after_first(client.session, "/rest/v1/leads.json", lambda: marketo.fault("expire_tokens"))
    leads = client.get_leads("dynamicsRecordType", ["contact"], fields=["email"])
    assert leads["id"].tolist() == ids
    assert len(seen) == 2 and seen[0] != seen[1]
    by_endpoint = marketo.calls()["by_endpoint"]
    assert by_endpoint["POST /identity/oauth/token"] == 2
    assert by_endpoint["GET /rest/v1/leads.json"] == 4  # 3 pages + the one refused with 602


def test_token_is_renewed_before_it_expires(tmp_path):
    with MarketoSandbox(tmp_path, token_ttl_s=2) as sb:
        seen: list[str] = []
        client = client_for(sb, token_listener=seen.append)
        refused = []
        client.session.hooks["response"].append(
            lambda r, *a, **k: refused.append(r.json()) if "/rest/" in r.url and not r.json()["success"] else None)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            client.describe_leads(refresh=True)
            time.sleep(0.2)
        assert refused == [] and len(set(seen)) >= 2


def test_daily_quota_stops_with_the_reset_time(marketo, marketo_client):
    marketo_client.describe_leads()
    marketo.fault("quota_exhausted", count=1)
    with pytest.raises(QuotaExhausted) as err:
        marketo_client.get_leads("email", ["a@example.com"])
    exc = err.value
    assert exc.code == "607" and exc.resets_at > datetime.now(timezone.utc)
    assert exc.resets_at.isoformat() in str(exc) and "GET /rest/v1/leads.json" in str(exc)
    assert marketo.calls()["by_endpoint"]["GET /rest/v1/leads.json"] == 1  # not retried


def test_real_quota_exhaustion_is_not_retried(tmp_path):
    with MarketoSandbox(tmp_path, daily_quota=2) as sb:
        client = client_for(sb)
        client.describe_leads()
        client.get_leads("email", ["a@example.com"])
        with pytest.raises(QuotaExhausted):
            client.get_leads("email", ["b@example.com"])
        assert sb.calls()["limited"] == {"607": 1} and client.calls_made == 4


def test_request_errors_are_not_retried(marketo, marketo_client):
    marketo_client.describe_leads()
    with pytest.raises(ServiceError) as err:
        marketo_client.get_leads("firstName", ["Ann"])  # 1011: not a searchable field
    assert err.value.code == "1011" and "firstName" in str(err.value)
    with pytest.raises(ServiceError) as bad_json:
        marketo_client._call("POST", "/rest/v1/leads.json", data=b"{not json", headers={"Content-Type": "application/json"})
    assert bad_json.value.code == "609"
    by_endpoint = marketo.calls()["by_endpoint"]
    assert by_endpoint["GET /rest/v1/leads.json"] == 1 and by_endpoint["POST /rest/v1/leads.json"] == 1


def test_persistent_failure_gives_up_with_a_clear_error(marketo):
    client = client_for(marketo, max_attempts=3)
    marketo.fault("server_error", count=10, path_prefix="/rest/v1/leads/describe2")
    with pytest.raises(ServiceError) as err:
        client.describe_leads()
    assert "after 3 attempts" in str(err.value) and err.value.status == 502
    assert marketo.calls()["injected"] == {"server_error": 3}


def test_slow_response_times_out_and_is_retried(marketo):
    ids = marketo.seed_leads([{"email": f"slow{i}@example.com"} for i in range(3)])
    client = client_for(marketo, timeout=(2, 0.5))
    client.describe_leads()
    marketo.fault("delay", count=1, seconds=1.5, path_prefix="/rest/v1/leads.json")
    leads = client.get_leads("id", ids, fields=["email"])
    assert leads["id"].tolist() == ids
    assert marketo.calls()["by_endpoint"]["GET /rest/v1/leads.json"] == 2

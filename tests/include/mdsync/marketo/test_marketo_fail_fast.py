"""Errors no retry can fix stop at once with one line naming the connection and what to do; transient ones keep
their backoff. Against the sandbox over real HTTP; every "not retried" is a call count."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from mdsync.errors import AccessDenied, AuthError, QuotaExhausted, ServiceError, ServiceUnavailable, is_retryable
from mdsync.marketo import MarketoClient
from mdsync.marketo.client import CENTRAL
from tests.fixtures.ports import closed_port


def client_for(sb, secret=None, **kw) -> MarketoClient:
    kw = {"retry_initial_s": 0.01, "retry_max_s": 0.05, **kw}
    return MarketoClient(sb.base_url, sb.client_id, secret or sb.client_secret, **kw)


def identity_calls(sb) -> int:
    return sb.calls()["by_endpoint"].get("POST /identity/oauth/token", 0)


def test_a_wrong_secret_fails_at_once_naming_the_connection_without_the_secret(marketo):
    client = client_for(marketo, secret="wrong-secret-value", connection_id="marketo_default")
    with pytest.raises(AuthError) as err:
        client.describe_leads()
    text = str(err.value)
    assert text.startswith(f"Marketo connection 'marketo_default' ({marketo.base_url}): error unauthorized (HTTP 401): "
                           "identity refused the client credentials: Bad client credentials")
    assert f"check the connection's login (client id '{marketo.client_id}') and password" in text
    assert "not retried" in text and "wrong-secret-value" not in text and "\n" not in text
    assert not is_retryable(err.value)
    assert identity_calls(marketo) == 1 and client.calls_made == 1


def test_the_daily_quota_at_identity_is_a_quota_stop_not_bad_credentials(marketo):
    marketo.fault("quota_exhausted", count=5, path_prefix="/identity/")
    client = client_for(marketo)
    with pytest.raises(QuotaExhausted) as err:
        client.describe_leads()
    text = str(err.value)
    assert "client credentials" not in text and "client id" not in text
    assert "Daily quota reached: the subscription's daily API quota is used up" in text
    assert "the quota resets at midnight US Central time" in text and err.value.resets_at.isoformat() in text
    assert "Nothing is lost: no watermark moved, so the first run after the reset picks up this window" in text
    assert not is_retryable(err.value)
    assert identity_calls(marketo) == 1 and marketo.calls()["injected"] == {"quota_exhausted": 1}


def test_the_quota_resets_at_the_next_midnight_us_central_time(marketo, marketo_client):
    marketo_client.describe_leads()
    marketo.fault("quota_exhausted", count=3, path_prefix="/rest/v1/leads.json")
    before = datetime.now(timezone.utc)
    with pytest.raises(QuotaExhausted) as err:
        marketo_client.get_leads("email", ["a@example.com"])
    resets = err.value.resets_at
    local = resets.astimezone(CENTRAL)
    assert (local.hour, local.minute, local.second) == (0, 0, 0)
    assert timedelta(0) < resets - before <= timedelta(hours=25)
    assert local.strftime("%Y-%m-%d 00:00 %Z") in str(err.value)  # said in Central time too (CST or CDT)
    assert marketo.calls()["by_endpoint"]["GET /rest/v1/leads.json"] == 1


def test_missing_permission_603_is_not_retried_and_says_which_role(marketo):
    marketo.fault("access_denied", count=5, path_prefix="/rest/v1/leads/describe2")
    client = client_for(marketo, connection_id="marketo_default")
    with pytest.raises(AccessDenied) as err:
        client.describe_leads()
    assert str(err.value).startswith("Marketo connection 'marketo_default'") and "error 603" in str(err.value)
    assert "Admin > Users & Roles" in str(err.value) and not is_retryable(err.value)
    assert marketo.calls()["by_endpoint"]["GET /rest/v1/leads/describe2.json"] == 1


@pytest.mark.parametrize("kind", ["rate_limit", "concurrency", "server_error"])
def test_transient_refusals_of_the_identity_call_keep_their_backoff(marketo, kind):
    marketo.fault(kind, count=2, path_prefix="/identity/")
    client = client_for(marketo)
    assert not client.describe_leads().empty
    assert identity_calls(marketo) == 3 and marketo.calls()["injected"] == {kind: 2}


def test_persistent_5xx_gives_up_after_the_backoff_and_leaves_the_retry_to_airflow(marketo):
    marketo.fault("server_error", count=10, path_prefix="/rest/v1/leads/describe2")
    client = client_for(marketo, max_attempts=3, connection_id="marketo_default")
    with pytest.raises(ServiceUnavailable) as err:
        client.describe_leads()
    assert is_retryable(err.value) and "still failing after 3 attempts" in str(err.value)
    assert str(err.value).startswith("Marketo connection 'marketo_default'")
    assert marketo.calls()["injected"] == {"server_error": 3}


def test_a_refused_connection_names_the_host_not_the_requests_exception():
    url = f"http://127.0.0.1:{closed_port()}"
    client = MarketoClient(url, "id", "secret", max_attempts=3, retry_initial_s=0.01, retry_max_s=0.02,
                           connection_id="marketo_default")
    with pytest.raises(ServiceUnavailable) as err:
        client.describe_leads()
    text = str(err.value)
    assert text.startswith(f"Marketo connection 'marketo_default' ({url}): error transport: {url} refused the "
                           "connection")
    assert "still failing after 3 attempts" in text and "[POST /identity/oauth/token]" in text
    assert "HTTPConnectionPool" not in text and "Errno" not in text and "secret" not in text
    assert client.calls_made == 3  # backed off and retried: a refused connection may be a restart


def test_a_host_name_that_does_not_resolve_is_not_retried():
    client = MarketoClient("https://123-abc-456.mktorest.invalid", "id", "secret", max_attempts=5,
                           retry_initial_s=0.01, connection_id="marketo_default")
    with pytest.raises(ServiceError) as err:
        client.describe_leads()
    assert "the host name of https://123-abc-456.mktorest.invalid was not found (DNS)" in str(err.value)
    assert "check the connection's host" in str(err.value) and not is_retryable(err.value)
    assert client.calls_made == 1


def test_a_read_time_out_names_the_timeout_and_is_retried(marketo):
    client = client_for(marketo, timeout=(2, 0.2), max_attempts=3)
    client.auth.token()
    marketo.fault("delay", count=3, seconds=1.0, path_prefix="/rest/v1/leads/describe2")
    with pytest.raises(ServiceUnavailable) as err:
        client.describe_leads()
    assert f"{marketo.base_url} did not answer within 0.2 s (read time-out)" in str(err.value)
    assert marketo.calls()["by_endpoint"]["GET /rest/v1/leads/describe2.json"] == 3

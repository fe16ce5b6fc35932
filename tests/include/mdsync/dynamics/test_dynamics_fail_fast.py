"""Errors no retry can fix stop at once, naming the connection and the authority; transient ones keep their
backoff. Real HTTPS to the sandbox, real MSAL; "not retried" is a call count."""

from __future__ import annotations

import pytest

from mdsync.dynamics import DynamicsClient
from mdsync.errors import AuthError, ServiceError, ServiceUnavailable, is_retryable
from tests.fixtures.ports import closed_port


def client_for(sb, *, secret=None, authority=None, verify=None, **kw) -> DynamicsClient:
    kw = {"backoff_s": 0.01, "connection_id": "dynamics_default", **kw}
    return DynamicsClient(sb.org_url, sb.client_id, secret or sb.client_secret, sb.tenant_id,
                          authority=authority or sb.authority, verify=sb.ca_bundle if verify is None else verify, **kw)


def token_calls(sb) -> int:
    return sum(n for k, n in sb.calls()["by_endpoint"].items() if k.endswith("/oauth2/v2.0/token"))


def who_am_i_fails(client, error: type) -> ServiceError:
    """The error a WhoAmI call ends in (after the client's own retries, if any)."""
    with pytest.raises(error) as err:
        client.request("GET", "WhoAmI")
    return err.value


def web_api_calls(sb) -> int:
    return sum(n for k, n in sb.calls()["by_endpoint"].items() if "/api/data/" in k)


def test_a_wrong_secret_fails_at_once_naming_the_connection_and_authority(dataverse):
    client = client_for(dataverse, secret="not-the-secret")
    err = who_am_i_fails(client, AuthError)
    text = str(err)
    assert text.startswith(f"Dynamics connection 'dynamics_default' ({dataverse.org_url}): error invalid_client: "
                           f"the authority {dataverse.authority} refused the credentials: AADSTS7000215")
    assert "check the connection's login (client id" in text and "not retried" in text
    assert "not-the-secret" not in text and not is_retryable(err)
    assert token_calls(dataverse) == 1 and web_api_calls(dataverse) == 0


def test_an_unknown_tenant_is_named_not_msals_discovery_error(dataverse):
    client = client_for(dataverse, authority=f"{dataverse.org_url}/00000000-0000-0000-0000-000000000000")
    err = who_am_i_fails(client, AuthError)
    text = str(err)
    assert f"the authority {dataverse.org_url}/00000000-0000-0000-0000-000000000000 has no OpenID configuration" in text
    assert "extra.tenant_id" in text and "well-known" not in text and "Unable to get authority" not in text
    assert token_calls(dataverse) == 0 and web_api_calls(dataverse) == 0


def test_an_unreachable_authority_names_the_connection_and_the_authority_after_the_backoff(dataverse):
    authority = f"https://127.0.0.1:{closed_port()}/{dataverse.tenant_id}"
    client = client_for(dataverse, authority=authority, max_attempts=3)
    err = who_am_i_fails(client, ServiceUnavailable)
    text = str(err)
    assert text.startswith(f"Dynamics connection 'dynamics_default' ({dataverse.org_url}): error transport: "
                           f"the authority {authority} refused the connection")
    assert "still failing after 3 attempts" in text and "extra.authority" in text
    for raw in ("ConnectionError", "HTTPSConnectionPool", "openid-configuration", "Errno"):
        assert raw not in text
    assert is_retryable(err) and client.calls_made == 0 and web_api_calls(dataverse) == 0


def test_an_untrusted_certificate_is_not_retried_and_points_at_verify(dataverse):
    client = client_for(dataverse, verify=True, max_attempts=5)  # the system CAs do not know the sandbox's CA
    err = who_am_i_fails(client, ServiceError)
    text = str(err)
    assert f"the TLS certificate of the authority {dataverse.authority} is not trusted" in text
    assert "extra.verify" in text and not is_retryable(err)
    assert token_calls(dataverse) == 0 and web_api_calls(dataverse) == 0


def test_the_timeout_applies_and_a_slow_answer_is_retried_then_named(dataverse):
    client = client_for(dataverse, timeout=(5, 0.2), max_attempts=3)
    client.request("GET", "WhoAmI")
    dataverse.fault("delay", count=3, seconds=1.0, path_prefix="/api/data/v9.2/WhoAmI")
    text = str(who_am_i_fails(client, ServiceUnavailable))
    assert f"{dataverse.org_url} did not answer within 0.2 s (read time-out)" in text
    assert "still failing after 3 attempts" in text
    assert dataverse.calls()["by_endpoint"]["GET /api/data/v9.2/WhoAmI"] == 4  # 1 + 3 attempts


def test_a_slow_answer_within_the_timeout_is_fine(dataverse):
    client = client_for(dataverse, timeout=(5, 3))
    dataverse.fault("delay", count=1, seconds=0.3, path_prefix="/api/data/v9.2/WhoAmI")
    assert client.request("GET", "WhoAmI").json()["UserId"]
    assert dataverse.calls()["by_endpoint"]["GET /api/data/v9.2/WhoAmI"] == 1


def test_a_missing_permission_is_not_retried_and_says_what_to_grant(dataverse):
    from mdsync.dynamics import eq
    from mdsync.errors import AccessDenied

    dataverse.seed("contacts", [{"lastname": "Sec", "mobilephone": "+1 555"}])
    dataverse.admin("PUT", "security", {"secured_columns": {"contact": ["mobilephone"]}, "readable": {},
                                        "updatable": {}})
    client = client_for(dataverse, max_attempts=5)
    with pytest.raises(AccessDenied) as err:  # filtering on a column the sync user may not read: 403
        client.query("contacts", ["lastname"], filter=eq("mobilephone", "+1 555"))
    text = str(err.value)
    assert text.startswith(f"Dynamics connection 'dynamics_default' ({dataverse.org_url}): error ")
    assert "(HTTP 403)" in text and "grant the sync user's security role" in text and not is_retryable(err.value)
    assert dataverse.calls()["by_endpoint"]["GET /api/data/v9.2/contacts"] == 1


# -- the identity service down for a while: retried, and named when it stays down --------------------------------

def test_a_503_burst_on_the_token_endpoint_is_ridden_out(dataverse):
    dataverse.fault("unavailable", count=2, seconds=0, path_prefix=f"/{dataverse.tenant_id}/oauth2/v2.0/token")
    client = client_for(dataverse, max_attempts=4)
    assert client.request("GET", "WhoAmI").json()["UserId"]
    assert token_calls(dataverse) == 3 and web_api_calls(dataverse) == 1


def test_a_token_endpoint_that_stays_down_is_a_transient_error_naming_the_authority(dataverse):
    dataverse.fault("unavailable", count=50, seconds=0, path_prefix=f"/{dataverse.tenant_id}/oauth2/v2.0/token")
    client = client_for(dataverse, max_attempts=3)
    err = who_am_i_fails(client, ServiceUnavailable)
    text = str(err)
    assert f"the authority {dataverse.authority} answered HTTP 503 to a token request" in text
    assert "MsalServiceError" not in text and "still failing after 3 attempts" in text
    assert is_retryable(err) and token_calls(dataverse) == 3 and web_api_calls(dataverse) == 0


@pytest.mark.parametrize("kind, status", [("throttle", 429), ("unavailable", 503)])
def test_a_throttled_or_failing_discovery_is_retried_not_taken_for_a_wrong_tenant(dataverse, kind, status):
    prefix = f"/{dataverse.tenant_id}/v2.0/.well-known/"
    dataverse.fault(kind, count=1, seconds=0, path_prefix=prefix)
    assert client_for(dataverse, max_attempts=3).request("GET", "WhoAmI").status_code == 200  # ridden out
    dataverse.fault(kind, count=50, seconds=0, path_prefix=prefix)
    err = who_am_i_fails(client_for(dataverse, max_attempts=2), ServiceUnavailable)
    assert f"the authority {dataverse.authority} answered HTTP {status} to its OpenID discovery" in str(err)
    assert "no OpenID configuration" not in str(err) and is_retryable(err)

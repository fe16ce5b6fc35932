"""Faults on the sandbox's Entra ID endpoints (token, OpenID discovery, instance discovery), seen through
unmodified MSAL and as raw HTTP: the answers Entra ID gives (429 / 503 / 500 with the AADSTS error body and
``Retry-After``), and a fault without a path prefix still reaching only the Web API."""

from __future__ import annotations

import time

import msal
import pytest
import requests

from tests.include.sandbox.dataverse.test_dataverse_sandbox import Api


def _session(sb) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = sb.ca_bundle
    return session


def msal_app(sb, **kw) -> msal.ConfidentialClientApplication:
    """A fresh MSAL confidential client (own HTTP client, so none of MSAL's caches carry over)."""
    kw.setdefault("instance_discovery", False)
    return msal.ConfidentialClientApplication(sb.client_id, client_credential=sb.client_secret,
                                              authority=sb.authority, http_client=_session(sb), **kw)


def token_calls(sb) -> int:
    return sb.calls()["by_endpoint"].get(f"POST /{sb.tenant_id}/oauth2/v2.0/token", 0)


def scopes(sb) -> list[str]:
    return [sb.org_url + "/.default"]


def test_a_throttled_token_request_is_msals_error_and_its_retry_after_is_honoured(dataverse):
    app = msal_app(dataverse)  # discovery done before the fault
    dataverse.admin("POST", "calls/reset")
    dataverse.fault("throttle", count=1, seconds=30, path_prefix=f"/{dataverse.tenant_id}/oauth2/v2.0/token")
    result = app.acquire_token_for_client(scopes(dataverse))
    assert "access_token" not in result
    assert result["error"] == "temporarily_unavailable" and result["error_codes"] == [90024]
    assert result["error_description"].startswith("AADSTS90024: ")
    # MSAL keeps a 429 for its Retry-After: the same request again is answered without calling the service
    again = app.acquire_token_for_client(scopes(dataverse))
    assert again["error"] == "temporarily_unavailable"
    assert token_calls(dataverse) == 1
    fresh = msal_app(dataverse).acquire_token_for_client(scopes(dataverse))
    assert "access_token" in fresh and token_calls(dataverse) == 2


def test_token_endpoint_faults_answer_as_entra_id_does(dataverse):
    endpoint = f"{dataverse.authority}/oauth2/v2.0/token"
    form = {"grant_type": "client_credentials", "client_id": dataverse.client_id,
            "client_secret": dataverse.client_secret, "scope": dataverse.org_url + "/.default"}
    prefix = f"/{dataverse.tenant_id}/oauth2/v2.0/token"
    dataverse.fault("throttle", count=1, seconds=7, path_prefix=prefix)
    dataverse.fault("unavailable", count=1, seconds=3, path_prefix=prefix)
    dataverse.fault("server_error", count=1, path_prefix=prefix)
    with _session(dataverse) as s:
        answers = [s.post(endpoint, data=form) for _ in range(4)]
    throttled, unavailable, failed, served = answers
    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "7")
    assert (unavailable.status_code, unavailable.headers["Retry-After"]) == (503, "3")
    assert failed.status_code == 500 and "Retry-After" not in failed.headers
    for resp, error, code in ((throttled, "temporarily_unavailable", 90024),
                              (unavailable, "temporarily_unavailable", 90033), (failed, "server_error", 50000)):
        body = resp.json()
        assert body["error"] == error and body["error_codes"] == [code]
        assert body["error_description"].startswith(f"AADSTS{code}: ")
        assert body["error_uri"] == f"https://login.microsoftonline.com/error?code={code}"
        assert {"timestamp", "trace_id", "correlation_id"} <= set(body)
    assert served.status_code == 200 and served.json()["token_type"] == "Bearer"


def test_a_503_from_the_token_endpoint_raises_out_of_msal(dataverse):
    app = msal_app(dataverse)
    dataverse.fault("unavailable", count=1, seconds=1, path_prefix=f"/{dataverse.tenant_id}/oauth2/")
    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):
        app.acquire_token_for_client(scopes(dataverse))
    assert "access_token" in msal_app(dataverse).acquire_token_for_client(scopes(dataverse))


def test_openid_discovery_faults_stop_msal_from_building_its_client(dataverse):
    prefix = f"/{dataverse.tenant_id}/v2.0/.well-known/openid-configuration"
    dataverse.fault("throttle", count=1, seconds=5, path_prefix=prefix)
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        msal_app(dataverse)  # a 4xx from discovery: MSAL's "no such authority"
    dataverse.fault("unavailable", count=1, seconds=5, path_prefix=prefix)
    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):
        msal_app(dataverse)
    assert "access_token" in msal_app(dataverse).acquire_token_for_client(scopes(dataverse))


def test_instance_discovery_is_answered_and_can_fail(dataverse):
    discovery = f"{dataverse.org_url}/common/discovery/instance"
    with _session(dataverse) as s:
        known = s.get(discovery, params={"api-version": "1.1", "authorization_endpoint":
                                         f"{dataverse.authority}/oauth2/v2.0/authorize"})
        unknown = s.get(discovery, params={"api-version": "1.1", "authorization_endpoint":
                                           f"https://elsewhere.example/{dataverse.tenant_id}/oauth2/v2.0/authorize"})
    assert known.json()["tenant_discovery_endpoint"] == (f"{dataverse.authority}/v2.0/.well-known/"
                                                         "openid-configuration")
    assert unknown.status_code == 400 and unknown.json()["error"] == "invalid_instance"
    assert unknown.json()["error_codes"] == [50049]
    validated = msal_app(dataverse, instance_discovery=discovery)
    assert "access_token" in validated.acquire_token_for_client(scopes(dataverse))
    dataverse.fault("unavailable", count=1, seconds=5, path_prefix="/common/discovery/instance")
    with pytest.raises(KeyError, match="tenant_discovery_endpoint"):  # MSAL reads the error as a payload
        msal_app(dataverse, instance_discovery=discovery)


def test_a_delayed_token_request_is_served_late(dataverse):
    app = msal_app(dataverse)
    dataverse.fault("delay", count=1, seconds=0.4, path_prefix=f"/{dataverse.tenant_id}/oauth2/v2.0/token")
    started = time.monotonic()
    assert "access_token" in app.acquire_token_for_client(scopes(dataverse))
    assert time.monotonic() - started >= 0.4


def test_a_fault_without_a_prefix_still_hits_only_the_web_api(dataverse):
    dataverse.fault("throttle", count=1, seconds=2)
    dataverse.fault("unavailable", count=1, seconds=4, path_prefix=None)
    api = Api(dataverse)  # discovery and the token request go through
    throttled = api("GET", "WhoAmI")
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "2"
    unavailable = api("GET", "WhoAmI")
    assert unavailable.status_code == 503 and unavailable.headers["Retry-After"] == "4"
    assert unavailable.json()["error"]["code"] == "0x80040216"
    assert api("GET", "WhoAmI").status_code == 200


def test_a_fault_prefix_must_be_a_path(dataverse):
    with pytest.raises(requests.HTTPError) as info:
        dataverse.fault("throttle", path_prefix="oauth2/v2.0/token")
    assert info.value.response.status_code == 400
    assert "path_prefix must be a path starting with '/'" in info.value.response.json()["error"]["message"]

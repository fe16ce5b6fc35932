"""The hooks read a connection strictly: a missing field, an unknown extra key or a value of the wrong kind is one
line naming the connection and the entry; extra.timeout reaches the client; errors name the connection id."""

from __future__ import annotations

import json

import pytest

from mdsync.errors import AuthError, ConfigError, ServiceUnavailable
from mdsync_airflow.hooks.dynamics import DynamicsHook
from mdsync_airflow.hooks.marketo import MarketoHook
from tests.fixtures.ports import closed_port


def marketo_conn(monkeypatch, sb=None, **changes) -> None:
    conn = json.loads(sb.connection_json()) if sb else {"conn_type": "http", "host": "https://1-a-2.mktorest.com",
                                                        "login": "client-id", "password": "client-secret"}
    conn.update(changes)
    monkeypatch.setenv("AIRFLOW_CONN_MARKETO_DEFAULT", json.dumps(conn))


def dynamics_conn(monkeypatch, sb, extra=None, **changes) -> None:
    conn = json.loads(sb.connection_json())
    conn["extra"].update(extra or {})
    conn.update(changes)
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", json.dumps(conn))


# -- reading the connection (no service needed) ----------------------------------------------------------

@pytest.mark.parametrize(("timeout", "expected"), [(30, 30.0), ("45", 45.0), ([5, 60], (5.0, 60.0)), (None, (10.0, 120.0))])
def test_marketo_extra_timeout_reaches_the_client(monkeypatch, timeout, expected):
    marketo_conn(monkeypatch, extra={} if timeout is None else {"timeout": timeout})
    assert MarketoHook().get_client().timeout == expected


@pytest.mark.parametrize(("extra", "message"), [
    ({"timeout": "fast"}, "Airflow connection 'marketo_default': extra.timeout 'fast' is not a number of seconds or "
                          "[connect, read] seconds (e.g. 30 or [10, 120])"),
    ({"timeout": [10, 0]}, "extra.timeout [10, 0] is not a number of seconds"),
    ({"timout": 30}, "Airflow connection 'marketo_default': unknown extra 'timout' (did you mean 'timeout'?); the "
                     "known keys are max_calls_per_window, window_s, max_concurrent, timeout, verify, verify_ssl"),
    ({"max_calls_per_window": "fifty"}, "extra.max_calls_per_window 'fifty' is not a positive whole number"),
    ({"max_concurrent": 2.5}, "extra.max_concurrent 2.5 is not a positive whole number"),
    ({"verify": 3}, "extra.verify 3 is not true, false or the path of a CA bundle"),
])
def test_marketo_bad_extras_are_one_line_naming_the_entry(monkeypatch, extra, message):
    marketo_conn(monkeypatch, extra=extra)
    with pytest.raises(ConfigError) as err:
        MarketoHook().get_client()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_marketo_missing_fields_and_an_undefined_connection_are_named(monkeypatch):
    marketo_conn(monkeypatch, password=None, login="")
    with pytest.raises(ConfigError, match=r"^Airflow connection 'marketo_default' lacks login \(the client id\), "
                                          r"password \(the client secret\)$"):
        MarketoHook().get_client()
    with pytest.raises(ConfigError, match="Airflow connection 'mkto_elsewhere' is not defined: set "
                                          "AIRFLOW_CONN_MKTO_ELSEWHERE or add it under Admin > Connections"):
        MarketoHook(marketo_conn_id="mkto_elsewhere").get_client()


def test_dynamics_extra_timeout_reaches_the_client_and_msal(monkeypatch, dataverse_sandbox):
    dynamics_conn(monkeypatch, dataverse_sandbox, extra={"timeout": [3, 40]})
    client = DynamicsHook().get_client()
    assert client.timeout == (3.0, 40.0) and client.tokens.timeout == (3.0, 40.0)
    assert client.where == f"Dynamics connection 'dynamics_default' ({dataverse_sandbox.org_url})"


@pytest.mark.parametrize(("extra", "message"), [
    ({"tennant_id": "x"}, "unknown extra 'tennant_id' (did you mean 'tenant_id'?)"),
    ({"timeout": {"read": 5}}, "extra.timeout {'read': 5} is not a number of seconds"),
])
def test_dynamics_bad_extras_are_one_line_naming_the_entry(monkeypatch, dataverse_sandbox, extra, message):
    dynamics_conn(monkeypatch, dataverse_sandbox, extra=extra)
    with pytest.raises(ConfigError) as err:
        DynamicsHook().get_client()
    assert str(err.value).startswith("Airflow connection 'dynamics_default': ") and message in str(err.value)


# -- errors through the hooks name the connection id ----------------------------------------------------

def test_a_wrong_marketo_secret_through_the_hook_names_the_connection_and_is_one_call(marketo, monkeypatch):
    marketo_conn(monkeypatch, marketo, password="wrong-secret")
    with pytest.raises(AuthError) as err:
        MarketoHook().get_client().describe_leads()
    assert str(err.value).startswith(f"Marketo connection 'marketo_default' ({marketo.base_url}): ")
    assert "wrong-secret" not in str(err.value)
    assert marketo.calls()["by_endpoint"] == {"POST /identity/oauth/token": 1}


def test_the_marketo_timeout_extra_is_honoured(marketo, monkeypatch):
    marketo_conn(monkeypatch, marketo, extra={"timeout": [2, 0.2]})
    client = MarketoHook().get_client(max_attempts=2, retry_initial_s=0.01)
    client.auth.token()
    marketo.fault("delay", count=2, seconds=1.0, path_prefix="/rest/v1/leads/describe2")
    with pytest.raises(ServiceUnavailable, match=r"did not answer within 0\.2 s \(read time-out\)"):
        client.describe_leads()
    assert marketo.calls()["by_endpoint"]["GET /rest/v1/leads/describe2.json"] == 2


def test_a_closed_marketo_port_names_connection_and_host(monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}"
    marketo_conn(monkeypatch, host=url)
    with pytest.raises(ServiceUnavailable) as err:
        MarketoHook().get_client(max_attempts=2, retry_initial_s=0.01).describe_leads()
    assert str(err.value).startswith(f"Marketo connection 'marketo_default' ({url}): error transport: {url} refused "
                                     "the connection")
    ok, message = MarketoHook().test_connection()
    assert not ok and message.startswith("Marketo connection 'marketo_default'") and "refused the connection" in message


def test_an_unreachable_dynamics_authority_through_the_hook_names_connection_and_authority(dataverse, monkeypatch):
    authority = f"https://127.0.0.1:{closed_port()}/{dataverse.tenant_id}"
    dynamics_conn(monkeypatch, dataverse, extra={"authority": authority})
    client = DynamicsHook().get_client(max_attempts=2, backoff_s=0.01)
    with pytest.raises(ServiceUnavailable) as err:
        client.request("GET", "WhoAmI")
    assert str(err.value).startswith(f"Dynamics connection 'dynamics_default' ({dataverse.org_url}): error transport: "
                                     f"the authority {authority} refused the connection")
    assert "openid-configuration" not in str(err.value) and client.calls_made == 0

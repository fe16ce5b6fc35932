"""DynamicsHook reads ``dynamics_default`` from the environment and returns a working client."""

from __future__ import annotations

import json
import logging

import pytest

from mdsync.errors import ConfigError
from mdsync_airflow.hooks.dynamics import DynamicsHook


@pytest.fixture
def dynamics_conn(dataverse, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", dataverse.connection_json())
    return dataverse


def test_hook_builds_a_client_from_the_connection(dynamics_conn, monkeypatch):
    # A CA bundle in the environment must not override the connection's own verify setting (DESIGN §10).
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem")
    ids = dynamics_conn.seed("contacts", [{"lastname": "Via hook"}])
    hook = DynamicsHook()
    client = hook.get_client()
    assert client.org_url == dynamics_conn.org_url
    frame = client.query("contacts", ["lastname"])
    assert list(frame["contactid"]) == ids and list(frame["lastname"]) == ["Via hook"]
    # HttpHook would send login/password as Basic auth and extras as headers: neither may leave the process.
    assert client.session.auth is None
    assert not {"tenant_id", "authority"} & {k.lower() for k in client.session.headers}


def test_access_tokens_and_secret_are_masked_in_task_logs(dynamics_conn, caplog):
    from airflow.sdk._shared.secrets_masker.secrets_masker import redact

    seen = []
    client = DynamicsHook().get_client()
    listener = client.tokens.token_listener
    client.tokens.token_listener = lambda token: (seen.append(token), listener(token))
    client.request("GET", "WhoAmI")
    assert len(seen) == 1
    assert redact(f"token={seen[0]}") == "token=***"
    assert redact(dynamics_conn.client_secret) == "***"
    with caplog.at_level(logging.DEBUG, logger="mdsync.dynamics"):
        client.query("contacts", ["lastname"])
    assert seen[0] not in caplog.text and "GET /api/data/v9.2/contacts" in caplog.text


def test_password_grant_from_connection_extra(dataverse, monkeypatch):
    conn = json.loads(dataverse.connection_json())
    conn["extra"].update(username=dataverse.username, password=dataverse.user_password)
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", json.dumps(conn))
    client = DynamicsHook().get_client()
    assert client.request("GET", "WhoAmI").json()["UserId"] == dataverse.identity.interactive_user_id


def test_incomplete_connection_is_a_config_error(dataverse, monkeypatch):
    conn = json.loads(dataverse.connection_json())
    del conn["extra"]["tenant_id"]
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", json.dumps(conn))
    with pytest.raises(ConfigError, match="extra.tenant_id"):
        DynamicsHook().get_client()


def test_max_parallel_requests_extra_reaches_the_client(dataverse, monkeypatch):
    conn = json.loads(dataverse.connection_json())
    conn["extra"]["max_parallel_requests"] = 2
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", json.dumps(conn))
    client = DynamicsHook().get_client()
    assert client.max_parallel_requests == 2 and client.parallel_requests() == 2
    assert "max_parallel_requests" not in {k.lower() for k in client.session.headers}
    conn["extra"]["max_parallel_requests"] = 0
    monkeypatch.setenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", json.dumps(conn))
    with pytest.raises(ConfigError, match="extra.max_parallel_requests 0 is not a positive whole number"):
        DynamicsHook().get_client()

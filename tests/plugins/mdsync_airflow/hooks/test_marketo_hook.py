"""MarketoHook reads marketo_default from the environment and builds a working client; tokens are masked."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def marketo_conn(marketo, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MARKETO_DEFAULT", marketo.connection_json())
    return marketo


def test_hook_builds_a_client_from_the_connection(marketo_conn):
    from mdsync_airflow.hooks.marketo import MarketoHook

    (lead,) = marketo_conn.seed_leads([{"email": "hook@example.com", "firstName": "Hook"}])
    client = MarketoHook().get_client()
    assert client.base_url == marketo_conn.base_url
    leads = client.get_leads("email", ["hook@example.com"], fields=["firstName"])
    assert leads[["id", "firstName"]].values.tolist() == [[lead, "Hook"]]
    # Marketo takes a bearer token: the secret must never ride along as HTTP basic auth.
    assert client.session.auth is None


def test_runtime_tokens_and_the_secret_are_masked(marketo_conn):
    from airflow.sdk._shared.secrets_masker import redact

    from mdsync_airflow.hooks.marketo import MarketoHook

    client = MarketoHook().get_client()
    client.describe_leads()
    token = client.auth._token
    assert token and token not in redact(f"GET /rest/v1/leads.json Authorization: Bearer {token}")
    assert marketo_conn.client_secret not in redact(f"secret={marketo_conn.client_secret}")


def test_extra_limits_and_verify_are_honoured(marketo, monkeypatch):
    from mdsync_airflow.hooks.marketo import MarketoHook

    conn = json.loads(marketo.connection_json())
    conn["extra"] = {"verify": False, "max_calls_per_window": 50, "window_s": 20, "max_concurrent": 5}
    monkeypatch.setenv("AIRFLOW_CONN_MKTO_SHARED", json.dumps(conn))
    client = MarketoHook(marketo_conn_id="mkto_shared").get_client()
    assert client.verify is False
    assert "max_calls_per_window" not in client.session.headers
    assert client.describe_leads()["rest_name"].str.contains("dynamicsRecordId").any()


def test_connection_test_reports_bad_credentials(marketo, monkeypatch):
    from mdsync_airflow.hooks.marketo import MarketoHook

    conn = json.loads(marketo.connection_json())
    conn["password"] = "not-the-secret"
    monkeypatch.setenv("AIRFLOW_CONN_MARKETO_DEFAULT", json.dumps(conn))
    ok, message = MarketoHook().test_connection()
    assert not ok and "client credentials" in message
    monkeypatch.setenv("AIRFLOW_CONN_MARKETO_DEFAULT", marketo.connection_json())
    ok, message = MarketoHook().test_connection()
    assert ok and "lead fields" in message

"""The hooks' connections from an Airflow secrets backend (``[secrets] backend``), not only environment variables.

The hooks read ``marketo_default`` / ``dynamics_default`` through ``BaseHook.get_connection`` (the Task SDK's
connection lookup: the configured secrets backend first, then ``AIRFLOW_CONN_*``, then the metadata database), so
any backend works: HashiCorp Vault, AWS Secrets Manager, Google Secret Manager... Here the backend is a small one of
our own in the same shape as the Vault provider's: a KV store behind HTTP with a token (:class:`KvSecretsServer`,
on loopback), read by :class:`KvSecretsBackend`, configured with ``AIRFLOW__SECRETS__BACKEND`` and
``AIRFLOW__SECRETS__BACKEND_KWARGS`` as a deployment would. No ``AIRFLOW_CONN_*`` variable is set.
"""

from __future__ import annotations

import json
import secrets
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from airflow.secrets import BaseSecretsBackend

from mdsync_airflow.hooks.dynamics import DynamicsHook
from mdsync_airflow.hooks.marketo import MarketoHook

#: where the backend keeps connections, as ``connections_path`` of the Vault provider's backend
CONNECTIONS_PATH = "airflow/connections"


class KvSecretsServer:
    """A KV secrets store over HTTP on loopback: ``GET /v1/secret/data/<path>`` with ``X-Vault-Token`` answers
    ``{"data": {"data": {...}}}`` (Vault's KV v2 shape), 404 for an unknown path, 403 for a wrong token."""

    def __init__(self, secrets_by_path: dict[str, dict]) -> None:
        self.token = secrets.token_urlsafe(16)
        self.reads: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.removeprefix("/v1/secret/data/")
                if self.headers.get("X-Vault-Token") != server.token:
                    return self._answer(403, {"errors": ["permission denied"]})
                server.reads.append(path)
                if path not in secrets_by_path:
                    return self._answer(404, {"errors": []})
                return self._answer(200, {"data": {"data": secrets_by_path[path]}})

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class KvSecretsBackend(BaseSecretsBackend):
    """An Airflow secrets backend reading connections from :class:`KvSecretsServer` (as the Vault provider's
    ``VaultBackend`` reads a KV engine: one secret per connection id under ``connections_path``).

    :param url: the store's base URL.
    :param token: the store's token.
    :param connections_path: where connections live; a connection is the secret ``<path>/<conn_id>``.
    """

    def __init__(self, url: str, token: str, connections_path: str = CONNECTIONS_PATH) -> None:
        super().__init__()
        self.url, self.token, self.connections_path = url.rstrip("/"), token, connections_path

    def get_conn_value(self, conn_id: str, team_name: str | None = None) -> str | None:
        """The connection as Airflow's JSON form, or None when the store has none (Airflow then looks further)."""
        resp = requests.get(f"{self.url}/v1/secret/data/{self.build_path(self.connections_path, conn_id)}",
                            headers={"X-Vault-Token": self.token}, timeout=10)
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return json.dumps(resp.json()["data"]["data"])


@contextmanager
def secrets_backend(monkeypatch, server: KvSecretsServer):
    """Airflow configured with :class:`KvSecretsBackend` on ``server`` (as ``[secrets] backend`` in airflow.cfg);
    the Task SDK keeps a configured backend for the process, so it is dropped before and after."""
    from airflow.sdk.configuration import clear_secrets_backends_cache

    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND", f"{__name__}.{KvSecretsBackend.__name__}")
    monkeypatch.setenv("AIRFLOW__SECRETS__BACKEND_KWARGS", json.dumps({"url": server.url, "token": server.token}))
    monkeypatch.delenv("AIRFLOW_CONN_MARKETO_DEFAULT", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_DYNAMICS_DEFAULT", raising=False)
    clear_secrets_backends_cache()
    try:
        yield
    finally:
        clear_secrets_backends_cache()
        monkeypatch.delenv("AIRFLOW__SECRETS__BACKEND")
        monkeypatch.delenv("AIRFLOW__SECRETS__BACKEND_KWARGS")


def _store(marketo_sandbox, dataverse_sandbox) -> dict[str, dict]:
    return {f"{CONNECTIONS_PATH}/marketo_default": json.loads(marketo_sandbox.connection_json()),
            f"{CONNECTIONS_PATH}/dynamics_default": json.loads(dataverse_sandbox.connection_json())}


@pytest.fixture
def kv_server(marketo_sandbox, dataverse_sandbox):
    server = KvSecretsServer(_store(marketo_sandbox, dataverse_sandbox))
    yield server
    server.stop()


def test_both_hooks_take_their_connections_from_the_configured_secrets_backend(monkeypatch, kv_server,
                                                                               marketo_sandbox, dataverse_sandbox):
    with secrets_backend(monkeypatch, kv_server):
        marketo = MarketoHook().get_client()
        fields = marketo.describe_leads()  # a token and a describe: the backend's credentials work
        dynamics = DynamicsHook().get_client()
        contacts = dynamics.query("contacts", ["contactid"], top=1)

    assert marketo.base_url == marketo_sandbox.base_url and "email" in set(fields["rest_name"])
    assert dynamics.org_url == dataverse_sandbox.org_url.rstrip("/") and list(contacts.columns) == ["contactid"]
    assert {f"{CONNECTIONS_PATH}/marketo_default", f"{CONNECTIONS_PATH}/dynamics_default"} <= set(kv_server.reads)


def test_a_connection_the_backend_lacks_is_looked_for_further_and_then_named(monkeypatch, kv_server):
    from mdsync.errors import ConfigError

    with secrets_backend(monkeypatch, kv_server):
        with pytest.raises(ConfigError, match="Airflow connection 'marketo_elsewhere' is not defined"):
            MarketoHook(marketo_conn_id="marketo_elsewhere").get_client()

    assert f"{CONNECTIONS_PATH}/marketo_elsewhere" in kv_server.reads


def test_a_dag_run_syncs_with_connections_from_the_secrets_backend_alone(sync_world, airflow_db, monkeypatch,
                                                                         marketo_sandbox, dataverse_sandbox):
    from mdsync_airflow.run_once import run_once

    ids = sync_world.seed_people()
    server = KvSecretsServer(_store(marketo_sandbox, dataverse_sandbox))
    try:
        with secrets_backend(monkeypatch, server):
            assert run_once() == "success"
    finally:
        server.stop()

    # the tasks (the Task SDK's worker lookup: [workers] secrets_backend, else [secrets] backend) read both
    assert {f"{CONNECTIONS_PATH}/marketo_default", f"{CONNECTIONS_PATH}/dynamics_default"} <= set(server.reads)
    assert sync_world.record("contacts", "max@example.com")["mdsync_marketopersonid"] == str(ids["max_pid"])
    assert sync_world.person("cat@example.com")["dynamicsRecordType"] == "contact"

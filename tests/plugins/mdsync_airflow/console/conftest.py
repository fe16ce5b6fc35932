"""The console under test, in process: Airflow's own API app (its auth manager, its /auth/token, the plugins it
mounts) behind a TestClient, with SimpleAuthManager users and real JWTs. Actions that start runs need a real
API server (``airflow_api_server``), since they go through Airflow's REST API over HTTP."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest

#: the console's test users: an admin, a viewer (may read, may not trigger), and their passwords
USERS = {"admin": ("admin", "admin-pw"), "viewer": ("viewer", "viewer-pw")}


@dataclass
class Console:
    client: object

    def token(self, user: str) -> str:
        r = self.client.post("/auth/token", json={"username": user, "password": USERS[user][1]})
        assert r.status_code == 201, r.text
        return r.json()["access_token"]

    def get(self, path: str, user: str | None = "admin", **kw):
        headers = kw.pop("headers", {})
        if user:
            headers["Authorization"] = f"Bearer {self.token(user)}"
        return self.client.get(path, headers=headers, **kw)


@pytest.fixture(scope="module")
def console_env(tmp_path_factory, airflow_db):
    """Simple-auth users and a state store of the module's own (set before Airflow's app is made)."""
    home = tmp_path_factory.mktemp("console")
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({name: pw for name, (_, pw) in USERS.items()}))
    env = {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{n}:{role}" for n, (role, _) in USERS.items()),
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
           "MDSYNC_STATE_URL": f"sqlite:///{home / 'state.sqlite'}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def console(console_env):
    from airflow.api_fastapi.app import create_app, purge_cached_app
    from fastapi.testclient import TestClient

    from mdsync_airflow.console import health, sources

    purge_cached_app()
    sources.reset_clients()
    health._usage.clear()
    with TestClient(create_app()) as client:
        yield Console(client)
    purge_cached_app()


@pytest.fixture(scope="module")
def console_module_world(console, console_env, marketo_sandbox, dataverse_sandbox, tmp_path_factory):
    """A sync world for the whole module (reset sandboxes, connections in the environment) whose cycles write the
    state store the console reads: a module builds its runs once and its tests read them."""
    from mdsync_airflow.console import sources
    from tests.fixtures.module_world import module_world

    for world in module_world(marketo_sandbox, dataverse_sandbox, tmp_path_factory, "console"):
        world.mp.setenv("MDSYNC_STATE_URL", console_env["MDSYNC_STATE_URL"])
        sources.reset_clients()  # the console's live reads use this module's connections
        yield world
        sources.reset_clients()


@pytest.fixture(scope="module")
def console_world(console_module_world):
    """The same world with :class:`~tests.fixtures.sync_env.SyncWorld`'s helpers (seed people, change a side)."""
    from tests.fixtures.sync_env import SyncWorld

    w = console_module_world
    return SyncWorld(w.marketo_sandbox, w.dataverse_sandbox, w.tmp)

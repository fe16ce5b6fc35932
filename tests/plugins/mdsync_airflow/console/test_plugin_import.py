"""Registering the console is cheap: Airflow imports plugins in every process that loads them (each Celery task
process too), so importing the plugin must not import the console's pages and API, the engine or pandas; the
real app is built by the first request that reaches it, and then serves the console as before."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[4]

#: the console's modules that only the real app needs (they import the engine, pandas, Airflow's API app)
CONSOLE_HEAVY = [f"mdsync_airflow.console.{m}" for m in
                 ("pages", "api", "health", "sources", "auth", "actions", "charts", "runs", "person", "errors",
                  "collisions")]

# Loads the plugins as the API server does (plugins_manager.get_fastapi_plugins: the plugins folder's files,
# then entry points), notes what that imported, then mounts them with the API server's own init_plugins and
# asks the console for its icon and its API description.
_PROBE = """
import json, sys
from airflow import plugins_manager

apps, _ = plugins_manager.get_fastapi_plugins()
ours = [a for a in apps if a["url_prefix"] == "/mdsync"]
heavy = sorted(m for m in sys.modules
               if m in ("pandas", "mdsync") or m.startswith(("pandas.", "mdsync.")) or m in HEAVY)
built_before = ours[0]["app"].built

from fastapi import FastAPI
from fastapi.testclient import TestClient
from airflow.api_fastapi.app import init_plugins

server = FastAPI()
init_plugins(server)
client = TestClient(server)
icon = client.get("/mdsync/static/icon.svg")
described = client.get("/mdsync/api/openapi.json")
print(json.dumps({"registered": len(ours), "heavy": heavy, "built_before": built_before,
                  "icon": [icon.status_code, icon.headers.get("content-type", "")],
                  "described": [described.status_code, sorted(described.json().get("paths", {}))],
                  "built_after": ours[0]["app"].built, "pages_after": "mdsync_airflow.console.pages" in sys.modules}))
"""


def test_loading_the_plugin_imports_no_console_page_engine_or_pandas_and_the_first_request_builds_it(tmp_path):
    env = {**os.environ, "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins")}
    probe = f"HEAVY = {CONSOLE_HEAVY!r}\n{_PROBE}"
    # a fresh interpreter: this test process has imported the console long since
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["registered"] == 1, got
    assert got["heavy"] == [], f"importing the plugin imported {got['heavy']}"
    assert got["built_before"] is False
    assert got["icon"][0] == 200 and got["icon"][1].startswith("image/svg"), got["icon"]
    assert got["described"][0] == 200 and "/api/health" in got["described"][1], got["described"]
    assert got["built_after"] is True and got["pages_after"] is True


def test_concurrent_first_requests_build_the_console_once():
    from httpx import ASGITransport, AsyncClient
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from mdsync_airflow.console.app import PREFIX, LazyConsoleApp, create_app

    builds = []

    def counted():
        builds.append(1)
        return create_app()

    lazy = LazyConsoleApp(counted)
    server = Starlette(routes=[Mount(PREFIX, app=lazy)])  # mounted as Airflow mounts it: root_path ends in PREFIX

    async def first_requests():
        async with AsyncClient(transport=ASGITransport(app=server), base_url="http://console") as client:
            return await asyncio.gather(*(client.get(f"{PREFIX}/static/icon.svg") for _ in range(6)))

    answers = asyncio.run(first_requests())
    assert [r.status_code for r in answers] == [200] * 6
    assert len(builds) == 1 and lazy.built


def test_the_console_needs_no_lifespan():
    """Airflow enters the lifespan of FastAPI sub-apps only, and the registered app is a plain ASGI wrapper: the
    real app must not rely on startup or shutdown handlers (make the wrapper a FastAPI app before adding one)."""
    from fastapi import APIRouter

    from mdsync_airflow.console import api, pages
    from mdsync_airflow.console.app import create_app

    app = create_app()
    assert app.router.on_startup == [] and app.router.on_shutdown == []
    default = type(APIRouter().lifespan_context)
    for router in (api.router, pages.router):
        assert router.on_startup == [] and router.on_shutdown == []
        assert type(router.lifespan_context) is default, router

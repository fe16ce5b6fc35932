"""The Airflow plugin: the console's FastAPI app and where the UI shows it.

Cheap to import (every process that loads plugins does, each task process included): the app it registers is
:data:`~mdsync_airflow.console.app.console_app`, which builds the real console on its first request.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from airflow.plugins_manager import AirflowPlugin

from mdsync_airflow.console.app import PREFIX, console_app


def _base_path() -> str:
    """The UI's own path prefix (``[api] base_url``, e.g. ``/airflow`` behind a proxy), so links resolve."""
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def external_views(base: str) -> list[dict]:
    """The console in the navigation, on the DAG's page and on each run's page (``{RUN_ID}`` is filled in by the UI)."""
    home = f"{base}{PREFIX}/"
    icon = f"{base}{PREFIX}/static/icon.svg"
    return [
        {"name": "Sync console", "href": home, "destination": "nav", "url_route": "sync-console", "icon": icon},
        {"name": "Sync console", "href": home, "destination": "dag", "url_route": "sync-console-dag", "icon": icon},
        {"name": "Sync decisions", "href": f"{base}{PREFIX}/runs/{{RUN_ID}}", "destination": "dag_run",
         "url_route": "sync-console-run", "icon": icon},
    ]


class SyncConsolePlugin(AirflowPlugin):
    """Marketo ⇄ Dynamics sync console: health, a person's story, collisions, errors, why-didn't-it-sync."""

    name = "mdsync_console"
    fastapi_apps = [{"app": console_app, "url_prefix": PREFIX, "name": "Marketo ⇄ Dynamics sync console"}]
    external_views = external_views(_base_path())

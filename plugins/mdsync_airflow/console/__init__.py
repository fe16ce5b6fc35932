"""The operator console: a page in the Airflow UI for sync health, one person's story, collisions, errors,
"why didn't this sync?", dry-run previews and undo (issue 11).

An Airflow 3 plugin (:mod:`.plugin`): a FastAPI app mounted by the API server at ``/mdsync`` (``fastapi_apps``)
serving HTML pages and a JSON API under ``/mdsync/api``, and ``external_views`` that put it in the navigation, on
the DAG's page and on each run's page. The app is built by the first request that reaches it (:mod:`.app`), so
the processes that merely load plugins (each task process) import none of the console's modules. It reads the
sync's state store, Airflow's own metadata (runs, tasks waiting) and, for live values, both services through the
hooks.

Every page and API call requires an authenticated Airflow user allowed to read the DAG (the UI's own JWT, from
its ``_token`` cookie or an ``Authorization: Bearer`` header); actions that start runs require permission to
trigger it and go through Airflow's REST API with the caller's own token. Pages work offline: no CDN, charts
are inline SVG.
"""

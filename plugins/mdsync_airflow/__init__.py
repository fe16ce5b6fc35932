"""Airflow glue for the Marketo <-> Dynamics sync: hooks, operators, the run-time wiring of a cycle.

The engine (``mdsync``) lives in the repository's ``include/`` folder. A checkout makes it importable with
``pip install -e .`` (``make venv``); a deployment that only copies the repository's folders (an Astro project:
``/usr/local/airflow/{dags,plugins,include}``, with ``dags/`` and ``plugins/`` on ``sys.path`` but not
``include/``) does not. Importing this package therefore puts the ``include/`` beside ``plugins/`` on
``sys.path`` when ``mdsync`` cannot be imported otherwise: the DAG file and every task import this package
before they import the engine.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def ensure_engine_importable() -> Path | None:
    """Make ``mdsync`` importable in a deployment without an installed copy of it.

    Found from this file, never from the working directory: ``<project>/plugins/mdsync_airflow/__init__.py``
    -> ``<project>/include``. Appended, so an installed engine (editable or not) or a ``PYTHONPATH`` entry
    always wins. Only looks the package up (no import): the DAG's parse time stays as it was.

    :returns: the folder added to ``sys.path``, or None when ``mdsync`` was importable already (or no
        ``include/mdsync`` is beside this package).
    """
    if importlib.util.find_spec("mdsync") is not None:
        return None
    include = Path(__file__).resolve().parents[2] / "include"
    if not (include / "mdsync" / "__init__.py").is_file():
        return None
    if str(include) not in sys.path:
        sys.path.append(str(include))
    return include


ensure_engine_importable()

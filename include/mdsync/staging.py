"""The staging area: frames handed from one task to the next as parquet files under the run id.

Tasks never share memory or a local disk (Celery and Kubernetes executors run them on different machines),
so a task writes its frames here and passes the *path* through XCom. The root is any path object with
``/``, ``open`` and ``mkdir`` -- Airflow's ``ObjectStoragePath`` (``file://``, ``s3://``, ``gs://``…) in the
DAG, ``pathlib.Path`` in tests.
"""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

import pandas as pd


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", part)


class Staging:
    """One run's folder in the staging area.

    :param root: the staging root (a path object).
    :param run_id: the Airflow run id; each run gets its own folder.
    """

    def __init__(self, root, run_id: str) -> None:
        self.root = root
        self.folder = root / _safe(run_id)

    def path(self, name: str):
        return self.folder / name

    def write_frame(self, name: str, frame: pd.DataFrame) -> str:
        """Write ``frame`` as ``<name>.parquet`` and return its path as a string (XCom material)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"{_safe(name)}.parquet"
        with target.open("wb") as fh:
            frame.to_parquet(fh, index=True)
        return str(target)

    def write_json(self, name: str, data: Any, *, shared: bool = False) -> str:
        """Write ``data`` as ``<name>.json`` in this run's folder, or at the root when ``shared`` (kept across runs)."""
        folder = self.root if shared else self.folder
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{_safe(name)}.json"
        with target.open("w") as fh:
            json.dump(data, fh, default=str)
        return str(target)

    def read_frame(self, path: str) -> pd.DataFrame:
        """Read a frame written by :meth:`write_frame` (``path`` as returned there)."""
        with self._resolve(path).open("rb") as fh:
            return pd.read_parquet(fh)

    def shared_path(self, name: str) -> str:
        """The path of a file written with ``write_json(name, shared=True)``."""
        return str(self.root / f"{_safe(name)}.json")

    def read_json(self, path: str) -> Any:
        with self._resolve(path).open("r") as fh:
            return json.load(fh)

    def remove(self) -> None:
        """Delete this run's folder (after a successful run; failed runs keep theirs for inspection)."""
        fs = getattr(self.folder, "fs", None)  # ObjectStoragePath: local folder or object storage
        try:
            if fs is not None:
                fs.rm(self.folder.path, recursive=True)
            else:
                shutil.rmtree(self.folder)
        except FileNotFoundError:
            pass

    def _resolve(self, path: str):
        # Paths come back from XCom as strings; rebuild them with the root's own type.
        return type(self.root)(path)

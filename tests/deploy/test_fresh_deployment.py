"""A fresh deployment, built the way an Astro project ships the sync, parses the DAG and runs a cycle.

The environment is made from scratch, as the Astro image makes it: a new virtualenv with only Airflow
(``apache-airflow`` at the pin of requirements.txt and its own dependencies, standing in for the Runtime image's
Airflow), then ``requirements-deploy.txt`` installed the way the Dockerfile installs it (every package already
there is a constraint at its installed version), and copies of only ``dags/``, ``plugins/`` and ``include/`` (as
the image's ``/usr/local/airflow``). The project is not installed (no ``pip install -e .``) and no ``PYTHONPATH``
is set: the engine must import through ``plugins/mdsync_airflow`` alone, from any working directory.

Packages come from uv's cache (filled by ``make venv``; the index only for what it lacks), so building the
environment takes seconds, not a download. Docker is not used: the Runtime image cannot be pulled here, so the Dockerfile's build itself is not
run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from sandbox.dataverse import DataverseSandbox
from sandbox.marketo import MarketoSandbox
from tests.fixtures.sync_env import SyncWorld

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).parent / "uv"
#: the folders an Astro image holds under /usr/local/airflow that the sync's code lives in
PROJECT_FOLDERS = ("dags", "plugins", "include")
#: distributions a deployment must never get from requirements-deploy.txt: the image's Airflow, test tools and
#: the sandboxes' own packages
NOT_FOR_DEPLOYMENT = {"apache-airflow", "apache-airflow-core", "apache-airflow-task-sdk", "pytest", "pytest-timeout",
                      "pytest-xdist", "execnet", "hypothesis", "playwright", "faker", "trustme"}


def _name(distribution: str) -> str:
    """A distribution name as PEP 503 compares them (``PyYAML`` = ``pyyaml``, ``psycopg_binary`` = ``psycopg-binary``)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def pins(text: str) -> dict[str, str]:
    """The ``name==version`` lines of a lock or a freeze, by normalised name."""
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, flags=re.MULTILINE)
    return {_name(name): version for name, version in found}


def airflow_pin() -> str:
    """``apache-airflow==<version>`` as requirements.txt pins it (the Dockerfile's Runtime matches it)."""
    return f"apache-airflow=={pins((REPO / 'requirements.txt').read_text())['apache-airflow']}"


@dataclass
class Deployment:
    """A built environment: the project folders, the virtualenv, and what was installed when."""

    root: Path
    project: Path
    venv: Path
    airflow_only: dict[str, str]  # the virtualenv's packages with Airflow alone
    installed: dict[str, str]  # ... and after requirements-deploy.txt
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        """A clean environment for the deployment's processes: its own Airflow home and folders, no PYTHONPATH,
        nothing of the test run's environment (its AIRFLOW_HOME, connections or settings)."""
        env = {"PATH": f"{self.venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(self.root)),
               "LANG": "C.UTF-8", "TMPDIR": os.environ.get("TMPDIR", "/tmp"), "AIRFLOW_HOME": str(home),
               "AIRFLOW__CORE__DAGS_FOLDER": str(self.project / "dags"),
               "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.project / "plugins"),
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
        return {**env, **extra}

    def run(self, args: list[str], home: Path, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess:
        """Run a command of the deployment (``python``, ``airflow``) from outside the project's folders."""
        return subprocess.run(args, cwd=self.root, env=self.env(home, **extra), capture_output=True, text=True,
                              timeout=timeout)


def _uv(*args: str) -> None:
    done = subprocess.run([str(UV), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"uv {' '.join(args)} failed:\n{done.stderr[-3000:]}"


def _uv_install(python: str, *args: str) -> None:
    """``uv pip install`` from uv's cache alone when it has every package (seconds), else from the index."""
    command = [str(UV), "pip", "install", "--quiet", "--python", python, *args]
    if subprocess.run([*command, "--offline"], capture_output=True, timeout=600).returncode != 0:
        _uv("pip", "install", "--quiet", "--python", python, *args)


def _freeze(venv: Path) -> dict[str, str]:
    done = subprocess.run([str(UV), "pip", "freeze", "--python", str(venv / "bin" / "python")], capture_output=True,
                          text=True, check=True)
    return pins(done.stdout)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Deployment:
    """Airflow alone in a new virtualenv, then the deployment's lock the Dockerfile's way, and the folders."""
    root = tmp_path_factory.mktemp("fresh-deployment")
    seconds: dict[str, float] = {}
    started = time.monotonic()
    project = root / "usr-local-airflow"
    for folder in PROJECT_FOLDERS:  # what the image's COPY brings (.dockerignore keeps caches and sandbox data out)
        shutil.copytree(REPO / folder, project / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".sandbox", ".staging", ".state"))
    venv = root / "venv"
    _uv("venv", "--quiet", "--python", sys.executable, str(venv))
    python = str(venv / "bin" / "python")
    # the Runtime image's part: Airflow and its own dependencies, at the versions the local lock has
    _uv_install(python, airflow_pin(), "-c", str(REPO / "requirements.txt"))
    airflow_only = _freeze(venv)
    seconds["airflow"] = time.monotonic() - started
    # the Dockerfile's part: what is installed stays as it is, except the packages the lock pins itself
    lock = (REPO / "requirements-deploy.txt").read_text()
    constraints = root / "image-packages.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in airflow_only.items()
                                   if name not in pins(lock)))
    _uv_install(python, "-r", str(REPO / "requirements-deploy.txt"), "-c", str(constraints))
    seconds["environment"] = time.monotonic() - started
    return Deployment(root, project, venv, airflow_only, _freeze(venv), seconds)


def test_the_lock_is_the_local_lock_without_airflow_and_installing_it_changes_no_airflow_package(deployment):
    lock = pins((REPO / "requirements-deploy.txt").read_text())
    local = pins((REPO / "requirements.txt").read_text())
    assert lock, "requirements-deploy.txt pins nothing"
    # every version is the one the test suite ran with
    assert {name: local.get(name) for name in lock} == lock
    # nothing of Airflow's own tree, and neither test tools nor sandbox-only packages
    assert sorted(set(lock) & set(deployment.airflow_only)) == []
    assert sorted(set(lock) & NOT_FOR_DEPLOYMENT) == []
    # installed exactly: Airflow's packages as they were, plus the lock's at its versions, nothing else
    assert deployment.installed == {**deployment.airflow_only, **lock}
    assert "apache-airflow-providers-http" in lock and "apache-airflow" in deployment.airflow_only
    print(f"fresh deployment built in {deployment.seconds}")


PARSE_THEN_TASK = """
import importlib.util, json, sys
installed = importlib.util.find_spec("mdsync") is not None  # before Airflow puts plugins/ on sys.path
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
import mdsync, mdsync_airflow
heavy = sorted(m for m in ("pandas", "pyarrow", "mdsync.cycle") if m in sys.modules)
# then what a task of the DAG imports (each task imports these inside its callable)
from mdsync_airflow import ensure_engine_importable, runtime
import mdsync.cycle
# and the plugins folder as the API server loads it (the console)
from airflow import plugins_manager
plugins = plugins_manager.get_plugin_info(attrs_to_dump=["name", "source"])
print(json.dumps({"installed": installed, "errors": bag.import_errors, "dag_ids": sorted(bag.dag_ids),
                  "mdsync": mdsync.__file__, "glue": mdsync_airflow.__file__, "heavy": heavy,
                  "runtime": runtime.__file__, "cycle": mdsync.cycle.__file__,
                  "include_on_path": [p for p in sys.path if p.endswith("/include")],
                  "again": str(ensure_engine_importable()),
                  "plugins": [str(p["source"]) for p in plugins], "plugin_errors": plugins_manager.get_import_errors()}))
"""

TASK = """
import json, sys
import airflow  # as a task process starts: Airflow puts the plugins folder on sys.path
from mdsync_airflow import runtime
import mdsync.cycle
print(json.dumps({"cycle": mdsync.cycle.__file__, "include_on_path": [p for p in sys.path if p.endswith("/include")]}))
"""


def _python(deployment: Deployment, home: Path, script: str, *args: str, **env: str) -> dict:
    """Run a script with the deployment's Python; the JSON it printed last."""
    done = deployment.run([str(deployment.python), "-c", script, *args], home, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_dag_parses_and_its_tasks_import_without_an_install_of_the_project(deployment, tmp_path):
    found = _python(deployment, tmp_path, PARSE_THEN_TASK, str(deployment.project / "dags"))
    assert found["installed"] is False, "the engine is installed in the deployment: this would prove nothing"
    assert found["errors"] == {}
    assert found["dag_ids"] == ["marketo_dynamics_sync"]
    project = deployment.project
    assert found["glue"] == str(project / "plugins" / "mdsync_airflow" / "__init__.py")
    assert found["mdsync"] == str(project / "include" / "mdsync" / "__init__.py")
    # parsing still imports neither pandas nor the engine's stages
    assert found["heavy"] == []
    assert found["runtime"] == str(project / "plugins" / "mdsync_airflow" / "runtime.py")
    assert found["cycle"] == str(project / "include" / "mdsync" / "cycle.py")
    # include/ was put on sys.path once, found from the package's own file (the process ran outside the project)
    assert found["include_on_path"] == [str(project / "include")]
    assert found["again"] == "None"
    # the plugins folder loads too: the console plugin, and nothing else of it (plugins/.airflowignore)
    assert found["plugin_errors"] == {}
    assert found["plugins"] == ["$PLUGINS_FOLDER/mdsync_console.py"]


def test_with_the_dockerfiles_pythonpath_the_package_adds_nothing(deployment, tmp_path):
    include = str(deployment.project / "include")
    found = _python(deployment, tmp_path, TASK, PYTHONPATH=include)
    assert found["cycle"] == str(deployment.project / "include" / "mdsync" / "cycle.py")
    assert found["include_on_path"] == [include]


# A cycle -----------------------------------------------------------------------------------------------------

def _settings_connections() -> dict[str, dict]:
    """airflow_settings.yaml's connections, by id."""
    settings = yaml.safe_load((REPO / "airflow_settings.yaml").read_text())
    return {c["conn_id"]: c for c in settings["airflow"]["connections"]}


def _as_connection_json(entry: dict, port: int, ca_bundle: str | None = None) -> dict:
    """An airflow_settings.yaml connection as the AIRFLOW_CONN_<ID> JSON the Astro CLI's import amounts to, moved
    to the sandbox's port (and CA file): the file's ports are the sandboxes' defaults, this test's are free ones."""
    def moved(url: str) -> str:
        return re.sub(r"^(https?://[^/:]+):\d+", rf"\g<1>:{port}", url)

    conn = {"conn_type": entry["conn_type"], "host": moved(entry["conn_host"]), "login": entry["conn_login"],
            "password": entry["conn_password"]}
    extra = dict(entry.get("conn_extra") or {})
    if "authority" in extra:
        extra["authority"] = moved(extra["authority"])
    if "verify" in extra:
        extra["verify"] = ca_bundle
    return {**conn, "extra": extra} if extra else conn


@pytest.fixture(scope="module")
def astro_sandboxes(tmp_path_factory):
    """Both sandboxes started with airflow_settings.yaml's credentials, as its comment says to start them."""
    conns = _settings_connections()
    marketo, dynamics = conns["marketo_default"], conns["dynamics_default"]
    data = tmp_path_factory.mktemp("astro-sandboxes")
    with MarketoSandbox(data / "marketo", client_id=marketo["conn_login"],
                        client_secret=marketo["conn_password"]) as mkto, \
            DataverseSandbox(data / "dataverse", client_id=dynamics["conn_login"],
                             client_secret=dynamics["conn_password"],
                             tenant_id=dynamics["conn_extra"]["tenant_id"]) as dv:
        yield mkto, dv


def test_one_cycle_runs_in_the_deployment_with_the_astro_settings_connections(deployment, astro_sandboxes,
                                                                                airflow_db, tmp_path):
    mkto, dv = astro_sandboxes
    conns = _settings_connections()
    marketo_conn = _as_connection_json(conns["marketo_default"], mkto.port)
    dynamics_conn = _as_connection_json(conns["dynamics_default"], dv.port, dv.ca_bundle)
    # the file's connections are the sandboxes' own (ports and CA file aside)
    assert marketo_conn == json.loads(mkto.connection_json())
    assert dynamics_conn == json.loads(dv.connection_json())

    world = SyncWorld(mkto, dv, tmp_path)
    ids = world.seed_people()
    home = tmp_path / "airflow-home"
    home.mkdir()
    # Airflow's metadata schema, as `airflow db migrate` of the same Airflow made it for this test run (the
    # image's Airflow migrates its own; what is under test here is the product's installation)
    shutil.copy(Path(airflow_db) / "airflow.db", home / "airflow.db")
    started = time.monotonic()
    done = deployment.run([str(deployment.venv / "bin" / "airflow"), "dags", "test", "marketo_dynamics_sync"], home,
                          timeout=600,
                          AIRFLOW_CONN_MARKETO_DEFAULT=json.dumps(marketo_conn),
                          AIRFLOW_CONN_DYNAMICS_DEFAULT=json.dumps(dynamics_conn),
                          MDSYNC_STATE_URL=f"sqlite:///{tmp_path / 'state.sqlite'}",
                          MDSYNC_STAGING_URL=f"file://{tmp_path / 'staging'}",
                          MDSYNC_BULK_POLL_SECONDS="0.1", MDSYNC_TASK_RETRIES="0")
    deployment.seconds["cycle"] = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]

    # both ways: the Dynamics-only contact is a Marketo person now, the marked person a Dynamics contact, and the
    # pairs that share an email are linked
    assert world.person("cat@example.com")["dynamicsRecordType"] == "contact"
    assert world.record("contacts", "max@example.com")["mdsync_marketopersonid"] == str(ids["max_pid"])
    assert world.person("ann@example.com")["dynamicsRecordId"] == ids["ann"]
    assert world.record("leads", "lena@example.com")["mdsync_marketopersonid"] == str(ids["lena_pid"])
    # the task logs never show the sandboxes' secrets
    assert conns["marketo_default"]["conn_password"] not in output
    assert conns["dynamics_default"]["conn_password"] not in output
    print(f"fresh deployment: {deployment.seconds}")

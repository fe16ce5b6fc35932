"""``make sync`` (scripts/sync.sh): the connection pair is used as given, a half-set pair names the missing one,
the sandbox's connections are used only when neither is set (and it says so), and bad CONF is one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MARKETO, DYNAMICS = "AIRFLOW_CONN_MARKETO_DEFAULT", "AIRFLOW_CONN_DYNAMICS_DEFAULT"


def sync(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in (MARKETO, DYNAMICS)}
    base["MDSYNC_SANDBOX_ENV"] = str(tmp_path / "connections.env")  # no sandbox unless the test writes one
    return subprocess.run(["bash", str(REPO / "scripts" / "sync.sh"), *args], capture_output=True, text=True,
                          env={**base, **env}, timeout=300)


@pytest.mark.parametrize("given, missing", [(MARKETO, DYNAMICS), (DYNAMICS, MARKETO)])
def test_a_half_set_connection_pair_names_the_missing_one_and_never_takes_the_sandboxs(tmp_path, given, missing):
    (tmp_path / "connections.env").write_text(f"export {MARKETO}='{{}}'\nexport {DYNAMICS}='{{}}'\n")
    done = sync(tmp_path, **{given: '{"conn_type": "http", "host": "https://real.example.com"}'})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"error: {given} is set but {missing} is not: set {missing} as well")
    assert "never replaced" in done.stderr


def test_no_connections_and_no_sandbox_is_one_line(tmp_path):
    done = sync(tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: set {MARKETO} and {DYNAMICS}, or start 'make sandbox' first "
                                   f"(no {tmp_path / 'connections.env'})")


def test_the_sandboxs_connections_only_when_none_are_set_and_bad_conf_is_one_line(tmp_path, airflow_db):
    (tmp_path / "connections.env").write_text(f"export {MARKETO}='{{}}'\nexport {DYNAMICS}='{{}}'\n")
    done = sync(tmp_path, "--conf", '{"dry_run": yes}', AIRFLOW_HOME=airflow_db)
    assert done.stdout.splitlines()[0] == (f"neither {MARKETO} nor {DYNAMICS} is set: using the sandbox's "
                                           f"({tmp_path / 'connections.env'})")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: CONF is not valid JSON")
    both = sync(tmp_path, "--conf", "[]", AIRFLOW_HOME=airflow_db, **{MARKETO: "{}", DYNAMICS: "{}"})
    assert both.returncode == 2 and "using the sandbox" not in both.stdout
    assert both.stderr.startswith("error: CONF must be a JSON object")

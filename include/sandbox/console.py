"""``make console``: the operator console on what ``make demo`` left in ``.demo/``, under ``airflow standalone``.

Starts the two sandboxes again on the demo's data, then ``airflow standalone`` (API server with the console
plugin, scheduler, DAG processor, triggerer) on the demo's Airflow home and state store, with the connections set,
and prints where to log in. The console is **Sync console** in Airflow's navigation. Runs the console starts
(retry selected, undo) are run by the scheduler. Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from sandbox.dataverse import DataverseSandbox
from sandbox.marketo import MarketoSandbox

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / ".demo"


def main() -> int:
    if not (DEMO / "state.sqlite").exists() or not (DEMO / "airflow").exists():
        print("nothing to show yet: run `make demo` first (it leaves its runs in .demo/)", file=sys.stderr)
        return 2
    port = int(os.environ.get("CONSOLE_PORT", "8080"))
    home = DEMO / "airflow"
    passwords = home / "console-passwords.json"
    if not passwords.exists():
        passwords.write_text(json.dumps({"admin": secrets.token_urlsafe(12)}))
    password = json.loads(passwords.read_text())["admin"]
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
           "AIRFLOW__API__PORT": str(port), "AIRFLOW__API__BASE_URL": f"http://localhost:{port}",
           "MDSYNC_STATE_URL": f"sqlite:///{DEMO / 'state.sqlite'}", "MDSYNC_STAGING_URL": f"file://{DEMO / 'staging'}",
           "MDSYNC_OVERLAP_SECONDS": "2",
           # standalone starts its parts as `airflow ...` subprocesses
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with MarketoSandbox(DEMO / "marketo") as marketo, DataverseSandbox(DEMO / "dataverse") as dataverse:
        env["AIRFLOW_CONN_MARKETO_DEFAULT"] = marketo.connection_json()
        env["AIRFLOW_CONN_DYNAMICS_DEFAULT"] = dataverse.connection_json()
        print(f"sandboxes up on the demo's data: Marketo {marketo.base_url}, Dataverse {dataverse.org_url}")
        print(f"\n  Airflow with the sync console: http://localhost:{port}/  (log in as admin / {password})")
        print("  the console: 'Sync console' in the navigation, or http://localhost:%d/mdsync/" % port)
        print("  Ctrl-C stops Airflow and the sandboxes; Airflow's output goes to .demo/standalone.log\n")
        with (DEMO / "standalone.log").open("w") as log:
            proc = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "standalone"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                return proc.wait()
            except KeyboardInterrupt:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                return 0


if __name__ == "__main__":
    sys.exit(main())

"""Running a sandbox server as a child process (shared by the Marketo and Dataverse sandboxes)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` with its output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ))


def stop(proc: subprocess.Popen | None) -> None:
    """Terminate a child and wait for it (killing it after 10 s); leaves no process behind."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

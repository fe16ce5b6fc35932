"""Marketo Engage sandbox: a real HTTP server on loopback, backed by SQLite, run in a child process.

>>> with MarketoSandbox(Path("/tmp/mkto")) as sb:          # doctest: +SKIP
...     os.environ["AIRFLOW_CONN_MARKETO_DEFAULT"] = sb.connection_json()

``MarketoSandbox(..., tls=True)`` serves HTTPS (as Marketo does) with a certificate of the sandbox CA,
``sb.ca_bundle``; ``connection_json()`` then carries it as ``extra.verify``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from sandbox import process

from .credentials import load_or_create_credentials

__all__ = ["MarketoSandbox"]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MarketoSandbox:
    """Start and stop the sandbox (``python -m sandbox.marketo``) as a child process.

    :param data_dir: SQLite database, credentials and export files; kept across restarts.
    :param port: 0 picks a free port.
    :param client_id: / :param client_secret: the custom service's credentials (generated and stored when None).
    :param token_ttl_s: access token lifespan.
    :param daily_quota: API calls per day before 607.
    :param rate_limit: (calls, seconds) before 606.
    :param max_concurrent: calls in flight before 615.
    :param export_delay_s: how long a bulk export job stays "Processing".
    :param tls: serve HTTPS with a certificate of the sandbox CA (:attr:`ca_bundle`, kept in ``data_dir``).
    """

    def __init__(self, data_dir: Path, port: int = 0, host: str = "127.0.0.1", client_id: str | None = None,
                 client_secret: str | None = None, token_ttl_s: int = 3600, daily_quota: int = 50000,
                 rate_limit=(100, 20), max_concurrent: int = 10, export_delay_s: float = 0.0,
                 tls: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.tls = tls
        self.host = host
        self.port = port
        self.client_id, self.client_secret = load_or_create_credentials(self.data_dir, client_id, client_secret)
        self.token_ttl_s = token_ttl_s
        self.daily_quota = daily_quota
        self.rate_limit = tuple(rate_limit)
        self.max_concurrent = max_concurrent
        self.export_delay_s = export_delay_s
        self._proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        """The REST base URL (identity at /identity, REST at /rest, bulk at /bulk)."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def ca_bundle(self) -> str | None:
        """The sandbox CA a client trusts to talk to it over HTTPS (None without ``tls``)."""
        return str((self.data_dir / "ca.pem").resolve()) if self.tls else None

    @property
    def verify(self) -> str | bool:
        """What to pass as ``requests``' ``verify``: the CA bundle with ``tls``, else True."""
        return self.ca_bundle or True

    @property
    def admin_url(self) -> str:
        return self.base_url + "/_sandbox"

    def connection_json(self) -> str:
        """The value for ``AIRFLOW_CONN_MARKETO_DEFAULT``."""
        conn = {"conn_type": "http", "host": self.base_url, "login": self.client_id, "password": self.client_secret}
        if self.tls:
            conn["extra"] = {"verify": self.ca_bundle}
        return json.dumps(conn)

    def start(self, timeout_s: float = 30.0) -> "MarketoSandbox":
        """Run the server in a child process; return once it answers."""
        if self._proc is not None:
            return self
        if not self.port:
            self.port = _free_port(self.host)
        if self.tls:  # the CA exists before the child answers, so the readiness check below can trust it
            from .tls import ensure_tls

            ensure_tls(self.data_dir, self.host)
        calls, seconds = self.rate_limit
        cmd = [sys.executable, "-m", "sandbox.marketo", "--host", self.host, "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--client-id", self.client_id,
               "--token-ttl", str(self.token_ttl_s), "--daily-quota", str(self.daily_quota),
               "--rate-limit", f"{calls}/{seconds}", "--max-concurrent", str(self.max_concurrent),
               "--export-delay", str(self.export_delay_s)] + (["--tls"] if self.tls else [])
        env = {**os.environ, "MARKETO_SANDBOX_CLIENT_SECRET": self.client_secret}
        self._proc = process.spawn(cmd, self.data_dir / "sandbox.log", env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                tail = (self.data_dir / "sandbox.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Marketo sandbox exited with code {code} on port {self.port}:\n{tail}")
            try:
                if requests.get(self.admin_url + "/health", timeout=1, verify=self.verify).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Marketo sandbox did not answer on {self.base_url} within {timeout_s} s")

    def stop(self) -> None:
        """Terminate the child and wait for it; leaves no process behind."""
        proc, self._proc = self._proc, None
        process.stop(proc)

    # Admin helpers (the same JSON API a shell user would call with curl).
    def admin(self, method: str, path: str, **kwargs):
        """Call the admin API and return its JSON."""
        kwargs.setdefault("verify", self.verify)
        resp = requests.request(method, self.admin_url + path, timeout=kwargs.pop("timeout", 120), **kwargs)
        resp.raise_for_status()
        return resp.json()

    def seed_leads(self, leads: list[dict]) -> list[int]:
        """Insert leads directly (no activities) and return their ids."""
        out = self.admin("POST", "/leads", json={"leads": leads})
        return out.get("ids") or list(range(out["first_id"], out["last_id"] + 1))

    def reset(self) -> None:
        self.admin("POST", "/reset")

    def calls(self) -> dict:
        return self.admin("GET", "/calls")

    def fault(self, kind: str, count: int = 1, path_prefix: str | None = None, seconds: float = 0.0,
              status: int | None = None) -> None:
        body = {"kind": kind, "count": count, "path_prefix": path_prefix, "seconds": seconds}
        if status:
            body["status"] = status
        self.admin("POST", "/faults", json=body)

    def clear_faults(self) -> None:
        self.admin("DELETE", "/faults")

    def hold_bulk(self, hold: bool = True) -> dict:
        """Keep queued bulk jobs (exports, imports) from starting, or let them go; returns the bulk state."""
        return self.admin("POST", "/bulk/hold", json={"hold": hold})

    def bulk(self) -> dict:
        """``{"hold": bool, "peak_importing": n}``."""
        return self.admin("GET", "/bulk")

    def __enter__(self) -> "MarketoSandbox":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

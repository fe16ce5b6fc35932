"""The custom service's credentials (LaunchPoint client id and secret), kept beside the sandbox's data."""

from __future__ import annotations

import json
import secrets
from pathlib import Path


def load_or_create_credentials(data_dir: Path, client_id: str | None = None,
                               client_secret: str | None = None) -> tuple[str, str]:
    """The custom service's credentials, kept in ``data_dir`` so a restarted sandbox accepts the same connection.

    Given values replace stored ones; missing ones are generated once.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "credentials.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    cid = client_id or stored.get("client_id") or f"{secrets.token_hex(4)}-{secrets.token_hex(2)}-sandbox"
    secret = client_secret or stored.get("client_secret") or secrets.token_urlsafe(24)
    if stored != {"client_id": cid, "client_secret": secret}:
        path.write_text(json.dumps({"client_id": cid, "client_secret": secret}))
        path.chmod(0o600)
    return cid, secret

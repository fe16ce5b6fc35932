"""HTTPS for the Marketo sandbox: the sandbox CA and a server certificate, as the Dataverse sandbox makes them.

The CA is created on the first start in the data folder (``ca.pem``, its key ``ca.key``) and kept, so a
client that trusts ``ca.pem`` keeps trusting restarts; the server certificate (``server.pem``, key and
chain) is issued at each start for the host plus ``127.0.0.1`` and ``localhost``.
"""

from __future__ import annotations

from pathlib import Path


def ensure_tls(data_dir: Path, host: str) -> tuple[Path, Path]:
    """Create or reuse the CA in ``data_dir`` and issue the server certificate; returns (ca.pem, server.pem)."""
    from sandbox.dataverse.identity import ensure_tls as _ensure_tls  # trustme; only when TLS is asked for

    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return _ensure_tls(data_dir, host)

"""``python -m sandbox.dataverse --port 8711 --data-dir .sandbox/dataverse``: run the sandbox in the foreground."""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import uvicorn

from .app import DEFAULT_DOP_HINT, create_app
from .identity import Identity, ensure_tls


def main(argv: list[str] | None = None) -> None:
    """Serve the sandbox over HTTPS until interrupted; writes ``server.json`` (port, pid) once listening."""
    parser = argparse.ArgumentParser(prog="python -m sandbox.dataverse", description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("DATAVERSE_PORT", 8711)))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--data-dir", type=Path, default=Path(".sandbox/dataverse"))
    parser.add_argument("--token-ttl", type=int, default=3600, help="access token lifetime, seconds")
    parser.add_argument("--requests-per-window", type=int, default=6000)
    parser.add_argument("--window", type=int, default=300, help="service protection window, seconds")
    parser.add_argument("--max-concurrent", type=int, default=52)
    parser.add_argument("--dop-hint", type=int, default=DEFAULT_DOP_HINT,
                        help="x-ms-dop-hint of Web API responses (0: not sent)")
    args = parser.parse_args(argv)

    data_dir = args.data_dir.resolve()
    identity = Identity.ensure(data_dir)
    ca_path, server_pem = ensure_tls(data_dir, args.host)
    # Bind first so port 0 resolves to a real port before the app (which needs its own URL) is built.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    org_url = f"https://{args.host}:{port}"
    app = create_app(data_dir, identity, org_url, token_ttl_s=args.token_ttl,
                     requests_per_window=args.requests_per_window, window_s=args.window,
                     max_concurrent=args.max_concurrent, dop_hint=args.dop_hint or None)
    config = uvicorn.Config(app, ssl_certfile=str(server_pem), ssl_keyfile=str(server_pem), log_level="warning",
                            access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    (data_dir / "server.json").write_text(json.dumps({"port": port, "pid": os.getpid(), "org_url": org_url}))
    print(f"Dataverse sandbox on {org_url} (CA {ca_path})", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown; nothing left to do
        pass


if __name__ == "__main__":
    main()

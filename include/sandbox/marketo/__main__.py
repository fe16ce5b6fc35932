"""Run the Marketo sandbox in the foreground: ``python -m sandbox.marketo --port 8710 --data-dir .sandbox/marketo``.

With ``--tls`` it serves HTTPS with a certificate of the sandbox CA (``<data-dir>/ca.pem``, created on the first
start and kept, the Dataverse sandbox's machinery); a client trusts that file (``verify=<data-dir>/ca.pem``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.marketo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MARKETO_PORT", 8710)))
    parser.add_argument("--data-dir", type=Path, default=Path(".sandbox/marketo"))
    parser.add_argument("--client-id", default=None)
    parser.add_argument("--token-ttl", type=int, default=3600, help="access token lifespan in seconds")
    parser.add_argument("--daily-quota", type=int, default=50000)
    parser.add_argument("--rate-limit", default="100/20", help="CALLS/SECONDS, Marketo's is 100/20")
    parser.add_argument("--max-concurrent", type=int, default=10)
    parser.add_argument("--export-delay", type=float, default=0.0, help="seconds a bulk export job stays Processing")
    parser.add_argument("--tls", action="store_true",
                        help="serve HTTPS with a certificate of the sandbox CA (<data-dir>/ca.pem)")
    args = parser.parse_args(argv)
    calls, seconds = args.rate_limit.split("/")

    import uvicorn

    from .app import create_app

    # The secret never goes on a command line (visible in ps): it comes from the environment or data_dir.
    app = create_app(args.data_dir, client_id=args.client_id,
                     client_secret=os.environ.get("MARKETO_SANDBOX_CLIENT_SECRET") or None,
                     token_ttl_s=args.token_ttl, daily_quota=args.daily_quota,
                     rate_limit=(int(calls), float(seconds)), max_concurrent=args.max_concurrent,
                     export_delay_s=args.export_delay)
    tls = {}
    if args.tls:
        from .tls import ensure_tls

        _ca, server_pem = ensure_tls(args.data_dir, args.host)
        tls = {"ssl_certfile": str(server_pem), "ssl_keyfile": str(server_pem)}
    # No access log: identity calls carry the client secret in their query string. A client's idle keep-alive
    # connection (a TLS one keeps uvicorn waiting) does not hold up a stop for more than a second.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=1, **tls)


if __name__ == "__main__":
    main()

"""Seed 1,000,000 contacts into a fresh Dataverse sandbox and time paging through all of them.

Not part of the test run: ``.venv/bin/python bench/dataverse_sandbox_bench.py [--rows N] [--page-size N]``.
Prints seed throughput, full-read paging throughput (5,000-row pages through the client, as the sync
reads), a change-tracking delta after 1,000 updates, and a filtered keyed lookup on the big table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "include")]

from mdsync.dynamics import DynamicsClient, eq  # noqa: E402
from sandbox.dataverse import DataverseSandbox  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--seed-batch", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dv-bench-") as tmp, DataverseSandbox(Path(tmp)) as sb:
        started = time.perf_counter()
        for start in range(0, args.rows, args.seed_batch):
            n = min(args.seed_batch, args.rows - start)
            sb.admin("POST", "rows/contacts", {"return_ids": False, "rows": [
                {"firstname": f"First{i}", "lastname": f"Last{i}", "emailaddress1": f"person{i}@example.com",
                 "mdsync_marketopersonid": str(i), "jobtitle": "Engineer"} for i in range(start, start + n)]})
        seeded = time.perf_counter() - started
        print(f"seed: {args.rows:,} rows in {seeded:.1f} s ({args.rows / seeded:,.0f} rows/s)")

        client = DynamicsClient(sb.org_url, sb.client_id, sb.client_secret, sb.tenant_id, authority=sb.authority,
                                verify=sb.ca_bundle)
        columns = ["firstname", "lastname", "emailaddress1", "mdsync_marketopersonid", "modifiedon"]
        started = time.perf_counter()
        changes = client.track_changes("contacts", columns, page_size=args.page_size)
        read = time.perf_counter() - started
        assert len(changes.changed) == args.rows and changes.changed["contactid"].is_unique
        print(f"full read (change tracking, {args.page_size}-row pages): {len(changes.changed):,} rows in "
              f"{read:.1f} s ({len(changes.changed) / read:,.0f} rows/s, {client.calls_made} calls)")

        ids = list(changes.changed["contactid"][:1000])
        started = time.perf_counter()
        client.update_multiple("contacts", [{"contactid": i, "jobtitle": "Manager"} for i in ids])
        delta = client.track_changes("contacts", columns, changes.delta_link)
        took = time.perf_counter() - started
        assert len(delta.changed) == 1000
        print(f"1,000 updates (UpdateMultiple) + delta read: {took:.2f} s")

        started = time.perf_counter()
        one = client.query("contacts", columns, filter=eq("mdsync_marketopersonid", str(args.rows // 2)))
        print(f"keyed lookup on {args.rows:,} rows: {len(one)} row in {(time.perf_counter() - started) * 1000:.0f} ms")


if __name__ == "__main__":
    main()

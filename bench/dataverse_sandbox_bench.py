"""Seed 1,000,000 contacts into a fresh Dataverse sandbox, time paging through all of them and bulk updates.

Not part of the test run: ``.venv/bin/python bench/dataverse_sandbox_bench.py [--rows N] [--page-size N]
[--update-rows N] [--parallel 1,2,4]``. Prints seed throughput, full-read paging throughput (5,000-row pages
through the client, as the sync reads), a change-tracking delta after 1,000 updates, a filtered keyed lookup
on the big table, then ``UpdateMultiple`` of ``--update-rows`` rows through the client (1,000 a request, as
the first sync's load writes them: three columns and the alternate key, which every row gets anew) once per
``--parallel`` value (requests in flight at once), with rows/s, the sandbox's peak of requests in flight,
the machine and its load average (other work on the same cores slows the figures down).
"""

from __future__ import annotations

import argparse
import os
import platform
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
    parser.add_argument("--update-rows", type=int, default=200_000)
    parser.add_argument("--parallel", default="1,4", help="comma-separated requests in flight, one run each")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {_cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"
          f"; load average {_load()}")
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

        ids = list(changes.changed["contactid"][:args.update_rows])
        for run, parallel in enumerate(int(p) for p in args.parallel.split(",")):
            writer = DynamicsClient(sb.org_url, sb.client_id, sb.client_secret, sb.tenant_id,
                                    authority=sb.authority, verify=sb.ca_bundle)
            writer.max_parallel_requests = parallel
            writer.request("GET", "WhoAmI")  # token (and x-ms-dop-hint) first, as a load task has them
            _admin(sb, "POST", "concurrency/reset")
            rows = [{"contactid": i, "jobtitle": f"Run {run}", "address1_city": "Paris", "telephone1": f"+1 {n}",
                     "mdsync_marketopersonid": f"r{run}-{n}"} for n, i in enumerate(ids)]
            load_before, calls_before = _load(), writer.calls_made
            started, cpu, server_cpu = time.perf_counter(), time.process_time(), _cpu_seconds(sb)
            result = writer.update_multiple("contacts", rows)
            took, cpu = time.perf_counter() - started, time.process_time() - cpu
            server_cpu = _cpu_seconds(sb) - server_cpu
            assert result["ok"].all() and len(result) == len(ids)
            peak = (_admin(sb, "GET", "concurrency") or {}).get("peak", "n/a")
            print(f"UpdateMultiple of {len(ids):,} rows, {parallel} in flight: {took:.1f} s "
                  f"({len(ids) / took:,.0f} rows/s, {writer.calls_made - calls_before} calls, sandbox peak in flight "
                  f"{peak}; CPU: sandbox {server_cpu:.1f} s ({server_cpu / len(ids) * 1e6:.0f} us a row), client "
                  f"{cpu:.1f} s; load average {load_before} -> {_load()})")


def _admin(sb, method: str, path: str):
    """An admin call that older sandboxes may not have (None then), so the bench also runs against them."""
    try:
        return sb.admin(method, path)
    except Exception:  # noqa: BLE001
        return None


def _cpu_seconds(sb) -> float:
    """CPU time (user + system) the sandbox process has used so far."""
    fields = Path(f"/proc/{sb._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()

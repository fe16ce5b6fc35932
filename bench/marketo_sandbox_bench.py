"""Marketo sandbox at scale: seed 1,000,000 leads, then time paging, lookups, lead changes, a bulk lead export,
a bulk import of 1,000,000 rows through the client (update by id: two fields each) and a bulk activity export of
the changes it recorded.

Run: ``.venv/bin/python bench/marketo_sandbox_bench.py [--leads 1000000]`` (not part of the test run).
Paging uses the real client with limits raised (the emulator's limiter is widened to match), because at
Marketo's 100 calls / 20 s walking 1M leads 300 at a time takes ~19 hours by design, not by the emulator.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from mdsync.marketo import MarketoClient
from sandbox.marketo import MarketoSandbox

SEED_BATCH = 50_000


def lead(i: int) -> dict:
    return {"email": f"person{i}@bench.example.com", "firstName": f"First{i}", "lastName": f"Last{i}",
            "company": f"Company {i % 5000}", "leadScore": i % 100, "syncToDynamics": i % 10 == 0,
            "dynamicsRecordType": "contact" if i % 3 == 0 else "lead",
            "createdAt": (datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=i * 2)).strftime(
                "%Y-%m-%dT%H:%M:%SZ")}


def client_calls(sb: MarketoSandbox, endpoint: str) -> int:
    return sb.calls()["by_endpoint"].get(endpoint, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leads", type=int, default=1_000_000)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="marketo-bench-"))
    with MarketoSandbox(data_dir, rate_limit=(100_000, 20), max_concurrent=10, daily_quota=10_000_000) as sb:
        sb.reset()
        started = time.monotonic()
        http = requests.Session()
        for first in range(0, args.leads, SEED_BATCH):
            batch = [lead(i) for i in range(first, min(args.leads, first + SEED_BATCH))]
            http.post(sb.admin_url + "/leads", json={"leads": batch}, timeout=600).raise_for_status()
        seed_s = time.monotonic() - started
        print(f"seeded {args.leads:,} leads in {seed_s:.1f} s ({args.leads / seed_s:,.0f} leads/s)")

        client = MarketoClient(sb.base_url, sb.client_id, sb.client_secret, max_calls_per_window=100_000,
                               window_s=20)
        client.describe_leads()

        started = time.monotonic()
        frame = client.get_leads("dynamicsRecordType", ["contact"], fields=["email", "firstName", "leadScore"])
        page_s = time.monotonic() - started
        pages = -(-len(frame) // 300)
        print(f"paged {len(frame):,} leads ({pages:,} pages of 300) in {page_s:.1f} s "
              f"({page_s / pages * 1000:.1f} ms/page)")

        ids = list(range(1, args.leads + 1, max(1, args.leads // 3000)))[:3000]
        started = time.monotonic()
        got = client.get_leads("id", ids, fields=["email"])
        print(f"looked up {len(got):,} leads by id in {time.monotonic() - started:.2f} s")

        started = time.monotonic()
        emails = [f"person{i}@bench.example.com" for i in ids[:300]]
        got = client.get_leads("email", emails, fields=["firstName"])
        print(f"looked up {len(got)} leads by email in {time.monotonic() - started:.2f} s")

        token = client.get_paging_token(datetime.now(timezone.utc) - timedelta(seconds=5))
        started = time.monotonic()
        result = client.sync_leads([{"email": e, "firstName": "Changed"} for e in emails * 10])
        print(f"synced {len(result):,} records in {time.monotonic() - started:.2f} s")
        started = time.monotonic()
        changes, _ = client.get_lead_changes(token, ["firstName"])
        print(f"read {len(changes):,} lead changes in {time.monotonic() - started:.2f} s")

        started = time.monotonic()
        export = client.export_leads(["email", "firstName", "leadScore", "syncToDynamics"],
                                     created_at=(datetime(2026, 1, 1, tzinfo=timezone.utc),
                                                 datetime(2026, 1, 31, tzinfo=timezone.utc)),
                                     poll_interval_s=0.5)
        print(f"bulk-exported {len(export):,} leads (31 days) in {time.monotonic() - started:.1f} s")

        since = datetime.now(timezone.utc) - timedelta(seconds=5)
        started = time.monotonic()
        updates = [{"id": i, "title": f"Title {i}", "leadScore": (i * 7) % 100} for i in range(1, args.leads + 1)]
        imported = client.import_leads(updates, poll_interval_s=0.5)
        import_s = time.monotonic() - started
        jobs = client_calls(sb, "POST /bulk/v1/leads.json")
        print(f"bulk-imported {len(imported):,} rows in {jobs} files of <10 MB in {import_s:.1f} s "
              f"({len(imported) / import_s:,.0f} rows/s; {(imported['status'] == 'updated').sum():,} updated, "
              f"{(imported['status'] == 'skipped').sum():,} skipped; {import_s / jobs:.1f} s per file end to end)")

        started = time.monotonic()
        activities = client.export_activities([12, 13], created_at=(since, datetime.now(timezone.utc)),
                                              poll_interval_s=0.5)
        print(f"bulk-exported {len(activities):,} activities in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()

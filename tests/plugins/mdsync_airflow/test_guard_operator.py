"""The mass-change approval operator (mdsync_airflow.operators.guard) without a DAG run: when it skips, how long
it waits, and what the approval request says. The DAG runs it for real in tests/dags/test_mass_change_guard.py."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from mdsync.results import ChangeSample, GuardDecision, SideChanges
from mdsync_airflow.operators.guard import MassChangeApprovalOperator, answer_timeout, body, subject


def decision(outcome: str = "awaiting_approval") -> GuardDecision:
    sample = [ChangeSample(entity="contact", person_id=7, dynamics_id="c-7", field="job_title", old="Engineer",
                           new="Intern | **CEO** <script>x</script>\nnext line"),
              ChangeSample(entity="contact", person_id=8, dynamics_id="c-8", field="city", old=None, new="Rome")]
    return GuardDecision(max_records=5000, max_percent=10, outcome=outcome, sides={
        "dynamics": SideChanges(records=12, linked=None, threshold=5000),
        "marketo": SideChanges(records=12_345, linked=40_000, threshold=5000, updated={"contact": 12_340},
                               created={"lead": 5}, fields={"contact": {"job_title": 12_000, "city": 340}},
                               sample=sample)})


def test_the_wait_is_the_setting_kept_inside_the_run_timeout_and_the_lease():
    hour = timedelta(hours=1)
    assert answer_timeout(10, hour, 900) == (timedelta(minutes=10), None)  # the defaults fit
    wait, why = answer_timeout(45, hour, 900)  # a parked task renews no lease: it must end before the TTL lapses
    assert wait == timedelta(minutes=13) and "MDSYNC_LEASE_TTL_SECONDS" in why
    wait, why = answer_timeout(45, hour, None)  # the loads of an approved mass change need time too
    assert wait == timedelta(minutes=30) and "dagrun_timeout" in why
    assert answer_timeout(0.02, hour, 900) == (timedelta(seconds=1.2), None)


def test_the_request_shows_counts_per_side_entity_and_field_and_a_sample_old_to_new():
    d = decision()
    text = body(d, timedelta(minutes=10), datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc), "scheduled__2026-12-01")
    assert "**nothing has been written yet**" in text
    assert "| Marketo | **12,345** | 12,340 | 5 | 0 | 40,000 | 5,000 | **over** |" in text
    assert "| Dynamics | **12** | 0 | 0 | 0 | – | 5,000 |  |" in text
    assert "| Marketo | contact | job\\_title | 12,000 |" in text and "| Marketo | lead | (new records) | 5 |" in text
    assert text.index("job\\_title | 12,000") < text.index("city | 340")  # largest first
    # values are one table cell each: markup, HTML and pipes escaped, newlines folded
    assert "| contact | 7 | c-7 | job\\_title | Engineer | Intern \\| \\*\\*CEO\\*\\* \\<script\\>x\\</script\\> next line |" in text
    assert "| contact | 8 | c-8 | city | *(empty)* | Rome |" in text
    assert "no answer by 2026-12-01 12:00 UTC (10 minutes): nothing is written" in text
    assert '{"allow_mass_change": true}' in text
    assert subject(d, "run-1") == "Mass change held: 12,345 records to Marketo in run run-1. Approve the writes?"


@pytest.mark.parametrize("outcome", ["under_threshold", "dry_run", "allowed"])
def test_it_skips_when_the_guard_does_not_ask(outcome):
    from airflow.providers.common.compat.sdk import AirflowSkipException

    op = MassChangeApprovalOperator(decision=decision(outcome=outcome).dump())
    with pytest.raises(AirflowSkipException, match="no approval needed"):
        op.execute({"run_id": "run-1"})


def test_a_timeout_answers_reject_and_the_request_is_never_templated():
    op = MassChangeApprovalOperator(decision={"outcome": "under_threshold"})
    assert op.options == ["Approve", "Reject"] and op.defaults == ["Reject"]
    assert "decision" in op.template_fields  # an XComArg there is resolved as is (never rendered as Jinja)


def test_skipping_imports_neither_pandas_nor_the_engine():
    probe = """
import sys
from airflow.providers.common.compat.sdk import AirflowSkipException
from mdsync_airflow.operators import MassChangeApprovalOperator
op = MassChangeApprovalOperator(decision={"outcome": "under_threshold", "sides": {}})
try:
    op.execute({"run_id": "r"})
except AirflowSkipException:
    pass
heavy = [m for m in ("pandas", "pyarrow", "mdsync") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]

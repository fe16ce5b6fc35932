"""The mass-change approval: Airflow 3's human-in-the-loop ``ApprovalOperator`` on the guard's decision.

The DAG's ``check_mass_change`` task runs :meth:`mdsync.cycle.Cycle.check_guard` on the plans (:mod:`mdsync.guard`)
and hands its :class:`~mdsync.results.GuardDecision` to ``approve_mass_change``, an instance of
:class:`MassChangeApprovalOperator`, which sits between the plans and the loads:

- the decision does not ask (under the threshold, a dry run, or ``allow_mass_change``): the task **skips** at
  once, reading nothing but that small XCom (no pandas, no engine import), and the loads go ahead;
- it asks: the task writes an approval request (subject, a Markdown body with the counts per side, entity and
  field and a sample of the changes old -> new) and parks in ``awaiting_input`` (no worker slot held). The
  Required Actions page of the Airflow UI (or ``PATCH …/taskInstances/approve_mass_change/-1/hitlDetails``)
  answers it. **Approve**: the loads run. **Reject**, or no answer within ``MDSYNC_GUARD_TIMEOUT_MINUTES``
  (the default answer is Reject): the loads and commit are skipped, so nothing is written and the watermarks
  and baselines stay where they were: the same changes are planned again next cycle.

Either way the outcome (``approved``, ``rejected``, ``timed_out``, and who answered) is pushed as XCom
``guard`` for the report (:func:`guard_outcome`).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.providers.common.compat.sdk import AirflowSkipException
from airflow.providers.standard.operators.hitl import ApprovalOperator

GUARD_TASK_ID = "check_mass_change"
APPROVAL_TASK_ID = "approve_mass_change"
#: the XCom key of the decision with the approval's outcome
XCOM_KEY = "guard"
#: the loads of an approved mass change need time too: the wait takes at most this share of dagrun_timeout
RUN_TIMEOUT_SHARE = 0.5
#: a parked task renews no lease: the wait ends this long before the cycle lease's TTL would lapse
LEASE_MARGIN = timedelta(minutes=2)
#: rows of the per-field table in the request
FIELD_ROWS = 30

_WHY_NOT_ASKED = {
    "under_threshold": "the plans are under the mass-change threshold",
    "dry_run": "a dry run writes nothing and never asks",
    "allowed": "the run parameter allow_mass_change lets this run write without asking",
}


def answer_timeout(minutes: float, dagrun_timeout: timedelta | None = None,
                     lease_ttl_s: float | None = None) -> tuple[timedelta, str | None]:
    """How long the request waits: ``MDSYNC_GUARD_TIMEOUT_MINUTES``, kept well inside the run's
    ``dagrun_timeout`` (the loads still have to run) and the cycle lease's TTL (a parked task renews nothing).

    :returns: the wait and, when the setting was cut, why.
    """
    wanted = timedelta(minutes=minutes)
    caps = []
    if dagrun_timeout:
        caps.append((dagrun_timeout * RUN_TIMEOUT_SHARE, f"half the DAG's dagrun_timeout of {dagrun_timeout}"))
    if lease_ttl_s:
        caps.append((timedelta(seconds=lease_ttl_s) - LEASE_MARGIN,
                     f"the cycle lease's TTL ({lease_ttl_s:g} s, MDSYNC_LEASE_TTL_SECONDS) less {LEASE_MARGIN}"))
    cap, why = min(caps, default=(wanted, None), key=lambda c: c[0])
    if wanted <= cap or cap <= timedelta(0):
        return wanted, None
    return cap, f"MDSYNC_GUARD_TIMEOUT_MINUTES={minutes:g} is cut to {cap}: {why}"


def _n(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _cell(value: str | None) -> str:
    """A value as a Markdown table cell: inline markup, HTML and table syntax escaped, on one line."""
    if value is None:
        return "*(empty)*"
    text = " ".join(str(value).split())
    for ch in "\\`*_[]<>#|~":
        text = text.replace(ch, "\\" + ch)
    return text or "*(blank)*"


def _code(text: str) -> str:
    """Inline code (no escapes apply inside it: a backtick in the text would end it)."""
    return "`" + text.replace("`", "'") + "`"


def subject(decision, run_id: str) -> str:
    over = [f"{s.records:,} records to {name.capitalize()}" for name, s in decision.sides.items() if s.tripped]
    return f"Mass change held: {' and '.join(over)} in run {run_id}. Approve the writes?"


def body(decision, timeout: timedelta, deadline: datetime, run_id: str) -> str:
    """The request's Markdown: counts per side, entity and field, a sample of the changes, what each answer does.

    It holds field names, record ids and the planned values only: nothing from the connections.
    """
    sides = decision.sides
    out = [f"Run {_code(run_id)} would write more records to one side than the mass-change guard allows "
           f"(more than {decision.max_records:,} records, or {decision.max_percent:g} % of the side's linked records "
           f"if that is more), so **nothing has been written yet**.", "",
           "| side | records to write | updated | created | deleted | linked before | threshold | |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, s in sides.items():
        out.append(f"| {name.capitalize()} | **{s.records:,}** | {sum(s.updated.values()):,} | "
                   f"{sum(s.created.values()):,} | {sum(s.deleted.values()):,} | {_n(s.linked)} | {s.threshold:,} | "
                   f"{'**over**' if s.tripped else ''} |")
    rows = [(name, entity, field, n) for name, s in sides.items() for entity, fields in s.fields.items()
            for field, n in fields.items()]
    rows += [(name, entity, "(new records)", n) for name, s in sides.items() for entity, n in s.created.items()]
    rows += [(name, entity, "(records deleted)", n) for name, s in sides.items() for entity, n in s.deleted.items()]
    rows.sort(key=lambda r: (-r[3], r[0], r[1], r[2]))
    if rows:
        out += ["", "**Records per field**", "", "| side | entity | field | records |", "| --- | --- | --- | ---: |"]
        out += [f"| {side.capitalize()} | {_cell(entity)} | {_cell(field)} | {n:,} |" for side, entity, field, n in rows[:FIELD_ROWS]]
        if len(rows) > FIELD_ROWS:
            out.append(f"| … | | {len(rows) - FIELD_ROWS} more fields | |")
    for name, s in sides.items():
        if not s.sample:
            continue
        out += ["", f"**A sample of the changes to {name.capitalize()}** (old → new)", "",
                "| entity | Marketo person | Dynamics record | field | old | new |", "| --- | --- | --- | --- | --- | --- |"]
        out += [f"| {_cell(c.entity)} | {c.person_id} | {_cell(c.dynamics_id)} | {_cell(c.field)} | {_cell(c.old)} | "
                f"{_cell(c.new)} |" for c in s.sample]
    minutes = timeout.total_seconds() / 60
    out += ["", f"- **Approve**: the loads write all of it now.",
            f"- **Reject**, or no answer by {deadline:%Y-%m-%d %H:%M} UTC ({minutes:g} minutes): nothing is written. "
            "The watermarks and baselines stay where they are, so the same changes are planned again next cycle "
            "(and ask again). Fix the data upstream first if this was a mistake.",
            '- To let one manual run through without asking, trigger it with `{"allow_mass_change": true}`.']
    return "\n".join(out)


class MassChangeApprovalOperator(ApprovalOperator):
    """Asks for approval when the guard's decision says so; skips otherwise (see the module docs).

    :param decision: the ``check_mass_change`` task's result (an XComArg; resolved as is, never templated).
    """

    template_fields = (*ApprovalOperator.template_fields, "decision")

    def __init__(self, *, decision: Any, task_id: str = APPROVAL_TASK_ID, **kwargs) -> None:
        kwargs.setdefault("subject", "Mass change: approve the sync's writes?")
        kwargs.setdefault("defaults", ApprovalOperator.REJECT)  # what a timeout answers
        super().__init__(task_id=task_id, **kwargs)
        self.decision = decision

    def execute(self, context):
        decision = self.decision or {}
        outcome = decision.get("outcome", "under_threshold")
        if outcome != "awaiting_approval":
            raise AirflowSkipException(f"no approval needed: {_WHY_NOT_ASKED.get(outcome, outcome)}")
        from mdsync.results import GuardDecision
        from mdsync.settings import Settings

        from mdsync_airflow.runtime import leased_cycle

        d = GuardDecision.model_validate(decision)
        with leased_cycle(context):  # renewed now: the wait below is kept shorter than the lease's TTL
            pass
        settings = Settings.from_env()
        timeout, cut = answer_timeout(settings.guard_timeout_minutes, getattr(context.get("dag"), "dagrun_timeout", None),
                                        getattr(settings, "lease_ttl_seconds", None))
        if cut:
            self.log.warning(cut)
        run_id = context["run_id"]
        self.response_timeout = timeout
        self.subject = subject(d, run_id)
        self.body = body(d, timeout, datetime.now(timezone.utc) + timeout, run_id)
        self.log.warning("%s Waiting up to %s for an answer on the Required Actions page (Browse -> Required "
                         "Actions, or this task's Required Actions tab); no answer means Reject.", self.subject, timeout)
        return super().execute(context)

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        timed_out = bool(event.get("timedout")) or event.get("error_type") == "timeout"
        chosen = event.get("chosen_options") or []
        user = event.get("responded_by_user") or {}
        result = dict(self.decision or {})
        result["outcome"] = ("timed_out" if timed_out else
                             "approved" if chosen == [self.APPROVE] else "rejected")
        result["responded_by"] = None if timed_out else (user.get("name") or user.get("id"))
        from mdsync.guard import describe

        say = self.log.info if result["outcome"] == "approved" else self.log.warning
        for line in describe(_validated(result)):
            say(line)
        context["ti"].xcom_push(key=XCOM_KEY, value=result)
        super().execute_complete(context=context, event=event)  # a Reject skips the loads (and so commit)
        return result


def _validated(result: dict):
    from mdsync.results import GuardDecision

    return GuardDecision.model_validate(result)


def guard_outcome(context, checked: dict | None) -> dict | None:
    """The run's guard decision as the report sees it: the approval's outcome when it asked, else the check's."""
    answered = context["ti"].xcom_pull(task_ids=APPROVAL_TASK_ID, key=XCOM_KEY)
    return answered or checked

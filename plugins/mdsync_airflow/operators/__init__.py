"""Airflow operators of the sync (imported by the DAG file at parse time: nothing heavy at import)."""

from mdsync_airflow.operators.guard import APPROVAL_TASK_ID, MassChangeApprovalOperator, guard_outcome

__all__ = ["APPROVAL_TASK_ID", "MassChangeApprovalOperator", "guard_outcome"]

"""Marketo Engage REST client (no Airflow imports): ``from mdsync.marketo import MarketoClient``."""

from .client import MarketoClient, TransientError, quota_reset_time
from .limits import CallLimits

__all__ = ["MarketoClient", "CallLimits", "TransientError", "quota_reset_time"]

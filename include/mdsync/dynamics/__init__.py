"""Dataverse (Dynamics 365) Web API client: MSAL auth, OData paging and change tracking, bulk writes with a
``$batch`` fallback, metadata and field permissions, lead lifecycle. No Airflow imports.

>>> from mdsync.dynamics import DynamicsClient, odata_literal
"""

from .client import ChangeSet, DynamicsClient
from .odata import and_, column, compare, eq, isin, key_segment, odata_literal, or_, startswith

__all__ = ["ChangeSet", "DynamicsClient", "and_", "column", "compare", "eq", "isin", "key_segment",
           "odata_literal", "or_", "startswith"]

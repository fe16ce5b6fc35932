"""Who may see and do what: the Airflow user of the request, checked by Airflow's own auth manager.

Plugin routes are not protected by Airflow by default, so every route of the console depends on
:data:`can_read` (or :data:`can_trigger` for actions that start runs). Without a token the answer is 401, with a
bad one 403, and with a user lacking the permission 403: never data.
"""

from __future__ import annotations

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import get_user, requires_access_dag
from fastapi import Depends

from mdsync_airflow.run_once import DAG_ID

#: reading the sync's runs (and so its decisions): the DAG's runs must be readable by the user
can_read = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID))
#: starting a run of the sync (retry selected errors, undo a run): the user must be allowed to trigger the DAG
can_trigger = Depends(requires_access_dag("POST", DagAccessEntity.RUN, param_dag_id=DAG_ID))
#: the user of the request (for "who asked" notes on runs started from the console)
current_user = Depends(get_user)

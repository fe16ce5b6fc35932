"""Marketo Engage <-> Dynamics 365 sync engine.

Importable without Airflow: the DAG and the hooks in ``plugins/`` wire these modules together, one module
per stage of the cycle (config, extract, diff, resolve, plan, load, state).
"""

__version__ = "0.1.0"

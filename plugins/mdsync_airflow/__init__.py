"""Airflow glue for the Marketo <-> Dynamics sync: hooks (and later operators and the UI plugin)."""

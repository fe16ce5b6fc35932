"""Thin hooks: read an Airflow connection, hand back a service client from :mod:`mdsync`."""

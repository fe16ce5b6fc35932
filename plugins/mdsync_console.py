"""Registers the sync's operator console with Airflow (the plugins folder's only plugin file)."""

from mdsync_airflow.console.plugin import SyncConsolePlugin

__all__ = ["SyncConsolePlugin"]

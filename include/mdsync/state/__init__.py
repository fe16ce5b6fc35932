"""State store (SQLAlchemy): links, baselines, watermarks, activity log, open sync errors, the cycle lease.

The names below are imported on first use, so ``mdsync.state.schema`` and ``mdsync.state.database`` (what
the cycle-lease tasks need) load without pandas.
"""

from __future__ import annotations

__all__ = ["StateStore", "Watermark", "default_state_url", "open_store"]


def __getattr__(name: str):
    if name == "default_state_url":
        from mdsync.state.database import default_state_url

        return default_state_url
    if name in __all__:
        from mdsync.state import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

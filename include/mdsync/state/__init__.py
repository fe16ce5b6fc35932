"""State store (SQLAlchemy): links, baselines, watermarks, activity log, open sync errors."""

from mdsync.state.store import StateStore, Watermark, default_state_url, open_store

__all__ = ["StateStore", "Watermark", "default_state_url", "open_store"]

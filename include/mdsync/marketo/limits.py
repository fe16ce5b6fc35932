"""Client-side call limits shared by everything that calls one Marketo instance.

Marketo allows 100 calls per 20 s and 10 concurrent calls per instance (rest-api.md). Staying under both on
our side means the service's own limiter (606/615) is never hit in normal operation. The limits are kept per
process, or, with ``MDSYNC_LIMITS_URL`` set, shared by every process of the deployment through Redis
(:mod:`mdsync.limits`), under ``mdsync:limits:marketo:<instance host>``.
"""

from __future__ import annotations

import os
import threading
from urllib.parse import urlsplit

from mdsync import limits as shared
from mdsync.limits import WINDOW_MARGIN, WINDOW_MARGIN_S, widened_window_ms  # noqa: F401 (kept importable here)


class CallLimits(shared.CallLimits):
    """A sliding rate window plus a concurrency cap for one Marketo instance.

    :param max_calls_per_window: calls allowed per window (Marketo: 100).
    :param window_s: window length in seconds (Marketo: 20; our side counts in a slightly longer one).
    :param max_concurrent: calls in flight at once (Marketo: 10).
    :param instance: the instance's REST base URL (its host names the Redis keys).
    :param url: ``redis://...`` to share the limits with every process using that Redis; None: this process.
    :param lease_s: with ``url``: how long a slot of a process that died stays taken.
    """

    def __init__(self, max_calls_per_window: int = 100, window_s: float = 20, max_concurrent: int = 10, *,
                 instance: str = "", url: str | None = None, lease_s: float = 30.0) -> None:
        if max_calls_per_window < 1 or window_s <= 0 or max_concurrent < 1:
            raise ValueError("Marketo call limits must be positive: "
                             f"{max_calls_per_window} calls / {window_s} s, {max_concurrent} concurrent")
        super().__init__("marketo", instance_name(instance), max_calls_per_window=max_calls_per_window,
                         window_ms=widened_window_ms(window_s), max_concurrent=max_concurrent, url=url,
                         lease_s=lease_s)


def instance_name(base_url: str) -> str:
    """The instance's host (``123-abc-456.mktorest.com``, with a port when it has one): its key in Redis."""
    parts = urlsplit(base_url if "://" in base_url else f"//{base_url}")
    return (parts.netloc or base_url).lower().rsplit("@", 1)[-1] or "default"


_shared: dict[tuple, CallLimits] = {}
_shared_lock = threading.Lock()


def shared_limits(instance: str, max_calls_per_window: int, window_s: float, max_concurrent: int,
                  url=shared.FROM_SETTINGS) -> CallLimits:
    """The process-wide :class:`CallLimits` for one Marketo instance and limit setting.

    Clients built for the same instance (several tasks in one worker, several threads) share one budget. With
    a Redis URL (``url``; by default ``MDSYNC_LIMITS_URL``), every process that uses that Redis shares it too.

    :param url: ``redis://host:port/db``, None for per-process limits, or :data:`mdsync.limits.FROM_SETTINGS`.
    """
    url, lease_s = shared.configured(url)
    key = (os.getpid(), instance_name(instance), max_calls_per_window, window_s, max_concurrent, url,
           lease_s if url else None)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = CallLimits(max_calls_per_window, window_s, max_concurrent, instance=instance, url=url,
                                      lease_s=lease_s)
        return _shared[key]

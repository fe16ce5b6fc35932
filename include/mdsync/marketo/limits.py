"""Client-side call limits shared by everything a process does against one Marketo instance.

Marketo allows 100 calls per 20 s and 10 concurrent calls per instance (rest-api.md). Staying under both
on our side means the service's own limiter (606/615) is never hit in normal operation.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from pyrate_limiter import InMemoryBucket, Limiter, Rate

# The service counts a call when it arrives, we count it when it leaves: widen our window a little so
# network jitter cannot squeeze more than the allowed number of arrivals into the service's window.
WINDOW_MARGIN = 0.05
WINDOW_MARGIN_S = 0.1


class CallLimits:
    """A sliding rate window plus a concurrency cap.

    :param max_calls_per_window: calls allowed per window (Marketo: 100).
    :param window_s: window length in seconds (Marketo: 20).
    :param max_concurrent: calls in flight at once (Marketo: 10).
    """

    def __init__(self, max_calls_per_window: int = 100, window_s: float = 20, max_concurrent: int = 10) -> None:
        if max_calls_per_window < 1 or window_s <= 0 or max_concurrent < 1:
            raise ValueError("Marketo call limits must be positive: "
                             f"{max_calls_per_window} calls / {window_s} s, {max_concurrent} concurrent")
        window_ms = int((window_s * (1 + WINDOW_MARGIN) + WINDOW_MARGIN_S) * 1000)
        self._rate = Limiter(InMemoryBucket([Rate(max_calls_per_window, window_ms)]))
        self._slots = threading.BoundedSemaphore(max_concurrent)
        #: seconds spent waiting for a slot or room in the window (progress lines report it)
        self.waited_s = 0.0

    @contextmanager
    def slot(self):
        """Block until a call may be sent (a concurrency slot and room in the window), for its duration."""
        started = time.monotonic()
        with self._slots:
            self._rate.try_acquire("marketo", blocking=True)
            self.waited_s += time.monotonic() - started
            yield


_shared: dict[tuple, CallLimits] = {}
_shared_lock = threading.Lock()


def shared_limits(instance: str, max_calls_per_window: int, window_s: float, max_concurrent: int) -> CallLimits:
    """The process-wide :class:`CallLimits` for one Marketo instance and limit setting.

    Clients built for the same instance (several tasks in one worker, several threads) share one budget.
    """
    key = (instance.rstrip("/").lower(), max_calls_per_window, window_s, max_concurrent)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = CallLimits(max_calls_per_window, window_s, max_concurrent)
        return _shared[key]

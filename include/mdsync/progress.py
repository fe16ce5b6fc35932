"""Progress lines for long stages: records done, calls used, rate and an estimate of what is left."""

from __future__ import annotations

import logging
import time


class Progress:
    """Logs ``label: done/total (pct), rate/s, calls, ~ETA`` at most every ``every_s`` seconds (and at the end).

    :param label: what is being counted, e.g. ``"dynamics: contacts written"``.
    :param total: how many there are in all (None when unknown).
    :param calls: a callable returning the calls made so far (the client's counter), or None.
    """

    def __init__(self, log: logging.Logger, label: str, total: int | None = None, *, calls=None,
                 every_s: float = 10.0) -> None:
        self.log, self.label, self.total, self._calls, self.every_s = log, label, total, calls, every_s
        self.done = 0
        self.started = self._last = time.monotonic()
        self._calls_at_start = calls() if calls else 0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} ({100 * self.done / self.total:.0f}%)"
        text += f" in {elapsed:.0f} s ({rate:,.0f}/s"
        if self._calls:
            text += f", {self._calls() - self._calls_at_start} calls"
        text += ")"
        if self.total and self.done and self.done < self.total:
            text += f", about {(self.total - self.done) / rate:.0f} s left"
        return text

    def finish(self) -> None:
        """Log the final line (always, however quick the work was, when there was any)."""
        if self.done:
            self.log.info("%s", self.line())

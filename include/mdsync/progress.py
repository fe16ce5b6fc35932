"""Progress lines for long stages: records done, calls used, rate and an estimate of what is left."""

from __future__ import annotations

import logging
import time


class Progress:
    """Logs ``label: done/total (pct), rate/s, calls, ~ETA`` at most every ``every_s`` seconds (and at the end).

    :param label: what is being counted, e.g. ``"dynamics: contacts written"``.
    :param total: how many there are in all (None when unknown).
    :param calls: a callable returning the calls made so far (the client's counter), or None.
    :param waited: a callable returning the seconds waited on rate limits so far, or None.
    """

    def __init__(self, log: logging.Logger, label: str, total: int | None = None, *, calls=None, waited=None,
                 every_s: float = 10.0) -> None:
        self.log, self.label, self.total, self._calls, self.every_s = log, label, total, calls, every_s
        self._waited = waited
        self.done = 0
        self.started = self._last = time.monotonic()
        self._calls_at_start = calls() if calls else 0
        self._waited_at_start = waited() if waited else 0.0

    @classmethod
    def for_client(cls, log: logging.Logger, label: str, total: int | None, client) -> "Progress":
        """Progress of work done through ``client``: its call counter and its rate-limit waits."""
        return cls(log, label, total, calls=lambda: getattr(client, "calls_made", 0) or 0,
                   waited=(lambda: client.waited_s) if hasattr(client, "waited_s") else None)

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
        if self._waited:
            text += f", {self._waited() - self._waited_at_start:.0f} s waited on rate limits"
        text += ")"
        if self.total and self.done and self.done < self.total:
            text += f", about {(self.total - self.done) / rate:.0f} s left"
        return text

    def finish(self) -> None:
        """Log the final line when the work took a while (quick work is summed up by its stage's own line)."""
        if self.done and time.monotonic() - self.started >= 2.0:
            self.log.info("%s", self.line())

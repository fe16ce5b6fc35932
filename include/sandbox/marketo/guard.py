"""What stands in front of every sandbox REST call: tokens, limits, injected faults and call counting."""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass

from pyrate_limiter import InMemoryBucket, Limiter, Rate

FAULT_KINDS = ("rate_limit", "concurrency", "server_error", "delay", "expire_tokens", "quota_exhausted", "job_failure",
               "access_denied", "request_timeout", "api_unavailable", "transient_error")
#: Faults answered with a response-level error: kind -> (code, message), the messages of error-codes.md.
#: ``request_timeout`` waits its ``seconds`` first, as a call that ran too long does.
ENVELOPE_FAULTS = {
    "request_timeout": ("604", "Request time-out"),
    "api_unavailable": ("608", "API Temporarily Unavailable"),
    "transient_error": ("713", "Transient Error"),
}
#: Faults that hit bulk jobs when they start (matched against the path that created the job), not requests.
JOB_FAULTS = frozenset({"job_failure"})


@dataclass
class Fault:
    """An injected fault: affects the next ``count`` calls whose path starts with ``path_prefix``."""

    kind: str
    count: int
    path_prefix: str = "/"
    seconds: float = 0.0
    status: int = 502


class Tokens:
    """Issued access tokens and their expiry (Marketo: 3600 s; asking again returns the same token)."""

    def __init__(self, ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._issued: dict[str, float] = {}  # token -> expiry (monotonic)
        self._current: str | None = None

    def issue(self) -> tuple[str, int]:
        """The current token with its remaining lifespan, or a new one when it has expired."""
        now = time.monotonic()
        with self._lock:
            if self._current and self._issued.get(self._current, 0) - now > 1:
                return self._current, int(self._issued[self._current] - now)
            token = f"{secrets.token_hex(4)}-{secrets.token_hex(2)}-{secrets.token_hex(2)}-" \
                    f"{secrets.token_hex(2)}-{secrets.token_hex(6)}:sb"
            self._issued[token] = now + self.ttl_s
            self._current = token
            return token, self.ttl_s

    def check(self, token: str | None) -> tuple[str, str] | None:
        """None when valid, else Marketo's (code, message): 601 unknown/missing, 602 expired."""
        if not token:
            return "601", "Access token invalid"
        with self._lock:
            expiry = self._issued.get(token)
        if expiry is None:
            return "601", "Access token invalid"
        if expiry <= time.monotonic():
            return "602", "Access token expired"
        return None

    def expire_all(self) -> None:
        with self._lock:
            self._issued = {t: 0.0 for t in self._issued}
            self._current = None


class Guard:
    """Rate window (606), concurrency (615), faults and call statistics shared by all requests."""

    def __init__(self, rate_limit: tuple[int, float], max_concurrent: int, token_ttl_s: int) -> None:
        self.rate_limit = rate_limit
        self.max_concurrent = max_concurrent
        self.tokens = Tokens(token_ttl_s)
        self._lock = threading.Lock()
        self._new_window()
        self.in_flight = 0
        self.faults: list[Fault] = []
        self.reset_counts()

    def _new_window(self) -> None:
        calls, window_s = self.rate_limit
        self.limiter = Limiter(InMemoryBucket([Rate(calls, int(window_s * 1000))]))

    def reset_counts(self) -> None:
        with self._lock:
            self.by_endpoint: Counter[str] = Counter()
            self.limited: Counter[str] = Counter()
            self.injected: Counter[str] = Counter()
            self.peak_concurrency = 0

    def reset(self) -> None:
        """Forget counts, faults and the rate window (between tests)."""
        self.reset_counts()
        with self._lock:
            self.faults = []
            self._new_window()

    def count(self, endpoint: str) -> None:
        with self._lock:
            self.by_endpoint[endpoint] += 1

    def stats(self) -> dict:
        with self._lock:
            return {"total": sum(self.by_endpoint.values()), "by_endpoint": dict(self.by_endpoint),
                    "limited": dict(self.limited), "injected": dict(self.injected),
                    "peak_concurrency": self.peak_concurrency, "in_flight": self.in_flight}

    def add_fault(self, fault: Fault) -> None:
        if fault.kind == "expire_tokens":
            self.tokens.expire_all()
            return
        with self._lock:
            self.faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self.faults = []

    def take_faults(self, path: str, *, job: bool = False) -> list[Fault]:
        """Consume the faults that apply to this call: every matching delay, plus the first other fault.

        With ``job``, the faults that apply to a bulk job created through ``path`` (``job_failure``) instead.
        """
        taken: list[Fault] = []
        with self._lock:
            blocking_taken = False
            for f in self.faults:
                if f.count <= 0 or not path.startswith(f.path_prefix) or (f.kind in JOB_FAULTS) != job:
                    continue
                if f.kind == "delay" or not blocking_taken:
                    f.count -= 1
                    taken.append(f)
                    self.injected[f.kind] += 1
                    blocking_taken = blocking_taken or f.kind != "delay"
            self.faults = [f for f in self.faults if f.count > 0]
        return taken

    def enter(self) -> bool:
        """Admit a call into the concurrency slots; False means 615."""
        with self._lock:
            if self.in_flight >= self.max_concurrent:
                self.limited["615"] += 1
                return False
            self.in_flight += 1
            self.peak_concurrency = max(self.peak_concurrency, self.in_flight)
            return True

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def admit_rate(self) -> bool:
        """Record the call in the sliding window; False means 606."""
        ok = self.limiter.try_acquire("calls", blocking=False)
        if not ok:
            with self._lock:
                self.limited["606"] += 1
        return bool(ok)

    def note_quota_exhausted(self) -> None:
        with self._lock:
            self.limited["607"] += 1

"""Call limits for the services, kept per process or shared by every process of a deployment through Redis.

A service's limits hold for everything that calls it: Marketo allows 100 calls per 20 s and 10 concurrent
calls per instance, Dataverse 6,000 requests per 5 minutes and 52 concurrent requests per user. With one
machine a process-local limiter is enough; with several Celery workers each would use the whole allowance.

:class:`CallLimits` is a rate window plus a concurrency cap:

- **local** (``MDSYNC_LIMITS_URL`` unset): a pyrate-limiter :class:`~pyrate_limiter.InMemoryBucket` and a
  thread semaphore, shared by the threads of one process;
- **shared** (``MDSYNC_LIMITS_URL=redis://host:port/db``): the rate window is a pyrate-limiter
  :class:`~pyrate_limiter.RedisBucket` (a sorted-set sliding log, checked and filled by one Lua script),
  timed by the Redis server's clock so that workers on machines whose clocks disagree still share one window;
  the concurrency cap is :class:`RedisSemaphore`, a sorted set of slot leases (below). The thread semaphore
  stays in front of both, so a process never polls Redis for more slots than it may use itself.

Keys are ``mdsync:limits:<service>:<instance>:window`` / ``:slots`` / ``:pause`` (the instance is a host name,
plus a client id or a hashed user name for Dataverse; never a secret). Every key expires when no process uses
it any more.

When Redis cannot be reached the limits **fail closed**: :meth:`CallLimits.acquire` raises
:class:`LimitsUnavailable` (retryable), the clients retry it like any transient failure and, if Redis stays
away, the task fails with a :class:`~mdsync.errors.ServiceUnavailable` that Airflow retries. No call is sent
without the shared limits, because falling back to per-process limits is exactly what trips the services
when several workers load at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

from pyrate_limiter import InMemoryBucket, Limiter, Rate, RateItem
from pyrate_limiter.buckets.redis_bucket import LuaScript, RedisBucket

from mdsync.errors import SyncError

log = logging.getLogger("mdsync.limits")

KEY_PREFIX = "mdsync:limits"
#: the environment variable that turns shared limits on
URL_VARIABLE = "MDSYNC_LIMITS_URL"
# The service counts a call when it arrives, we count it when it leaves: widen our window a little so network
# jitter cannot squeeze more than the allowed number of arrivals into the service's window.
WINDOW_MARGIN = 0.05
WINDOW_MARGIN_S = 0.1
#: how often a process trims the shared window of calls that left it (pyrate-limiter's own leak interval)
LEAK_EVERY_S = 10.0
#: a waiting process asks Redis for a free slot at most this often (seconds; with jitter)
POLL_MAX_S = 0.05


#: the default of the clients' ``limits_url``: use ``MDSYNC_LIMITS_URL`` (and its lease) from the settings
FROM_SETTINGS = object()


def configured(url=FROM_SETTINGS) -> tuple[str | None, float]:
    """``(Redis URL or None, slot lease in seconds)``: ``url`` as given (None: per-process limits), or
    ``MDSYNC_LIMITS_URL`` and ``MDSYNC_LIMITS_LEASE_SECONDS`` for :data:`FROM_SETTINGS`."""
    from mdsync.settings import Settings

    settings = Settings.from_env()
    return (settings.limits_url if url is FROM_SETTINGS else url) or None, settings.limits_lease_seconds


def widened_window_ms(window_s: float) -> int:
    """The window our side counts in, a little longer than the service's (see :data:`WINDOW_MARGIN`)."""
    return int((window_s * (1 + WINDOW_MARGIN) + WINDOW_MARGIN_S) * 1000)


def shown_url(url: str) -> str:
    """The URL as errors and logs may show it: scheme, host, port and database, never a user or password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    path = parts.path if parts.path not in ("", "/") else "/0"
    return f"{parts.scheme}://{host}{port}{path}"


def instance_key(service: str, *parts: str) -> str:
    """``mdsync:limits:<service>:<instance>``: lower-cased, without spaces, never longer than needed."""
    instance = ":".join(p.strip().lower().replace(" ", "_") for p in parts if p)
    return f"{KEY_PREFIX}:{service}:{instance}"


def user_tag(user: str) -> str:
    """A stable, short stand-in for a user name in a key (Redis need not hold people's names)."""
    return "user-" + hashlib.sha256(user.strip().lower().encode()).hexdigest()[:16]


class LimitsUnavailable(SyncError):
    """The Redis that holds the shared limits cannot be reached or refused a command.

    Calls are not sent without their limits (fail closed), so this is transient: the clients back off and
    retry it, and the task is retried by Airflow if Redis stays away. The message names the URL with its host,
    port and database only.
    """

    retryable = True

    def __init__(self, url: str, reason: str) -> None:
        self.url = shown_url(url)
        self.reason = reason
        super().__init__(f"the shared call limits' Redis at {self.url} ({URL_VARIABLE}) cannot be used: {reason}. "
                         "No call is sent without the deployment's limits: start or repair that Redis, or fix "
                         f"{URL_VARIABLE} (unset it on a single machine to use per-process limits)")


def _reason(exc: Exception, url: str) -> str:
    text = f"{type(exc).__name__}: {exc}"[:300]
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


# -- the connection --------------------------------------------------------------------------------------------

class RedisBackend:
    """One Redis client (and connection pool) per URL per process; every command's failure becomes
    :class:`LimitsUnavailable`.

    Time-outs are short (connect 2 s, commands 5 s) and redis-py retries a failed command twice within half a
    second: a longer outage is the clients' backoff's and Airflow's business, not a thread stuck on a socket.
    """

    def __init__(self, url: str) -> None:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.url = url
        self._redis_errors = (redis.RedisError, OSError)
        try:
            self.redis = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5,
                                              retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                                              health_check_interval=30)
        except ValueError as exc:  # a malformed URL: a setup problem, named without its password
            raise LimitsUnavailable(url, f"not a Redis URL ({_reason(exc, url)}); expected "
                                         "redis://host:port/db or rediss://...") from None

    def run(self, what: str, command, *args, **kwargs):
        """``command(*args)`` with Redis errors turned into :class:`LimitsUnavailable` naming ``what``."""
        try:
            return command(*args, **kwargs)
        except self._redis_errors as exc:
            raise LimitsUnavailable(self.url, f"{what} failed ({_reason(exc, self.url)})") from None

    def time_ms(self) -> int:
        """The Redis server's clock in milliseconds (every process reads the same clock)."""
        seconds, micros = self.run("reading the server time", self.redis.time)
        return int(seconds) * 1000 + int(micros) // 1000


_backends: dict[tuple[int, str], RedisBackend] = {}
_backends_lock = threading.Lock()


def backend(url: str) -> RedisBackend:
    """The process's :class:`RedisBackend` for ``url`` (a forked worker gets its own)."""
    key = (os.getpid(), url)
    with _backends_lock:
        if key not in _backends:
            _backends[key] = RedisBackend(url)
        return _backends[key]


# -- the shared rate window ------------------------------------------------------------------------------------

class _ServerTimeBucket(RedisBucket):
    """pyrate-limiter's RedisBucket timed by the Redis server (its docs' "RedisTimeBucket": workers on machines
    whose clocks disagree still agree on what is in the window), reloading its script after a Redis restart."""

    def now(self) -> int:
        seconds, micros = self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def put(self, item):
        from redis.exceptions import NoScriptError

        try:
            return super().put(item)
        except NoScriptError:  # Redis restarted (or SCRIPT FLUSH): the script cache is empty
            self.script_hash = self.redis.script_load(LuaScript.PUT_ITEM)
            return super().put(item)


class RedisWindow:
    """A sliding window of ``limit`` calls per ``window_ms`` shared through Redis (a pyrate-limiter
    :class:`~pyrate_limiter.RedisBucket`: its Lua script counts the window and adds the call atomically).

    Every attempt takes a fresh timestamp from the Redis server. (pyrate-limiter's blocking ``Limiter``
    advances a waiting item's timestamp by the time it meant to sleep; a process that overslept would then
    count an older window than the present one and miss the calls other processes made meanwhile.)
    """

    def __init__(self, backend: RedisBackend, key: str, limit: int, window_ms: int) -> None:
        self.backend, self.key, self.limit, self.window_ms = backend, key, limit, window_ms
        self._bucket: _ServerTimeBucket | None = None
        # the bucket keeps its last verdict on itself: one attempt and its verdict at a time per process
        self._lock = threading.Lock()
        self._last_leak = 0.0

    def _ready(self) -> _ServerTimeBucket:
        # Built on first use, not with the client: a client can be made while Redis is away.
        if self._bucket is None:
            self._bucket = self.backend.run("loading the rate window's script", _ServerTimeBucket.init,
                                            [Rate(self.limit, self.window_ms)], self.backend.redis, self.key)
        return self._bucket

    def acquire(self) -> None:
        """Block until the window has room for one more call, and count it."""
        while True:
            with self._lock:
                bucket = self._ready()
                item = RateItem("call", self.backend.time_ms())
                decision = self.backend.run("taking a place in the rate window", bucket.put_decision, item)
            if decision.allowed:
                break
            wait_ms = decision.retry_after_ms if decision.retry_after_ms is not None else 50
            # a little jitter: the processes that wait for the same moment do not all ask at once
            time.sleep((max(0, wait_ms) + 5) / 1000 * random.uniform(1.0, 1.1))
        # The leak runs here, not in pyrate-limiter's background thread: that thread would die on the first
        # Redis error and never trim the window again.
        if time.monotonic() - self._last_leak >= LEAK_EVERY_S:
            self._last_leak = time.monotonic()
            self._leak()

    def _leak(self) -> None:
        """Drop calls older than the window and let the key expire when nobody calls any more.

        The expiry outlives the window after every call counted until the next leak (at most
        :data:`LEAK_EVERY_S` later): a key that expired under calls still in the window would let a burst through.
        """
        pipe = self.backend.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(self.key, 0, self.backend.time_ms() - self.window_ms)
        pipe.pexpire(self.key, 2 * self.window_ms + int(LEAK_EVERY_S * 1000))
        self.backend.run("trimming the rate window", pipe.execute)


# -- the shared concurrency cap --------------------------------------------------------------------------------

# A slot is a member of the sorted set KEYS[1] whose score is the Redis time (ms) at which its lease ends.
# Acquire: while KEYS[2] (the pause) lives, answer {0, ms left, 1}; else drop ended leases and, if fewer than the
# limit are held, add ours and answer {1, 0, 0}; else {0, ms, 0} until the earliest lease ends (a bound only: a
# slot usually frees sooner, when its call ends). The set expires 2 leases after the last acquire or renewal,
# so a deployment that stops leaves nothing behind.
_ACQUIRE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return {0, paused, 1} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 2 * lease)
  return {1, 0, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(first[2]) - now, 0}
"""
# Renew: push the lease end of each held slot (ARGV[2..]) forward; answers how many were still held (a slot
# whose lease ended may already be someone else's: it is not taken back).
_RENEW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local held = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
    held = held + 1
  end
end
if held > 0 then redis.call('PEXPIRE', KEYS[1], 2 * lease) end
return held
"""


class RedisSemaphore:
    """At most ``limit`` slots held at once by every process that uses the same Redis key.

    A slot is a lease in a sorted set (member: a random token, score: when the lease ends, by the Redis
    server's clock), taken and freed atomically by Lua scripts. While a process holds slots, a daemon thread
    renews their leases every third of ``lease_s``; a process that dies (killed, out of memory, its machine
    gone) stops renewing, and its slots free themselves ``lease_s`` later at the most. Waiting is polling with
    jitter (at most every :data:`POLL_MAX_S`), so there is no fairness guarantee between processes, only the cap.

    No library installed here offers this: redis-py's ``Lock`` is a mutex (one holder), pyrate-limiter limits
    rates, not calls in flight.

    :param lease_s: how long a slot outlives its holder's last renewal.
    """

    def __init__(self, backend: RedisBackend, key: str, limit: int, lease_s: float, pause_key: str) -> None:
        if lease_s <= 0:
            raise ValueError(f"a slot lease must be positive: {lease_s} s")
        self.backend, self.key, self.limit, self.pause_key = backend, key, limit, pause_key
        self.lease_ms = max(1, int(lease_s * 1000))
        self._acquire = backend.redis.register_script(_ACQUIRE)
        self._renew = backend.redis.register_script(_RENEW)
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._pid = os.getpid()

    def try_acquire(self) -> tuple[str | None, float, bool]:
        """One attempt: ``(token, 0, False)`` when a slot was taken, else ``(None, seconds, paused)``: how long
        the pause lasts, or how long until the earliest lease ends at the latest."""
        token = uuid.uuid4().hex
        taken, wait_ms, paused = self.backend.run("taking a concurrency slot", self._acquire,
                                                  keys=[self.key, self.pause_key],
                                                  args=[token, self.limit, self.lease_ms])
        if int(taken) != 1:
            return None, max(0, int(wait_ms)) / 1000, bool(int(paused))
        self._hold(token)
        return token, 0.0, False

    def acquire(self) -> str:
        """Block until a slot is free and no pause holds; its token (give it to :meth:`release`)."""
        poll = 0.005
        while True:
            token, wait_s, paused = self.try_acquire()
            if token is not None:
                return token
            if paused:  # the service asked everyone to wait this long
                time.sleep(wait_s)
                continue
            time.sleep(min(wait_s or poll, poll) * random.uniform(0.5, 1.0))
            poll = min(POLL_MAX_S, poll * 2)

    def release(self, token: str) -> None:
        """Free a slot. A failure is only logged: the lease ends by itself, and the call's outcome matters more."""
        with self._held_lock:
            self._held.discard(token)
        try:
            self.backend.run("freeing a concurrency slot", self.backend.redis.zrem, self.key, token)
        except LimitsUnavailable as exc:
            log.warning("limits: %s; the slot frees itself when its lease ends (%.0f s)", exc, self.lease_ms / 1000)

    def pause(self, seconds: float) -> None:
        """No process takes a slot for ``seconds`` (a service said Retry-After); a longer pause is kept."""
        ms = int(seconds * 1000)
        if ms <= 0:
            return
        # SET ... GT would keep the longer pause atomically, but only from Redis 7; PTTL then SET is close enough.
        left = self.backend.run("reading the pause", self.backend.redis.pttl, self.pause_key)
        if left is None or left < ms:
            self.backend.run("pausing the calls", self.backend.redis.set, self.pause_key, "1", px=ms)

    # renewal ---------------------------------------------------------------------------------------------
    def _hold(self, token: str) -> None:
        with self._held_lock:
            if self._pid != os.getpid():  # a forked child inherits neither the thread nor the parent's slots
                self._pid, self._held, self._renewer = os.getpid(), set(), None
            self._held.add(token)
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_loop, name=f"mdsync-limits-renew {self.key}",
                                                 daemon=True)
                self._renewer.start()

    def _renew_loop(self) -> None:
        every_s = self.lease_ms / 3000
        while True:
            time.sleep(every_s)
            with self._held_lock:
                tokens = list(self._held)
            if not tokens:
                continue
            try:
                held = int(self.backend.run("renewing slot leases", self._renew, keys=[self.key],
                                            args=[self.lease_ms, *tokens]))
            except LimitsUnavailable as exc:
                log.warning("limits: %s; slots held here lapse after %.0f s without renewal", exc,
                            self.lease_ms / 1000)
                continue
            if held < len(tokens):
                log.warning("limits: %d of %d slot leases on %s lapsed before renewal (this process stalled for "
                            "longer than the lease, %.0f s?); their calls finish without them", len(tokens) - held,
                            len(tokens), self.key, self.lease_ms / 1000)


_parts: dict[tuple, tuple[RedisWindow | None, RedisSemaphore]] = {}
_parts_lock = threading.Lock()


def _shared_parts(url: str, key: str, max_calls: int | None, window_ms: int | None, max_concurrent: int,
                  lease_s: float) -> tuple[RedisWindow | None, RedisSemaphore]:
    """One shared window and semaphore per process and key, whatever the number of clients (each semaphore
    has a renewal thread)."""
    cache_key = (os.getpid(), url, key, max_calls, window_ms, max_concurrent, lease_s)
    with _parts_lock:
        if cache_key not in _parts:
            redis_backend = backend(url)
            window = RedisWindow(redis_backend, f"{key}:window", max_calls, window_ms) if max_calls else None
            slots = RedisSemaphore(redis_backend, f"{key}:slots", max_concurrent, lease_s, pause_key=f"{key}:pause")
            _parts[cache_key] = (window, slots)
        return _parts[cache_key]


# -- the limits a client uses ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Held:
    """What :meth:`CallLimits.acquire` took: give it back to :meth:`CallLimits.release`."""

    token: str | None
    #: seconds this call waited for its slot, room in the window or the end of a pause (the caller adds it to
    #: its own count: a process's limits are shared by every client in it)
    waited_s: float = 0.0


class CallLimits:
    """A sliding rate window (optional) plus a concurrency cap, per process or shared through Redis.

    :param service: ``"marketo"`` or ``"dynamics"`` (in Redis keys and messages).
    :param instance: what the service limits per (a Marketo instance's host; a Dataverse org and user).
    :param max_calls_per_window: calls per window, or None for no rate window.
    :param window_ms: the window our side counts in (already widened, see :func:`widened_window_ms`).
    :param max_concurrent: calls in flight at once (for the deployment when shared).
    :param local_concurrent: calls in flight at once from this process (default ``max_concurrent``).
    :param url: ``redis://...`` to share the window and the cap; None keeps them in this process.
    :param lease_s: with ``url``: how long a slot of a process that died stays taken.
    """

    def __init__(self, service: str, instance: str, *, max_calls_per_window: int | None, window_ms: int | None,
                 max_concurrent: int, local_concurrent: int | None = None, url: str | None = None,
                 lease_s: float = 30.0) -> None:
        if (max_calls_per_window is not None and (max_calls_per_window < 1 or not window_ms or window_ms <= 0)) \
                or max_concurrent < 1 or (local_concurrent is not None and local_concurrent < 1):
            raise ValueError(f"{service} call limits must be positive: {max_calls_per_window} calls / {window_ms} ms, "
                             f"{max_concurrent} concurrent ({local_concurrent} from this process)")
        self.service = service
        self.key = instance_key(service, instance)
        self.url = url
        self.max_calls_per_window = max_calls_per_window
        self.window_ms = window_ms
        self.max_concurrent = max_concurrent
        self._local = threading.BoundedSemaphore(local_concurrent or max_concurrent)
        self._paused_until = 0.0  # local mode: time.monotonic() before which no call is sent
        self._window: RedisWindow | Limiter | None = None
        self._slots: RedisSemaphore | None = None
        if url:
            self._window, self._slots = _shared_parts(url, self.key, max_calls_per_window, window_ms, max_concurrent,
                                                      lease_s)
        elif max_calls_per_window:
            self._window = Limiter(InMemoryBucket([Rate(max_calls_per_window, window_ms)]))

    @property
    def shared(self) -> bool:
        """Whether the limits are shared through Redis."""
        return self._slots is not None

    def acquire(self) -> Held:
        """Block until a call may be sent: a slot of this process, a slot of the deployment (shared), the end
        of any pause, and room in the window. Give the result to :meth:`release` when the call is over.

        :returns: what is held, with how long this call waited for it (the client sums its own calls' waits).
        :raises LimitsUnavailable: shared limits whose Redis cannot be used (nothing is held then).
        """
        started = time.monotonic()
        self._local.acquire()
        token = None
        try:
            if self._slots is not None:
                token = self._slots.acquire()
            else:
                self._wait_local_pause()
            if isinstance(self._window, RedisWindow):
                self._window.acquire()
            elif self._window is not None:
                self._window.try_acquire(self.service, blocking=True)
        except BaseException:
            if token is not None:
                self._slots.release(token)
            self._local.release()
            raise
        return Held(token, time.monotonic() - started)

    def release(self, held: Held) -> None:
        """Free what :meth:`acquire` took."""
        try:
            if held.token is not None and self._slots is not None:
                self._slots.release(held.token)
        finally:
            self._local.release()

    @contextmanager
    def slot(self) -> Iterator[None]:
        """:meth:`acquire` for the duration of the block."""
        held = self.acquire()
        try:
            yield
        finally:
            self.release(held)

    def pause(self, seconds: float) -> None:
        """Send no call for ``seconds`` (the service answered Retry-After); shared limits pause every process.

        :raises LimitsUnavailable: shared limits whose Redis cannot be used.
        """
        if self._slots is not None:
            self._slots.pause(seconds)
        else:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def _wait_local_pause(self) -> None:
        left = self._paused_until - time.monotonic()
        if left > 0:
            time.sleep(left)

    def describe(self) -> str:
        """``100 calls / 21.1 s and 10 concurrent, shared through redis://host:6379/0`` (for logs)."""
        rate = f"{self.max_calls_per_window} calls / {self.window_ms / 1000:g} s and " \
            if self.max_calls_per_window and self.window_ms else ""
        where = f"shared through {shown_url(self.url)} ({self.key})" if self.url else "in this process"
        return f"{rate}{self.max_concurrent} concurrent, {where}"

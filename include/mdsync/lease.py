"""One cycle at a time per state store: the cycle lease (DESIGN §4, §9).

The state store holds one ``cycle_lease`` row. A run takes it in its first task and gives it back in its last
(an Airflow teardown, so also when the run fails); every task of the run renews it when it starts and every
minute while it runs, and every write transaction on the state store renews it first (the *fence*): a task of
a run that does not hold the lease writes nothing. Whatever starts a run — the scheduler, a backfill,
``make sync``, a second deployment pointed at the same store — the same row decides.

- **Atomic**: taking the lease is one conditional ``UPDATE`` (free, expired, or already ours), so two runs
  that try at once cannot both get it, on SQLite and on PostgreSQL alike; there is no check-then-write.
- **Who**: the holder is a run (:class:`Holder`: its run id, and a key from the DAG, run id and run start, so
  two deployments with the same run ids never share it); retries of a task of that run keep the lease. The row
  also names the host and pid of the task that last renewed it, and when it was taken and expires.
- **Expiry**: a holder that dies stops renewing; ``ttl_s`` (``MDSYNC_LEASE_TTL_SECONDS``) after its last renewal
  anyone may take it. The TTL must cover the longest gap between two renewals: a task's retry delay (at most
  5 minutes) plus scheduling; inside a task a heartbeat renews every minute.

Operators: ``python -m mdsync.lease`` shows who holds it; ``python -m mdsync.lease release`` clears it (never
needed in normal operation: it is released at the end of every run and expires by itself).

Clocks: expiry times come from the clock of the host that took or renewed the lease; workers' clocks must
agree to well within the TTL (NTP).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mdsync.errors import SyncError
from mdsync.state import schema
from mdsync.state.database import utc, utcnow

log = logging.getLogger("mdsync.lease")

NAME = "cycle"
#: defaults of MDSYNC_LEASE_TTL_SECONDS and MDSYNC_LEASE_POLL_SECONDS (read in mdsync.settings)
DEFAULT_TTL_S, DEFAULT_POLL_S = 900.0, 5.0
#: a task renews the lease this often while it runs (or more often when the TTL is short)
HEARTBEAT_S = 60.0
#: a waiting run logs who holds the lease at most this often
_WAIT_LOG_S = 60.0

_T = schema.cycle_lease


def _busy(exc: sa.exc.OperationalError) -> bool:
    """SQLite's "database is locked": a write transaction of another connection outlasted the busy timeout."""
    return "database is locked" in str(exc.orig)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "?"


@dataclass(frozen=True)
class Holder:
    """A run that takes the lease, as seen by one of its task processes."""

    run_id: str
    #: the run's identity in the lease row; equal for every task and retry of the run
    key: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    @classmethod
    def of_run(cls, dag_id: str, run_id: str, started_at: datetime | None) -> "Holder":
        """The holder for a DAG run: same key for all its tasks and retries; a run cleared after it ended
        starts again and is a new holder (it takes the lease anew)."""
        started = started_at.isoformat() if started_at else ""
        key = hashlib.sha256(f"{dag_id}\n{run_id}\n{started}".encode()).hexdigest()[:40]
        return cls(run_id=run_id, key=key)


@dataclass(frozen=True)
class LeaseState:
    """The lease row as read."""

    run_id: str | None
    holder_key: str | None
    host: str | None
    pid: int | None
    acquired_at: datetime | None
    renewed_at: datetime | None
    expires_at: datetime | None
    released_at: datetime | None

    def held(self, now: datetime) -> bool:
        return self.holder_key is not None and self.expires_at is not None and self.expires_at > now

    def who(self) -> str:
        return f"run {self.run_id!r} (host {self.host}, pid {self.pid})"

    def describe(self, now: datetime) -> str:
        if self.holder_key is None:
            if self.run_id is None:
                return "free (never taken)"
            return f"free (last held by {self.who()}, released {_when(self.released_at)})"
        since = f"since {_when(self.acquired_at)}, last renewed {_when(self.renewed_at)}"
        if self.held(now):
            return f"held by {self.who()} {since}, until {_when(self.expires_at)} unless renewed"
        return f"expired: taken by {self.who()} {since}; it stopped renewing and the lease lapsed at " \
               f"{_when(self.expires_at)}, so the next run takes it"


class LeaseHeld(SyncError):
    """Another run held the lease for the whole wait: this run defers (it wrote nothing)."""

    def __init__(self, state: LeaseState, waited_s: float, now: datetime) -> None:
        self.state = state
        self.waited_s = waited_s
        super().__init__(
            f"deferred: the cycle lease of this state store is {state.describe(now)}; waited {waited_s:.0f} s. "
            f"This run wrote nothing and nothing is lost: the watermarks did not move, so the next run picks up "
            f"this window.")


class LeaseLost(SyncError):
    """A task of a run that does not hold the lease (it expired and another run took it, or it was released).
    Retrying the task cannot help: it never writes without the lease."""

    def __init__(self, holder: Holder, state: LeaseState | None, now: datetime) -> None:
        self.holder = holder
        self.state = state
        where = state.describe(now) if state else "missing"
        super().__init__(
            f"run {holder.run_id!r} does not hold the cycle lease of this state store (it is {where}): this task "
            f"writes nothing. Only a run that took the lease in its first task may write; to run this one again, "
            f"clear the whole run (its first task takes the lease again).")


class CycleLease:
    """The cycle lease of one state store.

    :param engine: the state store's engine (schema at revision 0002 or later).
    :param ttl_s: how long a taken or renewed lease lasts without renewal.
    :param clock: the current time (aware, UTC); tests pass their own.
    """

    def __init__(self, engine: Engine, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], datetime] = utcnow) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the lease TTL must be positive, got {ttl_s}")
        self.engine = engine
        self.ttl = timedelta(seconds=ttl_s)
        self.clock = clock

    # -- reading --------------------------------------------------------------------------------------

    def state(self, conn: Connection | None = None) -> LeaseState | None:
        if conn is None:
            with self.engine.connect() as own:
                return self.state(own)
        row = conn.execute(sa.select(_T).where(_T.c.name == NAME)).mappings().first()
        if row is None:
            return None
        return LeaseState(
            run_id=row["run_id"], holder_key=row["holder_key"], host=row["host"], pid=row["pid"],
            acquired_at=utc(row["acquired_at"]), renewed_at=utc(row["renewed_at"]), expires_at=utc(row["expires_at"]),
            released_at=utc(row["released_at"]))

    def describe(self) -> str:
        state = self.state()
        return state.describe(self.clock()) if state else "missing (the store's schema is older than the lease)"

    # -- taking, keeping, giving back -----------------------------------------------------------------

    def try_acquire(self, holder: Holder) -> LeaseState | None:
        """Take the lease if it is free, expired or already this run's (one conditional UPDATE); the lease as
        taken, or ``None`` when another run holds it."""
        now = self.clock()
        mine = _T.c.holder_key == holder.key
        takeable = sa.or_(_T.c.holder_key.is_(None), _T.c.expires_at <= now, mine)
        take = sa.update(_T).where(_T.c.name == NAME, takeable).values(
            run_id=holder.run_id, holder_key=holder.key, host=holder.host, pid=holder.pid,
            # a retry keeps its original time
            acquired_at=sa.case((mine, _T.c.acquired_at), else_=sa.literal(now, _T.c.acquired_at.type)),
            renewed_at=now, expires_at=now + self.ttl, released_at=None)
        with self.engine.begin() as conn:
            if conn.execute(take).rowcount == 1:
                return self.state(conn)
            if self.state(conn) is not None:
                return None
        # the row is gone (deleted by hand): put it back, free, and try once more
        self._insert_row()
        with self.engine.begin() as conn:
            return self.state(conn) if conn.execute(take).rowcount == 1 else None

    def _insert_row(self) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(_T).values(name=NAME))
        except sa.exc.IntegrityError:  # another process put it back first
            pass

    def acquire(self, holder: Holder, wait_s: float = 0.0, poll_s: float = DEFAULT_POLL_S,
                sleep: Callable[[float], None] = time.sleep,
                on_wait: Callable[[LeaseState], None] | None = None) -> LeaseState:
        """Take the lease, waiting up to ``wait_s`` while another run holds it (polling every ``poll_s``,
        logging who holds it); raises :class:`LeaseHeld` when it is still held after the wait."""
        started = self.clock()
        deadline = started + timedelta(seconds=wait_s)
        logged: datetime | None = None
        while True:
            try:
                taken = self.try_acquire(holder)
            except sa.exc.OperationalError as exc:
                if not _busy(exc):
                    raise
                taken = None  # SQLite: another run's write transaction (its commit) holds the store for now
            now = self.clock()
            if taken is not None:
                if logged is not None:
                    log.info("took the cycle lease after waiting %.0f s", (now - started).total_seconds())
                return taken
            state = self.state()
            if state is None:  # pragma: no cover - try_acquire puts a missing row back
                continue
            if now >= deadline:
                raise LeaseHeld(state, (now - started).total_seconds(), now)
            if logged is None or (now - logged).total_seconds() >= _WAIT_LOG_S:
                log.info("waiting for the cycle lease (%.0f s more at most): it is %s",
                         (deadline - now).total_seconds(), state.describe(now))
                logged = now
            if on_wait is not None:
                on_wait(state)
            sleep(max(0.0, min(poll_s, (deadline - now).total_seconds())))

    def renew(self, holder: Holder, conn: Connection | None = None) -> LeaseState:
        """Extend this run's lease by the TTL (and name this task's host and pid); raises :class:`LeaseLost`
        when the run does not hold it. With ``conn``, inside that transaction (the state-store fence)."""
        if conn is None:
            with self.engine.begin() as own:
                return self.renew(holder, own)
        now = self.clock()
        renewed = conn.execute(sa.update(_T).where(_T.c.name == NAME, _T.c.holder_key == holder.key).values(
            renewed_at=now, expires_at=now + self.ttl, host=holder.host, pid=holder.pid)).rowcount
        if renewed != 1:
            raise LeaseLost(holder, self.state(conn), now)
        return self.state(conn)

    def release(self, holder: Holder) -> bool:
        """Give the lease back if this run holds it; whether it did."""
        now = self.clock()
        with self.engine.begin() as conn:
            done = conn.execute(sa.update(_T).where(_T.c.name == NAME, _T.c.holder_key == holder.key).values(
                holder_key=None, expires_at=None, released_at=now)).rowcount
        return done == 1

    def release_process(self, host: str, pid: int) -> LeaseState | None:
        """Give the lease back if a task of process ``pid`` on ``host`` renewed it last (``make sync`` after
        Ctrl-C: its in-process run cannot reach its teardown); the lease as it was, or ``None``."""
        return self._clear((_T.c.host == host) & (_T.c.pid == pid))

    def force_release(self) -> LeaseState | None:
        """Clear the lease whoever holds it (operators only: a holder that is still alive fails its next
        write); the lease as it was, or ``None`` when it was free."""
        return self._clear(sa.true())

    def _clear(self, which) -> LeaseState | None:
        with self.engine.begin() as conn:  # the UPDATE first: on SQLite a read would have to upgrade its lock
            done = conn.execute(sa.update(_T).where(_T.c.name == NAME, _T.c.holder_key.is_not(None), which).values(
                holder_key=None, expires_at=None, released_at=self.clock())).rowcount
            return self.state(conn) if done else None

    def fence(self, holder: Holder) -> Callable[[Connection], None]:
        """For :attr:`mdsync.state.StateStore.fence`: renew inside each write transaction, so a write commits
        only while this run holds the lease (on PostgreSQL the row stays locked until the commit)."""
        return lambda conn: self.renew(holder, conn)

    @contextmanager
    def heartbeat(self, holder: Holder, every_s: float | None = None) -> Iterator[threading.Event]:
        """Renew the lease in a background thread while the block runs (every minute, or a third of the TTL
        when that is shorter). Yields an event that is set if the lease was lost."""
        every = every_s or min(HEARTBEAT_S, self.ttl.total_seconds() / 3)
        stop, lost = threading.Event(), threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                try:
                    self.renew(holder)
                except LeaseLost as exc:
                    log.error("%s", exc)
                    lost.set()
                    return
                except sa.exc.OperationalError as exc:
                    if _busy(exc):  # this run's own long write (its commit) holds SQLite, and renews it itself
                        log.info("cycle lease not renewed this beat: the state store is busy with a write")
                    else:  # unreachable: try again at the next beat
                        log.warning("could not renew the cycle lease (will retry in %.0f s): %s", every, exc.orig)
                except Exception as exc:
                    log.warning("could not renew the cycle lease (will retry in %.0f s): %s", every, exc)

        thread = threading.Thread(target=beat, name=f"mdsync-lease-{holder.run_id}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            stop.set()
            thread.join(timeout=5)



# -- a used-up daily quota pauses the scheduled runs ----------------------------------------------------------

#: ``cycle_lease`` rows named ``quota:<service>`` remember until when a service's daily quota is used up
QUOTA_PREFIX = "quota:"


@dataclass(frozen=True)
class QuotaPause:
    """A service's daily API quota was found used up (Marketo 607) by ``run_id`` at ``found_at``; scheduled
    runs are skipped until ``resets_at``."""

    service: str
    resets_at: datetime
    run_id: str | None
    found_at: datetime

    def line(self) -> str:
        """The one line a skipped run leaves."""
        return (f"skipped: {self.service.capitalize()}'s daily API quota is used up until {_when(self.resets_at)} "
                f"(run {self.run_id!r} was refused at {_when(self.found_at)}). This run wrote nothing and nothing "
                "is lost: the watermarks did not move, so the first run after the reset picks up this window. A "
                "manual run (make sync) tries anyway; `python -m mdsync.lease release` ends the pause now.")


class QuotaPauses:
    """The quota pauses of one state store (rows of the ``cycle_lease`` table that no lease code reads).

    :param engine: the state store's engine (schema at revision 0002 or later).
    :param clock: the current time (aware, UTC); tests pass their own.
    """

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.clock = clock

    def record(self, service: str, resets_at: datetime, run_id: str | None) -> QuotaPause:
        """Remember that ``service``'s quota is used up until ``resets_at`` (a later pause replaces it)."""
        name, now = QUOTA_PREFIX + service, self.clock()
        values = dict(run_id=run_id, acquired_at=now, expires_at=utc(resets_at), renewed_at=now, released_at=None)
        with self.engine.begin() as conn:
            if not conn.execute(sa.update(_T).where(_T.c.name == name).values(**values)).rowcount:
                conn.execute(sa.insert(_T).values(name=name, **values))
        pause = QuotaPause(service, utc(resets_at), run_id, now)
        log.warning("%s's daily quota is used up until %s: scheduled runs are skipped until then", service,
                    _when(pause.resets_at))
        return pause

    def active(self) -> QuotaPause | None:
        """The pause that lasts longest of those not over yet, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_T).where(_T.c.name.like(QUOTA_PREFIX + "%"), _T.c.released_at.is_(None),
                                                   _T.c.expires_at > self.clock())
                               .order_by(_T.c.expires_at.desc())).mappings().first()
        if row is None:
            return None
        return QuotaPause(row["name"].removeprefix(QUOTA_PREFIX), utc(row["expires_at"]), row["run_id"],
                          utc(row["acquired_at"]))

    def clear(self) -> QuotaPause | None:
        """End every pause now (the quota was raised, or reset early); the one that was active, if any."""
        active = self.active()
        with self.engine.begin() as conn:
            conn.execute(sa.update(_T).where(_T.c.name.like(QUOTA_PREFIX + "%"), _T.c.released_at.is_(None))
                         .values(released_at=self.clock()))
        return active


def main(argv: list[str] | None = None) -> int:
    """``python -m mdsync.lease [status|release] [--url URL]``"""
    from mdsync.state.database import create_engine, default_state_url, safe_url

    parser = argparse.ArgumentParser(prog="python -m mdsync.lease",
                                     description="Show or clear the cycle lease of a state store.")
    parser.add_argument("action", nargs="?", choices=["status", "release"], default="status")
    parser.add_argument("--url", default=None, help="state store URL (default: $MDSYNC_STATE_URL or "
                                                    "$AIRFLOW_HOME/mdsync/state.sqlite)")
    args = parser.parse_args(argv)
    url = args.url or default_state_url()
    engine = create_engine(url)
    lease, pauses = CycleLease(engine), QuotaPauses(engine)
    try:
        if args.action == "status":
            print(f"cycle lease of {safe_url(url)}: {lease.describe()}")
            if (pause := pauses.active()) is not None:
                print(f"scheduled runs paused: {pause.service}'s daily quota is used up until {_when(pause.resets_at)}"
                      f" (found by run {pause.run_id!r})")
            return 0
        before = lease.force_release()
        ended = pauses.clear()
    except sa.exc.OperationalError as exc:
        print(f"error: cannot read the cycle lease of {safe_url(url)}: {exc.orig}", file=sys.stderr)
        return 1
    if ended is not None:
        print(f"ended the pause of scheduled runs for {ended.service}'s daily quota (it was until "
              f"{_when(ended.resets_at)})")
    if before is None:
        print(f"the cycle lease of {safe_url(url)} was already free")
    else:
        print(f"released the cycle lease of {safe_url(url)}; it was taken by {before.who()} "
              f"{_when(before.acquired_at)} and last renewed {_when(before.renewed_at)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

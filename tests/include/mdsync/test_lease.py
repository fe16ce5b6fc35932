"""The cycle lease (mdsync.lease) on SQLite and on the test PostgreSQL server: one holder at a time, atomic
taking, waiting then deferring, renewal, expiry of a dead holder, the state-store fence, and processes started
together that never interleave their writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from mdsync.lease import CycleLease, Holder, LeaseHeld, LeaseLost, main
from mdsync.state import open_store
from mdsync.state.schema import cycle_lease
from tests.fixtures.waiting import wait_for

REPO = Path(__file__).resolve().parents[3]
T0 = datetime(2026, 12, 2, 8, 0, tzinfo=timezone.utc)


class Clock:
    """A clock the test moves; ``sleep`` moves it too, so waiting takes no wall-clock time."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def store(state_url):
    s = open_store(state_url)
    yield s
    s.engine.dispose()


def holder(name: str, pid: int | None = None) -> Holder:
    h = Holder.of_run("marketo_dynamics_sync", name, T0)
    return h if pid is None else Holder(h.run_id, h.key, host=h.host, pid=pid)


def test_one_holder_at_a_time_and_a_retry_keeps_the_lease(store):
    clock = Clock()
    lease = CycleLease(store.engine, ttl_s=600, clock=clock)
    a, b = holder("scheduled__a"), holder("manual__b")
    taken = lease.try_acquire(a)
    assert taken.run_id == "scheduled__a" and taken.acquired_at == T0 and taken.expires_at == T0 + timedelta(minutes=10)
    assert lease.try_acquire(b) is None
    clock.advance(30)
    # a retry of one of a's tasks (another process, same run) keeps the lease and its original time
    retry = lease.try_acquire(holder("scheduled__a", pid=os.getpid() + 1))
    assert retry.acquired_at == T0 and retry.renewed_at == T0 + timedelta(seconds=30) and retry.pid == os.getpid() + 1
    assert lease.release(b) is False  # b never held it
    assert lease.release(a) is True
    assert lease.describe().startswith("free (last held by run 'scheduled__a'")
    assert lease.try_acquire(b).run_id == "manual__b"


def test_holders_are_runs_of_a_dag_and_a_run_restarted_after_its_end_is_a_new_holder():
    same = Holder.of_run("dag", "scheduled__1", T0)
    assert same.key == Holder.of_run("dag", "scheduled__1", T0).key
    assert same.key != Holder.of_run("dag", "scheduled__1", T0 + timedelta(hours=1)).key  # cleared after it ended
    assert same.key != Holder.of_run("other_deployment_dag", "scheduled__1", T0).key


def test_a_waiting_run_defers_after_the_wait_naming_the_holder(store):
    clock = Clock()
    lease = CycleLease(store.engine, ttl_s=900, clock=clock)
    lease.try_acquire(holder("scheduled__a"))
    seen = []
    with pytest.raises(LeaseHeld) as held:
        lease.acquire(holder("backfill__b"), wait_s=30, poll_s=5, sleep=clock.sleep, on_wait=seen.append)
    assert sum(clock.slept) == 30 and len(seen) == 6 and {s.run_id for s in seen} == {"scheduled__a"}
    message = str(held.value)
    assert message.startswith("deferred: the cycle lease of this state store is held by run 'scheduled__a'")
    assert "since 2026-12-02 08:00:00 UTC" in message and "until 2026-12-02 08:15:00 UTC" in message
    assert "waited 30 s" in message and "nothing is lost" in message and "next run picks up this window" in message
    assert lease.state().run_id == "scheduled__a"  # the waiter changed nothing


def test_a_waiting_run_takes_the_lease_once_it_is_given_back(store):
    clock = Clock()
    lease = CycleLease(store.engine, ttl_s=900, clock=clock)
    a, b = holder("scheduled__a"), holder("manual__b")
    lease.try_acquire(a)

    def a_finishes_while_b_waits(seconds: float) -> None:
        clock.sleep(seconds)
        if len(clock.slept) == 3:
            lease.release(a)

    taken = lease.acquire(b, wait_s=300, poll_s=5, sleep=a_finishes_while_b_waits)
    assert taken.run_id == "manual__b" and taken.acquired_at == T0 + timedelta(seconds=15)


def test_on_sqlite_a_long_write_of_the_holder_makes_a_waiting_run_wait_not_fail(tmp_path):
    """The holder's commit keeps SQLite's write lock for its whole transaction (minutes at a million rows):
    a run that tries to take the lease meanwhile is refused by the busy timeout and goes on waiting."""
    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    store = open_store(url)
    clock = Clock()
    CycleLease(store.engine, clock=clock).try_acquire(holder("scheduled__a"))
    impatient = sa.create_engine(url, connect_args={"timeout": 0.05})  # a busy timeout of 50 ms, not 30 s
    with store.engine.connect() as commit:
        commit.exec_driver_sql("BEGIN IMMEDIATE")  # the holder's long write transaction
        with pytest.raises(LeaseHeld, match="held by run 'scheduled__a'"):
            CycleLease(impatient, clock=clock).acquire(holder("manual__b"), wait_s=10, poll_s=5, sleep=clock.sleep)
        commit.exec_driver_sql("ROLLBACK")
    assert sum(clock.slept) == 10
    impatient.dispose()
    store.engine.dispose()


def test_renewal_keeps_the_lease_and_without_it_the_lease_lapses(store):
    clock = Clock()
    lease = CycleLease(store.engine, ttl_s=60, clock=clock)
    a, b = holder("scheduled__a"), holder("manual__b")
    lease.try_acquire(a)
    clock.advance(50)
    assert lease.renew(a).expires_at == T0 + timedelta(seconds=110)
    clock.advance(20)  # 70 s after taking it: without the renewal it would have lapsed
    assert lease.try_acquire(b) is None
    clock.advance(40)  # 110 s: a stopped renewing 60 s ago
    assert "expired: taken by run 'scheduled__a'" in lease.describe()
    assert lease.try_acquire(b).run_id == "manual__b"
    with pytest.raises(LeaseLost, match="run 'scheduled__a' does not hold the cycle lease .* held by run 'manual__b'"):
        lease.renew(a)


def test_a_lease_whose_holder_died_expires(store):
    """A real process takes the lease and is killed (no teardown, no release): the lease is still its own until
    the TTL after its last renewal, then the next run takes it."""
    code = ("import sys; from mdsync.lease import CycleLease, Holder; from mdsync.state import StateStore; "
            "lease = CycleLease(StateStore(sys.argv[1]).engine, ttl_s=float(sys.argv[2])); "
            "lease.try_acquire(Holder.of_run('marketo_dynamics_sync', 'scheduled__dies', None)); "
            "print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, store.url, "600"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    dead = CycleLease(store.engine).state()
    assert dead.run_id == "scheduled__dies" and dead.pid == proc.pid and dead.holder_key is not None
    b = holder("manual__b")
    assert CycleLease(store.engine, clock=lambda: dead.expires_at - timedelta(seconds=1)).try_acquire(b) is None
    assert CycleLease(store.engine, clock=lambda: dead.expires_at).try_acquire(b).run_id == "manual__b"

    # and with the real clock: a holder with a 1-second TTL dies, a waiting run takes the lease soon after
    CycleLease(store.engine).release(b)
    proc = subprocess.Popen([sys.executable, "-c", code, store.url, "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert CycleLease(store.engine).acquire(b, wait_s=60, poll_s=0.05).run_id == "manual__b"


def test_the_heartbeat_renews_and_notices_a_lost_lease(store):
    lease = CycleLease(store.engine, ttl_s=30)
    a = holder("scheduled__a")
    first = lease.try_acquire(a)
    with lease.heartbeat(a, every_s=0.02) as lost:
        wait_for(lambda: lease.state().renewed_at > first.renewed_at, "a heartbeat renewal")
        lease.force_release()  # an operator clears it while the task runs
        wait_for(lost.is_set, "the heartbeat noticing the lease is gone")
    assert lease.state().holder_key is None


def test_writes_are_fenced_a_run_that_lost_the_lease_writes_nothing(store):
    clock = Clock()
    lease = CycleLease(store.engine, ttl_s=60, clock=clock)
    a, b = holder("scheduled__a"), holder("manual__b")
    lease.try_acquire(a)
    store.fence = lease.fence(a)
    store.save_watermark("marketo", "persons", T0, None, "scheduled__a")
    assert lease.state().renewed_at == T0  # the write renewed it
    clock.advance(61)  # a stalled past the TTL and b took over
    assert lease.try_acquire(b) is not None
    with pytest.raises(LeaseLost):
        with store.transaction() as tx:
            store.save_baselines(pd.DataFrame({"person_id": [1], "field": ["email"],
                                               "value": pd.array(["a@x.com"], dtype="str")}), "scheduled__a", conn=tx)
    with pytest.raises(LeaseLost):
        store.save_watermark("marketo", "persons", T0 + timedelta(hours=1), None, "scheduled__a")
    assert store.load_baselines().empty
    assert store.watermark("marketo", "persons").high_water == T0


def test_a_deleted_lease_row_is_put_back(store):
    with store.engine.begin() as c:
        c.execute(sa.delete(cycle_lease))
    lease = CycleLease(store.engine)
    assert lease.describe().startswith("missing")
    assert lease.try_acquire(holder("scheduled__a")).run_id == "scheduled__a"
    with store.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(cycle_lease)).scalar() == 1


def test_the_command_shows_and_clears_the_lease(store, capsys):
    CycleLease(store.engine).try_acquire(holder("scheduled__stuck"))
    assert main(["--url", store.url]) == 0
    assert "held by run 'scheduled__stuck'" in capsys.readouterr().out
    assert main(["release", "--url", store.url]) == 0
    assert "released the cycle lease" in capsys.readouterr().out and CycleLease(store.engine).state().holder_key is None
    assert main(["release", "--url", store.url]) == 0
    assert "already free" in capsys.readouterr().out



def test_a_used_up_quota_pauses_until_its_reset_and_the_command_shows_and_ends_it(store, capsys):
    from mdsync.lease import QuotaPauses

    # the command reads the real clock: the reset is in the future whenever the test runs
    resets = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) + timedelta(hours=20)
    clock = Clock(resets - timedelta(hours=21))
    pauses = QuotaPauses(store.engine, clock=clock)
    assert pauses.active() is None
    pauses.record("marketo", resets, "scheduled__refused")
    pause = pauses.active()
    assert (pause.service, pause.resets_at, pause.run_id) == ("marketo", resets, "scheduled__refused")
    assert f"Marketo's daily API quota is used up until {resets:%Y-%m-%d %H:%M:%S} UTC" in pause.line()
    assert CycleLease(store.engine).state() is None or CycleLease(store.engine).state().holder_key is None  # not a lease
    assert main(["--url", store.url]) == 0
    assert "scheduled runs paused: marketo's daily quota is used up until" in capsys.readouterr().out
    clock.now = resets  # the reset: the pause is over by itself
    assert pauses.active() is None
    clock.now = resets - timedelta(hours=1)
    pauses.record("marketo", resets, "scheduled__refused-again")  # a later refusal replaces the row
    assert pauses.active().run_id == "scheduled__refused-again"
    assert main(["release", "--url", store.url]) == 0
    assert "ended the pause of scheduled runs for marketo's daily quota" in capsys.readouterr().out
    assert QuotaPauses(store.engine).active() is None

# Each process takes the lease (waiting as long as needed), writes a first activity row, says it holds the lease,
# waits for the test's go, writes more rows (each its own fenced transaction) and gives the lease back.
_CYCLE = """
import sys
from pathlib import Path
import pandas as pd
from mdsync.lease import CycleLease, Holder
from mdsync.state import StateStore
from tests.fixtures.waiting import wait_for

url, name, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
store = StateStore(url)
lease = CycleLease(store.engine, ttl_s=600)
me = Holder.of_run("marketo_dynamics_sync", name, None)
lease.acquire(me, wait_s=300, poll_s=0.02, on_wait=lambda state: (folder / f"waiting-{name}").touch())
store.fence = lease.fence(me)
write = lambda step: store.record_activity(pd.DataFrame({"action": [step]}), run_id=name)
write("start")
(folder / f"holding-{name}").touch()
wait_for(lambda: (folder / f"go-{name}").exists(), f"the go for {name}", timeout_s=600)
for i in range(5):
    write(f"write-{i}")
write("end")
assert lease.release(me)
"""


@pytest.mark.slow
def test_cycles_started_together_never_interleave(store, tmp_path):
    names = ["scheduled__1", "backfill__2", "manual__3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _CYCLE, store.url, n, str(tmp_path)], cwd=REPO, env=env,
                              stderr=subprocess.PIPE, text=True) for n in names]
    lease = CycleLease(store.engine)
    order: list[str] = []
    try:
        for _ in names:
            rest = [n for n in names if n not in order]
            current = wait_for(lambda: [n for n in rest if (tmp_path / f"holding-{n}").exists()], "a cycle holding it",
                               timeout_s=180)  # (processes start slowly on a busy machine)
            assert len(current) == 1, current  # never two holders
            holding = current[0]
            waiting = [n for n in rest if n != holding]
            for n in waiting:  # fresh evidence that each of the others is waiting while this one holds it
                (tmp_path / f"waiting-{n}").unlink(missing_ok=True)
            wait_for(lambda: all((tmp_path / f"waiting-{n}").exists() for n in waiting), "the others waiting", timeout_s=180)
            assert lease.state().run_id == holding
            assert not any((tmp_path / f"holding-{n}").exists() for n in waiting)
            (tmp_path / f"go-{holding}").touch()
            order.append(holding)
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for e in errors]
    finally:
        for p in procs:
            p.kill()
    rows = store.activity()
    expected = [(run, step) for run in order for step in ["start", *(f"write-{i}" for i in range(5)), "end"]]
    assert list(zip(rows["run_id"], rows["action"])) == expected  # in id order: one cycle after the other
    assert lease.state().holder_key is None

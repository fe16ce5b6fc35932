"""Limits shared across processes (issue 12.2): separate OS processes, each with its own client, load the real
sandboxes at once through a real Redis; the sandboxes' own limiters count the refusals.

With ``MDSYNC_LIMITS_URL`` the sandboxes refuse nothing; with per-process limits the same load is refused
(which proves the load is enough to fail). Also: a killed process's slot frees after its lease, an unreachable
Redis fails closed with an error naming it (never its password), the script cache surviving a flush, and the
pure helpers.

This file is also the worker the tests start (``python test_shared_limits.py``, two for the module): for each
load it reads a job line, builds its client, prints ``ready``, waits for ``go`` on stdin so every worker
starts at once, loads, and prints its outcome as one JSON line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mdsync.errors import ServiceError, ServiceUnavailable, is_retryable
from mdsync.limits import (CallLimits, LimitsUnavailable, RedisSemaphore, backend, instance_key, shown_url,
                           user_tag)
from tests.fixtures.ports import closed_port
from tests.fixtures.waiting import wait_for

#: the repository, on a worker's PYTHONPATH (it imports this module, and so ``tests.fixtures``)
ROOT = Path(__file__).resolve().parents[3]

#: a Redis database of its own (the session's server may serve other tests too, e.g. a Celery broker)
LIMITS_DB = 7
#: the sandboxes' limits for these tests: a small window keeps the load short
CALLS, WINDOW_S, CONCURRENT = 20, 2, 3
THREADS = 4
LOOKUPS = 14  # per Marketo worker: 2 workers x (14 lookups + describe) = 30 calls > one window of 20
REQUESTS = 12  # per Dataverse worker: 24 > 20


# -- the worker side -------------------------------------------------------------------------------------------

def _wait_for_go() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("no go")


def _load(calls) -> dict:
    """Run ``calls`` on :data:`THREADS` threads: how many succeeded and the errors of the others."""
    ok, failed = 0, []
    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(call) for call in calls]:
            try:
                future.result()
                ok += 1
            except ServiceError as exc:
                failed.append(str(exc))
    return {"ok": ok, "failed": failed}


def marketo_worker(args: dict) -> dict:
    from mdsync.marketo import MarketoClient

    client = MarketoClient(args["base_url"], args["client_id"], args["client_secret"],
                           max_calls_per_window=CALLS, window_s=WINDOW_S, max_concurrent=CONCURRENT,
                           max_attempts=1, limits_url=args["limits_url"])
    _wait_for_go()
    outcome = _load([lambda i=i: client.get_leads("id", [i], fields=["email"]) for i in args["ids"]])
    return {**outcome, "shared": client.limits.shared, "waited_s": client.waited_s,
            "calls_made": client.calls_made}


def dataverse_worker(args: dict) -> dict:
    from mdsync.dynamics import DynamicsClient

    client = DynamicsClient(args["org_url"], args["client_id"], args["client_secret"], args["tenant_id"],
                            authority=args["authority"], verify=args["ca_bundle"], max_concurrent=THREADS,
                            max_attempts=1, limits_url=args["limits_url"])
    client.tokens.token()  # the token first: the race is on Web API requests
    _wait_for_go()
    outcome = _load([lambda: client.request("GET", "WhoAmI")] * args["requests"])
    return {**outcome, "shared": client.limits.shared, "waited_s": client.waited_s,
            "calls_made": client.calls_made}


def slot_holder(args: dict) -> dict:
    """Take the only slot and keep it (renewing its lease) until killed."""
    limits = CallLimits("test", args["instance"], max_calls_per_window=None, window_ms=None, max_concurrent=1,
                        url=args["limits_url"], lease_s=args["lease_s"])
    held = limits.acquire()
    print(json.dumps({"token": held.token}), flush=True)
    sys.stdin.readline()  # until killed
    return {}


WORKERS = {"marketo": marketo_worker, "dataverse": dataverse_worker, "hold": slot_holder}


def serve(preload: bool) -> None:
    """A worker's loop: one ``{"kind", "args", "env"}`` line per load (its client built anew each time, in a
    process that stays up, so the tests pay the interpreter's start and pandas' import once), until stdin ends.

    :param preload: import the clients first (while the sandboxes start, not during the first load).
    """
    if preload:
        import mdsync.dynamics  # noqa: F401
        import mdsync.marketo  # noqa: F401

    for line in sys.stdin:
        job = json.loads(line)
        os.environ.update(job.get("env") or {})
        print(json.dumps(WORKERS[job["kind"]](job["args"])), flush=True)


# -- the test side ---------------------------------------------------------------------------------------------

def spawn(stderr_path: Path, preload: bool = True) -> subprocess.Popen:
    """A worker process running :func:`serve` (its errors in ``stderr_path``)."""
    with open(stderr_path, "a") as stderr:
        return subprocess.Popen([sys.executable, __file__] + (["--preload"] if preload else []),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr, text=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})


class Workers:
    """Two worker processes for the module; :meth:`run_at_once` gives each a load and starts them together."""

    def __init__(self, folder: Path, count: int = 2) -> None:
        self.logs = [folder / f"worker{n}.stderr" for n in range(count)]
        self.procs = [spawn(log) for log in self.logs]

    def _line(self, n: int) -> str:
        line = self.procs[n].stdout.readline()
        if not line:
            raise AssertionError(f"worker {n} ended: {self.logs[n].read_text(errors='replace')[-3000:]}")
        return line.strip()

    def run_at_once(self, kind: str, args_list: list[dict], env: dict | None = None) -> tuple[list[dict], float]:
        """Each worker builds its client from its args, all start their load at the same moment; their
        outcomes and the seconds from that moment to the last one's end."""
        for proc, args in zip(self.procs, args_list):
            proc.stdin.write(json.dumps({"kind": kind, "args": args, "env": env}) + "\n")
            proc.stdin.flush()
        for n in range(len(args_list)):
            assert self._line(n) == "ready"
        started = time.monotonic()
        for proc in self.procs[:len(args_list)]:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = [json.loads(self._line(n)) for n in range(len(args_list))]
        return outcomes, time.monotonic() - started

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.stdin.close()  # the worker's loop ends
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    pool = Workers(tmp_path_factory.mktemp("limits-workers"))
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture
def limits_url(redis_server):
    """The test's Redis database, emptied first."""
    import redis

    url = redis_server.url(LIMITS_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def redis_keys(url: str) -> list[str]:
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return sorted(client.keys("*"))
    finally:
        client.close()


# Marketo --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tight_marketo(tmp_path_factory):
    """A Marketo sandbox with a small window (20 calls / 2 s) and 3 concurrent calls."""
    from sandbox.marketo import MarketoSandbox

    with MarketoSandbox(tmp_path_factory.mktemp("marketo-shared-limits"), rate_limit=(CALLS, WINDOW_S),
                        max_concurrent=CONCURRENT) as sb:
        yield sb


def marketo_load(workers: Workers, sb, limits_url: str | None) -> tuple[list[dict], float, dict]:
    sb.reset()
    ids = sb.seed_leads([{"email": f"shared{i}@example.com"} for i in range(2 * LOOKUPS)])
    sb.fault("delay", count=1000, seconds=0.05, path_prefix="/rest/")  # calls overlap at the service
    args = [{"base_url": sb.base_url, "client_id": sb.client_id, "client_secret": sb.client_secret,
             "limits_url": limits_url, "ids": ids[n::2]} for n in range(2)]
    outcomes, elapsed = workers.run_at_once("marketo", args)
    return outcomes, elapsed, sb.calls()


def test_two_marketo_workers_sharing_limits_are_never_refused(workers, tight_marketo, limits_url):
    outcomes, elapsed, stats = marketo_load(workers, tight_marketo, limits_url)
    assert [o["failed"] for o in outcomes] == [[], []]
    assert [(o["ok"], o["shared"]) for o in outcomes] == [(LOOKUPS, True), (LOOKUPS, True)]
    assert stats["limited"] == {}, "the sandbox refused calls (606/615) although the limits were shared"
    rest_calls = sum(n for k, n in stats["by_endpoint"].items() if " /rest/" in k)
    assert rest_calls == 2 * (LOOKUPS + 1)  # every lookup and describe sent once: nothing was refused
    assert stats["peak_concurrency"] <= CONCURRENT
    # 30 calls at 20 per window: the second window's calls waited, and the wait is measured
    assert elapsed >= WINDOW_S and sum(o["waited_s"] for o in outcomes) >= WINDOW_S / 2
    keys = redis_keys(limits_url)
    instance = instance_key("marketo", f"127.0.0.1:{tight_marketo.port}")
    assert keys and all(k.startswith(instance + ":") for k in keys), keys
    assert not any(tight_marketo.client_secret in k or tight_marketo.client_id in k for k in keys)


def test_two_marketo_workers_with_per_process_limits_are_refused(workers, tight_marketo):
    outcomes, _, stats = marketo_load(workers, tight_marketo, None)
    assert [o["shared"] for o in outcomes] == [False, False]
    refused = stats["limited"].get("606", 0) + stats["limited"].get("615", 0)
    assert refused > 0, f"the load did not trip the sandbox without shared limits: {stats}"
    assert sum(len(o["failed"]) for o in outcomes) > 0
    assert any("606" in e or "615" in e for o in outcomes for e in o["failed"])


# Dataverse ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tight_dataverse(tmp_path_factory):
    """A Dataverse sandbox with a small window (20 requests / 2 s) and 3 concurrent requests."""
    from sandbox.dataverse import DataverseSandbox

    with DataverseSandbox(tmp_path_factory.mktemp("dataverse-shared-limits"), requests_per_window=CALLS,
                          window_s=WINDOW_S, max_concurrent=CONCURRENT) as sb:
        yield sb


#: the deployment's Dataverse limits in the workers: the sandbox's own
DATAVERSE_LIMITS = {"MDSYNC_DYNAMICS_REQUESTS_PER_WINDOW": str(CALLS),
                    "MDSYNC_DYNAMICS_WINDOW_SECONDS": str(WINDOW_S), "MDSYNC_DYNAMICS_MAX_CONCURRENT": str(CONCURRENT)}
WHO_AM_I = "GET /api/data/v9.2/WhoAmI"


def dataverse_load(workers: Workers, sb, limits_url: str | None) -> tuple[list[dict], float, dict, dict]:
    sb.reset()
    sb.fault("delay", count=1000, seconds=0.05)  # requests overlap at the service
    args = {"org_url": sb.org_url, "client_id": sb.client_id, "client_secret": sb.client_secret,
            "tenant_id": sb.tenant_id, "authority": sb.authority, "ca_bundle": sb.ca_bundle,
            "limits_url": limits_url, "requests": REQUESTS}
    outcomes, elapsed = workers.run_at_once("dataverse", [args, args], DATAVERSE_LIMITS)
    return outcomes, elapsed, sb.calls(), sb.concurrency()


def test_two_dataverse_workers_sharing_limits_are_never_throttled(workers, tight_dataverse, limits_url):
    outcomes, elapsed, calls, concurrency = dataverse_load(workers, tight_dataverse, limits_url)
    assert [o["failed"] for o in outcomes] == [[], []]
    assert [(o["ok"], o["shared"]) for o in outcomes] == [(REQUESTS, True), (REQUESTS, True)]
    # The sandbox counts every Web API request it receives, refused ones too: exactly one per request made
    # (each worker sends every request once; a 429 would have failed it) means none was throttled.
    web_api = {k: n for k, n in calls["by_endpoint"].items() if "/api/data/" in k}
    assert web_api == {WHO_AM_I: 2 * REQUESTS}
    assert concurrency["peak"] <= CONCURRENT
    assert elapsed >= WINDOW_S and sum(o["waited_s"] for o in outcomes) >= WINDOW_S / 2
    keys = redis_keys(limits_url)
    instance = instance_key("dynamics", f"127.0.0.1:{tight_dataverse.port}", tight_dataverse.client_id)
    assert keys and all(k.startswith(instance + ":") for k in keys), keys
    assert not any(tight_dataverse.client_secret in k for k in keys)


def test_two_dataverse_workers_with_per_process_limits_are_throttled(workers, tight_dataverse):
    outcomes, _, calls, _ = dataverse_load(workers, tight_dataverse, None)
    assert [o["shared"] for o in outcomes] == [False, False]
    failed = [e for o in outcomes for e in o["failed"]]
    assert failed and all("429" in e or "0x8007232" in e for e in failed), failed[:3]
    assert calls["by_endpoint"][WHO_AM_I] == 2 * REQUESTS  # the refused ones reached the service too


def test_a_429_pauses_the_other_clients_sharing_the_limits(dataverse, limits_url):
    from mdsync.dynamics import DynamicsClient

    def client():
        return DynamicsClient(dataverse.org_url, dataverse.client_id, dataverse.client_secret, dataverse.tenant_id,
                              authority=dataverse.authority, verify=dataverse.ca_bundle, max_attempts=2,
                              limits_url=limits_url)

    throttled, other = client(), client()
    for c in (throttled, other):
        c.tokens.token()
    dataverse.fault("throttle", count=1, seconds=2, path_prefix="/api/data/v9.2/WhoAmI")
    done = threading.Event()
    worker = threading.Thread(target=lambda: (throttled.request("GET", "WhoAmI"), done.set()))
    worker.start()
    pause_key = instance_key("dynamics", f"127.0.0.1:{dataverse.port}", dataverse.client_id) + ":pause"
    redis_client = backend(limits_url).redis
    wait_for(lambda: redis_client.pttl(pause_key) > 0, "the 429's pause in Redis", 10)
    other.request("GET", "WhoAmI")
    worker.join(timeout=30)
    assert done.is_set()
    assert other.waited_s >= 1.0  # held back until the Retry-After passed, not sent into the 429
    assert dataverse.calls()["by_endpoint"][WHO_AM_I] == 3  # the throttled one, its retry, the other


# the semaphore's lease -------------------------------------------------------------------------------------------
def test_a_killed_process_frees_its_slot_when_its_lease_ends(limits_url, tmp_path):
    lease_s = 2.0  # renewed every 0.67 s: a holder starved on a busy machine keeps its slot
    instance = f"lease-{os.getpid()}"
    holder = spawn(tmp_path / "holder.stderr", preload=False)
    try:
        holder.stdin.write(json.dumps({"kind": "hold", "args": {"instance": instance, "limits_url": limits_url,
                                                                 "lease_s": lease_s}}) + "\n")
        holder.stdin.flush()
        line = holder.stdout.readline()
        assert line.startswith("{"), f"the holder did not take the slot: {line!r} " \
                                     f"{(tmp_path / 'holder.stderr').read_text()[-3000:]}"
        token = json.loads(line)["token"]
        slots_key = instance_key("test", instance) + ":slots"
        mine = RedisSemaphore(backend(limits_url), slots_key, 1, lease_s, pause_key=slots_key + ":pause")
        redis_client = backend(limits_url).redis
        first_end = redis_client.zscore(slots_key, token)
        assert mine.try_acquire()[0] is None  # held by the other process
        # alive, it renews: the lease end moves on past the first lease, and the slot stays taken
        wait_for(lambda: (redis_client.zscore(slots_key, token) or 0) > first_end + lease_s * 1000,
                 "the holder to renew its lease twice", 10)
        assert mine.try_acquire()[0] is None
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        lease_end = redis_client.zscore(slots_key, token)
        token_mine = wait_for(lambda: mine.try_acquire()[0], "the dead holder's slot to free itself", 10)
        taken_at = backend(limits_url).time_ms()
        assert taken_at >= lease_end, "the slot was freed before its lease ended"
        assert taken_at - lease_end < 5000
        assert redis_client.zscore(slots_key, token) is None
        mine.release(token_mine)
        assert redis_client.zcard(slots_key) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)


def test_the_window_survives_a_flushed_script_cache(limits_url):
    limits = CallLimits("test", f"flush-{os.getpid()}", max_calls_per_window=5, window_ms=1000, max_concurrent=2,
                        url=limits_url, lease_s=5)
    with limits.slot():
        pass
    backend(limits_url).redis.script_flush()  # as after a Redis restart
    with limits.slot():
        pass
    window = instance_key("test", f"flush-{os.getpid()}") + ":window"
    assert backend(limits_url).redis.zcard(window) == 2


# Redis unreachable -----------------------------------------------------------------------------------------------
def unreachable_url() -> tuple[str, int]:
    port = closed_port()
    return f"redis://limitsuser:s3cret-pw@127.0.0.1:{port}/2", port


def test_marketo_fails_closed_naming_the_redis_without_its_password(marketo):
    from mdsync.marketo import MarketoClient

    url, port = unreachable_url()
    client = MarketoClient(marketo.base_url, marketo.client_id, marketo.client_secret, max_attempts=2,
                           retry_initial_s=0.01, retry_max_s=0.02, limits_url=url)
    with pytest.raises(ServiceUnavailable) as info:
        client.describe_leads()
    text = str(info.value)
    assert f"redis://127.0.0.1:{port}/2" in text and "MDSYNC_LIMITS_URL" in text and "refused" in text.lower()
    assert "s3cret-pw" not in text and "limitsuser" not in text
    assert info.value.code == "limits" and is_retryable(info.value)
    assert marketo.calls()["total"] == 0  # not one call went out without the limits


def test_dynamics_fails_closed_naming_the_redis_without_its_password(dataverse):
    from mdsync.dynamics import DynamicsClient

    url, port = unreachable_url()
    client = DynamicsClient(dataverse.org_url, dataverse.client_id, dataverse.client_secret, dataverse.tenant_id,
                            authority=dataverse.authority, verify=dataverse.ca_bundle, max_attempts=2,
                            backoff_s=0.01, limits_url=url)
    with pytest.raises(ServiceUnavailable) as info:
        client.request("GET", "WhoAmI")
    text = str(info.value)
    assert f"redis://127.0.0.1:{port}/2" in text and "gave up after 2 attempts" in text
    assert "s3cret-pw" not in text and info.value.code == "limits" and is_retryable(info.value)
    assert not any("/api/data/" in k for k in dataverse.calls()["by_endpoint"])


# without servers -------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_urls_are_shown_without_credentials():
    assert shown_url("redis://user:pw@redis.internal:6380/3") == "redis://redis.internal:6380/3"
    assert shown_url("rediss://:pw@cache.example.com") == "rediss://cache.example.com/0"
    err = LimitsUnavailable("redis://:hunter2@10.0.0.5:6379/1", "ConnectionError: refused")
    assert "redis://10.0.0.5:6379/1" in str(err) and "hunter2" not in str(err) and err.retryable


@pytest.mark.unit
def test_keys_name_the_service_and_instance_never_a_person():
    from mdsync.dynamics.limits import instance_name as dynamics_instance
    from mdsync.marketo.limits import instance_name as marketo_instance

    assert instance_key("marketo", marketo_instance("https://123-ABC-456.mktorest.com/")) == \
        "mdsync:limits:marketo:123-abc-456.mktorest.com"
    app = dynamics_instance("https://Org.crm.dynamics.com", "C1D2-APP", None)
    person = dynamics_instance("https://org.crm.dynamics.com", "c1d2-app", "Jane.Doe@Contoso.com")
    assert app == "org.crm.dynamics.com:c1d2-app"
    assert person == f"org.crm.dynamics.com:{user_tag('jane.doe@contoso.com')}" and "jane" not in person.lower()


@pytest.mark.unit
def test_without_a_url_the_limits_stay_per_process_as_before(monkeypatch):
    from mdsync.dynamics.limits import client_limits
    from mdsync.marketo.limits import shared_limits

    monkeypatch.delenv("MDSYNC_LIMITS_URL", raising=False)
    marketo = shared_limits("https://a.mktorest.com", 100, 20, 10)
    assert marketo is shared_limits("https://A.mktorest.com/", 100, 20, 10)  # one budget per instance
    assert not marketo.shared and marketo.max_calls_per_window == 100 and marketo.window_ms == 21100
    dynamics = client_limits("https://org.crm.dynamics.com", "app", None, 8)
    assert not dynamics.shared and dynamics.max_calls_per_window is None and dynamics.max_concurrent == 8
    monkeypatch.setenv("MDSYNC_LIMITS_URL", "redis://127.0.0.1:1/0")  # nothing is contacted until a call
    monkeypatch.setenv("MDSYNC_DYNAMICS_MAX_CONCURRENT", "30")
    shared = client_limits("https://org.crm.dynamics.com", "app", None, 8)
    assert shared.shared and (shared.max_calls_per_window, shared.max_concurrent) == (5000, 30)
    assert shared.window_ms == 315100  # 300 s, widened by 5 % and 0.1 s


@pytest.mark.unit
def test_waits_are_measured_per_process():
    limits = CallLimits("test", "local", max_calls_per_window=2, window_ms=400, max_concurrent=1)
    waited = 0.0
    for _ in range(3):  # the third waits for the window
        held = limits.acquire()
        waited += held.waited_s
        limits.release(held)
    assert 0.3 <= waited < 2.0


if __name__ == "__main__":  # a worker process (see the module's docstring)
    serve(preload="--preload" in sys.argv)

"""Faults with real processes: Redis killed, paused and restarted, a replica SIGKILLed, mid-traffic.

What is checked is what the router promised: decisions keep flowing (no 5xx), `/healthz` says
degraded while Redis is away, and every outcome it acknowledged is in Redis and in every
replica's learned state afterwards (counted, not sampled); every log segment reads.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from router.replicas.redis_bus import RedisBus
from tests.conftest import LiveServer, launch_server, wait_ready
from tests.redis_server import ExternalRedis, RedisServer
from tests.router.replicas.test_replicas import (
    RU,
    at,
    evidence,
    learned,
    metric,
    replica_args,
    wait_for,
)


@pytest.fixture
def redis_proc(redis_server: RedisServer | ExternalRedis) -> RedisServer:
    """The private redis-server (fault tests kill it; they skip on REDIS_URL)."""
    if isinstance(redis_server, ExternalRedis):
        pytest.skip("fault tests need a private redis-server they can kill")
    return redis_server


class Traffic:
    """Clients routing on replicas and reporting a receipt for each decision to the replica
    that made it; counts every answer and keeps the acknowledged outcomes."""

    def __init__(self, servers: list[LiveServer]) -> None:
        self.urls = [s.url for s in servers]
        self.acked: list[str] = []
        self.unanswered: list[str] = []  # outcome posts cut off by a kill: maybe accepted
        self.decided = 0
        self.errors_5xx = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True)
            for i in range(len(self.urls))
        ]
        self._lock = threading.Lock()

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self, i: int) -> None:
        n = 0
        with httpx.Client(base_url=self.urls[i], timeout=10) as client:
            while not self._stop.is_set():
                n += 1
                t = (n % 600) / 10
                try:
                    resp = client.post("/v1/route", json={"to": RU, "at": at(t)})
                except httpx.TransportError as exc:  # the replica itself was killed
                    self.failures.append(type(exc).__name__)
                    time.sleep(0.05)
                    continue
                if resp.status_code >= 500:
                    self.errors_5xx += 1
                    continue
                did = resp.json()["decision_id"]
                with self._lock:
                    self.decided += 1
                body = {"decision_id": did, "event": "dlr", "status": "DELIVRD", "at": at(t + 3)}
                try:
                    answer = client.post("/v1/outcomes", json=body)
                except httpx.TransportError as exc:
                    self.failures.append(type(exc).__name__)
                    self.unanswered.append(did)
                    continue
                if answer.status_code >= 500:
                    self.errors_5xx += 1
                elif answer.status_code == 200 and answer.json()["recorded"] == 1:
                    with self._lock:
                        self.acked.append(did)

    def wait_acked(self, more: int, timeout: float = 20) -> None:
        """Wait until `more` outcomes beyond the current count are acknowledged."""
        target = len(self.acked) + more
        wait_for(lambda: len(self.acked) >= target, timeout)


def in_redis(url: str, decision_ids: list[str]) -> int:
    """How many of these decisions have their final receipt recorded in Redis."""
    import redis

    with redis.Redis.from_url(url) as client:
        bus = RedisBus(client)
        pipe = client.pipeline(transaction=False)
        for did in decision_ids:
            pipe.hexists(bus.record_key(did), "s:dlr-final")
        return sum(pipe.execute())


def health(server: LiveServer) -> dict:
    """The replica's /healthz body (must answer 200 in every state)."""
    resp = server.client.get("/healthz")
    assert resp.status_code == 200
    return resp.json()


def settled(servers: list[LiveServer], n: int, maybe: int = 0) -> bool:
    """All replicas healthy, nothing buffered, and n final answers learned on each (plus at
    most `maybe` whose answer a kill cut off: accepted, but the client could not know)."""
    return all(
        health(s)["status"] == "ok"
        and health(s)["shared"]["outbox"] == 0
        and n <= learned(s) <= n + maybe
        for s in servers
    )


def same_evidence(restarted: LiveServer, witness: LiveServer) -> bool:
    """A restarted replica (its counters start at zero) holds the witness's evidence."""
    if health(restarted)["status"] != "ok" or health(restarted)["shared"]["outbox"]:
        return False
    mine, theirs = evidence(restarted), evidence(witness)
    return all(abs(mine[c] - theirs[c]) < 0.2 for c in theirs)


@pytest.fixture
def pair(
    redis_proc: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LiveServer]]:
    """Two replicas on the private Redis."""
    servers = [
        launch_server(tmp_path_factory.mktemp(name), *replica_args(redis_proc.url))
        for name in ("a", "b")
    ]
    for s in servers:
        wait_ready(s)
    yield servers
    for s in servers:
        s.stop()


def test_redis_killed_and_restarted_mid_traffic_loses_nothing(
    pair: list[LiveServer], redis_proc: RedisServer
) -> None:
    a, b = pair
    with Traffic(pair) as traffic:
        traffic.wait_acked(50)
        redis_proc.kill()
        wait_for(lambda: health(a)["status"] == "degraded", timeout=10)
        body = health(a)
        assert body["shared"]["redis"] == "down" and "redis unavailable" in body["shared"]["reason"]
        traffic.wait_acked(100)  # decisions and outcomes keep flowing from the local engines
        assert metric(a, "router_redis_up") == 0
        assert metric(a, "router_outbox_items") > 0
        # B's decision is unknown to A while Redis is away: "retry", never "unknown" (404).
        elsewhere = b.client.post("/v1/route", json={"to": RU, "at": at(1)}).json()
        receipt = {"decision_id": elsewhere["decision_id"], "event": "dlr", "status": "DELIVRD"}
        refused = a.client.post("/v1/outcomes", json={**receipt, "at": at(4)})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        redis_proc.start()
        traffic.wait_acked(50)
    assert traffic.errors_5xx == 0 and not traffic.failures

    def retry() -> bool:
        resp = a.client.post("/v1/outcomes", json={**receipt, "at": at(4)})
        return resp.status_code == 200 and resp.json()["recorded"] == 1

    wait_for(retry, timeout=20)  # accepted once B has published its decision
    traffic.acked.append(elsewhere["decision_id"])
    wait_for(lambda: settled(pair, len(traffic.acked)), timeout=30)
    assert in_redis(redis_proc.url, traffic.acked) == len(traffic.acked)
    print(f"redis outage: {traffic.decided} decisions, {len(traffic.acked)} outcomes acknowledged")


def test_a_slow_redis_does_not_stall_decisions(
    pair: list[LiveServer], redis_proc: RedisServer
) -> None:
    a, _ = pair
    with redis_proc.client() as admin:
        admin.execute_command("CLIENT", "PAUSE", "2000", "ALL")
    took = []
    t_end = time.monotonic() + 1.5
    while time.monotonic() < t_end:  # all within the pause
        t0 = time.perf_counter()
        resp = a.client.post("/v1/route", json={"to": RU, "at": at(len(took) / 10)})
        took.append(time.perf_counter() - t0)
        assert resp.status_code == 200, resp.text
    took.sort()
    print(f"during a 2 s Redis pause: {len(took)} decisions, max {took[-1] * 1000:.0f} ms")
    assert len(took) >= 20 and took[-1] < 1.0  # generous: the pause is 2 s
    wait_for(lambda: health(a)["status"] == "ok" and health(a)["shared"]["outbox"] == 0, 15)


def _segments_read(data_dir: Path) -> int:
    """Every Parquet segment under the folder reads; returns how many rows they hold."""
    rows = 0
    for path in data_dir.rglob("*.parquet"):
        rows += pq.read_table(path).num_rows
    assert not list(data_dir.rglob("*.parquet.tmp"))
    return rows


def test_sigkill_of_a_replica_while_redis_is_down_loses_nothing(
    pair: list[LiveServer], redis_proc: RedisServer
) -> None:
    a, b = pair
    with Traffic([a]) as traffic:
        traffic.wait_acked(30)
        redis_proc.kill()
        traffic.wait_acked(60)  # acknowledged into A's journal only
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)
    redis_proc.start()
    restarted = launch_server(a.data_dir, *replica_args(redis_proc.url))
    try:
        wait_ready(restarted)
        n, maybe = len(traffic.acked), len(traffic.unanswered)
        wait_for(lambda: settled([b], n, maybe), timeout=30)
        assert in_redis(redis_proc.url, traffic.acked) == n
        wait_for(lambda: same_evidence(restarted, b), timeout=10)
        assert _segments_read(a.data_dir) > 0
    finally:
        restarted.stop()
    print(f"SIGKILL while Redis was down: {n} acknowledged outcomes, all learned after restart")


def test_sigkill_of_a_replica_mid_traffic_loses_nothing(
    pair: list[LiveServer], redis_proc: RedisServer
) -> None:
    a, b = pair
    with Traffic([a, b]) as traffic:
        traffic.wait_acked(100)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)
        traffic.wait_acked(30)  # B goes on
        assert health(b)["status"] == "ok"
    assert traffic.errors_5xx == 0
    restarted = launch_server(a.data_dir, *replica_args(redis_proc.url))
    try:
        wait_ready(restarted)
        n, maybe = len(traffic.acked), len(traffic.unanswered)
        wait_for(lambda: settled([b], n, maybe), timeout=30)
        assert in_redis(redis_proc.url, traffic.acked) == n
        wait_for(lambda: same_evidence(restarted, b), timeout=10)
        rows = _segments_read(a.data_dir)
        assert rows > 0
    finally:
        restarted.stop()

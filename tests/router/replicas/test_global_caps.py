"""Carrier throughput caps are one budget for the cluster (issue 13.5): two `router serve`
replicas on one Redis share a carrier's cap; with Redis away each falls back to cap / N."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from carriers.catalog import EXAMPLE_CATALOG, load_catalog
from router.replicas.capacity import SharedCaps
from tests.conftest import T0, LiveServer, launch_server, wait_ready
from tests.redis_server import RedisServer

CAP = 10.0  # parts/s of the capped carrier, for the whole cluster
CARRIER = "rulocal"
RU = "+79031234567"

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("REDIS_URL")), reason="stops its own redis-server (needs a private one)"
)


def low_cap_catalog(folder: Path) -> Path:
    """The example catalog with CARRIER capped at CAP parts/s."""
    doc = yaml.safe_load(EXAMPLE_CATALOG.read_text())
    for carrier in doc["carriers"]:
        if carrier["id"] == CARRIER:
            carrier["throughput_mps"] = CAP
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, list]]:
    folder = tmp_path_factory.mktemp("caps")
    srv = RedisServer(folder / "redis").start()
    catalog = low_cap_catalog(folder)
    args = ("--redis-url", srv.url, "--no-mlflow", "--auth", "off", "--catalog", str(catalog))
    replicas = [launch_server(folder / name, *args) for name in ("a", "b")]
    try:
        for r in replicas:
            wait_ready(r)
        deadline = time.monotonic() + 15  # both heartbeats seen: each knows N = 2
        while any(caps(r)["live_replicas"] != 2 for r in replicas):
            assert time.monotonic() < deadline, [caps(r) for r in replicas]
            time.sleep(0.1)
        yield srv, replicas
    finally:
        for r in replicas:
            r.stop()
        srv.kill()


def caps(server: LiveServer) -> dict:
    return server.client.get("/healthz").json()["shared"]["carrier_caps"]


def burst(replicas: list[LiveServer], seconds: float) -> tuple[list[int], list[int], float]:
    """Each replica routes batches to CARRIER only (the others excluded) as fast as it can for
    `seconds`; per replica, (messages routed, refused for capacity) and the window's length."""
    others = [c for c in load_catalog(EXAMPLE_CATALOG).carriers if c != CARRIER]
    body = [{"to": RU, "at": T0, "exclude": others} for _ in range(4)]
    routed = [0] * len(replicas)
    refused = [0] * len(replicas)
    t0 = time.monotonic()

    def run(i: int, server: LiveServer) -> None:
        while time.monotonic() - t0 < seconds:
            resp = server.client.post("/v1/route/batch", json=body)
            assert resp.status_code == 200, resp.text
            for answer in resp.json():
                if "decision_id" in answer:
                    assert answer["carrier"] == CARRIER, answer
                    routed[i] += 1
                else:
                    reason = answer["error"]["details"]["reasons"][CARRIER]
                    assert "at capacity" in reason, answer
                    refused[i] += 1

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return routed, refused, time.monotonic() - t0


def test_two_replicas_share_one_cap(cluster: tuple[RedisServer, list]) -> None:
    _, replicas = cluster
    time.sleep(1.2)  # the bucket refills (one second of burst)
    routed, refused, window = burst(replicas, 2.0)
    total = sum(routed)
    # the bucket: CAP per second plus one second of burst; plus what each replica held leased
    # when the window opened (a block of max(1, CAP / 10) parts each)
    bound = CAP * (window + 1) + 2 * max(1.0, CAP / 10) + 1
    print(f"routed {routed} (refused {refused}) in {window:.2f} s; bound {bound:.1f}")
    assert total <= bound, (routed, window)
    assert total >= CAP * window * 0.5, (routed, window)  # the budget is used, not starved
    assert all(refused), refused  # both replicas met the cap
    assert all(r > 0 for r in routed), routed  # and both got a share


def test_redis_away_each_replica_gets_cap_over_n(cluster: tuple[RedisServer, list]) -> None:
    srv, replicas = cluster
    srv.kill()
    deadline = time.monotonic() + 10
    while any(caps(r)["mode"] != "local" for r in replicas):
        assert time.monotonic() < deadline, [caps(r) for r in replicas]
        time.sleep(0.05)
    time.sleep(1.2)  # the local buckets fill: one second of cap / N
    routed, refused, window = burst(replicas, 2.0)
    share = CAP / 2
    print(f"Redis away: routed {routed} (refused {refused}) in {window:.2f} s, cap/N = {share}")
    for n in routed:
        assert share * window * 0.6 <= n <= share * (window + 1) + 1, (routed, window)
    assert all(refused), refused


def test_shared_caps_unit_fallback_reads_the_last_known_replica_count(tmp_path: Path) -> None:
    """A replica starting while Redis is away uses the live-replica count it last saw."""
    (tmp_path / "replicas").mkdir()
    (tmp_path / "replicas" / "live-replicas").write_text("4\n")
    dead = redis.Redis(port=1, socket_timeout=0.2, socket_connect_timeout=0.2)
    now = [100.0]
    caps = SharedCaps(dead, "x", "i", tmp_path, clock=lambda: now[0])
    carrier = dataclasses.replace(
        load_catalog(EXAMPLE_CATALOG).carriers[CARRIER], throughput_mps=40.0
    )
    caps.start(lambda: [carrier])
    try:
        assert not caps.up and caps.replicas == 4
        sent = 0
        while caps.can_send(carrier, 1):
            caps.take(carrier, 1)
            sent += 1
        assert sent == 10  # 40 / 4, one second of burst
        now[0] += 0.5
        assert caps.can_send(carrier, 5) and not caps.can_send(carrier, 6)
    finally:
        caps.stop()

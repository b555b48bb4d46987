"""Replicas on one Redis learn as one: real `router serve` processes and a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import T0, LiveServer, launch_server, wait_ready
from tests.redis_server import ExternalRedis, RedisServer

RU = "+79031234567"


def replica_args(redis_url: str, *extra: str) -> tuple[str, ...]:
    """`router serve` options of a replica on the test Redis (fast checkpoints, no MLflow; API
    keys off: these tests are about shared learning, tenants have tests of their own)."""
    return (
        "--redis-url",
        redis_url,
        "--no-mlflow",
        "--checkpoint-seconds",
        "2",
        "--auth",
        "off",
        *extra,
    )


def at(seconds: float) -> str:
    """T0 plus some seconds, RFC 3339."""
    return (datetime.fromisoformat(T0) + timedelta(seconds=seconds)).isoformat()


def route(server: LiveServer, n: int = 1, t: float = 0.0) -> list[dict]:
    """Route n messages to RU at T0 + t; every answer must be a decision."""
    body = [{"to": RU, "at": at(t)} for _ in range(n)]
    resp = server.client.post("/v1/route/batch", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert all("decision_id" in d for d in out), out
    return out


def delivered(server: LiveServer, decisions: list[dict], t: float = 5.0) -> dict:
    """Report a DELIVRD receipt for each decision, 5 s after it (within the SLA)."""
    body = [
        {"decision_id": d["decision_id"], "event": "dlr", "status": "DELIVRD", "at": at(t)}
        for d in decisions
    ]
    resp = server.client.post("/v1/outcomes", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """Sum of a Prometheus series (samples matching the labels) on one replica."""
    text = server.client.get("/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def learned(server: LiveServer) -> float:
    """How many final answers this replica's learner has taken."""
    return metric(server, "router_learner_updates_total")


def wait_for(check: callable, timeout: float = 10.0) -> float:
    """Poll until check() is true; returns the seconds it took (fails on timeout)."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)
    return time.monotonic() - t0


def evidence(server: LiveServer) -> dict[str, float]:
    """Per carrier, the evidence behind its RU estimate."""
    body = server.client.get("/v1/carriers", params={"country": "RU"}).json()
    return {c["id"]: c["countries"]["RU"]["evidence"] for c in body["carriers"] if c["countries"]}


@pytest.fixture
def pair(
    redis_server: RedisServer | ExternalRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two replicas (own data folders, as on two hosts) sharing the test Redis."""
    a = launch_server(tmp_path_factory.mktemp("a"), *replica_args(redis_server.url))
    b = launch_server(tmp_path_factory.mktemp("b"), *replica_args(redis_server.url))
    wait_ready(a)
    wait_ready(b)
    yield a, b
    for s in (a, b):
        s.stop()


def test_outcomes_posted_to_one_replica_move_the_other(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    a, b = pair
    before = evidence(b)
    decisions = route(a, 60)
    assert delivered(a, decisions)["recorded"] == 60
    lag = wait_for(lambda: learned(b) == 60)
    assert learned(a) == 60
    after = evidence(b)
    gained = {c: after[c] - before[c] for c in after}
    chosen = {d["carrier"] for d in decisions}
    assert all(gained[c] > 0 for c in chosen), gained
    assert evidence(a) == pytest.approx(after, abs=0.2)
    print(f"replication lag (outcomes on A -> learned on B, 60 events): {lag * 1000:.0f} ms")
    # B's own decisions now see A's evidence: the carrier A's receipts praised gains on B.
    assert metric(b, "router_replication_lag_seconds_count") >= 120  # decisions + outcomes


def test_an_outcome_posted_to_both_replicas_is_applied_once(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    a, b = pair
    decisions = route(a, 5)
    first = delivered(a, decisions)
    second = delivered(b, decisions)
    assert first["recorded"] == 5 and second["duplicates"] == 5
    wait_for(lambda: learned(b) == 5)
    time.sleep(0.3)  # anything applied twice would show by now
    assert learned(a) == 5 and learned(b) == 5
    both = metric(a, "router_outcomes_total") + metric(b, "router_outcomes_total")
    assert both == 5  # counted once, by the replica that accepted it


def test_both_replicas_post_the_same_outcome_at_once(pair: tuple[LiveServer, LiveServer]) -> None:
    """The race: both accept before either has read the other's event; one wins everywhere."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = pair
    decisions = route(b, 30)
    wait_for(lambda: metric(a, "router_replicated_events_total", kind="decision") >= 30)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda s: delivered(s, decisions), (a, b)))
    assert sum(x["recorded"] for x in answers) == 30
    assert sum(x["duplicates"] for x in answers) == 30
    wait_for(lambda: learned(a) == 30 and learned(b) == 30)
    time.sleep(0.3)
    assert learned(a) == 30 and learned(b) == 30


def test_an_outcome_for_a_decision_made_elsewhere_is_accepted(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    a, b = pair
    for _ in range(20):  # at once: B may not have read A's decision yet
        d = route(a)[0]
        assert delivered(b, [d])["recorded"] == 1
    wait_for(lambda: learned(a) == 20)
    got = b.client.get(f"/v1/decisions/{d['decision_id']}").json()
    assert got["carrier"] == d["carrier"] and got["state"]["final_status"] == "DELIVRD"
    unknown = b.client.post(
        "/v1/outcomes", json={"decision_id": "f" * 32, "event": "dlr", "status": "DELIVRD"}
    )
    assert unknown.status_code == 404


def test_a_new_replica_starts_from_the_checkpoint_and_the_stream(
    pair: tuple[LiveServer, LiveServer],
    redis_server: RedisServer | ExternalRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    a, _ = pair
    delivered(a, route(a, 40))
    with redis_server.client() as r:
        wait_for(lambda: r.exists("router:checkpoint") == 1, timeout=15)
    delivered(a, route(a, 10, t=10), t=15)  # after the checkpoint: only in the stream tail
    c = launch_server(tmp_path_factory.mktemp("c"), *replica_args(redis_server.url))
    try:
        wait_ready(c)
        assert evidence(c) == pytest.approx(evidence(a), abs=0.2)
        health = c.client.get("/healthz").json()
        assert health["status"] == "ok" and health["shared"]["redis"] == "up"
    finally:
        c.stop()

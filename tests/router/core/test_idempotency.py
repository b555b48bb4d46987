"""Idempotent `POST /v1/route`: the same key gives the same decision, logged once (real servers
over HTTP; replicas over a private redis-server)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import T0, LiveServer, launch_server, start_server, wait_ready
from tests.redis_server import ExternalRedis, RedisServer, redis_from_env
from tests.router.replicas.test_replicas import metric, replica_args, wait_for

RU = "+79031234567"
OTHER = "+79031234568"
DLR_TIMEOUT = 48 * 3600  # every class of the default policy file


def at(seconds: float) -> str:
    """T0 plus some seconds, RFC 3339."""
    return (datetime.fromisoformat(T0) + timedelta(seconds=seconds)).isoformat()


def post_route(server: LiveServer, body: dict, key: str | None = None) -> tuple[int, dict]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    resp = server.client.post("/v1/route", json={"to": RU, "at": T0, **body}, headers=headers)
    return resp.status_code, resp.json()


def decided(server: LiveServer, body: dict, key: str | None = None) -> dict:
    status, out = post_route(server, body, key)
    assert status == 200, out
    return out


def decisions_counted(server: LiveServer) -> float:
    return metric(server, "router_decisions_total")


def logged_rows(data_dir: Path) -> list[str]:
    """Decision ids in the decision log's Parquet segments (rolled at a clean stop)."""
    folder = data_dir / "decision_log" / "decisions"
    ids: list[str] = []
    for p in folder.glob("*.parquet"):
        ids += pq.read_table(p).column("decision_id").to_pylist()
    return ids


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server(tmp_path_factory.mktemp("idem"), "--no-mlflow")
    yield srv
    srv.stop()


# ---- one server ------------------------------------------------------------------------------


def test_the_same_key_gives_the_same_decision_and_counts_one(live: LiveServer) -> None:
    before = decisions_counted(live)
    pending = live.client.get("/healthz").json()["pending"]
    first = decided(live, {"tenant": "acme", "idempotency_key": "job-1:1"})
    again = decided(live, {"tenant": "acme", "at": at(3), "idempotency_key": "job-1:1"})
    by_header = decided(live, {"tenant": "acme", "at": at(9)}, key="job-1:1")
    both = decided(live, {"tenant": "acme", "idempotency_key": "job-1:1"}, key="job-1:1")
    assert first == again == by_header == both  # same id, carrier, propensity, fallbacks, at
    assert decisions_counted(live) == before + 1
    assert live.client.get("/healthz").json()["pending"] == pending + 1
    assert metric(live, "router_idempotent_requests_total", result="replayed") >= 3
    rec = live.client.get(f"/v1/decisions/{first['decision_id']}").json()
    assert rec["carrier"] == first["carrier"] and rec["propensity"] == first["propensity"]
    # The number written another way is the same destination.
    assert decided(live, {"to": "+7 903 123-45-67", "tenant": "acme"}, key="job-1:1") == first
    # Another key is another decision.
    assert decided(live, {"tenant": "acme"}, key="job-1:2")["decision_id"] != first["decision_id"]


def test_a_key_with_another_request_is_a_conflict(live: LiveServer) -> None:
    first = decided(live, {"tenant": "acme", "exclude": ["rulocal"]}, key="k-conflict")
    before = decisions_counted(live)
    for change in (
        {"to": OTHER},
        {"message_class": "transactional"},
        {"exclude": ["rulocal", "globalprime"]},
        {"exclude": []},
        {"attempt": 2},
        {"segments": 2},
    ):
        status, out = post_route(
            live, {"tenant": "acme", "exclude": ["rulocal"], **change}, key="k-conflict"
        )
        assert status == 409, (change, out)
        err = out["error"]
        assert err["code"] == "idempotency_conflict" and err["field"] == "idempotency_key"
        assert set(err) <= {"code", "message", "field", "details"}
        assert "9031234" not in str(out)  # no number in the answer
    assert decisions_counted(live) == before
    # The original request still gets its decision.
    again = decided(live, {"tenant": "acme", "exclude": ["rulocal"]}, key="k-conflict")
    assert again == first


def test_keys_are_per_tenant(live: LiveServer) -> None:
    acme = decided(live, {"tenant": "acme"}, key="shared-name")
    globex = decided(live, {"tenant": "globex"}, key="shared-name")
    assert acme["decision_id"] != globex["decision_id"]
    assert decided(live, {"tenant": "globex"}, key="shared-name") == globex
    assert decided(live, {"tenant": "acme"}, key="shared-name") == acme


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("body", ""),
        ("body", "has space"),
        ("body", "a" * 129),
        ("body", "ключ"),
        ("body", "slash/not"),
        ("header", "has space"),
        ("header", "a" * 129),
        ("header", ""),
    ],
)
def test_a_malformed_key_is_422_naming_the_field(live: LiveServer, where: str, key: str) -> None:
    before = decisions_counted(live)
    if where == "body":
        status, out = post_route(live, {"idempotency_key": key})
        field = "idempotency_key"
    else:
        resp = live.client.post(
            "/v1/route", json={"to": RU, "at": T0}, headers={"Idempotency-Key": key}
        )
        status, out = resp.status_code, resp.json()
        field = "Idempotency-Key"
    assert status == 422, out
    assert out["error"]["code"] == "invalid_request" and out["error"]["field"] == field
    assert "128" in out["error"]["message"]
    assert decisions_counted(live) == before


def test_header_and_field_must_agree(live: LiveServer) -> None:
    status, out = post_route(live, {"idempotency_key": "one"}, key="two")
    assert status == 422
    assert out["error"]["field"] == "idempotency_key" and "differ" in out["error"]["message"]
    assert decided(live, {"idempotency_key": "a" * 128}, key="a" * 128)  # longest key


def test_batch_items_carry_keys(live: LiveServer) -> None:
    before = decisions_counted(live)
    body = [
        {"to": RU, "at": T0, "idempotency_key": "b-1"},
        {"to": RU, "at": T0, "idempotency_key": "b-2"},
        {"to": RU, "at": T0, "idempotency_key": "b-1"},  # a repeat inside the batch
        {"to": RU, "at": T0},  # no key: a decision of its own
        {"to": OTHER, "at": T0, "idempotency_key": "b-2"},  # the key of another request
    ]
    out = live.client.post("/v1/route/batch", json=body).json()
    assert out[0] == out[2]
    assert len({out[0]["decision_id"], out[1]["decision_id"], out[3]["decision_id"]}) == 3
    assert out[4]["error"]["code"] == "idempotency_conflict"
    assert out[4]["error"]["field"] == "idempotency_key"
    assert decisions_counted(live) == before + 3
    # Across requests: batch and single route share the keys.
    again = live.client.post("/v1/route/batch", json=body[:2]).json()
    assert again == out[:2]
    assert decided(live, {}, key="b-2") == out[1]
    assert decisions_counted(live) == before + 3
    # A bad key in an item fails the batch like any invalid field, naming the item.
    bad = live.client.post("/v1/route/batch", json=[body[0], {"to": RU, "idempotency_key": "x y"}])
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "[1].idempotency_key"
    # The header is for single routes; a batch names a key per item.
    resp = live.client.post("/v1/route/batch", json=body[:1], headers={"Idempotency-Key": "b-1"})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "Idempotency-Key"


def test_a_key_expires_after_the_dlr_timeout_in_event_time(live: LiveServer) -> None:
    """Last in this module: it moves the server's event clock two days on."""
    t = 1000.0
    first = decided(live, {"at": at(t)}, key="expiring")
    assert decided(live, {"at": at(t + DLR_TIMEOUT - 1)}, key="expiring") == first
    before = decisions_counted(live)
    later = decided(live, {"at": at(t + DLR_TIMEOUT + 1)}, key="expiring")
    assert later["decision_id"] != first["decision_id"]
    assert decisions_counted(live) == before + 1
    # Expired, the key may carry another request: it is a new key now.
    other = decided(live, {"to": OTHER, "at": at(t + 2 * DLR_TIMEOUT + 2)}, key="expiring")
    assert other["decision_id"] not in (first["decision_id"], later["decision_id"])


def test_one_log_row_per_key_and_keys_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    live = start_server(data, "--no-mlflow")
    try:
        first = decided(live, {"tenant": "acme"}, key="restart-1")
        assert decided(live, {"tenant": "acme", "at": at(2)}, key="restart-1") == first
        decided(live, {"tenant": "acme"}, key=RU.lstrip("+"))  # a key that is a number
    finally:
        assert live.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    rows = logged_rows(data)
    assert len(rows) == 2 and first["decision_id"] in rows
    snapshot = (data / "state.json").read_text()
    assert first["decision_id"] in snapshot and RU.lstrip("+") not in snapshot  # key as HMAC
    live = start_server(data, "--no-mlflow")
    try:
        assert decided(live, {"tenant": "acme", "at": at(5)}, key="restart-1") == first
        status, out = post_route(live, {"tenant": "acme", "to": OTHER}, key="restart-1")
        assert status == 409 and out["error"]["code"] == "idempotency_conflict"
    finally:
        live.stop()
    assert len(logged_rows(data)) == 2  # nothing new logged after the restart


def test_the_local_keys_are_bounded_and_expire_in_event_time() -> None:
    from prometheus_client import CollectorRegistry

    from router.contract.messages import RouteDecision
    from router.core.idempotency import Claim, IdempotencyKeys

    keys = IdempotencyKeys(capacity=5, registry=CollectorRegistry())

    def claim(k: int, now: float = 0.0) -> Claim:
        return Claim("acme", f"k{k}", "digest", now, 100.0)

    for k in range(10):
        keys.put(claim(k), RouteDecision(f"d{k}", "c", [], 1.0, "p@1", {}, float(k)))
    assert len(keys) == 5  # the ones expiring first went first
    assert keys.get(claim(0), 0.0) is None and keys.get(claim(9), 0.0).decision_id == "d9"
    assert keys.evicted._value.get() == 5
    assert keys.get(claim(5, now=104.9), 0.0).decision_id == "d5"
    assert keys.get(claim(5, now=105.0), 0.0) is None  # its lifetime is over (event time)
    keys.purge(107.5)
    assert len(keys) == 2
    restored = IdempotencyKeys(capacity=5, registry=CollectorRegistry())
    restored.load(keys.state(), clock=108.0)
    assert len(restored) == 1 and restored.get(claim(9, 108.0), 108.0).decision_id == "d9"


# ---- replicas --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(
    shared_redis: RedisServer | ExternalRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, LiveServer]]:
    a = launch_server(tmp_path_factory.mktemp("a"), *replica_args(shared_redis.url))
    b = launch_server(tmp_path_factory.mktemp("b"), *replica_args(shared_redis.url))
    wait_ready(a)
    wait_ready(b)
    yield a, b
    for s in (a, b):
        s.stop()


def test_a_key_served_by_one_replica_is_answered_alike_by_the_other(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    a, b = pair
    base_a, base_b = decisions_counted(a), decisions_counted(b)
    first = decided(a, {"tenant": "acme"}, key="rep-1")
    assert decided(b, {"tenant": "acme", "at": at(1)}, key="rep-1") == first
    assert decided(b, {"tenant": "acme", "at": at(2)}, key="rep-1") == first  # now local on B
    assert decided(a, {"tenant": "acme"}, key="rep-1") == first
    assert (decisions_counted(a), decisions_counted(b)) == (base_a + 1, base_b)
    status, out = post_route(b, {"tenant": "acme", "attempt": 2}, key="rep-1")
    assert status == 409 and out["error"]["code"] == "idempotency_conflict"
    # B adopts A's decision from the stream like any other: its outcome may go to B.
    wait_for(lambda: b.client.get(f"/v1/decisions/{first['decision_id']}").status_code == 200)
    # Batches on either replica share the keys too, repeats inside them included.
    body = [
        {"to": RU, "at": T0, "idempotency_key": "rep-b1"},
        {"to": RU, "at": T0, "idempotency_key": "rep-1", "tenant": "acme"},
        {"to": RU, "at": T0, "idempotency_key": "rep-b1"},
        {"to": RU, "at": T0},
    ]
    on_b = b.client.post("/v1/route/batch", json=body).json()
    assert on_b[0] == on_b[2] and on_b[1] == first
    assert a.client.post("/v1/route/batch", json=body[:3]).json() == on_b[:3]
    assert decisions_counted(a) == base_a + 1 and decisions_counted(b) == base_b + 2


def test_the_same_key_posted_to_both_replicas_at_once_is_decided_once(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    a, b = pair
    base = decisions_counted(a) + decisions_counted(b)
    answers: dict[tuple[int, int], dict] = {}

    def post(server: LiveServer, n: int) -> None:
        for k in range(20):
            answers[(n, k)] = decided(server, {"at": at(60)}, key=f"race-{k}")

    threads = [threading.Thread(target=post, args=(s, n)) for n, s in enumerate((a, b, a, b))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for k in range(20):
        assert len({str(answers[(n, k)]) for n in range(4)}) == 1, k
    assert decisions_counted(a) + decisions_counted(b) == base + 20


def test_without_redis_keys_are_local_and_published_when_it_returns(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    srv = redis_from_env(tmp_path_factory.mktemp("redis-down"))
    if not isinstance(srv, RedisServer):
        pytest.skip("needs a private redis-server to stop")
    a = launch_server(tmp_path_factory.mktemp("da"), *replica_args(srv.url))
    b = launch_server(tmp_path_factory.mktemp("db"), *replica_args(srv.url))
    try:
        wait_ready(a)
        wait_ready(b)
        assert a.client.get("/healthz").json()["shared"]["idempotency_keys"] == "shared"
        before = decided(a, {}, key="down-0")
        srv.stop()
        assert decided(a, {"at": at(1)}, key="down-0") == before  # local keys still answer
        during = decided(a, {}, key="down-1")
        assert decided(a, {"at": at(1)}, key="down-1") == during
        health = a.client.get("/healthz").json()
        assert health["status"] == "degraded"
        assert health["shared"]["idempotency_keys"] == "local"
        assert health["shared"]["idempotency_keys_unpublished"] == 1
        srv.start()

        def published() -> bool:
            shared = [s.client.get("/healthz").json()["shared"] for s in (a, b)]
            return all(x["redis"] == "up" for x in shared) and (
                shared[0]["idempotency_keys_unpublished"] == 0
            )

        wait_for(published, timeout=20)
        # The key answered while Redis was away is published: B answers it alike.
        assert decided(b, {"at": at(2)}, key="down-1") == during
        assert decided(b, {"at": at(2)}, key="down-0") == before
        assert decisions_counted(b) == 0
    finally:
        for s in (a, b):
            s.stop()
        srv.kill()

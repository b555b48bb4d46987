"""API keys and rate limits shared by replicas through Redis: a key made once with the CLI works
on every replica, is stored only hashed, its rate limit is one bucket for all replicas, and a
revocation reaches every replica within the store's refresh time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import T0, LiveServer, launch_server, wait_ready
from tests.redis_server import ExternalRedis, RedisServer, redis_from_env

ROOT = Path(__file__).resolve().parents[3]
PREFIX = "authtest"
CLI = (sys.executable, "-m", "router.cli")
RU = "+79031234567"


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | ExternalRedis]:
    """A Redis for this module (REDIS_URL's, or a private server)."""
    srv: RedisServer | ExternalRedis = redis_from_env(tmp_path_factory.mktemp("redis"))
    with srv.client() as r:
        for key in r.scan_iter(f"{PREFIX}:*"):
            r.delete(key)
    yield srv
    if isinstance(srv, RedisServer):
        srv.kill()


@pytest.fixture(scope="module")
def redis_url(redis_srv: RedisServer | ExternalRedis) -> str:
    """Its URL."""
    return redis_srv.url


def keys_cli(redis_url: str, data_dir: Path, *args: str) -> dict:
    """`router keys …` against the Redis store; its JSON output."""
    redis_args = ("--redis-url", redis_url, "--redis-prefix", PREFIX)
    out = subprocess.run(
        [*CLI, "keys", *args, "--data-dir", str(data_dir), *redis_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def replicas(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two replicas (own data dirs, as on two hosts) on one Redis, with keys in it."""
    cli_dir = tmp_path_factory.mktemp("cli")
    keys_cli(redis_url, cli_dir, "create", "--scopes", "admin")  # auth on from the start
    args = ("--redis-url", redis_url, "--redis-prefix", PREFIX, "--no-mlflow")
    a = launch_server(tmp_path_factory.mktemp("a"), *args, "--checkpoint-seconds", "2")
    b = launch_server(tmp_path_factory.mktemp("b"), *args, "--checkpoint-seconds", "2")
    wait_ready(a)
    wait_ready(b)
    yield a, b
    for s in (a, b):
        s.stop()


def post_route(live: LiveServer, raw: str) -> int:
    """Route one message with a key; the status code."""
    resp = live.client.post(
        "/v1/route", json={"to": RU, "at": T0}, headers={"Authorization": f"Bearer {raw}"}
    )
    assert resp.status_code in (200, 401, 429), resp.text
    return resp.status_code


def wait_accepted(replicas: tuple[LiveServer, ...], raw: str) -> None:
    """Until every replica's copy of the store holds a new key (refreshed every second)."""
    t0 = time.monotonic()
    while any(post_route(x, raw) != 200 for x in replicas):
        assert time.monotonic() - t0 < 5, "a replica does not know the new key"
        time.sleep(0.1)


def test_a_key_made_once_works_on_every_replica_and_is_stored_hashed(
    replicas: tuple[LiveServer, LiveServer], redis_url: str, tmp_path: Path
) -> None:
    rec = keys_cli(redis_url, tmp_path, "create", "--tenant", "acme")
    raw = rec["key"]
    wait_accepted(replicas, raw)
    for live in replicas:
        assert live.client.get("/healthz").json()["auth"] == "on"
        assert post_route(live, raw) == 200
        assert post_route(live, raw + "x") == 401
        assert not (live.data_dir / "api_keys.json").exists()
    assert not (tmp_path / "api_keys.json").exists()
    with redis.Redis.from_url(redis_url, socket_timeout=5) as r:
        stored = r.hgetall(f"{PREFIX}:{{auth}}:keys")
    assert rec["id"].encode() in stored
    blob = b"".join(stored.values())
    assert raw.encode() not in blob and raw.split("_", 2)[2].encode() not in blob


def test_a_rate_limit_is_one_bucket_for_all_replicas(
    replicas: tuple[LiveServer, LiveServer], redis_url: str, tmp_path: Path
) -> None:
    a, b = replicas
    raw = keys_cli(
        redis_url, tmp_path, "create", "--tenant", "acme", "--rate", "0.5", "--burst", "3"
    )["key"]
    wait_accepted((a,), raw)
    time.sleep(1.2)  # b's copy too
    assert [post_route(x, raw) for x in (b, a)] == [200, 200]
    resp = b.client.post(
        "/v1/route", json={"to": RU, "at": T0}, headers={"Authorization": f"Bearer {raw}"}
    )
    assert resp.status_code == 429, resp.text
    assert resp.json()["error"]["details"]["limit"].startswith("key ")
    wait = int(resp.headers["Retry-After"])
    assert 1 <= wait <= 2
    time.sleep(wait)
    assert post_route(a, raw) == 200


def test_a_revocation_reaches_every_replica(
    replicas: tuple[LiveServer, LiveServer], redis_url: str, tmp_path: Path
) -> None:
    rec = keys_cli(redis_url, tmp_path, "create", "--tenant", "globex")
    wait_accepted(replicas, rec["key"])
    keys_cli(redis_url, tmp_path, "revoke", rec["id"])
    t0 = time.monotonic()
    while any(post_route(x, rec["key"]) != 401 for x in replicas):
        assert time.monotonic() - t0 < 5, "a replica still accepts the revoked key"
        time.sleep(0.1)
    listed = keys_cli(redis_url, tmp_path, "list")["keys"]
    assert [k["revoked"] for k in listed if k["id"] == rec["id"]] != [None]


def test_without_redis_keys_and_limits_keep_working_from_each_replica(
    replicas: tuple[LiveServer, LiveServer],
    redis_srv: RedisServer | ExternalRedis,
    tmp_path: Path,
) -> None:
    """Redis killed: each replica authenticates from its copy and limits in-process."""
    if not isinstance(redis_srv, RedisServer):
        pytest.skip("REDIS_URL's server cannot be killed by the tests")
    tight = keys_cli(redis_srv.url, tmp_path, "create", "--rate", "0.2", "--burst", "2")["key"]
    ok = keys_cli(redis_srv.url, tmp_path, "create", "--tenant", "acme")["key"]
    wait_accepted(replicas, ok)  # made after `tight`: the replicas know both
    redis_srv.kill()
    try:
        for live in replicas:
            assert post_route(live, ok) == 200
            assert post_route(live, "rk_unknown_key") == 401
        a = replicas[0]
        codes = [post_route(a, tight) for _ in range(4)]
        assert codes[-1] == 429 and codes.count(200) <= 2, codes
    finally:
        redis_srv.start()
    for live in replicas:
        assert live.proc.poll() is None and live.client.get("/healthz").status_code == 200

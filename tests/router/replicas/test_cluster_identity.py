"""One identity per cluster (issue 13.3): every replica on one Redis hashes a number the same way,
and a replica whose HMAC key is not the cluster's refuses to start."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis

from router.replicas.identity import HmacKeyMismatch, cluster_hmac_key, fingerprint
from tests.conftest import T0, LiveServer, launch_server, wait_ready
from tests.redis_server import ExternalRedis, RedisServer

RU = "+79031234567"
ROOT = Path(__file__).resolve().parents[3]


def replica(data_dir: Path, url: str, prefix: str, key: str | None) -> LiveServer:
    """A `router serve` replica on `prefix`, with ROUTER_HMAC_KEY = key (None: unset)."""
    return launch_server(
        data_dir,
        "--redis-url",
        url,
        "--redis-prefix",
        prefix,
        "--no-mlflow",
        "--auth",
        "off",
        environ={"ROUTER_HMAC_KEY": key},
    )


def hmacs(data_dir: Path) -> set[str]:
    """The msisdn_hmac values in a stopped replica's decision log."""
    tables = [pq.read_table(p) for p in (data_dir / "decision_log" / "decisions").glob("*.parquet")]
    return {h for t in tables for h in t.column("msisdn_hmac").to_pylist()}


def serve_once(
    data_dir: Path, url: str, prefix: str, key: str | None
) -> subprocess.CompletedProcess:
    """`router serve` that is expected to refuse to start (bounded by a timeout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ROUTER_HMAC_KEY")}
    if key is not None:
        env["ROUTER_HMAC_KEY"] = key
    cmd = [sys.executable, "-m", "router.cli", "serve", "--port", "0", "--data-dir", str(data_dir)]
    cmd += ["--redis-url", url, "--redis-prefix", prefix, "--no-mlflow"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def test_two_replicas_without_a_configured_key_hash_a_number_alike(
    shared_redis: RedisServer | ExternalRedis, tmp_path: Path
) -> None:
    a = replica(tmp_path / "a", shared_redis.url, "idA", None)
    b = replica(tmp_path / "b", shared_redis.url, "idA", None)
    try:
        for server in (wait_ready(a), wait_ready(b)):
            resp = server.client.post("/v1/route", json={"to": RU, "at": T0})
            assert resp.status_code == 200, resp.text
    finally:
        a.stop()
        b.stop()
    ha, hb = hmacs(a.data_dir), hmacs(b.data_dir)
    assert len(ha) == 1 and ha == hb, (ha, hb)
    with shared_redis.client() as c:
        record = c.hgetall("idA:hmac")
    key = record[b"key"]
    assert record[b"fp"].decode() == fingerprint(key)
    for folder in (a.data_dir, b.data_dir):  # a private copy, to start while Redis is away
        copy = folder / "replicas" / "cluster-hmac.key"
        assert copy.read_bytes() == key
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        assert not (folder / "hmac.key").exists()  # no per-replica key any more


def test_a_configured_key_is_recorded_only_by_its_fingerprint_and_a_different_one_refused(
    shared_redis: RedisServer | ExternalRedis, tmp_path: Path
) -> None:
    a = replica(tmp_path / "a", shared_redis.url, "idB", "cluster-secret-1")
    try:
        wait_ready(a)
        with shared_redis.client() as c:
            record = c.hgetall("idB:hmac")
        assert set(record) == {b"fp"}  # the key itself is not written to Redis
        assert record[b"fp"].decode() == fingerprint(b"cluster-secret-1")

        done = serve_once(tmp_path / "b", shared_redis.url, "idB", "another-secret-2")
        assert done.returncode == 2, done.stderr
        assert "refusing to start" in done.stderr
        assert "ROUTER_HMAC_KEY is not this cluster's HMAC key" in done.stderr, done.stderr
        assert fingerprint(b"another-secret-2")[:16] in done.stderr
        assert "another-secret-2" not in done.stderr and "cluster-secret-1" not in done.stderr

        done = serve_once(tmp_path / "c", shared_redis.url, "idB", None)
        assert done.returncode == 2, done.stderr
        assert "set ROUTER_HMAC_KEY" in done.stderr, done.stderr

        same = replica(tmp_path / "d", shared_redis.url, "idB", "cluster-secret-1")
        try:
            wait_ready(same)  # the right key starts
        finally:
            same.stop()
    finally:
        a.stop()


def test_replicas_starting_at_once_agree_on_one_key(
    shared_redis: RedisServer | ExternalRedis, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(shared_redis.url)
    with ThreadPoolExecutor(8) as pool:
        keys = list(
            pool.map(lambda i: cluster_hmac_key(client, "idC", tmp_path / f"r{i}"), range(16))
        )
    assert len(set(keys)) == 1
    with pytest.raises(HmacKeyMismatch, match="fingerprint"):
        cluster_hmac_key(client, "idC", tmp_path / "x", b"not-the-cluster-key")
    assert cluster_hmac_key(client, "idC", tmp_path / "y", keys[0]) == keys[0]


def test_redis_away_at_start_uses_the_kept_copy_or_refuses(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "redis").start()
    try:
        key = cluster_hmac_key(srv.client(), "idD", tmp_path / "r1")
    finally:
        srv.kill()
    dead = redis.Redis.from_url(srv.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    assert cluster_hmac_key(dead, "idD", tmp_path / "r1") == key  # the kept copy
    assert cluster_hmac_key(dead, "idD", tmp_path / "r2", b"configured") == b"configured"
    with pytest.raises(HmacKeyMismatch, match="Start when Redis answers"):
        cluster_hmac_key(dead, "idD", tmp_path / "r3")


def test_a_redis_that_lost_the_record_gets_the_kept_key_back(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "redis").start()
    try:
        client = srv.client()
        key = cluster_hmac_key(client, "idE", tmp_path / "r1")
        client.delete("idE:hmac")  # e.g. a Redis restarted without persistence
        assert cluster_hmac_key(client, "idE", tmp_path / "r1") == key
        assert cluster_hmac_key(client, "idE", tmp_path / "r2") == key
    finally:
        srv.kill()

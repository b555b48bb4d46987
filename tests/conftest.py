"""Shared fixtures: a real `router serve` process on a loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.redis_server import ExternalRedis, RedisServer, redis_from_env

# Event times used by API tests: fixed, in the past, so tests are reproducible.
T0 = "2026-11-02T10:00:00+00:00"


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    """A running `router serve` subprocess and an HTTP client to it."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log_path: Path
    client: httpx.Client

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Stop the server with `sig` and wait for it to exit; returns its exit code."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")


def launch_server(
    data_dir: Path, *args: str, replay: bool = True, environ: dict[str, str | None] | None = None
) -> LiveServer:
    """Start `router serve` on a free port with `data_dir`; returns at once (see `wait_ready`).

    `replay` accepts event times far from the wall clock (the tests' fixed T0); `environ` sets (or,
    with None, removes) environment variables of the server.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = data_dir / f"server-{port}.log"
    env = {**os.environ, "ROUTER_HMAC_KEY": "test-key", "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)  # shared state only where a test asks for it (--redis-url)
    for name, value in (environ or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    cmd = [
        sys.executable,
        "-m",
        "router.cli",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--seed",
        "1",
        "--log-level",
        "warning",
        *args,
    ]
    if replay:
        cmd.append("--replay")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
    url = f"http://127.0.0.1:{port}"
    return LiveServer(proc, url, data_dir, log_path, httpx.Client(base_url=url, timeout=30))


def wait_ready(live: LiveServer, timeout: float = 90) -> LiveServer:
    """Wait until the server's /healthz answers."""
    deadline = time.monotonic() + timeout
    while True:
        if live.proc.poll() is not None:
            raise RuntimeError(f"server exited: {live.output()}")
        try:
            if live.client.get("/healthz").status_code == 200:
                return live
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            live.proc.kill()
            raise RuntimeError("server did not start in time")
        time.sleep(0.1)


def start_server(data_dir: Path, *args: str, replay: bool = True) -> LiveServer:
    """Start `router serve` and wait until it answers."""
    return wait_ready(launch_server(data_dir, *args, replay=replay))


def _redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | ExternalRedis]:
    """REDIS_URL's Redis (flushed) when set, else a private `redis-server`, killed after."""
    srv = redis_from_env(tmp_path_factory.mktemp("redis"))
    if isinstance(srv, ExternalRedis):
        with srv.client() as c:
            c.flushdb()
    yield srv
    if isinstance(srv, RedisServer):
        srv.kill()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | ExternalRedis]:
    """A Redis for one test."""
    yield from _redis(tmp_path_factory)


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | ExternalRedis]:
    """One Redis for a module's replicas."""
    yield from _redis(tmp_path_factory)


@pytest.fixture(scope="module")
def without_redis_env() -> Iterator[None]:
    """This module's servers and commands ignore $REDIS_URL (its tests are about the data dir's
    key file); use with `pytestmark = pytest.mark.usefixtures("without_redis_env")`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("REDIS_URL", raising=False)
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One live server (with its own data dir and MLflow store) per test module."""
    live = start_server(tmp_path_factory.mktemp("server"))
    yield live
    live.stop()

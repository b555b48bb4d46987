"""A Redis for tests: REDIS_URL when set, else a private `redis-server` on a free loopback port.

The private server keeps an append-only file (fsync always) in its own temp folder, so what it
acknowledged survives a kill and a restart on the same port; tests use that to stop, kill, pause
and restart it mid-traffic.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    for _ in range(200):
        port = random.randrange(20_000, 30_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """A private `redis-server` process that can be stopped, killed and restarted on its port."""

    def __init__(
        self,
        directory: Path,
        binary: str | None = None,
        extra: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise RuntimeError(
                "redis-server not found: install it (make setup does) or set REDIS_URL"
            )
        self.binary = found
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's redis:// URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client with short timeouts (tests must never hang on a dead server)."""
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    def start(self, timeout: float = 10) -> RedisServer:
        """Start the server (again) on the same port and wait until it answers PING."""
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--logfile",
            str(self.directory / "redis.log"),
            *self.extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client() as c:
                    if c.ping():
                        return self
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start: {self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server (what it acknowledged is in its append-only file)."""
        self._stop(signal.SIGKILL)

    def stop(self) -> None:
        """Stop the server gracefully."""
        self._stop(signal.SIGTERM)

    def _stop(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Kill and start again on the same port."""
        self.kill()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log."""
        path = self.directory / "redis.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class LocalCluster:
    """A Redis Cluster of three primaries on loopback (redis-server + `redis-cli --cluster`)."""

    def __init__(self, directory: Path) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found (it comes with redis-server)")
        self.nodes = [
            RedisServer(
                Path(directory) / f"node{k}",
                extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                port=_free_cluster_port(),
            )
            for k in range(3)
        ]
        try:
            self._create(cli)
        except BaseException:
            self.kill()
            raise

    def _create(self, cli: str) -> None:
        """Start the nodes, assign the slots, wait until every node says the cluster is ok."""
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        for node in self.nodes:  # every node must agree before the first command
            with node.client() as c:
                while c.cluster("info")["cluster_state"] != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError("the cluster did not become ready")
                    time.sleep(0.1)

    @property
    def url(self) -> str:
        """A seed node's URL (the client learns the others)."""
        return self.nodes[0].url

    def kill(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.kill()


class ExternalRedis:
    """The Redis at REDIS_URL; each test run uses its own database number's keys, flushed first.

    It cannot be killed or restarted by the tests: fault tests skip on it.
    """

    def __init__(self, url: str) -> None:
        self.url = url

    def client(self) -> redis.Redis:
        """A client with short timeouts."""
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)


def redis_from_env(directory: Path) -> RedisServer | ExternalRedis:
    """REDIS_URL's server when set, else a new private server (started)."""
    url = os.environ.get("REDIS_URL")
    if url:
        return ExternalRedis(url)
    return RedisServer(directory).start()

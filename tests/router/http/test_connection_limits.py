"""Connection hygiene over a real `router serve` with a small fd limit (128): hundreds of
connections that send nothing or half a request line neither exhaust the descriptors nor keep
real clients out; the server closes them within the header timeout and says so in its log."""

from __future__ import annotations

import os
import re
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import T0, LiveServer, free_port, wait_ready

FD_LIMIT = 128
HEADER_TIMEOUT = 2.0
KEEP_ALIVE = 2.0
BODY_TIMEOUT = 3.0
IDLE, HALF = 250, 150  # together well over the fd limit
ROUTE = {"to": "+79031234567", "tenant": "acme", "message_class": "otp", "at": T0}


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _start(data_dir: Path, *args: str) -> LiveServer:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = data_dir / "server.log"
    env = {**os.environ, "ROUTER_HMAC_KEY": "test-key", "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)
    cmd = [sys.executable, "-m", "router.cli", "serve", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), "--seed", "1", "--replay", "--no-mlflow"]
    cmd += ["--log-level", "info", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parents[3],
            preexec_fn=_low_fd_limit,
        )
    url = f"http://127.0.0.1:{port}"
    live = LiveServer(proc, url, data_dir, log_path, httpx.Client(base_url=url, timeout=10))
    try:
        return wait_ready(live, timeout=60)
    except BaseException:
        live.stop()
        raise


@pytest.fixture(scope="module")
def low_fd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = _start(
        tmp_path_factory.mktemp("connlimits"),
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--keep-alive-timeout",
        str(KEEP_ALIVE),
        "--body-timeout",
        str(BODY_TIMEOUT),
    )
    yield live
    live.stop()


def _port(live: LiveServer) -> int:
    return int(live.url.rsplit(":", 1)[1])


def _closed_by_peer(sock: socket.socket) -> bool:
    """The server closed `sock` (EOF or reset), without waiting."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(4096) == b""  # an unread 503 would not be a closure
    except OSError:
        return True


def _open_many(port: int, n: int, first_bytes: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if first_bytes:
            s.sendall(first_bytes)
        socks.append(s)
    return socks


def _real_client_round(live: LiveServer) -> float:
    """A fresh client routes one message; returns how long it took."""
    t0 = time.monotonic()
    with httpx.Client(base_url=live.url, timeout=5) as c:
        resp = c.post("/v1/route", json=ROUTE)
    assert resp.status_code == 200, resp.text
    assert resp.json()["carrier"]
    return time.monotonic() - t0


def test_start_up_line_says_the_limits(low_fd_server: LiveServer) -> None:
    out = low_fd_server.output()
    m = re.search(
        r"Connection limits \(process \d+\): at most (\d+) connections \(fd limit 128", out
    )
    assert m, out
    assert 8 <= int(m.group(1)) < FD_LIMIT  # room left for the application's own files
    assert "request head within 2 s, body within 3 s; keep-alive idle 2 s" in out


def test_idle_and_half_request_floods_neither_block_nor_stay(low_fd_server: LiveServer) -> None:
    port = _port(low_fd_server)
    socks: list[socket.socket] = []
    try:
        socks += _open_many(port, IDLE, b"")
        socks += _open_many(port, HALF, b"GET /v1/carri")
        # Real clients are served at once, with 400 connections held open against 128 fds.
        slowest = max(_real_client_round(low_fd_server) for _ in range(5))
        assert slowest < 3.0
        # Every flood connection is closed by the server: at the cap (oldest first) or at
        # the header deadline; none outlives it by much.
        deadline = time.monotonic() + HEADER_TIMEOUT + 5
        open_ = list(socks)
        while open_ and time.monotonic() < deadline:
            open_ = [s for s in open_ if not _closed_by_peer(s)]
            time.sleep(0.1)
        assert not open_, f"{len(open_)} of {len(socks)} idle connections still open"
        assert _real_client_round(low_fd_server) < 3.0
    finally:
        for s in socks:
            s.close()
    out = low_fd_server.output()
    assert "Connection guard: closed a connection: longest waiting for a request" in out, out
    assert "Connection guard: closed a connection: request head not complete within 2 s" in out
    assert "Too many open files" not in out


def test_stalled_next_request_on_a_keep_alive_connection_is_closed(
    low_fd_server: LiveServer,
) -> None:
    port = _port(low_fd_server)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as idle_after,
        socket.create_connection(("127.0.0.1", port), timeout=5) as stalled,
    ):
        for s in (idle_after, stalled):
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        stalled.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")  # head never finished
        t0 = time.monotonic()
        pending = [idle_after, stalled]
        while pending and time.monotonic() - t0 < max(HEADER_TIMEOUT, KEEP_ALIVE) + 3:
            pending = [s for s in pending if not _closed_by_peer(s)]
            time.sleep(0.05)
        assert not pending
        assert time.monotonic() - t0 >= min(HEADER_TIMEOUT, KEEP_ALIVE) - 0.5


def test_slow_but_complete_requests_are_served(low_fd_server: LiveServer) -> None:
    """A head trickled in under the deadline is answered normally."""
    with socket.create_connection(("127.0.0.1", _port(low_fd_server)), timeout=5) as s:
        for chunk in (b"GET /healthz HTTP/1.1\r\n", b"host: x\r\n", b"connection: close\r\n\r\n"):
            s.sendall(chunk)
            time.sleep(HEADER_TIMEOUT / 4)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")


def test_a_stalled_body_is_closed_and_others_are_served(low_fd_server: LiveServer) -> None:
    port = _port(low_fd_server)
    head = b"POST /v1/route HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as stalled:
        stalled.sendall(head + b'content-length: 200\r\n\r\n{"to": ')
        t0 = time.monotonic()
        assert _real_client_round(low_fd_server) < 3.0
        while not _closed_by_peer(stalled) and time.monotonic() - t0 < BODY_TIMEOUT + 3:
            time.sleep(0.05)
        waited = time.monotonic() - t0
        assert BODY_TIMEOUT - 0.5 <= waited < BODY_TIMEOUT + 3
    out = low_fd_server.output()
    assert "Connection guard: closed a connection: request body not complete within 3 s" in out

"""Request size limits over a real `router serve`: bodies over the limit get 413 and the JSON
error, whether their length is declared or streamed, without the server reading them whole."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import orjson

from tests.conftest import T0, LiveServer

RU = "+79031234567"
LIMIT = 1 << 20  # the default of `router serve --max-body-bytes`


def _padded_batch(size: int) -> bytes:
    """A JSON batch of routes of about `size` bytes (valid apart from its size)."""
    one = orjson.dumps({"to": RU, "at": T0})
    n = size // (len(one) + 1) + 1
    return b"[" + b",".join([one] * n) + b"]"


def _assert_413(status: int, body: bytes) -> None:
    assert status == 413, body[:200]
    err = orjson.loads(body)["error"]
    assert err["code"] == "payload_too_large" and str(LIMIT) in err["message"]


def test_declared_length_over_the_limit_is_refused(server: LiveServer) -> None:
    body = _padded_batch(LIMIT + 10)
    resp = server.client.post(
        "/v1/route/batch", content=body, headers={"content-type": "application/json"}
    )
    _assert_413(resp.status_code, resp.content)


def test_streamed_body_over_the_limit_is_refused(server: LiveServer) -> None:
    body = _padded_batch(LIMIT + 10)

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    resp = server.client.post(
        "/v1/outcomes", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in resp.request.headers
    _assert_413(resp.status_code, resp.content)


def test_the_refusal_comes_before_the_body(server: LiveServer) -> None:
    """A client declares a gigabyte and sends a few bytes: the answer comes at once."""
    url = urlparse(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n[{"
        )
        t0 = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        assert time.monotonic() - t0 < 5
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    _assert_413(413, body)


def test_bodies_under_the_limit_pass_and_the_server_stays_up(server: LiveServer) -> None:
    batch = [{"to": RU, "at": T0}] * 1000  # the largest batch, ~40 KB
    resp = server.client.post("/v1/route/batch", json=batch)
    assert resp.status_code == 200 and len(resp.json()) == 1000
    over = server.client.post("/v1/route/batch", json=[*batch, {"to": RU, "at": T0}])
    assert over.status_code == 422 and "1000" in over.json()["error"]["message"]
    assert server.client.get("/healthz").status_code == 200

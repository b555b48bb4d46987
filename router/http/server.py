"""The HTTP server of `router serve`: uvicorn, with connection hygiene uvicorn lacks.

What uvicorn (0.55, httptools or h11 protocol) does on its own, read in its source and tried:

* `timeout_keep_alive` is armed only once a response is complete: a connection that sends
  nothing, or part of a request line or of the headers, is never closed (it has no header-read
  timeout at all), and neither is a keep-alive connection that starts a next request and stalls.
* `limit_concurrency` counts open connections (and running tasks) but is checked only when a
  request's headers are complete: idle connections are still accepted, hold a file descriptor
  each, and make the real clients' requests answer 503. It does not protect the fd table.
* At the fd limit, uvloop (the default loop) resets new connections and logs nothing; asyncio's
  loop logs a traceback per failed accept and new clients hang.

So each worker process guards its connections (`ConnectionLimits`):

* Headers deadline: a connection must deliver a complete request head within `header_timeout`
  seconds of being accepted, and, between requests, within `header_timeout` of the first byte of
  the next one (a keep-alive connection idle before that byte is uvicorn's: `keep_alive_timeout`).
* Body deadline: once its head is in, a request's body must arrive within `body_timeout` seconds
  (uvicorn has no body read timeout either: a stalled body would hold a busy connection for ever).
* Connection cap: at most `max_connections` open connections per worker (default: what the
  fd limit leaves, at most 4096). A connection accepted at the cap closes the connection that has
  waited longest for a request (idle or still sending its head; never one whose request is being
  handled), as nginx reuses its idle connections when `worker_connections` are short; when every
  connection is busy the new one is answered 503 and closed.
* Closures are logged as warnings: the first of each reason at once, then counts every 10 s
  while they go on.
  Each worker logs the limits in effect when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("uvicorn.error")

#: File descriptors left for the application (log files, SQLite, Redis, …) under the fd limit.
FD_HEADROOM = 32
#: The default connection cap when the fd limit allows more.
MAX_CONNECTIONS_DEFAULT_CEILING = 4096
#: How often a run of closures is summed up in the log.
LOG_WINDOW_SECONDS = 10.0

_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
    b"content-length: 32\r\n\r\n"
    b"Too many connections, try later\n"
)


@dataclass(frozen=True)
class ConnectionLimits:
    """Per worker process: header deadline, keep-alive idle timeout, connection cap."""

    header_timeout: float = 5.0
    keep_alive_timeout: float = 5.0
    body_timeout: float = 30.0
    max_connections: int | None = None  # None: from the fd limit

    def __post_init__(self) -> None:
        if min(self.header_timeout, self.keep_alive_timeout, self.body_timeout) <= 0:
            raise ValueError("connection timeouts must be positive")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own descriptor
    except OSError:
        return None


def resolve_max_connections(requested: int | None) -> tuple[int, str]:
    """The cap in effect and a note on the fd limit, for the start-up line."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = _open_fds()
    if soft == resource.RLIM_INFINITY or used is None:
        room = None
        note = f"fd limit {'unlimited' if soft == resource.RLIM_INFINITY else soft}"
    else:
        room = max(1, soft - used - FD_HEADROOM)
        note = f"fd limit {soft}, {used} in use"
    if requested is None:
        return min(room or MAX_CONNECTIONS_DEFAULT_CEILING, MAX_CONNECTIONS_DEFAULT_CEILING), note
    if room is not None and requested > room:
        note += f"; WARNING: the fd limit leaves room for about {room} connections"
    return requested, note


class _Tally:
    """Closures by reason: the first of each reason logged at once, the next ones summed up every
    LOG_WINDOW_SECONDS while they go on."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.flushing = False

    def add(self, reason: str, loop: asyncio.AbstractEventLoop) -> None:
        if reason not in self.counts:
            self.counts[reason] = 0
            logger.warning("Connection guard: closed a connection: %s", reason)
        else:
            self.counts[reason] += 1
        if not self.flushing:
            self.flushing = True
            loop.call_later(LOG_WINDOW_SECONDS, self.flush, loop)

    def flush(self, loop: asyncio.AbstractEventLoop) -> None:
        more = {reason: n for reason, n in self.counts.items() if n}
        if more:
            logger.warning(
                "Connection guard: closed %d more connections in the last %.0f s: %s",
                sum(more.values()),
                LOG_WINDOW_SECONDS,
                "; ".join(f"{n} {reason}" for reason, n in sorted(more.items())),
            )
            self.counts = dict.fromkeys(self.counts, 0)
            loop.call_later(LOG_WINDOW_SECONDS, self.flush, loop)
        else:
            self.counts.clear()
            self.flushing = False


class _Guard:
    """One worker's open connections: the cap, and those waiting for a request (oldest first)."""

    def __init__(self, limits: ConnectionLimits, max_connections: int) -> None:
        self.limits = limits
        self.max_connections = max_connections
        self.open: set[Any] = set()
        self.waiting: dict[Any, None] = {}  # insertion order: longest waiting first
        self.tally = _Tally()

    def admit(self, conn: Any, loop: asyncio.AbstractEventLoop) -> bool:
        if len(self.open) >= self.max_connections:
            if not self.waiting:
                self.tally.add(f"refused (503): all {self.max_connections} connections busy", loop)
                return False
            oldest = next(iter(self.waiting))
            self.tally.add(
                f"longest waiting for a request, closed at the cap of {self.max_connections}",
                loop,
            )
            oldest.guard_close()
        self.open.add(conn)
        return True

    def set_waiting(self, conn: Any, waiting: bool) -> None:
        self.waiting.pop(conn, None)
        if waiting and conn in self.open:
            self.waiting[conn] = None

    def forget(self, conn: Any) -> None:
        self.open.discard(conn)
        self.waiting.pop(conn, None)


_SUPPORTED = (HttpToolsProtocol, H11Protocol)


def guarded_protocol(base: type[asyncio.Protocol], guard: _Guard) -> type[asyncio.Protocol]:
    """`base` (uvicorn's httptools or h11 protocol) with the header deadline and the cap."""
    if not issubclass(base, _SUPPORTED):
        raise ValueError(f"connection guard: unsupported HTTP protocol {base.__name__}")
    header_timeout = guard.limits.header_timeout
    body_timeout = guard.limits.body_timeout

    class GuardedProtocol(base):  # type: ignore[valid-type,misc]
        _refused = False
        _header_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if not guard.admit(self, self.loop):
                self._refused = True
                self.transport = transport
                transport.write(_REFUSAL)  # type: ignore[attr-defined]
                transport.close()
                return
            super().connection_made(transport)
            guard.set_waiting(self, True)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            guard.forget(self)
            if not self._refused:
                super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._header_timer is None and not self._busy():
                self._arm()  # first byte of a next request: its head has header_timeout
            super().data_received(data)
            self._settle()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._settle(response_done=True)

        def _busy(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _settle(self, response_done: bool = False) -> None:
            if self.transport.is_closing():
                self._disarm()
                guard.forget(self)
            elif self._busy():
                self._disarm_header()
                guard.set_waiting(self, False)
                if not self.cycle.more_body:
                    self._disarm_body()
                elif self._body_timer is None:  # the head just came: the body has body_timeout
                    self._body_timer = self.loop.call_later(body_timeout, self._body_timed_out)
            else:
                self._disarm_body()
                if response_done:
                    guard.set_waiting(self, True)  # idle: uvicorn's keep-alive timeout applies

        def _arm(self) -> None:
            self._disarm_header()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _disarm_header(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _disarm_body(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _disarm(self) -> None:
            self._disarm_header()
            self._disarm_body()

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self._busy():
                return
            guard.tally.add(f"request head not complete within {header_timeout:g} s", self.loop)
            self.guard_close()

        def _body_timed_out(self) -> None:
            self._body_timer = None
            if self.transport.is_closing() or not self._busy() or not self.cycle.more_body:
                return
            guard.tally.add(f"request body not complete within {body_timeout:g} s", self.loop)
            self.guard_close()

        def guard_close(self) -> None:
            self._disarm()
            guard.forget(self)
            self.transport.abort()  # nothing to flush; frees the descriptor soonest

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config whose HTTP protocol is guarded (picklable: workers load it themselves)."""

    def __init__(self, app: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, timeout_keep_alive=limits.keep_alive_timeout, **kwargs)  # type: ignore[arg-type]
        self.connection_limits = limits

    def load(self) -> None:
        super().load()
        limits = self.connection_limits
        cap, note = resolve_max_connections(limits.max_connections)
        self.http_protocol_class = guarded_protocol(self.http_protocol_class, _Guard(limits, cap))
        logger.info(
            "Connection limits (process %d): at most %d connections (%s); request head within "
            "%g s, body within %g s; keep-alive idle %g s; at the cap the longest-waiting idle "
            "connection is closed",
            os.getpid(),
            cap,
            note,
            limits.header_timeout,
            limits.body_timeout,
            limits.keep_alive_timeout,
        )


def serve(
    app: Any,
    *,
    limits: ConnectionLimits,
    host: str,
    port: int,
    log_level: str,
    workers: int = 1,
    factory: bool = False,
) -> int:
    """Run uvicorn with `limits` (as `uvicorn.run`, with a GuardedConfig); returns an exit code."""
    from uvicorn.supervisors import Multiprocess

    config = GuardedConfig(
        app,
        limits=limits,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        workers=workers,
        factory=factory,
    )
    server = uvicorn.Server(config)
    if config.workers > 1:
        sock = config.bind_socket()
        try:
            Multiprocess(config, sockets=[sock]).run()
        finally:
            sock.close()
        return 0
    server.run()
    return 0 if server.started else 3  # uvicorn's STARTUP_FAILURE

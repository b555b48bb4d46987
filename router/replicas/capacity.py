"""Carrier throughput caps shared by every replica on one Redis (issue 13.5).

A carrier's `throughput_mps` is one budget for the whole cluster: a token bucket per carrier in
Redis, on Redis's clock (rate = the cap, one second of burst, like the embedded event-time
bucket). Decisions never wait on Redis: each replica leases small blocks of tokens (a tenth of a
second of the cap, at least what the largest message waiting needs) in a background thread and
spends them locally; a carrier whose leased tokens do not cover a message is ineligible with the
reason "at capacity". One Lua call per tick (every 10 ms while a carrier needs tokens, else a
heartbeat every 0.5 s) leases for all carriers and counts the live replicas (those heard from in
the last 3 s).

While Redis is away each replica falls back to its own wall-clock bucket per carrier at cap / N,
N the number of live replicas it last knew (kept in `<data-dir>/replicas/live-replicas`, so a
replica that starts while Redis is away knows it too): the cluster's total stays within the cap
as long as no replica joins during the outage. What a replica still holds of its leases is
dropped when Redis goes away (the fallback starts from its own bucket).

Bound: over any window of W seconds the cluster sends at most cap · (W + 1) (the bucket) plus
what the replicas held leased at the window's start (≤ N blocks of 0.1 s of the cap).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis

from carriers.catalog import Carrier

log = logging.getLogger(__name__)

# KEYS[1]: the live-replica set; KEYS[2..]: carrier buckets (all under one hash tag).
# ARGV: instance, live window (s), then rate, burst, want per carrier. Returns {live replicas,
# granted tokens per carrier (strings)}; a replica's lease never takes more than the bucket has.
_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 2000))
local out = {redis.call('ZCARD', KEYS[1])}
for i = 2, #KEYS do
  local j = 3 + (i - 2) * 3
  local rate, burst, want = tonumber(ARGV[j]), tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'at')
  local tokens = tonumber(v[1]) or burst
  local at = tonumber(v[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  local got = math.max(0, math.min(want, tokens))
  redis.call('HSET', KEYS[i], 'tokens', tostring(tokens - got), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
  out[#out + 1] = tostring(got)
end
return out
"""


class SharedCaps:
    """This replica's side of the cluster's carrier caps: leased tokens, the lease thread, and
    the cap / N fallback while Redis is away."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        instance: str,
        data_dir: Path,
        lease_seconds: float = 0.1,
        tick_seconds: float = 0.01,
        heartbeat_seconds: float = 0.5,
        live_seconds: float = 3.0,
        retry_seconds: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.prefix = f"{prefix}:{{caps}}"
        self.instance = instance
        self.lease_seconds = lease_seconds
        self.tick_seconds = tick_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.live_seconds = live_seconds
        self.retry_seconds = retry_seconds
        self.stale_seconds = 2 * heartbeat_seconds
        self.short_stale_seconds = max(0.05, 5 * tick_seconds)  # a Lua call takes < 1 ms
        self._clock = clock
        self._replicas_file = Path(data_dir) / "replicas" / "live-replicas"
        self.replicas = self._read_replicas()  # live replicas last known (cap / N while down)
        self.up = False
        self.balance: dict[str, float] = {}  # carrier -> leased tokens not yet spent
        self._short: dict[str, float] = {}  # carrier -> a message's parts the balance lacked
        self._local: dict[str, tuple[float, float]] = {}  # fallback: carrier -> (tokens, time)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._carriers: Callable[[], Iterable[Carrier]] = lambda: ()
        self._last_call = 0.0
        self._calling_since: float | None = None  # a lease call waiting on Redis since
        self._warned = False  # the fallback was announced (once per outage)
        self._script = client.register_script(_LEASE)

    # ---- the decision path (no Redis) ------------------------------------------------------

    def _shared(self) -> bool:
        """Redis answers, and answered lately: a Redis that hangs (paused, overloaded) is
        treated as away once the lease is `stale_seconds` old, so decisions never wait on it."""
        return self.up and self._clock() - self._last_call <= self.stale_seconds

    def can_send(self, carrier: Carrier, segments: int) -> bool:
        """Whether `segments` parts may go to this capped carrier now."""
        cap = carrier.throughput_mps or 0.0
        if not self._shared():
            return self._local_level(carrier.id, cap, self._clock()) >= segments
        if self.balance.get(carrier.id, 0.0) >= segments:
            return True
        self._short[carrier.id] = max(self._short.get(carrier.id, 0.0), float(segments))
        since = self._calling_since
        if since is not None and self._clock() - since > self.short_stale_seconds:
            # Short, and the lease call has waited on Redis for a while (Redis hangs): the
            # safe local share, instead of refusing every message until it answers.
            return self._local_level(carrier.id, cap, self._clock()) >= segments
        return False

    def take(self, carrier: Carrier, segments: int) -> None:
        """Spend `segments` parts of the carrier's budget (after `can_send`)."""
        with self._lock:
            if self._shared() and self.balance.get(carrier.id, 0.0) >= segments:
                self.balance[carrier.id] = self.balance.get(carrier.id, 0.0) - segments
            else:
                now = self._clock()
                level = self._local_level(carrier.id, carrier.throughput_mps or 0.0, now)
                self._local[carrier.id] = (level - segments, now)

    def _local_level(self, carrier_id: str, cap: float, now: float) -> float:
        rate = cap / max(1, self.replicas)
        tokens, at = self._local.get(carrier_id, (rate, now))
        return min(rate, tokens + max(0.0, now - at) * rate)

    # ---- the lease thread ------------------------------------------------------------------

    def start(self, carriers: Callable[[], Iterable[Carrier]]) -> None:
        """Lease the first blocks (so the first decisions need not wait), start the thread."""
        self._carriers = carriers
        self.lease(force=True)
        self._thread = threading.Thread(target=self._loop, name="shared-caps", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the lease thread (tokens still held lapse with the bucket)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_seconds if self.up else self.retry_seconds):
            try:
                self.lease()
            except Exception:
                log.exception("leasing carrier capacity failed; retrying")

    def lease(self, force: bool = False) -> bool:
        """Top up the leased blocks from Redis (one call); False while Redis is away."""
        capped = [c for c in self._carriers() if c.throughput_mps]
        wants = []
        for c in capped:
            cap = float(c.throughput_mps)  # type: ignore[arg-type]
            block = max(1.0, cap * self.lease_seconds, self._short.get(c.id, 0.0))
            need = min(cap, block) - self.balance.get(c.id, 0.0) if self.up else min(cap, block)
            if need > 1e-9:
                wants.append((c, cap, need))
        now = self._clock()
        if not wants and not force and now - self._last_call < self.heartbeat_seconds:
            return True
        keys = [f"{self.prefix}:replicas"] + [f"{self.prefix}:c:{c.id}" for c, _, _ in wants]
        args: list[Any] = [self.instance, self.live_seconds]
        for _, cap, need in wants:
            args += [cap, cap, need]
        self._calling_since = now
        try:
            answer = self._script(keys=keys, args=args)
        except redis.RedisError as exc:
            self._down(exc)
            return False
        finally:
            self._calling_since = None
        self._last_call = now
        with self._lock:
            if not self.up:
                self.balance.clear()
                self._local.clear()
                if self._warned:
                    log.warning("Redis answers again: carrier caps shared by the cluster again")
                self.up, self._warned = True, False
            for (c, _, _), got in zip(wants, answer[1:], strict=True):
                self.balance[c.id] = self.balance.get(c.id, 0.0) + float(got)
                self._short.pop(c.id, None)
        self._set_replicas(int(answer[0]))
        return True

    def _down(self, exc: Exception) -> None:
        with self._lock:
            if not self._warned:
                self._warned = True
                log.warning(
                    "Redis unavailable for carrier caps (%s): each cap is cap / %d here "
                    "(the live replicas last known) until it answers",
                    type(exc).__name__,
                    max(1, self.replicas),
                )
            self.up = False
            self.balance.clear()

    def _read_replicas(self) -> int:
        try:
            return max(1, int(self._replicas_file.read_text().strip()))
        except (OSError, ValueError):
            return 1

    def _set_replicas(self, n: int) -> None:
        n = max(1, n)
        if n != self.replicas or not self._replicas_file.exists():
            self.replicas = n
            try:
                self._replicas_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._replicas_file.with_suffix(f".{self.instance}.tmp")
                tmp.write_text(f"{n}\n")
                tmp.replace(self._replicas_file)
            except OSError:
                log.warning("could not keep the live-replica count in %s", self._replicas_file)

    def health(self) -> dict[str, Any]:
        """Shared budgets, or this replica's cap / N fallback."""
        return {
            "mode": "shared" if self.up else "local",
            "live_replicas": self.replicas,
        }

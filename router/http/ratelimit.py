"""Rate limits per tenant and per key: token buckets in wall time (a rate is about the clock on
the wall, not the events' own time), taken atomically over all the buckets a request counts
against, so a refused request spends nothing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from router.http.keys import Limit

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Denied:
    """Which bucket refused, and in how many seconds it will hold enough tokens."""

    bucket: str
    limit: Limit
    retry_after: float


class Buckets(Protocol):
    """Where tokens are kept: in this process, or in Redis for every replica."""

    def take(self, buckets: Sequence[tuple[str, Limit]], cost: float) -> Denied | None:
        """Take `cost` tokens from every bucket, or from none and say which one refused."""
        ...


class TokenBuckets:
    """In-process token buckets (one per worker process), keyed by name, e.g. `tenant:acme`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}  # name -> (tokens, time)
        self._lock = threading.Lock()

    def take(self, buckets: Sequence[tuple[str, Limit]], cost: float) -> Denied | None:
        """Take `cost` tokens from every bucket, or from none and say which one refused."""
        with self._lock:
            now = self._clock()
            levels = []
            for name, limit in buckets:
                tokens, at = self._state.get(name, (limit.burst, now))
                tokens = min(limit.burst, tokens + (now - at) * limit.rate)
                if tokens < cost:
                    return Denied(name, limit, (cost - tokens) / limit.rate)
                levels.append((name, tokens))
            for name, tokens in levels:
                self._state[name] = (tokens - cost, now)
            return None


# Token buckets over several keys at once, on the Redis server's clock (replicas' clocks may
# differ); a refusal changes nothing. Returns {0, "0"} or {index of the refusing bucket, wait}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local cost = tonumber(ARGV[1])
local levels = {}
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local v = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(v[1]) or burst
  local at = tonumber(v[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  if tokens < cost then
    return {i, tostring((cost - tokens) / rate)}
  end
  levels[i] = tokens
end
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  redis.call('HSET', key, 'tokens', tostring(levels[i] - cost), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
end
return {0, '0'}
"""


class RedisBuckets:
    """Token buckets in Redis, shared by every worker and replica (one Lua call per request;
    all keys under one hash tag, so the script is legal on a Redis Cluster). While Redis is
    unreachable or slow (over 500 ms), each process uses its own in-process buckets for
    `retry_seconds` before trying Redis again: limits loosen, requests are never refused or
    stalled for long because of Redis."""

    def __init__(self, url: str, prefix: str = "router", retry_seconds: float = 5.0) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.prefix = f"{prefix}:{{ratelimit}}"
        self._script = self.redis.register_script(_TAKE)
        self.local = TokenBuckets()
        self.retry_seconds = retry_seconds
        self._local_until = 0.0

    def take(self, buckets: Sequence[tuple[str, Limit]], cost: float) -> Denied | None:
        """Take `cost` tokens from every bucket in Redis, or from none."""
        keys = [f"{self.prefix}:{name}" for name, _ in buckets]
        args: list[float] = [cost]
        for _, limit in buckets:
            args += [limit.rate, limit.burst]
        if time.monotonic() < self._local_until:
            return self.local.take(buckets, cost)
        try:
            index, wait = self._script(keys=keys, args=args)
        except Exception as exc:  # any Redis failure: this process's buckets for a while
            self._local_until = time.monotonic() + self.retry_seconds
            log.warning(
                "rate limits in-process for %g s: Redis unreachable (%s)",
                self.retry_seconds,
                type(exc).__name__,
            )
            return self.local.take(buckets, cost)
        if int(index) == 0:
            return None
        name, limit = buckets[int(index) - 1]
        return Denied(name, limit, float(wait))

"""Rate limits per tenant and per key: token buckets in wall time (a rate is about the clock on
the wall, not the events' own time), taken atomically over all the buckets a request counts
against, so a refused request spends nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.keys import Limit


@dataclass(frozen=True, slots=True)
class Denied:
    """Which bucket refused, and in how many seconds it will hold enough tokens."""

    bucket: str
    limit: Limit
    retry_after: float


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

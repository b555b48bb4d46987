"""Wall-clock pacing for a carrier connection: a blocking token bucket and jittered back-off."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable


class TokenBucket:
    """At most `rate` tokens a second with a burst of `burst`, shared by many threads.

    Each `acquire` reserves the next free slot (GCRA, the virtual-scheduling form of a token
    bucket) and sleeps until it, so waiting threads are served in order without polling.
    """

    def __init__(
        self,
        rate: float,
        burst: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1.0) * self._interval
        self._clock = clock
        self._sleep = sleep
        self._next = clock()
        self._lock = threading.Lock()

    def acquire(self, tokens: float = 1.0, timeout: float | None = None) -> bool:
        """Take `tokens`, sleeping until they are due; False (nothing taken) if that is later
        than `timeout` seconds from now."""
        with self._lock:
            now = self._clock()
            start = max(self._next, now)
            wait = start - self._tolerance - now
            if timeout is not None and wait > timeout:
                return False
            self._next = start + tokens * self._interval
        if wait > 0:
            self._sleep(wait)
        return True


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Exponential back-off with jitter: uniform in [d/2, d], d = min(high, low * 2**attempt)."""
    delay = min(high, low * (2.0**attempt))
    return random.uniform(delay / 2.0, delay)

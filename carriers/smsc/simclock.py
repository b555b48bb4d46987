"""Event time that runs from a chosen start at a chosen speed, so a demo can run 60x faster."""

from __future__ import annotations

import time


class SimClock:
    """Event-time clock: `start` (epoch seconds, default now) advancing `speed` event seconds per
    wall second. Thread-safe: it only reads the monotonic clock."""

    def __init__(self, start: float | None = None, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.start = time.time() if start is None else float(start)
        self.speed = float(speed)
        self._wall0 = time.monotonic()

    def now(self) -> float:
        """The current event time, epoch seconds."""
        return self.start + (time.monotonic() - self._wall0) * self.speed

    def wall_delay(self, at: float) -> float:
        """Wall seconds until event time `at` (0 when it has passed)."""
        return max(0.0, (at - self.now()) / self.speed)

    def __repr__(self) -> str:
        return f"SimClock(start={self.start:.3f}, speed={self.speed:g})"

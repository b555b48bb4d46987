"""Reports outcome events to the router in batches, retrying while the router is unreachable.

Nothing handed to `report` is dropped silently: a batch the router cannot be reached for is
retried with back-off; a batch it rejects (all-or-nothing) is split so that only the events it
refuses (for example a decision it has forgotten) are dropped, and those are counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from router.client import RouterClient
from router.engine import OutcomeEvent
from router.errors import RoutingError

log = logging.getLogger(__name__)


@dataclass
class ReporterStats:
    """Counts of what was reported."""

    reported: int = 0
    duplicates: int = 0
    rejected: int = 0
    http_retries: int = 0


class OutcomeReporter:
    """A background thread that posts queued outcome events to `POST /v1/outcomes`."""

    def __init__(
        self,
        router: RouterClient,
        batch_size: int = 200,
        interval_s: float = 0.05,
        backoff_s: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        self.router = router
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.backoff_s = backoff_s
        self.stats = ReporterStats()
        self._buffer: list[tuple[OutcomeEvent, Callable[[], None] | None]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="outcome-reporter", daemon=True)

    def start(self) -> None:
        """Start posting."""
        self._thread.start()

    def report(
        self, events: Sequence[OutcomeEvent], done: Callable[[], None] | None = None
    ) -> None:
        """Queue events; `done` is called once all of them reached the router."""
        with self._cond:
            for i, ev in enumerate(events):
                self._buffer.append((ev, done if i == len(events) - 1 else None))
            if not events and done is not None:
                done()
            self._cond.notify()

    def backlog(self) -> int:
        """Events queued and not yet posted."""
        with self._cond:
            return len(self._buffer) + (1 if self._busy else 0)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far was posted; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.backlog():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Post what is queued (bounded by `timeout`), then stop."""
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._buffer:
                    if self._stopping:
                        return
                    self._cond.wait(timeout=self.interval_s)
                    continue
                batch = self._buffer[: self.batch_size]
                del self._buffer[: self.batch_size]
                self._busy = True
            try:
                self._post(batch)
            finally:
                with self._cond:
                    self._busy = False

    def _post(self, batch: list[tuple[OutcomeEvent, Callable[[], None] | None]]) -> None:
        delay = self.backoff_s[0]
        while True:
            try:
                results = self.router.record_outcomes([ev for ev, _ in batch])
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                self.stats.http_retries += 1
                log.warning(
                    "router unreachable (%s); retrying in %.1f s", type(exc).__name__, delay
                )
                time.sleep(delay)
                delay = min(self.backoff_s[1], delay * 2)
                continue
            except RoutingError as exc:
                if len(batch) == 1:
                    self.stats.rejected += 1
                    log.warning("router refused an outcome: %s", exc)
                    results = []
                else:
                    mid = len(batch) // 2
                    self._post(batch[:mid])
                    self._post(batch[mid:])
                    return
            self.stats.reported += sum(r != "duplicate" for r in results)
            self.stats.duplicates += sum(r == "duplicate" for r in results)
            for _, done in batch:
                if done is not None:
                    done()
            return

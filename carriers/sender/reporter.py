"""Reports outcome events to the router in batches, retrying while the router is unreachable.

Nothing handed to `report` is dropped silently. `report` records the events in the outcome
journal (`carriers/sender/journal.py`: an fsync'd file, or Redis) before it returns, so a receipt
acknowledged to the SMSC after `report` is durably recorded; an event leaves the journal once
the router answered for it, and what a dead worker recorded is taken over and posted again (the
router answers "duplicate" for a repeat). A batch the router cannot be reached for (transport
error, 429, 5xx) is retried with back-off; a batch it rejects (all-or-nothing) is split so that
only the events it refuses (for example a decision it has forgotten) are set aside, with the
reason, in the dead-letter store (`carriers/sender/deadletters.py`; `router deadletters
list|replay`),
and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from carriers.sender.deadletters import DeadLetter, DeadLetterStore, MemoryDeadLetters
from carriers.sender.journal import MemoryJournal, OutcomeJournal, worker_name
from router.contract.client import RouterClient
from router.contract.errors import RoutingError
from router.contract.messages import OutcomeEvent

log = logging.getLogger(__name__)


@dataclass
class ReporterStats:
    """Counts of what was reported."""

    reported: int = 0
    duplicates: int = 0
    rejected: int = 0  # refused by the router (each one went to the dead letters)
    http_retries: int = 0
    dead_letters: int = 0  # refused events stored as dead letters by this reporter
    recovered: int = 0  # events a dead worker recorded, taken over from the journal


class OutcomeReporter:
    """A background thread that posts queued outcome events to `POST /v1/outcomes`."""

    def __init__(
        self,
        router: RouterClient,
        batch_size: int = 200,
        interval_s: float = 0.05,
        backoff_s: tuple[float, float] = (0.2, 5.0),
        *,
        linger_s: float = 0.01,
        journal: OutcomeJournal | None = None,
        dead_letters: DeadLetterStore | None = None,
        worker: str | None = None,
        recover_every_s: float = 5.0,
    ) -> None:
        self.router = router
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.linger_s = linger_s  # a batch waits this long for more events (fewer requests)
        self.backoff_s = backoff_s
        self.journal: OutcomeJournal = journal or MemoryJournal()
        self.dead_letters: DeadLetterStore = dead_letters or MemoryDeadLetters()
        self.worker = worker or worker_name()
        self.recover_every_s = recover_every_s
        self.stats = ReporterStats()
        self._buffer: list[tuple[str, OutcomeEvent, Callable[[], None] | None]] = []
        self._since = 0.0  # when the oldest buffered event arrived (monotonic)
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="outcome-reporter", daemon=True)

    def start(self) -> None:
        """Take over what dead workers left in the journal, then start posting."""
        self._recover()
        self._thread.start()

    def report(
        self, events: Sequence[OutcomeEvent], done: Callable[[], None] | None = None
    ) -> None:
        """Record events durably in the journal, then queue them; `done` is called once all
        of them reached the router (recorded there, or refused and kept as dead letters)."""
        delay = self.backoff_s[0]
        while True:
            try:
                ids = self.journal.append(events)  # durable when this returns
                break
            except OSError as exc:  # a full or failing disk: the caller is not acknowledged
                log.warning("outcome journal write failed (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(self.backoff_s[1], delay * 2)
        with self._cond:
            wake = not self._buffer or len(self._buffer) + len(ids) >= self.batch_size
            if not self._buffer:
                self._since = time.monotonic()
            for i, (entry, ev) in enumerate(zip(ids, events, strict=True)):
                self._buffer.append((entry, ev, done if i == len(events) - 1 else None))
            if not events and done is not None:
                done()
            if wake:
                self._cond.notify()

    def _recover(self) -> None:
        """Queue the events the journal took over from dead workers."""
        try:
            entries = self.journal.recover()
        except Exception:  # the journal is unreachable: try again at the next round
            log.exception("taking over dead workers' outcomes failed")
            return
        if entries:
            log.warning("posting %d outcome(s) recorded by a dead worker", len(entries))
            with self._cond:
                if not self._buffer:
                    self._since = time.monotonic()
                self._buffer.extend((entry, ev, None) for entry, ev in entries)
                self.stats.recovered += len(entries)
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
        self.journal.close()

    def _run(self) -> None:
        last_recover = time.monotonic()
        while True:
            if time.monotonic() - last_recover > self.recover_every_s:
                self._recover()
                last_recover = time.monotonic()
            with self._cond:
                if not self._buffer:
                    if self._stopping:
                        return
                    self._cond.wait(timeout=self.interval_s)
                    continue
                linger = self.linger_s - (time.monotonic() - self._since)
                if len(self._buffer) < self.batch_size and linger > 0 and not self._stopping:
                    self._cond.wait(timeout=linger)  # a fuller batch: one request for many
                    continue
                batch = self._buffer[: self.batch_size]
                del self._buffer[: self.batch_size]
                self._since = time.monotonic()
                self._busy = True
            try:
                self._post(batch)
            except Exception:  # e.g. the journal closed under a stop that timed out
                log.exception("posting %d outcome(s) failed; they stay in the journal", len(batch))
                with self._cond:
                    if not self._stopping:  # try them again later
                        self._buffer[:0] = batch
                if not self._stopping:
                    time.sleep(self.backoff_s[1])
            finally:
                with self._cond:
                    self._busy = False

    def _post(self, batch: list[tuple[str, OutcomeEvent, Callable[[], None] | None]]) -> None:
        delay = self.backoff_s[0]
        while True:
            try:
                results = self.router.record_outcomes([ev for _, ev, _ in batch])
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
                    self._dead_letter(batch[0][0], batch[0][1], exc)
                    results = []
                else:
                    mid = len(batch) // 2
                    self._post(batch[:mid])
                    self._post(batch[mid:])
                    return
            except Exception as exc:  # an answer that is not the API's (a proxy's page, say)
                self.stats.http_retries += 1
                log.warning("router answer unreadable (%r); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(self.backoff_s[1], delay * 2)
                continue
            self.stats.reported += sum(r != "duplicate" for r in results)
            self.stats.duplicates += sum(r == "duplicate" for r in results)
            try:
                self.journal.posted([entry for entry, _, _ in batch])
            except Exception:  # they stay recorded: posted again later, a harmless repeat
                log.exception("marking outcomes posted in the journal failed")
            for _, _, done in batch:
                if done is not None:
                    done()
            return

    def _dead_letter(self, entry: str, event: OutcomeEvent, exc: RoutingError) -> None:
        """Keep a refused event, with the reason, in the dead-letter store (until it takes it)."""
        letter = DeadLetter.of(entry, event, exc, self.worker)
        delay = self.backoff_s[0]
        while True:
            try:
                self.dead_letters.put(letter)
                break
            except Exception as store_exc:
                log.warning("dead-letter store unavailable (%r); retrying", store_exc)
                time.sleep(delay)
                delay = min(self.backoff_s[1], delay * 2)
        self.stats.rejected += 1
        self.stats.dead_letters += 1
        log.warning(
            "router refused a %s outcome (%s%s: %s); kept as dead letter %s",
            event.event,
            letter.code,
            f" {letter.field}" if letter.field else "",
            letter.message,
            entry,
        )

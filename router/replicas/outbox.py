"""What a replica must still publish to Redis, in order, journaled on local disk first.

Every item is appended to a journal file (JSON lines) before it is queued; outcome items are
fsynced before the caller acknowledges them. Each live process holds an exclusive `flock` on its
journals, so a process starting on the same folder claims only the journals of dead processes
(killed, crashed) and publishes them again: publishing is idempotent in Redis, so a journal that
was partly published before a crash is harmless to replay. A journal is rotated about once a
second while Redis is up and deleted once all its items are published.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import orjson

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Item:
    """One thing to publish: kind `d` (decision) or `o` (outcome), origin instance, decision
    id, payload (for an outcome: signature, a NUL byte, body). An outcome accepted while Redis
    was away also carries `row`, its decision-log row (JSON), written by whoever publishes it
    once Redis says it is new across the replicas (never published itself)."""

    kind: str
    origin: str
    decision_id: str
    payload: bytes
    row: bytes = b""

    def line(self) -> bytes:
        """The journal line."""
        fields = [self.kind, self.origin, self.decision_id, self.payload.decode()]
        if self.row:
            fields.append(self.row.decode())
        return orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)

    @classmethod
    def from_line(cls, line: bytes) -> Item:
        """Inverse of `line`."""
        kind, origin, did, payload, *row = orjson.loads(line)
        return cls(kind, origin, did, payload.encode(), row[0].encode() if row else b"")


@dataclass
class _Journal:
    path: Path
    fd: int
    opened: float
    last_item: int = -1  # sequence number of the last item written to it


class Outbox:
    """A FIFO of items to publish, journaled; `peek`/`done` let one flusher drain it in order."""

    def __init__(self, directory: Path, rotate_seconds: float = 1.0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rotate_seconds = rotate_seconds
        self._lock = threading.Lock()
        self._stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._items: deque[tuple[int, Item]] = deque()
        self._decisions: dict[str, Item] = {}  # queued decisions by id
        self._next_item = 0
        self._journals: list[_Journal] = []
        self._seq = 0
        self._current = self._open()

    # ---- writing ---------------------------------------------------------------------------

    def append(self, items: list[Item], durable: bool = False) -> None:
        """Journal and queue items; with `durable`, fsync before returning (acknowledged)."""
        data = b"".join(item.line() for item in items)
        with self._lock:
            _write_all(self._current.fd, data)
            for item in items:
                if item.kind == "d":
                    self._decisions[item.decision_id] = item
                self._items.append((self._next_item, item))
                self._current.last_item = self._next_item
                self._next_item += 1
            if durable:
                os.fsync(self._current.fd)

    def recover(self) -> int:
        """Claim the journals of dead processes in the folder (call before the first append);
        their items go first, in the order they were written."""
        claimed: list[tuple[_Journal, list[Item]]] = []
        for path in sorted(self.directory.glob("*.jsonl")):
            if any(j.path == path for j in self._journals):
                continue
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # a live process's journal
                continue
            claimed.append((_Journal(path, fd, 0.0), _read(path)))
        with self._lock:
            if self._items:
                raise RuntimeError("recover() must run before the first append")
            for journal, items in claimed:
                if not items:
                    _remove(journal)
                    continue
                for item in items:
                    if item.kind == "d":
                        self._decisions[item.decision_id] = item
                    self._items.append((self._next_item, item))
                    self._next_item += 1
                journal.last_item = self._next_item - 1
                self._journals.insert(len(self._journals) - 1, journal)
        total = sum(len(items) for _, items in claimed)
        if total:
            logger.warning(
                "replaying %d unpublished item(s) from %d journal(s)", total, len(claimed)
            )
        return total

    # ---- draining --------------------------------------------------------------------------

    def peek(self, limit: int) -> list[tuple[int, Item]]:
        """The oldest items, not removed."""
        with self._lock:
            return [self._items[i] for i in range(min(limit, len(self._items)))]

    def queued_decisions(self, decision_ids: set[str]) -> list[Item]:
        """The queued (unpublished) decisions among these ids."""
        with self._lock:
            return [self._decisions[d] for d in decision_ids if d in self._decisions]

    def done(self, upto: int) -> None:
        """Items up to sequence number `upto` are published: drop them and spent journals."""
        with self._lock:
            while self._items and self._items[0][0] <= upto:
                _, item = self._items.popleft()
                if item.kind == "d":
                    self._decisions.pop(item.decision_id, None)
            keep = []
            for journal in self._journals:
                if journal is not self._current and journal.last_item <= upto:
                    _remove(journal)
                else:
                    keep.append(journal)
            self._journals = keep

    def rotate_if_due(self) -> None:
        """Start a new journal when the current one is old enough (called while Redis is up)."""
        with self._lock:
            if time.monotonic() - self._current.opened < self.rotate_seconds:
                return
            if self._current.last_item < 0 and not self._items:
                self._current.opened = time.monotonic()
                return
            os.fsync(self._current.fd)
            spent = self._current
            self._current = self._open_locked()
            if not self._items or self._items[0][0] > spent.last_item:
                self._journals.remove(spent)
                _remove(spent)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def close(self) -> None:
        """Close the journals; unpublished items stay on disk for the next process."""
        with self._lock:
            for journal in self._journals:
                if journal is self._current and journal.last_item < 0:
                    _remove(journal)
                else:
                    os.close(journal.fd)
            self._journals = []

    # ---- files -----------------------------------------------------------------------------

    def _open(self) -> _Journal:
        with self._lock:
            return self._open_locked()

    def _open_locked(self) -> _Journal:
        path = self.directory / f"{self._stamp}-{self._seq:08d}.jsonl"
        self._seq += 1
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        journal = _Journal(path, fd, time.monotonic())
        self._journals.append(journal)
        return journal


def _write_all(fd: int, data: bytes) -> None:
    rest = memoryview(data)
    while rest:
        rest = rest[os.write(fd, rest) :]


def _remove(journal: _Journal) -> None:
    journal.path.unlink(missing_ok=True)
    os.close(journal.fd)


def _read(path: Path) -> list[Item]:
    """The complete items of a journal; a torn last line (a crash mid-write) is skipped."""
    items = []
    for line in path.read_bytes().splitlines():
        try:
            items.append(Item.from_line(line))
        except (orjson.JSONDecodeError, ValueError):
            logger.warning("skipping a torn line in outbox journal %s", path)
    return items

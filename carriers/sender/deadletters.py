"""Dead letters: outcome events the router refused (a 4xx answer), kept with the reason.

Each letter holds the event, the reason (error code, field, message; digit runs hidden, never a
phone number), when it was refused and by which worker, and how many times it was tried. The
store is a JSON-lines file under the worker's data dir, a Redis hash (`<key>:dead`) when the
worker uses Redis, or memory (in-process). `router deadletters list|replay` reads them and posts
them again (`carriers/sender/deadletters_main.py`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import redis

from carriers.sender.journal import (
    DEFAULT_KEY,
    event_from_dict,
    event_to_dict,
    fsync_dir,
    write_all,
)
from router.contract.errors import RoutingError
from router.contract.messages import OutcomeEvent
from router.contract.redact import redact

log = logging.getLogger(__name__)

DEAD_LETTER_FILE = "deadletters.jsonl"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class DeadLetter:
    """An outcome event the router refused, why, when (epoch seconds) and which worker."""

    id: str
    event: OutcomeEvent
    code: str
    message: str
    field: str | None = None
    at: float = dataclass_field(default_factory=time.time)
    worker: str = ""
    attempts: int = 1

    @classmethod
    def of(cls, entry_id: str, event: OutcomeEvent, exc: RoutingError, worker: str) -> DeadLetter:
        """The dead letter for an event refused with `exc` (digit runs in its text hidden)."""
        return cls(entry_id, event, exc.code, str(redact(exc.message)), exc.field, worker=worker)

    def refused_again(self, exc: RoutingError) -> DeadLetter:
        """This letter after a replay the router refused too: the new reason, one more try."""
        return replace(
            self,
            code=exc.code,
            message=str(redact(exc.message)),
            field=exc.field,
            at=time.time(),
            attempts=self.attempts + 1,
        )

    def to_dict(self) -> dict[str, Any]:
        """The letter as JSON (`at` also as RFC 3339 for people)."""
        return {
            "id": self.id,
            "event": event_to_dict(self.event),
            "reason": {"code": self.code, "field": self.field, "message": self.message},
            "at": self.at,
            "when": _iso(self.at),
            "worker": self.worker,
            "attempts": self.attempts,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeadLetter:
        """A letter read back."""
        reason = d.get("reason") or {}
        return cls(
            str(d["id"]),
            event_from_dict(d["event"]),
            str(reason.get("code", "")),
            str(reason.get("message", "")),
            reason.get("field"),
            float(d.get("at", 0.0)),
            str(d.get("worker", "")),
            int(d.get("attempts", 1)),
        )


class DeadLetterStore(Protocol):
    """Where refused events wait to be read and replayed."""

    def put(self, letter: DeadLetter) -> None:
        """Add a letter, or replace the one with its id."""
        ...

    def remove(self, ids: Sequence[str]) -> None:
        """Delete letters (replayed and accepted)."""
        ...

    def list(self) -> list[DeadLetter]:
        """Every letter, oldest first."""
        ...

    def count(self) -> int:
        """How many letters there are."""
        ...


class MemoryDeadLetters:
    """Dead letters in this process (the embedded default)."""

    def __init__(self) -> None:
        self._letters: dict[str, DeadLetter] = {}
        self._lock = threading.Lock()

    def put(self, letter: DeadLetter) -> None:
        """Add or replace."""
        with self._lock:
            self._letters[letter.id] = letter

    def remove(self, ids: Sequence[str]) -> None:
        """Delete."""
        with self._lock:
            for i in ids:
                self._letters.pop(i, None)

    def list(self) -> list[DeadLetter]:
        """Oldest first."""
        with self._lock:
            return sorted(self._letters.values(), key=lambda d: d.at)

    def count(self) -> int:
        """How many."""
        with self._lock:
            return len(self._letters)


class FileDeadLetters:
    """Dead letters in one JSON-lines file: `{"put": letter}` and `{"del": [ids]}` lines, the
    last line about an id wins. Writers (workers, `router deadletters replay`) append under an
    exclusive `flock` and fsync; `compact` rewrites the file (write, fsync, rename) under the
    same lock, and a writer that finds it renamed underneath reopens it.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _append(self, records: Sequence[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # compacted and replaced while we waited for the lock
                    continue
                write_all(fd, data)
                os.fsync(fd)
                return
            finally:
                os.close(fd)

    def put(self, letter: DeadLetter) -> None:
        """Append the letter (durable on return)."""
        self._append([{"put": letter.to_dict()}])

    def remove(self, ids: Sequence[str]) -> None:
        """Append a deletion."""
        if ids:
            self._append([{"del": list(ids)}])

    def _read(self) -> dict[str, DeadLetter]:
        letters: dict[str, DeadLetter] = {}
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return letters
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                if "put" in rec:
                    letter = DeadLetter.from_dict(rec["put"])
                    letters[letter.id] = letter
                else:
                    for i in rec["del"]:
                        letters.pop(str(i), None)
            except (ValueError, KeyError, TypeError):
                if n != len(lines):
                    log.warning("dead letters: %s line %d unreadable, skipped", self.path, n)
        return letters

    def list(self) -> list[DeadLetter]:
        """Oldest first."""
        return sorted(self._read().values(), key=lambda d: d.at)

    def count(self) -> int:
        """How many."""
        return len(self._read())

    def compact(self) -> None:
        """Rewrite the file with only the letters that remain (none: the file goes)."""
        if not self.path.exists():
            return
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    return  # compacted by someone else meanwhile
            except FileNotFoundError:
                return
            letters = self.list()
            if not letters:
                self.path.unlink()
            else:
                tmp = self.path.with_suffix(".compact.tmp")
                data = "".join(
                    json.dumps({"put": d.to_dict()}, separators=(",", ":")) + "\n" for d in letters
                ).encode()
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, self.path)
            fsync_dir(self.path.parent)
        finally:
            os.close(fd)


class RedisDeadLetters:
    """Dead letters in one Redis hash, `<key>:dead` (id -> letter JSON)."""

    def __init__(self, client: redis.Redis, key: str = DEFAULT_KEY) -> None:
        self.redis = client
        self.hash = f"{key}:dead"

    def put(self, letter: DeadLetter) -> None:
        """HSET the letter."""
        self.redis.hset(self.hash, letter.id, json.dumps(letter.to_dict(), separators=(",", ":")))

    def remove(self, ids: Sequence[str]) -> None:
        """HDEL."""
        if ids:
            self.redis.hdel(self.hash, *ids)

    def list(self) -> list[DeadLetter]:
        """Oldest first."""
        out = []
        for k, v in self.redis.hscan_iter(self.hash, count=500):
            try:
                out.append(DeadLetter.from_dict(json.loads(v)))
            except (ValueError, KeyError, TypeError):
                log.warning("dead letters: entry %r unreadable, skipped", k)
        return sorted(out, key=lambda d: d.at)

    def count(self) -> int:
        """HLEN."""
        return int(self.redis.hlen(self.hash))

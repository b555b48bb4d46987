"""Where a sender worker keeps outcome events until the router took them, and what it refused.

The outcome journal makes `OutcomeReporter.report` durable: an event is recorded before `report`
returns (so a receipt is acknowledged to the SMSC only once it is on disk or in Redis) and
forgotten once the router answered for it. Whatever a dead worker recorded and never posted is
taken over by another worker (or the next one started on the same journal) and posted again;
the router answers "duplicate" for a repeat, so that is harmless.

- `FileJournal`: append-only JSON-lines segments under a data dir, fsync'd with group commit;
  each worker holds an exclusive `flock` on its own lock file, and a lock that can be taken
  means its owner is dead.
- `RedisJournal`: one hash per worker (`<key>:journal:<worker>`), a heartbeat per worker in a
  sorted set (`<key>:owners`, Redis time); a worker whose heartbeat is older than the claim
  time has its hash moved, atomically (Lua), to the worker that takes it over.
- `MemoryJournal`: in this process only (the embedded demo and in-process tests).

What the router refuses goes to the dead-letter store (`carriers/sender/deadletters.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

import redis

from router.contract.messages import OutcomeEvent

log = logging.getLogger(__name__)

DEFAULT_KEY = "sms:{outcomes}"  # the hash tag keeps every key of the journal in one slot
_EVENT_NAMES = tuple(f.name for f in fields(OutcomeEvent))
_EVENT_FIELDS = set(_EVENT_NAMES)


def worker_name() -> str:
    """This process's default name: host-pid (as the job queue names its consumer)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def event_to_dict(ev: OutcomeEvent) -> dict[str, Any]:
    """An event as a JSON object (its None fields left out)."""
    return {k: v for k in _EVENT_NAMES if (v := getattr(ev, k)) is not None}


def event_from_dict(data: dict[str, Any]) -> OutcomeEvent:
    """The event a journal or dead-letter record holds."""
    return OutcomeEvent(**{k: v for k, v in data.items() if k in _EVENT_FIELDS})


# ---- the outcome journal -------------------------------------------------------------------


class OutcomeJournal(Protocol):
    """Durable storage of outcome events between `report` and the router's answer."""

    def append(self, events: Sequence[OutcomeEvent]) -> list[str]:
        """Record events durably (before returning); their journal ids, in order."""
        ...

    def posted(self, ids: Sequence[str]) -> None:
        """Forget events the router answered for (recorded, duplicate, late or dead-lettered)."""
        ...

    def recover(self) -> list[tuple[str, OutcomeEvent]]:
        """Take over what dead workers recorded and never posted; now this journal's."""
        ...

    def close(self) -> None:
        """Stop; what is still recorded stays for another worker to take over."""
        ...


class MemoryJournal:
    """No durability: the events live as long as this process (the embedded default)."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def append(self, events: Sequence[OutcomeEvent]) -> list[str]:
        """Ids only; nothing is stored."""
        with self._lock:
            first = self._n
            self._n += len(events)
        return [str(first + i) for i in range(len(events))]

    def posted(self, ids: Sequence[str]) -> None:
        """Nothing to forget."""

    def recover(self) -> list[tuple[str, OutcomeEvent]]:
        """Nothing survives a process here."""
        return []

    def close(self) -> None:
        """Nothing to release."""


class FileJournal:
    """Append-only JSON-lines segments in `directory`, one set per worker process.

    Files: `<owner>.lock` (held with `flock` while the owner lives) and `<owner>.<n>.jsonl`
    segments of `{"a": id, "e": event}` (recorded) and `{"d": [ids]}` (posted) lines. Appends
    are fsync'd before `append` returns; threads appending at once share one fsync (group
    commit). "Posted" lines are not fsync'd: losing one only repeats an event. A segment is
    deleted once every event in it was posted; a torn last line (a crash mid-write) is ignored.
    """

    MAX_SEGMENT = 8 << 20  # bytes: seal the segment and start another
    RECYCLE = 256 << 10  # bytes: an all-posted segment this large is replaced by a fresh one

    def __init__(self, directory: Path | str, owner: str | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.owner = f"{owner or worker_name()}-{secrets.token_hex(3)}"
        self._lock = threading.Lock()  # writes, ids, segment bookkeeping
        self._sync = threading.Condition()  # group commit
        self._written = 0  # appends written (sequence numbers)
        self._synced = 0  # appends known to be on disk
        self._syncing = False
        self._next_id = 0
        self._segment = -1
        self._fd = -1
        self._size = 0
        self._where: dict[str, int] = {}  # outstanding id -> its segment
        self._outstanding: dict[int, int] = {}  # segment -> outstanding events in it
        self._sealed: dict[int, int] = {}  # sealed segment -> its (open) fd
        # The lock file is taken under a temporary name, then renamed: nobody ever sees an
        # unlocked lock file of a live owner.
        tmp = self.directory / f".{self.owner}.lock.tmp"
        self._lock_fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, self.directory / f"{self.owner}.lock")
        self._open_segment()
        self.adopted_files = 0

    # -- writing

    def _segment_path(self, owner: str, n: int) -> Path:
        return self.directory / f"{owner}.{n:06d}.jsonl"

    def _open_segment(self) -> None:
        """Start the next segment (called with `_lock` held, or from __init__)."""
        if self._fd >= 0:
            os.fdatasync(self._fd)  # everything written so far is durable before the switch
            with self._sync:
                self._synced = max(self._synced, self._written)
                self._sync.notify_all()
            self._sealed[self._segment] = self._fd
        self._segment += 1
        path = self._segment_path(self.owner, self._segment)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        self._outstanding.setdefault(self._segment, 0)
        fsync_dir(self.directory)
        self._maybe_delete(self._segment - 1)

    def append(self, events: Sequence[OutcomeEvent]) -> list[str]:
        """Write the events, then wait until they are on disk (one fsync for many threads)."""
        if not events:
            return []
        with self._lock:
            if self._fd < 0:
                raise RuntimeError("the outcome journal is closed")
            if self._size >= self.MAX_SEGMENT:
                self._open_segment()
            ids = [f"{self.owner}:{self._next_id + i}" for i in range(len(events))]
            self._next_id += len(events)
            data = "".join(
                json.dumps({"a": i, "e": event_to_dict(ev)}, separators=(",", ":")) + "\n"
                for i, ev in zip(ids, events, strict=True)
            ).encode()
            write_all(self._fd, data)
            self._size += len(data)
            for i in ids:
                self._where[i] = self._segment
            self._outstanding[self._segment] += len(ids)
            self._written += 1
            mine = self._written
        self._wait_synced(mine)
        return ids

    def _wait_synced(self, mine: int) -> None:
        """Return once append number `mine` is on disk: the first waiter fsyncs everything
        written so far (a dup of the fd, outside the write lock); the others wait for it."""
        while True:
            with self._sync:
                while self._synced < mine and self._syncing:
                    self._sync.wait()
                if self._synced >= mine:
                    return
                self._syncing = True
            target, done = 0, False
            try:
                with self._lock:
                    target, fd = self._written, os.dup(self._fd)
                try:
                    os.fdatasync(fd)
                    done = True
                finally:
                    os.close(fd)
            finally:
                with self._sync:
                    self._syncing = False
                    if done:
                        self._synced = max(self._synced, target)
                    self._sync.notify_all()

    def posted(self, ids: Sequence[str]) -> None:
        """Mark events posted; delete segments with nothing outstanding."""
        if not ids:
            return
        with self._lock:
            known = [i for i in ids if i in self._where]
            if not known or self._fd < 0:  # closed: they stay recorded, a repeat is harmless
                return
            data = (json.dumps({"d": known}, separators=(",", ":")) + "\n").encode()
            write_all(self._fd, data)
            self._size += len(data)
            touched = set()
            for i in known:
                seg = self._where.pop(i)
                self._outstanding[seg] -= 1
                touched.add(seg)
            for seg in touched:
                self._maybe_delete(seg)
            if self._outstanding[self._segment] == 0 and self._size >= self.RECYCLE:
                self._open_segment()  # the old one has nothing outstanding: it goes

    def _maybe_delete(self, seg: int) -> None:
        """Delete a sealed segment whose events were all posted (with `_lock` held)."""
        if seg == self._segment or self._outstanding.get(seg, 0) > 0 or seg not in self._sealed:
            return
        with contextlib.suppress(FileNotFoundError):
            self._segment_path(self.owner, seg).unlink()
        os.close(self._sealed.pop(seg))
        del self._outstanding[seg]

    def outstanding(self) -> int:
        """Events recorded and not yet posted."""
        with self._lock:
            return len(self._where)

    # -- taking over

    def recover(self) -> list[tuple[str, OutcomeEvent]]:
        """Take over every dead owner's journal: its unposted events are re-recorded here
        (durably) before its files are deleted; returns them with their new ids."""
        out: list[tuple[str, OutcomeEvent]] = []
        for lock_path in sorted(self.directory.glob("*.lock")):
            owner = lock_path.name[: -len(".lock")]
            if owner == self.owner:
                continue
            try:
                fd = os.open(lock_path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its owner is alive
                segments = sorted(self.directory.glob(f"{glob_escape(owner)}.*.jsonl"))
                events = read_segments(segments)
                if events:
                    ids = self.append([ev for _, ev in events])
                    out += list(zip(ids, (ev for _, ev in events), strict=True))
                    log.warning(
                        "journal: took over %d unposted outcome(s) of dead worker %s",
                        len(events),
                        owner,
                    )
                for path in segments:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    lock_path.unlink()
                fsync_dir(self.directory)
                self.adopted_files += 1
            finally:
                os.close(fd)
        return out

    def close(self) -> None:
        """Release the lock; with nothing outstanding, delete this owner's files too."""
        with self._lock:
            if self._fd < 0:
                return
            os.fdatasync(self._fd)
            clean = not self._where
            fds = [self._fd, *self._sealed.values()]
            segs = [self._segment, *self._sealed]
            self._fd = -1
            self._sealed.clear()
            for fd in fds:
                os.close(fd)
            if clean:
                for seg in segs:
                    with contextlib.suppress(FileNotFoundError):
                        self._segment_path(self.owner, seg).unlink()
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / f"{self.owner}.lock").unlink()
            else:
                log.warning(
                    "journal: %d outcome(s) not posted stay in %s for the next worker",
                    len(self._where),
                    self.directory,
                )
            os.close(self._lock_fd)


def glob_escape(text: str) -> str:
    """`text` with glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def read_segments(paths: Iterable[Path]) -> list[tuple[str, OutcomeEvent]]:
    """The recorded and not posted events of one owner's segments, in order."""
    recorded: dict[str, OutcomeEvent] = {}
    for path in paths:
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            continue
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                if "a" in rec:
                    recorded[rec["a"]] = event_from_dict(rec["e"])
                else:
                    for i in rec["d"]:
                        recorded.pop(i, None)
            except (ValueError, KeyError, TypeError):
                # A torn last line is what a crash mid-write leaves; anything else is damage.
                if n != len(lines):
                    log.warning("journal: %s line %d unreadable, skipped", path.name, n)
    return list(recorded.items())


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_HEARTBEAT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
"""

_STALE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
"""

# KEYS: owners, the dead owner's hash, the taker's hash; ARGV: dead owner, claim idle (ms).
_TAKE_OVER = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if beat and now - tonumber(beat) < tonumber(ARGV[2]) then return {} end
local kv = redis.call('HGETALL', KEYS[2])
for i = 1, #kv, 2 do redis.call('HSET', KEYS[3], kv[i], kv[i + 1]) end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return kv
"""


class RedisJournal:
    """One Redis hash of outcome events per worker, taken over when its owner stops beating.

    Keys (one hash tag, so one Cluster slot): `<key>:journal:<owner>` (id -> event JSON) and
    `<key>:owners` (sorted set: owner -> last heartbeat, Redis time in ms). A live worker beats
    every third of `claim_idle_s`; a worker whose beat is older than that is dead, and the first
    worker to notice moves its hash into its own (one Lua script: exactly one taker). A worker
    restarted under its old name takes its own hash back at once. The events are as durable as
    the Redis is (run it with `appendonly yes`).
    """

    def __init__(
        self,
        client: redis.Redis,
        owner: str | None = None,
        key: str = DEFAULT_KEY,
        claim_idle_s: float = 30.0,
        retry_s: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        self.redis = client
        self.owner = owner or worker_name()
        self.key = key
        self.owners_key = f"{key}:owners"
        self.hash = self.journal_key(self.owner)
        self.claim_idle_ms = max(1, int(claim_idle_s * 1000))
        self.retry_s = retry_s
        self._token = secrets.token_hex(3)
        self._n = 0
        self._lock = threading.Lock()
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._stale = client.register_script(_STALE)
        self._take_over = client.register_script(_TAKE_OVER)
        self._first = True
        self._closed = threading.Event()
        self._beater = threading.Thread(target=self._beat, name="journal-heartbeat", daemon=True)

    def journal_key(self, owner: str) -> str:
        """The hash of one owner's events."""
        return f"{self.key}:journal:{owner}"

    def _retrying(self, what: str, fn: Any) -> Any:
        """Call `fn` until Redis answers (the caller is not acknowledged meanwhile)."""
        delay = self.retry_s[0]
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if self._closed.is_set():
                    raise
                log.warning("journal: Redis unreachable on %s (%s); retrying", what, exc)
                time.sleep(delay)
                delay = min(self.retry_s[1], delay * 2)

    def append(self, events: Sequence[OutcomeEvent]) -> list[str]:
        """HSET the events (acknowledged by Redis before this returns)."""
        if not events:
            return []
        with self._lock:
            first = self._n
            self._n += len(events)
        ids = [f"{self.owner}:{self._token}:{first + i}" for i in range(len(events))]
        mapping = {
            i: json.dumps(event_to_dict(ev), separators=(",", ":"))
            for i, ev in zip(ids, events, strict=True)
        }
        self._retrying("append", lambda: self.redis.hset(self.hash, mapping=mapping))
        return ids

    def posted(self, ids: Sequence[str]) -> None:
        """HDEL the events."""
        if ids:
            self._retrying("posted", lambda: self.redis.hdel(self.hash, *ids))

    def recover(self) -> list[tuple[str, OutcomeEvent]]:
        """The first call: this owner's own hash (a previous life's) and a heartbeat; every
        call: the hashes of owners whose heartbeat is older than the claim time."""
        out: list[tuple[str, OutcomeEvent]] = []
        if self._first:
            self._first = False
            own = self._retrying("recover", lambda: self.redis.hgetall(self.hash))
            out += _decode_entries(own)
            self._retrying("heartbeat", self._beat_once)
            self._beater.start()
        stale = self._retrying(
            "recover", lambda: self._stale(keys=[self.owners_key], args=[self.claim_idle_ms])
        )
        for raw in stale:
            owner = raw.decode() if isinstance(raw, bytes) else str(raw)
            if owner == self.owner:
                continue
            kv = self._retrying(
                "take over",
                lambda o=owner: self._take_over(
                    keys=[self.owners_key, self.journal_key(o), self.hash],
                    args=[o, self.claim_idle_ms],
                ),
            )
            entries = _decode_entries(dict(zip(kv[::2], kv[1::2], strict=True)))
            if entries:
                log.warning(
                    "journal: took over %d unposted outcome(s) of dead worker %s",
                    len(entries),
                    owner,
                )
            out += entries
        return out

    def _beat_once(self) -> None:
        self._heartbeat(keys=[self.owners_key], args=[self.owner])

    def _beat(self) -> None:
        while not self._closed.wait(self.claim_idle_ms / 3000):
            try:
                self._beat_once()
            except redis.RedisError as exc:
                log.warning("journal: heartbeat failed (%s)", exc)

    def close(self) -> None:
        """Stop beating; with events left, mark this owner dead at once (score 0) so another
        worker takes them over without waiting for the claim time."""
        self._closed.set()
        try:
            left = int(self.redis.hlen(self.hash))
            if left:
                self.redis.zadd(self.owners_key, {self.owner: 0})
                log.warning(
                    "journal: %d outcome(s) not posted stay in Redis for another worker", left
                )
            else:
                self.redis.zrem(self.owners_key, self.owner)
        except redis.RedisError as exc:
            log.warning("journal: Redis unreachable at close (%s)", exc)


def _decode_entries(raw: dict[Any, Any]) -> list[tuple[str, OutcomeEvent]]:
    out = []
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        try:
            out.append((key, event_from_dict(json.loads(v))))
        except (ValueError, TypeError):
            log.warning("journal: entry %s unreadable, skipped", key)
    return sorted(out, key=lambda e: _entry_order(e[0]))


def _entry_order(entry_id: str) -> tuple[str, int]:
    head, _, n = entry_id.rpartition(":")
    return (head, int(n)) if n.isdigit() else (entry_id, 0)

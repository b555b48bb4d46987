"""Message queues that feed sender workers: in-process (embedded default) or a Redis Stream.

A queue hands out `Delivery`s; the worker acknowledges one only after the message's submit
outcome has been reported, so a worker that dies mid-flight leaves its messages to be claimed
again (at-least-once). The job ledger (`carriers/sender/ledger.py`) makes that redelivery harmless.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import redis


@dataclass(frozen=True, slots=True)
class Job:
    """One message to send as the aggregator accepted it (`job_id` is its idempotency key)."""

    job_id: str
    to: str
    text: str
    tenant: str | None = None
    message_class: str = "otp"
    sender_type: str = "alphanumeric"
    source: str | None = None
    mccmnc: str | None = None
    at: float | None = None

    def to_json(self) -> str:
        """The job as one JSON document (what a Redis Stream entry carries)."""
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Job:
        """Parse a job; raises ValueError naming the problem (never echoing the number)."""
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"job is not JSON: {exc.msg}") from None
        if not isinstance(data, Mapping):
            raise ValueError("job must be a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"job has unknown field(s) {sorted(unknown)}")
        for name in ("job_id", "to", "text"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise ValueError(f"job needs a non-empty string {name!r}")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A job handed to one worker; `tag` identifies it for `ack`."""

    job: Job
    tag: str
    redelivered: bool = False


class MessageQueue(Protocol):
    """What a sender worker reads from."""

    def put(self, job: Job) -> None: ...

    def get(self, count: int, timeout: float) -> list[Delivery]: ...

    def ack(self, delivery: Delivery) -> None: ...

    def release(self, delivery: Delivery) -> None: ...

    def close(self) -> None: ...


class InProcessQueue:
    """The embedded default: a thread-safe FIFO in this process (nothing survives the process)."""

    def __init__(self) -> None:
        self._q: queue.Queue[Job] = queue.Queue()
        self._seq = 0
        self._lock = threading.Lock()

    def put(self, job: Job) -> None:
        """Enqueue a job."""
        self._q.put(job)

    def get(self, count: int, timeout: float) -> list[Delivery]:
        """Up to `count` jobs, waiting at most `timeout` seconds for the first."""
        try:
            first = self._q.get(timeout=timeout)
        except queue.Empty:
            return []
        jobs = [first]
        while len(jobs) < count:
            try:
                jobs.append(self._q.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            self._seq += len(jobs)
            base = self._seq - len(jobs)
        return [Delivery(j, str(base + i)) for i, j in enumerate(jobs)]

    def ack(self, delivery: Delivery) -> None:
        """Nothing to do in process: a job leaves the queue when it is taken."""

    def release(self, delivery: Delivery) -> None:
        """Give a job back (its handling failed): it is taken again."""
        self._q.put(delivery.job)

    def pending(self) -> int:
        """Jobs not yet taken."""
        return self._q.qsize()

    def close(self) -> None:
        """Nothing to release."""


class RedisStreamQueue:
    """Jobs in a Redis Stream read through a consumer group.

    Entries stay pending until acknowledged; entries a dead consumer left pending longer than
    `claim_idle_s` are claimed by the next reader (XAUTOCLAIM). A live consumer keeps the
    entries in its hands fresh (XCLAIM JUSTID resets their idle time), so they are never taken
    from it while it works on them. Acknowledged entries are deleted (the stream holds phone
    numbers, which must not linger).
    """

    def __init__(
        self,
        url: str,
        stream: str = "sms:{jobs}",
        group: str = "senders",
        consumer: str | None = None,
        claim_idle_s: float = 30.0,
        client: redis.Redis | None = None,
    ) -> None:
        self.redis = client or redis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=5
        )
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self._held: set[str] = set()
        self._touched = time.monotonic()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._toucher: threading.Thread | None = None
        try:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def put(self, job: Job) -> None:
        """Append a job to the stream."""
        self.redis.xadd(self.stream, {"job": job.to_json()})

    def get(self, count: int, timeout: float) -> list[Delivery]:
        """Claimed stale entries first, then new ones (blocking up to `timeout` seconds)."""
        if self._toucher is None:
            self._toucher = threading.Thread(target=self._keep_fresh, name="queue-touch")
            self._toucher.daemon = True
            self._toucher.start()
        self.touch()
        out: list[Delivery] = []
        reply = self.redis.xautoclaim(
            self.stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=count
        )
        out += self._deliveries(reply[1], redelivered=True)  # [next id, entries, (deleted)]
        if out:
            return out
        with self._lock:
            if len(self._held) >= count * 64:  # enough in hand already
                return out
        reply = self.redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">"},
            count=count,
            block=max(1, int(timeout * 1000)),
        )
        for _, entries in reply or []:
            out += self._deliveries(entries, redelivered=False)
        return out

    def touch(self) -> None:
        """Reset the idle time of the entries in hand (at most every third of `claim_idle_s`)."""
        with self._lock:
            if time.monotonic() - self._touched < self.claim_idle_ms / 3000:
                return
            self._touched = time.monotonic()
            held = list(self._held)
        for i in range(0, len(held), 500):
            self.redis.xclaim(
                self.stream, self.group, self.consumer, 0, held[i : i + 500], justid=True
            )

    def _keep_fresh(self) -> None:
        """Touch the entries in hand even while every sending thread waits (on the router, a
        carrier): a worker that is slow but alive keeps its jobs."""
        while not self._closed.wait(self.claim_idle_ms / 3000):
            with contextlib.suppress(redis.RedisError):
                self.touch()

    def _deliveries(self, entries: list[Any], redelivered: bool) -> list[Delivery]:
        out: list[Delivery] = []
        for entry_id, fields in entries:
            tag = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            with self._lock:
                if tag in self._held:  # ours, still being worked on
                    continue
                self._held.add(tag)
            raw = (fields or {}).get(b"job") or (fields or {}).get("job")
            try:
                job = Job.from_json(raw or b"")
            except ValueError:
                # Deleted while pending, or malformed: it can never be sent; drop it rather than
                # block the queue.
                self._drop(tag)
                continue
            out.append(Delivery(job, tag, redelivered))
        return out

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge and delete the entry."""
        self._drop(delivery.tag)

    def release(self, delivery: Delivery) -> None:
        """Stop holding an entry whose handling failed: it is no longer kept fresh, so after
        `claim_idle_s` it is claimed again (by this worker or another)."""
        with self._lock:
            self._held.discard(delivery.tag)

    def _drop(self, tag: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, tag)
        pipe.xdel(self.stream, tag)
        pipe.execute()
        with self._lock:
            self._held.discard(tag)

    def pending(self) -> int:
        """Entries in the stream not yet acknowledged (new or in flight)."""
        return int(self.redis.xlen(self.stream))

    def close(self) -> None:
        """Stop touching and release the connection pool."""
        self._closed.set()
        if self._toucher is not None:
            self._toucher.join(timeout=5)
        self.redis.close()

"""What a sender worker has done with each job, so a redelivered job is never routed twice.

A job's record says which decision carries it and whether its submit went out. A worker that
takes over a dead worker's job reuses the decision (the router counts it once) and skips a
job already submitted. Receipts for messages submitted by another worker are matched through
the carrier's message id. In process for the embedded default; in Redis when it is configured.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import redis

from carriers.dlr import message_id_keys

TTL_S = 2 * 24 * 3600  # the router's DLR timeout: nothing is matched after it


@dataclass(frozen=True, slots=True)
class JobRecord:
    """The latest decision carrying a job, and whether it was submitted."""

    decision_id: str
    carrier: str
    attempt: int
    submitted: bool


class JobLedger(Protocol):
    """Where workers record their progress on jobs and carrier message ids."""

    def get(self, job_id: str) -> JobRecord | None: ...

    def put(self, job_id: str, record: JobRecord) -> None: ...

    def map_message(self, carrier: str, message_id: str, decision_id: str) -> None: ...

    def decision_for(self, carrier: str, message_id: str) -> str | None: ...


class MemoryLedger:
    """The embedded default: bounded dictionaries in this process."""

    def __init__(self, capacity: int = 500_000) -> None:
        self.capacity = capacity
        self._jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self._messages: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> JobRecord | None:
        """The job's record, if any."""
        with self._lock:
            return self._jobs.get(job_id)

    def put(self, job_id: str, record: JobRecord) -> None:
        """Record the job's current decision."""
        with self._lock:
            self._jobs[job_id] = record
            self._jobs.move_to_end(job_id)
            while len(self._jobs) > self.capacity:
                self._jobs.popitem(last=False)

    def map_message(self, carrier: str, message_id: str, decision_id: str) -> None:
        """Remember which decision a carrier's message id belongs to."""
        with self._lock:
            self._messages[(carrier, message_id)] = decision_id
            while len(self._messages) > self.capacity:
                self._messages.popitem(last=False)

    def decision_for(self, carrier: str, message_id: str) -> str | None:
        """The decision of a carrier's message id, under any of the id's spellings."""
        with self._lock:
            for key in message_id_keys(message_id):
                found = self._messages.get((carrier, key))
                if found is not None:
                    return found
        return None


class RedisLedger:
    """Job records and message ids in Redis, shared by every worker (keys expire after 48 h)."""

    def __init__(self, client: redis.Redis, prefix: str = "sms") -> None:
        self.redis = client
        self.prefix = prefix

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:{{job:{job_id}}}"

    def _msg_key(self, carrier: str, message_id: str) -> str:
        return f"{self.prefix}:{{mid:{carrier}:{message_id}}}"

    def get(self, job_id: str) -> JobRecord | None:
        """The job's record, if any."""
        raw = self.redis.hgetall(self._job_key(job_id))
        if not raw:
            return None
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return JobRecord(d["decision_id"], d["carrier"], int(d["attempt"]), d["submitted"] == "1")

    def put(self, job_id: str, record: JobRecord) -> None:
        """Record the job's current decision."""
        key = self._job_key(job_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "decision_id": record.decision_id,
                "carrier": record.carrier,
                "attempt": record.attempt,
                "submitted": int(record.submitted),
            },
        )
        pipe.expire(key, TTL_S)
        pipe.execute()

    def map_message(self, carrier: str, message_id: str, decision_id: str) -> None:
        """Remember which decision a carrier's message id belongs to."""
        self.redis.set(self._msg_key(carrier, message_id), decision_id, ex=TTL_S)

    def decision_for(self, carrier: str, message_id: str) -> str | None:
        """The decision of a carrier's message id, under any of the id's spellings."""
        for key in message_id_keys(message_id):
            found = self.redis.get(self._msg_key(carrier, key))
            if found is not None:
                return found.decode()
        return None

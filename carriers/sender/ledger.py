"""What a sender worker has done with each job, so a redelivered job is never routed twice.

A job's record says which decision carries it and how far its submit got. A worker that takes
over a dead worker's job skips a job already submitted, never sends again one whose submit may
have left (its fate is unconfirmed: sending twice would bill and deliver twice), and routes
again only one whose submit is known to have failed. Receipts for messages submitted by another
worker are matched through the carrier's message id. In process for the embedded default; in
Redis when it is configured.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import redis

from carriers.smpp.dlr import message_id_keys

TTL_S = 2 * 24 * 3600  # the router's DLR timeout: nothing is matched after it


# How far a job's latest submit got: about to leave (or left, unanswered), answered
# accepted, answered refused, or left without an answer (the session or the wait ended first).
SENDING, SUBMITTED, FAILED, UNCONFIRMED = "sending", "submitted", "failed", "unconfirmed"
_STATES = frozenset({SENDING, SUBMITTED, FAILED, UNCONFIRMED})


@dataclass(frozen=True, slots=True)
class JobRecord:
    """The latest decision carrying a job, and how far its submit got."""

    decision_id: str
    carrier: str
    attempt: int
    state: str

    def __post_init__(self) -> None:
        if self.state not in _STATES:
            raise ValueError(f"unknown job state {self.state!r}")

    @property
    def submitted(self) -> bool:
        """The carrier accepted the submit."""
        return self.state == SUBMITTED

    @property
    def may_have_left(self) -> bool:
        """The submit may have reached the carrier without an answer: never send it again."""
        return self.state in (SENDING, UNCONFIRMED)


class JobLedger(Protocol):
    """Where workers record their progress on jobs and carrier message ids."""

    def get(self, job_id: str) -> JobRecord | None: ...

    def put(self, job_id: str, record: JobRecord) -> None: ...

    def begin(self, job_id: str, record: JobRecord) -> bool: ...

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
            self._store(job_id, record)

    def _store(self, job_id: str, record: JobRecord) -> None:
        self._jobs[job_id] = record
        self._jobs.move_to_end(job_id)
        while len(self._jobs) > self.capacity:
            self._jobs.popitem(last=False)

    def begin(self, job_id: str, record: JobRecord) -> bool:
        """Record a SENDING submit unless this attempt (or a later one) of the job is already
        someone's: False means another worker took the job over and sends it."""
        with self._lock:
            current = self._jobs.get(job_id)
            if current is not None and current.attempt >= record.attempt:
                return False
            self._store(job_id, record)
        return True

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


# begin(): the record, unless the job's stored attempt is this one or later (atomic in Redis).
_BEGIN = """
local attempt = redis.call('HGET', KEYS[1], 'attempt')
if attempt and tonumber(attempt) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'decision_id', ARGV[1], 'carrier', ARGV[2], 'attempt', ARGV[3],
           'state', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class RedisLedger:
    """Job records and message ids in Redis, shared by every worker (keys expire after 48 h)."""

    def __init__(self, client: redis.Redis, prefix: str = "sms") -> None:
        self.redis = client
        self.prefix = prefix
        self._begin = client.register_script(_BEGIN)

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
        # Records written before states existed: submitted, or routed (its submit may have left).
        state = d.get("state") or (SUBMITTED if d.get("submitted") == "1" else SENDING)
        return JobRecord(d["decision_id"], d["carrier"], int(d["attempt"]), state)

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
                "state": record.state,
            },
        )
        pipe.expire(key, TTL_S)
        pipe.execute()

    def begin(self, job_id: str, record: JobRecord) -> bool:
        """Record a SENDING submit unless this attempt (or a later one) of the job is already
        someone's: False means another worker took the job over and sends it."""
        args = [record.decision_id, record.carrier, record.attempt, record.state, TTL_S]
        return bool(self._begin(keys=[self._job_key(job_id)], args=args))

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

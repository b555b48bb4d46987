"""The job ledger: a submit is begun once per attempt, whichever worker holds the job, and a
record says how far its submit got (in process, and in a real Redis shared by workers)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from carriers.sender.ledger import (
    FAILED,
    SENDING,
    SUBMITTED,
    UNCONFIRMED,
    JobLedger,
    JobRecord,
    MemoryLedger,
    RedisLedger,
)


@pytest.fixture(params=["memory", "redis"])
def ledgers(request: pytest.FixtureRequest, shared_redis) -> Iterator[tuple[JobLedger, JobLedger]]:
    """Two workers' views of one ledger."""
    if request.param == "memory":
        one = MemoryLedger()
        yield one, one
        return
    prefix = f"t{uuid.uuid4().hex[:8]}"
    clients = [redis.Redis.from_url(shared_redis.url) for _ in range(2)]
    yield RedisLedger(clients[0], prefix), RedisLedger(clients[1], prefix)
    for c in clients:
        c.close()


def test_a_submit_is_begun_once_per_attempt(ledgers: tuple[JobLedger, JobLedger]) -> None:
    a, b = ledgers
    assert a.begin("j1", JobRecord("d1", "c1", 1, SENDING))
    assert not b.begin("j1", JobRecord("d1", "c1", 1, SENDING))  # the other worker lets go
    assert b.get("j1") == JobRecord("d1", "c1", 1, SENDING)
    a.put("j1", JobRecord("d1", "c1", 1, FAILED))
    assert not b.begin("j1", JobRecord("d1", "c1", 1, SENDING))  # never the same attempt again
    assert b.begin("j1", JobRecord("d2", "c2", 2, SENDING))  # the retry is a new attempt
    assert a.get("j1") == JobRecord("d2", "c2", 2, SENDING)


def test_racing_workers_begin_one_send(ledgers: tuple[JobLedger, JobLedger]) -> None:
    a, b = ledgers
    wins: list[bool] = []
    lock = threading.Lock()

    def race(ledger: JobLedger, job: str) -> None:
        won = ledger.begin(job, JobRecord("d", "c", 1, SENDING))
        with lock:
            wins.append(won)

    for n in range(50):
        threads = [threading.Thread(target=race, args=(x, f"r{n}")) for x in (a, b, a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert wins.count(True) == 50 and len(wins) == 200


def test_states_say_whether_a_submit_may_have_left() -> None:
    assert [JobRecord("d", "c", 1, s).may_have_left for s in (SENDING, UNCONFIRMED)] == [1, 1]
    assert not any(JobRecord("d", "c", 1, s).may_have_left for s in (SUBMITTED, FAILED))
    assert JobRecord("d", "c", 1, SUBMITTED).submitted
    with pytest.raises(ValueError, match="unknown job state"):
        JobRecord("d", "c", 1, "sent")


def test_records_written_before_states_read_conservatively(shared_redis) -> None:
    """A record of the earlier format (submitted 0/1) reads as submitted, or as a submit that
    may have left (never sent again)."""
    client = redis.Redis.from_url(shared_redis.url)
    ledger = RedisLedger(client, f"o{uuid.uuid4().hex[:8]}")
    for job, flag in (("old1", 1), ("old0", 0)):
        client.hset(
            ledger._job_key(job),
            mapping={"decision_id": "d", "carrier": "c", "attempt": 1, "submitted": flag},
        )
    assert ledger.get("old1").state == SUBMITTED
    assert ledger.get("old0").state == SENDING
    client.close()

"""The shared-state parts against a real Redis: key slots, atomic idempotency, checkpoints, and
the local journals (outbox, decision log) that other processes must not steal while alive."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from redis.crc import key_slot

from carriers.catalog import EXAMPLE_CATALOG, load_catalog
from router.contract.messages import OutcomeEvent, RouteRequest
from router.core.config import load_config
from router.core.engine import EngineOptions, RoutingEngine
from router.log.decision_log import DECISIONS, DecisionLog
from router.replicas.outbox import Item, Outbox
from router.replicas.redis_bus import RedisBus, connect
from router.replicas.shared_state import SharedSettings, SharedState
from tests.redis_server import ExternalRedis, LocalCluster, RedisServer

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def bus(redis_server: RedisServer | ExternalRedis) -> RedisBus:
    """A bus on the test Redis with 4 shards."""
    return RedisBus(connect(redis_server.url, timeout=2), prefix="t", shards=4)


def test_every_key_of_a_decision_lives_in_one_cluster_slot(bus: RedisBus) -> None:
    slots = set()
    for n in range(200):
        did = f"{n:032x}"
        slot = key_slot(bus.record_key(did).encode())
        assert slot == key_slot(bus.stream_key(bus.shard_of(did)).encode())
        slots.add(slot)
    assert len(slots) == bus.shards  # one slot per shard, all shards used


def test_a_decision_and_an_outcome_are_published_once(bus: RedisBus) -> None:
    did = "ab" * 16
    decision = ("d", "i1", did, b'{"decision_id": "' + did.encode() + b'"}')
    outcome = ("o", "i1", did, b"dlr-final\0" + b'{"status": "DELIVRD"}')
    assert bus.publish([decision, outcome], ttl_ms=60_000) == [True, True]
    # Again (a replayed journal), and from another replica: nothing new.
    assert bus.publish([decision, outcome], ttl_ms=60_000) == [False, False]
    assert bus.publish([("o", "i2", did, outcome[3])], ttl_ms=60_000) == [False]
    # An intermediate receipt is a different event; a second final one is not.
    enroute = ("o", "i2", did, b"dlr-ENROUTE\0{}")
    undeliv = ("o", "i2", did, b"dlr-final\0" + b'{"status": "UNDELIV"}')
    assert bus.publish([enroute, undeliv], ttl_ms=60_000) == [True, False]
    entries = bus.read({})
    assert [(e.kind, e.origin) for e in entries] == [("d", "i1"), ("o", "i1"), ("o", "i2")]
    assert 0 < bus.client.pttl(bus.record_key(did)) <= 60_000
    assert bus.record([did, "cd" * 16]) == {did: decision[3]}


def test_reading_resumes_after_a_position(bus: RedisBus) -> None:
    ids = [f"{n:032x}" for n in range(40)]
    bus.publish([("d", "i", did, b"{}") for did in ids], ttl_ms=60_000)
    entries = bus.read({}, count=1000)
    assert len(entries) == 40
    order = [tuple(map(int, e.id.split("-"))) for e in entries]
    assert order == sorted(order)  # merged across shards in Redis time order
    positions = {e.shard: e.id for e in entries[:20]}
    rest = bus.read(positions, count=1000)
    assert [e.id for e in rest] == [e.id for e in entries[20:]]


def test_checkpoint_round_trip_lock_and_trim(bus: RedisBus) -> None:
    assert bus.read_checkpoint() is None
    assert bus.try_lock("checkpoint", "me", 5_000)
    assert not bus.try_lock("checkpoint", "other", 5_000)
    assert bus.try_lock("checkpoint", "me", 5_000)  # kept by its holder
    did = "ef" * 16
    bus.publish([("d", "i", did, b"{}")], ttl_ms=60_000)
    entry = bus.read({})[0]
    state = {"format": 1, "model": {"x": [1.5, 2.5]}}
    bus.write_checkpoint(state, {entry.shard: entry.id})
    assert bus.read_checkpoint() == (state, {entry.shard: entry.id})
    bus.trim({entry.shard: entry.id}, keep_ms=60_000)
    assert len(bus.read({})) == 1  # kept: younger than the retention behind the checkpoint


def test_the_shard_count_is_fixed_once_chosen(bus: RedisBus) -> None:
    bus.check_layout()
    other = RedisBus(bus.client, prefix="t", shards=8)
    with pytest.raises(ValueError, match="4 shards"):
        other.check_layout()


def _run_and_kill(code: str, ready: Path) -> None:
    """Run Python code in a child process until it touches `ready`, then SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "child failed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_outbox_items_of_a_killed_process_are_replayed_in_order(tmp_path: Path) -> None:
    folder, ready = tmp_path / "outbox", tmp_path / "ready"
    _run_and_kill(
        f"""
        from pathlib import Path
        from router.replicas.outbox import Item, Outbox
        box = Outbox(Path({str(folder)!r}))
        for n in range(100):
            box.append([Item("d", "dead", f"id{{n}}", b"{{}}")], durable=n == 99)
        Path({str(ready)!r}).touch()
        import time; time.sleep(60)
        """,
        ready,
    )
    dead = set(folder.glob("*.jsonl"))
    live = Outbox(folder)
    try:
        assert live.recover() == 100
        items = [item for _, item in live.peek(1000)]
        assert [i.decision_id for i in items] == [f"id{n}" for n in range(100)]
        live.append([Item("o", "me", "id0", b"dlr-final\0{}")], durable=True)
        seq, _ = live.peek(1000)[-1]
        live.done(seq)
        assert len(live) == 0
        assert dead and not dead & set(folder.glob("*.jsonl"))  # published: journal deleted
    finally:
        live.close()


def test_a_live_process_keeps_its_outbox_and_decision_log_journals(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = f"""
        import time
        from datetime import UTC, datetime
        from pathlib import Path
        from router.log.decision_log import DecisionLog
        from router.replicas.outbox import Item, Outbox
        box = Outbox(Path({str(tmp_path / "outbox")!r}))
        box.append([Item("d", "live", "x", b"{{}}")], durable=True)
        log = DecisionLog(Path({str(tmp_path / "log")!r}), validate=False)
        log.log_outcome({{"decision_id": "x", "at": datetime.now(UTC), "event": "submit",
                         "carrier": "c", "tenant": "t"}})
        Path({str(ready)!r}).touch()
        time.sleep(60)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        box = Outbox(tmp_path / "outbox")
        assert box.recover() == 0  # the live process's journal is not claimed
        box.close()
        DecisionLog(tmp_path / "log", validate=False).close()
        assert list((tmp_path / "log" / "outcomes").glob("open-*.jsonl"))  # left alone
        assert not list((tmp_path / "log" / "outcomes").glob("*.parquet"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    # Now it is dead: the next writer turns its journal into a segment that reads.
    log = DecisionLog(tmp_path / "log", validate=False)
    log.log_decision(
        {
            "decision_id": "y",
            "at": datetime.now(UTC),
            "tenant": "t",
            "message_class": "otp",
            "country": "RU",
            "operator": "mts",
            "local_hour": 1,
            "weekday": 1,
            "segments": 1,
            "sender_type": "alphanumeric",
            "attempt": 1,
            "eligible": ["c"],
            "probabilities": [1.0],
            "scores": [0.0],
            "carrier": "c",
            "propensity": 1.0,
            "fallbacks": [],
            "policy": "p",
            "policy_version": "1",
            "price": 0.01,
            "msisdn_hmac": "h",
        }
    )
    log.close()
    segments = list((tmp_path / "log" / "outcomes").glob("*.parquet"))
    assert len(segments) == 1 and pq.read_table(segments[0]).num_rows == 1
    assert len(list((tmp_path / "log" / DECISIONS).glob("*.parquet"))) == 1
    assert not list((tmp_path / "log" / "outcomes").glob("open-*.jsonl"))


def test_the_bus_works_on_a_redis_cluster(tmp_path: Path) -> None:
    """Three primaries on loopback: scripts, reads, checkpoints each stay in one slot."""
    cluster = LocalCluster(tmp_path)
    try:
        client = connect(cluster.url, timeout=2, cluster=True)
        bus = RedisBus(client, prefix="t", shards=8)
        bus.check_layout()
        ids = [f"{n:032x}" for n in range(60)]
        assert all(bus.publish([("d", "i", did, b"{}") for did in ids], ttl_ms=60_000))
        outcome = [("o", "i", did, b"dlr-final\0{}") for did in ids[:10]]
        assert bus.publish(outcome, ttl_ms=60_000) == [True] * 10
        assert bus.publish(outcome, ttl_ms=60_000) == [False] * 10
        entries = bus.read({}, count=1000)
        assert len(entries) == 70
        nodes = {client.get_node_from_key(bus.stream_key(s)).name for s in range(8)}
        assert len(nodes) > 1  # the shards really are spread over the nodes
        assert bus.try_lock("checkpoint", "me", 5_000)
        bus.write_checkpoint({"x": 1}, {0: entries[0].id})
        assert bus.read_checkpoint() == ({"x": 1}, {0: entries[0].id})
    finally:
        cluster.kill()


def _replica(url: str, folder: Path) -> tuple[SharedState, RoutingEngine]:
    """An in-process replica: engine + shared state (no retention behind checkpoints)."""
    settings = SharedSettings(url=url, checkpoint_seconds=3600, retention_seconds=0)
    shared = SharedState(settings, folder)
    engine = RoutingEngine(
        load_catalog(EXAMPLE_CATALOG),
        load_config(),
        EngineOptions(replica=shared.replica, id_seed=shared.id_seed, max_future_skew_seconds=None),
        log_decision=shared.on_decision,
    )
    shared.start(engine)
    return shared, engine


def test_a_replica_away_past_the_retention_resyncs_from_the_checkpoint(
    redis_server: RedisServer | ExternalRedis, tmp_path: Path
) -> None:
    a, engine_a = _replica(redis_server.url, tmp_path / "a")
    b, engine_b = _replica(redis_server.url, tmp_path / "b")
    try:
        b._stop.set()  # B stops reading: cut off from Redis, as far as A can tell
        for thread in b._threads:
            thread.join(timeout=5)
        t0 = 1_793_606_400.0  # 2026-11-02T08:00Z
        decisions = [engine_a.route(RouteRequest("+79031234567", at=t0)) for _ in range(30)]
        events = [OutcomeEvent(d.decision_id, "dlr", "DELIVRD", at=t0 + 4) for d in decisions]
        assert a.record_outcomes(events) == ["recorded"] * 30
        a.flush()
        deadline = time.monotonic() + 10
        while a.bus.read(a.positions):  # A's reader has caught up with its own entries
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not b.resync_if_missed()  # nothing trimmed yet: B can catch up from the stream
        a.checkpoint()  # trims everything before its positions (retention 0)
        assert b.bus.missed(b.positions)
        assert b.resync_if_missed()
        assert engine_b.stats.learned == engine_a.stats.learned == 30
        assert not b.resync_if_missed()
    finally:
        a.close()
        b.close()


def test_lost_scripts_are_reloaded_and_answers_stay_exact(bus: RedisBus) -> None:
    ids = [f"{n:032x}" for n in range(20)]
    items = [("d", "i", did, b"{}") for did in ids]
    assert bus.publish(items[:10], ttl_ms=60_000) == [True] * 10
    bus.client.script_flush()  # as after a Redis restart, or an operator's SCRIPT FLUSH
    assert bus.publish(items, ttl_ms=60_000) == [False] * 10 + [True] * 10
    assert len(bus.read({}, count=1000)) == 20


def test_an_outcome_journaled_while_redis_was_away_is_logged_once_on_its_verdict(
    redis_server: RedisServer | ExternalRedis, tmp_path: Path
) -> None:
    """Issue 13.1, in process: an outcome accepted while Redis is away is learned at once but
    logged (and counted in spend) only when the flusher hears Redis's verdict; a verdict of
    MINE (this very item recorded before: its publish ran, then a crash or a cut connection)
    writes the row only if the log does not hold it already."""
    from router.log.decision_log import OUTCOME_SCHEMA, OUTCOMES, read_stream
    from router.replicas.redis_bus import MINE, NEW

    folder = tmp_path / "a"
    settings = SharedSettings(url=redis_server.url, checkpoint_seconds=3600)
    shared = SharedState(settings, folder)
    log = DecisionLog(folder / "decision_log", validate=False)
    engine = RoutingEngine(
        load_catalog(EXAMPLE_CATALOG),
        load_config(),
        EngineOptions(replica=shared.replica, id_seed=shared.id_seed, max_future_skew_seconds=None),
        log_decision=shared.on_decision,
        log_outcome=log.log_outcome,
    )
    shared.start(engine)
    try:
        shared._stop.set()  # this test drives the flusher itself
        for thread in shared._threads:
            thread.join(timeout=5)
        shared.flush()
        t0 = 1_793_606_400.0
        decisions = [engine.route(RouteRequest("+79031234567", at=t0)) for _ in range(3)]
        shared.flush()
        shared.up = False  # Redis away, as far as this replica knows
        events = [
            OutcomeEvent(d.decision_id, "dlr", "DELIVRD", cost=0.05, currency="EUR", at=t0 + 4)
            for d in decisions
        ]
        assert shared.record_outcomes(events) == ["recorded"] * 3
        assert engine.stats.learned == 3 and engine.stats.spend == 0
        assert log.roll_all() == []  # no outcome row yet: it waits for the verdict
        items = [item for _, item in shared.outbox.peek(10) if item.kind == "o"]
        assert len(items) == 3 and all(item.row for item in items)
        # Before a crash: items 0 and 1 reached Redis, and item 0's row reached the log.
        shared.up = True
        first = [(i.kind, i.origin, i.decision_id, i.payload) for i in items[:2]]
        assert shared.bus.publish_verdicts(first, 60_000) == [NEW, NEW]
        assert shared.bus.publish_verdicts(first, 60_000) == [MINE, MINE]
        assert shared.bus.publish_verdicts([("o", "other", *first[0][2:])], 60_000) == [0]
        engine.persist_outcome_row(engine.outcome_row(engine.check_outcomes([events[0]])[0]))
        shared.flush()  # verdicts MINE (logged: skipped), MINE (written), NEW (written)
        assert len(shared.outbox) == 0
        log.roll_all()
        table = read_stream(log.directory, OUTCOMES, OUTCOME_SCHEMA)
        assert sorted(table["decision_id"].to_pylist()) == sorted(d.decision_id for d in decisions)
        assert engine.stats.spend == pytest.approx(0.15)
    finally:
        shared.close()
        log.close()

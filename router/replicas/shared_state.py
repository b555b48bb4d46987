"""Replicas that learn as one: each keeps a full local engine and they exchange events on Redis.

Event sourcing: a replica publishes the decisions it makes (asynchronously, from a journaled
outbox) and the outcomes it accepts (a Lua script per decision: idempotency key + stream entry in
one atomic step) to sharded Redis streams; every replica reads all shards in a background thread
and applies the other replicas' events to its own engine. Decisions never wait on Redis. An
outcome is acknowledged once it is in Redis, or, while Redis is away, once it is fsynced in the
local outbox journal (flushed when Redis returns). One replica at a time writes a checkpoint of
the learned state with the stream positions it covers, so a new replica starts from checkpoint +
stream tail, and streams are trimmed only well behind the checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import redis
from prometheus_client import Counter, Gauge, Histogram

from router.contract.errors import (
    IdempotencyInProgress,
    RoutingError,
    SharedStateUnavailable,
    UnknownDecision,
)
from router.contract.messages import OutcomeEvent, RouteDecision, RouteRequest
from router.core.engine import CheckedOutcome, RoutingEngine, outcome_signature
from router.core.idempotency import Claim, conflict, decision_from_dict, decision_to_dict
from router.log.decision_log import OUTCOMES, logged_outcomes
from router.log.snapshot import read_snapshot, write_snapshot
from router.replicas.outbox import Item, Outbox
from router.replicas.redis_bus import MINE, NEW, REPEAT, Entry, RedisBus, connect

log = logging.getLogger(__name__)
_NOT_CONNECTED = "not connected yet"


@dataclass
class SharedSettings:
    """How a replica uses Redis (`router serve --redis-url`, or $REDIS_URL)."""

    url: str
    cluster: bool = False  # a Redis Cluster (url: any of its nodes)
    prefix: str = "router"
    shards: int = 8
    socket_timeout: float = 0.5
    flush_seconds: float = 0.005
    poll_seconds: float = 0.01
    retry_seconds: float = 0.5
    checkpoint_seconds: float = 30.0
    retention_seconds: float = 600.0
    decision_wait_seconds: float = 1.0
    catch_up_seconds: float = 30.0
    key_hold_seconds: float = 10.0  # a route idempotency key held while its decision is made
    unshared_keys: int = 100_000  # keys answered while Redis was away, published on its return


class SharedMetrics:
    """Prometheus series of the shared state, in the engine's registry."""

    def __init__(self, engine: RoutingEngine, state: SharedState) -> None:
        r = engine.metrics.registry
        self.up = Gauge("router_redis_up", "1 while Redis answers, 0 while degraded", registry=r)
        self.buffered = Gauge(
            "router_outbox_items", "Decisions and outcomes waiting to reach Redis", registry=r
        )
        self.buffered.set_function(lambda: len(state.outbox))
        self.lag = Histogram(
            "router_replication_lag_seconds",
            "Time from another replica's event reaching Redis to its use here",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=r,
        )
        self.applied = Counter(
            "router_replicated_events_total", "Other replicas' events applied", ["kind"], registry=r
        )
        self.dropped = Counter(
            "router_replicated_dropped_total",
            "Other replicas' events that could not be applied",
            ["reason"],
            registry=r,
        )
        self.published = Counter(
            "router_published_total", "Items published to Redis", ["kind", "result"], registry=r
        )


class SharedState:
    """This replica's side of the shared state: outbox, flusher, stream reader, checkpoints."""

    def __init__(self, settings: SharedSettings, data_dir: Path) -> None:
        self.settings = s = settings
        self.data_dir = Path(data_dir)
        self.replica, self._slot_fd = claim_replica(self.data_dir)
        self.instance = uuid.uuid4().hex[:16]  # skips its own entries when reading the streams
        self.id_seed = secrets.randbits(64)  # decision ids unique across replicas and restarts
        self.bus = RedisBus(connect(s.url, s.socket_timeout, s.cluster), s.prefix, s.shards)
        self.outbox = Outbox(self.data_dir / "outbox")
        self.snapshot_path = self.data_dir / "replicas" / f"{self.replica}.state.json"
        # where this data folder's outcome rows are logged (router.serving.service's layout)
        self.outcome_log = self.data_dir / "decision_log" / OUTCOMES
        self.positions: dict[int, str] = {}
        self.up = False
        self.reason: str | None = _NOT_CONNECTED
        self._accept = Gate()  # an accepted outcome is published and applied as one step
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_checkpoint = time.monotonic()
        self.engine: RoutingEngine | None = None
        self.metrics: SharedMetrics | None = None
        self._ttl_ms = 0
        self._check_gap = True
        self.lag_seconds = 0.0  # Redis time to applied here, of the last other replica's event
        # route idempotency keys answered while Redis was away: (claim, decision), to publish
        self._unshared: deque[tuple[Claim, RouteDecision]] = deque(maxlen=s.unshared_keys)
        self._unshared_lock = threading.Lock()

    # ---- start and stop --------------------------------------------------------------------

    def start(self, engine: RoutingEngine) -> None:
        """Restore the learned state (checkpoint + stream tail, or the local snapshot while
        Redis is away), replay journals left by dead processes, start the threads."""
        self.engine = engine
        self.metrics = SharedMetrics(engine, self)
        timeouts = [mc.dlr_timeout_seconds for mc in engine.config.message_classes.values()]
        self._ttl_ms = int((max(timeouts) + 3600) * 1000)
        self._restore()
        self.outbox.recover()
        if self.up:
            self._catch_up()
        for name, target in (("flusher", self._flush_loop), ("reader", self._read_loop)):
            thread = threading.Thread(target=target, name=f"shared-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the threads, publish what is left if Redis answers, snapshot locally."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.up:
            try:
                self.flush()
            except redis.RedisError as exc:
                self._down(exc)
        self.write_local_snapshot()
        self.outbox.close()
        self.bus.client.close()
        os.close(self._slot_fd)

    def _restore(self) -> None:
        engine = self._engine
        checkpoint = None
        try:
            self.bus.check_layout()
            self.bus.load_scripts()
            checkpoint = self.bus.read_checkpoint()
            self._mark_up()
        except redis.RedisError as exc:
            self._down(exc)
        local = read_snapshot(self.snapshot_path)
        if checkpoint is not None:
            state, self.positions = checkpoint
            engine.load_state(state)
        elif local is not None and "positions" in local:
            engine.load_state(local["state"])
            self.positions = {int(k): v for k, v in local["positions"].items()}
        log.info("replica %s starts at stream positions %s", self.replica, self.positions)

    def _catch_up(self) -> None:
        """Apply the stream tail before serving (bounded by catch_up_seconds)."""
        deadline = time.monotonic() + self.settings.catch_up_seconds
        try:
            while time.monotonic() < deadline:
                entries = self.bus.read(self.positions, count=2000)
                if not entries:
                    return
                self._apply(entries)
        except redis.RedisError as exc:
            self._down(exc)

    # ---- health ----------------------------------------------------------------------------

    @property
    def _engine(self) -> RoutingEngine:
        if self.engine is None:
            raise RuntimeError("SharedState.start() has not run")
        return self.engine

    def health(self) -> dict[str, Any]:
        """Redis up or not (and why), items waiting to be published, this replica's name and
        how many final answers its learner holds (the same on every replica once settled)."""
        return {
            "redis": "up" if self.up else "down",
            "reason": self.reason,
            "outbox": len(self.outbox),
            "replica": self.replica,
            "learned": self._engine.stats.learned,  # final answers in this replica's learner
            "lag_ms": round(self.lag_seconds * 1000, 1),
            # route idempotency keys: shared by the replicas in Redis, or this replica's only
            "idempotency_keys": "shared" if self.up else "local",
            "idempotency_keys_unpublished": len(self._unshared),  # answered while Redis was away
        }

    def _mark_up(self) -> None:
        if not self.up and self.reason != _NOT_CONNECTED:
            log.warning("Redis answers again: publishing %d buffered item(s)", len(self.outbox))
        self.up, self.reason = True, None
        self._check_gap = True  # away a long time? the streams may have been trimmed meanwhile
        if self.metrics is not None:
            self.metrics.up.set(1)

    def _down(self, exc: Exception) -> None:
        if self.up:
            log.warning("Redis unavailable (%s): serving from the local state, buffering", exc)
        self.up, self.reason = False, f"redis unavailable: {type(exc).__name__}: {exc}"[:300]
        if self.metrics is not None:
            self.metrics.up.set(0)

    def _reconnect(self) -> bool:
        try:
            self.bus.client.ping()
            self.bus.load_scripts()  # a restarted Redis has none: load before publishing
        except redis.RedisError as exc:
            self._down(exc)
            return False
        self._mark_up()
        return True

    # ---- decisions -------------------------------------------------------------------------

    def on_decision(self, row: Mapping[str, Any]) -> None:
        """Queue a decision this replica made (called on the decision path: no Redis here)."""
        payload = orjson.dumps({**row, "origin": self.replica})
        self.outbox.append([Item("d", self.instance, row["decision_id"], payload)])

    def on_action(self, carrier: str, paused: bool, reason: str | None = None) -> None:
        """Queue an operator's pause or resume of a carrier for the other replicas."""
        payload = orjson.dumps({"carrier": carrier, "paused": paused, "reason": reason})
        self.outbox.append([Item("a", self.instance, carrier, payload)], durable=True)

    # ---- idempotent routing ----------------------------------------------------------------

    def route_batch(self, reqs: Sequence[RouteRequest]) -> list[RouteDecision | RoutingError]:
        """Decisions for requests of which some carry an idempotency key, the key shared by all
        replicas: the same key posted to any replica gets the first replica's decision.

        Design. A decision without a key never touches Redis (nothing changes on that path).
        A keyed request that this replica has answered (or seen answered) is served from its
        local keys, also without Redis. Otherwise the key is taken in Redis by one atomic
        script (`SET NX`-like, but aware of event-time expiry) *before* deciding, holding it
        for `key_hold_seconds`; the winner decides locally, logs and publishes its decision as
        usual, then stores the decision's answer itself under the key (owner-checked), with
        a TTL of the class's DLR timeout + 1 h. A replica that finds the key held with an
        answer returns that answer (no stream wait, it needs nothing but the one hash); held
        without one yet (the holder is deciding), it asks again every 10 ms for up to
        `decision_wait_seconds`, then answers 503 `idempotency_in_progress` with Retry-After.
        Taking the key before deciding, instead of deciding first and racing to publish, is
        what makes "one decision per key" hold across replicas: a loser never makes (and logs)
        a decision it must throw away. Keeping the answer in Redis, instead of a decision id
        to look up among the replicated decisions, means no wait on the stream and no
        dependence on the outbox's publishing delay. A holder that dies frees the key after
        `key_hold_seconds`; one that fails to decide (no eligible carrier, ...) gives it back.

        Redis away: local keys only (degraded, as `/healthz` says: `"idempotency_keys":
        "local"`); the keys answered meanwhile are published when Redis returns, unless
        another replica answered the same key in Redis first (its answer stands there).
        """
        engine = self._engine
        out: list[RouteDecision | RoutingError | None] = [None] * len(reqs)
        claims: dict[int, Claim] = {}
        for i, req in enumerate(reqs):
            if req.idempotency_key is None:
                continue
            try:
                claim, known = engine.idempotency_lookup(req)
            except RoutingError as exc:
                out[i] = exc
                continue
            if known is not None:
                out[i] = known
            else:
                claims[i] = claim
        first: dict[tuple[str, str], int] = {}
        for i, claim in claims.items():
            first.setdefault(claim.scope, i)
        holders = {i: uuid.uuid4().hex for i in first.values()}
        held, found = self._take_keys({i: claims[i] for i in first.values()}, holders)
        for i, claim in claims.items():
            j = first[claim.scope]
            if j in found:  # answered by another request (or refused): so is every repeat
                out[i] = self._resolve(claim, found[j])
        routed = [
            i
            for i in range(len(reqs))
            if out[i] is None and (i not in claims or first[claims[i].scope] not in found)
        ]
        # Taken keys (or local-only ones) are decided here; repeats in the batch after their
        # first occurrence find its answer among the engine's local keys.
        for i, answer in zip(routed, engine.route_batch([reqs[i] for i in routed]), strict=True):
            out[i] = answer
        local = [j for j in first.values() if j not in held and j not in found]
        # a repeat decided anew (its first occurrence failed) is published like a local key
        again = set(routed) - set(first.values())
        local += [i for i in again if i in claims and out[i] is not out[first[claims[i].scope]]]
        self._finish_keys(
            [(claims[j], holders[j], out[j]) for j in held], [(claims[j], out[j]) for j in local]
        )
        return [a if a is not None else RoutingError("not routed") for a in out]

    def _take_keys(
        self, claims: dict[int, Claim], holders: dict[int, str]
    ) -> tuple[set[int], dict[int, RoutingError | tuple[Claim, Any]]]:
        """Take the keys in Redis: which ones this replica now holds, and for the others what
        Redis holds (or the error to answer); keys neither held nor found are local-only
        (Redis away)."""
        held: set[int] = set()
        found: dict[int, RoutingError | tuple[Claim, Any]] = {}
        todo = dict(claims)
        hold_ms = int(self.settings.key_hold_seconds * 1000)
        deadline = time.monotonic() + self.settings.decision_wait_seconds
        while todo and self.up:
            items = list(todo.items())
            try:
                answers = self.bus.reserve_keys(
                    [
                        (c.tenant, c.key, c.digest, c.now, c.now + c.lifetime, holders[i])
                        for i, c in items
                    ],
                    hold_ms,
                )
            except redis.RedisError as exc:
                self._down(exc)
                break
            for (i, claim), answer in zip(items, answers, strict=True):
                if answer is None:
                    held.add(i)
                elif answer.digest != claim.digest or answer.decision is not None:
                    found[i] = (claim, answer)
                else:
                    continue  # being decided by its holder: ask again
                del todo[i]
            if not todo:
                break
            if time.monotonic() >= deadline:
                for i in todo:
                    found[i] = IdempotencyInProgress(
                        "a request with this idempotency key is being answered by another "
                        "replica: retry in a moment",
                        field="idempotency_key",
                    )
                break
            time.sleep(0.01)
        return held, found

    def _resolve(
        self, claim: Claim, found: RoutingError | tuple[Claim, Any]
    ) -> RouteDecision | RoutingError:
        """The answer for a request whose key Redis holds for another request or replica."""
        engine = self._engine
        if isinstance(found, RoutingError):
            engine.metrics.rejected.labels(found.code).inc()
            return found
        _, answer = found
        if answer.digest != claim.digest:
            engine.idempotency.requests.labels("conflict").inc()
            engine.metrics.rejected.labels("idempotency_conflict").inc()
            return conflict(claim, answer.expires)
        decision = decision_from_dict(orjson.loads(answer.decision))
        engine.remember_idempotent(claim, decision)  # the next repeat is answered locally
        return decision

    def _finish_keys(
        self,
        held: list[tuple[Claim, str, RouteDecision | RoutingError | None]],
        local: list[tuple[Claim, RouteDecision | RoutingError | None]],
    ) -> None:
        """Store the answers under the keys held (or give back the keys of requests that
        failed); keep the local-only ones to publish when Redis returns."""
        with self._unshared_lock:
            for claim, answer in local:
                if isinstance(answer, RouteDecision):
                    self._unshared.append((claim, answer))
        if not held:
            return
        items = []
        for claim, holder, answer in held:
            if isinstance(answer, RouteDecision):
                body = orjson.dumps(decision_to_dict(answer))
                items.append((claim.tenant, claim.key, holder, body, answer.at + claim.lifetime))
            else:
                items.append((claim.tenant, claim.key, holder, b"", 0.0))
        ttl_ms = self._key_ttl_ms(max(claim.lifetime for claim, _, _ in held))
        try:
            self.bus.finish_keys(items, ttl_ms)
        except redis.RedisError as exc:  # the holds lapse after key_hold_seconds
            self._down(exc)
            with self._unshared_lock:
                for claim, _, answer in held:
                    if isinstance(answer, RouteDecision):
                        self._unshared.append((claim, answer))

    def _publish_unshared_keys(self) -> None:
        """Publish the keys answered while Redis was away (raises RedisError if it fails)."""
        with self._unshared_lock:
            batch = list(self._unshared)
            self._unshared.clear()
        if not batch:
            return
        try:
            stored = self.bus.put_keys(
                [
                    (
                        c.tenant,
                        c.key,
                        c.digest,
                        d.at,
                        d.at + c.lifetime,
                        orjson.dumps(decision_to_dict(d)),
                    )
                    for c, d in batch
                ],
                self._key_ttl_ms(max(c.lifetime for c, _ in batch)),
            )
        except redis.RedisError:
            with self._unshared_lock:
                self._unshared.extendleft(reversed(batch))
            raise
        if len(stored) - sum(stored):
            log.warning(
                "%d idempotency key(s) answered here while Redis was away were answered by "
                "another replica meanwhile (split decisions for those keys)",
                len(stored) - sum(stored),
            )

    @staticmethod
    def _key_ttl_ms(lifetime: float) -> int:
        """Redis TTL of an answered key (wall time): its lifetime + 1 h; expiry proper is in
        event time, checked by the scripts."""
        return int((lifetime + 3600) * 1000)

    # ---- outcomes --------------------------------------------------------------------------

    def record_outcomes(
        self, events: Iterable[OutcomeEvent], tenant: str | None = None
    ) -> list[str]:
        """Accept outcome events: each applied once across all replicas; acknowledged only
        once in Redis or fsynced in the local journal."""
        engine = self._engine
        checked = self._check(list(events), tenant)
        repeats = [engine.is_repeat(c) for c in checked]
        fresh = [i for i, r in enumerate(repeats) if not r]
        with self._accept.shared():
            items = [
                _outcome_item(checked[i], self.instance, engine.outcome_row(checked[i]))
                for i in fresh
            ]
            new, deferred = self._publish_outcomes(items)
            apply = [i for i, r in enumerate(repeats) if r]
            apply += [i for i, n in zip(fresh, new, strict=True) if n]
            apply.sort()
            # Journaled, not yet in Redis: learn now, but log the row and count it only once
            # Redis says it is new across the replicas (the flusher does, see `_settle`).
            applied = engine.apply_outcomes([checked[i] for i in apply], persist=not deferred)
        results = ["duplicate"] * len(checked)
        for i, result in zip(apply, applied, strict=True):
            results[i] = result
        for _ in range(len(checked) - len(apply)):
            engine.metrics.duplicates.inc()  # already accepted by another replica
        return results

    def _check(self, events: list[OutcomeEvent], tenant: str | None) -> list[CheckedOutcome]:
        """Check events; a decision unknown here is looked up in Redis (another replica's,
        maybe not yet read from the streams) and waited for a moment."""
        engine = self._engine
        deadline = time.monotonic() + self.settings.decision_wait_seconds
        ids = {ev.decision_id for ev in events}
        all_published = False
        while True:
            try:
                return engine.check_outcomes(events, tenant)
            except UnknownDecision as exc:
                if not self.up:
                    raise _unreachable(exc) from None
                if all_published:
                    # Found in Redis yet unknown here: another tenant's. Answer no sooner than
                    # for an id that does not exist, so timing does not tell them apart.
                    time.sleep(max(0.0, deadline - time.monotonic()))
                    raise
                if time.monotonic() > deadline:
                    raise
                unknown = exc
            try:
                rows = self.bus.record(ids)
            except redis.RedisError as exc:
                self._down(exc)
                raise _unreachable(unknown) from None
            for row in rows.values():
                self._adopt(row)
            all_published = len(rows) == len(ids)  # then one more check settles it
            if not all_published:
                time.sleep(0.02)

    def _publish_outcomes(self, items: list[Item]) -> tuple[list[bool], bool]:
        """Publish now, in one round trip after their decisions if these are still queued
        here (publishing a decision twice is harmless), or journal durably; per item, whether
        it is new across all replicas (as far as this replica knows: a journaled item counts
        as new here until the flusher hears Redis's verdict), and whether they were journaled
        (deferred: their rows are logged by the flusher, on Redis's verdict)."""
        if not items:
            return [], False
        if self.up:
            own = self.outbox.queued_decisions({i.decision_id for i in items})
            try:
                answers = self.bus.publish(
                    [(i.kind, i.origin, i.decision_id, i.payload) for i in [*own, *items]],
                    self._ttl_ms,
                )
            except redis.RedisError as exc:
                self._down(exc)
            else:
                self._count("d", answers[: len(own)])
                self._count("o", answers[len(own) :])
                return answers[len(own) :], False
        self.outbox.append(items, durable=True)
        return [True] * len(items), True

    # ---- publishing ------------------------------------------------------------------------

    def flush(self) -> None:
        """Publish everything queued, oldest first; raises RedisError if Redis fails."""
        with self._flush_lock:
            while batch := self.outbox.peek(1000):
                verdicts = self.bus.publish_verdicts(
                    [(i.kind, i.origin, i.decision_id, i.payload) for _, i in batch],
                    self._ttl_ms,
                )
                answers = [v == NEW for v in verdicts]
                for kind in ("d", "o", "a"):
                    self._count(
                        kind,
                        [a for (_, i), a in zip(batch, answers, strict=True) if i.kind == kind],
                    )
                self._settle([i for _, i in batch], verdicts)
                self.outbox.done(batch[-1][0])

    def _settle(self, items: list[Item], verdicts: list[int]) -> None:
        """Log the rows of outcomes accepted while Redis was away, now that Redis has judged
        them: written (and counted in outcomes and spend) only if this item is the one Redis
        recorded; another replica's earlier copy means nothing is logged here.

        Design (issue 13): the local row is written only once the shared verdict is known,
        rather than written at once and retracted later. Retraction would leave the Prometheus
        counters (`router_spend_total`, `router_outcomes_total`, which cannot go down) counting
        twice, and would ask every reader of the segments (finalized_view, the cost report,
        evaluation, anything a data scientist writes) to honour retraction records. Deferring
        costs only a delay: while Redis is away the row waits, fsynced, in the outbox journal
        (it is part of the item), and the learner has the event at once.

        MINE (Redis recorded this very item before: its publish ran but the outbox kept it, a
        crash or a cut connection) writes the row unless the log already holds it, so a
        journal replayed after a crash writes each row exactly once."""
        todo = [
            (item, v)
            for item, v in zip(items, verdicts, strict=True)
            if item.kind == "o" and item.row and v != REPEAT
        ]
        if not todo:
            return
        rows = [_row_from_json(item.row) for item, _ in todo]
        mine = {_row_key(r) for (_, v), r in zip(todo, rows, strict=True) if v == MINE}
        logged = logged_outcomes(self.outcome_log, mine) if mine else set()
        for row in rows:
            key = _row_key(row)
            if key in logged:
                continue
            self._engine.persist_outcome_row(row)
            if key in mine:
                logged.add(key)

    def _count(self, kind: str, answers: list[bool]) -> None:
        if self.metrics is not None and answers:
            self.metrics.published.labels(kind, "new").inc(sum(answers))
            self.metrics.published.labels(kind, "repeat").inc(len(answers) - sum(answers))

    def _flush_loop(self) -> None:
        while not self._stop.wait(
            self.settings.flush_seconds if self.up else self.settings.retry_seconds
        ):
            if not self.up and not self._reconnect():
                continue
            try:
                self.flush()
                self.outbox.rotate_if_due()
                if self._unshared:
                    self._publish_unshared_keys()
            except redis.RedisError as exc:
                self._down(exc)
            except Exception:
                log.exception("publishing failed; retrying")

    # ---- reading ---------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            if not self.up:
                self._stop.wait(self.settings.retry_seconds)
                continue
            try:
                if self._check_gap:
                    self.resync_if_missed()
                entries = self.bus.read(self.positions)
                if entries:
                    self._apply(entries)
                if time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_seconds:
                    self.checkpoint()
                    self._check_gap = True
            except redis.RedisError as exc:
                self._down(exc)
                continue
            except Exception:
                log.exception("applying replicated events failed; continuing")
                continue
            if not entries:
                self._stop.wait(self.settings.poll_seconds)

    def _apply(self, entries: list[Entry]) -> None:
        """Apply other replicas' entries in Redis time order; own entries were applied already."""
        metrics = self.metrics
        now_ms = time.time() * 1000
        for entry in entries:
            if entry.origin != self.instance:
                if entry.kind == "d":
                    if self._adopt(entry.payload) and metrics is not None:
                        metrics.applied.labels("decision").inc()
                elif entry.kind == "a":
                    self._apply_action(entry.payload)
                else:
                    self._apply_outcome(entry.payload)
                self.lag_seconds = max(0.0, (now_ms - entry.millis) / 1000)
                if metrics is not None:
                    metrics.lag.observe(self.lag_seconds)
            self.positions[entry.shard] = entry.id

    def _adopt(self, payload: bytes) -> bool:
        try:
            return self._engine.adopt_decision(orjson.loads(payload))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("cannot adopt a replicated decision: %s", exc)
            if self.metrics is not None:
                self.metrics.dropped.labels("bad_decision").inc()
            return False

    def _apply_action(self, payload: bytes) -> None:
        d = orjson.loads(payload)
        try:
            if d["paused"]:
                self._engine.pause(d["carrier"], d["reason"])
            else:
                self._engine.resume(d["carrier"])
        except RoutingError as exc:  # a carrier this replica's catalog lacks
            log.warning("cannot apply a replicated pause/resume: %s", exc)
            if self.metrics is not None:
                self.metrics.dropped.labels("invalid").inc()
            return
        if self.metrics is not None:
            self.metrics.applied.labels("action").inc()

    def _apply_outcome(self, payload: bytes) -> None:
        d = orjson.loads(payload)
        event = OutcomeEvent(
            d["decision_id"],
            d["event"],
            d["status"],
            d["error_code"],
            d["cost"],
            d["currency"],
            d["at"],
            d.get("at_earliest"),
            d.get("at_latest"),
            d.get("source_at"),
            d.get("at_flag"),
        )
        engine = self._engine
        try:
            checked = engine.check_outcomes([event])
        except UnknownDecision:  # its decision's entry not read yet (or lost): its record
            rows = self.bus.record([event.decision_id])
            if not (rows and self._adopt(rows[event.decision_id])):
                if self.metrics is not None:
                    self.metrics.dropped.labels("unknown_decision").inc()
                return
            checked = engine.check_outcomes([event])
        except Exception as exc:
            log.warning("cannot apply a replicated outcome: %s", exc)
            if self.metrics is not None:
                self.metrics.dropped.labels("invalid").inc()
            return
        engine.apply_outcomes(checked, persist=False)
        if self.metrics is not None:
            self.metrics.applied.labels("outcome").inc()

    def resync_if_missed(self) -> bool:
        """If entries this replica had not read were trimmed (it was away longer than the
        retention), restart from the checkpoint under a new instance id, so that its own events
        after the checkpoint come back from the streams like everyone else's."""
        self._check_gap = False
        missed = self.bus.missed(self.positions)
        checkpoint = self.bus.read_checkpoint() if missed else None
        if checkpoint is None:
            return False
        state, positions = checkpoint
        with self._accept.exclusive():
            self._engine.load_state(state)
            self.positions = positions
            self.instance = uuid.uuid4().hex[:16]
        log.warning(
            "shards %s were trimmed past this replica: resynced from the checkpoint", missed
        )
        if self.metrics is not None:
            self.metrics.dropped.labels("resync").inc()
        return True

    # ---- checkpoints -----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Every replica snapshots locally; the one holding the lock also writes the shared
        checkpoint and trims the streams behind it."""
        self._last_checkpoint = time.monotonic()
        state, positions = self._consistent_state()
        write_snapshot(self.snapshot_path, _local_doc(state, positions))
        ttl_ms = int(self.settings.checkpoint_seconds * 3000)
        if self.bus.try_lock("checkpoint", self.instance, ttl_ms):
            size = self.bus.write_checkpoint(state, positions)
            self.bus.trim(positions, int(self.settings.retention_seconds * 1000))
            log.info("checkpoint of %d bytes at %s", size, positions)

    def write_local_snapshot(self) -> None:
        """The local state with the stream positions it covers (used if Redis is away at start)."""
        write_snapshot(self.snapshot_path, _local_doc(*self._consistent_state()))

    def _consistent_state(self) -> tuple[dict[str, Any], dict[int, str]]:
        with self._accept.exclusive():
            return self._engine.state_dict(), dict(self.positions)


class Gate:
    """Outcome accepts pass together; a checkpoint waits until none is between its Redis step
    and its local apply, and holds new ones back while it copies the state."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self._closed = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Pass with others (an outcome accept)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._closed)
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Pass alone (a consistent copy of the state)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._closed)
            self._closed = True
            self._cond.wait_for(lambda: self._inside == 0)
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


def _unreachable(unknown: UnknownDecision) -> SharedStateUnavailable:
    """A 503 instead of a 404 while Redis is away: the decision may be another replica's."""
    return SharedStateUnavailable(
        "decision not known on this replica, and Redis (where the other replicas' decisions "
        "are) is unavailable: retry later",
        field=unknown.field,
    )


def _local_doc(state: dict[str, Any], positions: dict[int, str]) -> dict[str, Any]:
    return {"state": state, "positions": {str(k): v for k, v in positions.items()}}


def _row_from_json(data: bytes) -> dict[str, Any]:
    """A decision-log outcome row from its JSON form in an outbox item."""
    row = orjson.loads(data)
    for name in ("at", "at_source"):
        if row.get(name) is not None:
            row[name] = datetime.fromisoformat(row[name])
    return row


def _row_key(row: Mapping[str, Any]) -> tuple[str, str]:
    """What makes an outcome row one outcome: its decision and its signature."""
    return row["decision_id"], outcome_signature(row["event"], row["status"])


def _outcome_item(checked: CheckedOutcome, origin: str, row: Mapping[str, Any]) -> Item:
    """An accepted outcome as an outbox item: signature (the idempotency key), payload and its
    decision-log row (logged by the flusher if it had to wait for Redis)."""
    flight, ev, at = checked
    body = orjson.dumps(
        {
            "decision_id": ev.decision_id,
            "event": ev.event,
            "status": ev.status,
            "error_code": ev.error_code,
            "cost": ev.cost,
            "currency": ev.currency,
            "at": at,
            "at_earliest": ev.at_earliest,
            "at_latest": ev.at_latest,
            "source_at": ev.source_at,
            "at_flag": ev.at_flag,
        }
    )
    signature = outcome_signature(ev.event, ev.status).encode()
    return Item("o", origin, flight.decision_id, signature + b"\0" + body, orjson.dumps(row))


def claim_replica(data_dir: Path) -> tuple[str, int]:
    """A name for this replica that survives its restarts: the data folder's id and the first
    slot in it that no live process holds (held with flock until the process ends)."""
    folder = data_dir / "replicas"
    folder.mkdir(parents=True, exist_ok=True)
    id_path = folder / "id"
    try:
        fd = os.open(id_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(4))
    except FileExistsError:
        pass
    for _ in range(50):  # the creator may not have written it yet
        folder_id = id_path.read_text().strip()
        if folder_id:
            break
        time.sleep(0.01)
    for slot in range(1024):
        fd = os.open(folder / f"slot-{slot}.lock", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return f"{folder_id}-{slot}", fd
    raise RuntimeError(f"no free replica slot in {folder}")

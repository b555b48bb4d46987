"""Play a world's traffic through a router in event time: in-process (exact) or over HTTP.

The router is anything with the engine's `route_batch` and `record_outcomes` (the engine itself
or `router.contract.client.RouterClient`). The world answers each send with receipts and
conversions at
the times they would arrive; a failure inside the SLA is retried once on another carrier with
`exclude`, as a sender worker would; a retry succeeds only if it arrives within the SLA of the
message's first send. Outcomes are drawn from random numbers keyed by
(message, attempt, carrier), so different policies face the same traffic and the same luck.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from bandit.reward import MessageClass
from experiments.world import Message, World
from router.contract.errors import RoutingError
from router.contract.messages import OutcomeEvent, RouteDecision, RouteRequest
from router.core.engine import RoutingEngine

if TYPE_CHECKING:  # the oracle imports this module's retry timing
    from experiments.oracle import Judge

RETRY_STATUSES = frozenset({"UNDELIV", "REJECTD", "REJECTED"})
RETRY_AFTER_S = 0.5  # a sender retries this long after the failure's answer


class Router(Protocol):
    """What the driver needs of a router."""

    def route_batch(self, reqs: Sequence[RouteRequest]) -> list[RouteDecision | RoutingError]:
        """Route many messages."""

    def record_outcomes(self, events: Sequence[OutcomeEvent]) -> list[str]:
        """Report outcome events."""


@dataclass(frozen=True, slots=True)
class _Send:
    index: int
    msg: Message
    attempt: int
    parent: str | None
    exclude: tuple[str, ...]


class TrafficDriver:
    """Feeds messages and their outcomes to a router in event-time order, batching runs of each."""

    def __init__(
        self,
        router: Router,
        world: World,
        classes: Mapping[str, MessageClass],
        messages: Sequence[tuple[int, Message]],
        seed: int = 0,
        batch_size: int = 1,
        controls: Sequence[tuple[float, Callable[[], None]]] = (),
        judge: Judge | None = None,
    ) -> None:
        self.router = router
        self.judge = judge
        self.world = world
        self.classes = classes
        self.seed = seed
        self.batch_size = batch_size
        self.rows: list[dict[str, Any]] = []
        self.routed = 0
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._sent: dict[str, tuple[_Send, str]] = {}
        for at, apply in controls:
            self._push(at, "control", apply)
        for i, m in messages:
            self._push(m.at, "msg", _Send(i, m, 1, None, ()))

    def _push(self, at: float, kind: str, item: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, item))

    def run_until(self, t_end: float = math.inf) -> None:
        """Process everything due before `t_end`.

        With `batch_size` 1, items go one by one in exact event order. Otherwise each pass takes
        everything due, routes the messages in batches, then reports the outcomes in batches: an
        outcome may then reach the router up to one window after a later decision, which leaves
        the learner's answers exact as long as windows are no longer than the classes' grace.
        """
        while self._heap and self._heap[0][0] < t_end:
            if self.batch_size == 1:
                at, _, kind, item = heapq.heappop(self._heap)
                self._flush(kind, [(at, item)])
                continue
            due: dict[str, list[tuple[float, Any]]] = {"control": [], "msg": [], "outcome": []}
            while self._heap and self._heap[0][0] < t_end:
                at, _, kind, item = heapq.heappop(self._heap)
                due[kind].append((at, item))
            for kind in ("control", "msg", "outcome"):
                items = due[kind]
                for i in range(0, len(items), self.batch_size):
                    self._flush(kind, items[i : i + self.batch_size])

    def _flush(self, kind: str, batch: list[tuple[float, Any]]) -> None:
        if kind == "msg":
            self._route(batch)
        elif kind == "outcome":
            self._report(batch)
        else:
            for _, apply in batch:
                apply()

    def _route(self, batch: list[tuple[float, _Send]]) -> None:
        reqs = [
            RouteRequest(
                s.msg.to,
                s.msg.message_class,
                s.msg.tenant,
                "alphanumeric",
                1,
                s.msg.mccmnc or None,
                s.exclude,
                s.attempt,
                s.parent,
                at,
            )
            for at, s in batch
        ]
        answers = self.router.route_batch(reqs)
        for (at, s), req, answer in zip(batch, reqs, answers, strict=True):
            row = {
                "at": at,
                "index": s.index,
                "attempt": s.attempt,
                "country": s.msg.country,
                "tenant": s.msg.tenant,
                "message_class": s.msg.message_class,
            }
            if isinstance(answer, RoutingError):
                self.rows.append({**row, "carrier": None, "error": answer.code})
                continue
            # One stream per message and attempt, whatever the carrier: see World.send.
            rng = np.random.default_rng([self.seed, s.index, s.attempt])
            msg = Message(
                at, s.msg.to, s.msg.country, s.msg.mccmnc, s.msg.tenant, s.msg.message_class
            )
            operator = answer.context["operator"]
            events, truth = self.world.send(
                answer.carrier, msg, answer.context["local_hour"], rng, operator
            )
            self._sent[answer.decision_id] = (s, answer.carrier)
            sla = self.classes[s.msg.message_class].sla_seconds
            cost = self.world.cost(answer.carrier, msg, operator, events)
            billed_on = (
                self.world.billed_on(answer.carrier)
                if self.world.spec.traffic.report_cost
                else None
            )
            # As the user sees it: a retry's latency counts from the message's first send.
            latency = None if truth.latency_s is None else at - s.msg.at + truth.latency_s
            self.rows.append(
                {
                    **row,
                    "decision_id": answer.decision_id,
                    "carrier": answer.carrier,
                    "propensity": answer.propensity,
                    "error": None,
                    "delivered": truth.delivered,
                    "latency_s": latency,
                    "converted": truth.converted,
                    "success": truth.delivered and (latency or 0.0) <= sla,
                    "operator": operator,
                    "cost": cost,
                    "receipt": next((e.status for e in events if e.event == "dlr"), None),
                    "expected_regret": math.nan
                    if self.judge is None
                    else self.judge(
                        answer, self.classes[req.message_class], req.segments, s.attempt
                    ),
                }
            )
            for ev in events:  # the bill rides on the event the carrier bills on, as reported
                bill = cost if (ev.event, ev.status) == billed_on else None
                self._push(ev.at, "outcome", (answer.decision_id, ev, bill))
            self.routed += 1

    def _report(self, batch: list[tuple[float, Any]]) -> None:
        self.router.record_outcomes(
            [
                OutcomeEvent(did, ev.event, ev.status, cost=bill, at=ev.at)
                for _, (did, ev, bill) in batch
            ]
        )
        for _, (did, ev, _bill) in batch:
            s, carrier = self._sent[did]
            sla = self.classes[s.msg.message_class].sla_seconds
            if (
                self.world.spec.traffic.retry
                and s.attempt == 1
                and ev.status in RETRY_STATUSES
                and ev.at - s.msg.at < sla
            ):
                retry = _Send(s.index, s.msg, 2, did, (carrier,))
                self._push(ev.at + RETRY_AFTER_S, "msg", retry)

    def frame(self) -> pd.DataFrame:
        """One row per routing attempt with its ground truth."""
        return pd.DataFrame(self.rows)


def play(
    engine: RoutingEngine,
    world: World,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    chunk_seconds: float = 60.0,
    judge: Judge | None = None,
) -> pd.DataFrame:
    """Run the scenario through an in-process engine, exactly in event order.

    The scenario's new carriers are paused in the engine until they arrive, and its price
    changes replace the engine's catalog when they take effect. With a `judge`, each attempt
    also gets its luck-free regret.
    """
    messages = world.messages(np.random.default_rng([world.spec.seed, 1]))
    driver = TrafficDriver(
        engine,
        world,
        engine.config.message_classes,
        list(enumerate(messages)),
        seed=seed,
        batch_size=1,
        controls=[(at, _control(engine, world, at, kind, c)) for at, kind, c in world.controls()],
        judge=judge,
    )
    t = world.start
    while t < world.end:
        t += chunk_seconds
        driver.run_until(t)
        if progress is not None:
            progress(driver.routed, len(messages))
    driver.run_until()
    engine.advance(world.end + 48 * 3600)
    return driver.frame()


def _control(
    engine: RoutingEngine, world: World, at: float, kind: str, carrier: str
) -> Callable[[], None]:
    """The action that tells the engine of a scripted change at `at`."""
    if kind == "pause":
        return lambda: engine.pause(carrier, "not launched yet (scenario)")
    if kind == "resume":
        return lambda: engine.resume(carrier)
    return lambda: engine.replace_catalog(world.catalog_at(at))

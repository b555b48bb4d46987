"""Decisions in flight: what is known of each until its receipt, deadline and conversion window."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any

from bandit.model import RouteKey

# Timer kinds, in the order they fall due for one decision.
STALE, DEADLINE, TRUTH, TIMEOUT = "stale", "deadline", "truth", "timeout"


@dataclass(slots=True)
class InFlight:
    """One decision and its outcomes so far; `learner_done` once the learner has its answer."""

    decision_id: str
    at: float
    carrier: str
    tenant: str
    message_class: str
    key: RouteKey
    segments: int
    unit_price: float
    billing_on_delivery: bool
    conversion_tenant: bool
    record: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    learner_done: bool = False
    learner_success: bool | float | None = None  # a share for a coarse receipt time
    pending_counted: bool = False
    final_status: str | None = None
    delivered_at: float | None = None
    converted: bool = False
    truth_done: bool = False
    change_checked: bool = False
    origin: str = ""  # the replica that made the decision ("" on the embedded default)

    def to_state(self) -> dict[str, Any]:
        """JSON-ready form for snapshots: a shallow copy, since the record and the events are
        never changed once written (`asdict`'s deep copy of every record made each snapshot
        stall the router for seconds once 20,000 decisions were kept)."""
        d = {name: getattr(self, name) for name in _FIELDS}
        d["key"] = [self.key.country, self.key.operator, self.key.band]
        d["seen"] = sorted(self.seen)
        d["events"] = list(self.events)
        return d

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> InFlight:
        """Inverse of `to_state`."""
        d = dict(d)
        d["key"] = RouteKey(d["key"][0], d["key"][1], int(d["key"][2]))
        d["seen"] = set(d["seen"])
        return cls(**d)


_FIELDS = tuple(f.name for f in fields(InFlight))


class Timers:
    """A heap of (due event time, kind, decision id); stale entries are skipped when popped."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = 0

    def push(self, due: float, kind: str, decision_id: str) -> None:
        """Schedule `kind` for a decision at event time `due`."""
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, kind, decision_id))

    def pop_due(self, now: float) -> tuple[float, str, str] | None:
        """The next timer due at or before `now`, if any."""
        if self._heap and self._heap[0][0] <= now:
            due, _, kind, did = heapq.heappop(self._heap)
            return due, kind, did
        return None

    def __len__(self) -> int:
        return len(self._heap)


class RecentDecisions:
    """Closed decisions kept for lookups and idempotency, oldest evicted first."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, InFlight] = OrderedDict()

    def add(self, flight: InFlight) -> None:
        """Keep a closed decision."""
        self._items[flight.decision_id] = flight
        self._items.move_to_end(flight.decision_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, decision_id: str) -> InFlight | None:
        """A closed decision, if still remembered."""
        return self._items.get(decision_id)

    def values(self) -> list[InFlight]:
        """All remembered closed decisions, oldest first."""
        return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

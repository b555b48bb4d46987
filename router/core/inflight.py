"""Decisions in flight: what is known of each until its receipt, deadline and conversion window."""

from __future__ import annotations

import heapq
import re
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any

from bandit.model import RouteKey

FINAL_DLR = frozenset({"DELIVRD", "UNDELIV", "EXPIRED", "REJECTD", "DELETED", "UNKNOWN"})
INTERMEDIATE_DLR = frozenset({"ACCEPTD", "ENROUTE"})
DLR_STATUSES = FINAL_DLR | INTERMEDIATE_DLR
# The submit-result vocabulary (`POST /v1/outcomes`, event "submit"): these words mean accepted;
# SMPP command_status names (ESME_R…) or numbers other than 0, and the sender's own failure
# words, mean the submit failed; anything else is refused, so a typo (or a receipt word such as
# ACCEPTD) is never learned as a failed submit. UNCONFIRMED (sent, no answer came: the carrier
# may have it, and the sender does not send it again) counts as accepted: the decision awaits its
# receipt until the deadline, and a carrier billing on submit is billed, since it most likely
# took the message; the word stays in the decision log so finance can count such submits.
SUBMIT_OK = frozenset({"ACCEPTED", "OK", "ESME_ROK", "SUCCESS", "0", "0X00000000", "UNCONFIRMED"})
SUBMIT_FAILURE_WORDS = frozenset(
    {
        "FAILED",
        "ERROR",
        "REJECTED",
        "TIMEOUT",
        "THROTTLED",
        "NO_LINK",
        "NOT_CONNECTED",
        "CONNECTION_LOST",
        "THROUGHPUT_CAP",
        "WINDOW_FULL",
        "CLOSED",
        "GENERIC_NACK",
    }
)
_COMMAND_STATUS = re.compile(r"ESME_R[A-Z0-9_]{1,24}|0X[0-9A-F]{1,8}|[0-9]{1,10}")


def submit_accepted(status: str | None) -> bool | None:
    """True (accepted), False (failed) or None (not a submit status word) for an upper-cased
    submit status; no status means accepted."""
    if status is None or status in SUBMIT_OK:
        return True
    if status in SUBMIT_FAILURE_WORDS or _COMMAND_STATUS.fullmatch(status):
        return False
    return None


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

"""Idempotency keys of `POST /v1/route`: the same key gives the same decision, once.

A sender whose route call timed out (but was served) asks again with the same key and gets the
decision it missed, instead of leaving an orphan decision that the learner would count as a
failure. A key is scoped to the tenant the request routes for and lives, in event time, for the
DLR timeout of the message's class (as long as the decision itself can still get outcomes).

Stored per key (the key itself as a keyed HMAC: a client may put anything in it): a digest of
the request (tenant, class, sender type, segments, mccmnc, exclude, attempt, parent decision,
and the keyed HMAC of the destination: never the number) and the decision's answer (what the
API returns), nothing else. Event time (`at`) is not part of the digest: a retried call is
made later, and it must still find its decision.

The local store here is bounded (the keys expiring first are dropped first beyond capacity) and
goes into the engine's snapshot. Replicas sharing Redis put keys in Redis too: see
`router.replicas.shared_state.SharedState.route_batch` for that design.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from router.contract.errors import IdempotencyConflict
from router.contract.messages import KEY_FIELD

if TYPE_CHECKING:
    from router.contract.messages import RouteDecision

_NOT_DIGITS = re.compile(r"[^0-9+]")


def stored_key(key: str, secret: bytes) -> str:
    """What is stored of a key: its keyed HMAC (a client may put anything in a key, even a
    phone number, and the key is kept in snapshots and in Redis)."""
    return hmac.new(secret, b"idempotency-key\0" + key.encode(), hashlib.sha256).hexdigest()[:32]


def normalized_number(to: str) -> str:
    """The destination as digits with its '+' (spaces, dots, dashes and brackets dropped), so
    the same number written two ways is the same request."""
    return _NOT_DIGITS.sub("", to)


@dataclass(frozen=True, slots=True)
class Claim:
    """A keyed request, checked: whose key (the key as `stored_key`), the request's digest, its
    event time, and how long (event-time seconds) a decision under this key is kept."""

    tenant: str
    key: str
    digest: str
    now: float
    lifetime: float

    @property
    def scope(self) -> tuple[str, str]:
        """Keys are per tenant."""
        return (self.tenant, self.key)


def request_digest(parts: Iterable[Any]) -> str:
    """A 128-bit digest of a request's identifying parts (already free of raw numbers)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\x1f")
    return h.hexdigest()


def decision_to_dict(d: RouteDecision) -> dict[str, Any]:
    """A decision's answer as plain data (event time as epoch seconds, exactly)."""
    return {
        "decision_id": d.decision_id,
        "carrier": d.carrier,
        "fallbacks": list(d.fallbacks),
        "propensity": d.propensity,
        "policy": d.policy,
        "context": dict(d.context),
        "at": d.at,
    }


def decision_from_dict(d: Mapping[str, Any]) -> RouteDecision:
    """Inverse of `decision_to_dict`."""
    from router.contract.messages import RouteDecision

    return RouteDecision(
        str(d["decision_id"]),
        str(d["carrier"]),
        list(d["fallbacks"]),
        float(d["propensity"]),
        str(d["policy"]),
        dict(d["context"]),
        float(d["at"]),
    )


def conflict(claim: Claim, expires: float) -> IdempotencyConflict:
    """The error for a key reused with another request (no request value is echoed)."""
    return IdempotencyConflict(
        "this idempotency key was used for a different request (destination, class, sender "
        "type, segments, mccmnc, exclude, attempt or parent decision differ); use a new key",
        field=KEY_FIELD,
        details={"expires_in_seconds": max(0, round(expires - claim.now))},  # event time
    )


@dataclass(slots=True)
class _Entry:
    digest: str
    decision: RouteDecision
    expires: float


class IdempotencyKeys:
    """Keys this engine has answered, bounded, expiring in event time."""

    def __init__(self, capacity: int = 100_000, registry: CollectorRegistry | None = None) -> None:
        self.capacity = capacity
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._expiry: list[tuple[float, str, str]] = []  # heap: (expires, tenant, key)
        self.requests = Counter(
            "router_idempotent_requests_total",
            "Route requests with an idempotency key: new decision, replayed decision, conflict",
            ["result"],
            registry=registry,
        )
        self.evicted = Counter(
            "router_idempotency_keys_evicted_total",
            "Live idempotency keys dropped because the local store was full",
            registry=registry,
        )

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, claim: Claim, clock: float) -> RouteDecision | None:
        """The decision answered under this key while it lives, or None; a different request
        under a live key is an `IdempotencyConflict`."""
        self.purge(clock)
        entry = self._entries.get(claim.scope)
        if entry is None or max(claim.now, clock) >= entry.expires:
            return None
        if entry.digest != claim.digest:
            self.requests.labels("conflict").inc()
            raise conflict(claim, entry.expires)
        self.requests.labels("replayed").inc()
        return entry.decision

    def put(self, claim: Claim, decision: RouteDecision, new: bool = True) -> None:
        """Remember the decision answered under this key (`new`: this engine just made it)."""
        if new:
            self.requests.labels("new").inc()
        self._store(claim.tenant, claim.key, claim.digest, decision, decision.at + claim.lifetime)

    def _store(
        self, tenant: str, key: str, digest: str, decision: RouteDecision, expires: float
    ) -> None:
        self._entries[(tenant, key)] = _Entry(digest, decision, expires)
        heapq.heappush(self._expiry, (expires, tenant, key))
        while len(self._entries) > self.capacity and self._pop() is not None:
            self.evicted.inc()
        if len(self._expiry) > 2 * max(len(self._entries), 1024):
            self._compact()

    def _pop(self) -> tuple[str, str] | None:
        """Drop the entry expiring first (skipping stale heap items)."""
        while self._expiry:
            expires, tenant, key = heapq.heappop(self._expiry)
            entry = self._entries.get((tenant, key))
            if entry is not None and entry.expires == expires:
                del self._entries[(tenant, key)]
                return (tenant, key)
        return None

    def _compact(self) -> None:
        self._expiry = [(e.expires, t, k) for (t, k), e in self._entries.items()]
        heapq.heapify(self._expiry)

    def purge(self, clock: float) -> None:
        """Forget the keys whose time has passed (event time)."""
        while self._expiry and self._expiry[0][0] <= clock:
            expires, tenant, key = heapq.heappop(self._expiry)
            entry = self._entries.get((tenant, key))
            if entry is not None and entry.expires == expires:
                del self._entries[(tenant, key)]

    def state(self, limit: int = 20_000) -> list[list[Any]]:
        """The live keys expiring last (at most `limit`), for the engine's snapshot."""
        newest = heapq.nlargest(limit, self._entries.items(), key=lambda kv: kv[1].expires)
        return [[t, k, e.digest, e.expires, decision_to_dict(e.decision)] for (t, k), e in newest]

    def load(self, rows: Iterable[list[Any]], clock: float) -> None:
        """Restore `state()` (replacing what is held)."""
        self._entries.clear()
        self._expiry.clear()
        for tenant, key, digest, expires, decision in rows:
            if float(expires) > clock:
                self._store(tenant, key, digest, decision_from_dict(decision), float(expires))

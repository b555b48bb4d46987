"""Which carriers may take a message: coverage, tenant permissions, sender type, pause, capacity."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from carriers.catalog import Carrier, Catalog, Tenant

if TYPE_CHECKING:
    from router.replicas.capacity import SharedCaps

_StaticKey = tuple[str, str, str, str, tuple[str, ...]]


@dataclass
class TokenBucket:
    """A carrier's throughput cap in event time: `rate` parts per second, one second of burst."""

    rate: float
    tokens: float = -1.0
    t: float = 0.0

    def available(self, now: float) -> float:
        """Parts that may be sent at `now`."""
        if self.tokens < 0:
            return self.rate
        return min(self.rate, self.tokens + max(0.0, now - self.t) * self.rate)

    def take(self, now: float, parts: float) -> None:
        """Spend `parts` at `now`."""
        self.tokens = self.available(now) - parts
        self.t = max(self.t, now)


@dataclass
class Eligibility:
    """Filters the catalog's carriers for one message and says why each one was left out.

    What depends only on the catalog and the request (coverage, permissions, sender type,
    exclusions) is cached per context; pauses and capacity are checked for every message.
    Capacity is this process's event-time bucket per carrier, or, with replicas on Redis
    (`shared_caps`), the cluster's budget: tokens leased from Redis, spent here.
    """

    catalog: Catalog
    paused: dict[str, str] = field(default_factory=dict)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    shared_caps: SharedCaps | None = None
    _static: dict[_StaticKey, tuple[list[Carrier], dict[str, str]]] = field(
        default_factory=dict, repr=False
    )

    @staticmethod
    def static_reason(
        carrier: Carrier,
        tenant: Tenant,
        country: str,
        operator: str,
        sender_type: str,
        exclude: Collection[str],
    ) -> str | None:
        """Why `carrier` can never take such a message, or None."""
        if carrier.id in exclude:
            return "excluded by the request"
        cov = carrier.coverage.get(country)
        if cov is None:
            return f"no coverage for {country}"
        if not cov.covers(operator):
            return f"no coverage for operator {operator} in {country}"
        if not tenant.may_use(carrier.id):
            return f"tenant {tenant.id} may not use this carrier"
        if sender_type not in carrier.sender_types:
            return f"sender type {sender_type} not supported"
        return None

    def live_reason(self, carrier: Carrier, segments: int, now: float) -> str | None:
        """Why `carrier` cannot take a message right now (paused, at capacity), or None."""
        if carrier.id in self.paused:
            return f"paused: {self.paused[carrier.id]}"
        if self.shared_caps is not None and carrier.throughput_mps is not None:
            if self.shared_caps.can_send(carrier, segments):
                return None
            return f"at capacity ({carrier.throughput_mps:g} parts/s across all replicas)"
        bucket = self.bucket(carrier)
        if bucket is not None and bucket.available(now) < segments:
            return f"at capacity ({carrier.throughput_mps:g} parts/s)"
        return None

    def _static_split(
        self,
        tenant: Tenant,
        country: str,
        operator: str,
        sender_type: str,
        exclude: Collection[str],
    ) -> tuple[list[Carrier], dict[str, str]]:
        key = (tenant.id, country, operator, sender_type, tuple(exclude))
        cached = self._static.get(key)
        if cached is None:
            ok: list[Carrier] = []
            why: dict[str, str] = {}
            for carrier in self.catalog.carriers.values():
                reason = self.static_reason(
                    carrier, tenant, country, operator, sender_type, exclude
                )
                if reason is None:
                    ok.append(carrier)
                else:
                    why[carrier.id] = reason
            if len(self._static) > 100_000:
                self._static.clear()
            cached = self._static[key] = (ok, why)
        return cached

    def eligible(
        self,
        tenant: Tenant,
        country: str,
        operator: str,
        sender_type: str,
        segments: int,
        now: float,
        exclude: Collection[str] = (),
    ) -> tuple[list[Carrier], dict[str, str]]:
        """(eligible carriers in catalog order, {carrier: reason} for the others)."""
        static_ok, static_why = self._static_split(tenant, country, operator, sender_type, exclude)
        ok: list[Carrier] = []
        why = static_why
        for carrier in static_ok:
            reason = self.live_reason(carrier, segments, now)
            if reason is None:
                ok.append(carrier)
            else:
                if why is static_why:
                    why = dict(static_why)
                why[carrier.id] = reason
        if len(ok) < len(static_ok) or why is not static_why:
            order = list(self.catalog.carriers)
            why = dict(sorted(why.items(), key=lambda kv: order.index(kv[0])))
        return ok, why

    def bucket(self, carrier: Carrier) -> TokenBucket | None:
        """The carrier's throughput bucket (None when uncapped)."""
        if carrier.throughput_mps is None:
            return None
        b = self.buckets.get(carrier.id)
        if b is None or b.rate != carrier.throughput_mps:
            b = self.buckets[carrier.id] = TokenBucket(carrier.throughput_mps)
        return b

    def consume(self, carrier: Carrier, segments: int, now: float) -> None:
        """Account a sent message against the carrier's cap."""
        if self.shared_caps is not None and carrier.throughput_mps is not None:
            self.shared_caps.take(carrier, segments)
            return
        b = self.bucket(carrier)
        if b is not None:
            b.take(now, segments)

"""Which carriers may take a message: coverage, tenant permissions, sender type, pause, capacity."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from carriers.catalog import Carrier, Catalog, Tenant


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
    """Filters the catalog's carriers for one message and says why each one was left out."""

    catalog: Catalog
    paused: dict[str, str] = field(default_factory=dict)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def reasons(
        self,
        carrier: Carrier,
        tenant: Tenant,
        country: str,
        operator: str,
        sender_type: str,
        segments: int,
        now: float,
        exclude: Collection[str],
    ) -> str | None:
        """Why `carrier` cannot take the message, or None if it can."""
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
        if carrier.id in self.paused:
            return f"paused: {self.paused[carrier.id]}"
        bucket = self.bucket(carrier)
        if bucket is not None and bucket.available(now) < segments:
            return f"at capacity ({carrier.throughput_mps:g} parts/s)"
        return None

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
        ok: list[Carrier] = []
        why: dict[str, str] = {}
        for carrier in self.catalog.carriers.values():
            reason = self.reasons(
                carrier, tenant, country, operator, sender_type, segments, now, exclude
            )
            if reason is None:
                ok.append(carrier)
            else:
                why[carrier.id] = reason
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
        b = self.bucket(carrier)
        if b is not None:
            b.take(now, segments)

    def state(self) -> Mapping[str, str]:
        """Paused carriers and their reasons (for snapshots)."""
        return dict(self.paused)

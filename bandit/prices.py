"""Observed unit prices: what each carrier really bills, learned from the cost that outcome
events report, with the catalog's price as the prior.

A carrier may raise a price without the catalog knowing (a rate notice that nobody entered);
the billed cost on the outcome events says so first. The model keeps, per carrier × country
and per carrier × country × operator, the event-time-discounted sum of (billed − catalog) per
segment and its weight, and prices a route at catalog + the shrunk mean deviation: the operator
level shrinks towards its country, the country towards zero (the catalog), each with
`prior_weight` pseudo-observations. While every bill matches the catalog the estimate is the
catalog price exactly, so nothing changes where the catalog is right.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bandit.stats import Decayed

Key = tuple[str, ...]  # (carrier, country) or (carrier, country, operator)


@dataclass
class PriceModel:
    """Learned deviations of billed unit prices from the catalog's (see the module docstring)."""

    half_life_seconds: float = 3 * 3600.0
    prior_weight: float = 3.0  # the catalog counts as this many bills
    sums_: dict[Key, list[float]] = field(default_factory=dict)

    def observe(
        self, carrier: str, country: str, operator: str, billed: float, catalog: float, at: float
    ) -> None:
        """One bill: `billed` per segment where the catalog said `catalog`, at event time `at`."""
        deviation = billed - catalog
        for key in ((carrier, country), (carrier, country, operator)):
            sums = self.sums_.get(key)
            if sums is None:
                sums = self.sums_[key] = Decayed.new(at)
            Decayed.add(sums, at, self.half_life_seconds, deviation, None)

    def deviation(self, carrier: str, country: str, operator: str, now: float) -> float:
        """The shrunk mean deviation of the route's unit price from the catalog (0.0 exactly
        while every bill matched)."""
        w = self.prior_weight
        s, n = Decayed.read(self.sums_.get((carrier, country)), now, self.half_life_seconds)
        if n == 0.0:
            return 0.0
        country_dev = s / (n + w)
        s, n = Decayed.read(
            self.sums_.get((carrier, country, operator)), now, self.half_life_seconds
        )
        return (s + w * country_dev) / (n + w)

    def price(self, carrier: str, country: str, operator: str, catalog: float, now: float) -> float:
        """The unit price to decide on: the catalog's, moved by what the bills showed."""
        deviation = self.deviation(carrier, country, operator, now)
        return catalog if deviation == 0.0 else max(0.0, catalog + deviation)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (keys joined with '|')."""
        return {"|".join(k): list(v) for k, v in self.sums_.items()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], half_life_seconds: float) -> PriceModel:
        """A model from `state_dict()`."""
        model = cls(half_life_seconds=half_life_seconds)
        model.sums_ = {tuple(k.split("|")): list(v) for k, v in state.items()}
        return model

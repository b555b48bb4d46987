"""The oracle: a policy that knows the simulated world's true parameters at every event time.

It picks the eligible carrier with the best true expected utility (value·P(delivered within the
SLA) − expected cost − expected latency penalty) and runs through the engine's own decision path,
so its decisions and propensities are logged like any other policy's. Its utility is the
benchmark regret is measured against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bandit.model import CarrierModel
from bandit.policies import Arm, DecisionContext, Policy
from bandit.reward import MessageClass
from experiments.world import RouteSpec, World
from router.engine import RoutingEngine

NIGHT_END_HOUR = 6  # the world's night drop applies before 06:00 local time


def lognormal_cdf(x: float, median: float, sigma: float) -> float:
    """P(L ≤ x) for L = median·exp(sigma·Z)."""
    if sigma == 0:
        return float(median <= x)
    return 0.5 * (1 + math.erf(math.log(x / median) / (sigma * math.sqrt(2))))


def expected_capped_latency(cap: float, median: float, sigma: float) -> float:
    """E[min(L, cap)] for the lognormal latency L."""
    if sigma == 0:
        return min(median, cap)
    mu = math.log(median)
    below = math.exp(mu + sigma**2 / 2) * lognormal_cdf(cap, median * math.exp(sigma**2), sigma)
    return below + cap * (1 - lognormal_cdf(cap, median, sigma))


def true_utility(
    route: RouteSpec, price: float, billing_on_delivery: bool, mc: MessageClass, night: bool
) -> float:
    """Expected true utility of one message part on a route with these true parameters."""
    accepted = 1 - route.submit_reject
    deliver = route.deliver * ((1 - route.night_drop) if night else 1.0)
    receipt = deliver * (1 - route.no_dlr) + (1 - deliver) * route.fake_dlr
    billed = accepted * (receipt if billing_on_delivery else 1.0)
    p_sla = lognormal_cdf(mc.sla_seconds, route.latency_median_s, route.latency_sigma)
    latency = expected_capped_latency(mc.sla_seconds, route.latency_median_s, route.latency_sigma)
    delivered = accepted * deliver
    return (
        mc.value * delivered * p_sla
        - price * billed
        - mc.latency_penalty_per_second * latency * delivered
    )


class Oracle(Policy):
    """One-hot π on the eligible carrier with the best true expected utility."""

    name = "oracle"

    def __init__(
        self, model: CarrierModel, world: World, seed: int | None = None, cache_seconds: float = 1.0
    ) -> None:
        super().__init__(model, seed, 0.0, cache_seconds)
        if NIGHT_END_HOUR % model.config.band_hours:
            raise ValueError("the oracle needs band_hours dividing 6 to know local night")
        self.world = world

    def params(self) -> dict[str, Any]:
        """The oracle's parameters: the scenario it knows."""
        return {"scenario": self.world.spec.name, "cache_seconds": self.cache_seconds}

    def utilities(self, ctx: DecisionContext, arms: Sequence[Arm]) -> np.ndarray:
        """True expected utility of each arm for this message."""
        key = ctx.key
        night = (key.band + 1) * self.model.config.band_hours <= NIGHT_END_HOUR
        return np.array(
            [
                true_utility(
                    self.world.route(a.carrier, key.country, ctx.at),
                    self.world.price(a.carrier, key.country, key.operator, ctx.at) * ctx.segments,
                    a.billing_on_delivery,
                    ctx.message_class,
                    night,
                )
                for a in arms
            ]
        )

    def _probabilities(self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery):
        return np.eye(len(arms))[int(np.argmax(self.utilities(ctx, arms)))]


def use_oracle(engine: RoutingEngine, world: World, seed: int | None = None) -> Oracle:
    """Make an engine serve the oracle (through its usual decision code) and return it."""
    oracle = Oracle(engine.model, world, seed=seed)
    engine.policy = oracle
    return oracle

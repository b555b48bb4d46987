"""The oracle: a policy that knows the simulated world's true parameters at every event time.

It picks the eligible carrier with the best true expected utility (value·P(delivered within the
SLA) − expected cost − expected latency penalty, plus for a first attempt the retry on the best
other carrier after a failure answered inside the SLA) and runs through the engine's own
decision path, so its decisions and propensities are logged like any other policy's. Its
utility is the benchmark regret is measured against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bandit.model import CarrierModel, ModelConfig, RouteKey
from bandit.policies import Arm, DecisionContext, Policy
from bandit.reward import MessageClass
from experiments.play import RETRY_AFTER_S
from experiments.world import (
    REJECT_AFTER_S,
    UNDELIV_DELAY_S,
    RouteSpec,
    World,
)
from router.contract.messages import RouteDecision
from router.core.engine import RoutingEngine

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


def delivery_rate(route: RouteSpec, night: bool) -> float:
    """P(a message on this route reaches the handset), with the route's losses at local night."""
    return route.deliver * ((1 - route.night_drop) if night else 1.0)


def true_utility(
    route: RouteSpec,
    price: float,
    billing_on_delivery: bool,
    mc: MessageClass,
    night: bool,
    waited: float = 0.0,
) -> float:
    """Expected true utility of one message part on a route with these true parameters.

    `waited` is the time since the message's first send: a retry has that much less of its
    SLA left, and its latency, as the user sees it, starts that much later.
    """
    accepted = 1 - route.submit_reject
    deliver = delivery_rate(route, night)
    receipt = deliver * (1 - route.no_dlr) + (1 - deliver) * route.fake_dlr
    billed = accepted * (receipt if billing_on_delivery else 1.0)
    left = mc.sla_seconds - waited
    median, sigma = route.latency_median_s, route.latency_sigma
    p_sla = lognormal_cdf(left, median, sigma) if left > 0 else 0.0
    latency = waited + expected_capped_latency(left, median, sigma) if left > 0 else mc.sla_seconds
    delivered = accepted * deliver
    return (
        mc.value * delivered * p_sla
        - price * billed
        - mc.latency_penalty_per_second * latency * delivered
    )


def retry_waits(
    route: RouteSpec, mc: MessageClass, night: bool, points: int = 4
) -> list[tuple[float, float]]:
    """(probability, time since the first send when the retry goes out) for each way a message
    on this route fails with an answer inside the SLA: a rejected submit, or an UNDELIV receipt
    (its uniform delay taken at `points` midpoints)."""
    out = [(route.submit_reject, REJECT_AFTER_S + RETRY_AFTER_S)]
    lo, hi = UNDELIV_DELAY_S
    top = min(hi, mc.sla_seconds)
    if top > lo:
        undeliv = (
            (1 - delivery_rate(route, night))
            * (1 - route.fake_dlr)
            * (1 - route.no_dlr)
            * route.undeliv_share
        )
        p = (1 - route.submit_reject) * undeliv * (top - lo) / (hi - lo) / points
        out += [(p, lo + (top - lo) * (k + 0.5) / points + RETRY_AFTER_S) for k in range(points)]
    return out


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
        """True expected utility of each arm for this message, counting for a first attempt
        the retry on the best other arm after a failure answered inside the SLA."""
        key = ctx.key
        night = (key.band + 1) * self.model.config.band_hours <= NIGHT_END_HOUR
        mc = ctx.message_class
        routes = [self.world.route(a.carrier, key.country, ctx.at, key.operator) for a in arms]
        prices = [
            self.world.price(a.carrier, key.country, key.operator, ctx.at) * ctx.segments
            for a in arms
        ]

        def utility(i: int, waited: float = 0.0) -> float:
            return true_utility(
                routes[i], prices[i], arms[i].billing_on_delivery, mc, night, waited
            )

        base = np.array([utility(i) for i in range(len(arms))])
        if ctx.attempt > 1 or not self.world.spec.traffic.retry or len(arms) < 2:
            return base
        out = base.copy()
        for i, route in enumerate(routes):
            fallback = max((j for j in range(len(arms)) if j != i), key=lambda j: base[j])
            out[i] += sum(
                p * utility(fallback, waited) for p, waited in retry_waits(route, mc, night) if p
            )
        return out

    def _probabilities(
        self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
    ):
        return np.eye(len(arms))[int(np.argmax(self.utilities(ctx, arms)))]


def use_oracle(engine: RoutingEngine, world: World, seed: int | None = None) -> Oracle:
    """Make an engine serve the oracle (through its usual decision code) and return it."""
    oracle = Oracle(engine.model, world, seed=seed)
    engine.policy = oracle
    return oracle


class Judge:
    """Luck-free (expected) regret of each decision: the best true expected utility among the
    carriers the router could have chosen, minus that of the one it chose, in the decision's
    own context, by the oracle's utilities (so 0 for the oracle's own choices).

    Realized utility carries the outcomes' luck: two policies that pick different carriers for
    a message face different draws, so near-ties between good routes leave differences within
    noise. This measure has none of that luck; it is the bandit literature's pseudo-regret.
    """

    def __init__(self, world: World, band_hours: int) -> None:
        self.oracle = Oracle(CarrierModel(ModelConfig(band_hours=band_hours)), world)
        self.world = world
        self._cache: dict[tuple[Any, ...], dict[str, float]] = {}

    def __call__(
        self, decision: RouteDecision, mc: MessageClass, segments: int, attempt: int
    ) -> float:
        """Expected regret of `decision` (its carrier and fallbacks are the eligible set)."""
        carriers = (decision.carrier, *decision.fallbacks)
        band = int(decision.context["local_hour"]) // self.oracle.model.config.band_hours
        key = RouteKey(decision.context["country"], decision.context["operator"], band)
        minute = (decision.at - self.world.start) / 60
        phase = tuple(i for i, ev in enumerate(self.world.spec.events) if ev.active(minute))
        memo = (key, mc.name, segments, attempt > 1, tuple(sorted(carriers)), phase)
        utility = self._cache.get(memo)
        if utility is None:
            arms = [self._arm(c) for c in memo[4]]
            ctx = DecisionContext(key, mc, segments, decision.at, attempt)
            utility = dict(zip(memo[4], self.oracle.utilities(ctx, arms).tolist(), strict=True))
            self._cache[memo] = utility
        return max(utility.values()) - utility[decision.carrier]

    def _arm(self, carrier: str) -> Arm:
        """The oracle prices arms from the world itself; only the billing basis is needed."""
        return Arm(carrier, 0.0, self.world.catalog.carriers[carrier].bills_on_delivery)

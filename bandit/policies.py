"""Routing policies: each gives π(·|x) over the eligible carriers, then the engine draws from it.

The learner is Thompson sampling on the expected utility of a message; the baselines (static
priority, cheapest, round-robin, uniform, epsilon-greedy) share its interface so they can serve,
be simulated and evaluated offline the same way. A new policy is a subclass with `_probabilities`.
"""

from __future__ import annotations

import bisect
import hashlib
import inspect
import itertools
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from bandit.cost_subsidy import cheapest_feasible
from bandit.model import CarrierModel, RouteKey
from bandit.reward import MessageClass


@dataclass(frozen=True, slots=True)
class Arm:
    """An eligible carrier as the policy sees it: price and billing basis for this message."""

    carrier: str
    unit_price: float
    billing_on_delivery: bool = False
    priority: int = 100


@dataclass(frozen=True, slots=True)
class DecisionContext:
    """The context of one message."""

    key: RouteKey
    message_class: MessageClass
    segments: int
    at: float
    attempt: int = 1


@dataclass(frozen=True)
class Distribution:
    """π over the arms (sums to 1) and each arm's expected utility under the model's means.

    Lists for the decision record, the cumulative sums for drawing and the arms' rank order
    are computed once, so a cached π costs nothing more per decision.
    """

    probabilities: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        probs = [float(p) for p in self.probabilities]
        object.__setattr__(self, "probability_list", probs)
        object.__setattr__(self, "score_list", [float(s) for s in self.scores])
        object.__setattr__(self, "cumulative", list(itertools.accumulate(probs)))
        order = np.lexsort((-self.scores, -self.probabilities))
        object.__setattr__(self, "rank", [int(i) for i in order])

    probability_list: list[float] = field(init=False, repr=False)
    score_list: list[float] = field(init=False, repr=False)
    cumulative: list[float] = field(init=False, repr=False)
    rank: list[int] = field(init=False, repr=False)


def expected_utility(
    p: np.ndarray,
    ratio: np.ndarray,
    latency_s: np.ndarray,
    price: np.ndarray,
    on_delivery: np.ndarray,
    mc: MessageClass,
) -> np.ndarray:
    """value·P(success) − expected cost − latency penalty, for success probabilities `p`.

    `p` may be a (samples × arms) matrix of Thompson draws or a vector of means; `price` is the
    price of the whole message per arm. Receipts are discounted by the carrier's truth ratio; a
    carrier billing on delivery is paid on receipts.
    """
    cost = price * np.where(on_delivery, p, 1.0)
    penalty = mc.latency_penalty_per_second * np.minimum(latency_s, mc.sla_seconds) * p
    return mc.value * p * ratio - cost - penalty


def best_other(utility: np.ndarray) -> np.ndarray:
    """For each arm, the best utility among the *other* arms (along the last axis)."""
    if utility.shape[-1] < 2:
        return np.zeros_like(utility)
    top = np.partition(utility, -2, axis=-1)
    first, second = top[..., -1:], top[..., -2:-1]
    return np.where(utility >= first, second, first)


def with_retry(utility: np.ndarray, p_retry: np.ndarray) -> np.ndarray:
    """Utility of a first attempt counting the retry a sender makes after a failure answered
    inside the SLA: u(a) + P(retry | a) · max over the other arms b of u(b).

    A carrier that fails fast and loudly leaves time for a fallback that still succeeds; one
    that fails silently wastes the whole SLA. `p_retry` broadcasts against `utility`.
    """
    return utility + p_retry * best_other(utility)


def arm_prices(arms: Sequence[Arm], segments: int) -> tuple[np.ndarray, np.ndarray]:
    """(price of the message, bills-on-delivery flag) per arm."""
    price = np.fromiter((a.unit_price for a in arms), float, len(arms)) * segments
    return price, np.fromiter((a.billing_on_delivery for a in arms), bool, len(arms))


def sample_beta(
    alpha: np.ndarray, beta: np.ndarray, n: int, rng: np.random.Generator, exact_below: float = 10.0
) -> np.ndarray:
    """(n × arms) posterior draws: exact Beta for thin posteriors, Normal for concentrated ones.

    numpy's Beta sampler costs ~100 ns a draw; once α and β both exceed `exact_below` the Beta is
    close to its Normal approximation, which is ten times cheaper.
    """
    total = alpha + beta
    mean = alpha / total
    sd = np.sqrt(alpha * beta / (total * total * (total + 1.0)))
    p = mean + sd * rng.standard_normal((n, len(alpha)))
    thin = np.minimum(alpha, beta) < exact_below
    if thin.any():
        p[:, thin] = rng.beta(alpha[thin], beta[thin], size=(n, int(thin.sum())))
    return np.clip(p, 0.0, 1.0, out=p)


def draw(dist: Distribution, rng: np.random.Generator) -> int:
    """Index drawn from π: the logged propensity is exactly dist.probabilities[index]."""
    cum = dist.cumulative
    return bisect.bisect_right(cum, rng.random() * cum[-1])  # < cum[-1]: never a zero-mass arm


def draw_many(probabilities: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` independent draws from the same distribution (a batch sharing one context)."""
    idx = np.searchsorted(np.cumsum(probabilities), rng.random(n), side="right")
    return np.minimum(idx, len(probabilities) - 1)


def fallback_order(dist: Distribution, chosen: int) -> list[int]:
    """The other arms, most probable first, ties broken by expected utility."""
    return [i for i in dist.rank if i != chosen]


class Policy(ABC):
    """Base class: parameters in `__init__`, learned state in the shared `CarrierModel`.

    π is recomputed at most every `cache_seconds` of event time per context; the carrier is
    then drawn from π, so the propensity is exact whatever π's own sampling error.
    """

    name: ClassVar[str]
    probes: ClassVar[bool] = False  # learners probe routes whose rate dropped; baselines do not

    def __init__(
        self,
        model: CarrierModel,
        seed: int | None = None,
        exploration_floor: float = 0.0,
        cache_seconds: float = 1.0,
        retries: int = 0,
    ) -> None:
        if not 0.0 <= exploration_floor < 1.0:
            raise ValueError("exploration_floor must be in [0, 1)")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.retries = retries
        self.model = model
        self.seed = seed
        self.exploration_floor = exploration_floor
        self.cache_seconds = cache_seconds
        self.rng = np.random.default_rng(seed)
        self._cache: dict[tuple[Any, ...], tuple[float, Distribution]] = {}

    def distribution(self, ctx: DecisionContext, arms: Sequence[Arm]) -> Distribution:
        """π(·|x) over `arms`, from the cache when it is fresh in event time."""
        if not arms:
            raise ValueError("no arms to choose from")
        if self.cache_seconds <= 0:
            return self._distribution(ctx, arms)
        key = (ctx.key, ctx.message_class.name, ctx.segments, ctx.attempt, tuple(arms))
        hit = self._cache.get(key)
        if hit is not None and 0.0 <= ctx.at - hit[0] < self.cache_seconds:
            return hit[1]
        dist = self._distribution(ctx, arms)
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[key] = (ctx.at, dist)
        return dist

    def _distribution(self, ctx: DecisionContext, arms: Sequence[Arm]) -> Distribution:
        """π(·|x) computed afresh, with probes and the exploration floor mixed in."""
        carriers = [a.carrier for a in arms]
        alpha, beta, ratio, latency = self.model.estimates(carriers, ctx.key, ctx.at)
        price, on_delivery = arm_prices(arms, ctx.segments)
        mean = alpha / (alpha + beta)
        scores = expected_utility(mean, ratio, latency, price, on_delivery, ctx.message_class)
        if ctx.attempt <= self.retries and len(arms) > 1:
            quick = self.model.quick_shares(carriers, ctx.key.country, ctx.at)
            scores = with_retry(scores, (1.0 - mean) * quick)
        else:
            quick = np.zeros(len(arms))
        probs = self._probabilities(
            ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
        )
        if len(arms) > 1:
            if self.probes:
                probe = self.model.probe_shares(carriers, ctx.key.country, ctx.at)
                if probe.any():
                    probs = (1.0 - probe.sum()) * probs + probe
            if self.exploration_floor > 0:
                probs = (1.0 - self.exploration_floor) * probs + self.exploration_floor / len(arms)
        return Distribution(probs / probs.sum(), scores)

    @abstractmethod
    def _probabilities(
        self,
        ctx: DecisionContext,
        arms: Sequence[Arm],
        scores: np.ndarray,
        alpha: np.ndarray,
        beta: np.ndarray,
        ratio: np.ndarray,
        latency: np.ndarray,
        price: np.ndarray,
        on_delivery: np.ndarray,
        quick: np.ndarray,
    ) -> np.ndarray:
        """π before the exploration floor; `quick` is each arm's share of failures answered
        inside the SLA when this attempt may still be retried, else zeros."""

    def params(self) -> dict[str, Any]:
        """The policy's parameters, as given to `__init__` (for MLflow and versions)."""
        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p not in ("self", "model")}

    @cached_property
    def version(self) -> str:
        """A short hash of the parameters and the model configuration (fixed at first use)."""
        blob = json.dumps([self.params(), vars(self.model.config)], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def forget_cache(self) -> None:
        """Drop cached π (after a change alarm, a pause, a catalog reload)."""
        self._cache.clear()


def _one_hot(k: int, i: int) -> np.ndarray:
    p = np.zeros(k)
    p[i] = 1.0
    return p


class ThompsonSampling(Policy):
    """Thompson sampling on utility; π is the share of posterior draws each carrier wins.

    A first attempt's utility counts the retry senders make after a failure answered inside
    the SLA (`retries`: how many attempts may still be retried; 0 for senders that never retry).
    """

    name = "thompson"
    probes = True

    def __init__(
        self,
        model: CarrierModel,
        seed: int | None = None,
        exploration_floor: float = 0.005,
        n_samples: int = 128,
        cache_seconds: float = 1.0,
        retries: int = 1,
    ) -> None:
        super().__init__(model, seed, exploration_floor, cache_seconds, retries)
        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        self.n_samples = n_samples

    def _probabilities(
        self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
    ):
        k = len(arms)
        if k == 1:
            return np.ones(1)
        p = sample_beta(alpha, beta, self.n_samples, self.rng)
        utility = expected_utility(p, ratio, latency, price, on_delivery, ctx.message_class)
        if quick.any():
            utility = with_retry(utility, (1.0 - p) * quick)
        wins = np.bincount(utility.argmax(axis=1), minlength=k)
        return wins / self.n_samples


class CostSubsidy(Policy):
    """The cost-subsidy objective (Sinha et al., AISTATS 2021) on our posterior: per Thompson draw,
    the cheapest carrier whose receipt-calibrated success is at least (1−subsidy) of the draw's
    best; π is the share of draws each carrier wins, so the propensity stays exact."""

    name = "cost_subsidy"
    probes = True

    def __init__(
        self,
        model: CarrierModel,
        seed: int | None = None,
        exploration_floor: float = 0.005,
        subsidy: float = 0.05,
        n_samples: int = 128,
        cache_seconds: float = 1.0,
    ) -> None:
        super().__init__(model, seed, exploration_floor, cache_seconds)
        if not 0.0 <= subsidy < 1.0:
            raise ValueError("subsidy must be in [0, 1)")
        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        self.subsidy = subsidy
        self.n_samples = n_samples

    def _probabilities(
        self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
    ):
        if len(arms) == 1:
            return np.ones(1)
        p = sample_beta(alpha, beta, self.n_samples, self.rng)
        cost = price * np.where(on_delivery, p, 1.0)
        wins = cheapest_feasible(p * ratio, cost, self.subsidy)
        return np.bincount(wins, minlength=len(arms)) / self.n_samples


class EpsilonGreedy(Policy):
    """The arm with the best posterior-mean utility, and a uniform draw with probability ε."""

    name = "epsilon_greedy"
    probes = True

    def __init__(
        self,
        model: CarrierModel,
        seed: int | None = None,
        exploration_floor: float = 0.0,
        epsilon: float = 0.1,
        cache_seconds: float = 1.0,
        retries: int = 1,
    ) -> None:
        super().__init__(model, seed, exploration_floor, cache_seconds, retries)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        self.epsilon = epsilon

    def _probabilities(
        self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
    ):
        k = len(arms)
        return (1 - self.epsilon) * _one_hot(k, int(np.argmax(scores))) + self.epsilon / k


class StaticPriority(Policy):
    """Failover routing: always the carrier with the best (lowest) catalog priority."""

    name = "static"

    def _probabilities(
        self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
    ):
        best = min(range(len(arms)), key=lambda i: (arms[i].priority, i))
        return _one_hot(len(arms), best)


class Cheapest(Policy):
    """Least-cost routing: always the cheapest eligible carrier for this destination."""

    name = "cheapest"

    def _probabilities(
        self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
    ):
        best = min(range(len(arms)), key=lambda i: (arms[i].unit_price, arms[i].priority, i))
        return _one_hot(len(arms), best)


class Uniform(Policy):
    """An equal share for every eligible carrier, drawn at random: the ideal logging policy."""

    name = "uniform"

    def _probabilities(
        self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
    ):
        return np.full(len(arms), 1.0 / len(arms))


class RoundRobin(Policy):
    """Rotation over the eligible carriers per destination; π is one-hot on the next in turn.

    π changes with every message, so it is never cached.
    """

    name = "round_robin"

    def __init__(
        self, model: CarrierModel, seed: int | None = None, exploration_floor: float = 0.0
    ) -> None:
        super().__init__(model, seed, exploration_floor, cache_seconds=0.0)
        self._turn: dict[tuple[Any, ...], int] = {}

    def _probabilities(
        self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
    ):
        key = (ctx.key.country, ctx.key.operator, tuple(a.carrier for a in arms))
        turn = self._turn.get(key, 0)
        self._turn[key] = turn + 1
        return _one_hot(len(arms), turn % len(arms))


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        ThompsonSampling,
        CostSubsidy,
        EpsilonGreedy,
        StaticPriority,
        Cheapest,
        Uniform,
        RoundRobin,
    )
}


def make_policy(name: str, model: CarrierModel, seed: int | None = None, **params: Any) -> Policy:
    """Build a policy by name with its parameters; unknown names or parameters are errors."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "seed"}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(
            f"policy {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(allowed)}"
        )
    return cls(model, seed=seed, **params)

"""Peer bandit libraries behind the engine's policy interface, so a comparison runs side by side:
MABWiser's Thompson sampling per destination, pybandits' cost-control bandit per destination and
Vowpal Wabbit's `cb_explore_adf`.

Each peer gives π(·|x) over the eligible carriers; the engine draws from it and logs that exact
probability. A peer learns only when the engine learns — at a receipt within the SLA or at the
deadline, in event time — because `PeerEngine` hands it the same answer then, never before.
The libraries come with the optional extra: `pip install -e '.[peers]'`.
"""

from __future__ import annotations

import importlib.util
import re
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from bandit.model import CarrierModel
from bandit.policies import Arm, DecisionContext, Distribution, Policy
from bandit.reward import MessageClass
from router.contract.messages import RouteDecision, RouteRequest
from router.core.engine import RoutingEngine

EXTRA = "pip install -e '.[peers]'"


class PeerPolicy(Policy):
    """A library's bandit as a policy: remembers each decision's context until its answer."""

    library: ClassVar[str]  # the module the peer needs

    def __init__(self, model: CarrierModel, seed: int | None = None, cache_seconds: float = 1.0):
        super().__init__(model, seed, 0.0, cache_seconds)
        self._last: tuple[DecisionContext, tuple[Arm, ...]] | None = None
        self._pending: dict[str, tuple[DecisionContext, tuple[Arm, ...], int, float]] = {}

    def distribution(self, ctx: DecisionContext, arms: Sequence[Arm]) -> Distribution:
        """π(·|x), remembering the context for the decision being made."""
        self._last = (ctx, tuple(arms))
        return super().distribution(ctx, arms)

    def bind(self, decision: RouteDecision) -> None:
        """File the decision just made under its id, to learn from when its answer comes."""
        if self._last is None:
            return
        ctx, arms = self._last
        chosen = next(i for i, a in enumerate(arms) if a.carrier == decision.carrier)
        self._pending[decision.decision_id] = (ctx, arms, chosen, decision.propensity)
        self._last = None

    def feedback(self, decision_id: str, success: bool, latency_s: float | None) -> None:
        """The engine's final answer for a decision (success within the SLA or not)."""
        item = self._pending.pop(decision_id, None)
        if item is not None:
            self._learn(*item, success, latency_s)

    @abstractmethod
    def _learn(
        self,
        ctx: DecisionContext,
        arms: tuple[Arm, ...],
        chosen: int,
        propensity: float,
        success: bool,
        latency_s: float | None,
    ) -> None:
        """Update the library's model with one answer."""


class _PerDestination(PeerPolicy):
    """A peer keeping one non-contextual bandit per (country, operator)."""

    def __init__(
        self,
        model: CarrierModel,
        seed: int | None = None,
        n_samples: int = 32,
        cache_seconds: float = 1.0,
    ) -> None:
        super().__init__(model, seed, cache_seconds)
        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        self.n_samples = n_samples
        self._bandits: dict[tuple[str, str], Any] = {}

    def _seed_for_next(self) -> int:
        """A seed per destination bandit, fixed by the policy's seed and creation order."""
        return (self.seed or 0) * 10_007 + len(self._bandits)

    def _shares(self, choices: Sequence[str], arms: Sequence[Arm]) -> np.ndarray:
        """π estimated from the library's own choices over `n_samples` independent draws.

        Drawing from this estimate picks one of n i.i.d. native choices at random, which has the
        same law as the library's single draw; the logged propensity is this estimate, exactly
        the probability the engine drew with.
        """
        index = {a.carrier: i for i, a in enumerate(arms)}
        counts = np.bincount([index[c] for c in choices], minlength=len(arms))
        return counts / counts.sum()


class MabwiserThompson(_PerDestination):
    """MABWiser's Thompson sampling (Beta-Bernoulli on success within the SLA), one MAB per
    (country, operator); π is the share of its posterior draws each eligible carrier wins."""

    name = "mabwiser_ts"
    library = "mabwiser"

    def _bandit(self, ctx: DecisionContext, arms: Sequence[Arm]) -> Any:
        from mabwiser.mab import MAB, LearningPolicy

        key = (ctx.key.country, ctx.key.operator)
        mab = self._bandits.get(key)
        if mab is None:
            mab = MAB(
                [a.carrier for a in arms],
                LearningPolicy.ThompsonSampling(),
                seed=self._seed_for_next(),
            )
            mab.fit([], [])
            self._bandits[key] = mab
        for a in arms:
            if a.carrier not in mab.arms:
                mab.add_arm(a.carrier)
        return mab

    def _probabilities(
        self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
    ):
        if len(arms) == 1:
            return np.ones(1)
        mab = self._bandit(ctx, arms)
        names = [a.carrier for a in arms]
        choices = []
        for _ in range(self.n_samples):
            draws = mab.predict_expectations()
            choices.append(max(names, key=draws.__getitem__))
        return self._shares(choices, arms)

    def _learn(self, ctx, arms, chosen, propensity, success, latency_s):
        self._bandit(ctx, arms).partial_fit([arms[chosen].carrier], [int(success)])


class PybanditsCostControl(_PerDestination):
    """pybandits' cost-control Thompson bandit (`SmabBernoulliCC`): among carriers whose sampled
    success is within (1−subsidy) of the best sample, the cheapest; one bandit per (country,
    operator) with the carriers' prices there as action costs."""

    name = "pybandits_cc"
    library = "pybandits"

    def __init__(
        self,
        model: CarrierModel,
        seed: int | None = None,
        subsidy: float = 0.05,
        n_samples: int = 32,
        cache_seconds: float = 1.0,
    ) -> None:
        super().__init__(model, seed, n_samples, cache_seconds)
        self.subsidy = subsidy

    def _bandit(self, ctx: DecisionContext, arms: Sequence[Arm]) -> Any:
        from pybandits.model import BetaCC
        from pybandits.smab import SmabBernoulliCC

        key = (ctx.key.country, ctx.key.operator)
        mab = self._bandits.get(key)
        known = {} if mab is None else dict(mab.actions)
        if mab is None or any(a.carrier not in known for a in arms):
            actions = {a.carrier: BetaCC(cost=a.unit_price) for a in arms}
            actions.update(known)  # a new carrier joins; what was learned stays
            mab = SmabBernoulliCC(
                actions=actions, subsidy_factor=self.subsidy, random_seed=self._seed_for_next()
            )
            self._bandits[key] = mab
        for a in arms:  # a price change reaches the action's cost
            if mab.actions[a.carrier].cost != a.unit_price:
                mab.actions[a.carrier].cost = a.unit_price
        return mab

    def _probabilities(
        self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
    ):
        if len(arms) == 1:
            return np.ones(1)
        mab = self._bandit(ctx, arms)
        eligible = {a.carrier for a in arms}
        forbidden = set(mab.actions) - eligible
        choices, _ = mab.predict(n_samples=self.n_samples, forbidden_actions=forbidden or None)
        return self._shares(choices, arms)

    def _learn(self, ctx, arms, chosen, propensity, success, latency_s):
        self._bandit(ctx, arms).update(actions=[arms[chosen].carrier], rewards=[int(success)])


_TOKEN = re.compile(r"[^A-Za-z0-9_.-]")


class VowpalWabbitAdf(PeerPolicy):
    """Vowpal Wabbit's contextual bandit with action-dependent features (`cb_explore_adf`): the
    context (country, operator, time band, class) as shared features, each carrier (id, price)
    as an action, cost = −utility of the message; π is the pmf VW returns."""

    name = "vw_cb_adf"
    library = "vowpalwabbit"

    def __init__(
        self,
        model: CarrierModel,
        seed: int | None = None,
        exploration: str = "--epsilon 0.05",
        cache_seconds: float = 1.0,
    ) -> None:
        super().__init__(model, seed, cache_seconds)
        import vowpalwabbit

        self.exploration = exploration
        self._vw = vowpalwabbit.Workspace(
            f"--cb_explore_adf {exploration} -q SA --quiet --random_seed {seed or 0}"
        )

    @staticmethod
    def _lines(ctx: DecisionContext, arms: Sequence[Arm]) -> list[str]:
        k = ctx.key
        shared = (
            f"shared |S country={_tok(k.country)} op={_tok(k.country)}_{_tok(k.operator)} "
            f"band={k.band} class={_tok(ctx.message_class.name)}"
        )
        prices = [a.unit_price * ctx.segments for a in arms]
        return [shared] + [
            f"|A carrier={_tok(a.carrier)} price:{p:.6f}" for a, p in zip(arms, prices, strict=True)
        ]

    def _probabilities(
        self, ctx, arms, scores, alpha, beta, ratio, latency, price, on_delivery, quick
    ):
        if len(arms) == 1:
            return np.ones(1)
        pmf = np.asarray(self._vw.predict(self._lines(ctx, arms)), float)
        return pmf / pmf.sum()

    def _learn(self, ctx, arms, chosen, propensity, success, latency_s):
        lines = self._lines(ctx, arms)
        cost = -message_utility(ctx.message_class, arms[chosen], ctx.segments, success, latency_s)
        lines[chosen + 1] = f"0:{cost:.6f}:{propensity:.6f} {lines[chosen + 1]}"
        self._vw.learn(lines)


def _tok(text: str) -> str:
    return _TOKEN.sub("_", text) or "_"


def message_utility(
    mc: MessageClass, arm: Arm, segments: int, success: bool, latency_s: float | None
) -> float:
    """The utility the engine scores a message by: value·success − cost − latency penalty."""
    price = arm.unit_price * segments * (float(success) if arm.billing_on_delivery else 1.0)
    return mc.reward(float(success), price, latency_s if success else None)


PEERS: dict[str, type[PeerPolicy]] = {
    cls.name: cls for cls in (MabwiserThompson, PybanditsCostControl, VowpalWabbitAdf)
}


def missing_library(name: str) -> str | None:
    """Why peer `name` cannot play here (its library is not installed), or None if it can."""
    module = PEERS[name].library
    if importlib.util.find_spec(module) is None:
        return f"peer {name!r} needs the {module!r} package, not installed; {EXTRA}"
    return None


class PeerEngine(RoutingEngine):
    """The engine serving a peer: the same decision path, and every final answer the engine
    learns is handed to the peer at that moment of event time."""

    policy: PeerPolicy

    def route(self, req: RouteRequest) -> RouteDecision:
        """Route as usual, then file the decision with the peer."""
        decision = super().route(req)
        self.policy.bind(decision)
        return decision

    def _learn(self, flight: Any, success: bool, at: float, latency: float | None) -> None:
        if flight.learner_done:
            return
        super()._learn(flight, success, at, latency)
        self.policy.feedback(flight.decision_id, success, latency)


def use_peer(engine: PeerEngine, name: str, seed: int | None = None) -> PeerPolicy:
    """Make a peer engine serve peer `name` and return the peer."""
    peer = PEERS[name](engine.model, seed=seed)
    engine.policy = peer
    return peer

"""Multi-armed bandits with cost subsidy: the cheapest arm whose mean quality is at least (1−α)
of the best arm's.

The objective and its two regrets follow Sinha, Sankararaman, Kazerouni and Avadhanula,
"Multi-armed Bandits with Cost Subsidy" (AISTATS 2021, arXiv 2011.01488), which they motivate with
SMS routing; CS-TS, CS-UCB and CS-ETC are that paper's algorithms, and COF is the Cost-Ordered
Feasibility algorithm of Juneja, Joe-Wong and Yağan (arXiv 2605.07171). Arms have Bernoulli
quality and known costs. Plain NumPy: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


def feasible_mask(quality: np.ndarray, alpha: float) -> np.ndarray:
    """Arms (per row, for a matrix) whose quality is at least (1−α) times the row's best."""
    best = np.max(quality, axis=-1, keepdims=True)
    return quality >= (1.0 - alpha) * best


def cheapest_feasible(quality: np.ndarray, cost: np.ndarray, alpha: float) -> np.ndarray | int:
    """The cost-subsidy choice: the cheapest arm within (1−α) of the best quality.

    `quality` is a vector of means (answer: one index) or a (samples × arms) matrix of posterior
    draws (answer: one index per row); `cost` is a vector, or a matrix of the same shape. Among
    equally cheap feasible arms the better one wins. With α = 0 this is the best arm.
    """
    feasible = feasible_mask(quality, alpha)
    cost = np.broadcast_to(cost, quality.shape)
    # Cheapest first; a tiny quality term breaks cost ties towards the better arm.
    key = np.where(feasible, cost - 1e-12 * quality, np.inf)
    choice = np.argmin(key, axis=-1)
    return int(choice) if quality.ndim == 1 else choice


@dataclass(frozen=True)
class Instance:
    """A Bernoulli cost-subsidy problem: mean quality and known cost per arm, subsidy factor α."""

    name: str
    means: np.ndarray
    costs: np.ndarray
    alpha: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "means", np.asarray(self.means, float))
        object.__setattr__(self, "costs", np.asarray(self.costs, float))
        if self.means.shape != self.costs.shape or self.means.ndim != 1 or len(self.means) < 2:
            raise ValueError("means and costs must be vectors of the same length (>= 2 arms)")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError("alpha must be in [0, 1)")

    @property
    def target(self) -> int:
        """The arm the objective asks for (the benchmark of both regrets)."""
        return cheapest_feasible(self.means, self.costs, self.alpha)  # type: ignore[return-value]

    @property
    def threshold(self) -> float:
        """The quality an arm needs: (1−α)·μ*."""
        return (1.0 - self.alpha) * float(self.means.max())


def cost_regret(instance: Instance, pulls: np.ndarray) -> np.ndarray:
    """Cumulative cost regret after each round: Σ_t max(c_{m_t} − c_{target}, 0)."""
    excess = np.maximum(instance.costs - instance.costs[instance.target], 0.0)
    return np.cumsum(excess[pulls])


def quality_regret(instance: Instance, pulls: np.ndarray) -> np.ndarray:
    """Cumulative quality regret after each round: Σ_t max((1−α)·μ* − μ_{m_t}, 0)."""
    shortfall = np.maximum(instance.threshold - instance.means, 0.0)
    return np.cumsum(shortfall[pulls])


@dataclass
class ArmStats:
    """What an algorithm has seen: pulls and successes per arm, and the round number."""

    n_arms: int
    pulls: np.ndarray = field(init=False)
    successes: np.ndarray = field(init=False)
    t: int = 0

    def __post_init__(self) -> None:
        self.pulls = np.zeros(self.n_arms)
        self.successes = np.zeros(self.n_arms)

    def update(self, arm: int, reward: float) -> None:
        """Record one round's pull and its reward."""
        self.pulls[arm] += 1
        self.successes[arm] += reward
        self.t += 1

    @property
    def means(self) -> np.ndarray:
        """Empirical means (0 for arms never pulled)."""
        return self.successes / np.maximum(self.pulls, 1)

    def unpulled(self) -> int | None:
        """The first arm never pulled, if any (every algorithm starts by pulling each once)."""
        idx = np.flatnonzero(self.pulls == 0)
        return int(idx[0]) if idx.size else None


class Algorithm(Protocol):
    """A cost-subsidy learner: which arm to pull next, then learn its reward."""

    name: str

    def select(self, rng: np.random.Generator) -> int:
        """The arm to pull this round."""

    def update(self, arm: int, reward: float) -> None:
        """Learn the pulled arm's reward."""


@dataclass
class _Base:
    costs: np.ndarray
    alpha: float
    horizon: int
    stats: ArmStats = field(init=False)

    def __post_init__(self) -> None:
        self.costs = np.asarray(self.costs, float)
        self.stats = ArmStats(len(self.costs))

    def update(self, arm: int, reward: float) -> None:
        """Learn the pulled arm's reward."""
        self.stats.update(arm, reward)

    def _radius(self, log_term: float) -> np.ndarray:
        return np.sqrt(2.0 * log_term / np.maximum(self.stats.pulls, 1))


class CsTs(_Base):
    """CS-TS (Sinha et al.): draw θ_i ~ Beta(1 + successes, 1 + failures); the feasible set is
    {i : θ_i ≥ (1−α)·max θ}; pull its cheapest arm."""

    name = "CS-TS"

    def select(self, rng: np.random.Generator) -> int:
        """Thompson draws, then the cheapest arm within (1−α) of the best draw."""
        first = self.stats.unpulled()
        if first is not None:
            return first
        s, n = self.stats.successes, self.stats.pulls
        theta = rng.beta(1.0 + s, 1.0 + n - s)
        return cheapest_feasible(theta, self.costs, self.alpha)  # type: ignore[return-value]


class CsUcb(_Base):
    """CS-UCB (Sinha et al.): UCB index μ̂_i + sqrt(2 ln t / n_i) (capped at 1); the feasible set is
    {i : UCB_i ≥ (1−α)·max UCB}; pull its cheapest arm."""

    name = "CS-UCB"

    def select(self, rng: np.random.Generator) -> int:
        """Upper confidence bounds, then the cheapest arm within (1−α) of the best bound."""
        first = self.stats.unpulled()
        if first is not None:
            return first
        ucb = np.minimum(self.stats.means + self._radius(math.log(self.stats.t)), 1.0)
        return cheapest_feasible(ucb, self.costs, self.alpha)  # type: ignore[return-value]


class CsEtc(_Base):
    """CS-ETC (Sinha et al.): explore every arm τ = ⌈(T/K)^{2/3}⌉ times in turn; then let m be the
    arm with the highest lower bound and pull the cheapest arm whose upper bound is at least
    (1−α)·LCB_m (bounds μ̂ ± sqrt(2 ln T / n_i))."""

    name = "CS-ETC"

    @property
    def tau(self) -> int:
        """Exploration pulls per arm."""
        return math.ceil((self.horizon / len(self.costs)) ** (2.0 / 3.0))

    def select(self, rng: np.random.Generator) -> int:
        """Round-robin while exploring, the confidence-bound rule after."""
        if self.stats.t < self.tau * len(self.costs):
            return self.stats.t % len(self.costs)
        radius = self._radius(math.log(self.horizon))
        ucb = np.minimum(self.stats.means + radius, 1.0)
        lcb = np.maximum(self.stats.means - radius, 0.0)
        feasible = ucb >= (1.0 - self.alpha) * lcb.max()
        return int(np.argmin(np.where(feasible, self.costs, np.inf)))


class Cof(_Base):
    """Cost-Ordered Feasibility (Juneja, Joe-Wong and Yağan), as we read the paper's description:
    visit arms in increasing cost; the best quality μ* is bracketed by combining every arm's
    samples (max LCB ≤ μ* ≤ max UCB); the candidate is dropped once its UCB is below (1−α)·max LCB
    and played once its LCB is at least (1−α)·max UCB; while undecided, the less-sampled of the
    candidate and the arm holding the highest UCB is pulled (exclusive sampling).
    Bounds are Hoeffding's at confidence 1 − 1/T²: μ̂ ± sqrt(ln T / n_i)."""

    name = "COF"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.order = np.argsort(self.costs, kind="stable")
        self.position = 0

    def select(self, rng: np.random.Generator) -> int:
        """The candidate if it is certified feasible, else the sample that decides it soonest."""
        first = self.stats.unpulled()
        if first is not None:
            return first
        radius = self._radius(math.log(self.horizon) / 2.0)
        ucb = self.stats.means + radius
        lcb = self.stats.means - radius
        floor = (1.0 - self.alpha) * lcb.max()
        while self.position < len(self.order) - 1 and ucb[self.order[self.position]] < floor:
            self.position += 1  # certified infeasible: the next cheapest becomes the candidate
        candidate = int(self.order[self.position])
        if lcb[candidate] >= (1.0 - self.alpha) * ucb.max():
            return candidate  # certified feasible
        leader = int(np.argmax(ucb))
        pulls = self.stats.pulls
        return candidate if pulls[candidate] <= pulls[leader] else leader


ALGORITHMS: dict[str, type[_Base]] = {cls.name: cls for cls in (CsTs, CsUcb, CsEtc, Cof)}


def bernoulli_luck(n_arms: int, horizon: int, rng: np.random.Generator) -> np.ndarray:
    """(horizon × arms) uniforms: arm i pulled at round t succeeds iff luck[t, i] < μ_i, so
    every algorithm faces the same outcomes (common random numbers)."""
    return rng.random((horizon, n_arms))


def play(
    instance: Instance, algorithm: Algorithm, luck: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Run `algorithm` for len(luck) rounds on the instance; the arm pulled each round."""
    pulls = np.empty(len(luck), dtype=np.int64)
    for t in range(len(luck)):
        arm = algorithm.select(rng)
        algorithm.update(arm, float(luck[t, arm] < instance.means[arm]))
        pulls[t] = arm
    return pulls

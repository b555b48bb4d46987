"""Off-policy estimators (IPS, SNIPS, DM, DR, SNDR) as mergeable accumulators: NumPy, no I/O.

Each logged decision i gives the reward r, the logged propensity p0 = π0(a|x), the candidate's
probability of the logged action pe = π_e(a|x) (over the logged eligible set), and, for DM and
DR, the reward model's prediction for the logged action q̂(x, a) and its value under the
candidate Σ_a π_e(a|x) q̂(x, a). With w = pe / p0, every estimator is a smooth function of the
means of z = (w, w·r, Σπ_e q̂, w·(r − q̂)): IPS = E[w r], SNIPS = E[w r] / E[w], DM = E[Σπ_e q̂],
DR = DM + E[w (r − q̂)], SNDR = DM + E[w (r − q̂)] / E[w].

DM's own sample variance (that of Σπ_e q̂ alone) ignores the reward model's error, so its
interval would be far too narrow. Its intervals use the influence function of the value,
ψ = Σπ_e q̂ + w·(r − q̂) (DR's), centred at DM: with a cross-fitted q̂ from a (nearly) saturated
model, DM is asymptotically equivalent to DR and shares its variance; what this cannot cover is
DM's bias where the model is wrong (the gap DM − DR shows it).

`Accumulator` keeps n, the mean of z and its centred second moments (merged with Chan's
formula, so merging chunks equals one pass over their concatenation to float precision) and
the largest weights; the analytic interval is the delta method's normal one. `Bootstrap` keeps
B Poisson-bootstrap replicates of the sums of z, so it streams and merges too.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

W, WR, QPI, WE = range(4)
Z_DIM = 4
ESTIMATORS = ("ips", "snips", "dm", "dr", "sndr")
MODEL_FREE = ("ips", "snips")

Value = Callable[[np.ndarray], float]
Gradient = Callable[[np.ndarray], np.ndarray]


def _unit(*idx: int) -> np.ndarray:
    """A gradient with ones at `idx`."""
    g = np.zeros(Z_DIM)
    g[list(idx)] = 1.0
    return g


# Each estimator: (value from the means m of z, gradient of that value in m).
_FORMULAS: dict[str, tuple[Value, Gradient]] = {
    "ips": (lambda m: m[WR], lambda m: _unit(WR)),
    "snips": (
        lambda m: m[WR] / m[W],
        lambda m: np.array([-m[WR] / m[W] ** 2, 1.0 / m[W], 0.0, 0.0]),
    ),
    "dm": (lambda m: m[QPI], lambda m: _unit(QPI)),
    "dr": (lambda m: m[QPI] + m[WE], lambda m: _unit(QPI, WE)),
    "sndr": (
        lambda m: m[QPI] + m[WE] / m[W],
        lambda m: np.array([-m[WE] / m[W] ** 2, 0.0, 1.0, 1.0 / m[W]]),
    ),
}


# Gradients whose variance stands for an estimator's own: DM's error is that of DR (see above).
_VARIANCE_OF = {"dm": "dr"}


@dataclass(frozen=True)
class Estimate:
    """One estimator's value, its 95% (or 1 − alpha) interval and the weights' diagnostics."""

    estimator: str
    value: float
    ci_low: float
    ci_high: float
    std_error: float
    n: int
    ess: float
    mean_weight: float
    max_weights: tuple[float, ...]


def weights(propensity: np.ndarray, pi_logged: np.ndarray) -> np.ndarray:
    """w = π_e(a|x) / π0(a|x), checking that both are probabilities and π0 > 0."""
    p0 = np.asarray(propensity, dtype=float)
    pe = np.asarray(pi_logged, dtype=float)
    if p0.shape != pe.shape or p0.ndim != 1:
        raise ValueError("propensity and pi_logged must be 1-d arrays of the same length")
    if not np.all((p0 > 0) & (p0 <= 1)):
        raise ValueError("logged propensities must be in (0, 1]")
    if not np.all((pe >= 0) & (pe <= 1)):
        raise ValueError("candidate probabilities must be in [0, 1]")
    return pe / p0


def z_matrix(
    reward: np.ndarray,
    propensity: np.ndarray,
    pi_logged: np.ndarray,
    q_logged: np.ndarray | None = None,
    q_pi: np.ndarray | None = None,
) -> np.ndarray:
    """The (n × 4) matrix of z = (w, w·r, Σπ_e q̂, w·(r − q̂)); model columns are 0 without q̂."""
    w = weights(propensity, pi_logged)
    r = np.asarray(reward, dtype=float)
    if r.shape != w.shape or not np.all(np.isfinite(r)):
        raise ValueError("reward must be a finite 1-d array as long as the propensities")
    z = np.zeros((len(w), Z_DIM))
    z[:, W] = w
    z[:, WR] = w * r
    if (q_logged is None) != (q_pi is None):
        raise ValueError("give both q_logged and q_pi, or neither")
    if q_logged is not None and q_pi is not None:
        q_a = np.asarray(q_logged, dtype=float)
        q_p = np.asarray(q_pi, dtype=float)
        if q_a.shape != w.shape or q_p.shape != w.shape:
            raise ValueError("q_logged and q_pi must be as long as the propensities")
        z[:, QPI] = q_p
        z[:, WE] = w * (r - q_a)
    return z


@dataclass
class Accumulator:
    """Sufficient statistics of z over the rows seen so far; chunks merge exactly."""

    with_model: bool = False
    top_k: int = 10
    n: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(Z_DIM))
    m2: np.ndarray = field(default_factory=lambda: np.zeros((Z_DIM, Z_DIM)))
    top_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def update(
        self,
        reward: np.ndarray,
        propensity: np.ndarray,
        pi_logged: np.ndarray,
        q_logged: np.ndarray | None = None,
        q_pi: np.ndarray | None = None,
    ) -> Accumulator:
        """Add one chunk of logged decisions (in place); returns self."""
        if self.with_model and q_logged is None:
            raise ValueError("this accumulator estimates DM/DR: give q_logged and q_pi")
        z = z_matrix(reward, propensity, pi_logged, q_logged, q_pi)
        return self.update_z(z)

    def update_z(self, z: np.ndarray) -> Accumulator:
        """Add one chunk given as a z matrix (see `z_matrix`); returns self."""
        if len(z) == 0:
            return self
        mean = z.mean(axis=0)
        centred = z - mean
        chunk = Accumulator(self.with_model, self.top_k, len(z), mean, centred.T @ centred)
        chunk.top_weights = _largest(z[:, W], self.top_k)
        merged = self.merge(chunk)
        self.n, self.mean, self.m2, self.top_weights = (
            merged.n,
            merged.mean,
            merged.m2,
            merged.top_weights,
        )
        return self

    def merge(self, other: Accumulator) -> Accumulator:
        """The statistics of both accumulators' rows together (a new accumulator)."""
        if self.with_model != other.with_model:
            raise ValueError("cannot merge accumulators with and without a reward model")
        top = _largest(np.concatenate([self.top_weights, other.top_weights]), self.top_k)
        if other.n == 0 or self.n == 0:
            src = self if other.n == 0 else other
            return Accumulator(
                self.with_model, self.top_k, src.n, src.mean.copy(), src.m2.copy(), top
            )
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        return Accumulator(self.with_model, self.top_k, n, mean, m2, top)

    @property
    def ess(self) -> float:
        """Effective sample size (Σw)² / Σw²."""
        sum_w2 = self.m2[W, W] + self.n * self.mean[W] ** 2
        return float((self.n * self.mean[W]) ** 2 / sum_w2) if sum_w2 > 0 else 0.0

    def estimators(self) -> tuple[str, ...]:
        """The estimators this accumulator can give."""
        return ESTIMATORS if self.with_model else MODEL_FREE

    def result(self, estimator: str, alpha: float = 0.05) -> Estimate:
        """One estimator's value with its analytic (delta-method, normal) interval."""
        if estimator not in self.estimators():
            raise ValueError(f"unknown or unavailable estimator {estimator!r}")
        if self.n < 2:
            raise ValueError("at least two logged decisions are needed")
        value = float(_FORMULAS[estimator][0](self.mean))
        g = _FORMULAS[_VARIANCE_OF.get(estimator, estimator)][1](self.mean)
        se = float(np.sqrt(max(g @ (self.m2 / (self.n - 1)) @ g, 0.0) / self.n))
        half = NormalDist().inv_cdf(1 - alpha / 2) * se
        return Estimate(
            estimator,
            value,
            value - half,
            value + half,
            se,
            self.n,
            self.ess,
            float(self.mean[W]),
            tuple(float(w) for w in self.top_weights),
        )

    def results(self, alpha: float = 0.05) -> dict[str, Estimate]:
        """Every available estimator's result."""
        return {name: self.result(name, alpha) for name in self.estimators()}


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    """The k largest values, largest first."""
    if len(values) > k:
        values = np.partition(values, len(values) - k)[-k:]
    return np.sort(values)[::-1]


# Poisson(1) by inverse CDF over 2¹⁶ equally likely codes: twice as fast as rng.poisson; the
# tail beyond P < 2⁻¹⁶ is cut (mean 0.9999, variance 0.9995).
_POISSON_ONE = np.searchsorted(
    np.cumsum([np.exp(-1.0) / math.factorial(k) for k in range(20)]) * 2**16,
    np.arange(2**16),
    side="right",
).astype(float)


_BOOTSTRAP_BLOCK = 8192


@dataclass
class Bootstrap:
    """Poisson bootstrap: B replicates of Σk and Σk·z, each row weighted by k ~ Poisson(1).

    The draws of a chunk are seeded by `seed` and a digest of the chunk's contents, so a result
    is reproducible for a given chunking and chunks seen on different machines stay independent.
    `total` holds the unweighted n and Σz (the full sample's values, for DM's shifted replicates).
    """

    n_replicates: int = 200
    seed: int = 0
    sums: np.ndarray = field(default_factory=lambda: np.zeros((0, Z_DIM + 1)))
    total: np.ndarray = field(default_factory=lambda: np.zeros(Z_DIM + 1))

    def __post_init__(self) -> None:
        if self.n_replicates < 2:
            raise ValueError("n_replicates must be >= 2")
        if len(self.sums) == 0:
            self.sums = np.zeros((self.n_replicates, Z_DIM + 1))

    def update(
        self,
        reward: np.ndarray,
        propensity: np.ndarray,
        pi_logged: np.ndarray,
        q_logged: np.ndarray | None = None,
        q_pi: np.ndarray | None = None,
    ) -> Bootstrap:
        """Add one chunk (in place); returns self."""
        return self.update_z(z_matrix(reward, propensity, pi_logged, q_logged, q_pi))

    def update_z(self, z: np.ndarray) -> Bootstrap:
        """Add one chunk given as a z matrix; returns self."""
        if len(z) == 0:
            return self
        digest = hashlib.blake2b(np.ascontiguousarray(z).tobytes(), digest_size=8).digest()
        rng = np.random.default_rng([self.seed, int.from_bytes(digest, "little")])
        for start in range(0, len(z), _BOOTSTRAP_BLOCK):  # bounds the B × rows draws in memory
            block = z[start : start + _BOOTSTRAP_BLOCK]
            codes = rng.integers(0, len(_POISSON_ONE), (self.n_replicates, len(block)), np.uint16)
            k = _POISSON_ONE[codes]
            self.sums[:, 0] += k.sum(axis=1)
            self.sums[:, 1:] += k @ block
        self.total[0] += len(z)
        self.total[1:] += z.sum(axis=0)
        return self

    def merge(self, other: Bootstrap) -> Bootstrap:
        """Both bootstraps' replicates summed (a new bootstrap)."""
        if other.n_replicates != self.n_replicates:
            raise ValueError("cannot merge bootstraps with different numbers of replicates")
        return Bootstrap(
            self.n_replicates, self.seed, self.sums + other.sums, self.total + other.total
        )

    def replicates(self, estimator: str) -> np.ndarray:
        """The estimator's value in each replicate (DM's: DR's, shifted by DM − DR)."""
        proxy = _VARIANCE_OF.get(estimator, estimator)
        means = self.sums[:, 1:] / self.sums[:, :1]
        values = np.asarray(_FORMULAS[proxy][0](means.T), dtype=float)
        if proxy != estimator:
            full = self.total[1:] / self.total[0]
            values = values + (_FORMULAS[estimator][0](full) - _FORMULAS[proxy][0](full))
        return values

    def interval(self, estimator: str, alpha: float = 0.05) -> tuple[float, float]:
        """Percentile interval of the estimator over the replicates."""
        low, high = np.quantile(self.replicates(estimator), [alpha / 2, 1 - alpha / 2])
        return float(low), float(high)


@dataclass
class WeightHistogram:
    """Counts of the importance weights w in log-spaced bins, and of w = 0; chunks merge by adding.

    Bin 0 holds 0 < w < 10^low, bin −1 holds w ≥ 10^high, the others `per_decade` bins a decade.
    """

    low: int = -3
    high: int = 3
    per_decade: int = 20
    zeros: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if self.high <= self.low or self.per_decade < 1:
            raise ValueError("need low < high and per_decade >= 1")
        if len(self.counts) == 0:
            self.counts = np.zeros(self.n_bins + 2, dtype=np.int64)

    @property
    def n_bins(self) -> int:
        """Number of bins between 10^low and 10^high."""
        return (self.high - self.low) * self.per_decade

    @property
    def edges(self) -> np.ndarray:
        """The n_bins + 1 bin edges, 10^low to 10^high."""
        return 10.0 ** np.linspace(self.low, self.high, self.n_bins + 1)

    @property
    def n(self) -> int:
        """Number of weights counted."""
        return int(self.zeros + self.counts.sum())

    def update(self, w: np.ndarray) -> WeightHistogram:
        """Count one chunk of weights (in place); returns self."""
        w = np.asarray(w, dtype=float)
        positive = w[w > 0]
        self.zeros += len(w) - len(positive)
        idx = np.floor((np.log10(positive) - self.low) * self.per_decade).astype(np.int64) + 1
        np.clip(idx, 0, self.n_bins + 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.n_bins + 2)
        return self

    def merge(self, other: WeightHistogram) -> WeightHistogram:
        """Both histograms' counts (a new histogram)."""
        if (other.low, other.high, other.per_decade) != (self.low, self.high, self.per_decade):
            raise ValueError("cannot merge histograms with different bins")
        return WeightHistogram(
            self.low,
            self.high,
            self.per_decade,
            self.zeros + other.zeros,
            self.counts + other.counts,
        )

    def ccdf(self) -> tuple[np.ndarray, np.ndarray]:
        """P(W ≥ edge) at each bin edge (exact at the edges, from the counts above them)."""
        above = np.cumsum(self.counts[::-1])[::-1][1:]  # weights in bins from each edge up
        return self.edges, above / max(self.n, 1)


def estimate(
    reward: np.ndarray,
    propensity: np.ndarray,
    pi_logged: np.ndarray,
    q_logged: np.ndarray | None = None,
    q_pi: np.ndarray | None = None,
    alpha: float = 0.05,
) -> dict[str, Estimate]:
    """Every estimator on in-memory arrays (one chunk)."""
    acc = Accumulator(with_model=q_logged is not None)
    return acc.update(reward, propensity, pi_logged, q_logged, q_pi).results(alpha)

"""Discounted evidence in event time and hierarchical Beta pooling: the learner's arithmetic."""

from __future__ import annotations

import math
from collections.abc import Sequence

LN2 = math.log(2.0)


def decay_factor(now: float, then: float, half_life: float) -> float:
    """Weight of evidence from `then` seen at `now`; never above 1 for out-of-order events."""
    if now <= then or half_life <= 0:
        return 1.0
    return math.exp(-(now - then) * LN2 / half_life)


class Decayed:
    """Exponentially discounted sums, stored as [successes, trials, latency_sum, latency_n, t]."""

    __slots__ = ()

    @staticmethod
    def new(t: float) -> list[float]:
        """Empty counts last touched at `t`."""
        return [0.0, 0.0, 0.0, 0.0, t]

    @staticmethod
    def add(
        c: list[float],
        now: float,
        half_life: float,
        success: float,
        latency: float | None,
        weight: float = 1.0,
    ) -> None:
        """Discount `c` to `now` and add one observation of `weight`."""
        f = decay_factor(now, c[4], half_life)
        c[0] = c[0] * f + weight * success
        c[1] = c[1] * f + weight
        c[2] *= f
        c[3] *= f
        if latency is not None:
            c[2] += weight * latency
            c[3] += weight
        c[4] = max(c[4], now)

    @staticmethod
    def read(c: list[float] | None, now: float, half_life: float) -> tuple[float, float]:
        """(successes, trials) discounted to `now`."""
        if c is None:
            return 0.0, 0.0
        f = decay_factor(now, c[4], half_life)
        return c[0] * f, c[1] * f

    @staticmethod
    def remove(
        c: list[float], now: float, half_life: float, successes: float, trials: float
    ) -> None:
        """Discount `c` to `now` and take out evidence that a child has forgotten."""
        f = decay_factor(now, c[4], half_life)
        c[0] = max(0.0, c[0] * f - successes)
        c[1] = max(c[0], c[1] * f - trials)
        c[2] *= f
        c[3] *= f
        c[4] = max(c[4], now)

    @staticmethod
    def restart(c: list[float], keep: float, rate: float) -> None:
        """After a change: `keep` trials' worth of evidence at the new `rate`, latency kept."""
        if c[1] > keep:
            f = keep / c[1]
            c[2] *= f
            c[3] *= f
        c[0] = rate * min(c[1], keep)
        c[1] = min(c[1], keep)


def pooled_beta(
    levels: Sequence[tuple[float, float, float]],
    prior_mean: float,
    prior_strength: float,
    pool_strength: float,
) -> tuple[float, float]:
    """Beta(α, β) at the deepest level, each level's prior being its parent's posterior.

    `levels` holds (successes, trials, provisional_failures) from the root down. A parent speaks
    for at most `pool_strength` trials in its child, so a child with data soon has its own say,
    and a child with none (a new operator or hour) starts from its parent's estimate.
    """
    mean, strength = prior_mean, prior_strength
    alpha = beta = 0.0
    for s, n, pending in levels:
        alpha = mean * strength + s
        beta = (1.0 - mean) * strength + max(n - s, 0.0) + pending
        total = alpha + beta
        mean = alpha / total
        strength = min(total, pool_strength)
    return alpha, beta


def cusum_step(stat: float, success: float, p0: float, p1: float) -> float:
    """One step of Page's Bernoulli CUSUM for a change of the success rate from p0 to p1."""
    p0 = min(max(p0, 1e-3), 1 - 1e-3)
    p1 = min(max(p1, 1e-3), 1 - 1e-3)
    llr = math.log(p1 / p0) if success >= 0.5 else math.log((1 - p1) / (1 - p0))
    return max(0.0, stat + llr)

"""IPS, SNIPS and DR of bandit.ope against obp 0.5.7 on the same synthetic inputs.

Run through scripts/obp_check.sh, which builds obp's own venv. Logged eligible sets vary per
decision; obp assumes a fixed action set, so each decision's π over its eligible carriers is
mapped onto a fixed carrier index space with zeros for ineligible carriers.
"""

from __future__ import annotations

import argparse

import numpy as np
from obp.ope import (
    DoublyRobust,
    InverseProbabilityWeighting,
    SelfNormalizedInverseProbabilityWeighting,
)

from bandit.ope import estimate


def synthetic(n: int, n_carriers: int, seed: int) -> dict[str, np.ndarray]:
    """Random eligible sets, logging π0, candidate π, logged actions, rewards and q̂."""
    rng = np.random.default_rng(seed)
    eligible = rng.random((n, n_carriers)) < 0.6
    eligible[np.arange(n), rng.integers(0, n_carriers, n)] = True
    pi0 = np.where(eligible, rng.dirichlet(np.ones(n_carriers), n) + 0.05, 0.0)
    pi0 /= pi0.sum(axis=1, keepdims=True)
    pi_e = np.where(eligible, rng.dirichlet(np.full(n_carriers, 0.3), n), 0.0)
    pi_e /= pi_e.sum(axis=1, keepdims=True)
    action = (pi0.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    q = np.where(eligible, rng.uniform(-0.1, 0.5, (n, n_carriers)), 0.0)
    reward = q[np.arange(n), action] + rng.normal(0, 0.1, n)
    return {"pi0": pi0, "pi_e": pi_e, "action": action, "q": q, "reward": reward}


def compare(n: int, n_carriers: int, seed: int) -> float:
    """Largest relative difference between ours and obp's estimates; prints both."""
    d = synthetic(n, n_carriers, seed)
    rows = np.arange(n)
    p0 = d["pi0"][rows, d["action"]]
    pe = d["pi_e"][rows, d["action"]]
    ours = estimate(
        d["reward"], p0, pe, d["q"][rows, d["action"]], (d["pi_e"] * d["q"]).sum(axis=1)
    )
    common = {
        "reward": d["reward"],
        "action": d["action"],
        "pscore": p0,
        "action_dist": d["pi_e"][:, :, None],
    }
    theirs = {
        "ips": InverseProbabilityWeighting().estimate_policy_value(**common),
        "snips": SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**common),
        "dr": DoublyRobust().estimate_policy_value(
            **common, estimated_rewards_by_reg_model=d["q"][:, :, None]
        ),
    }
    worst = 0.0
    for name, value in theirs.items():
        rel = abs(ours[name].value - value) / abs(value)
        worst = max(worst, rel)
        print(
            f"n={n:>8} seed={seed} {name:>5}: ours {ours[name].value:.15f} obp {value:.15f} "
            f"rel.diff {rel:.1e}"
        )
    return worst


def main() -> None:
    """Compare on several sizes and seeds; exit non-zero beyond `--rtol`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rtol", type=float, default=1e-12)
    args = parser.parse_args()
    worst = max(compare(n, 7, seed) for n in (100, 10_000, 1_000_000) for seed in (1, 2))
    print(f"largest relative difference: {worst:.2e} (tolerance {args.rtol:g})")
    raise SystemExit(0 if worst <= args.rtol else 1)


if __name__ == "__main__":
    main()

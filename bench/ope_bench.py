"""Throughput of the off-policy estimators in logged decisions per second on one core. Run:
`.venv/bin/python bench/ope_bench.py [--rows 2000000] [--chunk 65536]`.

Times `Accumulator.update` (IPS, SNIPS, DM, DR and SNDR from one pass, with a reward model's
predictions given), the same starting from per-pair π_e and q̂ (Σπ_e q̂ and q̂ of the logged
carrier computed per chunk, as `router.offline.evaluation` does) plus the weight histogram, and the
Poisson bootstrap, chunk by chunk as evaluation streams them. Each figure is the median of
`--repeats` runs. Run it with obp's venv (`scripts/obp_check.sh` builds it; then
`PYTHONPATH=. ~/.cache/sms-router/obp-venv/bin/python bench/ope_bench.py`) to time obp's IPS,
SNIPS and DR on the same arrays in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: set before NumPy loads its BLAS

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bandit.ope import Accumulator, Bootstrap, W, WeightHistogram, z_matrix  # noqa: E402

N_CARRIERS = 5


def inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic logged decisions over five carriers, with the candidate's π and q̂."""
    rng = np.random.default_rng(seed)
    pi0 = rng.dirichlet(np.ones(N_CARRIERS), n)
    pi_e = rng.dirichlet(np.full(N_CARRIERS, 0.3), n)
    action = (pi0.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    q = rng.uniform(-0.1, 0.5, (n, N_CARRIERS))
    rows = np.arange(n)
    return {
        "reward": q[rows, action] + rng.normal(0, 0.1, n),
        "action": action,
        "pscore": pi0[rows, action],
        "pi_logged": pi_e[rows, action],
        "q_logged": q[rows, action],
        "q_pi": (pi_e * q).sum(axis=1),
        "pi_e": pi_e,
        "q": q,
    }


def median_rate(run: Callable[[], None], rows: int, repeats: int) -> float:
    """Rows per second of the median of `repeats` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return rows / statistics.median(times)


def ours(d: dict[str, np.ndarray], chunk: int) -> Callable[[], None]:
    """All five estimators, chunk by chunk."""

    def run() -> None:
        acc = Accumulator(with_model=True)
        for i in range(0, len(d["reward"]), chunk):
            s = slice(i, i + chunk)
            acc.update(
                d["reward"][s], d["pscore"][s], d["pi_logged"][s], d["q_logged"][s], d["q_pi"][s]
            )
        acc.results()

    return run


def from_pairs(d: dict[str, np.ndarray], chunk: int) -> Callable[[], None]:
    """All five estimators and the weight histogram from flattened per-pair π_e and q̂."""
    n = len(d["reward"])
    pi_pairs, q_pairs = d["pi_e"].ravel(), d["q"].ravel()
    logged = np.arange(n) * N_CARRIERS + d["action"]  # the logged carrier's pair

    def run() -> None:
        acc, hist = Accumulator(with_model=True), WeightHistogram()
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            pairs = slice(i * N_CARRIERS, j * N_CARRIERS)
            rows = np.repeat(np.arange(j - i), N_CARRIERS)
            q_pi = np.bincount(rows, weights=pi_pairs[pairs] * q_pairs[pairs], minlength=j - i)
            chosen = logged[i:j] - i * N_CARRIERS
            z = z_matrix(
                d["reward"][i:j],
                d["pscore"][i:j],
                pi_pairs[pairs][chosen],
                q_pairs[pairs][chosen],
                q_pi,
            )
            acc.update_z(z)
            hist.update(z[:, W])
        acc.results()

    return run


def bootstrap(d: dict[str, np.ndarray], chunk: int, replicates: int) -> Callable[[], None]:
    """The Poisson bootstrap with `replicates` replicates, chunk by chunk."""

    def run() -> None:
        boot = Bootstrap(replicates)
        for i in range(0, len(d["reward"]), chunk):
            s = slice(i, i + chunk)
            boot.update(
                d["reward"][s], d["pscore"][s], d["pi_logged"][s], d["q_logged"][s], d["q_pi"][s]
            )
        boot.interval("dr")

    return run


def obp_runs(d: dict[str, np.ndarray]) -> dict[str, Callable[[], None]]:
    """obp's IPS, SNIPS and DR on the same arrays (empty when obp is not installed)."""
    try:
        from obp.ope import (
            DoublyRobust,
            InverseProbabilityWeighting,
            SelfNormalizedInverseProbabilityWeighting,
        )
    except ImportError:
        return {}
    common = {
        "reward": d["reward"],
        "action": d["action"],
        "pscore": d["pscore"],
        "action_dist": d["pi_e"][:, :, None],
    }
    q = d["q"][:, :, None]
    return {
        "obp ips": lambda: InverseProbabilityWeighting().estimate_policy_value(**common),
        "obp snips": lambda: SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(
            **common
        ),
        "obp dr": lambda: DoublyRobust().estimate_policy_value(
            **common, estimated_rewards_by_reg_model=q
        ),
    }


def main() -> None:
    """Print decisions per second per core for each estimator run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--chunk", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    d = inputs(args.rows)
    runs = {
        f"ours: ips+snips+dm+dr+sndr, chunks of {args.chunk}": ours(d, args.chunk),
        "ours: same, one chunk": ours(d, args.rows),
        "ours: same from per-pair π_e, q̂ + weight histogram": from_pairs(d, args.chunk),
        f"ours: poisson bootstrap B=200, chunks of {args.chunk}": bootstrap(d, args.chunk, 200),
        **obp_runs(d),
    }
    print(f"{args.rows:,} logged decisions, {N_CARRIERS} carriers, one core, median of repeats")
    for name, run in runs.items():
        repeats = 1 if "bootstrap" in name else args.repeats
        print(f"{name:<55} {median_rate(run, args.rows, repeats):>14,.0f} decisions/s")


if __name__ == "__main__":
    main()

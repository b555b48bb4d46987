"""Empirical coverage of the off-policy intervals on simulator logs. Run:
`.venv/bin/python bench/ope_coverage.py [--seeds 100] [--workers 2]`.

Per seed: the small world of tests/bandit/test_ope.py (scenario seed = seed) is logged under
`uniform`; `static` and `cheapest` are then run in the same world with the same luck (outcomes
are keyed by message, attempt and carrier), and their mean reward per decision is the truth each
estimate's 95% interval should contain. Prints, per candidate and estimator, the share of seeds
whose analytic and bootstrap intervals cover the truth. `dm (naive)` is DM with its own sample
variance (Σπ_e q̂ alone, blind to the reward model's error), kept to show why DM uses DR's
influence function instead. `--out` also writes the per-seed rows as CSV. The truth is the
candidate's value on the same contexts with the same luck, not the expected value over new
contexts that the intervals are for, so coverage above 95% (a conservative interval) is expected
where the estimate's error shares those (DM, DR, SNDR): compare `rmse` with `mean_std_error`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from bandit.ope import QPI  # noqa: E402
from carriers.catalog import load_catalog  # noqa: E402
from router.offline.evaluation import RewardModel, evaluate, make_candidate  # noqa: E402
from tests.bandit.test_ope import simulate, true_value  # noqa: E402

POLICIES = ("static", "cheapest")


def one_seed(seed: int) -> list[dict[str, object]]:
    """Coverage rows of one seed: (candidate, estimator, truth, estimate, covered)."""
    catalog = load_catalog()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        classes = simulate(catalog, "uniform", seed, root / "uniform")
        results = evaluate(
            root / "uniform",
            {p: make_candidate(p) for p in POLICIES},
            catalog,
            classes,
            reward_model=RewardModel(),
            n_bootstrap=200,
            seed=seed,
        )
        rows = []
        for policy in POLICIES:
            simulate(catalog, policy, seed, root / policy)
            truth = true_value(catalog, root / policy, classes)
            boot = results[policy].bootstrap_intervals()
            for name, e in results[policy].estimates().items():
                rows.append(
                    {
                        "seed": seed,
                        "candidate": policy,
                        "estimator": name,
                        "truth": truth,
                        "error": e.value - truth,
                        "std_error": e.std_error,
                        "analytic": e.ci_low <= truth <= e.ci_high,
                        "bootstrap": boot[name][0] <= truth <= boot[name][1],
                    }
                )
            acc = results[policy].accumulator
            dm = acc.result("dm")
            naive_se = np.sqrt(acc.m2[QPI, QPI] / (acc.n - 1) / acc.n)
            rows.append(
                {
                    "seed": seed,
                    "candidate": policy,
                    "estimator": "dm (naive)",
                    "truth": truth,
                    "error": dm.value - truth,
                    "std_error": naive_se,
                    "analytic": abs(dm.value - truth) <= 1.959964 * naive_se,
                    "bootstrap": np.nan,
                }
            )
        return rows


def main() -> None:
    """Run the seeds in parallel and print the coverage table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="CSV of the per-seed rows")
    args = parser.parse_args()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = [r for rs in pool.map(one_seed, range(1, args.seeds + 1)) for r in rs]
    frame = pd.DataFrame(rows)
    if args.out:
        frame.to_csv(args.out, index=False)
    table = frame.groupby(["candidate", "estimator"]).agg(
        seeds=("seed", "nunique"),
        analytic_coverage=("analytic", "mean"),
        bootstrap_coverage=("bootstrap", "mean"),
        mean_error=("error", "mean"),
        rmse=("error", lambda e: float((e**2).mean() ** 0.5)),
        mean_std_error=("std_error", "mean"),
    )
    with pd.option_context("display.width", 200, "display.max_columns", 10, "display.precision", 4):
        print(table)


if __name__ == "__main__":
    main()

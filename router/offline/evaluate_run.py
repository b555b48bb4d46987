"""`router evaluate`: off-policy estimates of candidate policies on logged decisions, to MLflow.

Logs come from a folder (a serving data dir's `decision_log/`) or from an MLflow run's
`decision_log` artifacts; candidates are built-in rules with parameters or a user's
`module:Class`. Prints a table and logs a run with the estimates, their intervals, and plots of
the estimates and of each candidate's importance-weight distribution (with its ESS).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from carriers.catalog import load_catalog
from router.console import report_console
from router.core.config import load_config
from router.offline.evaluation import (
    Candidate,
    CandidateResult,
    RewardModel,
    evaluate,
    make_candidate,
    results_frame,
)


@dataclass
class EvaluateOptions:
    """What `router evaluate` is run with."""

    candidates: Sequence[str]
    logs: Path | None = None
    run_id: str | None = None
    catalog: Path | None = None
    policy_file: Path | None = None
    tracking_uri: str | None = None
    experiment: str = "sms-routing-evaluation"
    bootstrap: int = 200
    out: Path = Path("data/evaluation")
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)


def parse_candidate(spec: str) -> tuple[str, Candidate]:
    """`name[,key=value...]` (e.g. `epsilon_greedy,epsilon=0.2`) or `module:Class[,k=v]`."""
    head, *pairs = spec.split(",")
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"candidate {spec!r}: parameters are key=value, got {pair!r}")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            params[key.strip()] = value.strip()
    return spec, make_candidate(head.strip(), **params)


def _download_logs(tracking_uri: str, run_id: str, into: Path) -> Path:
    """The run's `decision_log` artifacts. A run whose process was killed (tagged
    `router.recovered_by`) also gets the outcome segments of the run(s) that recovered it:
    receipts it acknowledged while Redis was away are logged by the process that published
    them after its restart (outcomes of decisions not in this run are ignored by the view)."""
    client = MlflowClient(tracking_uri)
    local = Path(client.download_artifacts(run_id, "decision_log", str(into)))
    seen = {run_id}
    current = run_id
    for _ in range(10):
        successor = client.get_run(current).data.tags.get("router.recovered_by")
        if not successor or successor in seen:
            break
        seen.add(successor)
        extra = into / f"recovered-{successor}"
        extra.mkdir(parents=True, exist_ok=True)
        if any(
            a.path.endswith("outcomes") for a in client.list_artifacts(successor, "decision_log")
        ):
            got = Path(client.download_artifacts(successor, "decision_log/outcomes", str(extra)))
            (local / "outcomes").mkdir(exist_ok=True)
            for segment in got.glob("*.parquet"):
                segment.rename(local / "outcomes" / f"{successor[:8]}-{segment.name}")
        current = successor
    return local


def run_evaluation(opts: EvaluateOptions, console: Console | None = None) -> pd.DataFrame:
    """Evaluate the candidates, print the table, log the MLflow run; returns the table."""
    console = console or report_console()
    if (opts.logs is None) == (opts.run_id is None):
        raise ValueError("give exactly one of --logs FOLDER or --run-id RUN")
    catalog = load_catalog(opts.catalog) if opts.catalog else load_catalog()
    config = load_config(opts.policy_file) if opts.policy_file else load_config()
    candidates = dict(parse_candidate(spec) for spec in opts.candidates)
    opts.out.mkdir(parents=True, exist_ok=True)
    tracking_uri = opts.tracking_uri or f"sqlite:///{opts.out.resolve() / 'mlflow.db'}"
    model = RewardModel()
    with tempfile.TemporaryDirectory() as tmp:
        logs = opts.logs or _download_logs(tracking_uri, str(opts.run_id), Path(tmp))
        if not (logs / "decisions").is_dir():
            raise ValueError(f"{logs}: no decisions/ folder of Parquet segments here")
        results = evaluate(
            logs,
            candidates,
            catalog,
            config.message_classes,
            reward_model=model,
            n_bootstrap=opts.bootstrap,
            seed=opts.seed,
        )
    frame = results_frame(results)
    _print(frame, console)
    _log_run(frame, results, opts, tracking_uri, logs, model)
    return frame


def _print(frame: pd.DataFrame, console: Console) -> None:
    table = Table(title="Estimated value per decision (95% intervals)")
    for col in (
        "candidate",
        "estimator",
        "value",
        "analytic CI",
        "bootstrap CI",
        "ESS",
        "max weight",
    ):
        table.add_column(col, justify="left" if col in ("candidate", "estimator") else "right")
    for r in frame.itertuples():
        table.add_row(
            r.candidate,
            r.estimator,
            f"{r.value:.4f}",
            f"[{r.ci_low:.4f}, {r.ci_high:.4f}]",
            f"[{r.boot_low:.4f}, {r.boot_high:.4f}]" if r.boot_low == r.boot_low else "-",
            f"{r.ess:,.0f}",
            f"{r.max_weight:.1f}",
        )
    console.print(table)
    console.print(
        "DM's intervals use DR's influence function (cross-fitted reward model); they cannot cover"
        " the model's bias, which the gap DM − DR estimates. Prefer DR/SNDR."
    )


def _plot(frame: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.35 * len(frame)))
    labels = [f"{c} · {e}" for c, e in zip(frame["candidate"], frame["estimator"], strict=True)]
    y = range(len(frame))
    ax.errorbar(
        frame["value"],
        y,
        xerr=[frame["value"] - frame["ci_low"], frame["ci_high"] - frame["value"]],
        fmt="o",
        capsize=3,
    )
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("estimated reward per decision (95% interval)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def weights_frame(results: Mapping[str, CandidateResult]) -> pd.DataFrame:
    """Per candidate and weight bin: the bin's edges, its share of decisions and P(W ≥ low)."""
    rows = []
    for name, res in results.items():
        hist = res.weights
        edges, ccdf = hist.ccdf()
        low = np.concatenate([[0.0], edges])  # bin 0: 0 < w < 10^low; then the log bins
        high = np.concatenate([edges, [np.inf]])
        share = hist.counts / max(hist.n, 1)
        ccdf_at_low = np.concatenate([[hist.counts.sum() / max(hist.n, 1)], ccdf])
        rows.append(
            pd.DataFrame(
                {
                    "candidate": name,
                    "w_low": low,
                    "w_high": high,
                    "share": share,
                    "ccdf": ccdf_at_low,
                    "zero_share": hist.zeros / max(hist.n, 1),
                    "ess": res.accumulator.ess,
                    "n": hist.n,
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def _plot_weights(weights: pd.DataFrame, path: Path) -> None:
    """Histogram (share per log bin) and CCDF of w = π_e/π_0 per candidate, ESS in the legend."""
    fig, (hist_ax, ccdf_ax) = plt.subplots(1, 2, figsize=(11, 4.6))
    seen = weights[(weights["share"] > 0) & (weights["w_low"] > 0)]
    span = (seen["w_low"].min() / 2, seen["w_high"].replace(np.inf, np.nan).max() * 2)
    for name, g in weights.groupby("candidate", sort=False):
        inner = g.iloc[1:-1]  # the log-spaced bins; under/overflow shares stay in the CSV
        first = g.iloc[0]
        label = (
            f"{name}: ESS {first['ess']:,.0f} of {first['n']:,}, "
            f"w = 0 for {first['zero_share']:.0%}"
        )
        hist_ax.stairs(inner["share"], np.append(inner["w_low"], inner["w_high"].iloc[-1]))
        ccdf_ax.step(g["w_low"].iloc[1:], g["ccdf"].iloc[1:], where="post", label=label)
    hist_ax.set_xscale("log")
    hist_ax.set_xlabel("importance weight w = π_e(a|x) / π_0(a|x) (log scale)")
    hist_ax.set_ylabel("share of decisions")
    hist_ax.set_title("weight distribution")
    ccdf_ax.set_xscale("log")
    ccdf_ax.set_yscale("log")
    ccdf_ax.set_xlabel("w (log scale)")
    ccdf_ax.set_ylabel("P(W ≥ w)")
    ccdf_ax.set_title("tail of the weights (CCDF)")
    for ax in (hist_ax, ccdf_ax):
        ax.grid(alpha=0.3, which="both")
        if np.all(np.isfinite(span)):
            ax.set_xlim(*span)
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + len(seen["candidate"].unique()) // 2), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log_run(
    frame: pd.DataFrame,
    results: Mapping[str, CandidateResult],
    opts: EvaluateOptions,
    tracking_uri: str,
    logs: Path,
    model: RewardModel,
) -> None:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(opts.experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(
            opts.experiment,
            artifact_location=None
            if opts.tracking_uri
            else (opts.out.resolve() / "mlartifacts").as_uri(),
        )
    )
    run = client.create_run(exp_id, run_name="evaluate " + ", ".join(opts.candidates))
    rid = run.info.run_id
    client.log_param(rid, "candidates", "; ".join(opts.candidates)[:6000])
    client.log_param(rid, "logs", str(opts.run_id or logs))
    client.log_param(rid, "bootstrap", opts.bootstrap)
    client.log_param(rid, "reward_model", f"ridge, hashed carrier×context, alpha={model.alpha}")
    client.log_param(rid, "crossfit_folds", model.n_folds)
    for r in frame.itertuples():
        key = f"{r.candidate}.{r.estimator}".replace(":", "_").replace(",", "_").replace("=", "_")
        for name in ("value", "ci_low", "ci_high", "ess"):
            client.log_metric(rid, f"{key}.{name}", float(getattr(r, name)))
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "estimates.csv"
        frame.to_csv(csv, index=False)
        png = Path(tmp) / "estimates.png"
        _plot(frame, png)
        weights = weights_frame(results)
        weights_csv = Path(tmp) / "weights.csv"
        weights.to_csv(weights_csv, index=False)
        weights_png = Path(tmp) / "weights.png"
        _plot_weights(weights, weights_png)
        for path in (csv, png, weights_csv, weights_png):
            client.log_artifact(rid, str(path))
    client.set_terminated(rid)

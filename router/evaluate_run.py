"""`router evaluate`: off-policy estimates of candidate policies on logged decisions, to MLflow.

Logs come from a folder (a serving data dir's `decision_log/`) or from an MLflow run's
`decision_log` artifacts; candidates are built-in rules with parameters or a user's
`module:Class`. Prints a table and logs a run with the estimates, their intervals and a plot.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from carriers.catalog import load_catalog
from router.config import load_config
from router.evaluation import Candidate, RewardModel, evaluate, make_candidate, results_frame


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
    client = MlflowClient(tracking_uri)
    local = client.download_artifacts(run_id, "decision_log", str(into))
    return Path(local)


def run_evaluation(opts: EvaluateOptions, console: Console | None = None) -> pd.DataFrame:
    """Evaluate the candidates, print the table, log the MLflow run; returns the table."""
    console = console or Console()
    if (opts.logs is None) == (opts.run_id is None):
        raise ValueError("give exactly one of --logs FOLDER or --run-id RUN")
    catalog = load_catalog(opts.catalog) if opts.catalog else load_catalog()
    config = load_config(opts.policy_file) if opts.policy_file else load_config()
    candidates = dict(parse_candidate(spec) for spec in opts.candidates)
    opts.out.mkdir(parents=True, exist_ok=True)
    tracking_uri = opts.tracking_uri or f"sqlite:///{opts.out.resolve() / 'mlflow.db'}"
    with tempfile.TemporaryDirectory() as tmp:
        logs = opts.logs or _download_logs(tracking_uri, str(opts.run_id), Path(tmp))
        if not (logs / "decisions").is_dir():
            raise ValueError(f"{logs}: no decisions/ folder of Parquet segments here")
        results = evaluate(
            logs,
            candidates,
            catalog,
            config.message_classes,
            reward_model=RewardModel(),
            n_bootstrap=opts.bootstrap,
            seed=opts.seed,
        )
    frame = results_frame(results)
    _print(frame, console)
    _log_run(frame, opts, tracking_uri, logs)
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


def _log_run(frame: pd.DataFrame, opts: EvaluateOptions, tracking_uri: str, logs: Path) -> None:
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
    for r in frame.itertuples():
        key = f"{r.candidate}.{r.estimator}".replace(":", "_").replace(",", "_").replace("=", "_")
        for name in ("value", "ci_low", "ci_high", "ess"):
            client.log_metric(rid, f"{key}.{name}", float(getattr(r, name)))
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "estimates.csv"
        frame.to_csv(csv, index=False)
        png = Path(tmp) / "estimates.png"
        _plot(frame, png)
        client.log_artifact(rid, str(csv))
        client.log_artifact(rid, str(png))
    client.set_terminated(rid)

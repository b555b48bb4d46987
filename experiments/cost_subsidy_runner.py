"""The cost-subsidy anchor: the Bernoulli setting of Sinha et al. (AISTATS 2021) played by CS-TS,
CS-UCB, CS-ETC, COF and the engine's own `cost_subsidy` policy, over several seeds with common
random numbers; cost and quality regret (mean ± sd) to MLflow, a table and curves.
"""

from __future__ import annotations

import inspect
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console
from rich.table import Table

from bandit.cost_subsidy import ALGORITHMS, Algorithm, Instance, bernoulli_luck, play
from bandit.cost_subsidy import cost_regret as cost_regret_curve
from bandit.cost_subsidy import quality_regret as quality_regret_curve
from bandit.model import CarrierModel, Observation, RouteKey
from bandit.policies import POLICIES, Arm, DecisionContext, draw, make_policy
from bandit.reward import MessageClass
from experiments.tracking import log_values, mlflow_experiment
from experiments.world import SCENARIOS, ScenarioError
from router.console import report_console
from router.log.tracking import default_artifact_location, default_tracking_uri

SPEC = SCENARIOS / "cost_subsidy" / "bernoulli.yaml"
SPECS = sorted(SPEC.parent.glob("*.yaml"))  # every shipped cost-subsidy experiment
EXPERIMENT = "cost-subsidy"
ENGINE = "engine cost_subsidy"
ENGINE_NO_FLOOR = "engine cost_subsidy, no floor"


class InstanceSpec(BaseModel):
    """One Bernoulli instance: mean quality and cost per arm, subsidy factor α."""

    model_config = ConfigDict(extra="forbid")
    name: str
    source: str = ""
    means: list[float] = Field(min_length=2)
    costs: list[float] = Field(min_length=2)
    alpha: float = Field(ge=0, lt=1)

    @model_validator(mode="after")
    def _same_length(self) -> InstanceSpec:
        if len(self.means) != len(self.costs):
            raise ValueError("means and costs need one entry per arm")
        if not all(0 <= m <= 1 for m in self.means) or any(c < 0 for c in self.costs):
            raise ValueError("means must be in [0, 1] and costs >= 0")
        return self

    def instance(self) -> Instance:
        """The instance as the algorithms see it."""
        return Instance(self.name, np.array(self.means), np.array(self.costs), self.alpha)


class CostSubsidySpec(BaseModel):
    """A cost-subsidy experiment file."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    horizon: int = Field(gt=10)
    seeds: int = Field(ge=1)
    checkpoints: int = Field(20, ge=2)
    sweep_arm: int | None = Field(
        None, ge=0, description="the arm whose quality the instances sweep (compact tables, plot)"
    )
    instances: list[InstanceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _sweep_arm_exists(self) -> CostSubsidySpec:
        if self.sweep_arm is not None and any(
            self.sweep_arm >= len(i.means) for i in self.instances
        ):
            raise ValueError("sweep_arm must be an arm of every instance")
        return self

    def swept(self, instance: InstanceSpec) -> float:
        """The swept arm's quality in an instance."""
        return instance.means[self.sweep_arm or 0]


def load_spec(path: str | Path = SPEC) -> CostSubsidySpec:
    """Load and validate a cost-subsidy experiment file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return CostSubsidySpec.model_validate(raw)
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        msgs = [
            f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        raise ScenarioError(f"{path}: " + "; ".join(msgs)) from None


class EngineCostSubsidy:
    """The engine's `cost_subsidy` policy on a Bernoulli instance: our posterior (CarrierModel)
    learns each pull's answer, the policy gives π and the carrier is drawn from it, as in serving.
    One round is one second of event time."""

    _CLASS = MessageClass("bernoulli", value=1.0, sla_seconds=60.0)
    _KEY = RouteKey("ZZ", "", 0)

    def __init__(self, costs: np.ndarray, alpha: float, seed: int, **params: float) -> None:
        self.model = CarrierModel()
        self.policy = make_policy(
            "cost_subsidy", self.model, seed=seed, subsidy=alpha, cache_seconds=0.0, **params
        )
        self.arms = [Arm(f"arm{i}", float(c)) for i, c in enumerate(costs)]
        self.t = 0.0

    def select(self, rng: np.random.Generator) -> int:
        """π from the policy, then a draw from it."""
        ctx = DecisionContext(self._KEY, self._CLASS, 1, self.t)
        return draw(self.policy.distribution(ctx, self.arms), self.policy.rng)

    def update(self, arm: int, reward: float) -> None:
        """The pull's answer reaches the model one second later."""
        self.t += 1.0
        self.model.update(Observation(self.arms[arm].carrier, self._KEY, bool(reward), self.t))


def contenders(instance: Instance, horizon: int, seed: int) -> dict[str, Algorithm]:
    """Every algorithm that plays, fresh for one seed."""
    args = (instance.costs, instance.alpha, horizon)
    out: dict[str, Algorithm] = {name: cls(*args) for name, cls in ALGORITHMS.items()}
    out[ENGINE] = EngineCostSubsidy(instance.costs, instance.alpha, seed)
    out[ENGINE_NO_FLOOR] = EngineCostSubsidy(
        instance.costs, instance.alpha, seed, exploration_floor=0.0
    )
    return out


@dataclass
class CostSubsidyResult:
    """Regret curves (seeds × checkpoints) per instance and algorithm, and the summary table."""

    spec: CostSubsidySpec
    rounds: np.ndarray
    curves: dict[tuple[str, str], dict[str, np.ndarray]]
    table: pd.DataFrame
    tracking_uri: str
    run_ids: dict[tuple[str, str], str]


def run_cost_subsidy(
    spec_path: str | Path | None = None,
    out: Path = Path("experiments_out"),
    tracking_uri: str | None = None,
    console: Console | None = None,
) -> CostSubsidyResult:
    """Play every algorithm on every instance for every seed; log to MLflow; print the table."""
    console = console or report_console()
    spec = load_spec(spec_path or SPEC)
    horizon = spec.horizon
    rounds = np.unique(np.linspace(1, horizon, spec.checkpoints).astype(int))
    curves: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for ispec in spec.instances:
        inst = ispec.instance()
        for seed in range(spec.seeds):
            luck = bernoulli_luck(len(inst.means), horizon, np.random.default_rng([seed, 0]))
            for i, (name, algo) in enumerate(contenders(inst, horizon, seed).items()):
                pulls = play(inst, algo, luck, np.random.default_rng([seed, 1 + i]))
                c = curves.setdefault((ispec.name, name), {"cost": [], "quality": []})
                c["cost"].append(cost_regret_curve(inst, pulls)[rounds - 1])
                c["quality"].append(quality_regret_curve(inst, pulls)[rounds - 1])
    curves = {k: {m: np.array(v) for m, v in c.items()} for k, c in curves.items()}
    table = summary(curves, spec)
    uri = tracking_uri or default_tracking_uri(out)
    run_ids = _log(MlflowClient(uri), spec, rounds, curves, table, default_artifact_location(out))
    console.print(_rich(table, f"{spec.name}: T={horizon}, {spec.seeds} seeds (mean ± sd)"))
    console.print(f"MLflow: {uri}, experiment {EXPERIMENT!r}")
    return CostSubsidyResult(spec, rounds, curves, table, uri, run_ids)


def summary(
    curves: dict[tuple[str, str], dict[str, np.ndarray]], spec: CostSubsidySpec
) -> pd.DataFrame:
    """One row per (instance, algorithm): cost and quality regret at T, mean and sd over seeds."""
    rows = []
    for (instance, algo), c in curves.items():
        rows.append(
            {
                "instance": instance,
                "algorithm": algo,
                "cost_regret": c["cost"][:, -1].mean(),
                "cost_regret_sd": c["cost"][:, -1].std(ddof=1) if spec.seeds > 1 else 0.0,
                "quality_regret": c["quality"][:, -1].mean(),
                "quality_regret_sd": c["quality"][:, -1].std(ddof=1) if spec.seeds > 1 else 0.0,
            }
        )
    return pd.DataFrame(rows).set_index(["instance", "algorithm"])


def plot_instance(
    name: str, rounds: np.ndarray, curves: dict[str, dict[str, np.ndarray]], path: Path
) -> Path:
    """Cost and quality regret over rounds (mean ± sd band), one line per algorithm."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("cost", "quality"), strict=True):
        for algo, c in curves.items():
            mean, sd = c[metric].mean(axis=0), c[metric].std(axis=0)
            ax.plot(rounds, mean, label=algo)
            ax.fill_between(rounds, mean - sd, mean + sd, alpha=0.15)
        ax.set(xlabel="round", ylabel=f"cumulative {metric} regret", title=f"{name}: {metric}")
    axes[0].legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_sweep(spec: CostSubsidySpec, table: pd.DataFrame, path: Path) -> Path:
    """Cost and quality regret at T against the swept arm's quality (mean ± sd), one line per
    algorithm: where each algorithm pays, and how much, as the swept arm crosses feasibility."""
    x = [spec.swept(i) for i in spec.instances]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("cost_regret", "quality_regret"), strict=True):
        for algo in table.index.get_level_values("algorithm").unique():
            rows = table.xs(algo, level="algorithm").loc[[i.name for i in spec.instances]]
            ax.errorbar(x, rows[metric], yerr=rows[f"{metric}_sd"], label=algo, marker="o", ms=3)
        label = metric.replace("_", " ")
        ax.set(xlabel=f"quality of arm {spec.sweep_arm}", ylabel=f"{label} at T", title=label)
    axes[1].legend(loc="upper right", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _log(
    client: MlflowClient,
    spec: CostSubsidySpec,
    rounds: np.ndarray,
    curves: dict[tuple[str, str], dict[str, np.ndarray]],
    table: pd.DataFrame,
    artifact_location: str,
) -> dict[tuple[str, str], str]:
    """A parent run with the table and plots; a child run per (instance, algorithm)."""
    exp = mlflow_experiment(client, EXPERIMENT, artifact_location)
    parent = client.create_run(exp, run_name=f"summary {spec.name}").info.run_id
    ids = {}
    for (instance, algo), c in curves.items():
        rid = client.create_run(
            exp, run_name=f"{instance} / {algo}", tags={"mlflow.parentRunId": parent}
        ).info.run_id
        ispec = next(i for i in spec.instances if i.name == instance)
        params = {"instance": instance, "algorithm": algo, "alpha": ispec.alpha}
        params |= {"horizon": spec.horizon, "seeds": spec.seeds, "means": ispec.means}
        params |= {"costs": ispec.costs}
        log_values(client, rid, params, table.loc[(instance, algo)].to_dict())
        for step, cost, quality in zip(
            rounds, c["cost"].mean(axis=0), c["quality"].mean(axis=0), strict=True
        ):
            client.log_metric(rid, "cost_regret_curve", float(cost), step=int(step))
            client.log_metric(rid, "quality_regret_curve", float(quality), step=int(step))
        client.set_terminated(rid)
        ids[(instance, algo)] = rid
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "cost_subsidy.csv"
        table.to_csv(csv)
        client.log_artifact(parent, str(csv))
        for ispec in spec.instances:
            mine = {a: c for (i, a), c in curves.items() if i == ispec.name}
            png = plot_instance(ispec.name, rounds, mine, Path(tmp) / f"{ispec.name}.png")
            client.log_artifact(parent, str(png), "plots")
        if spec.sweep_arm is not None:
            client.log_artifact(parent, str(plot_sweep(spec, table, Path(tmp) / "sweep.png")))
    log_values(client, parent, {"spec": spec.name, "horizon": spec.horizon}, {})
    client.set_terminated(parent)
    return ids


def _cell(mean: float, sd: float) -> str:
    return f"{mean:,.1f} ± {sd:,.1f}"


def _rich(table: pd.DataFrame, title: str) -> Table:
    out = Table(title=title, title_justify="left")
    for col in ("instance", "algorithm", "cost regret", "quality regret"):
        out.add_column(col, justify="left" if col in ("instance", "algorithm") else "right")
    for (instance, algo), row in table.iterrows():
        out.add_row(
            str(instance),
            str(algo),
            _cell(row["cost_regret"], row["cost_regret_sd"]),
            _cell(row["quality_regret"], row["quality_regret_sd"]),
        )
    return out


def markdown(result: CostSubsidyResult) -> list[str]:
    """The RESULTS.md section: what was played, then one table per instance, or for a sweep one
    table per regret with a row per instance."""
    spec = result.spec
    floor = inspect.signature(POLICIES["cost_subsidy"].__init__).parameters["exploration_floor"]
    lines = [
        f"## Cost subsidy ({spec.name})",
        "",
        " ".join(spec.description.split()),
        f"Horizon T = {spec.horizon}, {spec.seeds} seeds; cumulative regret at T, mean ± sd "
        "over seeds. Cost regret is Σ max(c(pulled) − c(target), 0), quality regret "
        "Σ max((1−α)μ* − μ(pulled), 0); the target is the cheapest arm with μ ≥ (1−α)μ*. "
        f"`{ENGINE}` is the engine's policy with its serving defaults ({floor.default:.1%} "
        f"exploration floor); `{ENGINE_NO_FLOOR}` the same without the floor.",
    ]
    if spec.sweep_arm is not None:
        return lines + _sweep_tables(result)
    for ispec in spec.instances:
        inst = ispec.instance()
        lines += [
            "",
            f"### {ispec.name}",
            "",
            f"μ = {ispec.means}, c = {ispec.costs}, α = {ispec.alpha}: target arm {inst.target} "
            f"(threshold {inst.threshold:.3f}). Source: {ispec.source}.",
            "",
            "| algorithm | cost regret | quality regret |",
            "|---|---|---|",
        ]
        for algo, row in result.table.loc[ispec.name].iterrows():
            lines.append(
                f"| {algo} | {_cell(row['cost_regret'], row['cost_regret_sd'])} | "
                f"{_cell(row['quality_regret'], row['quality_regret_sd'])} |"
            )
    return lines


def _sweep_tables(result: CostSubsidyResult) -> list[str]:
    """Cost regret, then quality regret: a row per swept quality, a column per algorithm."""
    spec, table = result.spec, result.table
    algos = list(table.index.get_level_values("algorithm").unique())
    lines: list[str] = []
    for metric in ("cost_regret", "quality_regret"):
        lines += [
            "",
            f"### {metric.replace('_', ' ')} (the summary run's `sweep.png` plots both)",
            "",
            f"| arm {spec.sweep_arm} quality | target | {' | '.join(algos)} |",
            "|---|---|" + "---|" * len(algos),
        ]
        for ispec in spec.instances:
            rows = table.loc[ispec.name]
            cells = [_cell(rows.loc[a, metric], rows.loc[a, f"{metric}_sd"]) for a in algos]
            target = f"arm {ispec.instance().target}"
            lines.append(f"| {spec.swept(ispec):.2f} | {target} | " + " | ".join(cells) + " |")
    return lines

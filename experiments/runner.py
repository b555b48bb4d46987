"""Policy comparisons on one scenario: every policy and the oracle play the same traffic and the
same luck (common random numbers) through the engine's own decision code; each policy's run goes
to MLflow (parameters, metrics, plots, its decision log), with a summary run over them all.
"""

from __future__ import annotations

import math
import multiprocessing
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from queue import Queue
from typing import Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bandit.policies import POLICIES
from carriers.catalog import Catalog, load_catalog
from experiments.cost_subsidy_runner import SPECS, markdown, run_cost_subsidy
from experiments.metrics import (
    REACTION_MIN_DECISIONS,
    REACTION_SHARE,
    cumulative_luck_free_regret,
    cumulative_regret,
    regret,
    run_metrics,
    traffic_split,
)
from experiments.oracle import Judge, use_oracle
from experiments.peers import PEERS, PeerEngine, missing_library, use_peer
from experiments.play import play
from experiments.plots import plot_regret, plot_split
from experiments.results_file import worlds_section
from experiments.tracking import log_values, mlflow_experiment
from experiments.world import SCENARIOS, World, load_scenario
from router.console import report_console
from router.core.config import EngineConfig, load_config
from router.core.engine import EngineOptions, RoutingEngine
from router.log.decision_log import DecisionLog
from router.log.tracking import default_artifact_location, default_tracking_uri

BASELINES = ("thompson", "cheapest", "static", "uniform", "round_robin", "epsilon_greedy")
COMPARED = (*BASELINES, "cost_subsidy", *PEERS)  # what `router experiment results` plays
ALIASES = {"ts": "thompson", "eg": "epsilon_greedy", "rr": "round_robin"}
ORACLE = "oracle"
SUMMARY_COLUMNS = {  # metric: short header for the printed and Markdown tables
    "utility": "utility",
    "regret": "regret",
    "regret_pct": "regret %",
    "success_within_sla_rate": "success in SLA",
    "dlr_delivered_rate": "DLR delivered",
    "cost_per_delivered": "cost/delivered",
    "conversion_rate": "conversion",
    "outage_reaction_s": "reaction s",
    "expected_regret_pct": "luck-free regret %",
}
LUCK_FREE = "cumulative luck-free regret (expected utility)"
SPREAD_COLUMNS = {"utility_sd": "utility sd", "regret_pct_sd": "regret % sd"}  # several seeds


@dataclass
class PolicyRun:
    """One policy played through the scenario."""

    policy: str
    params: dict[str, Any]
    version: str
    frame: pd.DataFrame
    log_dir: Path
    metrics: dict[str, float]


@dataclass
class ExperimentResult:
    """Every policy's run, the summary table and where MLflow has them."""

    scenario: str
    seed: int
    runs: dict[str, PolicyRun]
    summary: pd.DataFrame
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    run_ids: dict[str, str]


class UnknownPolicy(ValueError):
    """A policy name that is neither an engine policy nor an alias of one."""


def parse_policies(text: str) -> list[str]:
    """Policy names from a comma-separated list (aliases: ts, eg, rr); the oracle is implicit."""
    names = [ALIASES.get(n.strip(), n.strip()) for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES and n not in PEERS and n != ORACLE]
    if unknown:
        known = ", ".join(sorted([*POLICIES, *PEERS]))
        raise UnknownPolicy(f"unknown policy {unknown}; known: {known}")
    return [n for n in dict.fromkeys(names) if n != ORACLE]


def play_policy(
    policy: str,
    world: World,
    config: EngineConfig,
    seed: int,
    log_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> PolicyRun:
    """Play the world through a fresh engine serving `policy`, logging its decisions."""
    if policy not in (ORACLE, config.policy, *PEERS):
        config = config.with_policy(policy)
    log = DecisionLog(log_dir)
    engine = (PeerEngine if policy in PEERS else RoutingEngine)(
        world.catalog,
        config.with_seed(seed),
        EngineOptions(max_future_skew_seconds=None),
        log_decision=log.log_decision,
        log_outcome=log.log_outcome,
    )
    if policy == ORACLE:
        use_oracle(engine, world, seed)
    elif policy in PEERS:
        use_peer(engine, policy, seed)
    try:
        judge = Judge(world, config.model.band_hours)
        frame = play(engine, world, seed=seed, progress=progress, judge=judge)
    finally:
        log.close()
    metrics = run_metrics(frame, world, config.message_classes)
    return PolicyRun(policy, engine.policy.params(), engine.policy.version, frame, log_dir, metrics)


def run_experiment(
    scenario: str | Path,
    policies: Sequence[str] = BASELINES,
    seed: int = 1,
    out: Path = Path("experiments_out"),
    tracking_uri: str | None = None,
    catalog: Catalog | None = None,
    config: EngineConfig | None = None,
    console: Console | None = None,
    jobs: int = 1,
) -> ExperimentResult:
    """Play the oracle and every policy on the scenario, log them to MLflow, print a summary.

    With `jobs` > 1 the policies play in that many processes at once; each play is a fresh
    engine on the same world and seed, so the numbers do not depend on `jobs`.
    """
    console = console or report_console()
    catalog = catalog or load_catalog()
    config = config or load_config()
    world = World(load_scenario(scenario, catalog), catalog)
    name = world.spec.name
    out = Path(out)
    base = out / "runs" / name / f"seed{seed}-{time.strftime('%Y%m%dT%H%M%S')}"
    names = [ORACLE, *_playable(policies, console)]
    with _progress(console) as bar:
        runs = _play_all(names, world, config, seed, base, bar, jobs)
    for run in runs.values():
        run.metrics.update(regret(run.metrics, runs[ORACLE].metrics))
    summary = summary_table(runs)
    uri = tracking_uri or default_tracking_uri(out)
    ids = _log_to_mlflow(
        MlflowClient(uri), world, seed, runs, summary, config, default_artifact_location(out)
    )
    console.print(_rich_table(summary, f"{name} (seed {seed}): {world.spec.description.strip()}"))
    console.print(f"MLflow: {uri}, experiment {experiment_name(name)!r}")
    return ExperimentResult(name, seed, runs, summary, uri, *ids)


def _play_all(
    names: Sequence[str],
    world: World,
    config: EngineConfig,
    seed: int,
    base: Path,
    bar: Progress,
    jobs: int,
) -> dict[str, PolicyRun]:
    """Every named policy's run, in `names` order, in up to `jobs` processes, each with its bar."""
    tasks = {name: bar.add_task(name, total=None) for name in names}

    def show(name: str, done: int, total: int) -> None:
        bar.update(tasks[name], completed=done, total=max(done, total))

    if jobs <= 1 or len(names) < 2:
        return {
            n: play_policy(n, world, config, seed, base / n / "decision_log", partial(show, n))
            for n in names
        }
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads running
    with context.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=context) as pool:
        progress, stop = manager.Queue(), manager.Event()
        waiting, running, runs = list(names), {}, {}
        try:
            while waiting or running:
                while waiting and len(running) < jobs:  # a play is submitted only when it can start
                    name = waiting.pop(0)
                    job = pool.submit(
                        _play_reporting, name, world, config, seed, base, progress, stop
                    )
                    running[job] = name
                done, _ = wait(running, timeout=0.25, return_when=FIRST_COMPLETED)
                while not progress.empty():  # a play's reports are queued before it returns
                    show(*progress.get())
                for job in done:
                    runs[running.pop(job)] = job.result()
        except BaseException:
            stop.set()  # plays still running stop at their next simulated minute
            raise
    return {name: runs[name] for name in names}


class PlayStopped(RuntimeError):
    """Another play of the same experiment failed."""


def _play_reporting(
    name: str,
    world: World,
    config: EngineConfig,
    seed: int,
    base: Path,
    progress: Queue[tuple[str, int, int]],
    stop: threading.Event,
) -> PolicyRun:
    """play_policy in a worker process: progress sent back through a queue, and a stop checked
    at every report."""

    def report(done: int, total: int) -> None:
        if stop.is_set():
            raise PlayStopped(f"{name}: stopped, another play failed")
        progress.put((name, done, total))

    return play_policy(name, world, config, seed, base / name / "decision_log", report)


def _playable(policies: Sequence[str], console: Console) -> list[str]:
    """The policies that can play here: a peer whose library is missing is skipped, saying why."""
    out = []
    for policy in policies:
        reason = missing_library(policy) if policy in PEERS else None
        if reason is None:
            out.append(policy)
        else:
            console.print(f"[yellow]skipping {escape(reason)}[/yellow]")
    return out


def experiment_name(scenario: str) -> str:
    """The MLflow experiment of a scenario's comparisons."""
    return f"sim-{scenario}"


def summary_table(runs: Mapping[str, PolicyRun]) -> pd.DataFrame:
    """One row per policy (oracle first) with the headline metrics."""
    rows = {p: {c: r.metrics.get(c, math.nan) for c in SUMMARY_COLUMNS} for p, r in runs.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("policy")


def shipped_scenarios() -> list[str]:
    """Names of the shipped scenarios (the demo's own scenario aside)."""
    return sorted(p.stem for p in SCENARIOS.glob("*.yaml") if p.stem != "demo")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:>15}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _rich_table(summary: pd.DataFrame, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("policy")
    for col in summary.columns:
        table.add_column(SUMMARY_COLUMNS[col], justify="right")
    for policy, row in summary.iterrows():
        table.add_row(str(policy), *(_fmt(v) for v in row))
    return table


def _fmt(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:,.4g}"


def _log_to_mlflow(
    client: MlflowClient,
    world: World,
    seed: int,
    runs: Mapping[str, PolicyRun],
    summary: pd.DataFrame,
    config: EngineConfig,
    artifact_location: str,
) -> tuple[str, str, dict[str, str]]:
    """One run per policy under a summary run; returns (experiment, summary run, policy runs)."""
    name = world.spec.name
    exp = mlflow_experiment(client, experiment_name(name), artifact_location)
    tags = {"scenario": name, "seed": str(seed)}
    parent = client.create_run(exp, run_name=f"summary seed={seed}", tags=tags).info.run_id
    oracle = runs[ORACLE].frame
    classes = config.message_classes
    curves = {p: cumulative_regret(r.frame, oracle, world, classes) for p, r in runs.items()}
    luck_free = {p: cumulative_luck_free_regret(r.frame, world) for p, r in runs.items()}
    ids = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy, run in runs.items():
            rid = client.create_run(
                exp, run_name=policy, tags={**tags, "mlflow.parentRunId": parent}
            ).info.run_id
            params = {"policy": policy, "policy_version": run.version, "scenario": name}
            params |= {"seed": seed, **{f"param.{k}": v for k, v in run.params.items()}}
            log_values(client, rid, params, run.metrics)
            plots = Path(tmp) / policy
            plot_regret({policy: curves[policy]}, plots / "cumulative_regret.png", policy)
            plot_regret(
                {policy: luck_free[policy]}, plots / "luck_free_regret.png", policy, LUCK_FREE
            )
            split = traffic_split(run.frame, world)
            plot_split(split, plots / "traffic_split.png", f"{policy}: traffic split")
            client.log_artifacts(rid, str(plots), "plots")
            client.log_artifacts(rid, str(run.log_dir), "decision_log")
            client.set_terminated(rid)
            ids[policy] = rid
        csv = Path(tmp) / "summary.csv"
        summary.to_csv(csv)
        client.log_artifact(parent, str(csv))
        client.log_artifact(
            parent, str(plot_regret(curves, Path(tmp) / "cumulative_regret.png", name))
        )
        lf_plot = plot_regret(luck_free, Path(tmp) / "luck_free_regret.png", name, LUCK_FREE)
        client.log_artifact(parent, str(lf_plot))
    log_values(client, parent, {"scenario": name, "seed": seed, "policies": ",".join(runs)}, {})
    client.set_terminated(parent)
    return exp, parent, ids


def write_results(
    path: Path,
    policies: Sequence[str] = BASELINES,
    seed: int = 1,
    out: Path = Path("experiments_out"),
    tracking_uri: str | None = None,
    console: Console | None = None,
    seeds: int = 1,
    jobs: int = 1,
) -> Path:
    """Run every shipped scenario for `seeds` seeds from `seed` (policies in `jobs` processes),
    then the cost-subsidy anchor, and write the tables as Markdown (a generated file)."""
    runs = list(range(seed, seed + seeds))
    over = (
        ""
        if seeds == 1
        else (
            f" Each row is the mean over seeds {runs[0]}..{runs[-1]} (sd: their standard "
            "deviation; reaction s: the slowest seed's)."
        )
    )
    sections = [
        "# Simulated policy comparisons",
        "",
        f"Generated by `router experiment results --seed {seed} --seeds {seeds}`; do not edit "
        "by hand. Every policy plays the same traffic with the same luck (common random numbers, "
        "shared across carriers: an attempt draws the same numbers whichever carrier sends it) "
        "through the engine's decision code; the oracle knows the world's true parameters. "
        "Utility is value·(delivered within SLA) − cost − latency penalty, summed over all "
        "attempts; regret is the oracle's utility minus the policy's (% of the oracle's); outage "
        "reaction is event seconds from the outage's start until the failed route's share of its "
        f"country's traffic, from then to the outage's end, is under {REACTION_SHARE:.0%} (over "
        f"at least {REACTION_MIN_DECISIONS} decisions; — when it never is, or there is no "
        f"outage).{over} Peers (mabwiser_ts, pybandits_cc, vw_cb_adf) learn from the same answers "
        "at the same event times as the engine. Luck-free regret % is the same regret without the "
        "outcomes' luck (the bandit literature's pseudo-regret): per decision, the best true "
        "expected utility among the carriers that were eligible minus that of the one chosen, by "
        "the oracle's formulas, summed (% of the oracle's utility). Where two routes are nearly "
        "equal, policies that pick differently face different draws, and their utilities differ "
        "by luck; the verdicts give the paired standard error of such a difference over the seeds.",
    ]
    for scenario in shipped_scenarios():
        summaries = [
            run_experiment(
                scenario, policies, s, out, tracking_uri, console=console, jobs=jobs
            ).summary
            for s in runs
        ]
        table = mean_over_seeds(summaries)
        spec = load_scenario(scenario)
        sections += ["", f"## {scenario}", "", " ".join(spec.description.split()), ""]
        sections += [_markdown(table), "", verdict(table, seeds=summaries)]
    for spec in SPECS:
        result = run_cost_subsidy(spec, out=out, tracking_uri=tracking_uri, console=console)
        sections += ["", *markdown(result)]
    # The generated worlds' section (`router experiment worlds`) is kept as it was.
    kept = worlds_section(path.read_text(encoding="utf-8")) if path.exists() else None
    sections += ["", kept] if kept else []
    path.write_text("\n".join(sections) + "\n", encoding="utf-8")
    return path


def mean_over_seeds(summaries: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Seeds' summary tables as one: means, the slowest reaction, and the spread of utility and
    regret % (when there is more than one seed)."""
    if len(summaries) == 1:
        return summaries[0]
    stacked = pd.concat(summaries)
    grouped = stacked.groupby(level="policy", sort=False)
    table = grouped.mean()
    table["outage_reaction_s"] = grouped["outage_reaction_s"].max()
    table["utility_sd"] = grouped["utility"].std()
    table["regret_pct_sd"] = grouped["regret_pct"].std()
    return table


def verdict(
    table: pd.DataFrame, default: str = "thompson", seeds: Sequence[pd.DataFrame] = ()
) -> str:
    """Generated sentences: does the default policy beat every other policy on utility (with the
    paired standard error of a difference when there are several seeds' tables), and on the
    luck-free regret?"""
    if default not in table.index:
        return ""
    base = table.loc[default, "utility"]
    others = table.drop(index=[ORACLE, default], errors="ignore")
    better = others[others["utility"] > base]
    if better.empty:
        out = f"`{default}` has the highest utility of every policy but the oracle."
    else:
        beaten = ", ".join(
            f"{p} (+{u - base:,.4g}{_paired(seeds, p, default)})"
            for p, u in better["utility"].items()
        )
        out = f"`{default}` is beaten on utility by: {beaten}."
    if "expected_regret_pct" not in table:
        return out
    luck_free = table["expected_regret_pct"].drop(index=ORACLE, errors="ignore").dropna()
    if default in luck_free.index and len(luck_free) > 1:
        mine = luck_free[default]
        ahead = luck_free.drop(index=default)
        ahead = ahead[ahead < mine]
        if ahead.empty:
            out += f" Its luck-free regret ({mine:.3g}%) is the lowest of all policies."
        else:
            names = ", ".join(f"{p} ({r:.3g}%)" for p, r in ahead.items())
            out += f" Its luck-free regret ({mine:.3g}%) is above that of: {names}."
    return out


def _paired(seeds: Sequence[pd.DataFrame], policy: str, default: str) -> str:
    """' ± se over n seeds' of the per-seed utility difference, noting when it is within noise
    (under two standard errors); empty with fewer than two seeds."""
    diffs = np.array([s.loc[policy, "utility"] - s.loc[default, "utility"] for s in seeds])
    if len(diffs) < 2:
        return ""
    se = float(diffs.std(ddof=1)) / math.sqrt(len(diffs))
    noise = ", within noise" if abs(diffs.mean()) < 2 * se else ""
    return f" ± {se:,.2g} paired se over {len(diffs)} seeds{noise}"


def _markdown(summary: pd.DataFrame) -> str:
    names = SUMMARY_COLUMNS | SPREAD_COLUMNS
    head = ["policy", *(names[c] for c in summary.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for policy, row in summary.iterrows():
        lines.append("| " + " | ".join([str(policy), *(_fmt(v) for v in row)]) + " |")
    return "\n".join(lines)

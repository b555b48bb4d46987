"""Every policy and peer on many generated worlds and seeds: the learner on worlds it was not
tuned on. Each (world, seed) plays the oracle and every policy on the same traffic and luck, in
one process (worlds × seeds spread over `jobs` processes); the tables go into RESULTS.md between
the worlds markers.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from experiments.metrics import REACTION_SHARE, reaction_time, regret, routed, run_metrics
from experiments.oracle import Judge, use_oracle
from experiments.peers import PEERS, PeerEngine, missing_library, use_peer
from experiments.play import play
from experiments.results_file import MARK_END, MARK_START, splice_section
from experiments.world import World
from experiments.worldgen import GeneratedWorld, WorldGenConfig, generate_world
from router.core.config import EngineConfig, load_config
from router.core.engine import EngineOptions, RoutingEngine

ORACLE = "oracle"
DEFAULT = "thompson"
GREY_AFTER_MIN = 60.0  # grey-route share is measured after the world's first hour
RECOVERY_WINDOW_MIN = (30.0, 60.0)  # a recovered route's share, this long after the outage
TARGETS = {
    "regret_median": 1.5,
    "regret_p90": 3.0,
    "reaction_s": 900.0,
    "grey_share": 0.01,
    "recovery": 0.9,
}


# ---- one world, one seed ------------------------------------------------------------------


def play_quiet(policy: str, world: World, config: EngineConfig, seed: int) -> pd.DataFrame:
    """`runner.play_policy` without the decision log: a fresh engine serving `policy`."""
    if policy not in (ORACLE, config.policy, *PEERS):
        config = config.with_policy(policy)
    engine = (PeerEngine if policy in PEERS else RoutingEngine)(
        world.catalog, config.with_seed(seed), EngineOptions(max_future_skew_seconds=None)
    )
    if policy == ORACLE:
        use_oracle(engine, world, seed)
    elif policy in PEERS:
        use_peer(engine, policy, seed)
    return play(engine, world, seed=seed, judge=Judge(world, config.model.band_hours))


def event_metrics(frame: pd.DataFrame, gw: GeneratedWorld, world: World) -> dict[str, Any]:
    """Outage reactions (loud and silent), attempts sent into silent outages, grey-route share
    after the first hour and recovered routes' share after their outage, from a play's frame."""
    df = routed(frame)
    first = df[df["attempt"] == 1].sort_values("at")
    out: dict[str, Any] = {"loud": [], "silent": [], "recovery": []}
    silent_sent = 0
    for ev in world.spec.events:
        if ev.kind not in ("loud_outage", "silent_outage"):
            continue
        out[ev.kind.split("_")[0]].append(reaction_time(first, world, ev))
        start = world.start + 60 * ev.at_minute
        end = start + 60 * ev.minutes
        if ev.kind == "silent_outage":
            into = df[(df["country"] == ev.country) & (df["carrier"] == ev.carrier)]
            silent_sent += int(((into["at"] >= start) & (into["at"] < end)).sum())
        here = first[first["country"] == ev.country]

        def share(lo: float, hi: float, here: pd.DataFrame = here, carrier: str = ev.carrier):
            part = here[(here["at"] >= lo) & (here["at"] < hi)]
            return (part["carrier"] == carrier).mean() if len(part) >= 10 else math.nan

        before = share(start - 3600, start)
        lo, hi = RECOVERY_WINDOW_MIN
        if end + 60 * hi <= world.end and before >= 0.2:
            out["recovery"].append(share(end + 60 * lo, end + 60 * hi) / before)
    out["silent_sent"] = silent_sent if out["silent"] else math.nan
    late = first[first["at"] >= world.start + 60 * GREY_AFTER_MIN]
    grey_n, scope_n = 0, 0
    for carrier, country, operator in gw.grey:
        scope = late[late["country"] == country]
        if operator is not None:
            scope = scope[scope["operator"] == operator]
        grey_n += int((scope["carrier"] == carrier).sum())
        scope_n += len(scope)
    out["grey_share"] = grey_n / scope_n if scope_n else math.nan
    return out


def run_world(
    world_seed: int,
    seed: int,
    policies: Sequence[str],
    gen: WorldGenConfig,
    config: EngineConfig | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Play the oracle and every policy on one generated world with one seed: per policy its
    regret (realized and luck-free, % of the oracle's utility) and event metrics."""
    config = config or load_config()
    gw = generate_world(world_seed, gen)
    world = gw.world()
    rows: dict[str, dict[str, Any]] = {}
    oracle: dict[str, float] = {}
    started = time.perf_counter()
    for policy in (ORACLE, *policies):
        frame = play_quiet(policy, world, config, seed)
        metrics = run_metrics(frame, world, config.message_classes)
        if policy == ORACLE:
            oracle = metrics
        metrics |= regret(metrics, oracle)
        rows[policy] = {
            "regret_pct": metrics["regret_pct"],
            "expected_regret_pct": metrics["expected_regret_pct"],
            "utility": metrics["utility"],
            **event_metrics(frame, gw, world),
        }
        if report is not None:
            report(policy)
    return {
        "world": gw.id,
        "world_seed": world_seed,
        "seed": seed,
        "labels": gw.event_labels(),
        "size": f"{len(gw.spec.traffic.countries)}×{len(gw.catalog.carriers)}",
        "messages": int(frame["index"].nunique()),
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }


def _run_world_task(args: tuple[Any, ...]) -> dict[str, Any]:
    world_seed, seed, policies, gen = args
    return run_world(world_seed, seed, policies, gen)


# ---- many worlds --------------------------------------------------------------------------


def run_worlds(
    worlds: int = 20,
    seeds: int = 3,
    policies: Sequence[str] | None = None,
    first_world: int = 1,
    seed: int = 1,
    gen: WorldGenConfig | None = None,
    jobs: int = 1,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Every (world, seed) result, in order, played in up to `jobs` processes."""
    from experiments.runner import COMPARED  # the runner imports MLflow: only when needed

    console = console or Console(stderr=True)
    gen = gen or WorldGenConfig()
    names = [p for p in (policies or COMPARED) if p != ORACLE]
    playable = []
    for p in names:
        reason = missing_library(p) if p in PEERS else None
        if reason is None:
            playable.append(p)
        else:
            console.print(f"[yellow]skipping {reason}[/yellow]")
    tasks = [
        (w, s, tuple(playable), gen)
        for w in range(first_world, first_world + worlds)
        for s in range(seed, seed + seeds)
    ]
    results: dict[tuple[int, int], dict[str, Any]] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"worlds × seeds ({len(playable) + 1} plays each)", total=len(tasks))
        if jobs <= 1:
            for t in tasks:
                results[t[:2]] = _run_world_task(t)
                bar.advance(task)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(jobs, mp_context=context) as pool:
                running = {pool.submit(_run_world_task, t): t[:2] for t in tasks}
                while running:
                    done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                    for job in done:
                        results[running.pop(job)] = job.result()
                        bar.advance(task)
    return [results[t[:2]] for t in tasks]


# ---- tables -------------------------------------------------------------------------------


def _pct(values: Iterable[float], q: float) -> float:
    arr = np.array([v for v in values if not math.isnan(v)], float)
    return float(np.percentile(arr, q)) if arr.size else math.nan


def _reaction(values: list[float], how: str) -> float:
    """Median or worst reaction; an outage never reacted to counts as infinitely slow."""
    arr = np.array([math.inf if math.isnan(v) else v for v in values], float)
    if not arr.size:
        return math.nan
    return float(np.median(arr) if how == "median" else arr.max())


def policy_table(results: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per policy over all worlds × seeds."""
    policies = list(results[0]["rows"])
    rows = {}
    for p in policies:
        runs = [r["rows"][p] for r in results]
        loud = [v for run in runs for v in run["loud"]]
        silent = [v for run in runs for v in run["silent"]]
        sent = [run["silent_sent"] for run in runs]
        grey = [run["grey_share"] for run in runs]
        rec = [v for run in runs for v in run["recovery"]]
        rows[p] = {
            "regret_median": _pct((run["regret_pct"] for run in runs), 50),
            "regret_p90": _pct((run["regret_pct"] for run in runs), 90),
            "luck_free_median": _pct((run["expected_regret_pct"] for run in runs), 50),
            "luck_free_p90": _pct((run["expected_regret_pct"] for run in runs), 90),
            "loud_median_s": _reaction(loud, "median"),
            "loud_worst_s": _reaction(loud, "worst"),
            "silent_median_s": _reaction(silent, "median"),
            "silent_worst_s": _reaction(silent, "worst"),
            "silent_sent_median": _pct(sent, 50),
            "silent_sent_worst": _pct(sent, 100),
            "grey_median": _pct(grey, 50),
            "grey_worst": _pct(grey, 100),
            "recovery_median": _pct(rec, 50),
            "recovery_worst": _pct(rec, 0),
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("policy")


POLICY_HEADERS = {
    "regret_median": "regret % median",
    "regret_p90": "regret % p90",
    "luck_free_median": "luck-free % median",
    "luck_free_p90": "luck-free % p90",
    "loud_median_s": "loud reaction s median",
    "loud_worst_s": "loud worst",
    "silent_median_s": "silent reaction s median",
    "silent_worst_s": "silent worst",
    "silent_sent_median": "sent into silent median",
    "silent_sent_worst": "worst",
    "grey_median": "grey share median",
    "grey_worst": "grey worst",
    "recovery_median": "recovered share median",
    "recovery_worst": "recovered worst",
}


def _fmt(col: str, v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "never"
    if isinstance(v, float) and math.isnan(v):
        return "—"
    if col.startswith(("grey", "recovery")):
        return f"{v:.1%}"
    if col.endswith("_s") or col.startswith("silent_sent"):
        return f"{v:,.0f}"
    return f"{v:.2f}"


def per_world_table(results: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per world: what it holds, thompson's regret and the best peer's (means over
    seeds), thompson's outage reactions and grey share."""
    by_world: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        by_world.setdefault(r["world"], []).append(r)
    rows = []
    for wid, runs in by_world.items():

        def mean(policy: str, key: str, runs: list[Mapping[str, Any]] = runs) -> float:
            vals = [r["rows"][policy][key] for r in runs if policy in r["rows"]]
            return float(np.mean(vals)) if vals else math.nan

        peers = [p for p in PEERS if p in runs[0]["rows"]]
        best = min(peers, key=lambda p: mean(p, "regret_pct")) if peers else None
        ts = [r["rows"].get(DEFAULT, {}) for r in runs]
        rows.append(
            {
                "world": wid,
                "countries×carriers": runs[0]["size"],
                "events": ", ".join(runs[0]["labels"]),
                "ts regret %": mean(DEFAULT, "regret_pct"),
                "ts luck-free %": mean(DEFAULT, "expected_regret_pct"),
                "best peer": best or "—",
                "peer regret %": mean(best, "regret_pct") if best else math.nan,
                "peer luck-free %": mean(best, "expected_regret_pct") if best else math.nan,
                "ts loud s": _reaction([v for t in ts for v in t.get("loud", [])], "worst"),
                "ts silent s": _reaction([v for t in ts for v in t.get("silent", [])], "worst"),
                "ts grey": _pct((t.get("grey_share", math.nan) for t in ts), 100),
            }
        )
    return pd.DataFrame(rows)


def _world_fmt(col: str, v: Any) -> str:
    if isinstance(v, str):
        return v
    if math.isinf(v):
        return "never"
    if math.isnan(v):
        return "—"
    if col.endswith(" s"):
        return f"{v:,.0f}"
    if col == "ts grey":
        return f"{v:.1%}"
    return f"{v:.2f}"


def _md(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def target_lines(results: Sequence[Mapping[str, Any]], table: pd.DataFrame) -> list[str]:
    """Issue 14's targets for the default policy: met, or which worlds break them."""
    if DEFAULT not in table.index:
        return []
    row = table.loc[DEFAULT]

    def worlds_where(test: Callable[[Mapping[str, Any]], bool]) -> str:
        bad = sorted({r["world"] for r in results if test(r["rows"][DEFAULT])})
        return "worlds: " + (", ".join(bad) if bad else "none")

    lim = TARGETS
    slow = lim["reaction_s"]
    checks = [
        (
            f"median regret ≤ {lim['regret_median']}% (realized {row.regret_median:.2f}%, "
            f"luck-free {row.luck_free_median:.2f}%)",
            max(row.regret_median, row.luck_free_median) <= lim["regret_median"],
            f"{sum(r['rows'][DEFAULT]['regret_pct'] > lim['regret_median'] for r in results)} "
            f"of {len(results)} world-seeds above it",
        ),
        (
            f"worst-decile regret ≤ {lim['regret_p90']}% (realized {row.regret_p90:.2f}%, "
            f"luck-free {row.luck_free_p90:.2f}%)",
            max(row.regret_p90, row.luck_free_p90) <= lim["regret_p90"],
            worlds_where(lambda m: m["regret_pct"] > lim["regret_p90"]),
        ),
        (
            f"loud outages under {REACTION_SHARE:.0%} share within {slow / 60:.0f} min "
            f"(worst {_fmt('loud_worst_s', row.loud_worst_s)} s)",
            not row.loud_worst_s > slow,
            worlds_where(lambda m: any(not v <= slow for v in m["loud"])),
        ),
        (
            f"silent outages under {REACTION_SHARE:.0%} share within {slow / 60:.0f} min "
            f"(worst {_fmt('silent_worst_s', row.silent_worst_s)} s)",
            not row.silent_worst_s > slow,
            worlds_where(lambda m: any(not v <= slow for v in m["silent"])),
        ),
        (
            f"grey routes ≤ {lim['grey_share']:.0%} after the first hour "
            f"(worst {_fmt('grey_worst', row.grey_worst)})",
            not row.grey_worst > lim["grey_share"],
            worlds_where(lambda m: m["grey_share"] > lim["grey_share"]),
        ),
        (
            f"recovered route back to ≥ {lim['recovery']:.0%} of its pre-outage share "
            f"{RECOVERY_WINDOW_MIN[0]:.0f}–{RECOVERY_WINDOW_MIN[1]:.0f} min after "
            f"(worst {_fmt('recovery_worst', row.recovery_worst)})",
            not row.recovery_worst < lim["recovery"],
            worlds_where(lambda m: any(v < lim["recovery"] for v in m["recovery"])),
        ),
    ]
    out = [f"Issue 14's targets for `{DEFAULT}`:", ""]
    for text, met, where in checks:
        out.append(f"- {'met' if met else 'NOT met'}: {text}" + ("" if met else f"; {where}"))
    return out


def markdown_section(
    results: Sequence[Mapping[str, Any]],
    gen: WorldGenConfig,
    command: str,
) -> str:
    """The worlds section of RESULTS.md, markers included."""
    table = policy_table(results)
    worlds = sorted({r["world_seed"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    messages = [r["messages"] for r in results]
    cfg = asdict(gen)
    intro = (
        f"Generated by `{command}`; do not edit by hand. {len(worlds)} generated worlds "
        f"(`experiments/worldgen.py`, world seeds {worlds[0]}..{worlds[-1]}) × {len(seeds)} "
        f"seeds; each world: {cfg['countries']} countries with {cfg['operators'][0]}–"
        f"{cfg['operators'][1]} real operators each, {cfg['carriers']} carriers (+1 when a new "
        f"carrier arrives), {cfg['hours']:g} h at {cfg['rate_per_second']:g} messages/s "
        f"({min(messages):,}–{max(messages):,} messages), the default policy file's values. "
        "Every policy plays each world and seed with the same traffic and luck as the oracle. "
        "Regret is % of the oracle's utility (realized, and luck-free: by the true expected "
        "utilities); median and p90 (worst decile) over worlds × seeds. A reaction is event "
        f"seconds from an outage's start until the failed route's share of its country is under "
        f"{REACTION_SHARE:.0%} for the rest of the outage (never: not before it ended); loud "
        "outages answer every loss with a quick UNDELIV, silent ones accept and bill every "
        "submit, deliver 3% and send no receipt or a late EXPIRED for the rest. Sent into "
        "silent: attempts routed to the failed route during a silent outage (per world and "
        f"seed). Grey share: the grey routes' share of their country's (operator's) first "
        f"attempts after the first hour. Recovered share: the failed route's share "
        f"{RECOVERY_WINDOW_MIN[0]:.0f}–{RECOVERY_WINDOW_MIN[1]:.0f} min after the outage, over "
        "its share in the hour before it (routes that had at least 20% before)."
    )
    fmt_rows = [[str(p), *(_fmt(c, v) for c, v in row.items())] for p, row in table.iterrows()]
    per_world = per_world_table(results)
    world_rows = [[_world_fmt(c, v) for c, v in row.items()] for _, row in per_world.iterrows()]
    lines = [
        MARK_START,
        "",
        "## Generated worlds",
        "",
        intro,
        "",
        *_md(["policy", *POLICY_HEADERS.values()], fmt_rows),
        "",
        *target_lines(results, table),
        "",
        "### Per world (means over seeds; reactions and grey share: the worst seed)",
        "",
        *_md(list(per_world.columns), world_rows),
        "",
        MARK_END,
    ]
    return "\n".join(lines)


def write_worlds(
    path: Path,
    worlds: int = 20,
    seeds: int = 3,
    policies: Sequence[str] | None = None,
    first_world: int = 1,
    seed: int = 1,
    gen: WorldGenConfig | None = None,
    jobs: int = 1,
    console: Console | None = None,
    command: str | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run the worlds and write their section into `path` (created when missing)."""
    gen = gen or WorldGenConfig()
    console = console or Console(stderr=True)
    started = time.perf_counter()
    results = run_worlds(worlds, seeds, policies, first_world, seed, gen, jobs, console)
    command = command or f"router experiment worlds --worlds {worlds} --seeds {seeds}"
    section = markdown_section(results, gen, command)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(splice_section(old, section), encoding="utf-8")
    took = time.perf_counter() - started
    console.print(
        f"{len(results)} world-seed runs in {took:,.0f} s "
        f"(one run: {np.median([r['seconds'] for r in results]):.1f} s median); wrote {path}"
    )
    return path, results


def default_jobs() -> int:
    """The usable CPUs."""
    return len(os.sched_getaffinity(0))


def main(args: Any) -> int:
    """`router experiment worlds`."""
    from experiments.runner import UnknownPolicy, parse_policies

    try:
        policies = parse_policies(args.policies) if args.policies else None
    except UnknownPolicy as exc:
        print(f"router: {exc}")
        return 2
    gen = WorldGenConfig(
        countries=args.countries,
        carriers=args.carriers,
        hours=args.hours,
        rate_per_second=args.rate,
    )
    defaults = WorldGenConfig()
    command = f"router experiment worlds --worlds {args.worlds} --seeds {args.seeds}" + "".join(
        f" --{flag} {value:g}"
        for flag, value, default in (
            ("first-world", args.first_world, 1),
            ("seed", args.seed, 1),
            ("countries", gen.countries, defaults.countries),
            ("carriers", gen.carriers, defaults.carriers),
            ("hours", gen.hours, defaults.hours),
            ("rate", gen.rate_per_second, defaults.rate_per_second),
        )
        if value != default
    )
    write_worlds(
        Path(args.results),
        args.worlds,
        args.seeds,
        policies,
        args.first_world,
        args.seed,
        gen,
        args.jobs,
        command=command,
    )
    return 0

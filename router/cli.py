"""The `router` command: one verb per user (serve, demo, …)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from carriers.catalog import EXAMPLE_CATALOG, CatalogError
from router.commands.keys import add_keys_parser
from router.core.config import DEFAULT_POLICY_FILE, ConfigError
from router.replicas.identity import HmacKeyMismatch


def _serve(args: argparse.Namespace) -> int:
    from router.http.server import serve
    from router.serving.app import build_app, connection_limits

    if args.workers > 1:
        from router.serving.workers import serve_workers

        return serve_workers(args)
    return serve(
        build_app(args),
        limits=connection_limits(args),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
    )


def _demo(args: argparse.Namespace) -> int:
    from router.commands.demo import DemoOptions, run_demo

    run_demo(
        DemoOptions(
            scenario=args.scenario,
            workers=args.workers,
            concurrency=args.concurrency,
            speed=args.speed,
            minutes=args.minutes,
            data_dir=Path(args.data_dir),
            port=args.port,
            keep_state=args.keep_state,
            mlflow=not args.no_mlflow,
            seed=args.seed,
        )
    )
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _experiment(args: argparse.Namespace) -> int:
    if args.action == "worlds":
        from experiments.multiworld import main

        return main(args)
    from experiments.runner import UnknownPolicy, parse_policies, run_experiment, write_results
    from experiments.world import ScenarioError

    try:
        policies = parse_policies(getattr(args, "policies", ""))
        common = (policies, getattr(args, "seed", 1), Path(args.out), args.tracking_uri)
        if args.action == "run":
            run_experiment(args.scenario, *common, jobs=args.jobs)
        elif args.action == "cost-subsidy":
            from experiments.cost_subsidy_runner import SPECS, run_cost_subsidy

            for spec in [args.spec] if args.spec else SPECS:
                run_cost_subsidy(spec, Path(args.out), args.tracking_uri)
        else:
            write_results(Path(args.results), *common, seeds=args.seeds, jobs=args.jobs)
    except (ScenarioError, UnknownPolicy) as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from router.offline.evaluate_run import EvaluateOptions, run_evaluation

    try:
        run_evaluation(
            EvaluateOptions(
                candidates=args.candidate,
                logs=Path(args.logs) if args.logs else None,
                run_id=args.run_id,
                catalog=Path(args.catalog) if args.catalog else None,
                policy_file=Path(args.policy_file) if args.policy_file else None,
                tracking_uri=args.tracking_uri,
                bootstrap=args.bootstrap,
                out=Path(args.out),
                seed=args.seed,
            )
        )
    except ValueError as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    return 0


def _report(args: argparse.Namespace) -> int:
    from router.offline.cost_report import CostReportOptions, parse_by, parse_when, run_cost_report

    try:
        run_cost_report(
            CostReportOptions(
                logs=Path(args.logs),
                start=parse_when(args.start, "--from") if args.start else None,
                end=parse_when(args.end, "--to") if args.end else None,
                by=parse_by(args.by),
                out=Path(args.out),
                policy_file=Path(args.policy_file) if args.policy_file else None,
            )
        )
    except ValueError as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    p = argparse.ArgumentParser(prog="router", description="Adaptive SMS routing engine.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    serve = sub.add_parser("serve", help="the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--catalog", default=str(EXAMPLE_CATALOG), help="carrier catalog (YAML)")
    serve.add_argument(
        "--policy-file",
        default=str(DEFAULT_POLICY_FILE),
        help="policy, parameters and message classes (YAML)",
    )
    serve.add_argument("--policy", help="serve another policy than the policy file's")
    serve.add_argument("--data-dir", default="data", help="state snapshot, decision log, MLflow")
    serve.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in data dir)")
    serve.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    serve.add_argument("--seed", type=int, help="random seed of the policy's draws")
    serve.add_argument(
        "--replay",
        action="store_true",
        help="accept event times far from the wall clock (replays, simulations)",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument(
        "--auth",
        default="auto",
        choices=["auto", "required", "off"],
        help="API keys: required, off, or auto (required once the key store holds a key)",
    )
    serve.add_argument(
        "--tenant-rate", type=float, help="default per-tenant limit, items/s (`keys limit`)"
    )
    serve.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="share learned state with other replicas on this Redis (default: $REDIS_URL)",
    )
    serve.add_argument(
        "--redis-cluster", action="store_true", help="the Redis URL is a node of a Redis Cluster"
    )
    serve.add_argument("--redis-prefix", default="router", help="key prefix on the shared Redis")
    serve.add_argument(
        "--checkpoint-seconds", type=float, default=30.0, help="shared checkpoint period"
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes (more than 1 needs Redis)"
    )
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies: 413")
    serve.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=5.0,
        help="seconds a connection has to send a complete request head (from connecting, or "
        "from the first byte of a next request); then it is closed (default 5)",
    )
    serve.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds a request's body has to arrive once its head is in (default 30)",
    )
    serve.add_argument(
        "--keep-alive-timeout",
        type=_positive_float,
        default=5.0,
        help="seconds an idle keep-alive connection is kept after a response (default 5)",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive_int,
        help="open connections per worker process; at the cap the one waiting longest for a "
        "request is closed, or the new one gets 503 (default: what the fd limit leaves, <= 4096)",
    )
    serve.set_defaults(func=_serve)
    add_keys_parser(sub)

    from carriers.sender.deadletters_main import build_parser as deadletters_parser
    from carriers.sender.main import build_parser as worker_parser

    worker_parser(sub)
    deadletters_parser(sub)
    demo = sub.add_parser("demo", help="router + simulated carriers + sender workers")
    demo.add_argument("--scenario", default="demo", help="a shipped scenario name or a file")
    demo.add_argument("--workers", type=int, default=2, help="sender workers (each binds)")
    demo.add_argument("--concurrency", type=int, default=16, help="sending threads per worker")
    demo.add_argument(
        "--speed", type=float, default=30.0, help="event seconds per wall second (default 30)"
    )
    demo.add_argument("--minutes", type=float, help="play only this many minutes of the scenario")
    demo.add_argument("--data-dir", default="data/demo")
    demo.add_argument("--port", type=int, default=0, help="0 picks a free port")
    demo.add_argument(
        "--keep-state",
        action="store_true",
        help="start from the previous run's learned state and log",
    )
    demo.add_argument("--no-mlflow", action="store_true")
    demo.add_argument("--seed", type=int, default=1)
    demo.set_defaults(func=_demo)

    exp = sub.add_parser("experiment", help="simulated policy comparisons, to MLflow")
    exp_sub = exp.add_subparsers(dest="action", required=True, metavar="ACTION")
    exp_run = exp_sub.add_parser("run", help="every policy and the oracle on one scenario")
    exp_run.add_argument("scenario", help="a shipped scenario name or a scenario file")
    exp_res = exp_sub.add_parser("results", help="every shipped scenario, to a Markdown table")
    exp_res.add_argument("--results", default="experiments/RESULTS.md", help="file to write")
    exp_res.add_argument(
        "--seeds", type=_positive_int, default=1, help="seeds per scenario, from --seed"
    )
    for action in (exp_run, exp_res):
        action.add_argument(
            "--policies",
            default="thompson,cheapest,static,uniform,round_robin,epsilon_greedy,cost_subsidy,"
            "mabwiser_ts,pybandits_cc,vw_cb_adf",
            help="comma-separated policy names (the oracle always plays)",
        )
        action.add_argument("--seed", type=int, default=1)
        action.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in --out)")
        action.add_argument("--out", default="data/experiments", help="decision logs, MLflow")
        action.add_argument(
            "--jobs",
            type=_positive_int,
            default=len(os.sched_getaffinity(0)),
            help="policies played at once, in as many processes (default: the usable CPUs)",
        )
    exp_w = exp_sub.add_parser("worlds", help="every policy on generated worlds, to RESULTS.md")
    exp_w.add_argument("--worlds", type=_positive_int, default=20, help="generated worlds")
    exp_w.add_argument("--seeds", type=_positive_int, default=3, help="seeds per world")
    exp_w.add_argument("--first-world", type=int, default=1, help="seed of the first world")
    exp_w.add_argument("--seed", type=int, default=1, help="first play seed")
    exp_w.add_argument("--countries", type=_positive_int, default=4)
    exp_w.add_argument("--carriers", type=_positive_int, default=5)
    exp_w.add_argument("--hours", type=_positive_float, default=5.0)
    exp_w.add_argument("--rate", type=_positive_float, default=0.2, help="messages per second")
    exp_w.add_argument("--policies", default="", help="comma-separated (default: all compared)")
    exp_w.add_argument("--results", default="experiments/RESULTS.md", help="file to write")
    exp_w.add_argument(
        "--jobs", type=_positive_int, default=len(os.sched_getaffinity(0)), help="processes"
    )
    exp_cs = exp_sub.add_parser(
        "cost-subsidy",
        help="the cost-subsidy anchor (Sinha et al.): CS-TS, CS-UCB, CS-ETC, COF, ours",
    )
    exp_cs.add_argument(
        "--spec", default=None, help="instances file (default: every shipped one in turn)"
    )
    exp_cs.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in --out)")
    exp_cs.add_argument("--out", default="data/experiments", help="MLflow store")
    exp.set_defaults(func=_experiment)
    ev = sub.add_parser("evaluate", help="off-policy evaluation of candidates on logged decisions")
    ev.add_argument(
        "--candidate",
        action="append",
        required=True,
        help="uniform | static | cheapest | logged | greedy | epsilon_greedy,epsilon=0.1"
        " | module:Class[,key=value] (repeatable)",
    )
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--logs", help="a decision_log folder (with decisions/ and outcomes/)")
    src.add_argument("--run-id", help="an MLflow run whose decision_log artifacts to evaluate")
    ev.add_argument("--catalog", help="carrier catalog (priorities, prices for the candidates)")
    ev.add_argument("--policy-file", help="message classes (value, SLA) for the rewards")
    ev.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite under --out)")
    ev.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates (0: none)")
    ev.add_argument("--out", default="data/evaluation")
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=_evaluate)
    rep = sub.add_parser("report", help="reports for finance")
    rep_sub = rep.add_subparsers(dest="report", required=True, metavar="REPORT")
    cost = rep_sub.add_parser("cost", help="cost per delivered message, to CSV, Parquet and HTML")
    cost.add_argument("--logs", required=True, help="a decision_log folder (decisions/, outcomes/)")
    cost.add_argument("--from", dest="start", help="first UTC date or time (YYYY-MM-DD[THH:MM])")
    cost.add_argument("--to", dest="end", help="end UTC date or time, excluded")
    cost.add_argument(
        "--by",
        default="carrier,country,day",
        help="comma-separated: carrier, country, operator, tenant, message_class, day",
    )
    cost.add_argument("--out", default="data/reports", help="folder for the CSV, Parquet, HTML")
    cost.add_argument("--policy-file", help="message classes (SLA for delivered within SLA)")
    rep.set_defaults(func=_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `router` console command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (CatalogError, ConfigError) as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    except HmacKeyMismatch as exc:  # one identity per cluster: refuse to start (issue 13.3)
        print(f"router: refusing to start: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

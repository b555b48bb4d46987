"""`router demo`: the whole loop on the embedded defaults, over real HTTP on loopback.

It starts the router (FastAPI + uvicorn) in this process, plays a scenario's traffic through
several sender workers (threads, each with its own HTTP client) against simulated carriers
whose behaviour includes an outage part-way, then reads the decision log back and prints what
happened per carrier and country, and where the logs and the MLflow run are.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import uvicorn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from experiments.play import TrafficDriver
from experiments.world import World, load_scenario
from router.api import create_app
from router.client import RouterClient
from router.decision_log import DECISION_SCHEMA, OUTCOME_SCHEMA, finalized_view, read_stream
from router.service import RouterService, ServiceSettings


@dataclass
class DemoOptions:
    """What `router demo` is run with."""

    scenario: str = "demo"
    workers: int = 4
    data_dir: Path = Path("data/demo")
    port: int = 0
    window_seconds: float = 5.0
    batch_size: int = 200
    keep_state: bool = False
    mlflow: bool = True
    seed: int = 1


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving the app in a background thread; `stop()` shuts it down gracefully."""

    def __init__(self, service: RouterService, port: int) -> None:
        config = uvicorn.Config(
            create_app(service),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="router-server", daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until the server accepts requests."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the router server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        """Ask uvicorn to exit (runs the app's shutdown: log rolled, snapshot, MLflow run)."""
        self.server.should_exit = True
        self.thread.join(timeout=60)


def _fresh(data_dir: Path) -> None:
    for name in ("state.json", "decision_log"):
        path = data_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_demo(opts: DemoOptions, console: Console | None = None) -> dict[str, object]:
    """Run the demo; returns the figures it printed (for tests)."""
    console = console or Console()
    if not opts.keep_state:
        _fresh(opts.data_dir)
    settings = ServiceSettings(
        data_dir=opts.data_dir,
        mlflow=opts.mlflow,
        seed=opts.seed,
        max_future_skew_seconds=None,
        snapshot_seconds=10,
        metrics_seconds=10,
        log_max_rows=10_000,
    )
    service = RouterService(settings)
    server = ServerThread(service, opts.port or free_port())
    server.start()
    console.print(
        f"[bold]router[/] serving {service.engine.policy_label} at {server.url} "
        f"(docs: {server.url}/docs)"
    )
    world = World(load_scenario(opts.scenario), service.engine.catalog)
    messages = list(enumerate(world.messages(np.random.default_rng([world.spec.seed, 1]))))
    classes = service.engine.config.message_classes
    clients = [RouterClient(server.url) for _ in range(opts.workers)]
    drivers = [
        TrafficDriver(
            clients[w],
            world,
            classes,
            messages[w :: opts.workers],
            seed=opts.seed,
            batch_size=opts.batch_size,
        )
        for w in range(opts.workers)
    ]
    console.print(
        f"scenario [bold]{world.spec.name}[/]: {len(messages):,} messages over "
        f"{world.spec.duration_minutes:g} min of event time, {opts.workers} sender "
        "workers; "
        + "; ".join(
            f"{e.kind} of {e.carrier} in {e.country} at minute {e.at_minute:g}"
            for e in world.spec.events
        )
    )
    started = time.monotonic()
    try:
        _play(drivers, world, opts, console, len(messages))
    finally:
        for c in clients:
            c.close()
        server.stop()
    elapsed = time.monotonic() - started
    truth = pd.concat([d.frame() for d in drivers], ignore_index=True)
    return _summarise(service, world, truth, elapsed, console)


def _play(
    drivers: list[TrafficDriver], world: World, opts: DemoOptions, console: Console, total: int
) -> None:
    """Step all workers through event time in lock-step windows (so no one runs ahead)."""
    windows = np.arange(
        world.start + opts.window_seconds, world.end + opts.window_seconds, opts.window_seconds
    )
    errors: list[BaseException] = []
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[clock]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("routing", total=total, clock="")
        barrier = threading.Barrier(len(drivers) + 1)

        def work(driver: TrafficDriver) -> None:
            try:
                for t in windows:
                    driver.run_until(float(t))
                    barrier.wait()
                driver.run_until()
            except BaseException as exc:  # reported below, never swallowed
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=work, args=(d,), daemon=True) for d in drivers]
        for th in threads:
            th.start()
        try:
            for t in windows:
                barrier.wait()
                minute = (t - world.start) / 60
                progress.update(
                    task,
                    completed=min(total, sum(d.routed for d in drivers)),
                    clock=f"event minute {minute:5.1f}",
                )
        except threading.BrokenBarrierError:
            pass
        for th in threads:
            th.join()
        progress.update(task, completed=total)
    if errors:
        raise errors[0]


def _summarise(
    service: RouterService, world: World, truth: pd.DataFrame, elapsed: float, console: Console
) -> dict[str, object]:
    engine = service.engine
    log_dir = service.log.decisions_dir.parent
    decisions = read_stream(log_dir, "decisions", DECISION_SCHEMA)
    outcomes = read_stream(log_dir, "outcomes", OUTCOME_SCHEMA)
    view = finalized_view(
        decisions, outcomes, engine.config.message_classes, engine.catalog.conversion_tenants()
    )
    view = view.merge(
        truth[["decision_id", "success"]].rename(columns={"success": "true_success"}),
        on="decision_id",
        how="left",
    )
    table = Table(
        title="Per carrier and destination: DLR ok = receipts said delivered, truly ok ="
        " delivered within SLA (simulator's ground truth), cost/ok = spend per DLR",
        show_lines=False,
    )
    for col in (
        "carrier",
        "country",
        "sent",
        "DLR delivered",
        "truly delivered in SLA",
        "latency p50 s",
        "p95 s",
        "cost / delivered",
    ):
        table.add_column(col, justify="left" if col in ("carrier", "country") else "right")
    for (carrier, country), g in view.groupby(["carrier", "country"]):
        delivered = int(g["delivered"].sum())
        lat = g["latency_ms"].dropna() / 1000
        table.add_row(
            carrier,
            country,
            f"{len(g):,}",
            f"{g['delivered'].mean():.1%}",
            f"{g['true_success'].mean():.1%}",
            f"{lat.quantile(0.5):.1f}" if len(lat) else "-",
            f"{lat.quantile(0.95):.1f}" if len(lat) else "-",
            f"{g['cost'].sum() / delivered:.4f}" if delivered else "-",
        )
    console.print(table)
    shares = _outage_shares(view, world)
    for line in shares["lines"]:
        console.print(line)
    n = len(view)
    figures = {
        "decisions": n,
        "elapsed_s": elapsed,
        "decisions_per_s": n / elapsed,
        "true_success_rate": float(view["true_success"].mean()),
        "dlr_delivery_rate": float(view["delivered"].mean()),
        "spend": float(view["cost"].sum()),
        "outage_shares": shares["shares"],
    }
    console.print(
        f"\n{n:,} decisions in {elapsed:.1f} s ({n / elapsed:,.0f}/s over HTTP); truly delivered "
        f"within SLA {figures['true_success_rate']:.1%}; receipts said delivered "
        f"{figures['dlr_delivery_rate']:.1%}; spend {figures['spend']:.2f} "
        f"{engine.catalog.currency}."
    )
    console.print(f"decision log (Parquet): {log_dir}")
    if service.run is not None:
        uri = service.tracking_uri
        console.print(
            f"MLflow run {service.run.run_id} in experiment "
            f"'{service.settings.experiment}' at {uri}"
        )
        console.print(
            f"open the MLflow UI: [bold]mlflow ui --backend-store-uri {uri} "
            "--port 5000[/] then http://127.0.0.1:5000"
        )
    console.print(f"learned state snapshot: {service.snapshot_path}")
    return figures


def _outage_shares(view: pd.DataFrame, world: World) -> dict[str, object]:
    lines: list[str] = []
    shares: dict[str, dict[str, float]] = {}
    for ev in world.spec.events:
        start = world.start + ev.at_minute * 60
        end = min(world.end, start + ev.minutes * 60)
        at = view["at"].map(lambda t: t.timestamp())
        sel = view if ev.country == "*" else view[view["country"] == ev.country]
        at = at[sel.index]
        periods = {
            "before": (world.start, start),
            "during": (start, end),
            "after": (end, world.end),
        }
        row = {}
        for name, (a, b) in periods.items():
            part = sel[(at >= a) & (at < b)]
            if len(part):
                row[name] = float((part["carrier"] == ev.carrier).mean())
        shares[f"{ev.carrier}/{ev.country}"] = row
        lines.append(
            f"{ev.kind} of {ev.carrier} in {ev.country}: its share of {ev.country} "
            "traffic " + ", ".join(f"{k} {v:.0%}" for k, v in row.items())
        )
    return {"lines": lines, "shares": shares}

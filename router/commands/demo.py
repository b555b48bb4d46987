"""`router demo`: the whole loop on the embedded defaults, over real HTTP and real SMPP.

It starts the router (FastAPI + uvicorn) in this process, one simulated SMSC per carrier of the
catalog (real SMPP 3.4 on loopback, answering as the scenario's world says: delivery, latency,
lying or missing receipts, an outage part-way), and sender workers that take the scenario's
messages from a queue, ask the router, submit over SMPP, read the receipts and report every
outcome. Event time runs `speed` times faster than the wall clock. At the end it reads the
decision log back and prints what happened per carrier and country, and where the logs and the
MLflow run are.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bandit.reward import MessageClass
from carriers.catalog import Catalog, load_catalog
from carriers.sender.ledger import MemoryLedger
from carriers.sender.queue import InProcessQueue, Job
from carriers.sender.worker import SenderWorker, WorkerOptions
from carriers.smpp.client import SmppCarrier
from carriers.smsc.server import SimulatedSMSC
from carriers.smsc.simclock import SimClock
from experiments.smsc_world import WorldBehaviour, world_behaviour
from experiments.world import Message, World, load_scenario
from router.console import report_console
from router.contract.client import RouterClient
from router.contract.messages import OutcomeEvent, RouteDecision
from router.core.config import load_config
from router.log.decision_log import DECISION_SCHEMA, OUTCOME_SCHEMA, finalized_view, read_stream
from router.log.tracking import default_tracking_uri
from router.serving.service import ServiceSettings


@dataclass
class DemoOptions:
    """What `router demo` is run with."""

    scenario: str = "demo"
    workers: int = 2
    concurrency: int = 16
    data_dir: Path = Path("data/demo")
    port: int = 0
    speed: float = 30.0
    minutes: float | None = None
    keep_state: bool = False
    mlflow: bool = True
    seed: int = 1


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RouterProcess:
    """`router serve` as its own process (as in production: the workers reach it over HTTP)."""

    def __init__(self, opts: DemoOptions) -> None:
        self.port = opts.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = opts.data_dir / "router.log"
        self.cmd = [
            sys.executable,
            "-m",
            "router.cli",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(opts.data_dir),
            "--seed",
            str(opts.seed),
            "--replay",  # the scenario's event times are not today's
            "--log-level",
            "warning",
            *([] if opts.mlflow else ["--no-mlflow"]),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        """Start and wait until `/healthz` answers."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the router exited: see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the router did not start: see {self.log_path}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM: the router rolls its log, writes its snapshot and ends its MLflow run."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass(frozen=True)
class Served:
    """What the summary needs to know of the router that served the demo."""

    classes: Mapping[str, MessageClass]
    catalog: Catalog
    log_dir: Path
    tracking_uri: str | None
    experiment: str
    snapshot_path: Path

    def run_id(self) -> str | None:
        """The serving run the router logged to MLflow (its latest in the experiment)."""
        if self.tracking_uri is None:
            return None
        import mlflow

        runs = mlflow.MlflowClient(self.tracking_uri).search_runs(
            [
                e.experiment_id
                for e in mlflow.MlflowClient(self.tracking_uri).search_experiments()
                if e.name == self.experiment
            ],
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None


def _fresh(data_dir: Path) -> None:
    for name in ("state.json", "decision_log"):
        path = data_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class Handsets:
    """The simulated phones' owners: a code that truly arrived is typed in (a conversion), and
    tenants that report conversions post it to the router at its event time."""

    def __init__(self, ledger: MemoryLedger, reporting: frozenset[str]) -> None:
        self.ledger = ledger
        self.reporting = reporting
        self.tenant_of: dict[str, str | None] = {}
        self._due: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()

    def decided(self, job: Job, decision: RouteDecision) -> None:
        """Remember the tenant of each decision (the worker's `on_decision` hook)."""
        self.tenant_of[decision.decision_id] = job.tenant

    def hook(self, carrier: str) -> Callable[[str, float], None]:
        """The world's conversion hook for one carrier's SMSC."""

        def converted(message_id: str, at: float) -> None:
            with self._lock:
                self._due.append((at, carrier, message_id))

        return converted

    def due(self, now: float) -> list[OutcomeEvent]:
        """Conversions whose time has come, for decisions of tenants that report them."""
        with self._lock:
            ready = [d for d in self._due if d[0] <= now]
            self._due = [d for d in self._due if d[0] > now]
        out: list[OutcomeEvent] = []
        for at, carrier, message_id in ready:
            decision_id = self.ledger.decision_for(carrier, message_id)
            if decision_id is None:  # not mapped yet (resp in flight): try again shortly
                with self._lock:
                    self._due.append((at, carrier, message_id))
                continue
            if self.tenant_of.get(decision_id) in self.reporting:
                out.append(OutcomeEvent(decision_id, "conversion", at=at))
        return out


def run_demo(opts: DemoOptions, console: Console | None = None) -> dict[str, object]:
    """Run the demo; returns the figures it printed (for tests)."""
    console = console or report_console()
    logging.getLogger("carriers.smpp.wire").setLevel(logging.WARNING)
    logging.getLogger("carriers.sender.worker").setLevel(logging.ERROR)  # counted in the summary
    if not opts.keep_state:
        _fresh(opts.data_dir)
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    settings = ServiceSettings(data_dir=opts.data_dir)
    served = Served(
        load_config(settings.policy_file).message_classes,
        load_catalog(settings.catalog),
        opts.data_dir / "decision_log",
        default_tracking_uri(opts.data_dir) if opts.mlflow else None,
        settings.experiment,
        opts.data_dir / "state.json",
    )
    world = World(load_scenario(opts.scenario), served.catalog)
    end = world.end if opts.minutes is None else world.start + 60 * opts.minutes
    messages = [
        m for m in world.messages(np.random.default_rng([world.spec.seed, 1])) if m.at < end
    ]
    server = RouterProcess(opts)
    server.start()
    clock = SimClock(start=world.start, speed=opts.speed)  # event time starts now
    ledger = MemoryLedger()
    handsets = Handsets(ledger, served.catalog.conversion_tenants())
    console.print(f"[bold]router[/] serving at {server.url} (docs: {server.url}/docs)")
    smscs, behaviours = _start_smscs(world, clock, handsets, opts)
    jobs = InProcessQueue()
    workers = _start_workers(server.url, smscs, jobs, ledger, clock, handsets, opts, served.classes)
    console.print(
        f"scenario [bold]{world.spec.name}[/]: {len(messages):,} messages over "
        f"{(end - world.start) / 60:g} min of event time at {opts.speed:g}x; "
        f"{len(smscs)} simulated SMSCs on SMPP ports "
        f"{', '.join(str(s.port) for s in smscs.values())}; {opts.workers} sender workers; "
        + "; ".join(
            f"{e.kind} of {e.carrier} in {e.country} at minute {e.at_minute:g}"
            for e in world.spec.events
        )
    )
    started = time.monotonic()
    try:
        _play(messages, jobs, workers, handsets, clock, world, end, console)
    finally:
        for w in workers:
            w.stop()
        for w in workers:
            for link in w.links.values():
                link.close(timeout=5)
        for smsc in smscs.values():
            smsc.stop()
        server.stop()
    elapsed = time.monotonic() - started
    truth = _truth(behaviours, ledger, served)
    figures = _summarise(served, world, truth, elapsed, console)
    figures["workers"] = [vars(w.stats) | vars(w.reporter.stats) for w in workers]
    figures["smscs"] = {cid: s.counters.as_dict() for cid, s in smscs.items()}
    _print_path_stats(figures, console)
    return figures


def _start_smscs(
    world: World, clock: SimClock, handsets: Handsets, opts: DemoOptions
) -> tuple[dict[str, SimulatedSMSC], dict[str, WorldBehaviour]]:
    """One simulated SMSC per carrier, with an account per sender worker."""
    reporting_tenant = next(iter(sorted(world.catalog.conversion_tenants())), "default")
    smscs: dict[str, SimulatedSMSC] = {}
    behaviours: dict[str, WorldBehaviour] = {}
    for i, cid in enumerate(world.catalog.carriers):
        behaviour = world_behaviour(
            world,
            cid,
            np.random.default_rng([opts.seed, 7, i]),
            tenant=reporting_tenant,  # the world decides conversions; Handsets filter tenants
            on_conversion=handsets.hook(cid),
        )
        accounts = {_system_id(cid, w): "demo" for w in range(opts.workers)}
        smsc = SimulatedSMSC(
            cid, behaviour, accounts=accounts, clock=clock, seed=opts.seed, window=256
        )
        smscs[cid] = smsc.start()
        behaviours[cid] = behaviour
    return smscs, behaviours


def _system_id(carrier: str, worker: int) -> str:
    """Each worker binds with its own account, so its receipts come back on its own binds."""
    return f"{carrier[:10]}w{worker}"


def _start_workers(
    url: str,
    smscs: dict[str, SimulatedSMSC],
    jobs: InProcessQueue,
    ledger: MemoryLedger,
    clock: SimClock,
    handsets: Handsets,
    opts: DemoOptions,
    classes: Mapping[str, MessageClass],
) -> list[SenderWorker]:
    options = WorkerOptions(
        concurrency=opts.concurrency,
        sla_seconds={name: mc.sla_seconds for name, mc in classes.items()},
        max_attempts=2,
    )
    workers: list[SenderWorker] = []
    for w in range(opts.workers):
        links: dict[str, SmppCarrier] = {}
        worker = SenderWorker(
            RouterClient(url, timeout=30),
            links,
            jobs,
            ledger=ledger,
            clock=clock,
            options=options,
            on_decision=handsets.decided,
        )
        for cid, smsc in smscs.items():
            link = SmppCarrier(
                cid,
                smsc.host,
                smsc.port,
                _system_id(cid, w),
                "demo",
                window=32,
                enquire_link_s=10.0,
                on_receipt=worker.receipt_handler(cid),
            )
            link.start()
            worker.links[cid] = link
        worker.start()
        workers.append(worker)
    return workers


def _play(
    messages: list[Message],
    jobs: InProcessQueue,
    workers: list[SenderWorker],
    handsets: Handsets,
    clock: SimClock,
    world: World,
    end: float,
    console: Console,
) -> None:
    """Feed the messages to the queue at their event times; report conversions as they come;
    then wait until every job is sent and the last receipts are in."""
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[clock]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("sending", total=len(messages), clock="")
        i = 0
        tail = 120.0  # event seconds after the last message for receipts and retries
        while True:
            now = clock.now()
            while i < len(messages) and messages[i].at <= now:
                m = messages[i]
                jobs.put(
                    Job(
                        f"m{i}",
                        m.to,
                        f"Your verification code is {100000 + (i * 7919) % 900000}",
                        tenant=m.tenant,
                        message_class=m.message_class,
                        mccmnc=m.mccmnc or None,
                        at=m.at,
                    )
                )
                i += 1
            conversions = handsets.due(now)
            if conversions:
                workers[0].reporter.report(conversions)
            sent = sum(w.stats.submitted + w.stats.submit_failed for w in workers)
            progress.update(
                task,
                completed=min(i, len(messages)),
                clock=f"event minute {(now - world.start) / 60:5.1f}  submits {sent:,}",
            )
            drained = i >= len(messages) and jobs.pending() == 0 and all(w.idle() for w in workers)
            if drained and now > max(end, messages[-1].at if messages else end) + tail:
                break
            time.sleep(0.05)


def _truth(
    behaviours: dict[str, WorldBehaviour],
    ledger: MemoryLedger,
    served: Served,
) -> pd.DataFrame:
    """Per decision, what truly happened (from the simulated carriers' ground truth)."""
    rows = []
    for cid, behaviour in behaviours.items():
        for message_id, truth in list(behaviour.truths.items()):
            decision_id = ledger.decision_for(cid, message_id)
            if decision_id is None:
                continue
            rows.append(
                {
                    "decision_id": decision_id,
                    "delivered": truth.delivered,
                    "latency_s": truth.latency_s,
                }
            )
    frame = pd.DataFrame(rows, columns=["decision_id", "delivered", "latency_s"])
    slas = {n: mc.sla_seconds for n, mc in served.classes.items()}
    decisions = (
        read_stream(served.log_dir, "decisions", DECISION_SCHEMA)
        .select(["decision_id", "message_class"])
        .to_pandas()
    )
    frame = frame.merge(decisions, on="decision_id", how="left")
    sla = frame["message_class"].map(slas).fillna(60.0)
    frame["success"] = frame["delivered"] & (frame["latency_s"].fillna(np.inf) <= sla)
    return frame[["decision_id", "success"]]


def _print_path_stats(figures: dict[str, object], console: Console) -> None:
    workers = figures["workers"]
    smscs = figures["smscs"]
    total = {k: sum(w[k] for w in workers) for k in workers[0]}  # type: ignore[index,union-attr]
    console.print(
        f"sender workers: {total['jobs']:,} jobs, {total['submitted']:,} submits accepted, "
        f"{total['submit_failed']:,} refused, {total['retries']:,} retries on the next carrier, "
        f"{total['receipts']:,} receipts, {total['reported']:,} outcomes reported "
        f"({total['duplicates']:,} duplicates, {total['rejected']:,} refused by the router)"
    )
    sent = sum(s["receipts_sent"] for s in smscs.values())  # type: ignore[union-attr]
    throttled = sum(s["throttled"] for s in smscs.values())  # type: ignore[union-attr]
    console.print(f"simulated SMSCs: {sent:,} receipts sent over SMPP, {throttled:,} throttled")


def _summarise(
    served: Served, world: World, truth: pd.DataFrame, elapsed: float, console: Console
) -> dict[str, object]:
    log_dir = served.log_dir
    decisions = read_stream(log_dir, "decisions", DECISION_SCHEMA)
    outcomes = read_stream(log_dir, "outcomes", OUTCOME_SCHEMA)
    view = finalized_view(decisions, outcomes, served.classes, served.catalog.conversion_tenants())
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
        f"{served.catalog.currency}."
    )
    console.print(f"decision log (Parquet): {log_dir}")
    run_id = served.run_id()
    if run_id is not None:
        uri = served.tracking_uri
        console.print(f"MLflow run {run_id} in experiment '{served.experiment}' at {uri}")
        console.print(
            f"open the MLflow UI: [bold]mlflow ui --backend-store-uri {uri} "
            "--port 5000[/] then http://127.0.0.1:5000"
        )
    console.print(f"learned state snapshot: {served.snapshot_path}")
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

"""Benchmark of the routing engine: in-process and over HTTP. Run: `make bench` or
`.venv/bin/python bench/engine_bench.py [--quick]`.

Reports medians over repeats, and ratios against peers measured in the same run (the `uniform`
policy, which draws without posterior sampling; the server's no-op `/healthz`), so the figures
can be read on a noisy shared machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carriers.catalog import load_catalog
from experiments.world import World, load_scenario
from router.contract.messages import OutcomeEvent, RouteDecision, RouteRequest
from router.core.config import load_config
from router.core.engine import EngineOptions, RoutingEngine
from router.log.decision_log import DecisionLog
from router.serving.app import tune_gc
from tests.conftest import LiveServer, start_server

T0 = 1_793_602_800.0  # 2026-11-02T07:00Z


def _requests(n: int, rate: float, seed: int = 0) -> list[RouteRequest]:
    """A realistic mix: ten countries, four tenants, numbers with operators, `rate` per second."""
    catalog = load_catalog()
    world = World(load_scenario("demo"), catalog)
    rng = np.random.default_rng(seed)
    countries = list(world.numbers)
    weights = np.array([world.spec.traffic.countries[c] for c in countries])
    weights /= weights.sum()
    reqs = []
    for i in range(n):
        country = countries[rng.choice(len(countries), p=weights)]
        to, mccmnc = world.numbers[country][int(rng.integers(len(world.numbers[country])))]
        tenant = "acme" if country in ("IN", "BR", "NG", "ID", "KE", "US") else "default"
        reqs.append(
            RouteRequest(to, "otp", tenant, "alphanumeric", 1, mccmnc, (), 1, None, T0 + i / rate)
        )
    return reqs


def _engine(policy: str, log_dir: Path | None) -> RoutingEngine:
    config = load_config()
    if policy != config.policy:
        config = config.with_policy(policy)
    log = DecisionLog(log_dir, validate=False) if log_dir else None
    return RoutingEngine(
        load_catalog(),
        config.with_seed(1),
        EngineOptions(max_future_skew_seconds=None),
        log_decision=log.log_decision if log else None,
        log_outcome=log.log_outcome if log else None,
    )


class _Receipts:
    """Delivers a DELIVRD receipt 4 s (event time) after each decision, outside the timing,
    so the engine runs in a steady state: few decisions pending, no false alarms."""

    def __init__(self, engine: RoutingEngine) -> None:
        self.engine = engine
        self.due: deque[tuple[float, str]] = deque()

    def sent(self, decisions: list) -> None:
        for d in decisions:
            if isinstance(d, RouteDecision):
                self.due.append((d.at + 4.0, d.decision_id))

    def deliver_until(self, now: float) -> None:
        events = []
        while self.due and self.due[0][0] <= now:
            at, did = self.due.popleft()
            events.append(OutcomeEvent(did, "dlr", "DELIVRD", at=at))
        if events:
            self.engine.record_outcomes(events)


def bench_single(policy: str, reqs: list[RouteRequest], log_dir: Path | None) -> dict:
    """Per-decision latency of `engine.route` in a steady state (receipts flowing back)."""
    engine = _engine(policy, log_dir)
    receipts = _Receipts(engine)
    for r in reqs[:2000]:
        receipts.deliver_until(r.at)
        receipts.sent([engine.route(r)])
    lat = np.empty(len(reqs) - 2000)
    for i, r in enumerate(reqs[2000:]):
        receipts.deliver_until(r.at)
        t = time.perf_counter_ns()
        d = engine.route(r)
        lat[i] = time.perf_counter_ns() - t
        receipts.sent([d])
    return {
        "p50_us": np.percentile(lat, 50) / 1e3,
        "p99_us": np.percentile(lat, 99) / 1e3,
        "per_s": 1e9 / lat.mean(),
    }


def bench_batch(
    policy: str, reqs: list[RouteRequest], log_dir: Path | None, size: int = 1000
) -> dict:
    """Decisions per second through `engine.route_batch`, receipts flowing back untimed."""
    engine = _engine(policy, log_dir)
    receipts = _Receipts(engine)
    receipts.sent(engine.route_batch(reqs[:2000]))
    rest = reqs[2000:]
    elapsed = 0.0
    for i in range(0, len(rest), size):
        chunk = rest[i : i + size]
        receipts.deliver_until(chunk[0].at)
        t = time.perf_counter()
        answers = engine.route_batch(chunk)
        elapsed += time.perf_counter() - t
        receipts.sent(answers)
    return {"per_s": len(rest) / elapsed}


def bench_outcomes(reqs: list[RouteRequest], log_dir: Path | None) -> dict:
    """Outcome events per second (a submit and a DELIVRD receipt per decision), in lists of 500."""
    engine = _engine("thompson", log_dir)
    decisions = [engine.route(r) for r in reqs]
    events = []
    for d in decisions:
        events.append(OutcomeEvent(d.decision_id, "submit", at=d.at + 0.2))
        events.append(OutcomeEvent(d.decision_id, "dlr", "DELIVRD", at=d.at + 4.0))
    events.sort(key=lambda e: e.at)
    t = time.perf_counter()
    for i in range(0, len(events), 500):
        engine.record_outcomes(events[i : i + 500])
    return {"per_s": len(events) / (time.perf_counter() - t)}


# ---- HTTP ----------------------------------------------------------------------------------


def _uncapped_catalog(folder: Path) -> Path:
    """The example catalog with throughput caps raised 100x: load tests measure the decision
    path, not the carriers' caps (which would rightly answer 'at capacity')."""
    import yaml

    from carriers.catalog import EXAMPLE_CATALOG

    raw = yaml.safe_load(EXAMPLE_CATALOG.read_text())
    for carrier in raw["carriers"]:
        carrier["throughput_mps"] = carrier.get("throughput_mps", 100) * 100
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start_server(data_dir: Path) -> LiveServer:
    return start_server(data_dir, "--no-mlflow", "--catalog", str(_uncapped_catalog(data_dir)))


def _client(args: tuple[str, str, list[dict], int, float]) -> list[float]:
    """One client process: `path` requests with bodies, latencies in seconds."""
    url, path, bodies, batch, seconds = args
    lat = []
    end = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as c:
        i = 0
        while time.monotonic() < end and i < len(bodies):
            body = bodies[i] if batch == 0 else bodies[i : i + batch]
            t = time.perf_counter()
            r = c.get(path) if path == "/healthz" else c.post(path, json=body)
            lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(r.text)
            i += max(batch, 1)
    return lat


def bench_http(reqs: list[RouteRequest], clients: int, seconds: float) -> dict:
    """Decisions per second and latency over HTTP, `clients` processes against one worker."""
    from router.contract.client import _request_json

    with tempfile.TemporaryDirectory() as tmp:
        live = _start_server(Path(tmp))
        url = live.url
        try:
            bodies = [_request_json(r) for r in reqs]
            parts = [bodies[k::clients] for k in range(clients)]
            out = {}
            with mp.get_context("spawn").Pool(clients) as pool:
                for name, path, batch in (
                    ("healthz", "/healthz", 0),
                    ("single", "/v1/route", 0),
                    ("batch100", "/v1/route/batch", 100),
                ):
                    t = time.perf_counter()
                    lats = pool.map(_client, [(url, path, p, batch, seconds) for p in parts])
                    elapsed = time.perf_counter() - t
                    flat = np.array([x for lst in lats for x in lst])
                    n = len(flat) * max(batch, 1)
                    out[name] = {
                        "per_s": n / elapsed,
                        "p50_ms": np.percentile(flat, 50) * 1e3,
                        "p99_ms": np.percentile(flat, 99) * 1e3,
                    }
            return out
        finally:
            live.stop()


_WRK_LUA = """
local bodies = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("%s", "%s", {["Content-Type"] = "application/json"}, bodies[(i %% #bodies) + 1])
end
"""


def _wrk(url: str, method: str, path: str, bodies: list[str], seconds: int, conns: int) -> dict:
    """Drive the server with wrk (C, one thread) and parse requests/s and latency percentiles."""
    import re
    import shutil

    if shutil.which("wrk") is None:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(_WRK_LUA % (",".join(f"[==[{b}]==]" for b in bodies) or '""', method, path))
        script = fh.name
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", script, f"{url}{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script)
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        return float(m.group(1)) * unit[m.group(2)] if m else float("nan")

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "req_per_s": rps,
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def bench_wrk(reqs: list[RouteRequest], seconds: int) -> dict:
    """One uvicorn worker under wrk: no-op /healthz (the peer), single and batched decisions."""
    import json

    from router.contract.client import _request_json

    with tempfile.TemporaryDirectory() as tmp:
        live = _start_server(Path(tmp))
        url = live.url
        try:
            bodies = [  # wall time, not `at`: wrk replays the bodies in a loop
                {k: v for k, v in _request_json(r).items() if k != "at"} for r in reqs[:5000]
            ]
            singles = [json.dumps(b) for b in bodies]
            batches = [json.dumps(bodies[i : i + 100]) for i in range(0, 5000, 100)]
            return {
                "healthz": _wrk(url, "GET", "/healthz", [""], seconds, 16),
                "single": _wrk(url, "POST", "/v1/route", singles, seconds, 16),
                "batch100": _wrk(url, "POST", "/v1/route/batch", batches, seconds, 4),
            }
        finally:
            live.stop()


def main() -> None:
    """Run everything and print a table of medians."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = 8_000 if args.quick else 40_000
    repeats = 1 if args.quick else args.repeats
    reqs = _requests(n, rate=200.0)
    tune_gc()  # as `router serve` does
    print(
        f"machine: {os.cpu_count()} cores; {n:,} requests, 200/s of event time, "
        f"{repeats} repeats (medians)"
    )
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for policy in ("thompson", "uniform"):
                for logged in (False, True):
                    log_dir = Path(tmp) / f"{policy}-{logged}-{r}" if logged else None
                    key = f"{policy}{' +log' if logged else ''}"
                    results.setdefault(f"single {key}", []).append(
                        bench_single(policy, reqs, log_dir)
                    )
                    log_dir = Path(tmp) / f"b{policy}-{logged}-{r}" if logged else None
                    results.setdefault(f"batch {key}", []).append(
                        bench_batch(policy, reqs, log_dir)
                    )
            results.setdefault("outcomes +log", []).append(
                bench_outcomes(reqs[: n // 2], Path(tmp) / f"o{r}")
            )
    for name, runs in results.items():
        cols = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        print(f"{name:28s} " + "  ".join(f"{k} {v:>10,.1f}" for k, v in cols.items()))
    wrk = bench_wrk(reqs, seconds=5 if args.quick else 10)
    for name, v in wrk.items():
        if v:
            per = v["req_per_s"] * (100 if name == "batch100" else 1)
            print(
                f"wrk {name:9s} 1 worker  req/s {v['req_per_s']:>8,.0f}  decisions/s "
                f"{per if name != 'healthz' else 0:>9,.0f}  p50 {v['p50_ms']:.2f} ms  "
                f"p99 {v['p99_ms']:.2f} ms  non-2xx {v['non_2xx']}"
            )
    if wrk.get("single"):
        print(
            f"wrk single / healthz ratio: "
            f"{wrk['single']['req_per_s'] / wrk['healthz']['req_per_s']:.2f}"
        )
    for clients in (2,):
        http = bench_http(reqs, clients=clients, seconds=5 if args.quick else 10)
        for name, v in http.items():
            print(
                f"http {name:10s} {clients} clients  per_s {v['per_s']:>9,.0f}  "
                f"p50 {v['p50_ms']:.2f} ms  p99 {v['p99_ms']:.2f} ms"
            )
        print(
            f"http single / healthz ratio ({clients} clients): "
            f"{http['single']['per_s'] / http['healthz']['per_s']:.2f}"
        )


if __name__ == "__main__":
    main()

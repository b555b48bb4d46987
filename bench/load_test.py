"""Bounded load test: client processes against `router serve --workers N` sharing one Redis.

Run: `.venv/bin/python bench/load_test.py [--seconds 30] [--clients 4] [--workers 2]`
(at most 60 s of load). It starts a private redis-server (or uses --redis-url) and the server on
loopback; each client process routes one message at a time and reports a DELIVRD receipt for
each decision, over keep-alive connections. It prints decisions per second, p50/p99 latency of
decisions and of outcomes, every non-200 answer, and then checks that the workers learned as
one: every acknowledged outcome is in each worker's learner once the outboxes are empty.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_bench import _uncapped_catalog  # the example catalog without throughput caps

from tests.conftest import start_server
from tests.redis_server import RedisServer

PREFIXES = [("+7903", 7), ("+49151", 8), ("+7916", 7)]  # RU (Beeline, MTS), DE mobile ranges


def _client(args: tuple[str, float, int, int | None]) -> dict:
    """One client process: route, then report the receipt, until the deadline (or `count`
    times)."""
    url, seconds, seed, count = args
    rng = random.Random(seed)
    route_lat: list[float] = []
    outcome_lat: list[float] = []
    errors: Counter[str] = Counter()
    acked = 0
    start = time.time()
    end = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() < end if count is None else len(route_lat) < count:
            prefix, digits = rng.choice(PREFIXES)
            to = f"{prefix}{rng.randrange(10**digits):0{digits}d}"
            t = time.perf_counter()
            try:
                r = c.post("/v1/route", json={"to": to})
            except httpx.TransportError as exc:
                errors[f"route {type(exc).__name__}"] += 1
                continue
            route_lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors[f"route {r.status_code} {r.json()['error']['code']}"] += 1
                continue
            body = {"decision_id": r.json()["decision_id"], "event": "dlr", "status": "DELIVRD"}
            t = time.perf_counter()
            o = c.post("/v1/outcomes", json=body)
            outcome_lat.append(time.perf_counter() - t)
            if o.status_code != 200:
                errors[f"outcome {o.status_code}"] += 1
            else:
                acked += o.json()["recorded"]
    return {
        "route": route_lat,
        "outcome": outcome_lat,
        "errors": errors,
        "acked": acked,
        "window": (start, time.time()),
    }


def _replicas(url: str, workers: int, timeout: float = 60) -> dict[str, dict]:
    """Each worker's /healthz `shared` block (new connections until all have answered)."""
    seen: dict[str, dict] = {}
    end = time.monotonic() + timeout
    while len(seen) < workers and time.monotonic() < end:
        with httpx.Client(base_url=url, timeout=10) as c:
            shared = c.get("/healthz").json()["shared"]
        seen[shared["replica"]] = shared
    return seen


def _settle(url: str, workers: int, acked: int, timeout: float = 60) -> tuple[float, dict]:
    """Seconds until every worker's learner holds `acked` answers and its outbox is empty."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        seen = _replicas(url, workers)
        if len(seen) == workers and all(
            s["learned"] == acked and s["outbox"] == 0 for s in seen.values()
        ):
            return time.monotonic() - t0, seen
        time.sleep(0.1)
    return float("nan"), _replicas(url, workers)


def _sample_lag(url: str, out: list[float], stop: threading.Event) -> None:
    """Sample the workers' replication lag (/healthz, new connections) while under load."""
    while not stop.wait(0.2):
        try:
            with httpx.Client(base_url=url, timeout=10) as c:
                out.append(c.get("/healthz").json()["shared"]["lag_ms"])
        except httpx.HTTPError:
            pass


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1e3) if values else float("nan")


def run(folder: Path, seconds: float, clients: int, workers: int, redis_url: str | None) -> dict:
    """One configuration under load: figures per the module docstring."""
    folder.mkdir(parents=True, exist_ok=True)
    server_args = ["--no-mlflow", "--auth", "off", "--catalog", str(_uncapped_catalog(folder))]
    if redis_url:
        server_args += ["--redis-url", redis_url, "--workers", str(workers)]
    live = start_server(folder / "router", *server_args)
    try:
        if redis_url:
            _replicas(live.url, workers)  # every worker up before the clock starts
        alone = _client((live.url, 0.0, -1, 300))  # one request at a time, nothing else
        lags: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_lag, args=(live.url, lags, stop), daemon=True)
        if redis_url:
            sampler.start()
        with mp.get_context("spawn").Pool(clients) as pool:
            parts = pool.map(_client, [(live.url, seconds, k, None) for k in range(clients)])
        stop.set()
        acked = sum(part["acked"] for part in parts) + alone["acked"]
        settled = _settle(live.url, workers, acked) if redis_url else (float("nan"), {})
    finally:
        live.stop()
    elapsed = max(p["window"][1] for p in parts) - min(p["window"][0] for p in parts)
    routes = [x for part in parts for x in part["route"]]
    outcomes = [x for part in parts for x in part["outcome"]]
    return {
        "elapsed": elapsed,
        "routes": routes,
        "outcomes": outcomes,
        "errors": sum((part["errors"] for part in parts), Counter()),
        "acked": acked,
        "settle_s": settled[0],
        "learned": [s["learned"] for s in settled[1].values()],
        "lag_ms": lags,
        "alone": alone,
    }


def report(name: str, r: dict) -> None:
    """Print one configuration's figures."""
    routes, outcomes, elapsed = r["routes"], r["outcomes"], r["elapsed"]
    print(f"== {name}: {elapsed:.1f} s of load")
    print(
        f"decisions: {len(routes)} ({len(routes) / elapsed:.0f}/s)  "
        f"p50 {_pct(routes, 50):.2f} ms  p99 {_pct(routes, 99):.2f} ms  "
        f"max {max(routes) * 1e3:.1f} ms"
    )
    print(
        f"outcomes:  {len(outcomes)} ({len(outcomes) / elapsed:.0f}/s)  "
        f"p50 {_pct(outcomes, 50):.2f} ms  p99 {_pct(outcomes, 99):.2f} ms"
    )
    print(f"errors: {sum(r['errors'].values())} {dict(r['errors'])}")
    alone = r["alone"]
    print(
        f"one request at a time (before the load, {len(alone['route'])} each): decision p50 "
        f"{_pct(alone['route'], 50):.2f} ms, outcome p50 {_pct(alone['outcome'], 50):.2f} ms"
    )
    if r["lag_ms"]:
        lag = r["lag_ms"]
        print(
            f"replication lag under load ({len(lag)} samples of /healthz): "
            f"p50 {np.percentile(lag, 50):.1f} ms  p99 {np.percentile(lag, 99):.1f} ms"
        )
    if r["learned"]:
        print(
            f"learned as one: {r['acked']} acknowledged outcomes; per worker learned "
            f"{r['learned']}, settled {r['settle_s']:.2f} s after the load"
        )


def main() -> None:
    """Run the load test (and the embedded single process as the peer) and print figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--redis-url", help="an existing Redis (default: a private redis-server)")
    p.add_argument(
        "--no-peer", action="store_true", help="skip the embedded single-process peer run"
    )
    args = p.parse_args()
    seconds = min(args.seconds, 60.0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        redis_server = None
        url = args.redis_url
        if url is None:
            redis_server = RedisServer(folder / "redis").start()
            url = redis_server.url
        try:
            shared = run(folder / "shared", seconds, args.clients, args.workers, url)
        finally:
            if redis_server is not None:
                redis_server.kill()
        peer = None if args.no_peer else run(folder / "embedded", seconds, args.clients, 1, None)
    print(f"{args.clients} client processes on loopback; machine load: {os.getloadavg()[0]:.1f}")
    report(f"{args.workers} workers + Redis", shared)
    if peer is not None:
        report("peer: 1 process, embedded state (no Redis)", peer)
        ratio = (len(shared["routes"]) / shared["elapsed"]) / (
            len(peer["routes"]) / peer["elapsed"]
        )
        print(f"decisions/s ratio, {args.workers} workers + Redis vs embedded: {ratio:.2f}")


if __name__ == "__main__":
    main()

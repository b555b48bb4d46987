"""Benchmark of the SMPP connector: submits and receipts per second against the simulated SMSC.

Run: `.venv/bin/python bench/smpp_bench.py [--seconds 3] [--repeats 3] [--quick]`.

The SMSC runs in its own process (so it does not share the connector's interpreter lock). Two
receipt modes: "live", each receipt comes 50 ms after its submit, so receipts flow back while
submits go out (the steady state: submits/s and receipts/s over the submit phase); "burst", the
SMSC holds every receipt until the submit phase is over and releases them all (receipts/s is
the rate at which the connector reads, matches, reports and acknowledges them). Submits/s counts
accepted `submit_sm` (one part each) from many keys. Configurations: one bind with one
thread (one submit at a time: the case Nagle's algorithm hurts), one bind shared by several
threads (pipelined up to the window), and several binds with threads each (sharing one receipt
matcher, since a receipt may come back on any bind of the account), each with and without
TCP_NODELAY. Prints medians over repeats.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carriers.smpp.client import SmppCarrier
from carriers.smpp.dlr import Receipt
from carriers.smpp.receipt_match import ReceiptMatcher
from carriers.smsc.server import Fate, PlannedReceipt, SimulatedSMSC, Submission

NUMBER = "+447700900123"


LIVE_DELAY_S = 0.05


def _smsc_process(port_queue: mp.Queue, stop: mp.Event, release_at: mp.Value) -> None:
    """Serve one simulated SMSC: receipts due at `release_at` (epoch seconds), or 50 ms after
    the submit while `release_at` is 0."""

    def behaviour(submission: Submission) -> Fate:
        hold = release_at.value
        delay = max(0.0, hold - submission.at) if hold else LIVE_DELAY_S
        return Fate.accept(PlannedReceipt(delay, "DELIVRD"))

    smsc = SimulatedSMSC("bench", behaviour, password="secret", window=64).start()
    port_queue.put(smsc.port)
    stop.wait()
    smsc.stop()


@dataclass(frozen=True)
class Run:
    """One measured run: accepted submits and receipts per second, and the connector's CPU time
    per message (submit and receipt, all its threads), which the machine's load barely moves."""

    submits_per_s: float
    receipts_per_s: float
    submitted: int
    receipts: int
    cpu_us_per_message: float


def _run(
    port: int,
    release_at: mp.Value,
    *,
    connections: int,
    threads_per_connection: int,
    nodelay: bool,
    seconds: float,
    burst: bool,
) -> Run:
    """Submit for `seconds` through the configured binds; time the receipts (see the modes)."""
    times: list[float] = []
    lock = threading.Lock()

    def on_receipt(_key: str, _receipt: Receipt) -> None:
        now = time.perf_counter()
        with lock:
            times.append(now)

    matcher = ReceiptMatcher()
    carriers = [
        SmppCarrier(
            f"bench{i}",
            "127.0.0.1",
            port,
            "bench",
            "secret",
            window=10,
            tcp_nodelay=nodelay,
            on_receipt=on_receipt,
            matcher=matcher,
        )
        for i in range(connections)
    ]
    for carrier in carriers:
        carrier.start(timeout=10)
    release_at.value = time.time() + seconds + 1.0 if burst else 0.0
    accepted = [0] * (connections * threads_per_connection)
    deadline = time.perf_counter() + seconds

    def sender(index: int, carrier: SmppCarrier) -> None:
        n = 0
        while time.perf_counter() < deadline:
            if carrier.submit(f"{index}-{n}", NUMBER, "Your code is 123456").ok:
                accepted[index] += 1
            n += 1

    workers = [
        threading.Thread(target=sender, args=(i, carriers[i % connections]))
        for i in range(len(accepted))
    ]
    start, cpu_start = time.perf_counter(), time.process_time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    submit_s = time.perf_counter() - start
    submitted = sum(accepted)
    wait_until = time.perf_counter() + 60 + submitted / 200
    while len(times) < submitted and time.perf_counter() < wait_until:
        time.sleep(0.01)
    cpu_us = (time.process_time() - cpu_start) * 1e6 / max(1, submitted)
    for carrier in carriers:
        carrier.close(timeout=5)
    if burst:
        span = times[-1] - times[0] if len(times) > 1 else float("nan")
        receipts_per_s = (len(times) - 1) / span
    else:
        receipts_per_s = sum(1 for t in times if t <= start + submit_s) / submit_s
    return Run(submitted / submit_s, receipts_per_s, submitted, len(times), cpu_us)


def main() -> None:
    """Run every configuration `--repeats` times and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="submit phase per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8, help="threads sharing one bind")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="1 s runs, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.repeats = 1.0, 1
    configs = [
        ("1 bind, 1 thread", 1, 1),
        (f"1 bind, {args.threads} threads", 1, args.threads),
        (f"{args.connections} binds, 2 threads each", args.connections, 2),
    ]
    ctx = mp.get_context("spawn")
    port_queue, stop, release_at = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    server = ctx.Process(target=_smsc_process, args=(port_queue, stop, release_at), daemon=True)
    server.start()
    try:
        port = port_queue.get(timeout=30)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"SMSC in process {server.pid} on 127.0.0.1:{port}; {args.repeats} repeats of "
            f"{args.seconds:g} s; {os.cpu_count()} cores, load average {load}"
        )
        print(
            f"{'configuration':28} {'receipts':>8} {'TCP_NODELAY':>11} "
            f"{'submits/s':>10} {'receipts/s':>11} {'CPU us/msg':>11}"
        )
        for label, connections, threads in configs:
            for burst in (False, True):
                mode = "burst" if burst else "live"
                medians = {}
                runs: dict[bool, list[Run]] = {True: [], False: []}
                for _ in range(args.repeats):  # on and off alternate, so both see the same load
                    for nodelay in (True, False):
                        runs[nodelay].append(
                            _run(
                                port,
                                release_at,
                                connections=connections,
                                threads_per_connection=threads,
                                nodelay=nodelay,
                                seconds=args.seconds,
                                burst=burst,
                            )
                        )
                for nodelay in (True, False):
                    lost = sum(r.submitted - r.receipts for r in runs[nodelay])
                    sub = statistics.median(r.submits_per_s for r in runs[nodelay])
                    rec = statistics.median(r.receipts_per_s for r in runs[nodelay])
                    cpu = statistics.median(r.cpu_us_per_message for r in runs[nodelay])
                    medians[nodelay] = (sub, rec)
                    note = f"  ({lost} receipts missing)" if lost else ""
                    print(
                        f"{label:28} {mode:>8} {'on' if nodelay else 'off':>11} "
                        f"{sub:10.0f} {rec:11.0f} {cpu:11.0f}{note}"
                    )
                (s_on, r_on), (s_off, r_off) = medians[True], medians[False]
                print(f"{'':28} {'':>8} {'on/off':>11} {s_on / s_off:9.1f}x {r_on / r_off:10.1f}x")
    finally:
        stop.set()
        server.join(10)


if __name__ == "__main__":
    main()

"""The whole sending path's throughput: queue -> router (HTTP) -> SMPP submit -> receipt -> outcome.

A `router serve` process, one simulated SMSC per carrier in a second process, and sender workers
(with their binds) in this one. Each configuration sends the same jobs to German numbers with
every carrier but one paused (one bind per worker) or with all three German carriers (several
binds), and reports submits/s, receipts/s and messages/s end to end (all receipts reported).

    .venv/bin/python bench/worker_bench.py [--jobs 3000] [--repeats 3] [--journal file]

`--journal` is where each worker records its outcome events before acknowledging them:
`file` (an fsync'd journal, what `router worker` does without Redis), `redis` (`--redis-url`,
what it does with Redis) or `memory` (no durability: the in-process default).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carriers.catalog import load_catalog  # noqa: E402
from carriers.sender.journal import FileJournal, MemoryJournal, OutcomeJournal, RedisJournal  # noqa: E402
from carriers.sender.ledger import MemoryLedger  # noqa: E402
from carriers.sender.queue import InProcessQueue, Job  # noqa: E402
from carriers.sender.reporter import OutcomeReporter  # noqa: E402
from carriers.sender.worker import SenderWorker, WorkerOptions  # noqa: E402
from carriers.smpp.client import SmppCarrier  # noqa: E402
from router.contract.client import RouterClient  # noqa: E402

DE_CARRIERS = ("globalprime", "eurodirect", "budgetroute")
JOURNAL = {"kind": "memory", "dir": Path(tempfile.gettempdir()), "redis_url": ""}


def journal_for(name: str) -> OutcomeJournal:
    """The outcome journal of one bench worker (`--journal`)."""
    if JOURNAL["kind"] == "file":
        return FileJournal(Path(JOURNAL["dir"]) / "journal", name)
    if JOURNAL["kind"] == "redis":
        import redis

        return RedisJournal(redis.Redis.from_url(str(JOURNAL["redis_url"])), name, "bench:{out}")
    return MemoryJournal()


def smsc_process(ports: mp.Queue, stop: mp.Event, accounts: int) -> None:  # type: ignore[type-arg]
    """Run one simulated SMSC per German carrier until told to stop."""
    from carriers.smsc.server import SimulatedSMSC, deliver_after

    smscs = [
        SimulatedSMSC(
            cid,
            deliver_after(0.0),
            accounts={f"{cid[:10]}w{w}": "bench" for w in range(accounts)},
            window=256,
        ).start()
        for cid in DE_CARRIERS
    ]
    ports.put({s.carrier_id: s.port for s in smscs})
    stop.wait()
    for s in smscs:
        s.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def uncapped_catalog(data: Path) -> Path:
    """The example catalog without throughput caps (the bench measures the path, not the caps)."""
    import yaml

    from carriers.catalog import EXAMPLE_CATALOG

    raw = yaml.safe_load(Path(EXAMPLE_CATALOG).read_text())
    for carrier in (
        raw["carriers"].values() if isinstance(raw["carriers"], dict) else raw["carriers"]
    ):
        carrier.pop("throughput_mps", None)
    path = data / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_router(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    catalog = str(uncapped_catalog(data))
    env = {**os.environ, "ROUTER_HMAC_KEY": "bench"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--port", str(port), "--data-dir",
         str(data), "--no-mlflow", "--log-level", "warning", "--catalog", catalog],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("router did not start")


def run_once(url: str, ports: dict[str, int], n_jobs: int, workers: int, carriers: tuple[str, ...],
             concurrency: int, tag: str) -> dict[str, float]:  # fmt: skip
    """Send `n_jobs` through `workers` workers; rates over the whole run."""
    admin = httpx.Client(base_url=url)
    for cid in load_catalog().carriers:
        action = "resume" if cid in carriers else "pause"
        admin.post(f"/v1/carriers/{cid}/{action}", json={})
    queue = InProcessQueue()
    ledger = MemoryLedger()
    fleet: list[SenderWorker] = []
    for w in range(workers):
        client = RouterClient(url, timeout=30)
        reporter = OutcomeReporter(client, journal=journal_for(f"{tag}-w{w}"))
        worker = SenderWorker(
            client, {}, queue, ledger=ledger,
            options=WorkerOptions(concurrency=concurrency), reporter=reporter,
        )  # fmt: skip
        for cid in carriers:
            link = SmppCarrier(cid, "127.0.0.1", ports[cid], f"{cid[:10]}w{w}", "bench",
                               window=64, on_receipt=worker.receipt_handler(cid))  # fmt: skip
            link.start()
            worker.links[cid] = link
        fleet.append(worker)
    for i in range(n_jobs):
        queue.put(Job(f"{tag}-{i}", f"+4915123{i % 1_000_000:06d}", f"code {i:06d}", "acme"))
    cpu0, t0 = time.process_time(), time.perf_counter()
    for worker in fleet:
        worker.start()
    while queue.pending() or not all(w.idle() for w in fleet):
        time.sleep(0.005)
    t_submit = time.perf_counter() - t0
    while any(w.awaiting_receipts() or w.reporter.backlog() for w in fleet):
        time.sleep(0.005)
    total = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    for worker in fleet:
        worker.stop()
        for link in worker.links.values():
            link.close(timeout=5)
    submitted = sum(w.stats.submitted for w in fleet)
    receipts = sum(w.stats.receipts for w in fleet)
    assert submitted == n_jobs and receipts == n_jobs, (submitted, receipts)
    return {
        "submits_per_s": submitted / t_submit,
        "receipts_per_s": receipts / total,
        "messages_per_s": n_jobs / total,
        "worker_cpu_us_per_msg": 1e6 * cpu / n_jobs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--journal", choices=["file", "redis", "memory"], default="file")
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""))
    args = ap.parse_args()
    JOURNAL.update(kind=args.journal, redis_url=args.redis_url)
    configs = [
        ("1 worker, 1 bind, 8 threads", 1, DE_CARRIERS[:1], 8),
        ("1 worker, 3 binds, 8 threads", 1, DE_CARRIERS, 8),
        ("2 workers, 3 binds each, 8 threads each", 2, DE_CARRIERS, 8),
    ]
    ports_q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    stop = mp.Event()
    smsc = mp.Process(target=smsc_process, args=(ports_q, stop, 2), daemon=True)
    smsc.start()
    ports = ports_q.get(timeout=30)
    with tempfile.TemporaryDirectory() as tmp:
        JOURNAL["dir"] = Path(tmp)
        router, url = start_router(Path(tmp))
        try:
            results: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in configs}
            for r in range(args.repeats):  # interleaved, so load drifts hit every config alike
                for name, workers, carriers, conc in configs:
                    results[name].append(
                        run_once(url, ports, args.jobs, workers, carriers, conc, f"r{r}{name[:9]}")
                    )
        finally:
            router.terminate()
            router.wait(timeout=60)
            stop.set()
            smsc.join(timeout=10)
    print(f"journal: {args.journal}; load average at the end: {os.getloadavg()[0]:.1f} (2 cores)")
    summary = {}
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        summary[name] = med
        print(
            f"{name:42s} submits/s {med['submits_per_s']:7.0f}  receipts/s "
            f"{med['receipts_per_s']:7.0f}  end-to-end msgs/s {med['messages_per_s']:7.0f}  "
            f"worker CPU {med['worker_cpu_us_per_msg']:5.0f} µs/msg"
        )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Chaos soak: the whole sending path under faults, then an exactly-once reconciliation.

Two `router serve` replicas on one private `redis-server`, two `router worker` processes (jobs
from the Redis Stream `sms:{jobs}`), one simulated SMSC per catalog carrier (all in one separate
process, `bench/chaos.py smsc`, which counts what each SMSC accepted, the receipts it had
acknowledged and what it billed), traffic at a steady rate, and a scheduler that in turn:

* SIGKILLs Redis and starts it again on the same port and append-only file (fsync always);
* SIGKILLs one replica and starts it again on the same port and data folder;
* SIGKILLs one worker and starts a new one (a new consumer name: the jobs and outcome journal the
  dead one left are taken over by whichever worker comes first after `--claim-idle`);
* kills one SMSC (every TCP session reset, connections refused) and lets it listen again a few
  seconds later; it keeps the receipts it owes, as a real SMSC with its own storage does.

Each worker points at one replica (worker 1 at replica A, worker 2 at replica B): `router
worker` takes one `--router-url`, and with one each a replica's SIGKILL stalls only its own
worker while the other keeps sending, and a job taken over by the other worker has its outcomes
posted to the replica that did not make its decision (the cross-replica path).

At the end it stops enqueueing, waits (bounded) for the stream, the workers' journals and the
SMSCs' owed receipts to drain, stops every process gracefully and reconciles, deduplicating
nothing (every row of both replicas' decision-log segments is counted, read with
`router.log.decision_log.read_stream`):

    jobs in = first-attempt decisions; decisions = submit results = decision records in Redis
    jobs in = submits accepted (log) = submits accepted (SMSCs)
    receipts acknowledged to the SMSCs = dlr outcomes recorded (Redis) = dlr rows (log)
    spend in the log = spend the SMSCs billed

It prints the table and exits 1 naming every difference (0 when all lines agree). Destination
numbers come from example ranges (DE +49 1512345xxxx, GB +44 740012xxxx) and are never printed
or written outside Redis.

    .venv/bin/python bench/chaos.py [--minutes 5] [--rate 20] [--seed 1] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis  # noqa: E402

FAULT_KINDS = ("redis", "replica", "worker", "smsc")
STREAM = "sms:{jobs}"
TENANT = "globex"  # DE and GB allowed, every carrier, no conversions
HMAC_KEY = "chaos-bench-key"
PREFIXES = ("+491512345", "+44740012")  # + 4 digits: example ranges (DE Telekom, GB Three)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ---- the SMSC process --------------------------------------------------------------------------


def smsc_main(argv: list[str]) -> int:
    """`chaos.py smsc`: one SimulatedSMSC per catalog carrier, counters to a JSON file.

    Writes `--ports` once listening; rewrites `--stats` every 0.5 s and on SIGTERM (then exits).
    SIGUSR1 kills the SMSC named in `--control` (JSON {"carrier", "down_s"}) and restarts it
    `down_s` seconds later.
    """
    p = argparse.ArgumentParser(prog="chaos.py smsc")
    p.add_argument("--ports", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--receipt-delay", type=float, nargs=2, default=(0.5, 3.0))
    args = p.parse_args(argv)

    from carriers.catalog import load_catalog
    from carriers.smsc.server import Fate, PlannedReceipt, SimulatedSMSC, Submission
    from features.numbering import DestinationParser

    catalog = load_catalog()
    parser = DestinationParser(catalog.directory)
    lock = threading.Lock()
    billed: dict[str, float] = {cid: 0.0 for cid in catalog.carriers}
    billed_messages: dict[str, int] = {cid: 0 for cid in catalog.carriers}
    kills: dict[str, int] = {cid: 0 for cid in catalog.carriers}
    # Each message's first acceptance (a digest of number and text, never the number): a second
    # one is a double send, counted and logged with both places and times.
    first_seen: dict[str, tuple[str, str, float]] = {}
    repeats: dict[str, int] = {cid: 0 for cid in catalog.carriers}
    rng = random.Random(args.seed)
    lo, hi = args.receipt_delay

    def behaviour(cid: str) -> Callable[[Submission], Fate]:
        carrier = catalog.carriers[cid]

        def fate(sub: Submission) -> Fate:
            # Every message is accepted and delivered, so a carrier billing on submit and one
            # billing on delivery both bill it once: price of the destination x its parts.
            dest = parser.parse(
                sub.destination if sub.destination.startswith("+") else "+" + sub.destination
            )
            price = carrier.coverage[dest.country].price_for(dest.operator) * sub.parts
            digest = hashlib.sha256(f"{sub.destination}|{sub.text}".encode()).hexdigest()[:12]
            now = time.time()
            with lock:
                billed[cid] += price
                billed_messages[cid] += 1
                delay = rng.uniform(lo, hi)
                first = first_seen.setdefault(digest, (cid, sub.system_id, now))
                if first[2] != now:
                    repeats[cid] += 1
            if first[2] != now:
                print(
                    f"double send {digest}: first on {first[0]} ({first[1]}) at {first[2]:.3f}, "
                    f"again on {cid} ({sub.system_id}) at {now:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
            return Fate.accept(PlannedReceipt(delay, "DELIVRD", "000"))

        return fate

    smscs = {
        cid: SimulatedSMSC(cid, behaviour(cid), seed=args.seed).start() for cid in catalog.carriers
    }
    _write_json(
        Path(args.ports),
        {cid: {"port": s.port, "system_id": s.system_id} for cid, s in smscs.items()},
    )
    stop = threading.Event()
    down: dict[str, bool] = {cid: False for cid in smscs}

    def snapshot() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for cid, s in smscs.items():
            try:
                pending = s.pending_receipts
            except Exception:  # a loop busy for 5 s: report unknown
                pending = -1
            with lock:
                out[cid] = s.counters.as_dict() | {
                    "billed": billed[cid],
                    "billed_messages": billed_messages[cid],
                    "pending_receipts": pending,
                    "kills": kills[cid],
                    "repeats": repeats[cid],
                    "down": down[cid],
                }
        return out

    def kill_one(*_: object) -> None:
        try:
            ctl = json.loads(Path(args.control).read_text())
        except (OSError, ValueError):
            return
        cid, down_s = ctl["carrier"], float(ctl["down_s"])

        def run() -> None:
            smscs[cid].kill()
            down[cid] = True
            with lock:
                kills[cid] += 1
            time.sleep(down_s)
            smscs[cid].restart()
            down[cid] = False

        threading.Thread(target=run, daemon=True).start()

    signal.signal(signal.SIGUSR1, kill_one)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        _write_json(Path(args.stats), snapshot())
    _write_json(Path(args.stats), snapshot())
    for s in smscs.values():
        s.stop()
    _write_json(Path(args.stats), snapshot())
    return 0


# ---- the orchestrator --------------------------------------------------------------------------


@dataclass
class Config:
    minutes: float = 5.0
    rate: float = 20.0
    seed: int = 1
    keep: bool = False
    data_dir: Path | None = None
    faults: tuple[str, ...] = FAULT_KINDS  # the rotation, in order
    fault_every: float | None = None  # seconds between faults (default: duration / (2·kinds+1))
    first_fault: float | None = None  # seconds before the first one (default: fault_every)
    redis_down: float = 3.0
    replica_down: float = 2.0
    worker_down: float = 1.0
    smsc_down: float = 5.0
    claim_idle: float = 3.0
    concurrency: int = 4
    drain_timeout: float = 180.0
    progress_every: float = 10.0
    report: Path | None = None

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds from start, kind) of every fault."""
        duration = self.minutes * 60
        every = self.fault_every or duration / (2 * len(self.faults) + 1)
        t = self.first_fault if self.first_fault is not None else every
        out: list[tuple[float, str]] = []
        k = 0
        while t < duration - 5 and self.faults:
            out.append((t, self.faults[k % len(self.faults)]))
            k += 1
            t += every
        return out


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Proc:
    """A child process started from a fixed command (restartable), output to a log file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name, self.cmd, self.log_path, self.env = name, cmd, log_path, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Proc:
        with open(self.log_path, "ab") as out:
            out.write(f"\n---- start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
            )
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=15)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; SIGKILL after `timeout`. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in {timeout:.0f} s: SIGKILL")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class Run:
    """What happened during a run (for the report)."""

    enqueued: int = 0
    enqueue_retries: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)
    worker_exits: list[int | None] = field(default_factory=list)
    replica_exits: list[int | None] = field(default_factory=list)
    drained: bool = False
    drain_seconds: float = 0.0
    drain_state: dict[str, Any] = field(default_factory=dict)


class Chaos:
    def __init__(self, cfg: Config) -> None:
        from tests.redis_server import RedisServer

        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.dir = Path(cfg.data_dir or tempfile.mkdtemp(prefix="chaos-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.dir / "redis")
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ROUTER_API_KEY")},
            "ROUTER_HMAC_KEY": HMAC_KEY,
            "PYTHONUNBUFFERED": "1",
        }
        self.run = Run()
        self.replicas: list[Proc] = []
        self.replica_urls: list[str] = []
        self.workers: list[Proc] = []
        self.worker_gen = [0, 0]
        self.smsc: Proc | None = None
        self.ports: dict[str, Any] = {}
        self._stop_producer = threading.Event()
        self._lock = threading.Lock()

    # ---- processes -------------------------------------------------------------------------

    def start_smscs(self) -> None:
        ports, stats, control = (
            self.dir / n for n in ("smsc-ports.json", "smsc-stats.json", "smsc-control.json")
        )
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "smsc",
            "--ports",
            str(ports),
            "--stats",
            str(stats),
            "--control",
            str(control),
            "--seed",
            str(self.cfg.seed),
        ]
        self.smsc = Proc("smsc", cmd, self.dir / "smsc.log", self.env).start()
        deadline = time.monotonic() + 30
        while not ports.exists():
            if not self.smsc.alive() or time.monotonic() > deadline:
                raise RuntimeError("the SMSC process did not start: see " + str(self.smsc.log_path))
            time.sleep(0.1)
        self.ports = json.loads(ports.read_text())

    def smsc_stats(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / "smsc-stats.json").read_text())
        except (OSError, ValueError):
            return {}

    def start_replicas(self) -> None:
        for name in ("a", "b"):
            port = _free_port()
            data = self.dir / f"replica-{name}"
            data.mkdir(exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "router.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data),
                "--redis-url",
                self.redis.url,
                "--no-mlflow",
                "--checkpoint-seconds",
                "5",
                "--auth",
                "off",
                "--seed",
                str(self.cfg.seed),
                "--log-level",
                "warning",
            ]
            self.replicas.append(
                Proc(f"replica-{name}", cmd, data / "server.log", self.env).start()
            )
            self.replica_urls.append(f"http://127.0.0.1:{port}")
        for i in range(2):
            self.wait_replica(i)

    def wait_replica(self, i: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.replicas[i].alive():
                raise RuntimeError(
                    f"{self.replicas[i].name} exited: see {self.replicas[i].log_path}"
                )
            try:
                if httpx.get(self.replica_urls[i] + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.replicas[i].name} did not answer in {timeout} s")
            time.sleep(0.1)

    def worker_proc(self, i: int) -> Proc:
        self.worker_gen[i] += 1
        consumer = f"w{i + 1}.{self.worker_gen[i]}"
        links: list[str] = []
        for cid, s in self.ports.items():
            links += ["--link", f"{cid}=smpp://{s['system_id']}:secret@127.0.0.1:{s['port']}"]
        cmd = [
            sys.executable,
            "-m",
            "router.cli",
            "worker",
            "--router-url",
            self.replica_urls[i],
            "--redis-url",
            self.redis.url,
            "--stream",
            STREAM,
            "--consumer",
            consumer,
            "--claim-idle",
            str(self.cfg.claim_idle),
            "--concurrency",
            str(self.cfg.concurrency),
            *links,
        ]
        return Proc(
            f"worker {consumer}", cmd, self.dir / f"worker-{consumer}.log", self.env
        ).start()

    # ---- traffic ---------------------------------------------------------------------------

    def producer(self) -> None:
        """XADD jobs at a steady rate with explicit increasing ids `<n>-1`: a retry after a lost
        answer is refused as "equal or smaller" exactly when the first XADD was applied, so the
        count of jobs in is exact across Redis kills."""
        from carriers.sender.queue import Job

        client = redis.Redis.from_url(self.redis.url, socket_timeout=2, socket_connect_timeout=1)
        t0, n = time.monotonic(), 0
        while not self._stop_producer.is_set():
            due = t0 + n / self.cfg.rate
            wait = due - time.monotonic()
            if wait > 0:
                self._stop_producer.wait(wait)
                continue
            n += 1
            job = Job(
                f"chaos-{self.cfg.seed}-{n}",
                f"{PREFIXES[n % 2]}{self.rng.randrange(10_000):04d}",
                f"Your code is {self.rng.randrange(1_000_000):06d}",
                tenant=TENANT,
            )
            body = {"job": job.to_json()}
            while True:
                try:
                    client.xadd(STREAM, body, id=f"{n}-1")
                    break
                except redis.ResponseError as exc:
                    if "equal or smaller" in str(exc):  # the lost-answer XADD was applied
                        break
                    raise
                except (redis.ConnectionError, redis.TimeoutError):
                    with self._lock:
                        self.run.enqueue_retries += 1
                    time.sleep(0.2)
            with self._lock:
                self.run.enqueued = n
        client.close()

    # ---- faults ----------------------------------------------------------------------------

    def fault(self, kind: str) -> dict[str, Any]:
        cfg, t = self.cfg, time.monotonic()
        rec: dict[str, Any] = {"kind": kind}
        if kind == "redis":
            self.redis.kill()
            time.sleep(cfg.redis_down)
            self.redis.start()
            rec["down_s"] = cfg.redis_down
        elif kind == "replica":
            i = self.rng.randrange(2)
            self.replicas[i].kill()
            time.sleep(cfg.replica_down)
            self.replicas[i].start()
            self.wait_replica(i)
            rec["target"] = self.replicas[i].name
        elif kind == "worker":
            i = self.rng.randrange(2)
            old = self.workers[i]
            old.kill()
            self.run.worker_exits.append(-9)
            time.sleep(cfg.worker_down)
            self.workers[i] = self.worker_proc(i)
            rec["target"] = f"{old.name} -> {self.workers[i].name}"
        elif kind == "smsc":
            busiest = sorted(self.smsc_stats().items(), key=lambda kv: -kv[1].get("accepted", 0))
            cid = busiest[self.rng.randrange(min(2, len(busiest)))][0] if busiest else "globalprime"
            _write_json(self.dir / "smsc-control.json", {"carrier": cid, "down_s": cfg.smsc_down})
            assert self.smsc is not None and self.smsc.proc is not None
            self.smsc.proc.send_signal(signal.SIGUSR1)
            rec["target"] = cid
            rec["down_s"] = cfg.smsc_down
        else:
            raise ValueError(f"unknown fault {kind!r}")
        rec["took_s"] = round(time.monotonic() - t, 2)
        return rec

    # ---- observation -----------------------------------------------------------------------

    def backlog(self) -> dict[str, Any]:
        """What is still in flight: unacknowledged stream entries, journal items, receipts owed."""
        out: dict[str, Any] = {}
        try:
            with self.redis.client() as r:
                groups = r.xinfo_groups(STREAM)
                g = next((g for g in groups if g["name"] in (b"senders", "senders")), None)
                out["stream_len"] = r.xlen(STREAM)
                out["unacked"] = (g or {}).get("pending", 0)
                out["unread"] = (g or {}).get("lag", 0) if g else r.xlen(STREAM)
                journal = 0
                for key in r.scan_iter("sms:{outcomes}:journal:*", count=500):
                    if r.type(key) == b"hash":
                        journal += r.hlen(key)
                out["journal"] = journal
        except redis.RedisError as exc:
            out["redis"] = type(exc).__name__
        stats = self.smsc_stats()
        out["receipts_owed"] = sum(max(0, s.get("pending_receipts", 0)) for s in stats.values())
        out["accepted"] = sum(s.get("accepted", 0) for s in stats.values())
        outbox = 0
        for url in self.replica_urls:
            try:
                body = httpx.get(url + "/healthz", timeout=2).json()
                shared = body.get("shared", {}) if isinstance(body, dict) else {}
                outbox += int(shared.get("outbox", 0) or 0)
            except (httpx.HTTPError, ValueError):
                out["replica_down"] = out.get("replica_down", 0) + 1
        out["outbox"] = outbox
        return out

    def drained(self, b: dict[str, Any]) -> bool:
        return (
            "redis" not in b
            and "replica_down" not in b
            and b.get("stream_len", 1) == 0
            and b.get("unacked", 1) == 0
            and b.get("journal", 1) == 0
            and b.get("receipts_owed", 1) == 0
            and b.get("outbox", 1) == 0
        )

    # ---- the run ---------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        cfg = self.cfg
        schedule = cfg.schedule()
        log(
            f"data in {self.dir}; {cfg.minutes:g} min at {cfg.rate:g} jobs/s, seed {cfg.seed}; "
            f"faults: " + ", ".join(f"{k}@{t:.0f}s" for t, k in schedule)
        )
        self.redis.start()
        try:
            self.start_smscs()
            self.start_replicas()
            self.workers = [self.worker_proc(0), self.worker_proc(1)]
            producer = threading.Thread(target=self.producer, daemon=True)
            t0 = time.monotonic()
            producer.start()
            duration = cfg.minutes * 60
            pending = list(schedule)
            next_progress = t0 + cfg.progress_every
            while (now := time.monotonic()) - t0 < duration:
                if pending and now - t0 >= pending[0][0]:
                    _, kind = pending.pop(0)
                    rec = self.fault(kind) | {"at_s": round(now - t0, 1)}
                    self.run.faults.append(rec)
                    log(f"fault {len(self.run.faults)}: {rec}")
                    continue
                if now >= next_progress:
                    self.progress(now - t0, duration)
                    next_progress += cfg.progress_every
                time.sleep(0.1)
            self._stop_producer.set()
            producer.join(timeout=30)
            log(
                f"enqueueing stopped at {self.run.enqueued} jobs; "
                f"draining (≤ {cfg.drain_timeout:.0f} s)"
            )
            self.drain()
            return self.finish()
        finally:
            self.cleanup()

    def progress(self, elapsed: float, duration: float) -> None:
        b = self.backlog()
        log(
            f"{elapsed:5.0f}/{duration:.0f} s  jobs in {self.run.enqueued}  accepted by SMSCs "
            f"{b.get('accepted', '?')}  unread {b.get('unread', '?')}  unacked "
            f"{b.get('unacked', '?')}  journal "
            f"{b.get('journal', '?')}  receipts owed {b.get('receipts_owed', '?')}  faults "
            f"{len(self.run.faults)}" + (f"  redis {b['redis']}" if "redis" in b else "")
        )

    def drain(self) -> None:
        t = time.monotonic()
        b: dict[str, Any] = {}
        stable = 0
        while time.monotonic() - t < self.cfg.drain_timeout:
            b = self.backlog()
            stable = stable + 1 if self.drained(b) else 0
            if stable >= 3:  # three reads in a row, a second apart
                self.run.drained = True
                break
            if int(time.monotonic() - t) % 10 == 0:
                log(f"draining: {b}")
            time.sleep(1.0)
        self.run.drain_seconds = round(time.monotonic() - t, 1)
        self.run.drain_state = b
        log(
            f"drain {'done' if self.run.drained else 'TIMED OUT'} "
            f"in {self.run.drain_seconds} s: {b}"
        )

    def finish(self) -> dict[str, Any]:
        """Stop everything gracefully (Redis last), then count."""
        for w in self.workers:
            self.run.worker_exits.append(w.stop(timeout=60))
        for r in self.replicas:
            self.run.replica_exits.append(r.stop(timeout=60))
        redis_counts = count_redis(self.redis.url)
        dead = redis_counts.pop("dead_letters")
        assert self.smsc is not None
        self.smsc.stop(timeout=30)
        self.redis.stop()
        report = reconcile(
            [self.dir / f"replica-{n}" / "decision_log" for n in ("a", "b")],
            self.smsc_stats(),
            redis_counts,
            self.run.enqueued,
        )
        report["dead_letters"] = dead
        report["workers"] = scan_worker_logs(sorted(self.dir.glob("worker-*.log")))
        report["run"] = asdict(self.run)
        report["data_dir"] = str(self.dir)
        report["config"] = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items()
        }
        return report

    def cleanup(self) -> None:
        self._stop_producer.set()
        for p in [*self.workers, *self.replicas, *([self.smsc] if self.smsc else [])]:
            if p.alive():
                p.kill()
        self.redis.kill()


# ---- counting ---------------------------------------------------------------------------------


def count_redis(url: str) -> dict[str, int]:
    """Decision records and outcome fields in the replicas' Redis hashes, and dead letters."""
    out = {"decision_records": 0, "submit_recorded": 0, "dlr_recorded": 0, "dead_letters": 0}
    r = redis.Redis.from_url(url, socket_timeout=10)
    try:
        for key in r.scan_iter("router:{s*}:d:*", count=1000):
            fields = r.hkeys(key)
            names = [f.decode() for f in fields]
            out["decision_records"] += "r" in names
            out["submit_recorded"] += sum(n == "s:submit" for n in names)
            out["dlr_recorded"] += sum(n.startswith("s:dlr") for n in names)
        for key in r.scan_iter("sms:{outcomes}:dead*", count=100):
            kind = r.type(key)
            out["dead_letters"] += (
                r.hlen(key)
                if kind == b"hash"
                else r.llen(key)
                if kind == b"list"
                else r.xlen(key)
                if kind == b"stream"
                else r.zcard(key)
                if kind == b"zset"
                else 0
            )
    finally:
        r.close()
    return out


def reconcile(
    logs: list[Path], smsc: dict[str, Any], redis_counts: dict[str, int], jobs_in: int
) -> dict[str, Any]:
    """The reconciliation lines: every count as it really is (nothing deduplicated)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from router.log.decision_log import (
        DECISION_SCHEMA,
        DECISIONS,
        OUTCOME_SCHEMA,
        OUTCOMES,
        read_stream,
    )

    dec = pa.concat_tables([read_stream(d, DECISIONS, DECISION_SCHEMA) for d in logs])
    out = pa.concat_tables([read_stream(d, OUTCOMES, OUTCOME_SCHEMA) for d in logs])
    per_replica = {
        d.parent.name: {
            "decisions": read_stream(d, DECISIONS, DECISION_SCHEMA).num_rows,
            "outcomes": read_stream(d, OUTCOMES, OUTCOME_SCHEMA).num_rows,
            "open_journals": len(list(d.rglob("open-*.jsonl"))),
        }
        for d in logs
    }
    attempt = dec["attempt"].to_numpy(zero_copy_only=False)
    events = out["event"].to_numpy(zero_copy_only=False).astype(str)
    status = out["status"].to_numpy(zero_copy_only=False).astype(str)
    is_submit, is_dlr = events == "submit", events == "dlr"
    submit_ok = is_submit & (status == "ACCEPTED")
    # Sent without an answer (session or wait ended first): the SMSC may or may not have it,
    # and the worker never sends it again.
    unconfirmed = is_submit & (status == "UNCONFIRMED")
    cost = pc.fill_null(out["cost"], 0.0).to_numpy(zero_copy_only=False)
    dlr_fail = is_dlr & (status != "DELIVRD")
    spend_log = float(pc.sum(pc.fill_null(out["cost"], 0.0)).as_py() or 0.0)
    total = lambda name: sum(int(s.get(name, 0)) for s in smsc.values())  # noqa: E731
    billed = sum(float(s.get("billed", 0.0)) for s in smsc.values())
    counts = {
        "jobs_in": jobs_in,
        "decisions": dec.num_rows,
        "first_attempts": int((attempt == 1).sum()),
        "retry_decisions": int((attempt > 1).sum()),
        "decision_records_redis": redis_counts["decision_records"],
        "submit_rows": int(is_submit.sum()),
        "submit_accepted_rows": int(submit_ok.sum()),
        "submit_unconfirmed_rows": int(unconfirmed.sum()),
        "submit_failed_rows": int((is_submit & ~submit_ok & ~unconfirmed).sum()),
        "submit_recorded_redis": redis_counts["submit_recorded"],
        "smsc_accepted": total("accepted"),
        "smsc_billed_messages": total("billed_messages"),
        "smsc_receipts_scheduled": total("receipts_scheduled"),
        "smsc_receipts_acked": total("receipts_acked"),
        "smsc_receipts_sent": total("receipts_sent"),
        "smsc_receipts_resent": total("receipts_resent"),
        "smsc_receipts_lost": total("receipts_expired") + total("receipts_dropped"),
        "smsc_kills": total("kills"),
        "smsc_repeats": total("repeats"),
        "dlr_recorded_redis": redis_counts["dlr_recorded"],
        "dlr_rows": int(is_dlr.sum()),
        "dlr_failed_rows": int(dlr_fail.sum()),
        "other_rows": int((~is_submit & ~is_dlr).sum()),
        "spend_log": round(spend_log, 6),
        "spend_unconfirmed": round(float(cost[unconfirmed].sum()), 6),
        "spend_billed": round(billed, 6),
    }
    c = counts
    u = c["submit_unconfirmed_rows"]
    lines = [
        (
            "jobs in = first-attempt decisions (log)",
            [("jobs in", c["jobs_in"]), ("attempt-1 rows", c["first_attempts"])],
        ),
        (
            "decisions (log) = decision records (Redis)",
            [("decision rows", c["decisions"]), ("Redis records", c["decision_records_redis"])],
        ),
        (
            "decisions = submit results (log, Redis)",
            [
                ("decision rows", c["decisions"]),
                ("submit rows", c["submit_rows"]),
                ("Redis submit fields", c["submit_recorded_redis"]),
            ],
        ),
        (
            "retry decisions = failed submits + failed receipts",
            [
                ("attempt>1 rows", c["retry_decisions"]),
                ("failed submit + dlr rows", c["submit_failed_rows"] + c["dlr_failed_rows"]),
            ],
        ),
        (
            "jobs in = submits accepted or unconfirmed (log)",
            [
                ("jobs in", c["jobs_in"]),
                ("ACCEPTED + UNCONFIRMED rows", c["submit_accepted_rows"] + u),
            ],
        ),
        (
            "ACCEPTED rows <= accepted by SMSCs <= ACCEPTED + UNCONFIRMED rows (none sent twice)",
            [
                ("ACCEPTED rows", c["submit_accepted_rows"]),
                ("SMSC accepted", c["smsc_accepted"]),
                ("+ UNCONFIRMED", c["submit_accepted_rows"] + u),
            ],
        ),
        ("messages accepted twice (SMSCs) = 0", [("repeats", c["smsc_repeats"]), ("none", 0)]),
        (
            "receipts owed = acknowledged by workers (SMSCs)",
            [
                ("scheduled", c["smsc_receipts_scheduled"]),
                ("acknowledged", c["smsc_receipts_acked"]),
            ],
        ),
        (
            "dlr recorded (Redis) = dlr rows (log)",
            [("Redis dlr fields", c["dlr_recorded_redis"]), ("dlr rows", c["dlr_rows"])],
        ),
        (
            # An unconfirmed submit's receipt has no message id the workers know: acknowledged,
            # not recorded (its decision waits for the deadline).
            "dlr rows <= receipts acknowledged (SMSCs) <= dlr rows + UNCONFIRMED rows",
            [
                ("dlr rows", c["dlr_rows"]),
                ("SMSC acked", c["smsc_receipts_acked"]),
                ("+ UNCONFIRMED", c["dlr_rows"] + u),
            ],
        ),
        (
            "spend (log) - UNCONFIRMED spend <= billed (SMSCs) <= spend (log)",
            [
                ("log - unconfirmed", round(c["spend_log"] - c["spend_unconfirmed"], 6)),
                ("SMSCs", c["spend_billed"]),
                ("log", c["spend_log"]),
            ],
        ),
    ]
    table = []
    for name, values in lines:
        nums = [v for _, v in values]
        if "<=" in name:  # bounds: the middle value between the outer two
            low, mid, high = nums
            ok = low - 1e-6 <= mid <= high + 1e-6
            diff = round(max(low - mid, mid - high, 0.0), 6)
        else:
            ok = all(math.isclose(v, nums[0], rel_tol=0, abs_tol=1e-6) for v in nums)
            diff = round(max(nums) - min(nums), 6)
        table.append({"line": name, "values": values, "ok": ok, "diff": diff})
    return {"lines": table, "counts": counts, "per_replica": per_replica}


def scan_worker_logs(paths: list[Path]) -> dict[str, Any]:
    """Per worker incarnation: sending threads that died on an exception, and its final stats
    (the `worker stopped: {...}` line of a graceful stop; none for a SIGKILLed one)."""
    import ast
    import re

    out: dict[str, Any] = {}
    for path in paths:
        text = path.read_text(errors="replace")
        stats = None
        m = re.search(r"worker stopped: (\{.*\})", text)
        if m:
            try:
                stats = ast.literal_eval(m.group(1))
            except (ValueError, SyntaxError):
                stats = None
        out[path.stem.removeprefix("worker-")] = {
            "sender_threads_died": len(re.findall(r"Exception in thread sender-\d+", text)),
            "stats": stats,
        }
    return out


def differences(report: dict[str, Any]) -> list[str]:
    """One sentence per line that differs (and for dead letters or an unfinished drain)."""
    out = []
    for line in report["lines"]:
        if not line["ok"]:
            vals = ", ".join(f"{k} {v:g}" for k, v in line["values"])
            out.append(f"{line['line']}: {vals} (difference {line['diff']:g})")
    died = {
        k: w["sender_threads_died"]
        for k, w in report.get("workers", {}).items()
        if w["sender_threads_died"]
    }
    if died:
        out.append(f"worker sending threads died on an exception (worker logs): {died}")
    if report.get("dead_letters"):
        out.append(f"dead letters: {report['dead_letters']}")
    run = report.get("run", {})
    if run and not run.get("drained"):
        out.append(f"drain timed out after {run.get('drain_seconds')} s: {run.get('drain_state')}")
    for name, rep in report.get("per_replica", {}).items():
        if rep["open_journals"]:
            out.append(
                f"{name}: {rep['open_journals']} open decision-log journal(s) after a clean stop"
            )
    return out


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="chaos reconciliation (every row of both replicas, nothing deduplicated)")
    t.add_column("line")
    t.add_column("counts")
    t.add_column("diff", justify="right")
    t.add_column("", justify="center")
    for line in report["lines"]:
        vals = "  ".join(
            f"{k} {v:,.6f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in line["values"]
        )
        t.add_row(
            line["line"], vals, f"{line['diff']:g}", "ok" if line["ok"] else "[red]DIFF[/red]"
        )
    console.print(t)
    run = report.get("run", {})
    faults = run.get("faults", [])
    kinds: dict[str, int] = {}
    for f in faults:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    c = report["counts"]
    console.print(
        f"faults: {kinds}; enqueue retries {run.get('enqueue_retries')}; drain "
        f"{'done' if run.get('drained') else 'TIMED OUT'} in {run.get('drain_seconds')} s; "
        f"dead letters {report.get('dead_letters')}; SMSC receipts sent {c['smsc_receipts_sent']} "
        f"(resent {c['smsc_receipts_resent']}, lost {c['smsc_receipts_lost']}); "
        f"per replica {report.get('per_replica')}; exits workers {run.get('worker_exits')} "
        f"replicas {run.get('replica_exits')}"
    )
    for name, w in report.get("workers", {}).items():
        st = w["stats"] or {}
        keys = (
            "jobs",
            "submitted",
            "submit_failed",
            "retries",
            "receipts",
            "unmatched_receipts",
            "skipped_redelivered",
            "unconfirmed",
            "ledger_errors",
            "dead_letters",
        )
        summary = ", ".join(f"{k} {st[k]}" for k in keys if k in st) or "no final stats (SIGKILLed)"
        console.print(f"worker {name}: sending threads died {w['sender_threads_died']}; {summary}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="traffic and faults (default 5)")
    p.add_argument("--rate", type=float, default=20.0, help="jobs enqueued per second")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the data folder")
    p.add_argument("--data-dir", type=Path, help="default: a new temporary folder")
    p.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help="fault rotation, comma-separated from redis,replica,worker,smsc",
    )
    p.add_argument("--fault-every", type=float, help="seconds between faults")
    p.add_argument("--first-fault", type=float, help="seconds before the first fault")
    p.add_argument("--drain-timeout", type=float, default=180.0)
    p.add_argument("--claim-idle", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=4, help="sending threads per worker")
    p.add_argument("--report", type=Path, help="also write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["smsc"]:
        return smsc_main(argv[1:])
    args = build_parser().parse_args(argv)
    faults = tuple(k for k in args.faults.split(",") if k)
    unknown = [k for k in faults if k not in FAULT_KINDS]
    if unknown:
        print(f"chaos: unknown fault(s) {unknown}", file=sys.stderr)
        return 2
    cfg = Config(
        minutes=args.minutes,
        rate=args.rate,
        seed=args.seed,
        keep=args.keep,
        data_dir=args.data_dir,
        faults=faults,
        fault_every=args.fault_every,
        first_fault=args.first_fault,
        drain_timeout=args.drain_timeout,
        claim_idle=args.claim_idle,
        concurrency=args.concurrency,
        report=args.report,
    )
    chaos = Chaos(cfg)
    try:
        report = chaos.execute()
    finally:
        if not cfg.keep and cfg.data_dir is None:
            shutil.rmtree(chaos.dir, ignore_errors=True)
    if cfg.report:
        cfg.report.write_text(json.dumps(report, indent=1, default=str))
    print_report(report)
    diffs = differences(report)
    for d in diffs:
        print(f"DIFFERENCE: {d}", flush=True)
    if cfg.keep or cfg.data_dir:
        print(f"data kept in {chaos.dir}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())

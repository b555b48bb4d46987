"""`router worker`: one sender-worker process (queue -> router -> SMPP carriers -> outcomes).

Jobs come from a Redis Stream (consumer group) when `--redis-url`/`REDIS_URL` is given, else as
JSON lines on standard input (the process exits when the input ends and every job is sent).
Carrier connections come from the catalog's `connection` settings, or from `--link` options.
SIGTERM or Ctrl-C stops taking jobs, finishes those in hand and reports every outcome.

Outcome events are recorded durably before they are acknowledged (`carriers/sender/journal.py`): in
Redis with `--redis-url`, else in a journal under `--data-dir`; what a dead worker recorded is
posted by the next one. Events the router refuses go to the dead letters (`router deadletters`);
a run that produced any exits with status 3.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import redis

from carriers.catalog import load_catalog
from carriers.sender.deadletters import (
    DEAD_LETTER_FILE,
    DeadLetterStore,
    FileDeadLetters,
    RedisDeadLetters,
)
from carriers.sender.journal import DEFAULT_KEY, FileJournal, OutcomeJournal, RedisJournal
from carriers.sender.ledger import JobLedger, MemoryLedger, RedisLedger
from carriers.sender.metrics import serve_metrics
from carriers.sender.queue import InProcessQueue, Job, MessageQueue, RedisStreamQueue
from carriers.sender.reporter import OutcomeReporter
from carriers.sender.worker import SenderWorker, WorkerOptions
from carriers.smpp.client import SmppCarrier
from carriers.smpp.receipt_time import receipt_timezone
from router.contract.client import RouterClient
from router.core.config import DEFAULT_POLICY_FILE, load_config

log = logging.getLogger("carriers.sender.worker")

EXIT_DEAD_LETTERS = 3  # the run ended normally but the router refused some outcomes


@dataclass(frozen=True)
class LinkSettings:
    """How to reach one carrier over SMPP."""

    carrier: str
    host: str
    port: int
    system_id: str
    password: str
    bind: str = "transceiver"
    window: int = 10
    max_tps: float | None = None
    receipt_tz: str | None = None  # zone of the SMSC's receipt dates (IANA name or +HH:MM)


def parse_link(spec: str) -> LinkSettings:
    """`carrier=smpp://system_id:password@host:port[?bind=pair&window=10&tps=50&receipt_tz=…]`."""
    carrier, sep, url = spec.partition("=")
    parts = urlsplit(url)
    if not sep or not carrier or parts.scheme != "smpp" or not parts.hostname or not parts.port:
        raise ValueError(
            f"--link {carrier or spec!r}: expected carrier=smpp://system_id:password@host:port"
        )
    query = dict(q.split("=", 1) for q in parts.query.split("&") if "=" in q)
    return LinkSettings(
        carrier,
        parts.hostname,
        parts.port,
        unquote(parts.username or carrier),
        unquote(parts.password or ""),
        _bind(query.get("bind", "transceiver")),
        int(query.get("window", 10)),
        float(query["tps"]) if "tps" in query else None,
        _zone(unquote(query["receipt_tz"])) if "receipt_tz" in query else None,
    )


def _zone(name: str, where: str = "--link receipt_tz") -> str:
    """A receipt zone name, checked now so a typo is an error at start, not a skewed clock."""
    try:
        receipt_timezone(name)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return name


def _bind(value: str) -> str:
    return "pair" if value in ("pair", "transceiver_pair", "tx_rx") else "transceiver"


def links_from_catalog(path: str | None) -> dict[str, LinkSettings]:
    """The SMPP connections of the catalog's carriers (passwords may come from `password_env`)."""
    catalog = load_catalog(path) if path else load_catalog()
    out: dict[str, LinkSettings] = {}
    for cid, carrier in catalog.carriers.items():
        conn: Mapping[str, Any] = carrier.connection
        if conn.get("protocol", "smpp") != "smpp" or "host" not in conn:
            continue
        password = os.environ.get(str(conn["password_env"]), "") if "password_env" in conn else ""
        out[cid] = LinkSettings(
            cid,
            str(conn["host"]),
            int(conn.get("port", 2775)),
            str(conn.get("system_id", cid)),
            password or str(conn.get("password", "")),
            _bind(str(conn.get("bind", "transceiver"))),
            int(conn.get("window", 10)),
            carrier.throughput_mps,
            _zone(str(conn["receipt_timezone"]), f"carrier {cid}: connection.receipt_timezone")
            if "receipt_timezone" in conn
            else None,
        )
    return out


def build_parser(sub: Any) -> None:
    """Add the `worker` verb to the `router` command."""
    p = sub.add_parser("worker", help="a sender worker: queue -> route -> carrier -> outcomes")
    p.add_argument("--router-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("ROUTER_API_KEY"))
    p.add_argument("--catalog", help="carrier connections from this catalog (default: embedded)")
    p.add_argument(
        "--link",
        action="append",
        default=[],
        help="carrier=smpp://system_id:password@host:port (repeatable; overrides the catalog)",
    )
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    p.add_argument("--stream", default="sms:{jobs}", help="the Redis Stream of jobs")
    p.add_argument("--consumer", help="consumer name in the group (default host-pid)")
    p.add_argument("--claim-idle", type=float, default=30.0, help="seconds before taking over")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--policy-file", help="SLAs per message class (default: the router's)")
    p.add_argument(
        "--linger", type=float, default=10.0, help="stdin mode: seconds to await last receipts"
    )
    p.add_argument(
        "--data-dir",
        default="data/worker",
        help="without Redis: the outcome journal and dead letters (default data/worker)",
    )
    p.add_argument(
        "--outcomes-key",
        default=DEFAULT_KEY,
        help=f"with Redis: key prefix of the outcome journal and dead letters ({DEFAULT_KEY})",
    )
    p.add_argument(
        "--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: any free)"
    )
    p.add_argument("--metrics-addr", default="0.0.0.0", help="address of the metrics server")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    """Run one worker until its input ends (stdin) or it is told to stop."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("carriers.smpp.wire").setLevel(logging.WARNING)
    try:
        settings = links_from_catalog(args.catalog) if args.catalog or not args.link else {}
        for spec in args.link:
            link = parse_link(spec)
            settings[link.carrier] = link
    except ValueError as exc:
        print(f"router worker: {exc}", file=sys.stderr)
        return 2
    config = load_config(args.policy_file or DEFAULT_POLICY_FILE)
    options = WorkerOptions(
        concurrency=args.concurrency,
        sla_seconds={n: mc.sla_seconds for n, mc in config.message_classes.items()},
    )
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    jobs: MessageQueue
    ledger: JobLedger
    journal: OutcomeJournal
    dead_letters: DeadLetterStore
    if args.redis_url:
        client = redis.Redis.from_url(args.redis_url, socket_timeout=10)
        jobs = RedisStreamQueue(
            args.redis_url,
            stream=args.stream,
            consumer=args.consumer,
            claim_idle_s=args.claim_idle,
            client=client,
        )
        ledger = RedisLedger(client)
        name = jobs.consumer
        journal = RedisJournal(client, name, args.outcomes_key, claim_idle_s=args.claim_idle)
        dead_letters = RedisDeadLetters(client, args.outcomes_key)
        where = f"Redis {args.outcomes_key}:*"
    else:
        jobs, ledger = InProcessQueue(), MemoryLedger()
        name = args.consumer or None
        data_dir = Path(args.data_dir)
        journal = FileJournal(data_dir / "journal", name)
        dead_letters = FileDeadLetters(data_dir / DEAD_LETTER_FILE)
        where = str(data_dir)
    router = RouterClient(args.router_url, timeout=30, headers=headers)
    reporter = OutcomeReporter(
        router,
        journal=journal,
        dead_letters=dead_letters,
        worker=name,
        recover_every_s=max(1.0, args.claim_idle / 2),
    )
    worker = SenderWorker(router, {}, jobs, ledger=ledger, options=options, reporter=reporter)
    if args.metrics_port is not None:
        port = serve_metrics(worker, args.metrics_port, args.metrics_addr)
        log.info("metrics on http://%s:%d/metrics", args.metrics_addr, port)
    for s in settings.values():
        link = SmppCarrier(
            s.carrier,
            s.host,
            s.port,
            s.system_id,
            s.password,
            bind=s.bind,  # type: ignore[arg-type]
            window=s.window,
            max_tps=s.max_tps,
            on_receipt=worker.receipt_handler(s.carrier),
            resolve_unmatched=worker.receipt_resolver(s.carrier),
            on_late_accept=worker.late_accept_handler(s.carrier),
            receipt_tz=receipt_timezone(s.receipt_tz),
        )
        try:
            link.start(timeout=10)
        except ConnectionError as exc:  # keeps rebinding in the background
            log.warning("%s", exc)
        worker.links[s.carrier] = link
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    log.info("worker up: %d carriers, %s", len(worker.links), type(jobs).__name__)
    if isinstance(jobs, InProcessQueue):
        threading.Thread(
            target=_read_stdin, args=(jobs, worker, stop, args.linger), daemon=True
        ).start()
    while not stop.wait(0.5):
        pass
    worker.stop()
    for link in worker.links.values():
        link.close(timeout=10)
    log.info("worker stopped: %s", vars(worker.stats) | vars(worker.reporter.stats))
    dead = worker.reporter.stats.dead_letters
    try:
        stored = dead_letters.count()
    except redis.RedisError:
        stored = -1
    jobs.close()
    print(
        f"router worker: {dead} dead letter(s) this run, {stored} in the store ({where})",
        file=sys.stderr,
    )
    if dead:
        log.error(
            "the router refused %d outcome(s): kept as dead letters in %s; read them with "
            "`router deadletters list`, post them again with `router deadletters replay`; "
            "exit status %d",
            dead,
            where,
            EXIT_DEAD_LETTERS,
        )
        return EXIT_DEAD_LETTERS
    return 0


def _read_stdin(
    jobs: InProcessQueue, worker: SenderWorker, stop: threading.Event, linger: float
) -> None:
    """Queue JSON-lines jobs from stdin; at its end, wait until every job is sent and (up to
    `linger` seconds) their receipts are in, then stop."""
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            jobs.put(Job.from_json(line))
        except ValueError as exc:
            log.warning("stdin line %d skipped: %s", n, exc)
    while jobs.pending() or not worker.idle():
        time.sleep(0.1)
    deadline = time.monotonic() + linger
    while worker.awaiting_receipts() and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()

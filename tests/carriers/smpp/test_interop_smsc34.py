"""The real sending path against an SMSC this project did not write (issue 12, point 7).

For each receipt style carriers use, a `router serve` process, an SMSC built on the `smpp34`
package (a Rust SMPP 3.4 stack, `tests/carriers/smpp/smsc34_server.py`) and a `router worker`
process (jobs from a private Redis Stream, binds to the SMSC as every carrier of the catalog) run
on loopback.
The SMSC logs every receipt it sends with the message's text (which names the job) and the
account (= carrier) it came on; the job ledger names each job's latest decision, and the
router's `GET /v1/decisions/{id}` its parents (retries) and outcomes. Each test then checks:

* every receipt the SMSC sent was acknowledged, and every final one reached the router on the
  right decision (the job's decision on that carrier) with the right status;
* no decision holds a receipt status the SMSC never sent for it (nothing misattributed);
* each recorded dlr event time lies between the decision's time and the wall time the SMSC sent
  that receipt (+1 s): a receipt's clock may be coarse, fast or in another zone, but the
  outcome cannot precede its decision, nor be known before it was sent.

Every wait is bounded; every process is stopped (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("smpp34", reason="the interop SMSC needs smpp34: pip install -e '.[dev]'")

from carriers.catalog import load_catalog
from carriers.sender.ledger import JobRecord, RedisLedger
from carriers.sender.queue import Job, RedisStreamQueue
from tests.carriers.smpp.smsc34_server import BEHAVIOURS
from tests.conftest import LiveServer, free_port, launch_server, wait_ready
from tests.redis_server import ExternalRedis, RedisServer

ROOT = Path(__file__).resolve().parents[3]
SMSC_SCRIPT = Path(__file__).resolve().parent / "smsc34_server.py"
CARRIERS = tuple(load_catalog().carriers)
NUMBER_PREFIX = "+49151234"  # German mobile numbers (example range), varied in the last digits
STREAM = "interop:{jobs}"
MAX_ATTEMPTS = 3  # the worker's default: a job is tried on at most three carriers
SETTLE_TIMEOUT_S = 45.0  # the longest a test waits for the traffic to settle
QUIET_S = 3.0  # settled: everything sent has its receipt and nothing moved for this long
TIME_SLACK_S = 1.0  # a receipt's event time may be at most this much after it was sent

JOBS = {"mixed_ids": 40, "long_parts": 24}  # per behaviour; others send 30


# ---- processes ------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> int | None:
    """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            return None
    return proc.returncode


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of a log being written (a torn last line is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@dataclass
class Smsc:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    stderr: Path

    def records(self, event: str | None = None) -> list[dict]:
        rows = read_jsonl(self.log)
        return rows if event is None else [r for r in rows if r.get("event") == event]

    def output(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:] if self.stderr.exists() else ""


def start_smsc(directory: Path, behaviour: str) -> Smsc:
    """The smpp34 SMSC as its own process; returns once it listens."""
    port = free_port()
    log, stderr = directory / "smsc.jsonl", directory / "smsc.stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(SMSC_SCRIPT),
                "--port",
                str(port),
                "--behaviour",
                behaviour,
                "--log",
                str(log),
            ],
            stdout=err,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    smsc = Smsc(proc, port, log, stderr)
    if not wait_until(lambda: bool(smsc.records("ready")) or proc.poll() is not None, 20):
        stop_process(proc)
        raise RuntimeError(f"the smpp34 SMSC did not start: {smsc.output()}")
    if proc.poll() is not None:
        raise RuntimeError(f"the smpp34 SMSC exited: {smsc.output()}")
    return smsc


def start_worker(directory: Path, router_url: str, redis_url: str, smsc_port: int):
    """`router worker` bound to the SMSC as every carrier (transceiver binds).

    Transceivers, because smpp34 1.5 cannot take a receipt's deliver_sm_resp on a receiver bind
    (it answers it with generic_nack ESME_RINVCMDID): `?bind=pair` would test smpp34, not us.
    """
    links: list[str] = []
    for cid in CARRIERS:
        links += ["--link", f"{cid}=smpp://{cid}:pw-{cid}@127.0.0.1:{smsc_port}"]
    log = directory / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "router.cli",
                "worker",
                "--router-url",
                router_url,
                "--redis-url",
                redis_url,
                "--stream",
                STREAM,
                "--consumer",
                "interop",
                "--concurrency",
                "4",
                *links,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
        )
    return proc, log


# ---- traffic --------------------------------------------------------------------------------


def make_jobs(behaviour: str, n: int) -> list[Job]:
    """OTP jobs for tenant acme to varied German mobile numbers; the text names the job.
    For `long_parts` every other text needs two or three concatenated parts."""
    tag = "".join(w[0] for w in behaviour.split("_")) + behaviour[-2:]
    jobs = []
    for i in range(n):
        job_id = f"{tag}-{i:03d}"
        text = f"Your code is {(i * 7919 + 1234) % 1_000_000:06d} ref {job_id}"
        if behaviour == "long_parts" and i % 2:
            text += " - do not share it with anyone" * (6 + i % 6)
        jobs.append(
            Job(
                job_id, f"{NUMBER_PREFIX}{50_000 + i:05d}", text, tenant="acme", message_class="otp"
            )
        )
    return jobs


JOB_REF = re.compile(r"\bref (\S+)")


def job_of(text: str) -> str | None:
    m = JOB_REF.search(text)
    return m.group(1) if m else None


def when(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@dataclass
class Run:
    """One behaviour's processes and what they did."""

    behaviour: str
    live: LiveServer
    smsc: Smsc
    worker: subprocess.Popen[bytes]
    worker_log: Path
    ledger: RedisLedger
    jobs: list[Job]

    def records(self) -> dict[str, JobRecord | None]:
        return {j.job_id: self.ledger.get(j.job_id) for j in self.jobs}

    def decision(self, decision_id: str) -> dict:
        r = self.live.client.get(f"/v1/decisions/{decision_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def decisions(self) -> dict[str, list[dict]]:
        """Every decision of each job: the ledger's latest and its parents (earlier attempts)."""
        out: dict[str, list[dict]] = {}
        for job_id, record in self.records().items():
            chain: list[dict] = []
            did = record.decision_id if record is not None else None
            while did and len(chain) < MAX_ATTEMPTS + 2:
                rec = self.decision(did)
                chain.append(rec)
                did = rec.get("parent_decision_id")
            out[job_id] = chain[::-1]
        return out


def all_sent_have_final_receipts(smsc: Smsc) -> bool:
    accepted = {(r["account"], r["resp_id"]) for r in smsc.records("accept")}
    finals = {(r["account"], r["resp_id"]) for r in smsc.records("receipt") if r["final"]}
    return bool(accepted) and accepted <= finals


def expected_receipts(smsc: Smsc) -> dict[tuple[str, str], dict[str, float]]:
    """(job, carrier) -> status -> the latest wall time the SMSC sent a receipt with it."""
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in smsc.records("receipt"):
        key = (job_of(r["text"]) or "?", r["account"])
        out[key][r["status"]] = max(out[key].get(r["status"], 0.0), float(r["sent_at"]))
    return out


def finals_sent(smsc: Smsc) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in smsc.records("receipt"):
        if r["final"]:
            out[(job_of(r["text"]) or "?", r["account"])].add(r["status"])
    return out


def dlrs(decision: dict) -> list[dict]:
    return [o for o in decision.get("outcomes", []) if o.get("event") == "dlr"]


def all_finals_visible(run: Run) -> bool:
    """Every final receipt the SMSC sent is on its decision in the router (the happy end)."""
    decisions = run.decisions()
    for (job_id, carrier), statuses in finals_sent(run.smsc).items():
        mine = [d for d in decisions.get(job_id, []) if d["carrier"] == carrier]
        if len(mine) != 1:
            return False
        got = {o["status"] for o in dlrs(mine[0])}
        if not statuses <= got:
            return False
    return True


def jobs_done(run: Run) -> bool:
    """Every job submitted, and its latest attempt either delivered or the last one allowed."""
    finals = finals_sent(run.smsc)
    for job_id, record in run.records().items():
        if record is None or not record.submitted:
            return False
        statuses = finals.get((job_id, record.carrier))
        if not statuses:
            return False
        if "DELIVRD" not in statuses and record.attempt < MAX_ATTEMPTS:
            return False
    return True


def settle(run: Run) -> str:
    """Wait (bounded) until the traffic is over; returns how it ended, for the failure text."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last_state, quiet_since = None, time.monotonic()
    while time.monotonic() < deadline:
        if run.worker.poll() is not None:
            return f"the worker exited with {run.worker.returncode}"
        if run.smsc.proc.poll() is not None:
            return f"the SMSC exited with {run.smsc.proc.returncode}"
        sent_done = all_sent_have_final_receipts(run.smsc)
        if sent_done and jobs_done(run) and all_finals_visible(run):
            return "settled"
        state = (run.smsc.log.stat().st_size, tuple(sorted(map(str, run.records().values()))))
        if state != last_state:
            last_state, quiet_since = state, time.monotonic()
        elif sent_done and time.monotonic() - quiet_since >= QUIET_S:
            return f"quiet for {QUIET_S:.0f} s (not every receipt reached the router)"
        time.sleep(0.25)
    return f"still moving after {SETTLE_TIMEOUT_S:.0f} s"


# ---- the check ------------------------------------------------------------------------------


def check(run: Run, ended: str) -> list[str]:
    """Everything wrong with the run, one line each (empty: the contract holds)."""
    problems: list[str] = []
    receipts = run.smsc.records("receipt")
    for r in receipts:
        if not r["acked"]:
            problems.append(
                f"{r['account']}: receipt {r['status']} for {job_of(r['text'])} was not "
                f"acknowledged (command_status {r['command_status']}, {r['attempts']} tries)"
            )
    records = run.records()
    missing = [job for job, rec in records.items() if rec is None or not rec.submitted]
    if missing:
        problems.append(f"{len(missing)} job(s) never submitted: {missing[:5]}")
    sent = expected_receipts(run.smsc)
    finals = finals_sent(run.smsc)
    decisions = run.decisions()
    by_key: dict[tuple[str, str], dict] = {}
    for job_id, chain in decisions.items():
        for d in chain:
            if (job_id, d["carrier"]) in by_key:
                problems.append(f"job {job_id} has two decisions on {d['carrier']}")
            by_key[(job_id, d["carrier"])] = d
    # Every final receipt reached the decision it belongs to, with its status.
    for (job_id, carrier), statuses in sorted(finals.items()):
        d = by_key.get((job_id, carrier))
        if d is None:
            problems.append(f"{carrier}: receipt for {job_id}, which has no decision there")
            continue
        got = {o["status"] for o in dlrs(d)}
        for status in sorted(statuses - got):
            ids = [
                f"{r['scheme']} resp {r['resp_id']} receipt {r['receipt_id']}"
                for r in receipts
                if job_of(r["text"]) == job_id and r["account"] == carrier and r["final"]
            ]
            problems.append(
                f"{carrier}: final receipt {status} for {job_id} never reached its decision "
                f"(router has {sorted(got) or 'no dlr'}; {ids[0] if ids else ''})"
            )
    # No decision holds a receipt that is not its own; event times are possible ones.
    for (job_id, carrier), d in sorted(by_key.items()):
        mine = sent.get((job_id, carrier), {})
        decided = when(d["at"])
        for o in dlrs(d):
            status = o["status"]
            if status not in mine:
                problems.append(
                    f"{carrier}: decision of {job_id} got a {status} receipt the SMSC never "
                    f"sent for it (it sent {sorted(mine) or 'nothing'})"
                )
                continue
            at = when(o["at"])
            if not decided - 0.001 <= at <= mine[status] + TIME_SLACK_S:
                problems.append(
                    f"{carrier}: {job_id}'s {status} recorded at {o['at']}, outside "
                    f"[decision {d['at']}, sent {datetime.fromtimestamp(mine[status]).time()} "
                    f"+ {TIME_SLACK_S:.0f} s] ({at - decided:+.1f} s from the decision)"
                )
    if problems:
        problems.insert(0, f"traffic: {ended}")
    return problems


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer | ExternalRedis]:
    """REDIS_URL's server (flushed) when set, else a private one without an append-only file
    (the job stream carries phone numbers; nothing of them is written to disk)."""
    url = os.environ.get("REDIS_URL")
    if url:
        srv: RedisServer | ExternalRedis = ExternalRedis(url)
        with srv.client() as c:
            c.flushdb()
        yield srv
        return
    srv = RedisServer(tmp_path / "redis", extra=("--appendonly", "no")).start()
    yield srv
    srv.kill()


@pytest.fixture
def interop(tmp_path: Path, private_redis) -> Iterator[Callable[[str], Run]]:
    """Starts a behaviour's router, SMSC, jobs and worker; stops them all afterwards."""
    started: list[Callable[[], object]] = []

    def run(behaviour: str) -> Run:
        live = launch_server(tmp_path / "router", "--no-mlflow", replay=False)
        started.append(live.stop)
        smsc = start_smsc(tmp_path, behaviour)
        started.append(lambda: stop_process(smsc.proc, 15))
        queue = RedisStreamQueue(private_redis.url, stream=STREAM, consumer="producer")
        started.append(queue.close)
        jobs = make_jobs(behaviour, JOBS.get(behaviour, 30))
        for job in jobs:
            queue.put(job)
        wait_ready(live)
        worker, worker_log = start_worker(tmp_path, live.url, private_redis.url, smsc.port)
        started.append(lambda: stop_process(worker, 30))
        return Run(behaviour, live, smsc, worker, worker_log, RedisLedger(queue.redis), jobs)

    yield run
    for stop in reversed(started):  # worker, queue, SMSC, router
        try:
            stop()
        except Exception as exc:  # keep stopping the others
            print(f"cleanup: {exc!r}", file=sys.stderr)


# ---- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_every_receipt_reaches_its_own_decision(interop, behaviour):
    run = interop(behaviour)
    ended = settle(run)
    problems = check(run, ended)
    receipts = run.smsc.records("receipt")
    assert receipts, f"the SMSC sent no receipt ({ended}): {run.smsc.output()}"
    numbers = {job.to.lstrip("+") for job in run.jobs}
    for path in (run.smsc.log, run.smsc.stderr, run.worker_log):  # no number in any log
        written = path.read_text(errors="replace")
        assert not any(n in written for n in numbers), f"a phone number in {path.name}"
    if behaviour == "long_parts":
        multi = {job_of(r["text"]) for r in receipts if r["parts"] > 1}
        assert len(multi) >= len(run.jobs) // 2 - 1, "long messages were not concatenated"
    if behaviour == "intermediate":
        assert any(not r["final"] for r in receipts)
    assert not problems, "\n".join(problems[:25]) + (
        f"\n... and {len(problems) - 25} more" if len(problems) > 25 else ""
    )

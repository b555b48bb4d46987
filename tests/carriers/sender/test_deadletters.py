"""Nothing dropped in silence: refused outcomes become dead letters, and recorded receipts
survive a worker's death (issue 12, points 2 and 4).

Real `router serve` processes (one that made the decisions, one that never heard of them), a
private Redis, simulated SMSCs and `router worker` processes that the tests SIGKILL. A small
HTTP proxy in front of the routers sends a worker's decisions to one router and its outcomes to
the other, or answers its outcomes 503 (the router "down"). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from carriers.sender.deadletters import DEAD_LETTER_FILE, FileDeadLetters, RedisDeadLetters
from carriers.sender.journal import FileJournal, RedisJournal
from carriers.sender.metrics import worker_registry
from carriers.sender.queue import RedisStreamQueue
from carriers.sender.reporter import OutcomeReporter
from carriers.sender.worker import SenderWorker
from carriers.smsc.server import SimulatedSMSC, deliver_after
from router.contract.client import RouterClient
from router.contract.messages import OutcomeEvent, RouteRequest
from tests.carriers.sender.test_worker import CARRIERS, DE, jobs_for, wait_for
from tests.conftest import LiveServer, free_port, start_server

ROOT = Path(__file__).resolve().parents[3]
WAIT_S = 60.0
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
ENV.pop("REDIS_URL", None)


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, LiveServer]]:
    """`a` makes the decisions; `b` knows none of them (so it refuses their outcomes)."""
    a = start_server(tmp_path_factory.mktemp("router-a"), "--no-mlflow", replay=False)
    b = start_server(tmp_path_factory.mktemp("router-b"), "--no-mlflow", replay=False)
    yield a, b
    a.stop()
    b.stop()


class SplitProxy:
    """Decisions go to `route_url`; outcomes go to `outcome_url`, or get 503 while blocked.
    Remembers the decision ids it passed on."""

    def __init__(self, route_url: str, outcome_url: str) -> None:
        self.route_url = route_url
        self.outcome_url = outcome_url
        self.blocked = threading.Event()
        self.decisions: list[str] = []
        self.outcome_posts = 0
        self.http = httpx.Client(timeout=30)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path.startswith("/v1/outcomes"):
                    proxy.outcome_posts += 1
                    if proxy.blocked.is_set():
                        self._answer(503, b'{"error": {"code": "down", "message": "down"}}')
                        return
                    target = proxy.outcome_url
                else:
                    target = proxy.route_url
                r = proxy.http.post(
                    target + self.path,
                    content=body,
                    headers={"content-type": "application/json"},
                )
                if self.path.startswith("/v1/route") and r.status_code == 200:
                    data = r.json()
                    for d in data if isinstance(data, list) else [data]:
                        if "decision_id" in d:
                            proxy.decisions.append(d["decision_id"])
                self._answer(r.status_code, r.content)

            def _answer(self, status: int, content: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.http.close()


@pytest.fixture
def smscs() -> Iterator[dict[str, SimulatedSMSC]]:
    """One simulated SMSC per catalog carrier, receipts 0.05 s after each submit."""
    fleet = {cid: SimulatedSMSC(cid, deliver_after(0.05)).start() for cid in CARRIERS}
    yield fleet
    for s in fleet.values():
        s.stop()


def link_args(smscs: dict[str, SimulatedSMSC]) -> list[str]:
    out: list[str] = []
    for cid, s in smscs.items():
        out += ["--link", f"{cid}=smpp://{s.system_id}:secret@127.0.0.1:{s.port}"]
    return out


def worker_cmd(router_url: str, smscs: dict[str, SimulatedSMSC], *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "router.cli",
        "worker",
        "--router-url",
        router_url,
        "--concurrency",
        "4",
        "--linger",
        "5",
        *link_args(smscs),
        *extra,
    ]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
    )


def outcomes(live: LiveServer, decision_id: str) -> list[dict]:
    r = live.client.get(f"/v1/decisions/{decision_id}")
    assert r.status_code == 200, r.text
    return r.json()["outcomes"]


def decide(live: LiveServer, n: int) -> list[str]:
    """`n` decisions made by `live` (German OTPs for acme)."""
    client = RouterClient(live.url)
    try:
        reqs = [RouteRequest(to=j.to, tenant="acme") for j in jobs_for(n)]
        return [d.decision_id for d in client.route_batch(reqs)]  # type: ignore[union-attr]
    finally:
        client.close()


def refused_metric(live: LiveServer, code: str) -> float:
    for line in live.client.get("/metrics").text.splitlines():
        if line.startswith(f'router_outcomes_refused_total{{code="{code}"}}'):
            return float(line.split()[-1])
    return 0.0


# ---- the journal on its own -----------------------------------------------------------------


def test_a_dead_owners_file_journal_is_taken_over_torn_line_and_all(tmp_path):
    ev = [OutcomeEvent(f"d{i}", "dlr", "DELIVRD", "000", at=1.7e9 + i) for i in range(5)]
    first = FileJournal(tmp_path, "first")
    ids = first.append(ev)
    first.posted(ids[:2])
    segment = next(tmp_path.glob("first-*.jsonl"))
    with open(segment, "ab") as f:
        f.write(b'{"a":"first-x:99","e":{"decision_id":"torn')  # a crash mid-write
    alive = FileJournal(tmp_path, "alive")
    assert alive.recover() == []  # first still holds its lock: alive, not taken
    os.close(first._lock_fd)  # first dies (its lock goes with it), its files stay
    taken = alive.recover()
    assert [e for _, e in taken] == ev[2:]
    assert not list(tmp_path.glob("first-*"))  # its files are gone once re-recorded here
    assert alive.recover() == []  # taken once
    alive.close()  # with events outstanding: they stay for the next one
    third = FileJournal(tmp_path, "third")
    again = third.recover()
    assert [e for _, e in again] == ev[2:]
    third.posted([i for i, _ in again])
    third.close()  # all posted: its files go
    assert list(tmp_path.iterdir()) == []


def test_a_dead_owners_redis_journal_is_taken_over_once(redis_server):
    client = redis_server.client()
    ev = [OutcomeEvent(f"d{i}", "submit", "ACCEPTED", at=1.7e9 + i) for i in range(4)]
    first = RedisJournal(client, "first", "t:{outcomes}", claim_idle_s=0.5)
    assert first.recover() == []
    ids = first.append(ev)
    first.posted(ids[:1])
    second = RedisJournal(client, "second", "t:{outcomes}", claim_idle_s=0.5)
    third = RedisJournal(client, "third", "t:{outcomes}", claim_idle_s=0.5)
    assert second.recover() == [] and third.recover() == []  # first is alive (heartbeat)
    first._closed.set()  # first dies: no more heartbeats
    time.sleep(0.8)
    got_second, got_third = second.recover(), third.recover()
    assert sorted((e for _, e in got_second + got_third), key=str) == ev[1:]
    assert not (got_second and got_third)  # exactly one taker
    assert not client.exists("t:{outcomes}:journal:first")
    taker = second if got_second else third
    taker.posted([i for i, _ in got_second + got_third])
    for j in (second, third):
        j.close()
    assert client.zcard("t:{outcomes}:owners") == 0


# ---- dead letters ---------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["file", "redis"])
def test_a_refused_outcome_becomes_a_dead_letter_and_a_replay_after_the_fix_empties_it(
    routers, store, tmp_path, request
):
    a, b = routers
    decided = decide(a, 3)
    if store == "redis":
        url = request.getfixturevalue("redis_server").url
        client = request.getfixturevalue("redis_server").client()
        journal = RedisJournal(client, "w1")
        dead = RedisDeadLetters(client)
        where = ["--redis-url", url]
    else:
        journal = FileJournal(tmp_path / "journal", "w1")
        dead = FileDeadLetters(tmp_path / DEAD_LETTER_FILE)
        where = ["--data-dir", str(tmp_path)]
    before = refused_metric(b, "unknown_decision")
    # To b, which never made these decisions: b refuses each of them.
    reporter = OutcomeReporter(RouterClient(b.url), journal=journal, dead_letters=dead, worker="w1")
    reporter.start()
    events = [OutcomeEvent(did, "dlr", "DELIVRD", "000", at=time.time()) for did in decided]
    reporter.report(events)
    assert reporter.flush(WAIT_S)
    reporter.stop()
    assert reporter.stats.dead_letters == reporter.stats.rejected == 3
    assert reporter.stats.reported == 0
    assert dead.count() == 3
    letter = dead.list()[0]
    assert letter.code == "unknown_decision" and letter.field == "decision_id"
    assert "not known" in letter.message and letter.worker == "w1" and letter.attempts == 1
    assert {d.event.decision_id for d in dead.list()} == set(decided)
    assert refused_metric(b, "unknown_decision") > before  # counted on the router too

    listed = cli("deadletters", "list", *where, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 3
    assert rows[0]["reason"]["code"] == "unknown_decision" and rows[0]["event"]["event"] == "dlr"
    assert {"id", "event", "reason", "at", "when", "worker", "attempts"} <= set(rows[0])
    table = cli("deadletters", "list", *where)
    assert "3 dead letter(s)" in table.stdout and "unknown_decision" in table.stdout

    # Replayed to the same router: refused again, kept with the new reason and one more try.
    again = cli("deadletters", "replay", "--router-url", b.url, *where, "--json")
    assert again.returncode == 1, again.stderr
    assert json.loads(again.stdout)["left"] == 3
    assert {d.attempts for d in dead.list()} == {2}
    # The fix: the router that made the decisions takes them; the store empties.
    fixed = cli("deadletters", "replay", "--router-url", a.url, *where, "--json")
    assert fixed.returncode == 0, fixed.stderr
    summary = json.loads(fixed.stdout)
    assert summary["taken"] == 3 and summary["left"] == 0 and summary["results"] == {"recorded": 3}
    assert dead.count() == 0
    for did in decided:
        assert [(o["event"], o["status"]) for o in outcomes(a, did)] == [("dlr", "DELIVRD")]
    assert cli("deadletters", "list", *where, "--json").stdout.strip() == "[]"


def test_worker_metrics_export_the_dead_letters(routers):
    _, b = routers
    worker = SenderWorker(RouterClient(b.url), {}, None)  # type: ignore[arg-type]
    worker.reporter.start()
    worker.reporter.report([OutcomeEvent("never-made", "dlr", "DELIVRD")])
    assert worker.reporter.flush(WAIT_S)
    worker.reporter.stop()
    from prometheus_client import generate_latest

    text = generate_latest(worker_registry(worker)).decode()
    assert "sms_worker_dead_letters_total 1.0" in text
    assert "sms_worker_outcomes_refused_total 1.0" in text
    assert "sms_worker_outcome_backlog 0.0" in text


def test_a_worker_run_that_made_dead_letters_exits_non_zero(routers, smscs, tmp_path):
    a, b = routers
    proxy = SplitProxy(a.url, b.url)  # decisions from a, outcomes to b: all refused
    try:
        lines = "".join(j.to_json() + "\n" for j in jobs_for(5, prefix="dl"))
        proc = subprocess.run(
            worker_cmd(proxy.url, smscs, "--data-dir", str(tmp_path)),
            input=lines,
            capture_output=True,
            text=True,
            timeout=120,
            env=ENV,
            cwd=ROOT,
        )
    finally:
        proxy.close()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "10 dead letter(s) this run, 10 in the store" in out  # 5 submits + 5 receipts
    assert "router deadletters replay" in out  # the log says what to do
    assert DE[:-4] not in out  # no number in the logs
    assert sum(s.counters.receipts_acked for s in smscs.values()) == 5
    replay = cli("deadletters", "replay", "--router-url", a.url, "--data-dir", str(tmp_path))
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert FileDeadLetters(tmp_path / DEAD_LETTER_FILE).count() == 0
    assert len(proxy.decisions) == 5
    for did in proxy.decisions:
        events = {(o["event"], o["status"]) for o in outcomes(a, did)}
        assert events == {("submit", "ACCEPTED"), ("dlr", "DELIVRD")}
    assert not list((tmp_path / "journal").glob("*.jsonl"))  # nothing left unposted


# ---- receipts survive a worker crash --------------------------------------------------------


def _spawn(cmd: list[str], log: Path, stdin: int | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=stdin, env=ENV)


def test_receipts_recorded_but_not_posted_are_posted_by_the_next_worker_on_the_journal(
    routers, smscs, tmp_path
):
    a, _ = routers
    proxy = SplitProxy(a.url, a.url)
    proxy.blocked.set()  # the router is "down" for outcomes
    jobs = jobs_for(8, prefix="fj")
    first = _spawn(
        worker_cmd(proxy.url, smscs, "--data-dir", str(tmp_path)),
        tmp_path / "first.log",
        stdin=subprocess.PIPE,
    )
    try:
        assert first.stdin is not None
        first.stdin.write("".join(j.to_json() + "\n" for j in jobs).encode())
        first.stdin.flush()  # stdin stays open: the worker waits for more
        # Every receipt acknowledged to its SMSC (so recorded in the journal), none posted.
        assert wait_for(lambda: sum(s.counters.receipts_acked for s in smscs.values()) == len(jobs))
        assert wait_for(lambda: proxy.outcome_posts > 0)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
        proxy.close()
    assert len(proxy.decisions) == len(jobs)
    for did in proxy.decisions:
        assert outcomes(a, did) == []  # the router never got them
    assert list((tmp_path / "journal").glob("*.jsonl"))
    # The next worker on the same data dir (no new jobs) posts them, then exits.
    second = subprocess.run(
        worker_cmd(a.url, smscs, "--data-dir", str(tmp_path)),
        input=b"",
        capture_output=True,
        timeout=120,
        env=ENV,
    )
    log = second.stdout.decode() + second.stderr.decode()
    assert second.returncode == 0, log[-3000:]
    assert "took over" in log
    for did in proxy.decisions:
        events = [(o["event"], o["status"]) for o in outcomes(a, did)]
        assert sorted(events) == [("dlr", "DELIVRD"), ("submit", "ACCEPTED")]
    assert not list((tmp_path / "journal").iterdir())  # all posted: the journal is empty


def test_receipts_recorded_in_redis_are_posted_by_another_worker_after_a_crash(
    routers, smscs, redis_server, tmp_path
):
    a, _ = routers
    proxy = SplitProxy(a.url, a.url)
    proxy.blocked.set()
    url = redis_server.url
    stream = "crash:{jobs}"
    queue = RedisStreamQueue(url, stream=stream, consumer="producer")
    jobs = jobs_for(8, prefix="rj")
    for job in jobs:
        queue.put(job)
    common = ["--redis-url", url, "--stream", stream, "--claim-idle", "1"]
    first = _spawn(
        worker_cmd(proxy.url, smscs, *common, "--consumer", "first"), tmp_path / "first.log"
    )
    port = free_port()
    second = None
    try:
        assert wait_for(lambda: sum(s.counters.receipts_acked for s in smscs.values()) == len(jobs))
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        proxy.close()
        client = redis_server.client()
        assert client.hlen("sms:{outcomes}:journal:first") == 2 * len(jobs)
        assert all(outcomes(a, did) == [] for did in proxy.decisions)
        second = _spawn(
            worker_cmd(a.url, smscs, *common, "--consumer", "second", "--metrics-port", str(port)),
            tmp_path / "second.log",
        )

        def all_posted() -> bool:
            return all(
                sorted((o["event"], o["status"]) for o in outcomes(a, did))
                == [("dlr", "DELIVRD"), ("submit", "ACCEPTED")]
                for did in proxy.decisions
            )

        assert wait_for(all_posted)
        assert wait_for(lambda: queue.pending() == 0)  # the dead one's jobs acknowledged too
        assert not client.exists("sms:{outcomes}:journal:first")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        recovered = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("sms_worker_outcomes_recovered_total")
        )
        assert recovered == 2 * len(jobs)
        assert "sms_worker_dead_letters_total 0.0" in metrics
    finally:
        if first.poll() is None:
            first.kill()
        if second is not None:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert len(proxy.decisions) == len(jobs)  # the second worker made no new decisions
    assert sum(s.counters.accepted for s in smscs.values()) == len(jobs)  # nothing sent twice

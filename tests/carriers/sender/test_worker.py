"""The sending path end to end: queue -> router over HTTP -> SMPP carriers -> receipts -> outcomes.

A real `router serve` process, simulated SMSCs speaking SMPP 3.4 on loopback, and sender workers
(in this process, or as `router worker` processes that the tests SIGKILL). Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from carriers.catalog import load_catalog
from carriers.sender.ledger import MemoryLedger, RedisLedger
from carriers.sender.queue import InProcessQueue, Job, RedisStreamQueue
from carriers.sender.worker import SenderWorker, WorkerOptions
from carriers.smpp.client import SmppCarrier
from carriers.smsc.server import ESME_RINVDSTADR, Fate, SimulatedSMSC, Submission, deliver_after
from router.contract.client import RouterClient
from router.contract.messages import RouteDecision
from tests.conftest import LiveServer, start_server

DE = "+4915123456789"  # a German mobile number (example range)
CARRIERS = tuple(load_catalog().carriers)
WAIT_S = 60.0


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def jobs_for(n: int, prefix: str = "j") -> list[Job]:
    """`n` OTP jobs to German numbers for tenant acme."""
    return [
        Job(f"{prefix}{i}", f"{DE[:-4]}{i % 10_000:04d}", f"code {i:06d}", tenant="acme")
        for i in range(n)
    ]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    """A router with no MLflow, its own data dir, in wall time."""
    srv = start_server(tmp_path / "router", "--no-mlflow", replay=False)
    yield srv
    srv.stop()


class Fleet:
    """One simulated SMSC per catalog carrier, and the workers' links to them."""

    def __init__(self, behaviours: dict[str, Callable[[Submission], Fate]], **smsc: object):
        self.smscs = {
            cid: SimulatedSMSC(cid, behaviours.get(cid, deliver_after(0.05)), **smsc).start()  # type: ignore[arg-type]
            for cid in CARRIERS
        }
        self.links: list[SmppCarrier] = []

    def connect(self, worker: SenderWorker) -> None:
        """Bind `worker` to every SMSC."""
        for cid, smsc in self.smscs.items():
            link = SmppCarrier(
                cid,
                smsc.host,
                smsc.port,
                smsc.system_id,
                "secret",
                window=16,
                max_retries=8,
                on_receipt=worker.receipt_handler(cid),
            )
            link.start()
            worker.links[cid] = link
            self.links.append(link)

    def link_args(self) -> list[str]:
        """`router worker --link` options for every SMSC."""
        out: list[str] = []
        for cid, s in self.smscs.items():
            out += ["--link", f"{cid}=smpp://{s.system_id}:secret@127.0.0.1:{s.port}"]
        return out

    def close(self) -> None:
        for link in self.links:
            link.close(timeout=5)
        for smsc in self.smscs.values():
            smsc.stop()


@pytest.fixture
def fleet_factory() -> Iterator[Callable[..., Fleet]]:
    fleets: list[Fleet] = []

    def make(behaviours: dict[str, Callable[[Submission], Fate]] | None = None, **kw: object):
        fleets.append(Fleet(behaviours or {}, **kw))
        return fleets[-1]

    yield make
    for f in fleets:
        f.close()


def run_worker(
    live: LiveServer, fleet: Fleet, jobs: list[Job], **options: object
) -> tuple[SenderWorker, dict[str, RouteDecision]]:
    """Send `jobs` through one in-process worker until every job and receipt is reported."""
    decisions: dict[str, RouteDecision] = {}
    queue = InProcessQueue()
    worker = SenderWorker(
        RouterClient(live.url),
        {},
        queue,
        ledger=MemoryLedger(),
        options=WorkerOptions(concurrency=4, **options),  # type: ignore[arg-type]
        on_decision=lambda job, d: decisions.__setitem__(d.decision_id, d),
    )
    fleet.connect(worker)
    worker.start()
    for job in jobs:
        queue.put(job)
    assert wait_for(lambda: queue.pending() == 0 and worker.idle())
    assert wait_for(lambda: worker.awaiting_receipts() == 0)
    worker.stop()
    return worker, decisions


def outcomes(live: LiveServer, decision_id: str) -> list[dict]:
    """The outcomes the router recorded for a decision."""
    r = live.client.get(f"/v1/decisions/{decision_id}")
    assert r.status_code == 200, r.text
    return r.json()["outcomes"]


def test_messages_are_routed_sent_and_their_receipts_reported(live, fleet_factory):
    fleet = fleet_factory()
    before = live.client.get("/v1/carriers", params={"country": "DE"}).json()
    worker, decisions = run_worker(live, fleet, jobs_for(40))
    assert worker.stats.submitted == 40
    assert worker.stats.receipts == 40
    assert worker.reporter.stats.rejected == 0
    assert len(decisions) == 40
    for did in decisions:
        events = {(o["event"], o["status"]) for o in outcomes(live, did)}
        assert ("submit", "ACCEPTED") in events
        assert ("dlr", "DELIVRD") in events
    accepted = sum(s.counters.accepted for s in fleet.smscs.values())
    assert accepted == 40  # nothing sent twice
    after = live.client.get("/v1/carriers", params={"country": "DE"}).json()
    assert after != before  # the router learned from the receipts


def test_a_refused_message_is_retried_on_the_next_carrier(live, fleet_factory):
    reject = lambda _s: Fate.reject(ESME_RINVDSTADR)  # noqa: E731
    fleet = fleet_factory({cid: reject for cid in CARRIERS if cid != "eurodirect"})
    worker, decisions = run_worker(live, fleet, jobs_for(30))
    delivered = [d for d in decisions.values() if d.carrier == "eurodirect"]
    assert len(delivered) == 30  # every job ended on the only carrier that takes it
    assert worker.stats.retries == len(decisions) - 30 > 0
    records = [live.client.get(f"/v1/decisions/{did}").json() for did in decisions]
    retries = [r for r in records if r["attempt"] > 1]
    assert len(retries) == worker.stats.retries
    for r in retries:
        parent = decisions[r["parent_decision_id"]]
        assert parent.carrier != "eurodirect"
        assert parent.carrier not in r["eligible"]  # excluded from the retry's choice


def test_an_undelivered_receipt_inside_the_sla_moves_the_job_on(live, fleet_factory):
    undeliv = deliver_after(0.05, "UNDELIV", "001")
    fleet = fleet_factory({cid: undeliv for cid in CARRIERS if cid != "globalprime"})
    worker, decisions = run_worker(live, fleet, jobs_for(20))
    final = [d for d in decisions.values() if d.carrier == "globalprime"]
    assert len(final) == 20
    assert worker.stats.retries == len(decisions) - 20


def test_throttled_submits_are_retried_until_accepted(live, fleet_factory):
    fleet = fleet_factory(max_tps=15)
    worker, _ = run_worker(live, fleet, jobs_for(60))
    assert worker.stats.submitted == 60
    assert sum(s.counters.throttled for s in fleet.smscs.values()) > 0


def test_an_smsc_killed_and_restarted_mid_run_loses_nothing(live, fleet_factory):
    fleet = fleet_factory({cid: deliver_after(1.5) for cid in CARRIERS})
    decisions: dict[str, RouteDecision] = {}
    queue = InProcessQueue()
    worker = SenderWorker(
        RouterClient(live.url),
        {},
        queue,
        options=WorkerOptions(concurrency=4, max_attempts=5),
        on_decision=lambda job, d: decisions.__setitem__(d.decision_id, d),
    )
    fleet.connect(worker)
    worker.start()
    jobs = jobs_for(60)
    for job in jobs[:30]:
        queue.put(job)
    assert wait_for(lambda: queue.pending() == 0 and worker.idle())
    victims = list(fleet.smscs.values())
    for smsc in victims:  # every carrier goes down with receipts still owed
        smsc.kill()
    for job in jobs[30:]:
        queue.put(job)
    time.sleep(1.0)
    for smsc in victims:
        smsc.restart()
    assert wait_for(lambda: queue.pending() == 0 and worker.idle())
    assert wait_for(lambda: worker.awaiting_receipts() == 0)
    worker.stop()
    by_job: dict[str, list[list[dict]]] = {}
    for did in decisions:
        by_job.setdefault(did, []).append(outcomes(live, did))
    delivered = sum(
        any(o["event"] == "dlr" and o["status"] == "DELIVRD" for o in outs[0])
        for outs in by_job.values()
    )
    assert delivered == 60  # every job delivered and its receipt reported, none twice
    assert sum(s.counters.accepted for s in victims) == 60


def test_a_killed_worker_process_loses_no_job_and_counts_none_twice(
    live, fleet_factory, redis_server, tmp_path
):
    # Receipts come 2 s after each submit, so the dead worker's receipts reach the new one,
    # which finds their decisions in the shared ledger.
    fleet = fleet_factory({cid: deliver_after(2.0) for cid in CARRIERS}, submit_resp_delay=0.05)
    url = redis_server.url
    stream = "test:{jobs}"
    queue = RedisStreamQueue(url, stream=stream, consumer="producer")
    jobs = jobs_for(150, prefix="k")
    for job in jobs:
        queue.put(job)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def worker_proc(name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "router.cli",
                "worker",
                "--router-url",
                live.url,
                "--redis-url",
                url,
                "--stream",
                stream,
                "--consumer",
                name,
                "--claim-idle",
                "1",
                "--concurrency",
                "4",
                *fleet.link_args(),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    ledger = RedisLedger(queue.redis)
    first = worker_proc("first")
    try:
        assert wait_for(lambda: sum(ledger.get(j.job_id) is not None for j in jobs) >= 40)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        taken = sum(ledger.get(j.job_id) is not None for j in jobs)
        assert taken < len(jobs)  # killed mid-run
        second = worker_proc("second")
        try:
            assert wait_for(lambda: queue.pending() == 0, timeout=90)
            records = {j.job_id: ledger.get(j.job_id) for j in jobs}
            assert all(r is not None for r in records.values())
            # The killed worker's submits in flight (one per sending thread at most) may have
            # reached the SMSC: they are never sent again, and their receipts have no known id.
            unconfirmed = {r.decision_id for r in records.values() if r and r.may_have_left}
            assert all(r.submitted for r in records.values() if r and not r.may_have_left)
            assert len(unconfirmed) <= 4
            assert wait_for(
                lambda: all(
                    any(o["event"] == "dlr" for o in outcomes(live, r.decision_id))
                    for r in records.values()
                    if r is not None and r.submitted
                ),
                timeout=60,
            ), [
                (r, outcomes(live, r.decision_id))
                for r in records.values()
                if r is not None
                and r.submitted
                and not any(o["event"] == "dlr" for o in outcomes(live, r.decision_id))
            ]
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0  # graceful: drained and stopped
    finally:
        if first.poll() is None:
            first.kill()
    decided = {r.decision_id for r in records.values() if r is not None}
    assert len(decided) == len(jobs)  # one decision per job, whoever sent it
    for did in decided:
        outs = outcomes(live, did)
        submits = [o for o in outs if o["event"] == "submit"]
        dlrs = [o for o in outs if o["event"] == "dlr"]
        if did in unconfirmed:
            assert [o["status"] for o in submits] == ["UNCONFIRMED"] and len(dlrs) <= 1
        else:
            assert len(submits) == 1 and len(dlrs) == 1  # never counted twice
    accepted = sum(s.counters.accepted for s in fleet.smscs.values())
    # Never sent twice: every job reached the SMSC once, but for the in-flight ones that died
    # with the worker before they left.
    assert len(jobs) - len(unconfirmed) <= accepted <= len(jobs)


def test_worker_reads_jobs_from_stdin(live, fleet_factory, tmp_path):
    fleet = fleet_factory()
    lines = "\n".join(j.to_json() for j in jobs_for(10, prefix="s")) + "\n"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "router.cli",
            "worker",
            "--router-url",
            live.url,
            "--linger",
            "5",
            "--data-dir",
            str(tmp_path / "worker"),
            *fleet.link_args(),
        ],
        input=lines.encode(),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert sum(s.counters.accepted for s in fleet.smscs.values()) == 10
    assert sum(s.counters.receipts_acked for s in fleet.smscs.values()) == 10
    assert DE[:-4] not in proc.stderr.decode() + proc.stdout.decode()  # no number in the logs


def test_bad_link_option_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "router.cli", "worker", "--link", "acme=http://x"],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "expected carrier=smpp://" in proc.stderr.decode()


def test_graceful_stop_finishes_jobs_in_hand(live, fleet_factory):
    fleet = fleet_factory(submit_resp_delay=0.2)
    queue = InProcessQueue()
    worker = SenderWorker(RouterClient(live.url), {}, queue, options=WorkerOptions(concurrency=4))
    fleet.connect(worker)
    worker.start()
    for job in jobs_for(40, prefix="g"):
        queue.put(job)
    assert wait_for(lambda: worker.stats.submitted >= 4)
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    stopper.join(timeout=60)
    assert not stopper.is_alive()
    taken = 40 - queue.pending()
    assert worker.stats.submitted + worker.stats.submit_failed == taken
    assert worker.reporter.backlog() == 0  # every submit result reached the router


class _AnswerLost(httpx.BaseTransport):
    """An HTTP transport that lets the router serve a route call, then loses its answer (a
    client timeout) for every other call, up to `losses` times."""

    def __init__(self, losses: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.losses = losses
        self.calls = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path.startswith("/v1/route"):
            self.calls += 1
            if self.losses > 0 and self.calls % 2 == 1:
                self.losses -= 1
                response.read()
                response.close()
                raise httpx.ReadTimeout("answer lost", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def test_a_route_call_retried_after_a_timeout_leaves_no_orphan_decision(live, fleet_factory):
    """The worker sends an idempotency key per job and attempt: the router's decision whose
    answer was lost is the one the retried call gets, so no decision is left without outcomes."""
    from prometheus_client.parser import text_string_to_metric_families

    def decisions_made() -> float:
        text = live.client.get("/metrics").text
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "router_decisions_total"
        )

    reject = lambda _s: Fate.reject(ESME_RINVDSTADR)  # noqa: E731
    fleet = fleet_factory({cid: reject for cid in CARRIERS if cid != "eurodirect"})
    lossy = _AnswerLost(losses=8)
    client = RouterClient(live.url)
    client.http = httpx.Client(base_url=live.url, timeout=10, transport=lossy)
    decisions: dict[str, RouteDecision] = {}
    queue = InProcessQueue()
    worker = SenderWorker(
        client,
        {},
        queue,
        options=WorkerOptions(concurrency=2, router_backoff_s=(0.01, 0.05)),
        on_decision=lambda job, d: decisions.__setitem__(d.decision_id, d),
    )
    fleet.connect(worker)
    worker.start()
    for job in jobs_for(12, prefix="lost"):
        queue.put(job)
    assert wait_for(lambda: queue.pending() == 0 and worker.idle())
    assert wait_for(lambda: worker.awaiting_receipts() == 0)
    worker.stop()
    assert lossy.losses == 0  # answers were lost, first attempts and retries alike
    assert len([d for d in decisions.values() if d.carrier == "eurodirect"]) == 12
    assert worker.stats.retries == len(decisions) - 12
    assert decisions_made() == len(decisions)  # every decision made is one the worker used
    for did in decisions:
        assert any(o["event"] == "submit" for o in outcomes(live, did))


@pytest.mark.parametrize(
    "clock",
    [
        pytest.param({"receipt_clock_offset_s": 180.0}, id="smsc-clock-3-min-fast"),
        pytest.param({"receipt_tz": timezone(timedelta(hours=3))}, id="smsc-in-utc+3-no-offset"),
    ],
)
def test_receipts_from_a_skewed_smsc_clock_all_arrive_in_time(live, fleet_factory, clock):
    """Appendix B minute dates from a clock 3 minutes fast, or in UTC+3 with no offset: every
    receipt reaches the router, each placed between its decision and now, the offset found."""
    fleet = fleet_factory(**clock)
    worker, decisions = run_worker(live, fleet, jobs_for(30, prefix=f"skew{len(clock)}"))
    assert worker.stats.receipts == 30 and worker.reporter.stats.rejected == 0
    now = datetime.now(UTC)
    flags = []
    for did, decision in decisions.items():
        (dlr,) = [o for o in outcomes(live, did) if o["event"] == "dlr"]
        at = datetime.fromisoformat(dlr["at"])
        assert decision.at <= at.timestamp() <= now.timestamp()
        assert "before_decision" not in (dlr["at_flag"] or "")
        flags.append(dlr["at_flag"] or "")
    assert sum("clock_offset" in f for f in flags) >= 25, flags
    offsets = worker.receipt_clock_offsets()
    expected = 180.0 if "receipt_clock_offset_s" in clock else 3 * 3600.0
    assert all(abs(o - expected) <= 60 for o in offsets.values()), offsets

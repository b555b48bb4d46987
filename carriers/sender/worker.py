"""The sender worker: queue -> router decision -> carrier -> outcomes, with retries in the SLA.

Each job is routed over HTTP, submitted on the chosen carrier's link, and its submit result,
receipts and (for retries) follow-up decisions reported back to the router. A job is
acknowledged on the queue only after its submit outcome reached the router, and the job ledger
lets a worker that takes over a dead worker's job skip what was already submitted.

A submit that left without an answer (the wait or the session ended first) is *unconfirmed*:
the carrier may have accepted it. It is never sent again, by this worker or one that takes the
job over, because sending twice bills and delivers twice; it is reported as UNCONFIRMED (the
router awaits its receipt like an accepted one) and counted. A late acceptance still maps its
message id, so the receipt finds the decision. At most once on the wire, never a double count.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from carriers.sender.ledger import (
    FAILED,
    SENDING,
    SUBMITTED,
    UNCONFIRMED,
    JobLedger,
    JobRecord,
    MemoryLedger,
)
from carriers.sender.queue import Delivery, Job, MessageQueue
from carriers.sender.reporter import OutcomeReporter
from carriers.smpp.client import SubmitResult
from carriers.smpp.dlr import Receipt
from carriers.smpp.encoding import parts_count
from carriers.smpp.receipt_time import ReceiptClock
from router.contract.client import RouterClient
from router.contract.errors import RoutingError
from router.contract.messages import OutcomeEvent, RouteDecision, RouteRequest

log = logging.getLogger(__name__)
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-]")
_SUBMIT_TIMES_KEPT = 500_000  # submit times of messages whose final receipt may still come


class Clock(Protocol):
    """Event time for the worker's reports: wall time in production, simulated in the demo."""

    def now(self) -> float: ...


class WallClock:
    """Wall-clock time (epoch seconds)."""

    def now(self) -> float:
        """Seconds since the epoch."""
        return time.time()


def submit_status(result: SubmitResult) -> str:
    """The submit status word the router takes: ACCEPTED, UNCONFIRMED (sent, no answer), the
    SMPP command_status name (ESME_RINVDSTADR, or its hex number), or the link's failure as a
    word (NOT_CONNECTED, WINDOW_FULL, GENERIC_NACK, …)."""
    if result.ok:
        return "ACCEPTED"
    if result.unconfirmed:
        return "UNCONFIRMED"
    error = (result.error or "ERROR").strip()
    if error.startswith("generic_nack"):
        return "GENERIC_NACK"
    return error.upper().replace(" ", "_")


class CarrierLink(Protocol):
    """A connection to one carrier (SMPP here; HTTP carriers would fit the same shape)."""

    def submit(
        self, key: str, destination: str, text: str, *, source: str | None = None
    ) -> SubmitResult: ...

    def close(self, timeout: float = 10.0) -> None: ...


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker sends: concurrency, retries and their time limit per message class."""

    concurrency: int = 8
    batch: int = 16
    sla_seconds: Mapping[str, float] = field(default_factory=lambda: {"otp": 60.0})
    default_sla_seconds: float = 300.0
    max_attempts: int = 3
    poll_s: float = 0.2
    router_backoff_s: tuple[float, float] = (0.2, 5.0)


@dataclass
class WorkerStats:
    """What the worker did (for the demo's summary and the tests)."""

    jobs: int = 0
    routed: int = 0
    submitted: int = 0
    submit_failed: int = 0
    retries: int = 0
    unroutable: int = 0
    receipts: int = 0
    unmatched_receipts: int = 0
    skipped_redelivered: int = 0
    unconfirmed: int = 0  # sent without an answer: not sent again (the carrier may have it)
    ledger_errors: int = 0  # a submit's result not written to the ledger (Redis away)
    taken_over: int = 0  # claimed by another worker while this one waited: sent by that one


@dataclass(frozen=True, slots=True)
class _Attempt:
    job: Job
    attempt: int
    exclude: tuple[str, ...]
    parent: str | None
    first_at: float

    @property
    def route_key(self) -> str:
        """The route call's idempotency key, one per job and attempt: a route call retried
        after a timeout (or by the worker that takes over the job) gets the decision the
        router already made, instead of leaving it orphaned (counted a failure)."""
        job_id = self.job.job_id
        if len(job_id) > 100 or _KEY_UNSAFE.search(job_id):  # keys take [A-Za-z0-9_.:-]
            job_id = "h." + hashlib.sha256(job_id.encode()).hexdigest()[:40]
        return f"{job_id}:{self.attempt}"


class SenderWorker:
    """Sends jobs from a queue through the router's decisions and the carriers' links."""

    def __init__(
        self,
        router: RouterClient,
        links: Mapping[str, CarrierLink],
        jobs: MessageQueue,
        *,
        ledger: JobLedger | None = None,
        clock: Clock | None = None,
        options: WorkerOptions | None = None,
        on_decision: Callable[[Job, RouteDecision], None] | None = None,
        reporter: OutcomeReporter | None = None,
    ) -> None:
        self.router = router
        self.links = dict(links)
        self.jobs = jobs
        self.ledger = ledger or MemoryLedger()
        self.clock = clock or WallClock()
        self.options = options or WorkerOptions()
        self.on_decision = on_decision
        # The outcome journal and dead letters are the reporter's (in memory unless given one).
        self.reporter = reporter or OutcomeReporter(router)
        self.stats = WorkerStats()
        self._retries: queue.Queue[_Attempt] = queue.Queue()
        self._pending: dict[str, _Attempt] = {}
        self._submitted_at: OrderedDict[str, float] = OrderedDict()  # for receipt times
        self._receipt_clocks: dict[str, ReceiptClock] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._busy = 0
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the reporter and the sending threads."""
        self.reporter.start()
        for i in range(self.options.concurrency):
            th = threading.Thread(target=self._loop, name=f"sender-{i}", daemon=True)
            th.start()
            self._threads.append(th)

    def idle(self) -> bool:
        """No job in hand, no retry waiting, nothing left to report."""
        with self._lock:
            busy = self._busy
        return busy == 0 and self._retries.empty() and self.reporter.backlog() == 0

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful: stop taking jobs, finish those in hand and their retries, report all."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        for th in self._threads:
            th.join(timeout=max(0.1, deadline - time.monotonic()))
        self.reporter.stop(timeout=max(0.1, deadline - time.monotonic()))

    # ---- sending ---------------------------------------------------------------------------

    def _loop(self) -> None:
        last_prune = time.monotonic()
        while True:
            if time.monotonic() - last_prune > 1.0:
                self.prune()
                last_prune = time.monotonic()
            try:
                retry = self._retries.get_nowait()
            except queue.Empty:
                retry = None
            if retry is not None:
                self._run(lambda r=retry: self._send(r))
                continue
            if self._stop.is_set():
                return
            try:
                deliveries = self.jobs.get(self.options.batch, self.options.poll_s)
            except Exception as exc:  # the queue (Redis) is away: wait, never lose the thread
                log.warning("job queue unreachable (%s); retrying", type(exc).__name__)
                self._stop.wait(self.options.router_backoff_s[0] * 5)
                continue
            if deliveries:
                self._run(lambda ds=deliveries: self._take(ds), deliveries)

    def _run(self, work: Callable[[], None], deliveries: Sequence[Delivery] = ()) -> None:
        with self._lock:
            self._busy += 1
        try:
            work()
        except Exception as exc:  # one bad job must not kill the worker; it stays unacknowledged
            log.warning("sending a job failed (%s); its jobs go back to the queue", exc)
            for d in deliveries:  # taken again after claim-idle (an ack already made stands)
                with contextlib.suppress(Exception):
                    self.jobs.release(d)
        finally:
            with self._lock:
                self._busy -= 1

    def _take(self, deliveries: list[Delivery]) -> None:
        """Route the new jobs of a batch in one request, then submit each in turn."""
        fresh: list[tuple[_Attempt, Delivery]] = []
        for d in deliveries:
            job = d.job
            self._count("jobs")
            record = self.ledger.get(job.job_id)
            ack = self._acker(d)
            if record is not None and (record.submitted or record.may_have_left):
                # Sent (or perhaps sent) by a worker that died before acknowledging: its submit
                # outcome may not have reached the router, so report it again (a repeat changes
                # nothing there); a submit that may have left is never sent a second time.
                self._count("skipped_redelivered")
                status = "ACCEPTED" if record.submitted else "UNCONFIRMED"
                event = OutcomeEvent(record.decision_id, "submit", status, at=self.clock.now())
                self.reporter.report([event], ack)
                continue
            first_at = job.at if job.at is not None else self.clock.now()
            attempt = _Attempt(job, 1, (), None, first_at)
            if record is not None:  # its last submit failed: the next attempt, elsewhere
                attempt = _Attempt(
                    job, record.attempt + 1, (record.carrier,), record.decision_id, first_at
                )
            fresh.append((attempt, d))
        decisions = self._route_many([a for a, _ in fresh])
        for (a, d), decision in zip(fresh, decisions, strict=True):
            if decision is None:
                self.jobs.ack(d)
                continue
            self._decided(a, decision)
            self._submit(a, decision.decision_id, decision.carrier, self._acker(d))

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _acker(self, delivery: Delivery) -> Callable[[], None]:
        return lambda: self.jobs.ack(delivery)

    def _send(self, a: _Attempt) -> None:
        """A retry: route it on its own, then submit."""
        decision = self._route(a)
        if decision is not None:
            self._decided(a, decision)
            self._submit(a, decision.decision_id, decision.carrier, None)

    def _decided(self, a: _Attempt, decision: RouteDecision) -> None:
        if self.on_decision is not None:
            self.on_decision(a.job, decision)

    def _submit(
        self, a: _Attempt, decision_id: str, carrier: str, done: Callable[[], None] | None
    ) -> None:
        """Submit on the decision's carrier, report the result; retry a failure in the SLA."""
        job = a.job
        link = self.links.get(carrier)
        with self._lock:  # a receipt may beat submit_sm_resp: the earliest it can be is now
            self._pending[decision_id] = a
            self._submitted_at[decision_id] = self.clock.now()
            while len(self._submitted_at) > _SUBMIT_TIMES_KEPT:
                self._submitted_at.popitem(last=False)
        if link is None:
            result = SubmitResult(False, (), -1, "NO_LINK", False, parts_count(job.text))
        elif not self.ledger.begin(job.job_id, JobRecord(decision_id, carrier, a.attempt, SENDING)):
            # Another worker claimed this job while this one waited (on the router, say) and
            # sends it: it reports and acknowledges it, this one lets go.
            self._count("taken_over")
            with self._lock:
                self._pending.pop(decision_id, None)
                self._submitted_at.pop(decision_id, None)
            return
        else:
            # Recorded before the submit leaves: a worker that takes this job over after a crash
            # must not send it again (a redelivery before this line routes it again, and the
            # route call's idempotency key gives back this same decision).
            result = link.submit(decision_id, job.to, job.text, source=job.source)
        now = self.clock.now()
        event = OutcomeEvent(
            decision_id,
            "submit",
            status=submit_status(result),
            error_code=None if result.ok else str(result.command_status),
            at=now,
        )
        if result.ok:
            self._count("submitted")
            message_id = result.message_ids[0] if result.message_ids else None
            self._record(
                job.job_id, JobRecord(decision_id, carrier, a.attempt, SUBMITTED), message_id
            )
        elif result.unconfirmed:  # awaits its receipt (a late answer maps its id), no retry
            self._count("unconfirmed")
            self._record(job.job_id, JobRecord(decision_id, carrier, a.attempt, UNCONFIRMED))
        else:
            self._count("submit_failed")
            if link is not None:
                self._record(job.job_id, JobRecord(decision_id, carrier, a.attempt, FAILED))
            with self._lock:
                self._pending.pop(decision_id, None)
                self._submitted_at.pop(decision_id, None)
        self.reporter.report([event], done)
        if not result.ok and not result.unconfirmed:
            self._maybe_retry(a, decision_id, carrier, now)

    def _record(self, job_id: str, record: JobRecord, message_id: str | None = None) -> None:
        """Write a submit's result to the ledger (and its first part's message id). After the
        submit this must not stop the report: if the ledger (Redis) is away, the record stays
        SENDING, which a redelivery reads as unconfirmed, never as a reason to send again."""
        try:
            self.ledger.put(job_id, record)
            if message_id:  # receipts are reported for the first part
                self.ledger.map_message(record.carrier, message_id, record.decision_id)
        except Exception as exc:
            self._count("ledger_errors")
            log.warning("job ledger unreachable after a submit (%s)", type(exc).__name__)

    def _request(self, a: _Attempt) -> RouteRequest:
        job = a.job
        return RouteRequest(
            to=job.to,
            message_class=job.message_class,
            tenant=job.tenant,
            sender_type=job.sender_type,
            segments=parts_count(job.text),
            mccmnc=job.mccmnc,
            exclude=a.exclude,
            attempt=a.attempt,
            parent_decision_id=a.parent,
            at=self.clock.now(),
            idempotency_key=a.route_key,
        )

    def _route_many(self, attempts: list[_Attempt]) -> list[RouteDecision | None]:
        """Decisions for first attempts, in one request (None: not routable, logged)."""
        if not attempts:
            return []
        delay = self.options.router_backoff_s[0]
        while True:
            try:
                # built anew on each try: a request's `at` must be near the router's clock
                answers = self.router.route_batch([self._request(a) for a in attempts])
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                log.warning("router unreachable (%s); retrying", type(exc).__name__)
                time.sleep(delay)
                delay = min(self.options.router_backoff_s[1], delay * 2)
                continue
            out: list[RouteDecision | None] = []
            for answer in answers:
                if isinstance(answer, RoutingError):
                    self._count("unroutable")
                    log.warning("job not routable: %s", answer)
                    out.append(None)
                else:
                    self._count("routed")
                    out.append(answer)
            return out

    def _route(self, a: _Attempt) -> RouteDecision | None:
        delay = self.options.router_backoff_s[0]
        while True:
            try:
                # built anew on each try: a request's `at` must be near the router's clock
                decision = self.router.route(self._request(a))
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                if self._stop.is_set() and a.attempt > 1:
                    return None
                log.warning("router unreachable (%s); retrying", type(exc).__name__)
                time.sleep(delay)
                delay = min(self.options.router_backoff_s[1], delay * 2)
                continue
            except RoutingError as exc:
                self._count("unroutable")
                log.warning("job not routable: %s", exc)
                return None
            self._count("routed")
            return decision

    def _maybe_retry(self, a: _Attempt, decision_id: str, carrier: str, now: float) -> None:
        sla = self.options.sla_seconds.get(a.job.message_class, self.options.default_sla_seconds)
        if a.attempt >= self.options.max_attempts or now - a.first_at >= sla:
            return
        self._count("retries")
        self._retries.put(
            _Attempt(a.job, a.attempt + 1, (*a.exclude, carrier), decision_id, a.first_at)
        )

    # ---- receipts --------------------------------------------------------------------------

    def receipt_handler(self, carrier: str) -> Callable[[str, Receipt], None]:
        """The `on_receipt` callback for `carrier`'s link."""
        return lambda key, receipt: self.on_receipt(carrier, key, receipt)

    def late_accept_handler(self, carrier: str) -> Callable[[str, str], None]:
        """The link's `on_late_accept`: share the message id of an unconfirmed submit, so a
        receipt read by another worker's bind finds its decision too."""
        return lambda decision_id, message_id: self.ledger.map_message(
            carrier, message_id, decision_id
        )

    def receipt_resolver(self, carrier: str) -> Callable[[Receipt], str | None]:
        """The link's `resolve_unmatched`: the decision of a message another worker sent."""
        return lambda receipt: self.ledger.decision_for(carrier, receipt.message_id)

    def on_receipt(self, carrier: str, decision_id: str | None, receipt: Receipt) -> None:
        """Report a receipt; a final failure inside the SLA sends the job on the next carrier.

        `decision_id` is None when the link could not match the receipt (the message was
        submitted by another worker): then the shared ledger is asked.
        """
        if decision_id is None:
            decision_id = self.ledger.decision_for(carrier, receipt.message_id)
            if decision_id is None:
                self._count("unmatched_receipts")
                return
        self._count("receipts")
        now = self.clock.now()
        with self._lock:
            submitted = self._submitted_at.get(decision_id)
            if receipt.final:
                self._submitted_at.pop(decision_id, None)
            clock = self._receipt_clocks.setdefault(carrier, ReceiptClock())
            placed = clock.place(receipt, now, submitted)
        coarse = placed.coarse
        self.reporter.report(
            [
                OutcomeEvent(
                    decision_id,
                    "dlr",
                    status=receipt.status,
                    error_code=receipt.error_code,
                    at=placed.at,
                    at_earliest=placed.earliest if coarse else None,
                    at_latest=placed.latest if coarse else None,
                    source_at=placed.stated if placed.stated != placed.at else None,
                    at_flag=placed.flag,
                )
            ]
        )
        if not receipt.final:
            return
        with self._lock:
            a = self._pending.pop(decision_id, None)
        if a is not None and receipt.status != "DELIVRD":
            self._maybe_retry(a, decision_id, carrier, now)

    def receipt_clock_offsets(self) -> dict[str, float]:
        """Each carrier's estimated receipt clock offset in seconds (0: its clock is right)."""
        with self._lock:
            return {carrier: c.offset_s for carrier, c in self._receipt_clocks.items()}

    def awaiting_receipts(self) -> int:
        """Sent messages whose final receipt is still wanted (inside their SLA)."""
        with self._lock:
            return len(self._pending)

    def prune(self) -> None:
        """Forget pending attempts whose SLA has passed (no retry can help them any more)."""
        now = self.clock.now()
        with self._lock:
            for decision_id, a in list(self._pending.items()):
                sla = self.options.sla_seconds.get(
                    a.job.message_class, self.options.default_sla_seconds
                )
                if now - a.first_at >= sla:
                    del self._pending[decision_id]

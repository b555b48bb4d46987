"""Prometheus metrics of one sender worker (`router worker --metrics-port`).

The counters are read from the worker's and its reporter's stats at each scrape:
`sms_worker_<stat>_total` for every `WorkerStats` field (jobs, submitted, receipts, …),
`sms_worker_outcomes_reported_total`, `sms_worker_outcome_duplicates_total`,
`sms_worker_outcomes_refused_total`, `sms_worker_dead_letters_total`,
`sms_worker_outcomes_recovered_total` (taken over from a dead worker's journal),
`sms_worker_router_retries_total`, and the gauges `sms_worker_outcome_backlog` and
`sms_worker_awaiting_receipts`. No label carries a phone number.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from carriers.sender.worker import SenderWorker

_REPORTER = {
    "reported": ("outcomes_reported", "Outcome events the router recorded"),
    "duplicates": ("outcome_duplicates", "Outcome events the router answered as repeats"),
    "rejected": ("outcomes_refused", "Outcome events the router refused (4xx)"),
    "dead_letters": ("dead_letters", "Refused outcome events kept as dead letters"),
    "recovered": ("outcomes_recovered", "Outcome events taken over from a dead worker"),
    "http_retries": ("router_retries", "Outcome posts retried (router unreachable or busy)"),
}


class WorkerCollector:
    """Reads a `SenderWorker`'s counters at scrape time."""

    def __init__(self, worker: SenderWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        """The worker's metrics now."""
        stats = self.worker.stats
        for f in fields(stats):
            value = getattr(stats, f.name)
            if isinstance(value, int | float):
                yield _counter(f"sms_worker_{f.name}", f"Sender worker: {f.name}", value)
        rstats = self.worker.reporter.stats
        for f in fields(rstats):
            name, doc = _REPORTER.get(f.name, (f"reporter_{f.name}", f"Reporter: {f.name}"))
            yield _counter(f"sms_worker_{name}", doc, getattr(rstats, f.name))
        yield GaugeMetricFamily(
            "sms_worker_outcome_backlog",
            "Outcome events recorded in the journal and not yet answered by the router",
            value=self.worker.reporter.backlog(),
        )
        yield GaugeMetricFamily(
            "sms_worker_awaiting_receipts",
            "Sent messages whose final receipt is still wanted",
            value=self.worker.awaiting_receipts(),
        )


def _counter(name: str, doc: str, value: Any) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def worker_registry(worker: SenderWorker) -> CollectorRegistry:
    """A registry holding the worker's metrics."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))  # type: ignore[arg-type]
    return registry


def serve_metrics(worker: SenderWorker, port: int, addr: str = "0.0.0.0") -> int:
    """Serve `/metrics` on `port` (0: any free one) in a daemon thread; the port used."""
    server, _thread = start_http_server(port, addr=addr, registry=worker_registry(worker))
    return int(server.server_port)

"""Prometheus metrics of one engine (own registry, so several engines can live in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class EngineMetrics:
    """Counters and gauges for operators; labels never carry a phone number."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "router_decisions_total", "Routing decisions", ["carrier", "country"], registry=r
        )
        self.no_eligible = Counter(
            "router_no_eligible_total", "Messages with no eligible carrier", ["country"], registry=r
        )
        self.rejected = Counter(
            "router_rejected_requests_total", "Requests rejected as invalid", ["code"], registry=r
        )
        self.outcomes = Counter(
            "router_outcomes_total", "Outcome events recorded", ["event", "status"], registry=r
        )
        self.duplicates = Counter(
            "router_outcome_duplicates_total", "Outcome events ignored as repeats", registry=r
        )
        self.outcomes_refused = Counter(
            "router_outcomes_refused_total",
            "Outcome requests refused (4xx, nothing applied; senders keep them as dead letters)",
            ["code"],
            registry=r,
        )
        self.time_adjusted = Counter(
            "router_outcome_time_adjusted_total",
            "Outcome events recorded with their time adjusted (by the sender or here), by flag",
            ["flag"],
            registry=r,
        )
        self.learned = Counter(
            "router_learner_updates_total",
            "Final answers given to the learner",
            ["carrier", "result"],
            registry=r,
        )
        self.alarms = Counter(
            "router_change_alarms_total",
            "Change-detector alarms (route history forgotten)",
            ["carrier", "country"],
            registry=r,
        )
        self.spend = Counter(
            "router_spend_total", "Cost of messages", ["carrier", "currency"], registry=r
        )
        self.pending = Gauge(
            "router_pending_decisions", "Decisions awaiting their outcome", registry=r
        )
        self.paused = Gauge(
            "router_carrier_paused", "1 if the carrier is paused", ["carrier"], registry=r
        )
        self.success = Gauge(
            "router_carrier_success_estimate",
            "Posterior mean of success within SLA, per carrier",
            ["carrier"],
            registry=r,
        )
        self.latency = Histogram(
            "router_decision_seconds",
            "Time to make one decision",
            buckets=(5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2),
            registry=r,
        )

        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """A labelled child, cached (prometheus-client's `labels()` costs microseconds)."""
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

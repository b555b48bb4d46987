"""The routing engine: one decision per message, outcomes in event time, every choice logged.

It composes features (destination), eligibility, the policy (π, draw, fallbacks), the learned
carrier model, decisions in flight with their timers, the decision log and metrics. It does no
HTTP; `router.http.api` serves it and the simulator drives it directly.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import phonenumbers

from bandit.model import CarrierModel, Observation, RouteKey
from bandit.policies import Arm, DecisionContext, Policy, draw, fallback_order, make_policy
from bandit.prices import PriceModel
from bandit.reward import MessageClass
from carriers.catalog import Catalog, Tenant
from features import (
    DestinationParser,
    InvalidNumber,
    UnknownMccMnc,
    from_epoch,
    local_hour_weekday,
    msisdn_hmac,
    to_epoch,
)
from router.contract.errors import (
    Forbidden,
    InvalidRequest,
    NoEligibleCarrier,
    RoutingError,
    UnknownCarrier,
    UnknownDecision,
)
from router.contract.messages import (
    DLR_STATUSES,
    EVENTS,
    FINAL_DLR,
    INTERMEDIATE_DLR,
    SENDER_TYPES,
    SUBMIT_FAILURE_WORDS,
    SUBMIT_OK,
    TIME_FLAGS,
    OutcomeEvent,
    RouteDecision,
    RouteRequest,
    check_key,
    submit_accepted,
)
from router.core.config import EngineConfig
from router.core.eligibility import Eligibility
from router.core.idempotency import (
    Claim,
    IdempotencyKeys,
    normalized_number,
    request_digest,
    stored_key,
)
from router.core.inflight import (
    DEADLINE,
    STALE,
    TIMEOUT,
    TRUTH,
    InFlight,
    RecentDecisions,
    Timers,
)
from router.core.metrics import EngineMetrics

PHONE_REGIONS = frozenset(phonenumbers.SUPPORTED_REGIONS)
EARLIEST_EVENT = 946_684_800.0  # 2000-01-01T00:00Z: anything earlier is a client bug


def _seconds(value: float) -> str:
    """A duration for an error message, digits grouped ("1,209,600 s"), so that redaction,
    which hides runs of 7+ digits that could be phone numbers, leaves the figure readable."""
    return f"{value:,.0f} s"


CheckedOutcome = tuple[InFlight, "OutcomeEvent", float]  # the decision, the event, its event time


@dataclass(slots=True)
class ServingStats:
    """Running totals for the serving run's periodic MLflow metrics."""

    decisions: int = 0
    learned: int = 0
    learned_success: int = 0
    delivered: int = 0
    spend: float = 0.0
    no_eligible: int = 0
    alarms: int = 0

    def metrics(self) -> dict[str, float]:
        """Metrics derived from the totals."""
        return {
            "decisions": self.decisions,
            "success_within_sla_rate": self.learned_success / self.learned if self.learned else 0,
            "delivered": self.delivered,
            "dlr_delivery_rate": self.delivered / self.decisions if self.decisions else 0.0,
            "spend": self.spend,
            "cost_per_delivered": self.spend / self.delivered if self.delivered else 0.0,
            "no_eligible": self.no_eligible,
            "change_alarms": self.alarms,
        }


@dataclass
class EngineOptions:
    """Runtime options that are not learning configuration."""

    hmac_key: bytes = b"change-me"
    # a route's `at` within this of the wall clock, either side (the name is historical); None:
    # any time (--replay). Outcomes' times are clamped to wall + this, never refused.
    max_future_skew_seconds: float | None = 300.0
    max_past_outcome_skew_seconds: float = 1.0
    recent_capacity: int = 200_000
    currency: str | None = None
    wall_clock: Callable[[], float] = time.time
    replica: str = ""  # this replica's name when replicas share state ("" when embedded)
    id_seed: int | None = None  # seed of decision ids (default: the policy seed)
    idempotency_capacity: int = 100_000  # route idempotency keys held locally


class RoutingEngine:
    """Routes messages and learns from their outcomes; thread-safe behind one lock."""

    def __init__(
        self,
        catalog: Catalog,
        config: EngineConfig,
        options: EngineOptions | None = None,
        metrics: EngineMetrics | None = None,
        log_decision: Callable[[dict[str, Any]], None] | None = None,
        log_outcome: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.catalog = catalog
        self.config = config
        self.options = options or EngineOptions()
        self.metrics = metrics or EngineMetrics()
        self.model = CarrierModel(config.model)
        self.prices = PriceModel(half_life_seconds=config.model.half_life_seconds)
        self.policy: Policy = make_policy(
            config.policy, self.model, seed=config.seed, **dict(config.params)
        )
        self.parser = DestinationParser(catalog.directory)
        self.eligibility = Eligibility(catalog)
        self.inflight: dict[str, InFlight] = {}
        self.recent = RecentDecisions(self.options.recent_capacity)
        self.timers = Timers()
        self.clock = 0.0
        self.stats = ServingStats()
        self._log_decision = log_decision
        self._log_outcome_row = log_outcome
        self._ids = random.Random(
            config.seed if self.options.id_seed is None else self.options.id_seed
        )
        self._lock = threading.RLock()
        self._currency = self.options.currency or catalog.currency
        self.metrics.pending.set_function(lambda: len(self.inflight))
        self.idempotency = IdempotencyKeys(self.options.idempotency_capacity, self.metrics.registry)

    # ---- identity --------------------------------------------------------------------------

    @property
    def policy_label(self) -> str:
        """`name@version` of the serving policy."""
        return f"{self.policy.name}@{self.policy.version}"

    def message_class(self, name: str) -> MessageClass:
        """A configured message class, or an error naming the known ones."""
        mc = self.config.message_classes.get(name)
        if mc is None:
            known = ", ".join(sorted(self.config.message_classes))
            raise InvalidRequest(
                f"unknown message class {name!r}; known: {known}", field="message_class"
            )
        return mc

    # ---- time ------------------------------------------------------------------------------

    def _event_time(self, at: float | None, field_name: str = "at") -> float:
        wall = self.options.wall_clock()
        if at is None:
            return wall
        if not at >= EARLIEST_EVENT:
            raise InvalidRequest(
                "timestamp is before 2000-01-01; event times must be real", field=field_name
            )
        skew = self.options.max_future_skew_seconds
        if skew is not None and abs(at - wall) > skew:
            # Symmetric around the router's clock (issue 13.7): a request's event time is "now"
            # give or take clock skew; older or later times are replays (router serve --replay).
            side = "future" if at > wall else "past"
            raise InvalidRequest(
                f"timestamp is {_seconds(abs(at - wall))} in the {side}; at most "
                f"{_seconds(skew)} of clock skew either side of the router's clock is accepted "
                "(replays of older traffic: router serve --replay)",
                field=field_name,
                details={"offset_seconds": round(at - wall, 3), "max_skew_seconds": skew},
            )
        return at

    def advance(self, now: float) -> None:
        """Move event time forward to `now`, firing every timer that falls due."""
        with self._lock:
            if now > self.clock:
                self.clock = now
            while (item := self.timers.pop_due(self.clock)) is not None:
                due, kind, did = item
                flight = self.inflight.get(did)
                if flight is not None:
                    self._fire(kind, flight, due)
                elif kind == DEADLINE and (closed := self.recent.get(did)) is not None:
                    self._check_change(closed, due)  # closed early by its receipt

    # ---- routing ---------------------------------------------------------------------------

    def route(self, req: RouteRequest) -> RouteDecision:
        """Choose a carrier for one message, log the decision and start waiting for its outcome.

        With an idempotency key that is still live for the tenant, the decision answered under
        it is returned again: nothing is logged, tracked, consumed or counted as a decision; the
        key with a different request is an `IdempotencyConflict`."""
        with self._lock:
            t0 = time.perf_counter()
            try:
                if req.idempotency_key is None:
                    decision = self._route(req)
                else:
                    claim = self._claim(req)
                    known = self.idempotency.get(claim, self.clock)
                    if known is not None:
                        return known
                    decision = self._route(req)
                    self.idempotency.put(claim, decision)
            except RoutingError as exc:
                self.metrics.rejected.labels(exc.code).inc()
                raise
            self.metrics.latency.observe(time.perf_counter() - t0)
            return decision

    def idempotency_lookup(self, req: RouteRequest) -> tuple[Claim, RouteDecision | None]:
        """A keyed request checked (key, time, tenant, class) and its key's decision held here,
        if any (replicas look in Redis when this has none); errors are counted as rejected."""
        with self._lock:
            try:
                claim = self._claim(req)
                return claim, self.idempotency.get(claim, self.clock)
            except RoutingError as exc:
                self.metrics.rejected.labels(exc.code).inc()
                raise

    def remember_idempotent(self, claim: Claim, decision: RouteDecision) -> None:
        """Hold a decision another replica answered under this key (a replay here: it is not
        counted as a decision)."""
        with self._lock:
            self.idempotency.requests.labels("replayed").inc()
            self.idempotency.put(claim, decision, new=False)

    def _claim(self, req: RouteRequest) -> Claim:
        """What identifies a keyed request: tenant, key, a digest of the request (the number
        only as its keyed HMAC; not `at`: a retried call comes later) and the key's lifetime
        (the class's DLR timeout, event time)."""
        key = stored_key(check_key(req.idempotency_key), self.options.hmac_key)
        now = self._event_time(req.at)
        tenant = self._tenant(req.tenant)
        mc = self.message_class(req.message_class)
        digest = request_digest(
            (
                tenant.id,
                mc.name,
                req.sender_type,
                req.segments,
                req.mccmnc,
                tuple(sorted(set(req.exclude))),
                req.attempt,
                req.parent_decision_id,
                msisdn_hmac(normalized_number(req.to), self.options.hmac_key),
            )
        )
        return Claim(tenant.id, key, digest, now, mc.dlr_timeout_seconds)

    def route_batch(self, reqs: Sequence[RouteRequest]) -> list[RouteDecision | RoutingError]:
        """Route many messages; each answer is a decision or the error for that message."""
        out: list[RouteDecision | RoutingError] = []
        with self._lock:
            for req in reqs:
                try:
                    out.append(self.route(req))
                except RoutingError as exc:
                    out.append(exc)
        return out

    def _tenant(self, tenant_id: str | None) -> Tenant:
        tenant = self.catalog.tenant(tenant_id)
        if tenant is None:
            raise InvalidRequest(f"unknown tenant {tenant_id or 'default'!r}", field="tenant")
        return tenant

    def _route(self, req: RouteRequest) -> RouteDecision:
        now = self._event_time(req.at)
        mc = self.message_class(req.message_class)
        tenant = self._tenant(req.tenant)
        if req.sender_type not in SENDER_TYPES:
            raise InvalidRequest(
                f"sender_type must be one of {', '.join(SENDER_TYPES)}", field="sender_type"
            )
        if not 1 <= req.segments <= 255:
            raise InvalidRequest("segments must be between 1 and 255", field="segments")
        if not 1 <= req.attempt <= 20:
            raise InvalidRequest("attempt must be between 1 and 20", field="attempt")
        unknown = [c for c in req.exclude if c not in self.catalog.carriers]
        if unknown:
            raise InvalidRequest(
                f"unknown carrier(s) in exclude: {', '.join(unknown)}", field="exclude"
            )
        if (
            req.parent_decision_id is not None
            and self._find(req.parent_decision_id, req.tenant and tenant.id) is None
        ):
            raise UnknownDecision(
                f"parent decision {req.parent_decision_id!r} is not known",
                field="parent_decision_id",
            )
        try:
            dest = self.parser.parse(req.to, req.mccmnc)
        except InvalidNumber as exc:
            raise InvalidRequest(str(exc), field="to") from None
        except UnknownMccMnc as exc:
            raise InvalidRequest(str(exc), field="mccmnc") from None
        if not dest.is_mobile:
            raise InvalidRequest("number is not a mobile number", field="to")
        if not tenant.may_send_to(dest.country):
            raise Forbidden(f"tenant {tenant.id} may not send to {dest.country}", field="tenant")

        carriers, why = self.eligibility.eligible(
            tenant, dest.country, dest.operator, req.sender_type, req.segments, now, req.exclude
        )
        if not carriers:
            self.metrics.no_eligible.labels(dest.country).inc()
            self.stats.no_eligible += 1
            raise NoEligibleCarrier(
                f"no eligible carrier for {dest.country}/{dest.operator}: "
                + "; ".join(f"{c}: {r}" for c, r in why.items()),
                details={"country": dest.country, "operator": dest.operator, "reasons": why},
            )
        self.advance(now)  # only now: a rejected request must not move event time
        hour, weekday = local_hour_weekday(now, dest.timezone)
        key = RouteKey(dest.country, dest.operator, self.model.band_of(hour))
        arms = [
            Arm(
                c.id,
                self.prices.price(
                    c.id,
                    dest.country,
                    dest.operator,
                    c.coverage[dest.country].price_for(dest.operator),
                    now,
                ),
                c.bills_on_delivery,
                c.priority,
            )
            for c in carriers
        ]
        ctx = DecisionContext(key, mc, req.segments, now, req.attempt)
        dist = self.policy.distribution(ctx, arms)
        idx = draw(dist, self.policy.rng)
        arm = arms[idx]
        self.eligibility.consume(carriers[idx], req.segments, now)

        decision_id = uuid.UUID(int=self._ids.getrandbits(128), version=4).hex
        fallbacks = [arms[i].carrier for i in fallback_order(dist, idx)]
        propensity = dist.probability_list[idx]
        context = {
            "country": dest.country,
            "operator": dest.operator,
            "local_hour": hour,
            "weekday": weekday,
            "mccmnc": dest.mccmnc,
        }
        record = {
            "decision_id": decision_id,
            "at": from_epoch(now),
            "tenant": tenant.id,
            "message_class": mc.name,
            "country": dest.country,
            "operator": dest.operator,
            "mccmnc": dest.mccmnc,
            "local_hour": hour,
            "weekday": weekday,
            "segments": req.segments,
            "sender_type": req.sender_type,
            "attempt": req.attempt,
            "parent_decision_id": req.parent_decision_id,
            "eligible": [a.carrier for a in arms],
            "probabilities": dist.probability_list,
            "scores": dist.score_list,
            "carrier": arm.carrier,
            "propensity": propensity,
            "fallbacks": fallbacks,
            "policy": self.policy.name,
            "policy_version": self.policy.version,
            "price": arm.unit_price * req.segments,
            "msisdn_hmac": msisdn_hmac(dest.e164, self.options.hmac_key),
        }
        flight = InFlight(
            decision_id,
            now,
            arm.carrier,
            tenant.id,
            mc.name,
            key,
            req.segments,
            arm.unit_price,
            arm.billing_on_delivery,
            tenant.reports_conversions,
            record,
            origin=self.options.replica,
        )
        self._track(flight, mc)
        if self._log_decision is not None:
            self._log_decision(record)
        self.metrics.child(self.metrics.decisions, arm.carrier, dest.country).inc()
        self.stats.decisions += 1
        return RouteDecision(
            decision_id, arm.carrier, fallbacks, propensity, self.policy_label, context, now
        )

    def _track(self, flight: InFlight, mc: MessageClass) -> None:
        self.inflight[flight.decision_id] = flight
        t = flight.at
        self.timers.push(
            t + mc.sla_seconds * self.config.pending_stale_fraction, STALE, flight.decision_id
        )
        self.timers.push(t + mc.learner_deadline_seconds, DEADLINE, flight.decision_id)

    def _track_truth(self, flight: InFlight, mc: MessageClass) -> None:
        """For tenants that report conversions, learn whether a delivered code arrived at one
        time for every message, converted or not: the learner's deadline span after the
        receipt (the user's time to type it), within the conversion window. Learning
        conversions as they come and misses only later would overrate a carrier whose traffic
        grows, and counting from the decision, a slow one."""
        if not flight.conversion_tenant or flight.truth_done or flight.delivered_at is None:
            return
        close = flight.at + mc.conversion_window_seconds
        due = min(flight.delivered_at + mc.learner_deadline_seconds, close)
        if due <= self.clock:
            self._truth(flight, flight.converted, self.clock)
        else:
            self.timers.push(due, TRUTH, flight.decision_id)

    def _track_late(self, flight: InFlight, mc: MessageClass) -> None:
        """Timers only a decision still open at its deadline needs (most close before)."""
        if flight.conversion_tenant:
            self.timers.push(flight.at + mc.conversion_window_seconds, TRUTH, flight.decision_id)
        self.timers.push(flight.at + mc.dlr_timeout_seconds, TIMEOUT, flight.decision_id)

    # ---- outcomes --------------------------------------------------------------------------

    def _find(self, decision_id: str, tenant: str | None = None) -> InFlight | None:
        """The decision, open or recently closed; with `tenant`, only if it is that tenant's
        (another tenant's decision is reported unknown, so ids cannot be probed)."""
        flight = self.inflight.get(decision_id) or self.recent.get(decision_id)
        if flight is not None and tenant is not None and flight.tenant != tenant:
            return None
        return flight

    def record_outcomes(
        self, events: Iterable[OutcomeEvent], tenant: str | None = None
    ) -> list[str]:
        """Apply outcome events atomically: all are checked first, then each is applied.
        With `tenant`, every event must be for one of that tenant's decisions.

        Returns, per event, "recorded", "duplicate" (a repeat that changed nothing) or "late"
        (recorded for finance and receipt statistics, too late for the learner).
        """
        with self._lock:
            return self.apply_outcomes(self.check_outcomes(events, tenant))

    def check_outcomes(
        self, events: Iterable[OutcomeEvent], tenant: str | None = None
    ) -> list[CheckedOutcome]:
        """Validate outcome events (as `record_outcomes` does) without applying them."""
        events = list(events)
        with self._lock:
            return [
                self._check_outcome(i, ev, len(events) > 1, tenant) for i, ev in enumerate(events)
            ]

    def is_repeat(self, checked: CheckedOutcome) -> bool:
        """Whether a checked event repeats one this engine has already applied."""
        flight, ev, _ = checked
        with self._lock:
            return outcome_signature(ev.event, ev.status) in flight.seen

    def apply_outcomes(self, checked: Sequence[CheckedOutcome], persist: bool = True) -> list[str]:
        """Apply checked events; `persist=False` learns without logging rows or counting them
        (another replica accepted them and logged them)."""
        with self._lock:
            return [self._apply(flight, ev, at, persist) for flight, ev, at in checked]

    def adopt_decision(self, record: Mapping[str, Any]) -> bool:
        """Track a decision another replica made (its decision-log row) so that its outcomes
        and timers reach this engine's learner; False when it is already known."""
        with self._lock:
            if self._find(record["decision_id"]) is not None:
                return False
            at = record["at"]
            rec = {**record, "at": datetime.fromisoformat(at) if isinstance(at, str) else at}
            carrier = self.catalog.carriers.get(rec["carrier"])
            tenant = self.catalog.tenant(rec["tenant"])
            mc = self.config.message_classes.get(rec["message_class"])
            if carrier is None or tenant is None or mc is None:
                raise ValueError("decision names a carrier, tenant or class this catalog lacks")
            now = to_epoch(rec["at"])
            key = RouteKey(rec["country"], rec["operator"], self.model.band_of(rec["local_hour"]))
            segments = int(rec["segments"])
            flight = InFlight(
                rec["decision_id"],
                now,
                carrier.id,
                tenant.id,
                mc.name,
                key,
                segments,
                float(rec["price"]) / segments,
                carrier.bills_on_delivery,
                tenant.reports_conversions,
                rec,
                origin=str(rec.get("origin", "")),
            )
            self._track(flight, mc)
            self.stats.decisions += 1
            self.advance(now)
            return True

    def _check_outcome(
        self, i: int, ev: OutcomeEvent, many: bool, tenant: str | None = None
    ) -> tuple[InFlight, OutcomeEvent, float]:
        prefix = f"[{i}]." if many else ""
        flight = self._find(ev.decision_id, tenant)
        if flight is None:
            raise UnknownDecision(
                f"decision {ev.decision_id!r} is not known (never routed here, "
                "or closed and forgotten)",
                field=f"{prefix}decision_id",
            )
        if ev.event not in EVENTS:
            raise InvalidRequest(
                f"event must be one of {', '.join(EVENTS)}", field=f"{prefix}event"
            )
        if ev.event == "dlr" and (ev.status or "").upper() not in DLR_STATUSES:
            raise InvalidRequest(
                "a dlr needs status, one of " + ", ".join(sorted(DLR_STATUSES)),
                field=f"{prefix}status",
            )
        if ev.event == "submit" and submit_accepted((ev.status or "").upper() or None) is None:
            raise InvalidRequest(
                "a submit status is one of " + ", ".join(sorted(SUBMIT_OK)) + " (accepted), or "
                "an SMPP command_status name (ESME_R…) or number, or one of "
                + ", ".join(sorted(SUBMIT_FAILURE_WORDS))
                + " (failed); receipt words such as ACCEPTD go in a dlr event",
                field=f"{prefix}status",
            )
        if ev.cost is not None and not ev.cost >= 0:
            raise InvalidRequest("cost must be a number >= 0", field=f"{prefix}cost")
        if ev.at_flag is not None and not set(ev.at_flag.split(",")) <= TIME_FLAGS:
            raise InvalidRequest(
                "at_flag is a comma-separated list of " + ", ".join(sorted(TIME_FLAGS)),
                field=f"{prefix}at_flag",
            )
        ev = self._outcome_time(flight, ev)
        return flight, ev, ev.at  # type: ignore[return-value]

    def _outcome_time(self, flight: InFlight, ev: OutcomeEvent) -> OutcomeEvent:
        """The event with its time placed where it can be: never before its decision, never
        past this router's clock plus the accepted skew. An outcome is never refused for its
        time (a carrier's clock is not the sender's fault); the adjustment is flagged, counted,
        and the time as stated kept in `source_at`. A coarse interval is clipped the same way."""
        wall = self.options.wall_clock()
        skew = self.options.max_future_skew_seconds
        latest = wall + skew if skew is not None else float("inf")
        flags = [f for f in (ev.at_flag or "").split(",") if f]
        at = wall if ev.at is None else ev.at
        if not at >= EARLIEST_EVENT:
            at, flags = flight.at, [*flags, "implausible"]
        elif at < flight.at - self.options.max_past_outcome_skew_seconds:
            at, flags = flight.at, [*flags, "before_decision"]
        elif at > latest:
            at, flags = max(wall, flight.at), [*flags, "future"]
        at = max(at, flight.at)
        low, high = ev.at_earliest, ev.at_latest
        if low is not None and high is not None:
            low, high = max(low, flight.at), min(high, latest)
            if not low <= at <= high:
                low = high = None
        else:
            low = high = None
        source = ev.source_at
        if source is None and ev.at is not None and at != ev.at:
            source = ev.at
        return dataclasses.replace(
            ev,
            at=at,
            at_earliest=low,
            at_latest=high,
            source_at=source,
            at_flag=",".join(dict.fromkeys(flags)) or None,
        )

    def _apply(self, flight: InFlight, ev: OutcomeEvent, at: float, persist: bool = True) -> str:
        self.advance(at)
        status = (ev.status or "").upper() or None
        signature = outcome_signature(ev.event, status)
        if signature in flight.seen:
            self.metrics.duplicates.inc()
            return "duplicate"
        flight.seen.add(signature)
        closed = flight.decision_id not in self.inflight
        mc = self.config.message_classes[flight.message_class]
        if ev.event == "submit":
            self._on_submit(flight, status, at)
        elif ev.event == "dlr":
            self._on_dlr(flight, status, at, mc, ev)
        else:
            self._on_conversion(flight, at)
        if ev.cost is not None and _billed(flight, ev.event, status):
            self._learn_price(flight, ev.cost, at)
        self._log_outcome(flight, self.outcome_row((flight, ev, at)), persist)
        if not closed:
            self._maybe_close(flight, mc)
        return "late" if closed else "recorded"

    def _learn_price(self, flight: InFlight, cost: float, at: float) -> None:
        """A bill: its unit price against the catalog's for the route (if it still has one)."""
        coverage = self.catalog.carriers.get(flight.carrier)
        route = None if coverage is None else coverage.coverage.get(flight.key.country)
        if route is None:
            return
        catalog = route.price_for(flight.key.operator)
        unit = cost / max(flight.segments, 1)
        self.prices.observe(
            flight.carrier, flight.key.country, flight.key.operator, unit, catalog, at
        )

    def _on_submit(self, flight: InFlight, status: str | None, at: float) -> None:
        if not submit_accepted(status):
            if flight.final_status is None:
                flight.final_status = "SUBMIT_FAILED"
            self._learn(flight, False, at, None)

    def _on_dlr(
        self,
        flight: InFlight,
        status: str | None,
        at: float,
        mc: MessageClass,
        ev: OutcomeEvent,
    ) -> None:
        if status not in FINAL_DLR:
            return
        if flight.final_status is None or flight.final_status == "TIMEOUT":
            flight.final_status = status
        delivered = status == "DELIVRD"
        if delivered:
            flight.delivered_at = at
            latency = at - flight.at
            within = within_sla(
                latency,
                mc.sla_seconds,
                None if ev.at_earliest is None else ev.at_earliest - flight.at,
                None if ev.at_latest is None else ev.at_latest - flight.at,
            )
            self._learn(flight, within, at, latency if within > 0 else None)
            self._track_truth(flight, mc)
            self.stats.delivered += 1
        else:
            self._learn(flight, False, at, None)

    def _on_conversion(self, flight: InFlight, at: float) -> None:
        flight.converted = True
        self._learn(flight, True, at, None)

    def _learn(
        self, flight: InFlight, success: bool | float, at: float, latency: float | None
    ) -> None:
        if flight.learner_done:
            return
        flight.learner_done = True
        flight.learner_success = success
        if flight.pending_counted:
            self.model.add_pending(flight.carrier, flight.key, -1.0)
            flight.pending_counted = False
        # A failure answered inside the SLA is one a sender can still retry elsewhere.
        sla = self.config.message_classes[flight.message_class].sla_seconds
        quick = not success and at - flight.at < sla
        self.model.update(Observation(flight.carrier, flight.key, success, at, latency, quick))
        self.stats.learned += 1
        self.stats.learned_success += float(success)
        result = "success" if success >= 0.5 else "failure"
        self.metrics.child(self.metrics.learned, flight.carrier, result).inc()

    def _check_change(self, flight: InFlight, due: float) -> None:
        if flight.change_checked:
            return
        flight.change_checked = True
        obs = Observation(flight.carrier, flight.key, float(flight.learner_success or 0.0), due)
        if self.model.check_change(obs, flight.at):
            self.stats.alarms += 1
            self.metrics.alarms.labels(flight.carrier, flight.key.country).inc()
            self.policy.forget_cache()

    def _truth(self, flight: InFlight, converted: bool, at: float) -> None:
        flight.truth_done = True
        self.model.update_truth(flight.carrier, flight.key.country, converted, at)

    def _fire(self, kind: str, flight: InFlight, due: float) -> None:
        mc = self.config.message_classes[flight.message_class]
        if kind == STALE:
            if not flight.learner_done and flight.final_status is None:
                flight.pending_counted = True
                self.model.add_pending(flight.carrier, flight.key, 1.0)
        elif kind == DEADLINE:
            self._learn(flight, False, due, None)
            if not flight.change_checked:  # a restored decision has had its deadline already
                self._check_change(flight, due)
                self._track_late(flight, mc)
        elif kind == TRUTH:
            if flight.final_status == "DELIVRD" and not flight.truth_done:
                self._truth(flight, flight.converted, due)
        elif kind == TIMEOUT and flight.final_status is None:
            flight.final_status = "TIMEOUT"
            self._learn(flight, False, due, None)
            row = self._outcome_row(
                flight, "timeout", due, "TIMEOUT", None, None, None, round((due - flight.at) * 1000)
            )
            self._log_outcome(flight, row, flight.origin == self.options.replica)  # its decider
        self._maybe_close(flight, mc, due)

    def _maybe_close(self, flight: InFlight, mc: MessageClass, now: float | None = None) -> None:
        now = self.clock if now is None else now
        if flight.final_status is None or not flight.learner_done:
            return
        if flight.conversion_tenant and now < flight.at + mc.conversion_window_seconds:
            return
        self.inflight.pop(flight.decision_id, None)
        self.recent.add(flight)

    def _log_outcome(self, flight: InFlight, row: dict[str, Any], persist: bool = True) -> None:
        """Keep an outcome row with its decision; `persist` counts and logs it too."""
        flight.events.append(
            {
                **row,
                "at": row["at"].isoformat(),
                "at_source": row["at_source"] and row["at_source"].isoformat(),
            }
        )
        if persist:
            self.persist_outcome_row(row)

    def outcome_row(self, checked: CheckedOutcome) -> dict[str, Any]:
        """The decision-log row of a checked event, without side effects (`_apply` logs this
        row; replicas compute it before Redis's verdict): the status upper-cased (a submit
        without one is ACCEPTED), and, when the event reports no cost, the catalog price if
        it is the event the carrier bills on (an accepted submit, or a DELIVRD receipt for a
        carrier billing on delivery)."""
        flight, ev, at = checked
        status = (ev.status or "").upper() or None
        cost = ev.cost
        if cost is None and _billed(flight, ev.event, status):
            cost = flight.unit_price * flight.segments
        if ev.event == "submit":
            status = status or "ACCEPTED"
        latency_ms = round((at - flight.at) * 1000)
        return self._outcome_row(
            flight, ev.event, at, status, ev.error_code, cost, ev.currency, latency_ms, ev
        )

    def persist_outcome_row(self, row: Mapping[str, Any]) -> None:
        """Count an outcome row (outcomes, spend, time flags) and write it to the decision log:
        the part of recording an outcome that must happen once across all replicas."""
        for word in (row.get("at_flag") or "").split(","):
            if word:
                self.metrics.child(self.metrics.time_adjusted, word).inc()
        cost = row.get("cost")
        with self._lock:
            if cost:
                self.stats.spend += cost
        if cost:
            self.metrics.child(self.metrics.spend, row["carrier"], row["currency"]).inc(cost)
        self.metrics.child(self.metrics.outcomes, row["event"], row["status"] or "").inc()
        if self._log_outcome_row is not None:
            self._log_outcome_row(dict(row))

    def _outcome_row(
        self,
        flight: InFlight,
        event: str,
        at: float,
        status: str | None,
        error_code: str | None,
        cost: float | None,
        currency: str | None,
        latency_ms: int | None,
        ev: OutcomeEvent | None = None,
    ) -> dict[str, Any]:
        flag = ev.at_flag if ev is not None else None
        row = {
            "decision_id": flight.decision_id,
            "at": from_epoch(at),
            "event": event,
            "status": status,
            "error_code": error_code,
            "cost": cost,
            "currency": currency or (self._currency if cost is not None else None),
            "latency_ms": latency_ms,
            "carrier": flight.carrier,
            "tenant": flight.tenant,
            "at_source": None,
            "at_flag": flag,
            "latency_min_ms": None,
            "latency_max_ms": None,
        }
        if ev is not None:
            if ev.source_at is not None:
                row["at_source"] = from_epoch(ev.source_at)
            if ev.at_earliest is not None and ev.at_latest is not None:
                row["latency_min_ms"] = round((ev.at_earliest - flight.at) * 1000)
                row["latency_max_ms"] = round((ev.at_latest - flight.at) * 1000)
        return row

    # ---- operators -------------------------------------------------------------------------

    def pause(self, carrier_id: str, reason: str = "paused by an operator") -> None:
        """Take a carrier out of every eligible set until resumed."""
        with self._lock:
            self._carrier(carrier_id)
            self.eligibility.paused[carrier_id] = reason
            self.metrics.paused.labels(carrier_id).set(1)
            self.policy.forget_cache()

    def resume(self, carrier_id: str) -> None:
        """Put a paused carrier back."""
        with self._lock:
            self._carrier(carrier_id)
            self.eligibility.paused.pop(carrier_id, None)
            self.metrics.paused.labels(carrier_id).set(0)
            self.policy.forget_cache()

    def replace_catalog(self, catalog: Catalog) -> None:
        """Serve a new catalog version (prices, coverage, tenants): learned state, decisions in
        flight, pauses and throughput buckets carry over; cached π is dropped."""
        with self._lock:
            old = self.eligibility
            self.catalog = catalog
            self.parser = DestinationParser(catalog.directory)
            paused = {c: r for c, r in old.paused.items() if c in catalog.carriers}
            self.eligibility = Eligibility(
                catalog, paused=paused, buckets=old.buckets, shared_caps=old.shared_caps
            )
            self._currency = self.options.currency or catalog.currency
            self.policy.forget_cache()

    def _carrier(self, carrier_id: str) -> None:
        if carrier_id not in self.catalog.carriers:
            raise UnknownCarrier(f"unknown carrier {carrier_id!r}", field="carrier")

    def decision(self, decision_id: str, tenant: str | None = None) -> dict[str, Any]:
        """A decision with its context, π, scores and outcomes so far: why this carrier.
        With `tenant`, only that tenant's decisions are found."""
        with self._lock:
            flight = self._find(decision_id, tenant)
            if flight is None:
                raise UnknownDecision(f"decision {decision_id!r} is not known", field="decision_id")
            rec = dict(flight.record)
            rec["at"] = rec["at"].isoformat()
            rec["state"] = {
                "open": decision_id in self.inflight,
                "learner_done": flight.learner_done,
                "learner_success": flight.learner_success,
                "final_status": flight.final_status,
                "converted": flight.converted,
            }
            rec["why"] = [
                {"carrier": c, "probability": p, "expected_utility": s}
                for c, p, s in zip(
                    rec["eligible"], rec["probabilities"], rec["scores"], strict=True
                )
            ]
            rec["outcomes"] = list(flight.events)
            return rec

    def carriers(self, country: str | None = None) -> list[dict[str, Any]]:
        """The catalog with live scores per carrier (and per country it covers)."""
        if country is not None and country not in PHONE_REGIONS:
            raise InvalidRequest(f"unknown country code {country!r}", field="country")
        with self._lock:
            now = max(self.clock, 0.0)
            out = []
            for car in self.catalog.carriers.values():
                countries = {}
                for code, cov in sorted(car.coverage.items()):
                    if country is not None and code != country:
                        continue
                    est = self.model.estimate(car.id, RouteKey(code, "", -1), now)
                    observed = self.prices.price(car.id, code, "", cov.price, now)
                    countries[code] = {
                        "price": cov.price,
                        "observed_price": round(observed, 6),
                        # what the bills say over the catalog (an operations alarm input)
                        "price_gap": round(observed / cov.price - 1.0, 4) if cov.price else None,
                        "operator_prices": dict(cov.operator_prices),
                        "success_estimate": round(est.success_mean, 4),
                        "evidence": round(est.alpha + est.beta, 1),
                        "receipt_truth": round(est.truth, 4),
                        "latency_s": round(est.latency_s, 2),
                    }
                overall = self.model.estimate(car.id, RouteKey("", "", -1), now)
                self.metrics.success.labels(car.id).set(overall.success_mean)
                out.append(
                    {
                        "id": car.id,
                        "name": car.name,
                        "billing": car.billing,
                        "priority": car.priority,
                        "throughput_mps": car.throughput_mps,
                        "sender_types": sorted(car.sender_types),
                        "paused": car.id in self.eligibility.paused,
                        "pause_reason": self.eligibility.paused.get(car.id),
                        "success_estimate": round(overall.success_mean, 4),
                        "countries": countries,
                        "recent_alarms": [a for a in self.model.alarms_ if a["carrier"] == car.id],
                    }
                )
            return out

    # ---- persistence -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: learned model, decisions in flight, pauses, clock."""
        with self._lock:
            return {
                "format": 1,
                "policy": self.policy_label,
                "clock": self.clock,
                "model": self.model.state_dict(),
                "prices": self.prices.state_dict(),
                "paused": dict(self.eligibility.paused),
                "inflight": [f.to_state() for f in self.inflight.values()],
                "recent": [f.to_state() for f in self.recent.values()[-20_000:]],
                "stats": {k: getattr(self.stats, k) for k in self.stats.__slots__},
                "idempotency": self.idempotency.state(),
            }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`; the model keeps this engine's configuration."""
        if state.get("format") != 1:
            raise ValueError("unsupported snapshot format")
        with self._lock:
            self.model = CarrierModel.from_state(state["model"], self.config.model)
            self.prices = PriceModel.from_state(
                state.get("prices", {}), self.config.model.half_life_seconds
            )
            self.policy.model = self.model
            self.policy.forget_cache()
            self.clock = float(state["clock"])
            self.eligibility.paused = dict(state.get("paused", {}))
            for k, v in state.get("stats", {}).items():
                setattr(self.stats, k, v)
            for d in state.get("recent", []):
                self.recent.add(_restore_flight(d))
            self.inflight.clear()
            self.timers = Timers()
            for d in state["inflight"]:
                flight = _restore_flight(d)
                mc = self.config.message_classes[flight.message_class]
                self._track(flight, mc)
                if flight.change_checked:
                    self._track_late(flight, mc)
                self._track_truth(flight, mc)
            for cid in self.eligibility.paused:
                self.metrics.paused.labels(cid).set(1)
            self.idempotency.load(state.get("idempotency", []), self.clock)


def _billed(flight: InFlight, event: str, status: str | None) -> bool:
    """Whether this event is the one the carrier bills on: an accepted submit, or a DELIVRD
    receipt for a carrier billing on delivery (`status` upper-cased)."""
    if event == "submit":
        return bool(submit_accepted(status)) and not flight.billing_on_delivery
    return event == "dlr" and status == "DELIVRD" and flight.billing_on_delivery


def within_sla(
    latency: float, sla: float, low: float | None = None, high: float | None = None
) -> bool | float:
    """Whether a delivery's latency is within the SLA; for a coarse time known only
    to lie in [low, high] (a receipt with minute precision), the share of that interval within
    the SLA, so that coarse receipts neither flatter nor punish a carrier on average."""
    if low is None or high is None or high - low < 1.0:
        return latency <= sla
    return min(1.0, max(0.0, (sla - low) / (high - low)))


def outcome_signature(event: str, status: str | None) -> str:
    """What makes an outcome a repeat: its event, and for receipts the intermediate status or
    "final" (one final receipt per decision counts)."""
    if event != "dlr":
        return event
    status = (status or "").upper()
    return f"dlr-{status}" if status in INTERMEDIATE_DLR else "dlr-final"


def _restore_flight(d: Mapping[str, Any]) -> InFlight:
    flight = InFlight.from_state(dict(d))
    at = flight.record["at"]
    if isinstance(at, str):
        flight.record["at"] = datetime.fromisoformat(at)
    return flight

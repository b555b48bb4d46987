"""The rows the engine logs pass the strict schema checks that the service skips."""

from __future__ import annotations

from pathlib import Path

import orjson

from carriers.catalog import load_catalog
from router.contract.messages import OutcomeEvent, RouteRequest
from router.core.config import load_config
from router.core.engine import EngineOptions, RoutingEngine
from router.core.inflight import InFlight
from router.log.decision_log import (
    DECISION_SCHEMA,
    OUTCOME_SCHEMA,
    DecisionLog,
    finalized_view,
    read_stream,
)

T0 = 1_793_602_800.0


def test_engine_rows_validate_and_read_back(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path, validate=True)
    catalog = load_catalog()
    engine = RoutingEngine(
        catalog,
        load_config().with_seed(3),
        EngineOptions(hmac_key=b"k", max_future_skew_seconds=None),
        log_decision=log.log_decision,
        log_outcome=log.log_outcome,
    )
    numbers = ["+79031234567", "+4915112345678", "+919812345678", "+2348031234567"]
    ids = []
    for i, to in enumerate(numbers * 5):
        d = engine.route(
            RouteRequest(
                to,
                "otp",
                "acme" if i % 2 else "default",
                mccmnc="25001" if to.startswith("+7") else None,
                segments=1 + i % 3,
                at=T0 + i,
            )
        )
        ids.append(d.decision_id)
    engine.record_outcomes(
        [
            OutcomeEvent(ids[0], "submit", at=T0 + 0.3),
            OutcomeEvent(ids[0], "dlr", "DELIVRD", cost=0.05, currency="USD", at=T0 + 4),
            OutcomeEvent(ids[1], "submit", "ESME_RTHROTTLED", "0x58", at=T0 + 1.2),
            OutcomeEvent(ids[2], "dlr", "UNDELIV", error_code="001", at=T0 + 9),
            OutcomeEvent(ids[3], "conversion", at=T0 + 30),
        ]
    )
    engine.advance(T0 + 3 * 24 * 3600)  # every open decision times out: "timeout" rows
    log.close()
    decisions = read_stream(tmp_path, "decisions", DECISION_SCHEMA)
    outcomes = read_stream(tmp_path, "outcomes", OUTCOME_SCHEMA)
    assert decisions.num_rows == 20
    events = outcomes.column("event").to_pylist()
    assert events.count("timeout") == 17  # all but the delivered, rejected and undelivered one
    assert {"submit", "dlr", "conversion"} <= set(events)
    view = finalized_view(
        decisions, outcomes, engine.config.message_classes, catalog.conversion_tenants()
    )
    assert view["final"].all()
    assert view.set_index("decision_id").loc[ids[0], "delivered_within_sla"]
    text = b"".join(p.read_bytes() for p in tmp_path.rglob("*.parquet"))
    assert not any(n.lstrip("+").encode() in text for n in numbers)


def test_a_flight_s_snapshot_form_round_trips_and_owns_its_lists() -> None:
    engine = RoutingEngine(
        load_catalog(), load_config().with_seed(3), EngineOptions(max_future_skew_seconds=None)
    )
    d = engine.route(RouteRequest("+79031234567", "otp", "acme", mccmnc="25001", at=T0))
    engine.record_outcomes([OutcomeEvent(d.decision_id, "dlr", "DELIVRD", at=T0 + 4)])
    flight = engine.inflight[d.decision_id]
    state = flight.to_state()
    restored = InFlight.from_state(orjson.loads(orjson.dumps(state)))
    restored.record["at"] = flight.record["at"]  # the engine parses it back (_restore_flight)
    assert restored == flight
    flight.events.append({"event": "conversion"})
    flight.seen.add("conversion")
    assert len(state["events"]) == 1 and state["seen"] == ["dlr-final"]

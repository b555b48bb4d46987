"""Cost is learned live (issue 14.4): the billed cost on outcome events moves a route's price
from the catalog's, traffic follows within the hour, and the API shows both prices."""

from __future__ import annotations

from collections import Counter

import pytest

from bandit.prices import PriceModel
from carriers.catalog import load_catalog
from router.contract.messages import OutcomeEvent, RouteRequest
from router.core.config import load_config
from router.core.engine import EngineOptions, RoutingEngine
from tests.conftest import LiveServer

DE = "+4915112345678"
T0 = 1_793_000_000.0  # event time of the first message (2026-10-26)


def test_bills_matching_the_catalog_leave_its_price_exact() -> None:
    model = PriceModel()
    for i in range(50):
        model.observe("c", "DE", "o2", 0.041, 0.041, T0 + i)
    assert model.price("c", "DE", "o2", 0.041, T0 + 60) == 0.041
    assert model.price("c", "DE", "other", 0.041, T0 + 60) == 0.041


def test_a_price_rise_is_learned_shrunk_to_the_catalog_and_forgotten_over_time() -> None:
    model = PriceModel(half_life_seconds=3600.0, prior_weight=3.0)
    model.observe("c", "DE", "o2", 0.064, 0.041, T0)
    one = model.price("c", "DE", "o2", 0.041, T0)
    assert 0.041 < one < 0.064  # one bill moves it, the catalog holds it back
    for i in range(1, 60):
        model.observe("c", "DE", "o2", 0.064, 0.041, T0 + 30 * i)
    many = model.price("c", "DE", "o2", 0.041, T0 + 1800)
    assert many == pytest.approx(0.064, abs=0.002)
    # Another operator of the country leans on the country's evidence.
    assert model.price("c", "DE", "vodafone", 0.041, T0 + 1800) == pytest.approx(0.063, abs=0.003)
    # The state survives a snapshot.
    again = PriceModel.from_state(model.state_dict(), 3600.0)
    assert again.price("c", "DE", "o2", 0.041, T0 + 1800) == many


def _engine() -> RoutingEngine:
    config = load_config().with_seed(7)
    return RoutingEngine(load_catalog(), config, EngineOptions(max_future_skew_seconds=None))


def _send(engine: RoutingEngine, start: float, n: int, dearer: str | None) -> list[str]:
    """Route `n` DE messages one second apart from `start`, each delivered and billed: at the
    catalog price, but `dearer`'s at 3x. The carriers chosen, in order."""
    chosen = []
    for i in range(n):
        at = start + i
        d = engine.route(RouteRequest(DE, at=at))
        chosen.append(d.carrier)
        carrier = engine.catalog.carriers[d.carrier]
        unit = carrier.coverage["DE"].price_for(d.context["operator"])
        cost = unit * (3.0 if d.carrier == dearer else 1.0)
        on_delivery = carrier.bills_on_delivery
        engine.record_outcomes(
            [
                OutcomeEvent(
                    d.decision_id,
                    "submit",
                    "ACCEPTED",
                    cost=None if on_delivery else cost,
                    at=at + 0.2,
                ),
                OutcomeEvent(
                    d.decision_id,
                    "dlr",
                    "DELIVRD",
                    cost=cost if on_delivery else None,
                    at=at + 2.0,
                ),
            ]
        )
    return chosen


def test_an_unannounced_price_rise_moves_traffic_within_the_hour() -> None:
    engine = _engine()
    honest = _send(engine, T0, 900, None)  # 15 minutes of bills at the catalog price
    leader, _ = Counter(honest[-300:]).most_common(1)[0]
    before = honest[-300:].count(leader) / 300
    view = {c["id"]: c for c in engine.carriers("DE")}[leader]["countries"]["DE"]
    assert view["observed_price"] == view["price"] and view["price_gap"] == 0.0
    rise = _send(engine, T0 + 900, 2400, leader)  # its bills triple: 40 minutes of them
    after = rise[-300:].count(leader) / 300
    view = {c["id"]: c for c in engine.carriers("DE")}[leader]["countries"]["DE"]
    assert view["observed_price"] > 2.0 * view["price"] and view["price_gap"] > 1.0
    assert after < 0.5 * before, (leader, before, after)


def test_the_api_shows_catalog_and_observed_price(server: LiveServer) -> None:
    """Over HTTP: a bill at twice the catalog price shows as the observed price."""
    d = server.client.post("/v1/route", json={"to": DE}).json()
    carriers = server.client.get("/v1/carriers", params={"country": "DE"}).json()["carriers"]
    chosen = next(c for c in carriers if c["id"] == d["carrier"])
    price = chosen["countries"]["DE"]["price"]
    assert chosen["countries"]["DE"]["observed_price"] == price
    billed_on = ("dlr", "DELIVRD") if chosen["billing"] == "delivery" else ("submit", "ACCEPTED")
    events = [
        {"decision_id": d["decision_id"], "event": "submit", "status": "ACCEPTED"},
        {"decision_id": d["decision_id"], "event": "dlr", "status": "DELIVRD"},
    ]
    for e in events:
        if (e["event"], e["status"]) == billed_on:
            e["cost"] = 2 * price
    assert server.client.post("/v1/outcomes", json=events).status_code == 200
    carriers = server.client.get("/v1/carriers", params={"country": "DE"}).json()["carriers"]
    after = next(c for c in carriers if c["id"] == d["carrier"])["countries"]["DE"]
    assert price < after["observed_price"] < 2 * price and after["price_gap"] > 0

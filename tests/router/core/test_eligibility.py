"""Eligibility: coverage, permissions, sender types, pauses and throughput caps in event time."""

from __future__ import annotations

import pytest

from carriers.catalog import Catalog, load_catalog
from router.contract.errors import NoEligibleCarrier
from router.contract.messages import RouteRequest
from router.core.config import load_config
from router.core.eligibility import Eligibility, TokenBucket
from router.core.engine import EngineOptions, RoutingEngine

T0 = 1_793_602_800.0


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def test_token_bucket_refills_in_event_time() -> None:
    b = TokenBucket(rate=10)
    assert b.available(T0) == 10
    b.take(T0, 10)
    assert b.available(T0) == 0
    assert b.available(T0 + 0.5) == pytest.approx(5)
    assert b.available(T0 + 5) == 10  # burst is capped at one second
    b.take(T0 + 5, 3)
    assert b.available(T0 + 5) == pytest.approx(7)
    assert b.available(T0 + 4) == pytest.approx(7)  # an earlier event time refills nothing


def test_reasons_per_carrier(catalog: Catalog) -> None:
    elig = Eligibility(catalog)
    tenant = catalog.tenant("initech")
    ok, why = elig.eligible(tenant, "RU", "t2", "alphanumeric", 1, T0, exclude=("asiahub",))
    assert [c.id for c in ok] == ["globalprime", "rulocal"]
    assert why == {
        "eurodirect": "no coverage for operator t2 in RU",
        "asiahub": "excluded by the request",
        "afrilink": "no coverage for RU",
        "latamobile": "no coverage for RU",
        "budgetroute": "tenant initech may not use this carrier",
    }
    elig.paused["rulocal"] = "maintenance"
    ok, why = elig.eligible(tenant, "RU", "t2", "alphanumeric", 1, T0, exclude=("asiahub",))
    assert [c.id for c in ok] == ["globalprime"]
    assert why["rulocal"] == "paused: maintenance"
    assert list(why) == [
        "eurodirect",
        "asiahub",
        "afrilink",
        "latamobile",
        "rulocal",
        "budgetroute",
    ]  # catalog order, whatever the cause


def test_throughput_cap_moves_traffic_and_then_says_why(catalog: Catalog) -> None:
    """rulocal takes 120 parts/s: a burst past the caps of every RU carrier is refused."""
    engine = RoutingEngine(
        catalog,
        load_config().with_policy("static").with_seed(1),
        EngineOptions(max_future_skew_seconds=None),
    )
    req = RouteRequest("+79031234567", tenant="default", segments=4, at=T0)
    carriers = [engine.route(req).carrier for _ in range(100)]
    # static priority: globalprime (400 parts/s) first, then the next by priority.
    assert carriers[:100].count("globalprime") == 100
    # The other RU/beeline carriers hold 200 + 300 + 120 + 300 = 920 parts: 230 messages.
    more = [engine.route(req).carrier for _ in range(230)]
    assert "globalprime" not in more
    assert {c: more.count(c) for c in set(more)} == {
        "eurodirect": 50,
        "asiahub": 75,
        "rulocal": 30,
        "budgetroute": 75,
    }
    with pytest.raises(NoEligibleCarrier) as err:
        engine.route(req)
    reasons = err.value.details["reasons"]
    assert reasons["rulocal"] == "at capacity (120 parts/s)"
    assert reasons["afrilink"] == "no coverage for RU"
    # One second later the buckets have refilled.
    later = RouteRequest("+79031234567", tenant="default", segments=4, at=T0 + 1)
    assert engine.route(later).carrier == "globalprime"


def test_replace_catalog_keeps_pauses_and_uses_new_prices(catalog: Catalog) -> None:
    import yaml

    from carriers.catalog import EXAMPLE_CATALOG, parse_catalog

    engine = RoutingEngine(
        catalog,
        load_config().with_policy("cheapest").with_seed(1),
        EngineOptions(max_future_skew_seconds=None),
    )
    req = RouteRequest("+4915112345678", at=T0)  # DE: budgetroute is the cheapest
    assert engine.route(req).carrier == "budgetroute"
    engine.pause("globalprime", "test")
    raw = yaml.safe_load(EXAMPLE_CATALOG.read_text())
    for carrier in raw["carriers"]:
        if carrier["id"] == "eurodirect":
            carrier["coverage"]["DE"]["price"] = 0.001
            carrier["coverage"]["DE"]["operators"] = {}
    raw["version"] = "2026-11-02"
    engine.replace_catalog(parse_catalog(raw, "new"))
    d = engine.route(RouteRequest("+4915112345678", at=T0 + 1))
    assert d.carrier == "eurodirect"
    assert "globalprime" not in d.fallbacks  # still paused
    assert engine.decision(d.decision_id)["price"] == 0.001

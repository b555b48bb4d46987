"""Learning in small simulated worlds (seeded): the engine finds the best carrier, leaves a
carrier that collapses, and starves a grey route whose receipts lie, for every tenant.

Run with `pytest -s` to see the measured figures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bandit.model import RouteKey
from carriers.catalog import Catalog, load_catalog
from experiments.play import play
from experiments.world import ScenarioSpec, World
from router.contract.messages import OutcomeEvent, RouteRequest
from router.core.config import load_config
from router.core.engine import EngineOptions, RoutingEngine

START = "2026-11-02T09:00:00Z"  # 10:00-12:00 local in DE and RU: one time band
RU_CARRIERS = ["globalprime", "eurodirect", "asiahub", "rulocal", "budgetroute"]


@dataclass
class Run:
    """One policy played through one world."""

    frame: pd.DataFrame
    world: World
    engine: RoutingEngine

    @property
    def first(self) -> pd.DataFrame:
        """First attempts only (retries are forced off the failed carrier), in time order."""
        df = self.frame[(self.frame["attempt"] == 1) & self.frame["carrier"].notna()]
        return df.sort_values("at")

    def minute(self, m: float) -> float:
        """Event time `m` minutes into the scenario."""
        return self.world.start + 60.0 * m


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    """The example catalog."""
    return load_catalog()


def _play(catalog: Catalog, spec: dict[str, Any], policy: str, seed: int = 1) -> Run:
    """Play `spec` through a fresh engine serving `policy` (shipped parameters for thompson)."""
    config = load_config()
    if policy != config.policy:
        config = config.with_policy(policy)
    engine = RoutingEngine(
        catalog, config.with_seed(seed), EngineOptions(max_future_skew_seconds=None)
    )
    world = World(ScenarioSpec.model_validate(spec), catalog)
    frame = play(engine, world, seed=seed)
    assert frame["error"].isna().all(), frame["error"].value_counts()
    return Run(frame, world, engine)


def _share(df: pd.DataFrame, carrier: str) -> float:
    """Share of `df`'s decisions that went to `carrier`."""
    assert len(df) > 0
    return float((df["carrier"] == carrier).mean())


# ---- a. the best carrier ------------------------------------------------------------------

BEST = {
    "name": "best-carrier",
    "seed": 3,
    "start": START,
    "duration_minutes": 60,
    "traffic": {
        "rate_per_second": 2.0,
        "diurnal_amplitude": 0.0,
        "countries": {"DE": 1.0},
        "tenants": {"default": 1.0},
        "classes": {"otp": 1.0},
    },
    # Low enough that sending the cheap routes first and retrying their quick failures on
    # globalprime does not pay (at 0.75 it would, narrowly: see the oracle's retry value).
    "defaults": {"deliver": 0.6, "latency_median_s": 6},
    "routes": {"globalprime": {"DE": {"deliver": 0.97, "latency_median_s": 4}}},
}


@pytest.fixture(scope="module")
def best_runs(catalog: Catalog) -> dict[str, Run]:
    """The best-carrier world under thompson and under uniform."""
    return {p: _play(catalog, BEST, p) for p in ("thompson", "uniform")}


def test_finds_the_best_carrier(best_runs: dict[str, Run]) -> None:
    ts, un = best_runs["thompson"], best_runs["uniform"]
    late = ts.first[ts.first["at"] >= ts.minute(30)]
    share = _share(late, "globalprime")
    ts_success = float(ts.first["success"].mean())
    un_success = float(un.first["success"].mean())
    un_share = _share(un.first[un.first["at"] >= un.minute(30)], "globalprime")
    print(
        f"\n[best] decisions={len(ts.first)}; thompson share of globalprime in the last 30 min "
        f"{share:.3f} (uniform {un_share:.3f}); true success within SLA: thompson "
        f"{ts_success:.3f} vs uniform {un_success:.3f}"
    )
    assert len(ts.first) > 6000
    assert ts.first["index"].tolist() == sorted(ts.first["index"])  # same traffic...
    assert ts.first["index"].nunique() == un.first["index"].nunique()  # ...for both policies
    assert share >= 0.80
    assert 0.25 <= un_share <= 0.42  # three eligible carriers
    assert ts_success > un_success + 0.05
    # The learned estimate agrees with the truth the world used.
    est = ts.engine.model.estimate("globalprime", RouteKey("DE", "telekom", 1), ts.world.end)
    assert est.success_mean == pytest.approx(0.97, abs=0.03)


# ---- b. collapse --------------------------------------------------------------------------


def _collapse_spec(tenant: str) -> dict[str, Any]:
    """BEST with an outage of globalprime in DE from minute 30 to the end."""
    spec = {**BEST, "name": f"collapse-{tenant}"}
    spec["traffic"] = {**BEST["traffic"], "tenants": {tenant: 1.0}}
    spec["events"] = [
        {"at_minute": 30, "carrier": "globalprime", "country": "DE", "kind": "outage"}
    ]
    return spec


def _collapse_figures(run: Run) -> tuple[float, int, float, float]:
    """(share before, decisions sent to the dead carrier until its 10-decision rolling share
    first drops under 10%, seconds that took, share from outage + 5 min to the end)."""
    first = run.first
    outage = run.minute(30)
    before = _share(first[(first["at"] >= run.minute(20)) & (first["at"] < outage)], "globalprime")
    post = first[first["at"] >= outage]
    to_dead = (post["carrier"] == "globalprime").to_numpy(dtype=float)
    rolling = pd.Series(to_dead).rolling(10).mean().to_numpy()
    below = np.flatnonzero(rolling < 0.10)
    assert below.size, "the rolling share never dropped under 10%"
    idx = int(below[0])
    sent = int(to_dead[: idx + 1].sum())
    took = float(post["at"].iloc[idx] - outage)
    after = _share(first[first["at"] >= outage + 300], "globalprime")
    return before, sent, took, after


@pytest.mark.parametrize(
    "tenant",
    [
        "acme",
        "default",
    ],
)
def test_leaves_a_collapsed_carrier(catalog: Catalog, tenant: str) -> None:
    run = _play(catalog, _collapse_spec(tenant), "thompson")
    before, sent, took, after = _collapse_figures(run)
    alarms = [a for a in run.engine.model.alarms_ if a["carrier"] == "globalprime"]
    print(
        f"\n[collapse/{tenant}] globalprime share before the outage {before:.3f}; "
        f"{sent} decisions sent to it after the outage until its rolling share < 10% "
        f"({took:.0f} s); share from outage+5 min to the end {after:.3f}; "
        f"change alarms: {[(round(a['at'] - run.minute(30)), a['direction']) for a in alarms]}"
    )
    assert before >= 0.70
    assert after < 0.10
    assert sent < 150
    assert alarms and alarms[0]["direction"] == "drop"
    assert run.minute(30) < alarms[0]["at"] < run.minute(35)


def test_returns_to_a_recovered_carrier(catalog: Catalog) -> None:
    """An outage from minute 20 to 35: the carrier's traffic comes back within minutes."""
    spec = {**BEST, "name": "recovery", "duration_minutes": 60}
    spec["events"] = [
        {
            "at_minute": 20,
            "carrier": "globalprime",
            "country": "DE",
            "kind": "outage",
            "minutes": 15,
        }
    ]
    run = _play(catalog, spec, "thompson")
    first = run.first
    during = _share(
        first[(first["at"] >= run.minute(25)) & (first["at"] < run.minute(35))], "globalprime"
    )
    after = _share(first[first["at"] >= run.minute(45)], "globalprime")
    alarms = [
        (round((a["at"] - run.minute(20)) / 60, 1), a["direction"])
        for a in run.engine.model.alarms_
        if a["carrier"] == "globalprime"
    ]
    print(
        f"\n[recovery] globalprime share during the outage {during:.3f}, from 10 min after "
        f"it ended {after:.3f}; alarms (minutes after the outage began) {alarms}"
    )
    assert during < 0.12
    assert after > 0.85
    assert [d for _, d in alarms] == ["drop", "rise"]
    assert alarms[1][0] < 15 + 8  # the recovery is seen within 8 minutes


# ---- c. the grey route --------------------------------------------------------------------

GREY = {
    "name": "grey-route",
    "seed": 5,
    "start": START,
    "duration_minutes": 60,
    "conversion_rate": 0.85,
    "traffic": {
        "rate_per_second": 2.0,
        "diurnal_amplitude": 0.0,
        "countries": {"RU": 1.0},
        "tenants": {"acme": 0.5, "default": 0.5},
        "classes": {"otp": 1.0},
    },
    "defaults": {"deliver": 0.93, "latency_median_s": 5},
    "routes": {"budgetroute": {"RU": {"deliver": 0.1, "fake_dlr": 0.95, "latency_median_s": 5}}},
}


@pytest.fixture(scope="module")
def grey_runs(catalog: Catalog) -> dict[str, Run]:
    """The grey-route world under thompson and under cheapest."""
    return {p: _play(catalog, GREY, p) for p in ("thompson", "cheapest")}


def test_grey_route_loses_traffic_for_every_tenant(grey_runs: dict[str, Run]) -> None:
    ts, cheap = grey_runs["thompson"], grey_runs["cheapest"]
    last_third = ts.world.start + (2 / 3) * (ts.world.end - ts.world.start)
    late = ts.first[ts.first["at"] >= last_third]
    shares = {t: _share(g, "budgetroute") for t, g in late.groupby("tenant")}
    cheap_share = _share(cheap.first, "budgetroute")
    _, _, ratio, _ = ts.engine.model.estimates(RU_CARRIERS, RouteKey("RU", "mts", 2), ts.world.end)
    receipt_mean = ts.engine.model.estimate(
        "budgetroute", RouteKey("RU", "mts", 2), ts.world.end
    ).success_mean
    delivered = {p: float(r.first["delivered"].mean()) for p, r in grey_runs.items()}
    print(
        "\n[grey] budgetroute share in the last third: "
        + ", ".join(f"{t} {s:.3f}" for t, s in sorted(shares.items()))
        + f"; cheapest sends it {cheap_share:.3f}; truth ratios "
        + ", ".join(f"{c} {r:.2f}" for c, r in zip(RU_CARRIERS, ratio, strict=True))
        + f"; budgetroute receipt-based success {receipt_mean:.3f}; truly delivered: "
        + ", ".join(f"{p} {d:.3f}" for p, d in delivered.items())
    )
    assert set(shares) == {"acme", "default"}
    assert shares["acme"] < 0.05
    assert shares["default"] < 0.05
    assert cheap_share > 0.90
    # Receipts alone make the grey route look good; conversions expose it.
    assert receipt_mean > 0.85
    assert ratio[RU_CARRIERS.index("budgetroute")] < 0.5
    assert min(r for c, r in zip(RU_CARRIERS, ratio, strict=True) if c != "budgetroute") > 0.9
    assert delivered["thompson"] > 0.85
    assert delivered["cheapest"] < 0.25


# ---- d. when the engine learns what -------------------------------------------------------


def _carrier_totals(evidence: dict[tuple[str, ...], list[float]]) -> tuple[float, float]:
    """(hits, trials) summed over the carrier-level entries of a model's rate evidence."""
    rows = [v for k, v in evidence.items() if len(k) == 1]
    return sum(r[0] for r in rows), sum(r[1] for r in rows)


def test_receipt_truth_and_quick_failures_are_learned_at_fair_times(catalog: Catalog) -> None:
    """A conversion is learned when a miss would be (the deadline span, 70 s, after the
    receipt), so a carrier whose traffic grows is not overrated; a failure answered inside the
    SLA counts as quick."""
    t0 = 1_793_602_800.0
    engine = RoutingEngine(
        catalog, load_config().with_seed(1), EngineOptions(max_future_skew_seconds=None)
    )
    ids = [
        engine.route(RouteRequest("+79031234567", "otp", "acme", mccmnc="25001", at=t0 + i))
        for i in range(4)
    ]
    d = [x.decision_id for x in ids]
    engine.record_outcomes(
        [
            OutcomeEvent(d[0], "dlr", "DELIVRD", at=t0 + 4),
            OutcomeEvent(d[1], "dlr", "DELIVRD", at=t0 + 5),
            OutcomeEvent(d[0], "conversion", at=t0 + 20),
            OutcomeEvent(d[2], "dlr", "UNDELIV", at=t0 + 12),  # d[3] never answers
        ]
    )
    engine.advance(t0 + 40)
    assert engine.model.truth_ == {}  # the conversion waits until 70 s after its receipt
    assert _carrier_totals(engine.model.quick_) == pytest.approx((1.0, 1.0), abs=0.01)
    engine.advance(t0 + 80)
    assert _carrier_totals(engine.model.truth_) == pytest.approx((1.0, 2.0), abs=0.01)
    assert _carrier_totals(engine.model.quick_) == pytest.approx((1.0, 2.0), abs=0.01)


def test_a_restored_engine_still_learns_the_truth_of_a_delivered_code(catalog: Catalog) -> None:
    t0 = 1_793_602_800.0
    config = load_config().with_seed(1)
    options = EngineOptions(max_future_skew_seconds=None)
    engine = RoutingEngine(catalog, config, options)
    req = RouteRequest("+79031234567", "otp", "acme", mccmnc="25001", at=t0)
    did = engine.route(req).decision_id
    engine.record_outcomes(
        [OutcomeEvent(did, "dlr", "DELIVRD", at=t0 + 4), OutcomeEvent(did, "conversion", at=t0 + 9)]
    )
    restored = RoutingEngine(catalog, config, options)
    restored.load_state(engine.state_dict())
    restored.advance(t0 + 60)
    assert restored.model.truth_ == {}
    restored.advance(t0 + 80)
    assert _carrier_totals(restored.model.truth_) == pytest.approx((1.0, 1.0), abs=0.01)

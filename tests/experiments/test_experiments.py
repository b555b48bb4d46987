"""The experiment runner: scenarios, oracle, metrics, regret and MLflow runs, on tiny worlds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bandit.reward import MessageClass
from carriers.catalog import Catalog, load_catalog
from experiments.metrics import (
    cumulative_luck_free_regret,
    cumulative_regret,
    regret,
    routed,
    run_metrics,
    utilities,
)
from experiments.oracle import (
    Judge,
    expected_capped_latency,
    lognormal_cdf,
    retry_waits,
    true_utility,
)
from experiments.runner import (
    BASELINES,
    UnknownPolicy,
    parse_policies,
    play_policy,
    run_experiment,
    shipped_scenarios,
)
from experiments.world import RouteSpec, ScenarioError, ScenarioSpec, World, load_scenario
from router.contract.messages import RouteDecision
from router.core.config import load_config
from router.log.decision_log import DECISION_SCHEMA, DECISIONS, read_stream

START = "2026-11-02T09:00:00Z"

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 3,
    "start": START,
    "duration_minutes": 12,
    "traffic": {
        "rate_per_second": 1.5,
        "diurnal_amplitude": 0.0,
        "countries": {"DE": 1.0},
        "tenants": {"acme": 0.5, "default": 0.5},
        "classes": {"otp": 1.0},
    },
    "defaults": {"deliver": 0.6, "latency_median_s": 8},
    "routes": {"globalprime": {"DE": {"deliver": 0.97, "latency_median_s": 4}}},
    "events": [
        {"at_minute": 6, "carrier": "globalprime", "country": "DE", "kind": "outage"},
    ],
}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    """The example catalog."""
    return load_catalog()


def _world(catalog: Catalog, spec: dict[str, Any]) -> World:
    return World(ScenarioSpec.model_validate(spec), catalog)


def _play(catalog: Catalog, spec: dict[str, Any], policy: str, seed: int, tmp: Path):
    return play_policy(policy, _world(catalog, spec), load_config(), seed, tmp / policy)


# ---- determinism and the oracle -----------------------------------------------------------


def test_same_seed_same_metrics(catalog: Catalog, tmp_path: Path) -> None:
    a = _play(catalog, TINY, "thompson", 5, tmp_path / "a")
    b = _play(catalog, TINY, "thompson", 5, tmp_path / "b")
    c = _play(catalog, TINY, "thompson", 6, tmp_path / "c")
    assert a.metrics == b.metrics
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.metrics != c.metrics


def test_oracle_beats_every_policy_in_expectation(catalog: Catalog, tmp_path: Path) -> None:
    spec = {**TINY, "name": "oracle-check", "duration_minutes": 10}
    spec["routes"] = {
        "globalprime": {"DE": {"deliver": 0.95, "latency_median_s": 4}},
        "eurodirect": {"DE": {"deliver": 0.9, "latency_median_s": 30, "latency_sigma": 1.0}},
        "budgetroute": {"DE": {"deliver": 0.6, "latency_median_s": 10}},
    }
    totals: dict[str, float] = {}
    for seed in (1, 2):
        for policy in ("oracle", *BASELINES):
            run = _play(catalog, spec, policy, seed, tmp_path / str(seed))
            totals[policy] = totals.get(policy, 0.0) + run.metrics["utility"]
    print(
        "\n[oracle] utility over two seeds: " + ", ".join(f"{p} {u:.1f}" for p, u in totals.items())
    )
    assert all(totals["oracle"] >= u for u in totals.values())


def test_metrics_with_unrouted_attempts_in_the_run(catalog: Catalog, tmp_path: Path) -> None:
    """initech has one carrier left in BR after a failure, so its retries there are unrouted,
    leaving gaps in the truth columns; the delivered messages are still counted one by one."""
    spec = {**TINY, "name": "unrouted", "events": []}
    spec["traffic"] = {**TINY["traffic"], "countries": {"BR": 1.0}, "tenants": {"initech": 1.0}}
    run = _play(catalog, spec, "uniform", 1, tmp_path)
    delivered = routed(run.frame)["delivered"].astype(bool).sum()
    assert run.metrics["unrouted"] > 10 and delivered > 100
    assert run.metrics["cost_per_delivered"] == pytest.approx(
        run.metrics["cost_total"] / delivered, rel=1e-12
    )


def test_oracle_decisions_are_logged_as_usual(catalog: Catalog, tmp_path: Path) -> None:
    run = _play(catalog, TINY, "oracle", 1, tmp_path)
    decisions = read_stream(run.log_dir, DECISIONS, DECISION_SCHEMA).to_pandas()
    assert len(decisions) == run.metrics["attempts"]
    assert set(decisions["policy"]) == {"oracle"}
    assert (decisions["propensity"] == 1.0).all()
    before = decisions[decisions["at"] < pd.Timestamp(START) + pd.Timedelta(minutes=6)]
    after = decisions[decisions["at"] >= pd.Timestamp(START) + pd.Timedelta(minutes=6)]
    assert (before["carrier"] == "globalprime").mean() > 0.95  # the best route
    assert (after["carrier"] != "globalprime").all()  # it knows the outage at once
    assert run.metrics["outage_reaction_s"] < 5


def test_carriers_share_an_attempt_s_draws(catalog: Catalog) -> None:
    """Common random numbers across carriers: with the same stream, a message delivered by the
    worse route is delivered by the better one too, each route keeping its own rates."""
    spec = {**TINY, "events": []}
    spec["routes"] = {
        "globalprime": {"DE": {"deliver": 0.95, "latency_median_s": 4}},
        "eurodirect": {"DE": {"deliver": 0.6, "latency_median_s": 8}},
    }
    world = _world(catalog, spec)
    messages = world.messages(np.random.default_rng(1))
    pairs = []
    for i, msg in enumerate(messages[:3000]):
        good = world.send("globalprime", msg, 12, np.random.default_rng([7, i]))[1]
        bad = world.send("eurodirect", msg, 12, np.random.default_rng([7, i]))[1]
        assert type(good.delivered) is bool
        pairs.append((good.delivered, bad.delivered))
        if good.delivered and bad.delivered:  # one latency draw: the faster median is faster
            assert good.latency_s == pytest.approx(bad.latency_s / 2)
    good_rate, bad_rate = np.mean(pairs, axis=0)
    assert not any(bad and not good for good, bad in pairs)
    assert good_rate == pytest.approx(0.95, abs=0.015)
    assert bad_rate == pytest.approx(0.6, abs=0.03)


def test_policies_face_the_same_draws_whatever_carrier_they_choose(
    catalog: Catalog, tmp_path: Path
) -> None:
    """Played through the traffic driver: an attempt's luck does not depend on the carrier, so
    a message the cheap poor route delivered was delivered by the good route too."""
    spec = {**TINY, "name": "coupled", "events": [], "traffic": {**TINY["traffic"], "retry": False}}
    spec["routes"] = {
        "globalprime": {"DE": {"deliver": 0.95, "latency_median_s": 4}},
        "budgetroute": {"DE": {"deliver": 0.6, "latency_median_s": 8}},
    }
    good = _play(catalog, spec, "static", 1, tmp_path).frame.set_index("index")
    poor = _play(catalog, spec, "cheapest", 1, tmp_path).frame.set_index("index")
    both = good.merge(poor, left_index=True, right_index=True, suffixes=("_good", "_poor"))
    both = both[(both["carrier_good"] == "globalprime") & (both["carrier_poor"] == "budgetroute")]
    assert len(both) > 500
    delivered_good = both["delivered_good"].astype(bool)
    delivered_poor = both["delivered_poor"].astype(bool)
    assert not (delivered_poor & ~delivered_good).any()
    assert delivered_good.mean() > 0.9 and delivered_poor.mean() < 0.7


def test_lognormal_helpers_match_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    lat = 6.0 * np.exp(0.8 * rng.standard_normal(400_000))
    assert lognormal_cdf(10.0, 6.0, 0.8) == pytest.approx((lat <= 10).mean(), abs=0.003)
    assert expected_capped_latency(10.0, 6.0, 0.8) == pytest.approx(
        np.minimum(lat, 10).mean(), rel=0.003
    )


def test_retry_waits_and_a_retry_s_utility_hand_cases() -> None:
    route = RouteSpec(deliver=0.8, no_dlr=0.02, latency_median_s=5.0, latency_sigma=0.0)
    otp = CLASSES["otp"]
    waits = retry_waits(route, otp, night=False)
    assert waits[0] == (0.0, pytest.approx(0.55))  # no rejected submits on this route
    undeliv = 0.2 * 0.98 * 0.75  # lost, with a receipt, and the receipt is an early UNDELIV
    assert sum(p for p, _ in waits[1:]) == pytest.approx(undeliv)
    assert [w for _, w in waits[1:]] == pytest.approx([8.625, 14.875, 21.125, 27.375])
    short = MessageClass("short", value=0.5, sla_seconds=15, latency_penalty_per_second=0.001)
    assert sum(p for p, _ in retry_waits(route, short, night=False)[1:]) == pytest.approx(
        undeliv * 10 / 25  # only receipts inside the SLA are retried
    )
    # A retry sent 20 s into the SLA: delivered at 25 s as the user sees it (penalty on 25 s);
    # sent after the SLA, it can only cost.
    assert true_utility(route, 0.03, False, otp, False, waited=20.0) == pytest.approx(
        0.5 * 0.8 - 0.03 - 0.001 * 25.0 * 0.8
    )
    assert true_utility(route, 0.03, False, otp, False, waited=58.0) == pytest.approx(
        -0.03 - 0.001 * 60.0 * 0.8
    )


def test_a_retry_s_latency_counts_from_the_first_send(catalog: Catalog, tmp_path: Path) -> None:
    run = _play(catalog, TINY, "uniform", 2, tmp_path)
    df = run.frame[run.frame["carrier"].notna()]
    first_at = df.groupby("index")["at"].transform("min")
    retries = df[(df["attempt"] == 2) & df["delivered"]]
    assert len(retries) > 10
    assert (retries["latency_s"] > retries["at"] - first_at[retries.index]).all()
    assert (retries["success"] == (retries["latency_s"] <= 60)).all()


# ---- metrics on a hand-built frame --------------------------------------------------------

CLASSES = {"otp": MessageClass("otp", value=0.5, sla_seconds=60, latency_penalty_per_second=0.001)}


def _frame(rows: list[tuple[int, str, bool, float | None, float]]) -> pd.DataFrame:
    """(index, carrier, delivered, latency_s, cost) rows of first attempts in DE at minute 1."""
    return pd.DataFrame(
        [
            {
                "at": 1_793_610_060.0 + i,
                "index": i,
                "attempt": 1,
                "country": "DE",
                "tenant": "default",
                "message_class": "otp",
                "carrier": carrier,
                "delivered": delivered,
                "latency_s": latency,
                "converted": False,
                "success": delivered and (latency or 0) <= 60,
                "cost": cost,
                "receipt": "DELIVRD" if delivered else "UNDELIV",
            }
            for i, carrier, delivered, latency, cost in rows
        ]
    )


def test_regret_on_a_hand_checked_case(catalog: Catalog) -> None:
    world = _world(catalog, {**TINY, "events": []})
    oracle = _frame([(0, "a", True, 10.0, 0.05), (1, "a", True, 20.0, 0.05)])
    policy = _frame([(0, "b", True, 100.0, 0.02), (1, "b", False, None, 0.02)])
    # oracle: (0.5 - 0.05 - 0.010) + (0.5 - 0.05 - 0.020) = 0.87
    # policy: late delivery (0 - 0.02 - 0.001·60) + lost (0 - 0.02) = -0.10
    assert utilities(policy, CLASSES).tolist() == pytest.approx([-0.08, -0.02])
    m_oracle = run_metrics(oracle, world, CLASSES)
    m_policy = run_metrics(policy, world, CLASSES)
    assert m_oracle["utility"] == pytest.approx(0.87)
    assert m_policy["utility"] == pytest.approx(-0.10)
    r = regret(m_policy, m_oracle)
    assert r["regret"] == pytest.approx(0.97)
    assert r["regret_pct"] == pytest.approx(100 * 0.97 / 0.87)
    assert m_policy["success_within_sla_rate"] == 0.0
    assert m_policy["dlr_delivered_rate"] == 0.5
    assert m_policy["cost_per_delivered"] == pytest.approx(0.04)
    assert "outage_reaction_s" not in m_policy  # no outage in this world


def test_luck_free_regret_on_a_hand_checked_case(catalog: Catalog) -> None:
    spec = {**TINY, "events": [], "traffic": {**TINY["traffic"], "retry": False}}
    world = _world(catalog, spec)
    judge = Judge(world, band_hours=6)
    otp = CLASSES["otp"]
    context = {"country": "DE", "operator": "telekom", "local_hour": 10}

    def true(carrier: str) -> float:  # 10:00 in Berlin is not night
        route = world.route(carrier, "DE", world.start)
        billing = catalog.carriers[carrier].bills_on_delivery
        price = world.price(carrier, "DE", "telekom", world.start)
        return true_utility(route, price, billing, otp, False)

    def decided(carrier: str, *fallbacks: str) -> RouteDecision:
        return RouteDecision("d", carrier, list(fallbacks), 0.5, "x", context, world.start + 1)

    # globalprime (97% in 4 s) is the best route into DE in this world; eurodirect the default.
    assert true("globalprime") > true("eurodirect")
    assert judge(decided("globalprime", "eurodirect"), otp, 1, 1) == 0.0
    assert judge(decided("eurodirect", "globalprime"), otp, 1, 1) == pytest.approx(
        true("globalprime") - true("eurodirect")
    )
    assert judge(decided("eurodirect"), otp, 1, 1) == 0.0  # nothing else was eligible


def test_the_oracle_has_no_luck_free_regret_and_others_do(catalog: Catalog, tmp_path: Path) -> None:
    oracle = _play(catalog, TINY, "oracle", 1, tmp_path)
    uniform = _play(catalog, TINY, "uniform", 1, tmp_path)
    assert (oracle.frame["expected_regret"].dropna() == 0).all()
    assert oracle.metrics["expected_regret"] == 0.0
    assert (uniform.frame["expected_regret"].dropna() >= 0).all()
    assert uniform.metrics["expected_regret"] > 0.05 * len(uniform.frame)  # mostly bad routes
    world = _world(catalog, TINY)
    # The curves end at the runs' totals: realized regret and luck-free regret.
    realized = cumulative_regret(uniform.frame, oracle.frame, world, CLASSES)
    luck_free = cumulative_luck_free_regret(uniform.frame, world)
    assert realized.iloc[-1] == pytest.approx(
        oracle.metrics["utility"] - uniform.metrics["utility"]
    )
    assert luck_free.iloc[-1] == pytest.approx(uniform.metrics["expected_regret"])
    assert luck_free.is_monotonic_increasing
    assert len(luck_free) == len(realized) == TINY["duration_minutes"]
    r = regret(uniform.metrics, oracle.metrics)
    assert r["expected_regret_pct"] == pytest.approx(
        100 * uniform.metrics["expected_regret"] / oracle.metrics["utility"]
    )


# ---- scripted events the engine is told of ------------------------------------------------


def test_new_carrier_and_price_change_reach_the_engine(catalog: Catalog, tmp_path: Path) -> None:
    spec = {**TINY, "name": "events", "events": []}
    spec["traffic"] = {**TINY["traffic"], "countries": {"TR": 1.0}}
    spec["routes"] = {"asiahub": {"TR": {"deliver": 0.99, "latency_median_s": 2}}}
    spec["events"] = [
        {"at_minute": 4, "carrier": "asiahub", "kind": "new_carrier"},
        {"at_minute": 8, "carrier": "asiahub", "country": "TR", "kind": "price", "price": 0.5},
    ]
    run = _play(catalog, spec, "oracle", 1, tmp_path)
    decisions = read_stream(run.log_dir, DECISIONS, DECISION_SCHEMA).to_pandas()
    minute = (decisions["at"] - pd.Timestamp(START)).dt.total_seconds() / 60
    early, mid, late = (
        decisions[minute < 4],
        decisions[(minute >= 4) & (minute < 8)],
        decisions[minute >= 8],
    )
    assert not early["eligible"].map(lambda e: "asiahub" in e).any()
    assert (mid["carrier"] == "asiahub").mean() > 0.95
    assert (mid.loc[mid["carrier"] == "asiahub", "price"] == 0.021).all()
    assert (late["carrier"] != "asiahub").all()  # now far too expensive
    frame = run.frame
    assert frame.loc[frame["carrier"] == "asiahub", "cost"].max() == 0.021


# ---- scenario files -----------------------------------------------------------------------


def _write(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"routes": {"globalprime": {"DE": {"deliver": 1.5}}}}, "routes.globalprime.DE.deliver"),
        ({"routes": {"globalprime": {"DE": {"delivery": 0.5}}}}, "DE.delivery: Extra inputs"),
        (
            {"events": [{"at_minute": 1, "carrier": "globalprime", "kind": "meteor"}]},
            "events.0.kind",
        ),
        (
            {"events": [{"at_minute": 1, "carrier": "nosuch", "kind": "outage"}]},
            "events.0.carrier: unknown carrier 'nosuch'",
        ),
        ({"events": [{"at_minute": 1, "carrier": "eurodirect", "kind": "price"}]}, "needs 'price'"),
        ({"routes": {"nosuch": {}}}, "routes.nosuch: unknown carrier"),
        ({"traffic": {"rate_per_second": 0, "countries": {"DE": 1}}}, "traffic.rate_per_second"),
    ],
)
def test_scenario_errors_name_file_and_field(
    catalog: Catalog, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    path = _write(tmp_path, {**TINY, **change})
    with pytest.raises(ScenarioError) as err:
        load_scenario(path, catalog)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_shipped_scenarios_are_valid(catalog: Catalog) -> None:
    names = shipped_scenarios()
    assert {"steady", "outage", "grey_route", "price_change", "new_carrier", "mixed_large"} <= set(
        names
    )
    for name in names:
        World(load_scenario(name, catalog), catalog)


def test_policy_names() -> None:
    assert parse_policies("ts, cheapest,oracle,ts") == ["thompson", "cheapest"]
    with pytest.raises(UnknownPolicy, match="nosuch"):
        parse_policies("thompson,nosuch")


# ---- the runner and MLflow ----------------------------------------------------------------


def test_runner_logs_one_mlflow_run_per_policy(catalog: Catalog, tmp_path: Path) -> None:
    path = _write(tmp_path, {**TINY, "duration_minutes": 8})
    result = run_experiment(path, ["thompson", "cheapest"], seed=2, out=tmp_path / "out")
    assert result.tracking_uri == f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db"
    assert list(result.summary.index) == ["oracle", "thompson", "cheapest"]
    assert result.summary.loc["oracle", "regret"] == 0
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("sim-tiny")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"oracle", "thompson", "cheapest", "summary seed=2"}
    for policy in ("oracle", "thompson", "cheapest"):
        run = runs[policy]
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.data.params["policy"] == policy
        assert run.data.params["scenario"] == "tiny"
        assert run.data.params["seed"] == "2"
        for metric in (
            "utility",
            "regret",
            "regret_pct",
            "success_within_sla_rate",
            "dlr_delivered_rate",
            "cost_per_delivered",
            "conversion_rate",
            "outage_reaction_s",
            "expected_regret",
            "expected_regret_pct",
        ):
            assert math.isfinite(run.data.metrics[metric]), metric
        assert run.data.metrics["regret"] == pytest.approx(result.summary.loc[policy, "regret"])
        files = _artifacts(client, run.info.run_id)
        assert {
            "plots/cumulative_regret.png",
            "plots/luck_free_regret.png",
            "plots/traffic_split.png",
        } <= files
        segments = [f for f in files if f.startswith("decision_log/decisions/")]
        assert segments
        local = client.download_artifacts(run.info.run_id, segments[0], str(tmp_path / policy))
        assert pq.read_schema(local).names == DECISION_SCHEMA.names
    assert runs["thompson"].data.params["param.n_samples"] == "128"
    summary = _artifacts(client, result.parent_run_id)
    assert {"summary.csv", "cumulative_regret.png", "luck_free_regret.png"} <= summary


def test_policies_played_in_processes_give_the_same_numbers(
    catalog: Catalog, tmp_path: Path
) -> None:
    path = _write(tmp_path, {**TINY, "duration_minutes": 8})
    policies = ["thompson", "uniform", "cheapest"]
    one = run_experiment(path, policies, seed=3, out=tmp_path / "one")
    two = run_experiment(path, policies, seed=3, out=tmp_path / "two", jobs=2)
    assert list(two.summary.index) == ["oracle", *policies]
    pd.testing.assert_frame_equal(one.summary, two.summary)
    for policy in ("oracle", *policies):
        assert two.runs[policy].frame.equals(one.runs[policy].frame)
        assert any(two.runs[policy].log_dir.rglob("*.parquet"))


def test_a_failing_play_in_a_process_stops_the_experiment(catalog: Catalog, tmp_path: Path) -> None:
    """The oracle and the broken play start; the broken one fails at once, the oracle stops at
    its next simulated minute, and the plays behind them never start."""
    path = _write(tmp_path, {**TINY, "duration_minutes": 30})
    policies = ["no_such_policy", "thompson", "uniform", "cheapest"]
    with pytest.raises(ValueError, match="no_such_policy"):
        run_experiment(path, policies, seed=1, out=tmp_path / "out", jobs=2)
    started = {p.parent.name for p in (tmp_path / "out").rglob("decision_log")}
    assert started <= {"oracle", "no_such_policy"}


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out

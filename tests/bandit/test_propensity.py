"""Honest propensities through the engine: the logged π is the distribution the carrier was
drawn from, and the logged propensity is exactly π of the chosen carrier."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from carriers.catalog import Catalog, load_catalog
from router.contract.messages import RouteDecision, RouteRequest
from router.core.config import EngineConfig, load_config
from router.core.engine import EngineOptions, RoutingEngine

N_PER_CONTEXT = 4000
STEP_SECONDS = 0.05  # well under every carrier's throughput cap, so eligibility never changes
START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC).timestamp()  # no context changes time band


@dataclass(frozen=True)
class Ctx:
    """One routing context and the eligible set the example catalog gives it."""

    name: str
    to: str
    tenant: str
    mccmnc: str | None
    eligible: tuple[str, ...]


CONTEXTS = [
    Ctx(
        "RU/default",
        "+79031234567",
        "default",
        None,
        ("globalprime", "eurodirect", "asiahub", "rulocal", "budgetroute"),
    ),
    Ctx(
        "RU-t2/acme",
        "+79161234567",
        "acme",
        "25020",
        ("globalprime", "asiahub", "rulocal", "budgetroute"),  # eurodirect excludes t2
    ),
    Ctx(
        "DE/globex", "+4915112345678", "globex", None, ("globalprime", "eurodirect", "budgetroute")
    ),
    Ctx("NG/acme", "+2348031234567", "acme", None, ("globalprime", "afrilink", "budgetroute")),
    Ctx("IN/initech", "+919812345678", "initech", None, ("globalprime", "asiahub")),
    Ctx(
        "GB/default",
        "+447400123456",
        "default",
        None,
        ("globalprime", "eurodirect", "afrilink", "budgetroute"),
    ),
]

POLICY_CASES: dict[str, dict[str, Any]] = {
    "thompson": {"cache_seconds": 1e9, "exploration_floor": 0.05},
    "epsilon_greedy": {"epsilon": 0.2},
    "uniform": {},
}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    """The example catalog."""
    return load_catalog()


@pytest.fixture(scope="module")
def base_config() -> EngineConfig:
    """The shipped policy file."""
    return load_config()


def _run(
    catalog: Catalog, config: EngineConfig
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[RouteDecision]]]:
    """Route N_PER_CONTEXT messages per context, interleaved, at increasing event times,
    reporting no outcomes; returns the logged records and the answers, per context."""
    records: list[dict[str, Any]] = []
    engine = RoutingEngine(
        catalog,
        config,
        EngineOptions(max_future_skew_seconds=None),
        log_decision=records.append,
    )
    answers: dict[str, list[RouteDecision]] = {c.name: [] for c in CONTEXTS}
    logged: dict[str, list[dict[str, Any]]] = {c.name: [] for c in CONTEXTS}
    t = START
    for _ in range(N_PER_CONTEXT):
        for ctx in CONTEXTS:
            t += STEP_SECONDS
            answers[ctx.name].append(
                engine.route(
                    RouteRequest(ctx.to, "otp", ctx.tenant, "alphanumeric", mccmnc=ctx.mccmnc, at=t)
                )
            )
            logged[ctx.name].append(records[-1])
    assert len(records) == N_PER_CONTEXT * len(CONTEXTS)
    return logged, answers


def _frequency_check(
    name: str, eligible: list[str], recs: list[dict[str, Any]]
) -> tuple[float, Mapping[str, tuple[float, float]]]:
    """Max |z| of each carrier's count against the sum of its logged probabilities
    (a Poisson-binomial: exact whether π is constant or not), and (π mean, frequency)."""
    probs = np.array([r["probabilities"] for r in recs])
    chosen = np.array([eligible.index(r["carrier"]) for r in recs])
    n = len(recs)
    worst = 0.0
    summary = {}
    for j, carrier in enumerate(eligible):
        count = int((chosen == j).sum())
        expected = float(probs[:, j].sum())
        var = float((probs[:, j] * (1 - probs[:, j])).sum())
        if var == 0.0:
            assert count == expected, (name, carrier, count, expected)
            z = 0.0
        else:
            z = (count - expected) / math.sqrt(var)
        worst = max(worst, abs(z))
        summary[carrier] = (expected / n, count / n)
        assert abs(z) <= 4.0, (
            f"{name}/{carrier}: {count} draws vs {expected:.1f} expected, z={z:.2f}"
        )
    return worst, summary


@pytest.mark.parametrize("policy", list(POLICY_CASES))
def test_logged_propensities_are_honest(
    catalog: Catalog, base_config: EngineConfig, policy: str
) -> None:
    config = base_config.with_policy(policy, POLICY_CASES[policy]).with_seed(20261102)
    logged, answers = _run(catalog, config)
    print(f"\n[{policy}] N={N_PER_CONTEXT} per context")
    for ctx in CONTEXTS:
        recs = logged[ctx.name]
        eligible = recs[0]["eligible"]
        assert tuple(eligible) == ctx.eligible
        distinct = set()
        for rec, ans in zip(recs, answers[ctx.name], strict=True):
            assert rec["eligible"] == eligible
            p = rec["probabilities"]
            assert len(p) == len(eligible)
            assert abs(math.fsum(p) - 1.0) <= 1e-9
            assert min(p) >= 0.0
            i = eligible.index(rec["carrier"])
            assert rec["propensity"] == p[i]
            assert ans.propensity == p[i] and ans.carrier == rec["carrier"]
            assert rec["decision_id"] == ans.decision_id
            assert rec["policy"] == policy
            assert rec["fallbacks"] == ans.fallbacks
            assert sorted(rec["fallbacks"]) == sorted(c for c in eligible if c != rec["carrier"])
            fb = [p[eligible.index(c)] for c in rec["fallbacks"]]
            assert fb == sorted(fb, reverse=True)
            distinct.add(tuple(p))
        if policy in ("thompson", "uniform"):
            assert len(distinct) == 1, f"{ctx.name}: π changed {len(distinct)} times"
        if policy == "uniform":
            assert distinct == {tuple([1 / len(eligible)] * len(eligible))}
        if policy == "thompson":
            floor = POLICY_CASES["thompson"]["exploration_floor"] / len(eligible)
            assert min(next(iter(distinct))) >= floor - 1e-12
        worst, summary = _frequency_check(f"{policy}/{ctx.name}", eligible, recs)
        shown = ", ".join(f"{c} π={pi:.3f} f={f:.3f}" for c, (pi, f) in summary.items())
        print(f"  {ctx.name:<11} distinct π={len(distinct):<5} max|z|={worst:.2f}  {shown}")


def test_same_seed_same_decisions(catalog: Catalog, base_config: EngineConfig) -> None:
    """A fixed seed reproduces the decisions (ids, carriers, propensities) exactly."""
    config = base_config.with_policy("thompson", POLICY_CASES["thompson"]).with_seed(7)

    def run() -> list[tuple[str, str, float]]:
        engine = RoutingEngine(catalog, config, EngineOptions(max_future_skew_seconds=None))
        out = []
        for i in range(300):
            ctx = CONTEXTS[i % len(CONTEXTS)]
            d = engine.route(
                RouteRequest(ctx.to, tenant=ctx.tenant, mccmnc=ctx.mccmnc, at=START + i)
            )
            out.append((d.decision_id, d.carrier, d.propensity))
        return out

    first, second = run(), run()
    assert first == second
    assert len({d for d, _, _ in first}) == 300

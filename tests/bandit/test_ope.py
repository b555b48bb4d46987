"""Off-policy estimators: hand-computed values, exact merging, streaming over Parquet partitions,
and on simulator logs, intervals that contain a candidate's true value measured by running it."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from bandit.ope import Accumulator, Bootstrap, WeightHistogram, estimate
from bandit.reward import MessageClass
from bandit.reward_model import KEY_COLUMNS, CrossFitRewardModel, fold_of
from carriers.catalog import Catalog, load_catalog
from experiments.play import play
from experiments.world import ScenarioSpec, World
from router.core.config import load_config
from router.core.engine import EngineOptions, RoutingEngine
from router.log.decision_log import (
    DECISION_SCHEMA,
    DECISIONS,
    OUTCOME_SCHEMA,
    OUTCOMES,
    DecisionLog,
    finalized_view,
    read_stream,
)
from router.offline.evaluation import (
    CandidateResult,
    LoggedChunk,
    RewardModel,
    candidate_inputs,
    evaluate,
    latest_event,
    make_candidate,
)

Z95 = 1.959963984540054

# A small world: two countries, two tenants (one reports conversions), no retries, so every
# policy faces the same decision contexts and true values are per-decision means.
SPEC: dict[str, Any] = {
    "name": "ope",
    "seed": 1,
    "start": "2026-11-02T09:00:00Z",
    "duration_minutes": 20,
    "traffic": {
        "rate_per_second": 2.0,
        "diurnal_amplitude": 0.0,
        "countries": {"DE": 1.0, "RU": 1.0},
        "tenants": {"acme": 0.5, "default": 0.5},
        "classes": {"otp": 1.0},
        "retry": False,
    },
    "defaults": {"deliver": 0.8, "latency_median_s": 6},
    "routes": {
        "globalprime": {"*": {"deliver": 0.95, "latency_median_s": 4}},
        "budgetroute": {"RU": {"deliver": 0.3, "fake_dlr": 0.9}},
    },
}


def simulate(
    catalog: Catalog, policy: str, seed: int, directory: Path, spec: Mapping[str, Any] = SPEC
) -> Mapping[str, MessageClass]:
    """Play the world (scenario seed = `seed`) under `policy` into a decision log folder."""
    config = load_config().with_policy(policy).with_seed(seed)
    log = DecisionLog(directory)
    engine = RoutingEngine(
        catalog,
        config,
        EngineOptions(max_future_skew_seconds=None),
        log_decision=log.log_decision,
        log_outcome=log.log_outcome,
    )
    play(engine, World(ScenarioSpec.model_validate({**spec, "seed": seed}), catalog), seed=seed)
    log.close()
    return config.message_classes


def true_value(catalog: Catalog, directory: Path, classes: Mapping[str, MessageClass]) -> float:
    """Mean reward per decision of a policy's own log (its true value in that world)."""
    view = finalized_view(
        read_stream(directory, DECISIONS, DECISION_SCHEMA),
        read_stream(directory, OUTCOMES, OUTCOME_SCHEMA),
        classes,
        catalog.conversion_tenants(),
    )
    return float(view["reward"].mean())


# ---- estimators on tiny arrays --------------------------------------------------------------

R = np.array([1.0, 0.0, 1.0])
P0 = np.array([0.5, 0.5, 0.25])
PE = np.array([1.0, 0.0, 0.5])  # w = (2, 0, 2)
QA = np.array([0.5, 0.5, 0.5])
QPI = np.array([0.6, 0.4, 0.5])


def test_hand_computed_values() -> None:
    res = estimate(R, P0, PE, QA, QPI)
    assert res["ips"].value == pytest.approx(4 / 3)
    assert res["snips"].value == pytest.approx(1.0)
    assert res["dm"].value == pytest.approx(0.5)
    assert res["dr"].value == pytest.approx(3.5 / 3)  # (0.6 + 2·0.5, 0.4, 0.5 + 2·0.5)
    assert res["sndr"].value == pytest.approx(0.5 + (2 / 3) / (4 / 3))
    ips = res["ips"]
    assert ips.std_error == pytest.approx(2 / 3)  # w·r = (2, 0, 2): sd 2/√3, n 3
    assert (ips.ci_low, ips.ci_high) == pytest.approx((4 / 3 - Z95 * 2 / 3, 4 / 3 + Z95 * 2 / 3))
    assert res["snips"].std_error == pytest.approx(0.0)  # w·(r − 1) = 0 everywhere
    dr_terms = np.array([1.6, 0.4, 1.5])
    assert res["dr"].std_error == pytest.approx(dr_terms.std(ddof=1) / math.sqrt(3))
    assert ips.ess == pytest.approx(2.0)  # (Σw)² / Σw² = 16 / 8
    assert ips.mean_weight == pytest.approx(4 / 3)
    assert ips.max_weights == (2.0, 2.0, 0.0)


def test_sndr_delta_method_matches_its_influence_function() -> None:
    rng = np.random.default_rng(0)
    n = 500
    r, p0 = rng.random(n), rng.uniform(0.1, 1, n)
    pe, qa, qpi = rng.random(n) * p0 * 2 % 1, rng.random(n), rng.random(n)
    e = estimate(r, p0, pe, qa, qpi)["sndr"]
    w = pe / p0
    theta = (w * (r - qa)).mean() / w.mean()
    psi = qpi + w * (r - qa - theta) / w.mean()
    assert e.std_error == pytest.approx(psi.std(ddof=1) / math.sqrt(n), rel=1e-9)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="propensities"):
        estimate(R, np.array([0.5, 0.0, 1.0]), PE)
    with pytest.raises(ValueError, match="same length"):
        estimate(R, P0, PE[:2])
    with pytest.raises(ValueError, match="both"):
        Accumulator().update(R, P0, PE, QA)
    with pytest.raises(ValueError, match="DM/DR"):
        Accumulator(with_model=True).update(R, P0, PE)


def _random_inputs(n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    p0 = rng.uniform(0.05, 1.0, n)
    return rng.normal(0.3, 0.2, n), p0, rng.random(n), rng.random(n), rng.random(n)


def test_merge_equals_one_pass_over_the_concatenation() -> None:
    arrays = _random_inputs(10_000, 1)
    whole = Accumulator(with_model=True).update(*arrays)
    cuts = [0, 1, 7, 3000, 3001, 10_000]
    parts = [
        Accumulator(with_model=True).update(*(a[i:j] for a in arrays))
        for i, j in itertools.pairwise(cuts)
    ]
    merged = Accumulator(with_model=True)
    for part in reversed(parts):
        merged = merged.merge(part)
    assert merged.n == whole.n
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-13)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-11)
    np.testing.assert_array_equal(merged.top_weights, whole.top_weights)
    for name, e in whole.results().items():
        m = merged.result(name)
        assert m.value == pytest.approx(e.value, rel=1e-12)
        assert m.std_error == pytest.approx(e.std_error, rel=1e-10)


def test_bootstrap_merges_and_agrees_with_the_analytic_interval() -> None:
    arrays = _random_inputs(20_000, 2)
    half = 10_000
    a = Bootstrap(300, seed=1).update(*(x[:half] for x in arrays))
    b = Bootstrap(300, seed=1).update(*(x[half:] for x in arrays))
    both = a.merge(b)
    np.testing.assert_allclose(both.sums, a.sums + b.sums)
    exact = estimate(*arrays)
    for name in ("ips", "snips", "dr", "sndr"):
        low, high = both.interval(name)
        e = exact[name]
        assert low < e.value < high
        assert (high - low) == pytest.approx(e.ci_high - e.ci_low, rel=0.2)


def test_dm_intervals_use_the_influence_function_of_dr() -> None:
    arrays = _random_inputs(5_000, 3)
    res = estimate(*arrays)
    assert res["dm"].std_error == pytest.approx(res["dr"].std_error, rel=1e-12)
    assert res["dm"].ci_high - res["dm"].ci_low == pytest.approx(
        res["dr"].ci_high - res["dr"].ci_low, rel=1e-12
    )
    boot = Bootstrap(100, seed=2).update(*arrays)
    shift = res["dm"].value - res["dr"].value
    np.testing.assert_allclose(boot.replicates("dm"), boot.replicates("dr") + shift, rtol=1e-12)


def test_weight_histogram_counts_merges_and_gives_the_ccdf() -> None:
    w = np.array([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 4.0, 1e-5, 1e5])
    hist = WeightHistogram(low=-1, high=1, per_decade=1)  # bins [0.1, 1), [1, 10)
    whole = WeightHistogram(low=-1, high=1, per_decade=1).update(w)
    merged = hist.update(w[:4]).merge(WeightHistogram(low=-1, high=1, per_decade=1).update(w[4:]))
    for h in (whole, merged):
        assert h.zeros == 2 and h.n == 9
        assert h.counts.tolist() == [1, 1, 4, 1]  # below 0.1, [0.1, 1), [1, 10), 10 and up
        edges, ccdf = h.ccdf()
        assert edges == pytest.approx([0.1, 1.0, 10.0])
        assert ccdf == pytest.approx([6 / 9, 5 / 9, 1 / 9])  # P(W ≥ 0.1), P(W ≥ 1), P(W ≥ 10)


def _reward_rows(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Logged keys, decision ids, rewards and their true means (a carrier × country effect)."""
    rng = np.random.default_rng(seed)
    keys = pd.DataFrame(
        {
            "carrier": rng.choice(["a", "b", "c"], n),
            "message_class": "otp",
            "country": rng.choice(["DE", "RU"], n),
            "operator": rng.choice(["x", "y"], n),
            "band": rng.integers(0, 4, n),
            "tenant": rng.choice(["t1", "t2"], n),
            "retry": rng.random(n) < 0.1,
        }
    )
    effect = {("a", "DE"): 0.9, ("a", "RU"): 0.2, ("b", "DE"): 0.5, ("b", "RU"): 0.7}
    pairs = zip(keys.carrier, keys.country, strict=True)
    mean = np.array([effect.get(pair, 0.1) for pair in pairs])
    return keys, np.array([f"d{i}" for i in range(n)]), mean + rng.normal(0, 0.1, n), mean


def test_reward_model_is_cross_fitted_and_merges() -> None:
    keys, ids, reward, mean = _reward_rows(20_000, 4)
    fold = fold_of(ids, 5)
    assert np.bincount(fold).min() > 3_500  # five folds of about 4,000 decisions
    model = CrossFitRewardModel(5)
    model.update(keys, fold, reward)
    q = model.fit().predict(keys, fold)
    assert np.abs(q - mean).mean() < 0.01 and np.abs(q - mean).max() < 0.05
    # A row's prediction never sees its own fold: change fold 0's rewards only.
    changed = np.where(fold == 0, reward + 1.0, reward)
    other = CrossFitRewardModel(5)
    other.update(keys, fold, changed)
    q_changed = other.fit().predict(keys, fold)
    np.testing.assert_allclose(q_changed[fold == 0], q[fold == 0], atol=1e-8)
    assert (q_changed[fold != 0] - q[fold != 0]).mean() > 0.1
    # Sums merge: two halves give the model of the whole.
    half = len(ids) // 2
    a, b = CrossFitRewardModel(5), CrossFitRewardModel(5)
    a.update(keys[:half], fold[:half], reward[:half])
    b.update(keys[half:], fold[half:], reward[half:])
    np.testing.assert_allclose(a.merge(b).fit().predict(keys, fold), q, atol=1e-8)
    assert list(keys.columns) == list(KEY_COLUMNS)


# ---- candidates over logged eligible sets ---------------------------------------------------


class FirstEligible:
    """A user policy: always the first logged eligible carrier."""

    def probabilities(self, record: dict[str, Any], catalog: Catalog) -> np.ndarray:
        """One-hot on the first eligible carrier."""
        pi = np.zeros(len(record["eligible"]))
        pi[0] = 1.0
        return pi


def _chunk() -> LoggedChunk:
    rows = [
        {
            "eligible": ["budgetroute", "globalprime", "eurodirect"],
            "probabilities": [0.2, 0.5, 0.3],
            "scores": [0.1, 0.4, 0.4],
            "carrier": "globalprime",
            "propensity": 0.5,
            "country": "RU",
            "operator": "beeline",
        },
        {
            "eligible": ["eurodirect", "globalprime"],
            "probabilities": [0.5, 0.5],
            "scores": [0.3, 0.2],
            "carrier": "eurodirect",
            "propensity": 0.5,
            "country": "DE",
            "operator": "o2",
        },
    ]
    table = pa.Table.from_pylist([{**r, "decision_id": str(i)} for i, r in enumerate(rows)])
    return LoggedChunk.from_table(table, np.array([1.0, 0.0]))


def test_builtin_and_user_candidates_give_pi_over_the_logged_eligible_set() -> None:
    catalog = load_catalog()
    chunk = _chunk()
    pi = {
        name: make_candidate(name)(chunk, catalog)
        for name in ("static", "cheapest", "uniform", "logged", "greedy")
    }
    # RU/beeline: globalprime 0.062 (priority 1), eurodirect 0.051, budgetroute (cheapest).
    assert pi["static"].tolist() == [0, 1, 0, 0, 1]
    budget_ru = catalog.carriers["budgetroute"].coverage["RU"].price_for("beeline")
    assert budget_ru < 0.051
    assert pi["cheapest"].tolist() == [1, 0, 0, 1, 0]  # DE/o2: eurodirect 0.068 < 0.085
    assert pi["uniform"] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.5, 0.5])
    assert pi["logged"].tolist() == [0.2, 0.5, 0.3, 0.5, 0.5]
    assert pi["greedy"].tolist() == [0, 1, 0, 1, 0]  # a tie in scores goes to the first
    eps = make_candidate("epsilon_greedy", epsilon=0.3)(chunk, catalog)
    assert eps == pytest.approx([0.1, 0.8, 0.1, 0.85, 0.15])
    user = make_candidate(f"{__name__}:FirstEligible")(chunk, catalog)
    assert user.tolist() == [1, 0, 0, 1, 0]
    z = candidate_inputs(chunk, pi["static"], None)
    assert z[:, 0].tolist() == [2.0, 0.0]  # w = π_e(a|x) / π0(a|x) of the logged carrier
    with pytest.raises(ValueError, match="unknown candidate"):
        make_candidate("nope")
    with pytest.raises(ValueError, match="sum to 1"):
        candidate_inputs(chunk, pi["static"] * 0.5, None)
    wrong = chunk.table.set_column(
        chunk.table.schema.get_field_index("propensity"), "propensity", pa.array([0.2, 0.5])
    )
    with pytest.raises(ValueError, match="propensity differs"):
        LoggedChunk.from_table(wrong, chunk.reward)


# ---- simulator logs -------------------------------------------------------------------------

CANDIDATES = ("static", "cheapest", "logged", "greedy")


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    """The example catalog."""
    return load_catalog()


@pytest.fixture(scope="module")
def logs(catalog: Catalog, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Uniform-logged decisions, and the true values of static and cheapest in the same world."""
    root = tmp_path_factory.mktemp("ope")
    classes = simulate(catalog, "uniform", 1, root / "uniform")
    truth = {}
    for policy in ("static", "cheapest"):
        simulate(catalog, policy, 1, root / policy)
        truth[policy] = true_value(catalog, root / policy, classes)
    return {"dir": root / "uniform", "classes": classes, "truth": truth}


def _evaluate(catalog: Catalog, logs: dict[str, Any], **kw: Any) -> dict[str, CandidateResult]:
    candidates = {name: make_candidate(name) for name in CANDIDATES}
    return evaluate(
        logs["dir"], candidates, catalog, logs["classes"], reward_model=RewardModel(), **kw
    )


def test_streaming_partitions_equal_the_in_memory_result(
    catalog: Catalog, logs: dict[str, Any]
) -> None:
    whole = _evaluate(catalog, logs)
    parts = _evaluate(catalog, logs, rows_per_partition=300, chunk_rows=97)
    # In memory: one table, one chunk, one pass of the estimators.
    decisions = read_stream(logs["dir"], DECISIONS, DECISION_SCHEMA)
    view = finalized_view(
        decisions,
        read_stream(logs["dir"], OUTCOMES, OUTCOME_SCHEMA),
        logs["classes"],
        catalog.conversion_tenants(),
    )
    chunk = LoggedChunk.from_table(decisions, view["reward"].to_numpy())
    model = RewardModel()
    model.update(chunk)
    q = model.fit().predict(chunk)
    for name in CANDIDATES:
        z = candidate_inputs(chunk, make_candidate(name)(chunk, catalog), q)
        memory = Accumulator(with_model=True).update_z(z).results()
        for est, e in memory.items():
            for other in (whole[name].estimates()[est], parts[name].estimates()[est]):
                assert other.n == e.n == decisions.num_rows
                assert other.value == pytest.approx(e.value, rel=1e-9)
                assert other.std_error == pytest.approx(e.std_error, rel=1e-9)
                assert other.max_weights == e.max_weights


def test_logged_policy_value_is_the_on_policy_mean(catalog: Catalog, logs: dict[str, Any]) -> None:
    res = _evaluate(catalog, logs)["logged"].estimates()
    assert res["ips"].ess == pytest.approx(res["ips"].n)
    assert res["ips"].value == pytest.approx(true_value(catalog, logs["dir"], logs["classes"]))


def test_intervals_contain_the_true_value_of_deterministic_candidates(
    catalog: Catalog, logs: dict[str, Any]
) -> None:
    results = _evaluate(catalog, logs, n_bootstrap=200)
    for policy, truth in logs["truth"].items():
        boot = results[policy].bootstrap_intervals()
        for name, e in results[policy].estimates().items():
            print(
                f"\n[{policy}/{name}] {e.value:.4f} [{e.ci_low:.4f}, {e.ci_high:.4f}] "
                f"boot {boot[name][0]:.4f}..{boot[name][1]:.4f} truth {truth:.4f} "
                f"ess {e.ess:.0f}"
            )
            if name in ("ips", "snips", "dr"):
                assert e.ci_low <= truth <= e.ci_high
                assert boot[name][0] <= truth <= boot[name][1]


def test_unsettled_decisions_wait_for_their_deadline(
    catalog: Catalog, logs: dict[str, Any]
) -> None:
    latest = latest_event(logs["dir"])
    decisions = read_stream(logs["dir"], DECISIONS, DECISION_SCHEMA).to_pandas()
    assert latest is not None and latest > decisions["at"].max()
    as_of = decisions["at"].min() + pd.Timedelta(minutes=10)
    wait = np.where(decisions["tenant"].isin(catalog.conversion_tenants()), 300.0, 70.0)
    settled = decisions["at"] + pd.to_timedelta(wait, unit="s") <= as_of
    n = _evaluate(catalog, logs, as_of=as_of.to_pydatetime())["logged"].accumulator.n
    assert 0 < n == settled.sum() < len(decisions)
